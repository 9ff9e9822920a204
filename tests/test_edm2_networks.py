"""EDM2 networks beyond the vectors: presets and parameter counts, module layout, the eval-mode weight cache,
run-time compute dtype, the EDM2 sampler's guidance/churn semantics, the loss and the encoders."""

import copy
import pickle

import numpy as np
import pytest
import torch

from edm_fast import encoders, loss_edm2, networks_edm2, presets_edm2, sampling_edm2
from edm_fast.networks_edm2 import MPConv, Precond

Mi = 1 << 20

# Spec §10.4 (measured on the official classes, label_dim 1000) and §10.5 (train_edm2.py presets), copied here
# independently of presets_edm2 so a typo there fails.
SPEC_PARAMS = {
    'edm2-img512-xxs': 31_309_029, 'edm2-img512-xs': 124_713_253, 'edm2-img512-s': 280_212_837,
    'edm2-img512-m': 497_807_781, 'edm2-img512-l': 777_498_085, 'edm2-img512-xl': 1_119_283_749,
    'edm2-img512-xxl': 1_523_164_773, 'edm2-img64-xs': 124_710_949, 'edm2-img64-s': 280_209_381,
    'edm2-img64-m': 497_803_173, 'edm2-img64-l': 777_492_325, 'edm2-img64-xl': 1_119_276_837,
}
SPEC_TRAINING = {  # duration (Mi), channels, lr, decay, dropout, P_mean, P_std
    'edm2-img512-xxs': (2048, 64, 0.0170, 70000, 0.00, -0.4, 1.0),
    'edm2-img512-xs': (2048, 128, 0.0120, 70000, 0.00, -0.4, 1.0),
    'edm2-img512-s': (2048, 192, 0.0100, 70000, 0.00, -0.4, 1.0),
    'edm2-img512-m': (2048, 256, 0.0090, 70000, 0.10, -0.4, 1.0),
    'edm2-img512-l': (1792, 320, 0.0080, 70000, 0.10, -0.4, 1.0),
    'edm2-img512-xl': (1280, 384, 0.0070, 70000, 0.10, -0.4, 1.0),
    'edm2-img512-xxl': (896, 448, 0.0065, 70000, 0.10, -0.4, 1.0),
    'edm2-img64-xs': (1024, 128, 0.0120, 35000, 0.00, -0.8, 1.6),
    'edm2-img64-s': (1024, 192, 0.0100, 35000, 0.00, -0.8, 1.6),
    'edm2-img64-m': (2048, 256, 0.0090, 35000, 0.10, -0.8, 1.6),
    'edm2-img64-l': (1024, 320, 0.0080, 35000, 0.10, -0.8, 1.6),
    'edm2-img64-xl': (640, 384, 0.0070, 35000, 0.10, -0.8, 1.6),
}


def tiny_net(label_dim=5, seed=0, **kwargs):
    """A 16x16 EDM2 Precond with one attention head at 8x8 and non-zero gains (so every path matters)."""
    torch.manual_seed(seed)
    cfg = dict(img_resolution=16, img_channels=3, label_dim=label_dim, model_channels=32, channel_mult=[1, 2],
               num_blocks=1, attn_resolutions=[8], logvar_channels=16, use_fp16=False)
    cfg.update(kwargs)
    net = Precond(**cfg).eval()
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(0.7)
    return net


def inputs(n=3, label_dim=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g)
    sigma = torch.tensor([0.05, 1.0, 20.0][:n])
    labels = torch.eye(label_dim)[torch.arange(n) % label_dim] if label_dim else None
    return x, sigma, labels

# ----------------------------------------------------------------------------------------------------
# Presets.


@pytest.mark.parametrize('name', sorted(presets_edm2.PRESETS))
def test_preset_parameter_counts(name):
    net = presets_edm2.build(name, device='meta')
    count = sum(p.numel() for p in net.parameters())
    assert count == presets_edm2.PRESETS[name]['params']
    if name in SPEC_PARAMS:
        assert count == SPEC_PARAMS[name]
    assert isinstance(net, Precond) and net.use_fp16 is True


def test_preset_training_values():
    assert set(SPEC_TRAINING) | {n for n in presets_edm2.PRESETS if n.startswith('edm2-img32-')} == \
        set(presets_edm2.PRESETS)
    for name, (duration, channels, lr, decay, dropout, P_mean, P_std) in SPEC_TRAINING.items():
        c = presets_edm2.training_config(name)
        assert c['total_nimg'] == duration * Mi and c['batch_size'] == 2048
        assert c['network_kwargs'] == dict(class_name='Precond', model_channels=channels, dropout=dropout,
                                           use_fp16=True)
        assert c['lr_kwargs'] == dict(func_name='learning_rate_schedule', ref_lr=lr, ref_batches=decay)
        assert c['loss_kwargs'] == dict(class_name='EDM2Loss', P_mean=P_mean, P_std=P_std)
        interface = presets_edm2.get(name)['interface']
        assert interface == dict(img_resolution=64, img_channels=4 if 'img512' in name else 3, label_dim=1000)
    with pytest.raises(KeyError, match='unknown EDM2 preset'):
        presets_edm2.get('edm2-img512-huge')

# ----------------------------------------------------------------------------------------------------
# Module layout.


def test_state_dict_layout_and_registration_order():
    net = tiny_net()
    keys = list(net.state_dict())
    assert keys[:5] == ['unet.out_gain', 'unet.emb_fourier.freqs', 'unet.emb_fourier.phases', 'unet.emb_noise.weight',
                        'unet.emb_label.weight']
    assert keys[5] == 'unet.enc.16x16_conv.weight' and tuple(net.state_dict()[keys[5]].shape) == (32, 4, 3, 3)
    assert keys[-4:] == ['unet.out_conv.weight', 'logvar_fourier.freqs', 'logvar_fourier.phases',
                         'logvar_linear.weight']
    block = [k for k in keys if k.startswith('unet.enc.8x8_block0.')]
    assert block == [f'unet.enc.8x8_block0.{n}' for n in ('emb_gain', 'conv_res0.weight', 'emb_linear.weight',
                                                          'conv_res1.weight', 'conv_skip.weight', 'attn_qkv.weight',
                                                          'attn_proj.weight')]
    assert tuple(net.state_dict()['unet.enc.8x8_block0.conv_skip.weight'].shape) == (64, 32, 1, 1)
    assert list(net.unet.enc) == ['16x16_conv', '16x16_block0', '8x8_down', '8x8_block0']
    assert list(net.unet.dec) == ['8x8_in0', '8x8_in1', '8x8_block0', '8x8_block1', '16x16_up', '16x16_block0',
                                  '16x16_block1']
    assert net.unet.dec['8x8_in0'].num_heads == 1 and net.unet.dec['8x8_in1'].num_heads == 0
    assert not any(k.endswith('.bias') for k in keys)  # no biases anywhere in EDM2
    assert net.init_kwargs['model_channels'] == 32 and net.unet.init_kwargs['num_blocks'] == 1
    # Fewer channels than channels_per_head: no attention layers at all.
    small = networks_edm2.Block(16, 16, 8, attention=True)
    assert small.num_heads == 0 and small.attn_qkv is None and small.attn_proj is None
    assert not any(hasattr(net, a) for a in ('sigma_min', 'sigma_max', 'round_sigma'))


def test_unconditional_net_ignores_labels():
    net = tiny_net(label_dim=0)
    assert net.unet.emb_label is None
    x, sigma, _ = inputs(label_dim=0)
    with torch.no_grad():
        assert torch.equal(net(x, sigma), net(x, sigma, torch.ones(3, 7)))

# ----------------------------------------------------------------------------------------------------
# MPConv: forced weight normalisation and the eval-mode weight cache.


def test_forced_weight_normalisation_in_training_only():
    conv = MPConv(6, 4, [3, 3])
    with torch.no_grad():
        conv.weight.mul_(3)
    before = conv.weight.detach().clone()
    x = torch.randn(2, 6, 5, 5)
    with torch.no_grad():
        conv.eval()(x)
    assert torch.equal(conv.weight, before)
    conv.train()(x)
    rms = conv.weight.detach().pow(2).mean(dim=[1, 2, 3]).sqrt()
    assert torch.allclose(rms, torch.ones(4), atol=1e-4) and not torch.allclose(conv.weight, before)


def _uncached(net, *args):
    """The forward with grad enabled and weights requiring grad: the cache is bypassed."""
    net.requires_grad_(True)
    with torch.enable_grad():
        out = net(*args).detach()
    net.requires_grad_(False)
    return out


def test_weight_cache_is_exact_and_invalidated():
    net = tiny_net().requires_grad_(False)
    x, sigma, labels = inputs()
    with torch.no_grad():
        first = net(x, sigma, labels)
    convs = [m for m in net.unet.modules() if isinstance(m, MPConv)]  # logvar_linear runs only for return_logvar
    assert all('_weight_cache' in vars(m) for m in convs)
    assert all(k in net.state_dict() for k in [n for n, _ in net.named_parameters()])
    assert not any('cache' in k for k in net.state_dict())
    with torch.no_grad():
        second = net(x, sigma, labels)
    assert torch.equal(first, second)
    assert torch.equal(first, _uncached(net, x, sigma, labels))
    net.requires_grad_(False)

    # A cached weight cannot survive copying or pickling.
    assert not any('_weight_cache' in vars(m) for m in copy.deepcopy(net).modules())
    assert not any('_weight_cache' in vars(m) for m in pickle.loads(pickle.dumps(net)).modules())

    # An optimizer step (in place, bumps weight._version) invalidates every cached weight.
    net.requires_grad_(True)
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    loss = loss_edm2.EDM2Loss()(net, x, labels, rnd=torch.zeros(3), noise=torch.randn_like(x))
    loss.sum().backward()
    opt.step()
    net.requires_grad_(False)
    with torch.no_grad():
        after = net(x, sigma, labels)
    assert not torch.equal(after, first)
    assert torch.equal(after, _uncached(net, x, sigma, labels))

    # So does load_state_dict (copy_ into the parameters).
    other = tiny_net(seed=5)
    net.load_state_dict(other.state_dict())
    with torch.no_grad():
        loaded = net(x, sigma, labels)
    assert torch.equal(loaded, _uncached(other.requires_grad_(False), x, sigma, labels))

    # And forced weight normalisation in training mode.
    with torch.no_grad():
        net.train()(x, sigma, labels)
        net.eval()
        assert torch.equal(net(x, sigma, labels), _uncached(net, x, sigma, labels))


def test_weight_cache_per_dtype_and_gain():
    conv = MPConv(6, 4, [3, 3]).eval().requires_grad_(False)
    x = torch.randn(2, 6, 5, 5)
    gain = torch.tensor(0.3)
    with torch.no_grad():
        ref32 = [conv(x), conv(x, gain=0.5), conv(x, gain=gain)]
        y16 = conv(x.to(torch.bfloat16), gain=gain)
        again = [conv(x), conv(x, gain=0.5), conv(x, gain=gain)]
    assert all(torch.equal(a, b) for a, b in zip(ref32, again))
    assert y16.dtype == torch.bfloat16
    conv.requires_grad_(True)
    assert torch.equal(y16, conv(x.to(torch.bfloat16), gain=gain).detach())
    conv.requires_grad_(False)
    networks_edm2.clear_weight_caches(conv)
    conv.cache_weights = False
    with torch.no_grad():
        assert torch.equal(conv(x), ref32[0]) and '_weight_cache' not in vars(conv)

# ----------------------------------------------------------------------------------------------------
# Compute dtype.


def test_run_time_compute_dtype():
    net = tiny_net()
    x, sigma, labels = inputs()
    seen = []
    net.unet.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    with torch.no_grad():
        ref = net(x, sigma, labels)
        net.set_compute_dtype(torch.bfloat16)
        D_bf16 = net(x, sigma, labels)
        net.set_compute_dtype(torch.float16)
        D_fp16 = net(x, sigma, labels)
        forced = net(x, sigma, labels, force_fp32=True)
        net.set_compute_dtype(None)
    assert seen == [torch.float32, torch.bfloat16, torch.float16, torch.float32]
    assert D_bf16.dtype == D_fp16.dtype == torch.float32
    assert torch.equal(forced, ref)
    # bf16 keeps 8 mantissa bits, fp16 11: both approximate the fp32 result, fp16 the more closely.
    err_bf16, err_fp16 = (D_bf16 - ref).abs().max(), (D_fp16 - ref).abs().max()
    assert 0 < err_fp16 < err_bf16 < 0.05 * ref.abs().max()
    with pytest.raises(ValueError, match='compute dtype'):
        net.set_compute_dtype(torch.float64)

# ----------------------------------------------------------------------------------------------------
# Sampler semantics.


def test_guidance_with_gnet_equal_to_net_is_unguided():
    net = tiny_net()
    x, _, labels = inputs(n=2)
    with torch.no_grad():
        plain = sampling_edm2.edm2_sampler(net, x, labels, num_steps=4)
        guided = sampling_edm2.edm2_sampler(net, x, labels, gnet=net, guidance=1.7, num_steps=4)
        guided_low = sampling_edm2.edm2_sampler(net, x, labels, gnet=net, guidance=0.3, num_steps=4)
    assert torch.equal(plain, guided) and torch.equal(plain, guided_low)

    def never(*args):
        raise AssertionError('gnet must not be called when guidance == 1')

    with torch.no_grad():
        assert torch.equal(sampling_edm2.edm2_sampler(net, x, labels, gnet=never, num_steps=4), plain)
    with pytest.raises(ValueError, match='needs a guiding network'):
        sampling_edm2.edm2_sampler(net, x, labels, guidance=2.0, num_steps=4)
    assert sampling_edm2.nfe_per_image(32) == 63 and sampling_edm2.nfe_per_image(32, guidance=2) == 126


def test_guidance_is_lerp_of_the_two_denoisers():
    calls = []

    def net(x, t, labels):
        calls.append('net')
        return torch.full_like(x, 2.0)

    def gnet(x, t, labels):
        calls.append('gnet')
        return torch.full_like(x, 1.0)

    denoise = sampling_edm2.guided_denoiser(net, gnet, None, 1.5, torch.float32)
    out = denoise(torch.zeros(1, 1, 2, 2), torch.tensor(1.0))
    assert torch.equal(out, torch.full((1, 1, 2, 2), 2.5)) and calls == ['net', 'gnet']


def test_churn_noise_drawn_only_when_active():
    net = tiny_net()
    x, _, labels = inputs(n=2)
    draws = []

    def randn_like(t):
        draws.append(t.dtype)
        return torch.zeros_like(t)

    with torch.no_grad():
        sampling_edm2.edm2_sampler(net, x, labels, num_steps=6, randn_like=randn_like)
        assert draws == []
        t_steps = sampling_edm2.edm2_time_steps(6)
        S_min, S_max = float(t_steps[4]), float(t_steps[1])
        sampling_edm2.edm2_sampler(net, x, labels, num_steps=6, S_churn=10, S_min=S_min, S_max=S_max,
                                   randn_like=randn_like)
    assert draws == [torch.float32] * 4  # t_1 .. t_4 inclusive
    with pytest.raises(ValueError, match='num_steps'):
        sampling_edm2.edm2_time_steps(1)

# ----------------------------------------------------------------------------------------------------
# Loss and encoders.


def test_loss_formula_and_randomness_order():
    net = tiny_net()
    x, _, labels = inputs()
    rnd = torch.tensor([-1.0, 0.0, 1.5])
    noise = torch.randn_like(x)
    loss_fn = loss_edm2.EDM2Loss()
    assert loss_fn.init_kwargs == {} and (loss_fn.P_mean, loss_fn.P_std, loss_fn.sigma_data) == (-0.4, 1.0, 0.5)
    with torch.no_grad():
        loss = loss_fn(net, x, labels, rnd=rnd, noise=noise)
        sigma = (rnd * 1.0 - 0.4).exp().reshape(-1, 1, 1, 1)
        D, logvar = net(x + noise * sigma, sigma, labels, return_logvar=True)
        weight = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
        assert torch.equal(loss, weight / logvar.exp() * (D - x) ** 2 + logvar)
    # Without injection: the sigma draw comes first, then the noise (NVlabs order).
    torch.manual_seed(3)
    with torch.no_grad():
        drawn = loss_fn(net, x, labels)
    torch.manual_seed(3)
    r = torch.randn([3, 1, 1, 1])
    n = torch.randn_like(x)
    with torch.no_grad():
        assert torch.equal(drawn, loss_fn(net, x, labels, rnd=r, noise=n))


def test_encoders():
    rgb = encoders.StandardRGBEncoder()
    pixels = torch.tensor([[[[0, 127, 128, 255]]]], dtype=torch.uint8)
    lat = rgb.encode(pixels)
    assert lat.dtype == torch.float32 and torch.equal(lat, pixels.float() / 127.5 - 1)
    assert torch.equal(rgb.decode(lat), pixels)
    assert torch.equal(rgb.decode(torch.tensor([-2.0, 2.0, 0.999])), torch.tensor([0, 255, 255], dtype=torch.uint8))

    vae = encoders.StabilityVAEEncoder()
    np.testing.assert_array_equal(vae.scale, np.float32(0.5) / np.float32([4.17, 4.62, 3.71, 3.28]))
    raw = torch.randn(2, 8, 4, 4)
    torch.manual_seed(0)
    got = vae.encode_latents(raw)
    torch.manual_seed(0)
    mean, std = raw.chunk(2, dim=1)
    want = (mean + torch.randn_like(mean) * std) * torch.from_numpy(vae.scale).reshape(1, -1, 1, 1) \
        + torch.from_numpy(vae.bias).reshape(1, -1, 1, 1)
    assert torch.equal(got, want) and got.shape == (2, 4, 4, 4)
    with pytest.raises(encoders.VAEUnavailableError, match=r'sd-vae-ft-mse.*local directory'):
        vae.decode(got)
    with pytest.raises(encoders.VAEUnavailableError, match='cannot download'):
        vae.encode_pixels(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def _count_weight_norms(net, *args):
    """linalg.vector_norm calls in the traced graph (weight normalisations plus the activation pixel norms)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(net, backend=backend, fullgraph=True)(*args)
    return sum('vector_norm' in str(n.target) for gm in graphs for n in gm.graph.nodes)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_frozen_weights_are_bit_exact_and_leave_the_graph(dtype):
    """freeze_weights: eager outputs equal the unfrozen net's exactly and compiled ones are as close as compiling
    allows; the compiled graph no longer normalises any MPConv weight; unfreeze restores the per-call normalisation."""
    net = tiny_net(img_channels=3).eval().requires_grad_(False)
    net.set_compute_dtype(dtype)
    x, s, labels = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 3.0]), torch.eye(5)[:2]
    with torch.no_grad():
        want = net(x, s, labels)
    convs = sum(isinstance(m, networks_edm2.MPConv) for m in net.modules()) - 1  # logvar_linear: not called
    before = _count_weight_norms(net, x, s, labels)
    networks_edm2.freeze_weights(net, x, s, labels)
    assert not any(k.endswith('frozen_weight') for k in net.state_dict())
    with torch.no_grad():
        assert torch.equal(net(x, s, labels), want)
    assert _count_weight_norms(net, x, s, labels) == before - convs
    with torch.no_grad():  # compiled: Inductor rounds its own fusions differently; frozen is no further off
        got = torch.compile(net, fullgraph=True)(x, s, labels)
        plain = torch.compile(networks_edm2.unfreeze_weights(copy.deepcopy(net)), fullgraph=True)(x, s, labels)
    err, err_plain = (got - want).abs().max().item(), (plain - want).abs().max().item()
    assert err <= 2 * err_plain + 4 * torch.finfo(dtype).eps * want.abs().max().item(), (err, err_plain)
    networks_edm2.unfreeze_weights(net)
    assert _count_weight_norms(net, x, s, labels) == before


def test_frozen_weights_ignored_in_training():
    net = tiny_net(img_channels=3)
    x, s, labels = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 3.0]), torch.eye(5)[:2]
    networks_edm2.freeze_weights(net.eval(), x, s, labels)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(1.5)  # a change the frozen copies do not see
    ref = networks_edm2.unfreeze_weights(copy.deepcopy(net))
    assert torch.equal(net.train()(x, s, labels), ref.train()(x, s, labels))


@pytest.mark.parametrize('flavor', ['enc', 'dec'])
def test_compiled_block_fuses_the_mp_elementwise_chains(flavor):
    """Pixel norm, mp_silu, the embedding gain, mp_sum and the clip run as a few fused Inductor kernels on the fast
    path (frozen weights, no graph break): at most half as many kernels as the eager block dispatches aten ops
    (torch 2.13 CPU: 7 kernels for 21 ops; unfused, the ~17 non-conv ops would each be one)."""
    from torch._inductor import metrics
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountOps.count += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    block = networks_edm2.Block(64, 64, 32, flavor=flavor).eval().requires_grad_(False)
    x, emb = torch.randn(2, 64, 8, 8), torch.randn(2, 32)
    networks_edm2.freeze_weights(block, x, emb)
    with torch.no_grad(), CountOps():
        want = block(x, emb)
    torch._dynamo.reset()
    metrics.reset()
    with torch.no_grad():
        got = torch.compile(block, fullgraph=True)(x, emb)
    assert 0 < metrics.generated_kernel_count * 2 <= CountOps.count, (metrics.generated_kernel_count, CountOps.count)
    assert (got - want).abs().max() < 1e-4
