"""The fast path: FastDenoiser semantics on CPU, zero graph breaks, and GPU parity with the reference path."""

import pytest
import torch

from edm_fast import generate, networks, presets
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


@pytest.mark.gpu
@pytest.mark.parametrize('name', ['edm-cifar10-32x32-cond-vp', 'edm-cifar10-32x32-uncond-ve',
                                  'edm-ffhq-64x64-uncond-vp', 'edm-imagenet-64x64-cond-adm'])
@pytest.mark.parametrize('dtype', ['fp16', 'bf16'])
def test_fast_forward_matches_reference(name, dtype):
    net = _gpu_net(name)
    x = torch.randn(8, 3, net.img_resolution, net.img_resolution, device='cuda', dtype=torch.float64)
    labels = torch.eye(net.label_dim, device='cuda')[torch.arange(8) % net.label_dim] if net.label_dim else None
    fast = FastDenoiser(net, dtype=dtype)
    for sigma in (0.01, 1.0, 50.0):
        s = torch.tensor(sigma, dtype=torch.float64, device='cuda')
        with torch.no_grad():
            ref32 = net(x, s, labels, force_fp32=True)
            net16 = FastDenoiser(net, dtype=dtype, compile=False, cuda_graphs=False, channels_last=False)(x, s, labels)
        got = fast(x, s, labels)
        err_fast = (got - ref32).norm() / ref32.norm()
        err_eager = (net16 - ref32).norm() / ref32.norm()
        assert err_fast <= 2 * err_eager + 1e-3, (sigma, err_fast.item(), err_eager.item())


@pytest.mark.gpu
def test_cuda_graph_replay_equals_uncaptured_exactly():
    net = _gpu_net('edm-cifar10-32x32-cond-vp')
    x = torch.randn(16, 3, 32, 32, device='cuda', dtype=torch.float64)
    s = torch.tensor(3.0, dtype=torch.float64, device='cuda')
    labels = torch.eye(10, device='cuda')[torch.arange(16) % 10]
    graphed = FastDenoiser(net, dtype='fp16', compile=True, cuda_graphs=True)
    plain = FastDenoiser(net, dtype='fp16', compile=True, cuda_graphs=False)
    plain.fn = graphed.fn  # same compiled kernels, with and without capture
    for sigma in (3.0, 0.5):
        s.fill_(sigma)
        assert torch.equal(graphed(x, s, labels), plain(x, s, labels))


@pytest.mark.gpu
def test_fast_sampling_images_match_reference():
    """CIFAR-10 DDPM++ (random weights), 18 steps: uint8 images of the fp16 fast path vs the fp32 reference path."""
    net = _gpu_net('edm-cifar10-32x32-cond-vp')
    seeds = list(range(64))
    ref = torch.cat([b.images for b in generate.generate_images(net, seeds, num_steps=18, device='cuda')])
    fast = FastDenoiser(net, dtype='fp16')
    got = torch.cat([b.images for b in generate.generate_images(net, seeds, num_steps=18, device='cuda', denoiser=fast)])
    diff = (ref.int() - got.int()).abs()
    frac_within_2 = (diff <= 2).float().mean().item()
    print(f'fast vs reference uint8: max diff {diff.max().item()}, within 2 levels {frac_within_2:.6f}')
    assert frac_within_2 >= 0.999
