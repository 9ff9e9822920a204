"""sample.py end to end (in-process through click): NVlabs file names, --subdirs, --grid, --npz, --resume, errors."""

import json
import os
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

from edm_fast import generate, networks, sample_resume
from edm_fast.checkpoint import save_snapshot
from test_generate import tiny_net

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sample  # noqa: E402


@pytest.fixture(scope='module')
def snapshots(tmp_path_factory):
    d = tmp_path_factory.mktemp('nets')
    cond, uncond = str(d / 'cond.safetensors'), str(d / 'uncond.safetensors')
    save_snapshot(cond, ema=tiny_net(label_dim=4))
    save_snapshot(uncond, ema=tiny_net(label_dim=0, seed=1))
    return cond, uncond


def invoke(*args):
    extra = ['--device', 'cpu'] + ([] if '--steps' in args else ['--steps', '3'])
    return CliRunner().invoke(sample.main, list(args) + extra, catch_exceptions=False)


def test_parse_seeds():
    assert sample.parse_seeds(None, None, '0-3,10,20-21') == [0, 1, 2, 3, 10, 20, 21]
    for bad in ('1-', '5-3', 'a', '1,,2', '-1'):
        with pytest.raises(Exception, match='expected a comma-separated list'):
            sample.parse_seeds(None, None, bad)
    assert sample.parse_seeds(None, None, '4294967295') == [2 ** 32 - 1]
    for bad, words in [('4294967296', 'above 4294967295'), ('0-99999999999', 'above 4294967295'),
                       ('0-99999999,200000000-200000001', 'at most 100,000,000')]:
        with pytest.raises(Exception, match=words):  # not a MemoryError building the list
            sample.parse_seeds(None, None, bad)


def test_pngs_grid_npz(snapshots, tmp_path):
    out = tmp_path / 'out'
    r = invoke('--network', snapshots[0], '--outdir', str(out), '--seeds', '5-9', '--batch', '2',
               '--grid', str(tmp_path / 'grid.png'), '--npz', str(tmp_path / 'all.npz'))
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(out)) == [sample_resume.SETTINGS_FILE] + [f'{s:06d}.png' for s in range(5, 10)]
    pngs = [np.asarray(PIL.Image.open(out / f'{s:06d}.png')) for s in range(5, 10)]
    assert all(p.shape == (8, 8, 3) and p.dtype == np.uint8 for p in pngs)
    data = np.load(tmp_path / 'all.npz')
    assert data['arr_0'].shape == (5, 8, 8, 3) and data['seeds'].tolist() == list(range(5, 10))
    assert all(np.array_equal(a, b) for a, b in zip(data['arr_0'], pngs))
    assert data['labels'].min() >= 0 and data['labels'].max() < 4
    grid = np.asarray(PIL.Image.open(tmp_path / 'grid.png'))
    assert grid.shape == (16, 24, 3) and np.array_equal(grid[0:8, 8:16], pngs[1]) and np.array_equal(grid[8:16, 0:8], pngs[3])
    assert 'Generated 5 images' in r.output and 'images/s' in r.output and '5 NFE per image' in r.output
    assert not [f for f in os.listdir(tmp_path) if f.endswith('.tmp')]


def test_pngs_match_generate_images(snapshots, tmp_path):
    r = invoke('--network', snapshots[0], '--outdir', str(tmp_path), '--seeds', '0-2', '--class', '1')
    assert r.exit_code == 0, r.output
    from edm_fast.checkpoint import load_network
    net = load_network(snapshots[0])
    batch = next(generate.generate_images(net, [0, 1, 2], num_steps=3, class_idx=1))
    for s, img in zip(batch.seeds, batch.images):
        assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / f'{s:06d}.png')), img.permute(1, 2, 0).numpy())


def test_subdirs_and_grayscale(tmp_path):
    torch.manual_seed(0)
    gray = networks.EDMPrecond(img_resolution=8, img_channels=1, model_type='SongUNet', model_channels=8,
                               channel_mult=[1], num_blocks=1, attn_resolutions=[])
    path = str(tmp_path / 'gray.safetensors')
    save_snapshot(path, ema=gray)
    out = tmp_path / 'out'
    r = invoke('--network', path, '--outdir', str(out), '--seeds', '998-1001', '--subdirs')
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(out)) == [sample_resume.SETTINGS_FILE, '000000', '001000']
    assert sorted(os.listdir(out / '000000')) == ['000998.png', '000999.png']
    assert PIL.Image.open(out / '001000' / '001001.png').mode == 'L'


def test_ablation_flags_select_ablation_sampler(snapshots, tmp_path):
    r = invoke('--network', snapshots[1], '--outdir', str(tmp_path), '--seeds', '0', '--solver', 'euler',
               '--disc', 'vp', '--schedule', 'vp', '--scaling', 'vp')
    assert r.exit_code == 0, r.output
    assert '3 NFE per image' in r.output  # Euler: N evaluations


@pytest.mark.parametrize('args, flag, words', [
    (['--seeds', '3-1'], '--seeds', 'a <= b'),
    (['--class', '7'], '--class', 'out of range'),
    (['--steps', '1'], '--steps', '1'),
    (['--sigma_min', '5', '--sigma_max', '1'], '--sigma_min=5', 'must be below --sigma_max=1'),
    (['--S_noise', 'nan'], '--S_noise', 'not a finite number'),
])
def test_errors_name_the_flag(snapshots, tmp_path, args, flag, words):
    r = invoke('--network', snapshots[0], '--outdir', str(tmp_path), *args)
    assert r.exit_code != 0 and flag in r.output and words in r.output, r.output
    assert not any(f.endswith('.png') for f in os.listdir(tmp_path))


def test_unconditional_net_refuses_class(snapshots, tmp_path):
    r = invoke('--network', snapshots[1], '--outdir', str(tmp_path), '--class', '0')
    assert r.exit_code != 0 and '--class' in r.output and 'unconditional' in r.output


def test_foreign_or_missing_network(tmp_path):
    bad = tmp_path / 'notes.txt'
    bad.write_text('not a network')
    for path in (str(bad), str(tmp_path / 'missing.pkl')):
        r = invoke('--network', path, '--outdir', str(tmp_path / 'o'))
        assert r.exit_code != 0 and '--network' in r.output and path in r.output, r.output
        assert len(r.output.strip().splitlines()) <= 4


def test_generate_py_is_sample_py(snapshots, tmp_path):
    """The EDM README's `python generate.py --outdir=out --seeds=0-63 --batch=64 --network=...` runs unchanged."""
    import generate
    args = ['--network', snapshots[0], '--seeds', '0-2', '--batch', '2', '--device', 'cpu', '--steps', '3']
    for cmd, out in ((generate.main, 'a'), (sample.main, 'b')):
        assert CliRunner().invoke(cmd, args + ['--outdir', str(tmp_path / out)]).exit_code == 0
    for s in range(3):
        assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / 'a' / f'{s:06d}.png')),
                              np.asarray(PIL.Image.open(tmp_path / 'b' / f'{s:06d}.png')))


def test_url_network_says_to_download_it(tmp_path):
    url = 'https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-cond-vp.pkl'
    r = invoke('--network', url, '--outdir', str(tmp_path / 'o'))
    assert r.exit_code != 0 and 'does not download' in r.output and 'local path' in r.output, r.output


@pytest.mark.parametrize('device, words', [('tpu', 'expected cpu, cuda'), ('cuda', 'no CUDA device'),
                                           ('cuda:7', 'no CUDA device')])
def test_bad_device_is_a_flag_error(snapshots, tmp_path, device, words):
    if device.startswith('cuda') and torch.cuda.is_available():
        pytest.skip('this machine has a GPU')
    r = CliRunner().invoke(sample.main, ['--network', snapshots[0], '--outdir', str(tmp_path), '--device', device])
    assert r.exit_code == 2 and "'--device'" in r.output and words in r.output, r.output
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize('flag', ['--grid', '--npz'])
def test_output_files_are_checked_before_sampling(snapshots, tmp_path, flag):
    r = invoke('--network', snapshots[0], '--outdir', str(tmp_path / 'o'), flag, str(tmp_path))
    assert r.exit_code == 2 and f"'{flag}'" in r.output and 'is a directory' in r.output, r.output
    assert 'Generated' not in r.output


def test_unwritable_outdir(snapshots, tmp_path):
    blocker = tmp_path / 'file'
    blocker.write_text('x')
    r = invoke('--network', snapshots[0], '--outdir', str(blocker / 'sub'))
    assert r.exit_code != 0 and '--outdir' in r.output


def _kill_midway(out, lost, tampered):
    """What a killed run leaves: some PNGs never written. One kept PNG is overwritten with black, so a test can
    tell a skipped seed (stays black) from a regenerated one."""
    for s in lost:
        os.remove(out / f'{s:06d}.png')
    shape = np.asarray(PIL.Image.open(out / f'{tampered:06d}.png')).shape
    PIL.Image.fromarray(np.zeros(shape, np.uint8)).save(out / f'{tampered:06d}.png')


def test_resume_generates_only_the_missing_seeds(snapshots, tmp_path):
    full, out = tmp_path / 'full', tmp_path / 'out'
    args = ['--network', snapshots[0], '--seeds', '0-6', '--batch', '3']
    assert invoke(*args, '--outdir', str(full), '--npz', str(tmp_path / 'full.npz')).exit_code == 0
    assert invoke(*args, '--outdir', str(out)).exit_code == 0
    _kill_midway(out, lost=(1, 4, 5), tampered=2)
    r = invoke(*args, '--outdir', str(out), '--resume', '--batch', '2', '--npz', str(tmp_path / 'resumed.npz'))
    assert r.exit_code == 0, r.output
    assert '4 of 7 images are already' in r.output and 'Generated 3 images' in r.output, r.output
    for s in range(7):
        img = np.asarray(PIL.Image.open(out / f'{s:06d}.png'))
        if s == 2:
            assert not img.any()  # kept, not regenerated
        else:
            assert np.array_equal(img, np.asarray(PIL.Image.open(full / f'{s:06d}.png'))), s
    a, b = np.load(tmp_path / 'full.npz'), np.load(tmp_path / 'resumed.npz')
    assert a['labels'].tolist() == b['labels'].tolist() and a['seeds'].tolist() == b['seeds'].tolist()
    assert np.array_equal(np.delete(a['arr_0'], 2, 0), np.delete(b['arr_0'], 2, 0)) and not b['arr_0'][2].any()


def test_resume_regenerates_a_png_cut_short(snapshots, tmp_path):
    """A PNG cut short by another program (our writes are atomic) is generated again by --resume, and the grid is
    made of whole images (was an OSError traceback reading it back)."""
    full, out = tmp_path / 'full', tmp_path / 'out'
    args = ['--network', snapshots[0], '--seeds', '0-3', '--batch', '2']
    assert invoke(*args, '--outdir', str(full)).exit_code == 0
    assert invoke(*args, '--outdir', str(out)).exit_code == 0
    data = (out / '000002.png').read_bytes()
    (out / '000002.png').write_bytes(data[:len(data) // 2])
    r = invoke(*args, '--outdir', str(out), '--resume', '--grid', str(tmp_path / 'g.png'))
    assert r.exit_code == 0, r.output
    assert 'Generated 1 images' in r.output, r.output
    assert (out / '000002.png').read_bytes() == (full / '000002.png').read_bytes()


def test_resume_refuses_a_damaged_settings_file(snapshots, tmp_path):
    """Seed ranges no run can have written (a damaged or hand-edited file) are an error, not a set of 10^11 seeds."""
    args = ['--network', snapshots[0], '--seeds', '0-1', '--outdir', str(tmp_path)]
    assert invoke(*args).exit_code == 0
    (tmp_path / '.sample-settings.json').write_text('{"runs": [{"settings": {}, "seeds": [[0, 99999999999]]}]}')
    r = invoke(*args, '--resume')
    assert r.exit_code == 2 and 'cannot read' in r.output and 'drop --resume' in r.output, r.output


def test_resume_keeps_the_subdirs_layout(snapshots, tmp_path):
    """--resume without --subdirs over a folder sampled with it (or the reverse) would write every image a second
    time in the other layout, and FID tools read both."""
    args = ['--network', snapshots[0], '--seeds', '999-1000', '--outdir', str(tmp_path)]
    assert invoke(*args, '--subdirs').exit_code == 0
    r = invoke(*args, '--resume')
    assert r.exit_code == 2 and 'add --subdirs' in r.output, r.output
    assert sorted(p.name for p in tmp_path.rglob('*.png')) == ['000999.png', '001000.png']
    assert invoke(*args, '--resume', '--subdirs').exit_code == 0


def test_resume_with_every_image_present_samples_nothing(snapshots, tmp_path):
    args = ['--network', snapshots[1], '--outdir', str(tmp_path), '--seeds', '0-2']
    assert invoke(*args).exit_code == 0
    r = invoke(*args, '--resume', '--grid', str(tmp_path / 'g.png'))
    assert r.exit_code == 0 and 'Generated 0 images' in r.output, r.output
    assert np.asarray(PIL.Image.open(tmp_path / 'g.png')).shape == (16, 16, 3)


def test_without_resume_a_rerun_overwrites(snapshots, tmp_path):
    args = ['--network', snapshots[0], '--outdir', str(tmp_path), '--seeds', '0-1']
    assert invoke(*args).exit_code == 0
    _kill_midway(tmp_path, lost=(), tampered=0)
    assert invoke(*args).exit_code == 0
    assert np.asarray(PIL.Image.open(tmp_path / '000000.png')).any()


@pytest.mark.parametrize('change, words', [
    (['--steps', '4'], 'num_steps'),
    (['--class', '1'], 'class_idx'),
    (['--S_churn', '1'], 'S_churn'),
    ('other-net', 'network'),
])
def test_resume_refuses_other_settings(snapshots, tmp_path, change, words):
    assert invoke('--network', snapshots[0], '--outdir', str(tmp_path), '--seeds', '0-3').exit_code == 0
    os.remove(tmp_path / '000003.png')
    if change == 'other-net':
        args = ['--network', snapshots[1]]
    else:
        args = ['--network', snapshots[0]] + change
    r = invoke(*args, '--outdir', str(tmp_path), '--seeds', '0-3', '--resume')
    assert r.exit_code != 0 and '--resume' in r.output and words in r.output and 'other settings' in r.output, r.output
    assert not (tmp_path / '000003.png').exists()


def test_resume_refuses_pngs_of_unknown_origin(snapshots, tmp_path):
    PIL.Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / '000000.png')
    r = invoke('--network', snapshots[0], '--outdir', str(tmp_path), '--seeds', '0-1', '--resume')
    assert r.exit_code != 0 and sample_resume.SETTINGS_FILE in r.output and 'new --outdir' in r.output, r.output
    # nothing there yet: --resume is a plain run
    r = invoke('--network', snapshots[0], '--outdir', str(tmp_path / 'new'), '--seeds', '0-1', '--resume')
    assert r.exit_code == 0 and 'Generated 2 images' in r.output, r.output


def _pngs(out, seeds):
    return {s: np.asarray(PIL.Image.open(out / f'{s:06d}.png')) for s in seeds}


def test_resume_refuses_seeds_another_plain_run_wrote(snapshots, tmp_path):
    """A plain run with other settings into the same folder records its own seeds: a later --resume keeps
    neither run's PNGs under the other's settings."""
    net, out = snapshots[0], str(tmp_path)
    assert invoke('--network', net, '--outdir', out, '--seeds', '0-3').exit_code == 0
    assert invoke('--network', net, '--outdir', out, '--seeds', '4-5', '--steps', '4').exit_code == 0
    for steps, words in (('4', 'seeds 0, 1, 2, 3'), ('3', 'seeds 4, 5')):
        r = invoke('--network', net, '--outdir', out, '--seeds', '0-5', '--steps', steps, '--resume')
        assert r.exit_code != 0 and words in r.output and 'num_steps' in r.output, r.output
    # each run's own seeds still resume
    for seeds, steps in (('0-3', '3'), ('4-5', '4')):
        r = invoke('--network', net, '--outdir', out, '--seeds', seeds, '--steps', steps, '--resume')
        assert r.exit_code == 0 and 'Generated 0 images' in r.output, r.output


class _Killed(Exception):
    pass


def test_resume_regenerates_pngs_a_killed_plain_run_did_not_replace(snapshots, tmp_path, monkeypatch):
    """Settings S1 fill 0-5; a plain run with S2 over 0-5 is killed after 2 PNGs. The other four still hold S1
    images: --resume with S2 regenerates them (they are pending), --resume with S1 is refused."""
    net, out, want = snapshots[0], tmp_path / 'out', tmp_path / 'want'
    s2 = ['--network', net, '--seeds', '0-5', '--steps', '4', '--batch', '2']
    assert invoke(*s2, '--outdir', str(want)).exit_code == 0
    assert invoke('--network', net, '--outdir', str(out), '--seeds', '0-5').exit_code == 0
    s1_images = _pngs(out, range(6))
    save, calls = sample.image_io.save_png, []

    def killed_after_two(image, path):
        if len(calls) == 2:
            raise _Killed
        calls.append(path)
        save(image, path)

    monkeypatch.setattr(sample.image_io, 'save_png', killed_after_two)
    with pytest.raises(_Killed):
        invoke(*s2, '--outdir', str(out))
    monkeypatch.setattr(sample.image_io, 'save_png', save)
    assert sorted(os.path.basename(c) for c in calls) == ['000000.png', '000001.png']
    assert all(np.array_equal(s1_images[s], img) for s, img in _pngs(out, range(2, 6)).items())

    r = invoke('--network', net, '--outdir', str(out), '--seeds', '0-5', '--resume')
    assert r.exit_code != 0 and 'num_steps' in r.output, r.output
    r = invoke(*s2, '--outdir', str(out), '--resume')
    assert r.exit_code == 0 and 'Generated 4 images' in r.output, r.output
    expected = _pngs(want, range(6))
    assert all(np.array_equal(expected[s], img) for s, img in _pngs(out, range(6)).items())
    r = invoke(*s2, '--outdir', str(out), '--resume')  # the finished run left nothing pending
    assert r.exit_code == 0 and 'Generated 0 images' in r.output, r.output


def test_resume_reads_the_first_settings_format(snapshots, tmp_path):
    """A folder recorded by the first format (one flat settings dict) resumes under the same settings."""
    net, out = snapshots[0], str(tmp_path)
    assert invoke('--network', net, '--outdir', out, '--seeds', '0-2').exit_code == 0
    path = tmp_path / sample_resume.SETTINGS_FILE
    with open(path) as f:
        flat = json.load(f)['runs'][0]['settings']
    with open(path, 'w') as f:
        json.dump(flat, f)
    os.remove(tmp_path / '000001.png')
    r = invoke('--network', net, '--outdir', out, '--seeds', '0-2', '--steps', '4', '--resume')
    assert r.exit_code != 0 and 'num_steps' in r.output, r.output
    r = invoke('--network', net, '--outdir', out, '--seeds', '0-2', '--resume')
    assert r.exit_code == 0 and 'Generated 1 images' in r.output, r.output


def test_settings_record_ranges():
    rec = sample_resume.Record()
    rec.assign({'a': 1}, range(0, 10), pending=[3, 4])
    rec.assign({'a': 2}, [5, 6, 20], pending=[])
    rec.runs[0][3] = 123
    assert rec.lookup(4) == ({'a': 1}, 123) and rec.lookup(6) == ({'a': 2}, None) and rec.lookup(11) == (None, None)
    rec.settle(range(0, 10))
    assert rec.lookup(4) == ({'a': 1}, None)
    assert sample_resume._to_ranges({0, 1, 2, 3, 4, 7, 8, 9, 20}) == [[0, 4], [7, 9], [20, 20]]


@pytest.mark.slow  # ~100 s on 2 cores: 2 x 35 evaluations of a 56M-parameter net
def test_full_size_official_pickle_samples_like_the_network_it_holds(tmp_path):
    """Issue 3 acceptance: a full-size DDPM++ CIFAR-10 cond net in the official pickle format, sampled by sample.py
    (seeds 0-7, 18 steps, CPU), gives exactly the images the network object itself gives through the sampler."""
    from edm_fast import presets
    from nvlabs_pickle_writer import write_network_pickle
    torch.manual_seed(123)
    net = presets.build(presets.official_config('edm-cifar10-32x32-cond-vp')).eval().requires_grad_(False)
    with torch.no_grad():
        for p in net.parameters():  # undo the 1e-5 'zero' init so every path shapes the images
            if p.abs().max() < 1e-4:
                p.mul_(1e5)
    pkl = tmp_path / 'network-snapshot-000000.pkl'
    write_network_pickle(str(pkl), ema=net, dataset_kwargs=dict(path='cifar10-32x32.zip'))
    r = invoke('--network', str(pkl), '--outdir', str(tmp_path / 'out'), '--seeds', '0-7', '--steps', '18',
               '--batch', '8')
    assert r.exit_code == 0, r.output
    assert '35 NFE per image' in r.output
    batch = next(generate.generate_images(net, list(range(8)), num_steps=18, max_batch_size=8))
    for s, img in zip(batch.seeds, batch.images):
        png = np.asarray(PIL.Image.open(tmp_path / 'out' / f'{s:06d}.png'))
        assert np.array_equal(png, img.permute(1, 2, 0).numpy()), s
    assert len({img.float().std().item() for img in batch.images}) == 8
