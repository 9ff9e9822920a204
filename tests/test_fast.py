"""The fast path: FastDenoiser semantics on CPU, zero graph breaks, and GPU parity with the reference path."""

import pytest
import torch

from edm_fast import generate, presets
from edm_fast.fast import FastDenoiser, prepare_training
from test_generate import tiny_net


def test_fast_denoiser_keeps_the_callers_network():
    net = tiny_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fast = FastDenoiser(net, dtype='bf16', compile=False)
    x, s = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)
    out = fast(x, s, torch.eye(4)[:2])
    assert out.dtype == torch.float32
    assert all(torch.equal(before[k], v) and v.dtype == before[k].dtype for k, v in net.state_dict().items())
    assert net.compute_dtype(x) == torch.float32 and fast.net.compute_dtype(x) == torch.bfloat16
    assert (fast.sigma_min, fast.sigma_max) == (net.sigma_min, net.sigma_max)
    with torch.no_grad():
        ref = net(x, s, torch.eye(4)[:2])
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_fast_fp32_channels_last_images_match_reference():
    net = tiny_net()
    fast = FastDenoiser(net, dtype='fp32', channels_last=True, compile=False)
    a = next(generate.generate_images(net, [0, 1, 2], num_steps=4)).images
    b = next(generate.generate_images(net, [0, 1, 2], num_steps=4, denoiser=fast)).images
    assert (a.int() - b.int()).abs().max() <= 1


@pytest.mark.parametrize('name', ['edm-cifar10-32x32-cond-vp', 'edm-cifar10-32x32-uncond-ve', 'edm-imagenet-64x64-cond-adm'])
def test_preset_networks_trace_without_graph_breaks(name):
    """torch.compile(fullgraph=True) requirement: the whole forward is one graph (dynamo trace only)."""
    cfg = presets.official_config(name)
    cfg.update(model_channels=32 if cfg['model_type'] == 'SongUNet' else 64, img_resolution=16)
    torch.manual_seed(0)
    net = presets.build(cfg).eval()
    x, s = torch.randn(2, 3, 16, 16), torch.tensor([1.0, 2.0])
    labels = torch.eye(net.label_dim)[:2] if net.label_dim else None
    explained = torch._dynamo.explain(net)(x, s, labels)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


def test_prepare_training_sets_dtype_and_format():
    net = tiny_net()
    fn = prepare_training(net, dtype='bf16', channels_last=True)
    assert fn is net and net.compute_dtype(torch.zeros(1)) == torch.bfloat16
    assert net.model.enc['8x8_conv'].weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match='dtype'):
        prepare_training(net, dtype='int8')

# ----------------------------------------------------------------------------------------------------
# GPU: the fast path against the reference path at full size.


def _gpu_net(name):
    torch.manual_seed(0)
    net = presets.build(presets.official_config(name)).cuda().eval().requires_grad_(False)
    with torch.no_grad():  # undo near-zero inits so every path shapes the output
        for p in net.parameters():
            if p.abs().max() < 1e-4:
                p.normal_(0, 0.05)
    return net


@pytest.fixture(scope='module')
def ddpmpp():
    """DDPM++ CIFAR-10 and its compiled fp16 fast denoiser, built once (each compile costs tens of seconds)."""
    net = _gpu_net('edm-cifar10-32x32-cond-vp')
    return net, FastDenoiser(net, dtype='fp16')


def _check_forward(net, fast, dtype, batch=8):
    x = torch.randn(batch, 3, net.img_resolution, net.img_resolution, device='cuda', dtype=torch.float64)
    labels = torch.eye(net.label_dim, device='cuda')[torch.arange(batch) % net.label_dim] if net.label_dim else None
    eager = FastDenoiser(net, dtype=dtype, compile=False, cuda_graphs=False, channels_last=False)
    for sigma in (0.01, 1.0, 50.0):
        s = torch.tensor(sigma, dtype=torch.float64, device='cuda')
        with torch.no_grad():
            ref32 = net(x, s, labels, force_fp32=True)
        got, same_precision = fast(x, s, labels), eager(x, s, labels)
        err_fast = ((got - ref32).norm() / ref32.norm()).item()
        err_eager = ((same_precision - ref32).norm() / ref32.norm()).item()
        print(f'sigma {sigma}: fast {err_fast:.2e}, eager {dtype} {err_eager:.2e}')
        assert err_fast <= 2 * err_eager + 1e-3, (sigma, err_fast, err_eager)


@pytest.mark.gpu
def test_fast_forward_matches_reference_ddpmpp(ddpmpp):
    _check_forward(*ddpmpp, 'fp16')


@pytest.mark.gpu
@pytest.mark.parametrize('name, dtype', [('edm-cifar10-32x32-uncond-ve', 'bf16'), ('edm-imagenet-64x64-cond-adm', 'bf16')])
def test_fast_forward_matches_reference(name, dtype):
    net = _gpu_net(name)
    _check_forward(net, FastDenoiser(net, dtype=dtype), dtype)


@pytest.mark.gpu
def test_cuda_graph_replay_equals_uncaptured_exactly(ddpmpp):
    net, graphed = ddpmpp
    x = torch.randn(16, 3, 32, 32, device='cuda', dtype=torch.float64)
    s = torch.tensor(3.0, dtype=torch.float64, device='cuda')
    labels = torch.eye(10, device='cuda')[torch.arange(16) % 10]
    plain = FastDenoiser(net, dtype='fp16', compile=False, cuda_graphs=False)
    plain.fn = graphed.fn  # the same compiled kernels, called without capture
    for sigma in (3.0, 0.5):
        s.fill_(sigma)
        assert torch.equal(graphed(x, s, labels), plain(x, s, labels))


@pytest.mark.gpu
def test_fast_sampling_images_match_reference(ddpmpp):
    """CIFAR-10 DDPM++ (random weights), 18 steps: uint8 images of the fp16 fast path vs the fp32 reference path."""
    net, fast = ddpmpp
    seeds = list(range(64))
    ref = torch.cat([b.images for b in generate.generate_images(net, seeds, num_steps=18, device='cuda')])
    got = torch.cat([b.images for b in generate.generate_images(net, seeds, num_steps=18, device='cuda', denoiser=fast)])
    diff = (ref.int() - got.int()).abs()
    frac_within_2 = (diff <= 2).float().mean().item()
    print(f'fast vs reference uint8: max diff {diff.max().item()}, within 2 levels {frac_within_2:.6f}')
    assert frac_within_2 >= 0.999


def test_edm2_network_fast_path():
    """EDM2 nets go through the same fast path: one graph, and fp32 channels-last images match the reference."""
    from test_edm2_networks import tiny_net as edm2_net
    net = edm2_net(img_channels=3).eval().requires_grad_(False)
    x, s, labels = torch.randn(2, 3, 16, 16), torch.tensor([1.0, 2.0]), torch.eye(5)[:2]
    explained = torch._dynamo.explain(net)(x, s, labels)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    fast = FastDenoiser(net, dtype='fp32', channels_last=True, compile=False)
    a = next(generate.generate_images(net, [0, 1, 2], num_steps=4)).images
    b = next(generate.generate_images(net, [0, 1, 2], num_steps=4, denoiser=fast)).images
    assert (a.int() - b.int()).abs().max() <= 1
