"""Shared pieces of the model-level benchmarks: the benchmarked networks and the providers that run them.

Providers (each is what one column of the report means):
  reference           NVlabs as it runs: fp32, NCHW, eager, TF32 off, reference ops
  reference-fp16      NVlabs fp16 mode (use_fp16: U-Net body in fp16, NCHW, eager) - how ADM is trained
  reference-compiled  the reference under torch.compile (fp32, NCHW)
  fast-fp16 / fast-bf16  edm_fast: channels-last, reduced precision, fused ops (auto backends), torch.compile

  nvlabs              the official code itself, from a local checkout given with --nvlabs-dir (the same class
                      built from the same kwargs, our weights loaded strictly): fp32 NCHW eager, fp16 for ADM

EDM2 models (names starting 'edm2-'): 'reference' is NVlabs edm2 as it runs, i.e. with the preset's use_fp16
(fp16 U-Net body on CUDA), NCHW, eager, every MPConv weight renormalised per call (no eval-mode cache);
'reference-fp16' is then the same thing and is skipped. The fast providers also precompute the normalised
weights (networks_edm2.freeze_weights) for inference, as FastDenoiser does.
"""

import contextlib
import copy
import importlib
import os
import sys

import torch

from edm_fast import presets, presets_edm2
from edm_fast.networks_edm2 import MPConv

# Where the model benchmarks run; EDM_FAST_BENCH_DEVICE=cpu (with the 'tiny' model) smoke-tests them without a GPU.
DEVICE = os.environ.get('EDM_FAST_BENCH_DEVICE', 'cuda')

MODELS = {
    'tiny': 'edm-cifar10-32x32-cond-vp',  # shrunk in build(): 32 channels at 16x16, for smoke tests
    'ddpmpp-cifar10': 'edm-cifar10-32x32-cond-vp',
    'ncsnpp-cifar10': 'edm-cifar10-32x32-cond-ve',
    'ddpmpp-64': 'edm-ffhq-64x64-uncond-vp',
    'adm-imagenet64': 'edm-imagenet-64x64-cond-adm',
    'edm2-tiny': 'edm2-img64-xs',  # shrunk in build(): 32 channels at 16x16, for smoke tests
    'edm2-img64-s': 'edm2-img64-s',
}
# Paper NFE of each preset's sampler settings (spec §4.5) and its sampler kwargs.
SAMPLING = {
    'ddpmpp-cifar10': dict(num_steps=18),
    'ncsnpp-cifar10': dict(num_steps=18),
    'ddpmpp-64': dict(num_steps=40),
    'adm-imagenet64': dict(num_steps=256, S_churn=40, S_min=0.05, S_max=50, S_noise=1.003),
    'tiny': dict(num_steps=18),
    'edm2-img64-s': dict(num_steps=32),  # EDM2's default: 32 Heun steps, NFE 63
    'edm2-tiny': dict(num_steps=32),
}


def is_edm2(model):
    return model.startswith('edm2-')
PROVIDERS = ('reference', 'reference-fp16', 'reference-compiled', 'fast-fp16', 'fast-bf16')


def build(model, device=None, seed=0):
    """The preset network with random weights (official init zeroes some paths; those get small noise)."""
    torch.manual_seed(seed)
    if is_edm2(model):
        overrides = dict(model_channels=32, channel_mult=[1, 2], img_resolution=16, label_dim=10, num_blocks=1,
                         attn_resolutions=[8]) if model == 'edm2-tiny' else {}
        net = presets_edm2.build(MODELS[model], **overrides).to(device or DEVICE)
    else:
        overrides = dict(model_channels=32, channel_mult=[1, 2], img_resolution=16) if model == 'tiny' else {}
        net = presets.build(presets.official_config(MODELS[model]), **overrides).to(device or DEVICE)
    with torch.no_grad():
        for p in net.parameters():
            if p.abs().max() < 1e-4:
                p.normal_(0, 0.02)
    return net


@contextlib.contextmanager
def backend_env(value):
    old = os.environ.get('EDM_FAST_BACKEND')
    if value is None:
        os.environ.pop('EDM_FAST_BACKEND', None)
    else:
        os.environ['EDM_FAST_BACKEND'] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop('EDM_FAST_BACKEND', None)
        else:
            os.environ['EDM_FAST_BACKEND'] = old


def configure(net, provider, nvlabs_dirs=()):
    """A copy of `net` set up as `provider` runs it; returns (module, callable, backend env value)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if provider == 'nvlabs':
        official = nvlabs_network(net, nvlabs_dirs)
        if 'DhariwalUNet' in str(net.init_kwargs.get('model_type')):
            official.use_fp16 = True  # NVlabs trains and samples ADM in fp16
        return official, official, 'reference'
    net = copy.deepcopy(net)
    for m in net.modules():
        if isinstance(m, MPConv):  # NVlabs edm2 renormalises every weight per call
            m.cache_weights = provider.startswith('fast')
    if provider == 'reference':
        return net, net, 'reference'
    if provider == 'reference-fp16':
        net.set_compute_dtype(torch.float16)
        return net, net, 'reference'
    if provider == 'reference-compiled':
        return net, torch.compile(net), 'reference'
    if provider in ('fast-fp16', 'fast-bf16'):
        net.set_compute_dtype(torch.float16 if provider == 'fast-fp16' else torch.bfloat16)
        net.to(memory_format=torch.channels_last)
        return net, torch.compile(net, fullgraph=True, dynamic=False), None
    raise ValueError(f'unknown provider {provider!r}; expected one of {PROVIDERS}')


# Top-level packages of the NVlabs edm / edm2 checkouts, dropped from sys.modules when switching checkouts.
_NVLABS_PACKAGES = ('training', 'torch_utils', 'dnnlib')


def nvlabs_network(net, nvlabs_dirs):
    """`net` rebuilt by the official code of a local NVlabs checkout: edm (training/networks.py) for EDM models,
    edm2 (training/networks_edm2.py) for EDM2 ones, the first of `nvlabs_dirs` that has the file. The class of the
    same name gets the same constructor kwargs, and our state dict loads with strict=True (the names are the
    same). This imports and runs the checkout's code, which the user asked for by naming it."""
    edm2 = type(net).__module__.endswith('networks_edm2')
    rel = os.path.join('training', 'networks_edm2.py' if edm2 else 'networks.py')
    found = [d for d in nvlabs_dirs if os.path.isfile(os.path.join(d, rel))]
    if not found:
        raise FileNotFoundError(f'--nvlabs-dir: none of {list(nvlabs_dirs)} has {rel} '
                                f'(give a checkout of github.com/NVlabs/{"edm2" if edm2 else "edm"})')
    root = os.path.abspath(found[0])
    for name in list(sys.modules):
        if name.split('.')[0] in _NVLABS_PACKAGES:
            del sys.modules[name]
    sys.path.insert(0, root)
    try:
        module = importlib.import_module('training.networks_edm2' if edm2 else 'training.networks')
    finally:
        sys.path.remove(root)
    official = getattr(module, type(net).__name__)(**copy.deepcopy(net.init_kwargs))
    official.load_state_dict(net.state_dict(), strict=True)
    return official.train(net.training).to(next(net.parameters()).device)


def inputs(net, batch, device=None, channels_last=False, seed=1):
    device = device or DEVICE
    g = torch.Generator(device).manual_seed(seed)
    x = torch.randn([batch, net.img_channels, net.img_resolution, net.img_resolution], device=device, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    sigma = (torch.randn([batch], device=device, generator=g) * 1.2 - 1.2).exp()
    labels = torch.eye(net.label_dim, device=device)[torch.arange(batch, device=device) % net.label_dim] \
        if net.label_dim else None
    return x, sigma, labels


def count_flops(net, device=None, train=False):
    """Model FLOPs per image (forward, or forward+backward), counted by torch's FlopCounterMode at batch 2."""
    from torch.utils.flop_counter import FlopCounterMode
    net = copy.deepcopy(net).train(train)
    x, sigma, labels = inputs(net, 2, device)
    counter = FlopCounterMode(display=False)
    with counter:
        if train:
            net(x, sigma, labels).square().sum().backward()
        else:
            with torch.no_grad():
                net(x, sigma, labels)
    return counter.get_total_flops() / 2
