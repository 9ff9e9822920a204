"""EDM2 training loop + power-function EMA + post-hoc reconstruction, on a tiny 8x8 U-Net and a generated
dataset: snapshots and stats, post-hoc reconstruction against the directly tracked EMA, exact resume after
SIGKILL, config/resume errors and the reconstruct_phema.py CLI."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import pytest
import torch

from threads import torch_threads
from click.testing import CliRunner

from edm_fast import checkpoint, dataset_tool, loss_edm2, phema
from edm_fast import training_loop_edm2 as tl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import reconstruct_phema  # noqa: E402

BATCH = 64
TOTAL = 8192               # 128 steps
STDS = [0.05, 0.1]


def make_dataset(root, n_per_class=16, res=8, classes=4):
    """Class k: a colour pattern plus noise, written as PNGs and converted with dataset_tool."""
    rng = np.random.RandomState(0)
    for c in range(classes):
        (root / 'src' / f'class{c}').mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            img = np.full((res, res, 3), 30, np.int64)
            img[..., c % 3] = 220
            if c >= 3:
                img[res // 4:3 * res // 4, res // 4:3 * res // 4] = 255
            img = np.clip(img + rng.randint(-25, 25, img.shape), 0, 255).astype(np.uint8)
            PIL.Image.fromarray(img).save(root / 'src' / f'class{c}' / f'{i}.png')
    dest = root / 'data.zip'
    dataset_tool.convert_dataset(str(root / 'src'), str(dest), progress=False)
    return str(dest)


def config(data, run_dir, **overrides):
    c = dict(
        run_dir=str(run_dir),
        dataset_kwargs=dict(class_name='ImageFolderDataset', path=data, use_labels=True),
        data_loader_kwargs=dict(num_workers=0),
        network_kwargs=dict(class_name='Precond', model_channels=8, channel_mult=[1, 2], num_blocks=1,
                            attn_resolutions=[4], channels_per_head=16, logvar_channels=8, dropout=0.1),
        loss_kwargs=dict(class_name='EDM2Loss', P_mean=-0.8, P_std=1.6),
        lr_kwargs=dict(func_name='learning_rate_schedule', ref_lr=1e-2, ref_batches=16, rampup_Mimg=0.002),
        ema_kwargs=dict(class_name='PowerFunctionEMA', stds=STDS),
        seed=7, batch_size=BATCH, total_nimg=TOTAL, status_nimg='1Ki', snapshot_nimg='1Ki', checkpoint_nimg='4Ki',
        device='cpu',
    )
    c.update(overrides)
    return c


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    """One training run; the net's parameters after every step are recorded through the EMA update."""
    root = tmp_path_factory.mktemp('phema')
    data = make_dataset(root)
    run_dir = root / 'run'
    run_dir.mkdir()
    trajectory = []
    update = phema.PowerFunctionEMA.update

    def recording_update(self, cur_nimg, batch_size):
        trajectory.append((cur_nimg, torch.cat([p.detach().flatten().to(torch.float64) for p in self.net.parameters()])))
        return update(self, cur_nimg, batch_size)

    with pytest.MonkeyPatch.context() as mp, torch_threads():  # as the subprocesses it is compared with
        mp.setattr(phema.PowerFunctionEMA, 'update', recording_update)
        result = tl.training_loop(**config(data, run_dir))
    assert result == dict(cur_nimg=TOTAL, stopped=False)
    assert [n for n, _ in trajectory] == list(range(BATCH, TOTAL + 1, BATCH))
    return dict(root=root, data=data, run_dir=str(run_dir), theta=torch.stack([t for _, t in trajectory]))


def params_vector(net):
    return torch.cat([p.detach().flatten().to(torch.float64) for p in net.parameters()])


def tracked_ema(run_dir, nimg, std):
    """The fp32 EMA the training loop tracked (from its training state), as a parameter vector."""
    state = torch.load(os.path.join(run_dir, f'training-state-{nimg // 1000:07d}.pt'), weights_only=True)
    net = checkpoint.load_network(os.path.join(run_dir, f'network-snapshot-{nimg // 1000:07d}-{std:.3f}.safetensors'))
    net.load_state_dict(state['ema']['emas'][state['ema']['stds'].index(std)])
    return params_vector(net)


def ema_weights(std, num_steps, total_steps):
    """Weight of theta_k (parameters after step k, k = 1..total) in the EMA after `num_steps` steps: the
    product form of the power-function EMA recursion (the first update has beta = 0, so theta_0 drops out)."""
    c = np.zeros(total_steps)
    for k in range(1, num_steps + 1):
        beta = phema.power_function_beta(std, k * BATCH, BATCH)
        c[:k - 1] *= beta
        c[k - 1] = 1 - beta
    return c


def read_header(path):
    with open(path, 'rb') as f:
        n = int.from_bytes(f.read(8), 'little')
        return json.loads(f.read(n))

# ----------------------------------------------------------------------------------------------------


def test_training_outputs(run):
    run_dir = run['run_dir']
    names = sorted(f for f in os.listdir(run_dir) if not f.startswith('.'))
    kimgs = [n // 1000 for n in range(0, TOTAL + 1, 1024)]
    snaps = [f'network-snapshot-{k:07d}-{s:.3f}.safetensors' for k in kimgs for s in STDS]
    assert names == sorted(snaps + ['stats.jsonl', 'training-state-0000004.pt', 'training-state-0000008.pt'])

    # Snapshots: fp16 parameters and buffers (as NVlabs module.to(float16)), exact cur_nimg and std recorded, EDM2 loss and RGB encoder.
    path = os.path.join(run_dir, snaps[-1])
    header = read_header(path)
    snap = checkpoint.load_snapshot(path)
    params = {n for n, _ in snap['ema'].named_parameters()}
    assert {header[f'ema.{n}']['dtype'] for n in params} == {'F16'}
    assert header['ema.unet.emb_fourier.freqs']['dtype'] == 'F16'  # buffers too, as NVlabs' module.to(float16)
    assert snap['extra'] == dict(kimg=8.192, cur_nimg=TOTAL, ema_std=0.1)
    assert isinstance(snap['loss_fn'], loss_edm2.EDM2Loss) and snap['loss_fn'].P_std == 1.6
    assert type(snap['encoder']).__name__ == 'StandardRGBEncoder'
    assert snap['ema'].init_kwargs == dict(img_resolution=8, img_channels=3, label_dim=4, **{
        k: v for k, v in config(run['data'], run_dir)['network_kwargs'].items() if k != 'class_name'})

    # Every snapshot is the power-function average of the recorded trajectory (fp16 storage, fp32 EMA rounding).
    theta = run['theta']
    for name in snaps[2::5]:
        nimg = phema.kimg_to_nimg(int(name.split('-')[2]))
        std = float(name.split('-')[3][:5])
        got = params_vector(checkpoint.load_network(os.path.join(run_dir, name)))
        want = torch.from_numpy(ema_weights(std, nimg // BATCH, len(theta))) @ theta
        bound = 2 ** -11 * want.abs() + 2 ** -24 + len(theta) * 2 ** -22 * theta.abs().max(0).values
        assert ((got - want).abs() <= bound).all(), name

    # stats.jsonl: name -> mean at every status point; the learning rate is the schedule's mean over the steps.
    lines = [json.loads(line) for line in open(os.path.join(run_dir, 'stats.jsonl'))]
    assert [round(line['Progress/kimg'] * 1000) for line in lines] == list(range(0, TOTAL + 1, 1024))
    assert all(np.isfinite(line['Loss/loss']) for line in lines[1:])
    lr = [loss_edm2.learning_rate_schedule(n, BATCH, ref_lr=1e-2, ref_batches=16, rampup_Mimg=0.002)
          for n in range(1024, 2048, BATCH)]
    assert lines[2]['Loss/learning_rate'] == pytest.approx(np.mean(lr), rel=1e-12)
    assert all(isinstance(v, float) for line in lines for v in line.values())


def test_posthoc_reconstruction_matches_tracked_ema(run, tmp_path):
    """Reconstruct std 0.100 at the end of training from the snapshots *without* the tracked 0.100 one there,
    and compare with the EMA tracked during training (fp32, from the training state).

    Tolerance, elementwise, from the method's accuracy: with discrete weights w_i(s) of snapshot i over the
    steps s and w(s) of the target profile, reconstruction - truth = sum_s (sum_i X_i w_i(s) - w(s)) theta_s.
    The weights sum to 1 on both sides, so this is bounded by sum_s |dw(s)| |theta_s - theta_T| (the profile
    mismatch of the least-squares fit, times how far the weights moved). Storage adds fp16 rounding of the
    inputs (2^-11 sum_i |X_i| |e_i|) and of the output (2^-11 |recon|), and the fp32 EMA recursion at most
    2^-22 max|theta| per step (inputs and truth). Separately, the error must equal the predicted
    sum_s dw(s) theta_s up to that rounding alone.
    """
    run_dir, theta = run['run_dir'], run['theta']
    steps = len(theta)
    inputs = [s for s in phema.list_input_snapshots(run_dir) if s['nimg'] > 0
              and not (s['nimg'] == TOTAL and s['std'] == 0.1)]
    assert len(inputs) == 15 and [s['nimg'] for s in inputs][:2] == [1024, 1024]
    out = phema.reconstruct_phema(inputs, 0.1, out_dir=str(tmp_path), verbose=False)
    assert [os.path.basename(o['path']) for o in out] == ['phema-0000008-0.100.safetensors']
    X = out[0]['coefs']
    assert X.sum() == pytest.approx(1, abs=1e-12)
    recon = params_vector(checkpoint.load_network(out[0]['path']))
    truth = tracked_ema(run_dir, TOTAL, 0.1)
    other = tracked_ema(run_dir, TOTAL, 0.05)

    dw = sum(X[i] * ema_weights(s['std'], s['nimg'] // BATCH, steps) for i, s in enumerate(inputs)) \
        - ema_weights(0.1, steps, steps)
    predicted = torch.from_numpy(dw) @ theta
    mismatch = torch.from_numpy(np.abs(dw)) @ (theta - theta[-1]).abs()
    snaps = torch.stack([params_vector(checkpoint.load_network(s['path'])) for s in inputs])
    absX = torch.from_numpy(np.abs(X))
    max_theta = theta.abs().max(0).values
    rounding = 2 ** -11 * (absX @ snaps.abs() + recon.abs()) * (1 + 2 ** -10) + 2 ** -23 \
        + (absX.sum() + 1) * steps * 2 ** -22 * max_theta + len(inputs) * 2 ** -23 * (absX @ snaps.abs())
    err = recon - truth
    assert ((err - predicted).abs() <= rounding).all()
    tol = mismatch + rounding
    assert (err.abs() <= tol).all()
    # The tolerance discriminates between EMA lengths: the 0.050 EMA is outside it, the reconstruction well inside.
    assert ((other - truth).abs() > tol).sum() > 0.25 * len(truth)
    assert err.abs().max() < 0.2 * (other - truth).abs().max()
    assert np.abs(dw).sum() < 0.5

    # With the tracked 0.100 snapshot among the inputs the solution selects it: equal up to fp16 re-rounding.
    exact = phema.reconstruct_phema(run_dir, [0.1, 0.05], out_dir=str(tmp_path / 'all'), verbose=False)
    assert [o['std'] for o in exact] == [0.05, 0.1]
    for o in exact:
        snap = params_vector(checkpoint.load_network(os.path.join(
            run_dir, f'network-snapshot-{TOTAL // 1000:07d}-{o["std"]:.3f}.safetensors')))
        got = params_vector(checkpoint.load_network(o['path']))
        assert np.abs(o['coefs']).argmax() == len(o['coefs']) - (2 if o['std'] == 0.05 else 1)
        assert ((got - snap).abs() <= 2 ** -10 * snap.abs() + 2 ** -23).all()


# Exactness is only claimed between runs in the same kind of process: CPU kernels (oneDNN) pick their blocking from
# the thread count and cache primitives per shape, so an in-process run after other tests can round differently
# from a fresh 1-thread subprocess. Every run compared bit for bit below is a fresh subprocess with one thread.
TRAIN_CODE = (
    'import json, sys\n'
    'from edm_fast import phema\n'
    'from edm_fast.training_loop_edm2 import training_loop\n'
    'steps, update = [], phema.PowerFunctionEMA.update\n'
    'def counting(self, cur_nimg, batch_size):\n'
    '    steps.append(cur_nimg)\n'
    '    return update(self, cur_nimg, batch_size)\n'
    'phema.PowerFunctionEMA.update = counting\n'
    'result = training_loop(**json.load(open(sys.argv[1])))\n'
    'print("STEPS", json.dumps(steps), "RESULT", json.dumps(result))\n'
)


def train_subprocess(cfg, tmp_path, name, stop=None):
    """Run the EDM2 loop in a fresh 1-thread process; `stop(run_dir)` -> signal to send once true (else None).
    Returns (returncode, steps taken or None, log text)."""
    cfg_path = tmp_path / f'{name}.json'
    cfg_path.write_text(json.dumps(cfg))
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONPATH=REPO)
    log_path = tmp_path / f'{name}.log'
    with open(log_path, 'wb') as log:
        proc = subprocess.Popen([sys.executable, '-c', TRAIN_CODE, str(cfg_path)], env=env, stdout=log, stderr=log)
        if stop is not None:
            deadline = time.time() + 120
            while proc.poll() is None and time.time() < deadline:
                sig = stop(cfg['run_dir'])
                if sig is not None:
                    proc.send_signal(sig)
                    break
                time.sleep(0.02)
        proc.wait(timeout=300)
    text = log_path.read_text()
    steps = next((json.loads(line.split('STEPS ', 1)[1].split(' RESULT', 1)[0]) for line in text.splitlines()
                  if line.startswith('STEPS ')), None)
    return proc.returncode, steps, text


@pytest.fixture(scope='module')
def reference_4k(run, tmp_path_factory):
    """An uninterrupted 4Ki-image run in a fresh process: the target of the resume tests."""
    tmp = tmp_path_factory.mktemp('ref4k')
    run_dir = tmp / 'run'
    run_dir.mkdir()
    cfg = config(run['data'], run_dir, total_nimg=4096, checkpoint_nimg=2048, status_nimg=None)
    rc, steps, log = train_subprocess(cfg, tmp, 'ref')
    assert rc == 0, log[-3000:]
    assert steps == list(range(BATCH, 4096 + 1, BATCH))
    return str(run_dir)


def assert_same_training_state(a_path, b_path):
    a, b = torch.load(a_path, weights_only=True), torch.load(b_path, weights_only=True)
    assert a['cur_nimg'] == b['cur_nimg']
    for key in b['net']:
        assert torch.equal(a['net'][key], b['net'][key]), key
    for ea, eb in zip(a['ema']['emas'], b['ema']['emas']):
        assert all(torch.equal(ea[k], eb[k]) for k in eb)
    for idx, st in b['optimizer']['state'].items():
        assert all(torch.equal(a['optimizer']['state'][idx][k], v) for k, v in st.items())


def test_resume_after_kill_is_exact(run, reference_4k, tmp_path):
    """SIGKILL a run right after its first training state, resume it, compare with the uninterrupted run bit for
    bit (per-step reseeding + the sampler restarting at cur_nimg); the resumed run takes only the missing steps."""
    run_dir = tmp_path / 'killed'
    run_dir.mkdir()
    cfg = config(run['data'], run_dir, total_nimg=4096, checkpoint_nimg=2048, status_nimg=None)
    first_state = run_dir / 'training-state-0000002.pt'
    rc, _, log = train_subprocess(cfg, tmp_path, 'killed',
                                  stop=lambda d: signal.SIGKILL if first_state.exists() else None)
    assert rc == -signal.SIGKILL, log[-3000:]
    assert first_state.exists() and not (run_dir / 'training-state-0000004.pt').exists()

    rc, steps, log = train_subprocess(cfg, tmp_path, 'resumed')
    assert rc == 0, log[-3000:]
    assert steps == list(range(2048 + BATCH, 4096 + 1, BATCH))  # a restart from 0 would reproduce the numbers too
    assert_same_training_state(run_dir / 'training-state-0000004.pt',
                               os.path.join(reference_4k, 'training-state-0000004.pt'))
    a = checkpoint.load_network(run_dir / 'network-snapshot-0000004-0.050.safetensors')
    b = checkpoint.load_network(os.path.join(reference_4k, 'network-snapshot-0000004-0.050.safetensors'))
    assert torch.equal(params_vector(a), params_vector(b))

    # Resuming with a different batch size is refused, naming the option.
    with pytest.raises(ValueError, match=r'batch_size \(--batch\) = 64.*uses 32'):
        tl.training_loop(**dict(cfg, batch_size=32, total_nimg=8192))


def test_sigterm_writes_a_state_and_resume_continues_exactly(run, reference_4k, tmp_path):
    """SIGTERM finishes the step, writes a state at whatever image count it reached and exits cleanly."""
    run_dir = tmp_path / 'stopped'
    run_dir.mkdir()
    cfg = config(run['data'], run_dir, total_nimg=4096, checkpoint_nimg=4096, status_nimg=None)
    marker = run_dir / 'network-snapshot-0000002-0.100.safetensors'
    rc, _, log = train_subprocess(cfg, tmp_path, 'stopped', stop=lambda d: signal.SIGTERM if marker.exists() else None)
    assert rc == 0, log[-3000:]
    assert 'Stopped at the request' in log
    states = [f for f in os.listdir(run_dir) if f.startswith('training-state-')]
    assert len(states) == 1 and states[0] != 'training-state-0000004.pt'
    stopped_at = torch.load(run_dir / states[0], weights_only=True)['cur_nimg']
    assert 2048 <= stopped_at < 4096 and stopped_at % BATCH == 0

    rc, steps, log = train_subprocess(cfg, tmp_path, 'continued')
    assert rc == 0, log[-3000:]
    assert steps == list(range(stopped_at + BATCH, 4096 + 1, BATCH))
    assert_same_training_state(run_dir / 'training-state-0000004.pt',
                               os.path.join(reference_4k, 'training-state-0000004.pt'))


def test_two_processes_with_gradient_accumulation(run, tmp_path):
    """torchrun (gloo) with 2 ranks x 2 accumulation rounds: DDP syncs on the last round only; the ranks must
    end with identical networks (checked by the loop at every training state) and rank 0 writes the files."""
    run_dir = tmp_path / 'ddp'
    run_dir.mkdir()
    cfg = config(run['data'], run_dir, batch_gpu=16, total_nimg=2048, checkpoint_nimg=2048, status_nimg='1Ki')
    cfg_path = tmp_path / 'cfg.json'
    cfg_path.write_text(json.dumps(cfg))
    script = tmp_path / 'train_ddp.py'
    script.write_text('import json, sys\n'
                      'from edm_fast import distributed\n'
                      'from edm_fast.training_loop_edm2 import training_loop\n'
                      'distributed.init_from_env("cpu")\n'
                      'result = training_loop(**json.load(open(sys.argv[1])))\n'
                      'gathered = distributed.gather_to_rank0(result["cur_nimg"])\n'
                      'if gathered is not None:\n'  # rank 0 only: two ranks printing would interleave
                      '    print("RESULT", gathered)\n'
                      'distributed.shutdown()\n')
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           str(script), str(cfg_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert 'RESULT [2048, 2048]' in proc.stdout
    state = torch.load(run_dir / 'training-state-0000002.pt', weights_only=True)
    assert state['world'] == 2 and state['cur_nimg'] == 2048
    lines = [json.loads(line) for line in open(run_dir / 'stats.jsonl')]
    assert len(lines) == 3 and np.isfinite(lines[-1]['Loss/loss'])
    assert sorted(f for f in os.listdir(run_dir) if f.startswith('network-snapshot')) == [
        f'network-snapshot-{k:07d}-{s:.3f}.safetensors' for k in (0, 1, 2) for s in STDS]


def test_config_errors_name_the_option(tmp_path):
    assert tl.parse_nimg('128Ki') == 131072 and tl.parse_nimg('8Mi') == 8 << 20 and tl.parse_nimg('2Gi') == 2 << 30
    assert tl.parse_nimg(5000) == 5000 and tl.parse_nimg('5000') == 5000 and tl.parse_nimg(None) is None
    assert tl.format_nimg(131072) == '128Ki' and tl.format_nimg(5000) == '5000'
    for bad in ('8M', '1.5Mi', '-3', 'Ki'):
        with pytest.raises(ValueError, match='Ki, Mi or Gi'):
            tl.parse_nimg(bad, 'snapshot_nimg (--snapshot)')
    base = dict(run_dir=str(tmp_path), dataset_kwargs=dict(class_name='ImageFolderDataset', path='missing.zip'),
                batch_size=64, device='cpu')
    with pytest.raises(ValueError, match=r'snapshot_nimg \(--snapshot\) = 1000 must be a positive multiple of the '
                                         r'batch size \(64\) and of 1024'):
        tl.training_loop(**base, snapshot_nimg=1000)
    with pytest.raises(ValueError, match=r'total_nimg \(--duration\) = 100 must be'):
        tl.training_loop(**base, total_nimg=100)
    with pytest.raises(ValueError, match=r'batch_gpu \(--batch-gpu\) = 48'):
        tl.training_loop(**base, batch_gpu=48)
    with pytest.raises(ValueError, match='unknown class_name'):
        tl.construct(dict(class_name='training.networks.EDMPrecond'))
    with pytest.raises(ValueError, match='not a valid EMA length'):
        phema.PowerFunctionEMA(torch.nn.Linear(2, 2), stds=[0.3])


def test_foreign_state_in_run_dir_is_refused(run, tmp_path):
    run_dir = tmp_path / 'foreign'
    run_dir.mkdir()
    torch.save(dict(format='edm_fast.training_state', version=1), run_dir / 'training-state-0000010.pt')
    with pytest.raises(ValueError, match=r"it is a 'edm_fast\.training_state' file, not an EDM2 training state of "
                                         r"edm_fast or NVlabs.*new one"):
        tl.training_loop(**config(run['data'], run_dir))
    torch.save(dict(net={}, optimizer={}), run_dir / 'training-state-0000010.pt')
    with pytest.raises(ValueError, match='it is a dict with keys net, optimizer, not an EDM2 training state'):
        tl.training_loop(**config(run['data'], run_dir))


def test_reconstruct_cli(run, tmp_path):
    cli = lambda *args: CliRunner().invoke(reconstruct_phema.main, list(args))  # noqa: E731
    ok = cli('--indir', run['run_dir'], '--outdir', str(tmp_path / 'out'), '--outstd', '0.07,0.12',
             '--outkimg', '4', '--instd', '0.050,0.100')
    assert ok.exit_code == 0, ok.output
    assert sorted(os.listdir(tmp_path / 'out')) == ['phema-0000004-0.070.safetensors', 'phema-0000004-0.120.safetensors']
    extra = checkpoint.read_snapshot_extra(tmp_path / 'out' / 'phema-0000004-0.070.safetensors')
    assert extra['cur_nimg'] == 4096 and extra['ema_std'] == 0.07
    assert max(i['nimg'] for i in extra['phema_inputs']) == 4096 and len(extra['phema_inputs']) == 8

    for args, flag, message in [
        (('--indir', str(tmp_path / 'nope')), '--indir', 'does not exist'),
        (('--indir', str(tmp_path / 'out'), '--inprefix', 'network-snapshot'), '--indir', 'no input snapshots'),
        (('--indir', run['run_dir'], '--outstd', '0.3'), '--outstd', 'not a valid EMA length'),
        (('--indir', run['run_dir'], '--outstd', 'abc'), '--outstd', 'comma-separated list'),
        (('--indir', run['run_dir'], '--outkimg', '9'), '--outkimg', 'cannot reconstruct at 9 kimg'),
        (('--indir', run['run_dir'], '--batch', '0'), '--batch', ''),
    ]:
        argv = ['--outdir', str(tmp_path / 'err')] + list(args)
        if '--outstd' not in args:
            argv += ['--outstd', '0.1']
        res = cli(*argv)
        assert res.exit_code == 2, (args, res.output)
        assert flag in res.output and message in res.output, res.output
    missing = cli('--indir', run['run_dir'], '--outdir', str(tmp_path / 'err'))
    assert missing.exit_code == 2 and '--outstd' in missing.output


def test_parse_std_list_ranges_and_bound():
    """NVlabs list syntax: 'a,b,...,c' continues b + (b - a) * k up to c (the README's 0.010,0.015,...,0.250 gives
    49 values); values are sorted and deduplicated, and each must lie in (0, 0.289), NVlabs' bound."""
    got = phema.parse_std_list('0.010,0.015,...,0.250')
    assert len(got) == 49 and got[:2] == [0.010, 0.015] and got[-1] == 0.250
    assert got[2:-1] == [0.015 + (0.015 - 0.010) * k for k in range(1, 47)]  # not rounded, as NVlabs
    assert [f'{v:.3f}' for v in got] == [f'{v / 1000:.3f}' for v in range(10, 251, 5)]
    assert phema.parse_std_list('0.05,0.04,...,0.01') == [0.01] + [0.04 + (0.04 - 0.05) * k for k in (2, 1)] + \
        [0.04, 0.05]
    assert phema.parse_std_list('0.1, 0.02,0.05,0.1,') == [0.02, 0.05, 0.1]
    assert phema.parse_std_list('0.01,0.02,...,0.04,0.1,0.15,...,0.25') == \
        [0.01, 0.02, 0.02 + 0.01, 0.02 + 0.01 * 2, 0.1, 0.15, 0.15 + (0.15 - 0.1), 0.25]
    assert phema.parse_std_list('0.2888') == [0.2888]  # above sqrt(1/12) = 0.28868 but below 0.289
    assert phema.parse_std_list([0.1, 0.05]) == [0.05, 0.1]
    for bad, message in [
        ('0.01,...,0.05', 'must come after two numbers'),
        ('...,0.01,0.02', 'must come after two numbers'),
        ('0.01,0.02,...,0.05,...,0.09', 'must come after two numbers'),
        ('0.01,0.02,...', 'must be followed by a number'),
        ('0.01,0.02,...,...,0.05', 'must be followed by a number'),
        ('0.02,0.02,...,0.05', 'are equal'),
        ('0.01,0.02,...,0.03', 'inserts no value'),
        ('0.03,0.02,...,0.05', 'inserts no value'),
        ('0.01,0.02,...,0.035', 'whole steps'),
        ('0.289', 'not a valid EMA length'),
        ('0.1,0.2,...,0.4', 'not a valid EMA length'),
        ('0', 'not a valid EMA length'),
        ('abc', 'comma-separated list'),
        ('', 'at least one number'),
    ]:
        with pytest.raises(ValueError, match=message):
            phema.parse_std_list(bad)
    # The same bound everywhere: the checks of the tracker and of reconstruct_phema.
    assert phema.check_std(0.2888) == 0.2888
    with pytest.raises(ValueError, match=r'\(0, 0.289\)'):
        phema.check_std(0.289)
    assert np.isfinite(phema.solve_posthoc_coefficients([1024, 2048], [0.05, 0.1], 2048, [0.2888])).all()


def test_reconstruct_cli_range_skip_and_bound(run, tmp_path, monkeypatch):
    """The EDM2 README's reconstruct_phema.py commands: '...' ranges, --skip, stds up to 0.289."""
    cli = lambda *args, **kw: CliRunner().invoke(reconstruct_phema.main, list(args), **kw)  # noqa: E731
    out = tmp_path / 'out'
    names = lambda stds: [f'phema-0000004-{s}.safetensors' for s in stds]  # noqa: E731
    r = cli(f'--indir={run["run_dir"]}', f'--outdir={out}', '--outstd=0.060,0.080,...,0.120', '--outkimg=4',
            '--instd=0.020,0.030,...,0.100')
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(out)) == names(['0.060', '0.080', '0.100', '0.120'])
    assert 0.03 + (0.03 - 0.02) * 2 != 0.05  # the range's 0.050 matches the snapshots' 0.050 to 3 decimals
    assert len(checkpoint.read_snapshot_extra(out / names(['0.060'])[0])['phema_inputs']) == 8
    assert checkpoint.read_snapshot_extra(out / names(['0.100'])[0])['ema_std'] == 0.08 + 0.02

    # --skip: existing outputs are left alone (a marker survives), missing ones are written.
    marker = out / names(['0.080'])[0]
    marker.write_bytes(b'kept')
    (out / names(['0.120'])[0]).unlink()
    r = cli(f'--indir={run["run_dir"]}', f'--outdir={out}', '--outstd=0.060,0.080,...,0.120', '--outkimg=4', '--skip')
    assert r.exit_code == 0, r.output
    assert marker.read_bytes() == b'kept' and 'Skipping' in r.output
    assert sorted(os.listdir(out)) == names(['0.060', '0.080', '0.100', '0.120'])
    # Everything exists: no input is read at all.
    monkeypatch.setattr(checkpoint, 'load_snapshot', lambda path: pytest.fail(f'read {path}'))
    r = cli(f'--indir={run["run_dir"]}', f'--outdir={out}', '--outstd=0.060,0.080,...,0.120', '--outkimg=4', '--skip')
    assert r.exit_code == 0 and 'Nothing to reconstruct' in r.output, r.output
    monkeypatch.undo()
    # Without --skip the file is rewritten.
    r = cli(f'--indir={run["run_dir"]}', f'--outdir={out}', '--outstd=0.080', '--outkimg=4')
    assert r.exit_code == 0 and marker.read_bytes()[:8] != b'kept', r.output

    # Above sqrt(1/12) but below 0.289 works (a slightly negative exponent); 0.289 is refused, naming the flag.
    r = cli(f'--indir={run["run_dir"]}', f'--outdir={out}', '--outstd=0.2888', '--outkimg=4')
    assert r.exit_code == 0, r.output
    assert os.path.exists(out / names(['0.289'])[0])
    for flag in ('--outstd', '--instd'):
        args = {'--outstd': '0.1', '--instd': None, flag: '0.289'}
        r = cli(f'--indir={run["run_dir"]}', f'--outdir={out}', *[f'{k}={v}' for k, v in args.items() if v])
        assert r.exit_code == 2 and flag in r.output and '(0, 0.289)' in r.output, r.output
    r = cli(f'--indir={run["run_dir"]}', f'--outdir={out}', '--outstd=0.01,0.02,...,0.045')
    assert r.exit_code == 2 and '--outstd' in r.output and 'whole steps' in r.output, r.output
    r = cli(f'--indir={run["run_dir"]}', f'--outdir={out}', '--outstd=0.1', env={'WORLD_SIZE': '2'})
    assert r.exit_code == 1 and 'not torchrun' in r.output


def test_reconstruct_one_file_per_name_and_unnamable_kimg(run, tmp_path):
    # 0.02 and 0.01 + 0.01 * 1 (a '...' value) would write the same file: it is written once.
    out = phema.reconstruct_phema(run['run_dir'], [0.02, 0.020000000000000004, 0.05], out_dir=str(tmp_path),
                                  verbose=False)
    assert [os.path.basename(o['path']) for o in out] == ['phema-0000008-0.020.safetensors',
                                                          'phema-0000008-0.050.safetensors']
    assert phema.reconstruct_phema(run['run_dir'], '0.020,0.050', out_dir=str(tmp_path), skip_existing=True,
                                   verbose=False) == []
    # kimg 42 names no image count that is a multiple of 1024 (41984 -> 41, 43008 -> 43).
    with pytest.raises(phema.PhemaError, match='no multiple of 1024 images falls in 42 kimg'):
        phema.reconstruct_phema(run['run_dir'], 0.05, out_kimg=42, out_dir=str(tmp_path), verbose=False)
