"""Training: the loop's closed forms, train.py end to end under torchrun (gloo), kill + exact resume, SIGTERM."""

import collections
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import pytest
import torch

from edm_fast import checkpoint, dataset_tool, loss, networks, training_loop, training_state
from edm_fast.training_stats import Collector

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONPATH=REPO, PYTHONUNBUFFERED='1')


def make_dataset(root, n_per_class=8, res=8, classes=4):
    """A small labelled dataset: class k is a colour/shape pattern plus noise, converted with dataset_tool."""
    rng = np.random.RandomState(0)
    src = root / 'src'
    for c in range(classes):
        (src / f'class{c}').mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            img = np.full((res, res, 3), 30, np.int64)
            img[..., c % 3] = 220
            if c >= 3:
                img[res // 4:3 * res // 4, res // 4:3 * res // 4] = 255
            img = np.clip(img + rng.randint(-25, 25, img.shape), 0, 255).astype(np.uint8)
            PIL.Image.fromarray(img).save(src / f'class{c}' / f'{i}.png')
    dest = root / 'data.zip'
    dataset_tool.convert_dataset(str(src), str(dest), progress=False)
    return str(dest)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp('data'))


def train_args(data, outdir, batch=16, extra=()):
    # The EDM README's CIFAR-10 command (--cond=1 --arch=ddpmpp), scaled down with --batch/--duration/--cbase/--cres.
    return ['--outdir', str(outdir), '--data', data, '--cond=1', '--arch=ddpmpp', f'--batch={batch}', '--duration=0.001',
            '--cbase=16', '--cres=1,1', f'--tick={batch / 1000}', '--snap=8', '--dump=8', '--lr=2e-3',
            '--lr-rampup=0', '--workers=0', '--seed=7', '--device=cpu', *extra]


def kill_tree(pid):
    """SIGKILL a process and every descendant. torchrun starts each worker in a session of its own, so killing
    torchrun's process group leaves the workers running (they went on training into the run directory beside
    the resumed run, and slowed every later test)."""
    children = collections.defaultdict(list)
    for stat in glob.glob('/proc/[0-9]*/stat'):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(')', 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        children[int(fields[1])].append(int(stat.split('/')[2]))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    for victim in reversed(tree):  # workers first, so none outlives its parent's death unseen
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return tree


def torchrun(args, nproc=2, **kw):
    return [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
            os.path.join(REPO, 'train.py')] + args


def read_stats(run_dir):
    """kimg -> Loss/loss mean, the last line for each kimg winning (a resumed run appends after a kill)."""
    out = {}
    with open(os.path.join(run_dir, 'stats.jsonl')) as f:
        for line in f:
            d = json.loads(line)
            out[round(d['Progress/kimg']['mean'], 6)] = d['Loss/loss']['mean']
    return out


def only_run_dir(outdir):
    dirs = [d for d in glob.glob(os.path.join(outdir, '*')) if os.path.isdir(d)]
    assert len(dirs) == 1, dirs
    return dirs[0]

# ----------------------------------------------------------------------------------------------------
# Closed forms.


def test_learning_rate_and_ema_schedules():
    assert training_loop.learning_rate(0, 1e-3, 10000) == 0  # the very first step has lr = 0
    assert training_loop.learning_rate(5_000_000, 1e-3, 10000) == pytest.approx(5e-4)
    assert training_loop.learning_rate(20_000_000, 1e-3, 10000) == 1e-3
    assert training_loop.ema_beta(0, 512, 500, 0.05) == 0  # first step: ema := net
    assert training_loop.ema_beta(100_000_000, 512, 500, 0.05) == pytest.approx(0.999290, abs=1e-6)
    assert training_loop.ema_beta(1_000_000, 512, 500, 0.05) == pytest.approx(0.99293, abs=1e-5)
    assert training_loop.ema_beta(0, 512, 500, None) == pytest.approx(0.5 ** (512 / 500_000))


def test_ema_update_closed_form():
    """After k updates with a constant beta, ema = beta^k e0 + (1 - beta) sum beta^(k-1-i) p_i; buffers untouched."""
    net, ema = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    e0 = torch.randn(3)
    ema.weight.data.copy_(e0)
    ema.running_mean.fill_(7)
    beta, ps = 0.9, [torch.randn(3) for _ in range(5)]
    for p in ps:
        net.weight.data.copy_(p)
        training_loop.update_ema(ema, net, beta)
    expected = beta ** 5 * e0.double() + sum((1 - beta) * beta ** (4 - i) * p.double() for i, p in enumerate(ps))
    assert torch.allclose(ema.weight.double(), expected, atol=1e-6)
    assert torch.all(ema.running_mean == 7)


def test_sanitize_gradients():
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([float('nan'), float('inf'), -float('inf'), 2.0])
    training_loop.sanitize_gradients(torch.nn.ParameterList([p]))
    assert p.grad.tolist() == [0.0, 1e5, -1e5, 2.0]


class _FixedLoss:
    """EDMLoss with the randomness taken from fixed per-image tables, so any batch split sees the same draws."""

    def __init__(self, rnd, noise):
        self.inner, self.rnd, self.noise, self.pos = loss.EDMLoss(), rnd, noise, 0

    def __call__(self, net, images, labels, augment_pipe=None):
        n = images.shape[0]
        out = self.inner(net, images, labels, rnd=self.rnd[self.pos:self.pos + n], noise=self.noise[self.pos:self.pos + n])
        self.pos += n
        return out


def _grads(net, batches, loss_scaling, total, rnd, noise):
    net.zero_grad(set_to_none=True)
    training_loop.accumulate_gradients(net, _FixedLoss(rnd, noise), batches, loss_scaling, total)
    return [p.grad.clone() for p in net.parameters()]


def test_gradient_accumulation_equals_full_batch_and_loss_scaling_is_kept():
    torch.manual_seed(0)
    net = networks.EDMPrecond(8, 3, label_dim=2, model_type='SongUNet', model_channels=8, channel_mult=[1],
                              num_blocks=1, attn_resolutions=[], dropout=0).train()
    images, labels = torch.randn(8, 3, 8, 8), torch.eye(2)[torch.randint(2, [8])]
    rnd, noise = torch.randn(8, 1, 1, 1), torch.randn(8, 3, 8, 8)
    full = _grads(net, [(images, labels)], 1, 8, rnd, noise)
    split = _grads(net, [(images[:4], labels[:4]), (images[4:], labels[4:])], 1, 8, rnd, noise)
    scaled = _grads(net, [(images, labels)], 100, 8, rnd, noise)
    for f, s, c in zip(full, split, scaled):
        assert torch.allclose(f, s, rtol=1e-4, atol=1e-6)
        assert torch.allclose(c, 100 * f, rtol=1e-4, atol=1e-5)  # loss scaling is never divided back out
    assert any(f.abs().max() > 0 for f in full)


def test_module_summary_rows_as_nvlabs(capsys):
    """A module with no parameters or buffers keeps its row when its output is a new tensor (DDPM++'s map_noise, as
    in NVlabs' log.txt); one that returns a tensor already listed (an identity) is left out."""
    from edm_fast import util
    net = networks.SongUNet(img_resolution=8, in_channels=3, out_channels=3, model_channels=16, channel_mult=[1],
                            num_blocks=1, attn_resolutions=[])
    util.print_module_summary(net, [torch.zeros(2, 3, 8, 8), torch.ones(2), None], max_nesting=2)
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert names[0] == 'SongUNet' and 'map_noise' in names and 'map_layer0' in names
    assert '<top-level>' not in names  # SongUNet returns the last aux_conv output itself: nothing new, as in NVlabs
    seq = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Identity())
    util.print_module_summary(seq, [torch.zeros(4, 2)])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines if line.strip()] == ['Sequential', '---', '0', '---', 'Total']
    assert lines[-2].split() == ['Total', '9', '0', '-', '-']


def test_stats_collector_moments():
    c = Collector()
    c.report('a', torch.tensor([1.0, 2.0, 3.0]))
    c.report('a', torch.tensor([5.0]))
    c.report0('b', 4.0, rank=1)
    c.report0('c', 2.0, rank=0)
    out = c.collect()
    assert out['a']['num'] == 4 and out['a']['mean'] == pytest.approx(2.75)
    assert out['a']['std'] == pytest.approx(np.std([1, 2, 3, 5]))
    assert 'b' not in out and out['c']['mean'] == 2.0
    assert c.collect()['a']['mean'] == pytest.approx(2.75)  # no new data keeps the previous value


def test_stats_collector_keeps_tensor_moments_on_their_device():
    """Reporting a tensor queues its moments on the tensor's device (a meta tensor stands in for a GPU one here:
    any read of its values would raise), so a report per round never makes the host wait for the GPU."""
    c = Collector()
    c.report('loss', torch.empty(8, device='meta'))
    c.report('loss', torch.empty(8, device='meta'))
    assert c._moments['loss'].device.type == 'meta'


def test_stop_vote_lands_one_step_later_on_every_rank(tmp_path):
    """One gloo rank in-process: a request voted after step k is answered after step k + 1."""
    store = torch.distributed.FileStore(str(tmp_path / 'store'), 1)
    torch.distributed.init_process_group('gloo', store=store, rank=0, world_size=1)
    try:
        vote = training_loop.StopVote(torch.device('cpu'))
        assert [vote.poll(r) for r in (False, False, True, False, False)] == [False, False, False, True, False]
    finally:
        torch.distributed.destroy_process_group()
    assert training_loop.StopVote(torch.device('cpu')).poll(True) is True  # one process: no vote, no delay

# ----------------------------------------------------------------------------------------------------
# train.py end to end.


def test_dry_run_writes_nothing(data, tmp_path):
    out = tmp_path / 'runs'
    proc = subprocess.run([sys.executable, os.path.join(REPO, 'train.py'), *train_args(data, out), '--dry-run'],
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert '"network_kwargs"' in proc.stdout and 'Dry run' in proc.stdout
    assert '00000-data-cond-ddpmpp-edm-gpus1-batch16-fp32' in proc.stdout
    assert not out.exists()


@pytest.mark.parametrize('extra, flag, words', [
    (['--resume', 'nowhere/training-state-000000.pt'], '--resume', 'does not exist'),
    (['--transfer', 'a.pkl', '--resume', 'b.pt'], '--transfer', 'cannot be specified'),
    (['--bf16=1', '--fp16=1'], '--fp16', 'mutually exclusive'),
])
def test_option_errors(data, tmp_path, extra, flag, words):
    proc = subprocess.run([sys.executable, os.path.join(REPO, 'train.py'), *train_args(data, tmp_path), *extra],
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and flag in proc.stderr and words in proc.stderr, proc.stderr[-2000:]


def test_unlabelled_data_refuses_cond(tmp_path):
    folder = tmp_path / 'plain'
    folder.mkdir()
    for i in range(4):
        PIL.Image.fromarray(np.full((8, 8, 3), i * 40, np.uint8)).save(folder / f'{i}.png')
    dest = tmp_path / 'plain.zip'
    dataset_tool.convert_dataset(str(folder), str(dest), progress=False)
    proc = subprocess.run([sys.executable, os.path.join(REPO, 'train.py'), *train_args(str(dest), tmp_path / 'o')],
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and ('--cond' in proc.stderr or '--data' in proc.stderr) and 'label' in proc.stderr


def test_torchrun_two_processes_kill_and_exact_resume(data, tmp_path):
    """2 gloo processes: the loss falls, files are well-formed; a SIGKILLed run resumed with --resume continues
    with bit-identical per-step losses; its snapshot samples through sample.py."""
    # Uninterrupted reference run.
    ref_out = tmp_path / 'ref'
    proc = subprocess.run(torchrun(train_args(data, ref_out)), env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref_dir = only_run_dir(ref_out)
    assert os.path.basename(ref_dir) == '00000-data-cond-ddpmpp-edm-gpus2-batch16-fp32'
    ref = read_stats(ref_dir)
    losses = [ref[k] for k in sorted(ref)]
    assert len(losses) == 63 and all(np.isfinite(losses))  # ceil(1000 / 16) steps, one tick each
    assert np.mean(losses[-20:]) < 0.8 * np.mean(losses[:20])
    files = sorted(os.listdir(ref_dir))
    assert 'training_options.json' in files and 'log.txt' in files
    assert [f for f in files if f.startswith('network-snapshot-')] == ['network-snapshot-000000.safetensors',
                                                                      'network-snapshot-000001.safetensors']
    assert [f for f in files if f.startswith('training-state-')] == ['training-state-000000.pt', 'training-state-000001.pt']
    log = open(os.path.join(ref_dir, 'log.txt')).read()
    assert 'Training for 1 kimg' in log and 'tick 62' in log and 'Exiting' in log
    # The status line of spec §5.5: kimg as <9.1f, no field beyond the table's (no 'augment', although augmenting).
    status = [line for line in log.splitlines() if line.startswith('tick ')]
    assert re.fullmatch(r'tick 62    kimg 1\.0       time \S.* sec/tick [\d.]+ +sec/kimg [\d.]+ +maintenance [\d.]+ +'
                        r'cpumem [\d.]+ *', status[-1]), status[-1]
    assert not any('augment' in line for line in status)
    json.load(open(os.path.join(ref_dir, 'training_options.json')))

    # Same run, killed (SIGKILL to torchrun and its workers) once a state dump exists past tick 8.
    out = tmp_path / 'killed'
    p = subprocess.Popen(torchrun(train_args(data, out)), env=ENV, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            states = glob.glob(str(out / '*' / 'training-state-*.pt'))
            stats = glob.glob(str(out / '*' / 'stats.jsonl'))
            if states and stats and sum(1 for _ in open(stats[0])) >= 20:
                break
            assert p.poll() is None, 'training ended before it could be killed'
            time.sleep(0.05)
        killed = kill_tree(p.pid)
    finally:
        p.wait(timeout=60)
    assert len(killed) >= 3, killed  # torchrun and both workers
    time.sleep(0.5)
    assert not [pid for pid in killed if os.path.exists(f'/proc/{pid}') and
                open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()[0] != 'Z'], 'a worker survived'
    run_dir = only_run_dir(out)
    state_kimg = torch.load(training_state.latest_state(run_dir), weights_only=True)['cur_nimg'] / 1000
    assert 0 < state_kimg < 1
    assert not glob.glob(os.path.join(run_dir, '.*.tmp'))

    proc = subprocess.run(torchrun(train_args(data, out, extra=['--resume', run_dir])), env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert only_run_dir(out) == run_dir  # continued in place
    resumed = read_stats(run_dir)
    after = [k for k in sorted(ref) if k > state_kimg + 1e-9]
    assert after and all(resumed[k] == ref[k] for k in after), [(k, resumed.get(k), ref[k]) for k in after[:5]]

    # The final snapshots agree exactly, and the snapshot samples through sample.py.
    last = sorted(glob.glob(os.path.join(run_dir, 'network-snapshot-*.safetensors')))[-1]
    a = checkpoint.load_network(last)
    b = checkpoint.load_network(os.path.join(ref_dir, os.path.basename(last)))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    proc = subprocess.run([sys.executable, os.path.join(REPO, 'sample.py'), '--network', last, '--outdir',
                           str(tmp_path / 'img'), '--seeds', '0-3', '--steps', '4', '--device', 'cpu'],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(f for f in os.listdir(tmp_path / 'img') if not f.startswith('.')) == [f'{s:06d}.png' for s in range(4)]


def test_sigterm_writes_state_and_resume_continues(data, tmp_path):
    out = tmp_path / 'run'
    args = [sys.executable, os.path.join(REPO, 'train.py'), *train_args(data, out, extra=['--workers=1', '--dump=1000'])]
    p = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        stats = glob.glob(str(out / '*' / 'stats.jsonl'))
        if stats and sum(1 for _ in open(stats[0])) >= 10:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    output, _ = p.communicate(timeout=120)
    assert p.returncode == 0, output[-2000:]
    assert 'Received SIGTERM' in output and 'resume with --resume' in output
    run_dir = only_run_dir(out)
    state = torch.load(training_state.latest_state(run_dir), weights_only=True)
    stopped_kimg = state['cur_nimg'] / 1000
    assert stopped_kimg == max(read_stats(run_dir))  # the state is the last step that ran
    proc = subprocess.run(args + ['--resume', run_dir], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert max(read_stats(run_dir)) == pytest.approx(1.008)


def test_transfer_from_official_pickle(data, tmp_path):
    """--transfer copies the EMA weights of an NVlabs pickle into net and EMA by name."""
    from nvlabs_pickle_writer import write_network_pickle
    from edm_fast import presets
    kw = presets.network_kwargs('ddpmpp', cbase=16, cres=[1, 1], augment=0.12, dropout=0.13)
    kw.pop('class_name')
    torch.manual_seed(3)
    src = networks.EDMPrecond(img_resolution=8, img_channels=3, label_dim=4, **kw)
    pkl = tmp_path / 'edm-source.pkl'
    write_network_pickle(str(pkl), ema=src)
    out = tmp_path / 'run'
    extra = ['--transfer', str(pkl), '--lr=1e-12', '--ema=0', '--duration=0.001']
    proc = subprocess.run([sys.executable, os.path.join(REPO, 'train.py'), *train_args(data, out, batch=500, extra=extra),
                           '--snap=1'], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    snap = checkpoint.load_network(sorted(glob.glob(str(out / '*' / 'network-snapshot-*.safetensors')))[-1])
    for (name, a), b in zip(src.state_dict().items(), snap.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_bf16_channels_last_training_tracks_fp32(data, tmp_path):
    """--bf16 --channels-last under 2-process DDP with accumulation: per-step losses follow the fp32 reference
    run within bf16 precision (same seeds, so the same sigma/noise/augment draws)."""
    runs = {}
    for name, extra in (('fp32', []), ('bf16', ['--bf16=1', '--channels-last=1'])):
        out = tmp_path / name
        proc = subprocess.run(torchrun(train_args(data, out, extra=['--batch-gpu=4', '--duration=0.001', *extra])),
                              env=ENV, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        stats = read_stats(only_run_dir(out))
        runs[name] = np.array([stats[k] for k in sorted(stats)])
    assert len(runs['fp32']) == len(runs['bf16']) == 63
    rel = np.abs(runs['bf16'] - runs['fp32']) / runs['fp32']
    assert rel[:10].mean() < 0.02, rel[:10]
    assert 0 < rel[:10].max()  # the bf16 path really ran in lower precision
    assert np.mean(runs['bf16'][-20:]) < 0.8 * np.mean(runs['bf16'][:20])
    options = json.load(open(os.path.join(only_run_dir(tmp_path / 'bf16'), 'training_options.json')))
    assert options['edm_fast_performance'] == dict(precision='bf16', channels_last=True, compile=False, backend=None)
