"""train.py (EDM and EDM2): user mistakes end in a one-line error naming the fix, found before anything is written
(a dry run finds them too, except the image-size scan); EDM2 option parity with NVlabs train_edm2.py; the run-dir id.

Most cases run train.py's click command in this process (no interpreter start per case); one runs under torchrun.
"""

import io
import json
import os
import pickle
import re
import subprocess
import sys
import time
import traceback

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

from test_training import ENV, REPO, make_dataset, torchrun, train_args

sys.path.insert(0, REPO)
import train as train_cli  # noqa: E402  (the script; its command is edm_fast.train_cli.main)

from edm_fast import dataset_tool, presets, training_loop, training_loop_edm2, training_state  # noqa: E402


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp('data'))


@pytest.fixture(scope='module')
def mixed(tmp_path_factory):
    """A folder of PNGs whose last image (in sorted order) is 16x16 while the others are 8x8."""
    folder = tmp_path_factory.mktemp('mixed')
    for i in range(4):
        PIL.Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(folder / f'a{i}.png')
    PIL.Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(folder / 'b.png')
    return str(folder)


@pytest.fixture(scope='module')
def unlabelled(tmp_path_factory):
    root = tmp_path_factory.mktemp('plain')
    (root / 'src').mkdir()
    for i in range(4):
        PIL.Image.fromarray(np.full((8, 8, 3), i * 40, np.uint8)).save(root / 'src' / f'{i}.png')
    dataset_tool.convert_dataset(str(root / 'src'), str(root / 'plain.zip'), progress=False)
    return str(root / 'plain.zip')


def invoke(*args):
    return CliRunner().invoke(train_cli.main, [str(a) for a in args])


def explain(result):
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        return ''.join(traceback.format_exception(*result.exc_info))[-3000:]
    return result.output[-3000:]


def assert_clean_error(result, *words):
    """Exit status 1 through click, one 'Error:' line holding every word, no traceback."""
    assert isinstance(result.exception, SystemExit) and result.exit_code == 1, explain(result)
    errors = [line for line in result.stderr.splitlines() if line.startswith('Error: ')]
    assert len(errors) == 1 and all(w in errors[0] for w in words), result.stderr[-3000:]
    assert 'Traceback' not in result.output


def edm_net_kwargs(cbase=16):
    """network_kwargs as train.py builds them for train_args(...) with this --cbase."""
    kw = presets.network_kwargs('ddpmpp', 'edm', cbase=cbase, cres=[1, 1], dropout=0.13, augment=0.12, fp16=False)
    kw['class_name'] = 'edm_fast.networks.' + kw['class_name']
    return kw


def tiny_edm_net(cbase=16):
    torch.manual_seed(0)
    return training_loop.construct(edm_net_kwargs(cbase), img_resolution=8, img_channels=3, label_dim=4)

# ----------------------------------------------------------------------------------------------------
# EDM.


class _Evil:
    """Unpickling runs os.system: a loader that executes pickled code creates the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))


def _nvlabs_state(folder, cbase=16, snapshot=True):
    """An NVlabs training-state-000000.pt (and its network-snapshot-000000.pkl unless snapshot=False)."""
    from nvlabs_pickle_writer import write_network_pickle, write_training_state
    folder.mkdir(exist_ok=True)
    net = tiny_edm_net(cbase)
    write_training_state(str(folder / 'training-state-000000.pt'), net, torch.optim.Adam(net.parameters()))
    if snapshot:
        write_network_pickle(str(folder / 'network-snapshot-000000.pkl'), ema=net)
    return str(folder / 'training-state-000000.pt')


def _edm_fast_run(folder, cur_nimg=16):
    """A run directory holding an edm_fast training state of train_args(batch=16, --cbase=16)."""
    folder.mkdir(exist_ok=True)
    net = tiny_edm_net()
    training_state.save(str(folder), rank=0, device='cpu', net=net, ema=net,
                        optimizer=torch.optim.Adam(net.parameters()), cur_nimg=cur_nimg, cur_tick=1, tick_start_nimg=cur_nimg,
                        elapsed_s=1.0, batch_size=16, world=1, seed=7, network_kwargs=edm_net_kwargs())
    return str(folder)


@pytest.mark.parametrize('dry_run', [False, True], ids=['run', 'dry-run'])
@pytest.mark.parametrize('case', ['batch', 'transfer-missing', 'transfer-foreign', 'transfer-shape', 'resume-no-pkl',
                                  'resume-nvlabs-shape', 'resume-batch', 'resume-cbase', 'resume-done', 'outdir-file'])
def test_edm_mistakes_end_cleanly_before_writing(data, tmp_path, case, dry_run):
    from nvlabs_pickle_writer import write_network_pickle
    out = tmp_path / 'runs'
    extra, words = [], []
    if case == 'batch':
        extra, words = ['--batch-gpu=2'], ['--batch=7', '--batch-gpu=2', 'multiple of 2']
    elif case == 'transfer-missing':
        extra, words = ['--transfer', tmp_path / 'nonexistent.pkl'], ['--transfer', 'no such file']
    elif case == 'transfer-foreign':
        marker = tmp_path / 'code-ran'
        with open(tmp_path / 'evil.pkl', 'wb') as f:
            pickle.dump(_Evil(marker), f, protocol=2)
        extra, words = ['--transfer', tmp_path / 'evil.pkl'], ['--transfer', 'refusing to load', 'posix.system']
    elif case == 'transfer-shape':
        write_network_pickle(str(tmp_path / 'wide.pkl'), ema=tiny_edm_net(cbase=32))
        extra, words = ['--transfer', tmp_path / 'wide.pkl'], ['--transfer', 'does not fit', '--cbase']
    elif case == 'resume-no-pkl':
        state = _nvlabs_state(tmp_path / 'nv', snapshot=False)
        extra, words = ['--resume', state], ['--resume', 'network-snapshot-000000.pkl does not exist']
    elif case == 'resume-nvlabs-shape':
        state = _nvlabs_state(tmp_path / 'nv', cbase=32)
        extra, words = ['--resume', state], ['does not fit', 'training_options.json']
    elif case == 'resume-batch':
        extra, words = ['--resume', _edm_fast_run(tmp_path / 'prev'), '--batch=32'], ['--batch=16', '--batch=32']
    elif case == 'resume-cbase':
        extra = ['--resume', _edm_fast_run(tmp_path / 'prev'), '--cbase=32']
        words = ['model_channels: 16 in the state, 32 now']
    elif case == 'resume-done':  # training on would overwrite the finished run's files
        extra = ['--resume', _edm_fast_run(tmp_path / 'prev', cur_nimg=2000), '--duration=0.001']
        words = ['at 2.000 kimg', 'past --duration=0.001 Mimg (1 kimg)', 'raise --duration']
    elif case == 'outdir-file':
        out.write_text('not a directory')
        words = ['--outdir', 'is a file']
    batch = 7 if case == 'batch' else 16
    before = sorted(os.listdir(tmp_path))
    result = invoke(*train_args(data, out, batch=batch, extra=[*extra, *(['-n'] if dry_run else [])]))
    assert_clean_error(result, *words)
    assert sorted(os.listdir(tmp_path)) == before  # nothing written: no run directory, log.txt or options
    if case == 'transfer-foreign':
        assert not marker.exists()
    if case in ('resume-batch', 'resume-cbase', 'resume-done'):
        assert sorted(os.listdir(tmp_path / 'prev')) == [f'training-state-00000{2 if case == "resume-done" else 0}.pt']


def test_edm_resume_from_the_wrong_kind_of_file_says_what_it_is(data, tmp_path):
    """A network where a state belongs (torch.load used to say: install safetensors), an EDM2 run's state."""
    from nvlabs_pickle_writer import write_network_pickle
    from edm_fast import checkpoint
    write_network_pickle(str(tmp_path / 'net.pkl'), ema=tiny_edm_net())
    checkpoint.save_snapshot(tmp_path / 'net.safetensors', tiny_edm_net())
    torch.save(dict(format='edm_fast.training_state_edm2', version=1), tmp_path / 'training-state-0000001.pt')
    PIL.Image.new('RGB', (8, 8)).save(tmp_path / 'img.png')
    for path, words in [(tmp_path / 'net.pkl', 'is a network snapshot, not a training state'),
                        (tmp_path / 'net.safetensors', 'is a network snapshot, not a training state'),
                        (tmp_path / 'training-state-0000001.pt', 'the state of an EDM2 (--preset) run'),
                        (tmp_path / 'img.png', 'not a training state (not a torch.save file)')]:
        result = invoke(*train_args(data, tmp_path / 'runs', extra=['--resume', path, '-n']))
        assert result.exit_code == 2 and words in result.output and 'Traceback' not in result.output, explain(result)


def test_nosubdir_does_not_overwrite_a_run(data, tmp_path):
    prev = _edm_fast_run(tmp_path / 'prev')
    result = invoke(*train_args(data, prev, extra=['--nosubdir']))
    assert_clean_error(result, 'already holds a run (training-state-000000.pt)', f'--resume={prev}')
    assert sorted(os.listdir(prev)) == ['training-state-000000.pt']


def test_edm_resume_and_transfer_that_fit_pass_the_checks(data, tmp_path):
    from nvlabs_pickle_writer import write_network_pickle
    write_network_pickle(str(tmp_path / 'same.pkl'), ema=tiny_edm_net())
    for extra in (['--resume', _edm_fast_run(tmp_path / 'prev')], ['--resume', _nvlabs_state(tmp_path / 'nv')],
                  ['--transfer', tmp_path / 'same.pkl']):
        result = invoke(*train_args(data, tmp_path / 'runs', extra=[*extra, '-n']))
        assert result.exit_code == 0, explain(result)


def test_edm_mixed_image_sizes_end_cleanly_before_writing(mixed, tmp_path):
    out = tmp_path / 'runs'
    result = invoke('--outdir', out, '--data', mixed, '--batch=4', '--duration=0.001', '--cbase=16', '--cres=1,1',
                    '--workers=0', '--seed=7', '--device=cpu')
    assert_clean_error(result, '--data', 'b.png', '16x16', 'a0.png is 8x8', 'dataset_tool.py')
    assert not out.exists()


def test_edm_error_during_training_is_one_line_and_logged(tmp_path):
    """The safety net: a user error raised inside the loop (a corrupt image read by a DataLoader worker, whose
    header passes the scan) ends in one line, also written to log.txt."""
    folder = tmp_path / 'data'
    folder.mkdir()
    rng = np.random.RandomState(0)
    for i in range(5):
        buf = io.BytesIO()
        PIL.Image.fromarray(rng.randint(0, 255, (8, 8, 3)).astype(np.uint8)).save(buf, format='PNG')
        # The first image is whole (it sets the dataset's shape); the others keep their header but lose their pixels,
        # so the first batch already fails to decode.
        (folder / f'{"a" if i == 0 else "b"}{i}.png').write_bytes(buf.getvalue()[:None if i == 0 else 60])
    out = tmp_path / 'runs'
    result = invoke('--outdir', out, '--data', folder, '--batch=4', '--duration=0.001', '--cbase=16', '--cres=1,1',
                    '--workers=1', '--seed=7', '--device=cpu', '--augment=0')
    assert_clean_error(result, '.png', 'truncated', 'dataset_tool.py')
    log = open(glob_one(out, '*/log.txt')).read()
    assert re.search(r'^Error: .*/b\d\.png: cannot decode image', log, re.M), log[-2000:]


def glob_one(root, pattern):
    import glob
    found = glob.glob(os.path.join(str(root), pattern))
    assert len(found) == 1, found
    return found[0]


def test_edm_run_id_counts_directories_only(data, tmp_path):
    out = tmp_path / 'runs'
    (out / '00002-earlier-run').mkdir(parents=True)
    (out / '00007-notes.txt').write_text('a file, not a run')
    result = invoke(*train_args(data, out, extra=['-n']))
    assert result.exit_code == 0, explain(result)
    assert '00003-data-cond-ddpmpp-edm-gpus1-batch16-fp32' in result.stdout


def test_batch_sizes_accept_suffixes(data, tmp_path):
    result = invoke(*train_args(data, tmp_path / 'runs', extra=['--batch=1Ki', '--batch-gpu=256', '-n']))
    assert result.exit_code == 0, explain(result)
    assert '"batch_size": 1024' in result.stdout and '"batch_gpu": 256' in result.stdout


def test_torchrun_ranks_fail_alike_without_hanging(mixed, tmp_path):
    """2 gloo processes: only rank 0 scans the images, yet both ranks end with the same one-line error, quickly."""
    out = tmp_path / 'runs'
    args = ['--outdir', str(out), '--data', mixed, '--batch=4', '--duration=0.001', '--cbase=16', '--cres=1,1',
            '--workers=0', '--seed=7', '--device=cpu']
    start = time.time()
    proc = subprocess.run(torchrun(args), env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and time.time() - start < 60
    errors = [line for line in proc.stderr.splitlines() if line.startswith('Error: ')]
    assert len(errors) == 2 and all('16x16' in e and 'dataset_tool.py' in e for e in errors), proc.stderr[-3000:]
    assert any(e.endswith('(reported by rank 0)') for e in errors)
    assert 'train.py", line' not in proc.stderr and 'edm_fast' not in proc.stderr  # torchrun's own traceback only
    assert not out.exists()

# ----------------------------------------------------------------------------------------------------
# EDM2.


def edm2_args(data, out, *extra):
    return ['--preset=edm2-img32-xs', f'--outdir={out}', f'--data={data}', '--channels=64', '--batch=32',
            '--duration=2Ki', '--fp16=0', '--workers=0', '--device=cpu', *extra]


def dry_config(result):
    """The training options a dry run printed, as a dict."""
    assert result.exit_code == 0, explain(result)
    text = result.stdout.split('Training options (EDM2):\n', 1)[1]
    return json.loads(text[:text.index('\nOutput directory:')])


@pytest.mark.parametrize('case', ['data-missing', 'cond-unlabelled', 'snapshot', 'batch', 'outdir-file',
                                  'resume-batch', 'mixed'])
def test_edm2_mistakes_end_cleanly_before_writing(data, unlabelled, mixed, tmp_path, case):
    out = tmp_path / 'run'
    args, words, dry = edm2_args(data, out), [], True
    if case == 'data-missing':
        args, words = edm2_args(tmp_path / 'missing.zip', out), ['--data', 'no such file']
    elif case == 'cond-unlabelled':
        args, words = edm2_args(unlabelled, out), ['--data', '--cond=False']
    elif case == 'snapshot':
        args, words = edm2_args(data, out, '--snapshot=32'), ['--snapshot', '1024', 'or 0 to disable']
    elif case == 'batch':
        args, words = edm2_args(data, out, '--batch=7', '--batch-gpu=2'), ['--batch', '--batch-gpu', 'multiple of 2']
    elif case == 'outdir-file':
        out.write_text('not a directory')
        words = ['--outdir', 'is a file']
    elif case == 'resume-batch':  # the newest state in the run directory was written with another batch size
        out.mkdir()
        training_loop_edm2.save_state(str(out), rank=0, net=torch.nn.Linear(2, 2), optimizer=torch.optim.Adam(
            torch.nn.Linear(2, 2).parameters()), ema=None, cur_nimg=2048, total_elapsed_time=1.0, batch_size=64,
            world=1, seed=0, network_kwargs={})
        words = ['batch_size (--batch) = 64', '--batch=64']
    elif case == 'mixed':
        args, words, dry = edm2_args(mixed, out, '--cond=0'), ['--data', '16x16', 'dataset_tool.py'], False
    before = sorted(os.listdir(tmp_path))
    state_files = sorted(os.listdir(out)) if out.is_dir() else None
    assert_clean_error(invoke(*args, *(['-n'] if dry else [])), *words)
    assert sorted(os.listdir(tmp_path)) == before
    if state_files is not None:
        assert sorted(os.listdir(out)) == state_files  # no log.txt or training_options.json added


def test_edm2_option_parity_with_nvlabs(data, tmp_path):
    out = tmp_path / 'run'
    # 0 disables status prints, snapshots and checkpoints; sizes accept Ki/Mi/Gi suffixes.
    c = dry_config(invoke(*edm2_args(data, out, '--status=0', '--snapshot=0', '--checkpoint=0', '--batch=1Ki',
                                     '--batch-gpu=256', '-n')))
    assert c['status_nimg'] is None and c['snapshot_nimg'] is None and c['checkpoint_nimg'] is None
    assert c['batch_size'] == 1024 and c['batch_gpu'] == 256
    # The dataset is opened at setup: the encoder follows its channel count.
    assert c['encoder_kwargs'] == dict(class_name='StandardRGBEncoder')
    # --cache keeps decoded images in memory; off by default for EDM2 (NVlabs never caches there).
    assert c['dataset_kwargs']['cache'] is False and c['data_loader_kwargs']['num_workers'] == 0
    c = dry_config(invoke(*edm2_args(data, out, '--cache=1', '-n')))
    assert c['dataset_kwargs']['cache'] is True
    # --channels is at least 64, as in NVlabs.
    result = invoke(*edm2_args(data, out, '--channels=32', '-n'))
    assert result.exit_code == 2 and '--channels' in result.stderr and 'x>=64' in result.stderr
    assert not out.exists()
