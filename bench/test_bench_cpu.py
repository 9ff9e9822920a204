"""pytest-benchmark regression tracking of the hot paths at CPU size (CI runs these in seconds):

  python -m pytest bench/ --benchmark-only                 # CPU-sized cases
  python -m pytest bench/ --benchmark-only --runslow       # plus full-size cases (on a GPU: gpu-marked)

The ops and networks are checked against the reference in tests/; here they are only timed.
"""

import pytest
import torch

from edm_fast import ops, presets, sampling


@pytest.fixture(scope='module')
def tiny_net():
    torch.manual_seed(0)
    cfg = presets.official_config('edm-cifar10-32x32-cond-vp')
    cfg.update(model_channels=32, channel_mult=[1, 2], img_resolution=16)
    return presets.build(cfg).eval().requires_grad_(False)


def test_group_norm_silu(benchmark):
    x = torch.randn(8, 128, 16, 16)
    w, b = torch.ones(128), torch.zeros(128)
    y = benchmark.pedantic(ops.group_norm, args=(x, w, b, 32, 1e-6), kwargs=dict(act='silu'), rounds=10, iterations=5)
    assert y.shape == x.shape


def test_resample_down(benchmark):
    x = torch.randn(8, 128, 32, 32)
    f = torch.full([1, 1, 2, 2], 0.25)
    y = benchmark.pedantic(ops.resample, args=(x, f), kwargs=dict(down=2), rounds=10, iterations=5)
    assert y.shape == (8, 128, 16, 16)


def test_attention(benchmark):
    qkv = torch.randn(4, 3 * 128, 16, 16)
    y = benchmark.pedantic(ops.attention, args=(qkv, 2), rounds=10, iterations=3)
    assert y.shape == (4, 128, 16, 16)


def test_network_forward(benchmark, tiny_net):
    x, s, labels = torch.randn(8, 3, 16, 16), torch.ones(8), torch.eye(10)[:8]
    with torch.no_grad():
        y = benchmark.pedantic(tiny_net, args=(x, s, labels), rounds=5, iterations=1)
    assert y.shape == x.shape


def test_sampler_18_steps(benchmark, tiny_net):
    latents = torch.randn(4, 3, 16, 16)
    x = benchmark.pedantic(sampling.edm_sampler, args=(tiny_net, latents, torch.eye(10)[:4]),
                           kwargs=dict(num_steps=18), rounds=2, iterations=1)
    assert x.dtype == torch.float64 and torch.isfinite(x).all()


def test_edm2_network_forward(benchmark):
    from bench import models
    net = models.build('edm2-tiny', device='cpu').eval().requires_grad_(False)
    x, s, labels = models.inputs(net, 8, device='cpu')
    with torch.no_grad():
        y = benchmark.pedantic(net, args=(x, s, labels), rounds=5, iterations=1)
    assert y.shape == x.shape and torch.isfinite(y).all()


@pytest.mark.parametrize('model', ['tiny', 'edm2-tiny'])
def test_model_and_sample_benchmarks_run_on_cpu(model, monkeypatch):
    """The model/sampling benchmark code paths (EDM and EDM2: loss, providers, sampler) at tiny size, uncompiled."""
    from bench import bench_model, bench_sample, models
    from edm_fast.fast import FastDenoiser
    monkeypatch.setattr(models, 'DEVICE', 'cpu')
    net = models.build(model)
    for mode in ('forward', 'train', 'step'):
        flops = models.count_flops(net, train=mode != 'forward')
        assert flops > 0
        records = bench_model.run_case(model, net, 'reference', 2, mode, flops, warmup=1, repeats=2)
        assert {r['metric'] for r in records} >= {'images_per_s', 'mfu'}
        assert all(r['value'] > 0 for r in records if r['metric'] == 'images_per_s')
    net = net.eval().requires_grad_(False)
    fast = FastDenoiser(net, dtype='bf16', compile=False)
    assert bench_sample.time_sampling(net, fast, [0, 1], 2, dict(num_steps=3), None) > 0


def _stand_in_checkout(root, edm2):
    """A directory laid out like an NVlabs checkout whose training/networks*.py re-export edm_fast's classes
    (no official code is available here; this exercises the --nvlabs-dir plumbing, not the official numbers)."""
    (root / 'training').mkdir(parents=True)
    (root / 'training' / '__init__.py').write_text('')
    if edm2:
        (root / 'training' / 'networks_edm2.py').write_text('from edm_fast.networks_edm2 import *  # stand-in\n')
    else:
        (root / 'training' / 'networks.py').write_text(
            'from edm_fast.networks import *  # stand-in\nfrom edm_fast.preconditioners import *\n')
    return str(root)


def test_nvlabs_dir_provider(tmp_path, monkeypatch):
    """--nvlabs-dir: the checkout's class of the same name is built with the same kwargs and our weights, for EDM
    and EDM2 (one checkout each, switched in one process); a checkout without the file is refused by name."""
    import sys
    from bench import bench_model, bench_sample, models
    monkeypatch.setattr(models, 'DEVICE', 'cpu')
    dirs = [_stand_in_checkout(tmp_path / 'edm', False), _stand_in_checkout(tmp_path / 'edm2', True)]
    for model in ('tiny', 'edm2-tiny'):
        net = models.build(model).eval()
        official, fn, backend = models.configure(net, 'nvlabs', dirs)
        checkout = sys.modules['training.networks_edm2' if model == 'edm2-tiny' else 'training.networks']
        assert checkout.__file__.startswith(dirs[model == 'edm2-tiny'])
        assert type(official) is getattr(checkout, type(net).__name__) and official is not net
        x, s, labels = models.inputs(net, 2)
        with torch.no_grad():
            assert torch.equal(fn(x, s, labels), net(x, s, labels))
        records = bench_model.run_case(model, net, 'nvlabs', 2, 'forward', 1.0, warmup=1, repeats=2, nvlabs_dirs=dirs)
        assert [r['value'] > 0 for r in records if r['metric'] == 'images_per_s'] == [True]
        assert bench_sample.time_sampling(official.requires_grad_(False), None, [0, 1], 2, dict(num_steps=2),
                                          backend) > 0
    assert 'training' not in sys.path and dirs[1] not in sys.path
    with pytest.raises(FileNotFoundError, match='networks_edm2.py'):
        models.configure(models.build('edm2-tiny'), 'nvlabs', dirs[:1])


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.parametrize('provider', ['reference', 'fast-bf16'])
def test_full_size_ddpmpp_forward_gpu(benchmark, provider):
    from bench import models
    net = models.build('ddpmpp-cifar10').eval().requires_grad_(False)
    module, fn, backend = models.configure(net, provider)
    x, s, labels = models.inputs(module, 512, channels_last=provider.startswith('fast'))
    with models.backend_env(backend), torch.no_grad():
        fn(x, s, labels)

        def step():
            fn(x, s, labels)
            torch.cuda.synchronize()
        benchmark.pedantic(step, rounds=10, iterations=1, warmup_rounds=2)


def test_group_norm_sweep_runs_on_cpu(monkeypatch):
    """bench_group_norm --sweep: every setting is timed per case, recorded, and CONFIG is restored (through the
    interpreter's CONFIG entries, which are the ones CPU tensors use)."""
    import functools
    from bench import bench_group_norm
    from edm_fast.ops.triton import group_norm as kernels
    if not kernels.INTERPRETED:
        pytest.skip('needs the Triton interpreter (TRITON_INTERPRET=1, set by conftest on machines without a GPU)')
    monkeypatch.setattr(bench_group_norm, 'make_inputs',
                        functools.partial(bench_group_norm.make_inputs, device='cpu'))
    before = dict(kernels.CONFIG)
    cases = [('tiny', 2, 16, 8, 8, 4, 1e-5, 'add')]
    settings = {'interpret_fwd': [(64, 512), (256, 512, False)], 'interpret_bwd': [(64, 512, False)]}
    records = bench_group_norm.sweep(cases, repeats=1, settings=settings)
    assert kernels.CONFIG == before
    assert [(r['provider'], r['case'].split()[-1]) for r in records] == [
        ('triton[interpret_fwd=64/512]', 'fwd'), ('triton[interpret_fwd=256/512/False]', 'fwd'),
        ('triton[interpret_bwd=64/512/False]', 'fwd+bwd')]
    assert all(r['value'] > 0 and r['gbps'] > 0 for r in records)
