"""generate_images(): NVlabs seed splitting, seed -> image invariance, class handling, 2-rank torchrun."""

import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch

from edm_fast import generate, networks
from edm_fast.checkpoint import save_snapshot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_net(label_dim=4, seed=0):
    torch.manual_seed(seed)
    net = networks.EDMPrecond(img_resolution=8, img_channels=3, label_dim=label_dim, model_type='SongUNet',
                              model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0)
    with torch.no_grad():
        for p in net.parameters():  # make every layer matter (zero-ish init would give near-constant images)
            p.normal_(0, 0.2)
    return net.eval().requires_grad_(False)


@pytest.fixture(scope='module')
def snapshot(tmp_path_factory):
    path = tmp_path_factory.mktemp('net') / 'tiny.safetensors'
    save_snapshot(str(path), ema=tiny_net())
    return str(path)


def test_rank_batches_follow_nvlabs():
    seeds = list(range(10))
    assert generate.rank_batches(seeds, 4, 0, 2) == [[0, 1, 2], [6, 7]]
    assert generate.rank_batches(seeds, 4, 1, 2) == [[3, 4, 5], [8, 9]]
    assert generate.rank_batches(seeds, 64, 0, 1) == [seeds]
    assert generate.rank_batches([5], 4, 1, 2) == [[]]  # empty batches are kept (and skipped when sampling)


def test_select_sampler():
    fn, kw = generate.select_sampler(num_steps=18, sigma_min=None, solver=None)
    assert fn.__name__ == 'edm_sampler' and kw == {'num_steps': 18}
    fn, kw = generate.select_sampler(num_steps=18, discretization='vp')
    assert fn.__name__ == 'ablation_sampler'


def _by_seed(net, seeds, **kw):
    out = {}
    for batch in generate.generate_images(net, seeds, num_steps=4, **kw):
        assert batch.images.dtype == torch.uint8 and batch.images.shape[1:] == (3, 8, 8)
        for s, img, lab in zip(batch.seeds, batch.images, batch.labels):
            out[s] = (img.clone(), int(lab))
    return out


def test_images_depend_only_on_seed():
    net = tiny_net()
    seeds = [3, 1, 4, 15, 9, 2, 6]
    a = _by_seed(net, seeds, max_batch_size=7)
    b = _by_seed(net, seeds, max_batch_size=3)
    c = _by_seed(net, [15], max_batch_size=1)
    assert a.keys() == set(seeds)
    for s in seeds:
        assert torch.equal(a[s][0], b[s][0]) and a[s][1] == b[s][1]
    assert torch.equal(a[15][0], c[15][0])
    assert len({a[s][0].float().mean().item() for s in seeds}) == len(seeds)  # different seeds, different images


def test_stochastic_sampler_is_also_seed_invariant():
    net = tiny_net()
    kw = dict(S_churn=40, S_min=0.05, S_max=50, S_noise=1.003)
    a = _by_seed(net, [0, 1, 2], max_batch_size=3, **kw)
    b = _by_seed(net, [0, 1, 2], max_batch_size=2, **kw)
    d = _by_seed(net, [0, 1, 2], max_batch_size=3)
    assert all(torch.equal(a[s][0], b[s][0]) for s in a)
    assert any(not torch.equal(a[s][0], d[s][0]) for s in a)


def test_class_idx_keeps_rng_stream():
    """--class still draws the class index, so the latents (and churn noise) stay those of the seed."""
    net = tiny_net()
    fixed = _by_seed(net, [0, 1, 2, 3], max_batch_size=4, class_idx=2)
    assert all(lab == 2 for _, lab in fixed.values())
    rnd = _by_seed(net, [0, 1, 2, 3], max_batch_size=4)
    # Seeds whose random class was 2 anyway must give identical images.
    same = [s for s in rnd if rnd[s][1] == 2]
    for s in same:
        assert torch.equal(rnd[s][0], fixed[s][0])


def test_class_errors():
    with pytest.raises(ValueError, match='out of range'):
        generate.check_class(tiny_net(), 4)
    with pytest.raises(ValueError, match='unconditional'):
        generate.check_class(tiny_net(label_dim=0), 0)


def test_to_uint8_matches_nvlabs_rounding():
    x = torch.tensor([-2.0, -1.0, -0.0039, 0.0, 0.0039, 0.999, 1.0, 3.0], dtype=torch.float64)
    assert generate.to_uint8(x).tolist() == [0, 0, 127, 128, 128, 255, 255, 255]


def test_custom_denoiser_is_used():
    net = tiny_net()
    calls = []

    def denoise(x, sigma, labels):
        calls.append(float(sigma))
        return net(x, sigma, labels)
    a = _by_seed(net, [0, 1], max_batch_size=2, denoiser=denoise)
    b = _by_seed(net, [0, 1], max_batch_size=2)
    assert len(calls) == 2 * 4 - 1 and all(torch.equal(a[s][0], b[s][0]) for s in a)


def _read_pngs(folder):
    return {f: np.asarray(PIL.Image.open(os.path.join(folder, f))) for f in sorted(os.listdir(folder)) if f.endswith('.png')}


def test_two_ranks_match_one_and_resume(snapshot, tmp_path):
    """torchrun --nproc_per_node=2 (gloo on CPU) writes the same PNGs as a single process, and --resume on 2 ranks
    fills in exactly the PNGs a killed run did not write."""
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONPATH=REPO)
    args = ['--network', snapshot, '--seeds', '0-6', '--batch', '2', '--steps', '4', '--device', 'cpu']
    one, two = tmp_path / 'one', tmp_path / 'two'
    subprocess.run([sys.executable, os.path.join(REPO, 'sample.py'), '--outdir', str(one)] + args, check=True,
                   env=env, capture_output=True, timeout=300)
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           os.path.join(REPO, 'sample.py'), '--outdir', str(two), '--grid', str(tmp_path / 'g.png')] + args,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _read_pngs(one), _read_pngs(two)
    assert list(a) == [f'{s:06d}.png' for s in range(7)] and a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name]), name
    grid = np.asarray(PIL.Image.open(tmp_path / 'g.png'))
    assert grid.shape == (3 * 8, 3 * 8, 3) and np.array_equal(grid[8:16, 0:8], a['000003.png'])

    for s in (0, 3, 4):  # never written by the killed run
        os.remove(two / f'{s:06d}.png')
    PIL.Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(two / '000006.png')  # written: must be kept
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           os.path.join(REPO, 'sample.py'), '--outdir', str(two), '--resume'] + args,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '4 of 7 images are already' in proc.stdout and 'Generated 3 images' in proc.stdout, proc.stdout
    b = _read_pngs(two)
    assert b.keys() == a.keys() and not b['000006.png'].any()
    for name in set(a) - {'000006.png'}:
        assert np.array_equal(a[name], b[name]), name


def test_zero_churn_skips_draws_without_changing_images():
    """With S_churn = 0, generate_images feeds zeros instead of per-seed draws; images stay bit-identical."""
    from edm_fast import sampling
    net = tiny_net()
    seeds = [11, 12, 13]
    got = next(generate.generate_images(net, seeds, num_steps=4)).images
    rnd = sampling.StackedRandomGenerator('cpu', seeds)
    latents = rnd.randn([3, 3, 8, 8])
    labels = torch.eye(4)[rnd.randint(4, size=[3])]
    want = generate.to_uint8(sampling.edm_sampler(net, latents, labels, randn_like=rnd.randn_like, num_steps=4))
    assert torch.equal(got, want)
    assert generate.randn_like(rnd, sampling.edm_sampler, {'S_churn': 0}) is torch.zeros_like
    assert generate.randn_like(rnd, sampling.edm_sampler, {'S_churn': 5}) == rnd.randn_like
    assert generate.randn_like(rnd, sampling.ablation_sampler, {}) == rnd.randn_like
