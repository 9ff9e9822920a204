"""Named EDM2 configurations as plain dicts (spec §10.4-10.5, NVlabs train_edm2.py presets).

Each preset has
* `network`: the Precond kwargs that train_edm2.py passes (class_name, model_channels, dropout, use_fp16);
  the data decide img_resolution / img_channels / label_dim at training time;
* `interface`: the data shape the preset was made for (used by `build` and the parameter counts);
* `training`: duration and batch in images, ref_lr (`lr`), ref_batches (`decay`), dropout, P_mean, P_std;
* `params`: the parameter count (label_dim as in `interface`; the spec's measured counts for img512/img64).

Families:
* `edm2-img512-{xxs,xs,s,m,l,xl,xxl}`: ImageNet-512 in the 64x64x4 latent space of the SD VAE, 1000 classes.
* `edm2-img64-{xs,s,m,l,xl}`: ImageNet-64 in pixel space (64x64x3), 1000 classes.
* `edm2-img32-{xxs,xs,s}` (edm_fast's own, for CIFAR-scale work; not an NVlabs preset): 32x32x3, 10 classes,
  channel_mult [1,2,2,2] (levels 32, 16, 8, 4) and attention at 16x16 and 8x8, so XS (128 channels, 50.7M
  parameters) is about the size of EDM's DDPM++ CIFAR-10 net (55.7M). Training values are untuned starting
  points: batch 512, 256Mi images (EDM trained CIFAR-10 for 200 Mimg), the img512 learning rates by width,
  ref_batches 35000 (decay from ~7% of training on, as the img64 presets), the pixel-space P_mean/P_std of
  img64 and EDM's CIFAR-10 dropout 0.13.

`training_config(name)` returns the matching `edm_fast.training_loop_edm2.training_loop` keys.
"""

import copy

import torch

Ki, Mi, Gi = 1 << 10, 1 << 20, 1 << 30

_IMG512 = dict(img_resolution=64, img_channels=4, label_dim=1000)
_IMG64 = dict(img_resolution=64, img_channels=3, label_dim=1000)
_IMG32 = dict(img_resolution=32, img_channels=3, label_dim=10)


def _preset(interface, duration, batch, channels, lr, decay, dropout, P_mean, P_std, params, **arch):
    return dict(
        network=dict(class_name='Precond', model_channels=channels, dropout=dropout, use_fp16=True, **arch),
        interface=dict(interface),
        training=dict(duration=duration, batch=batch, lr=lr, decay=decay, dropout=dropout, P_mean=P_mean, P_std=P_std),
        params=params,
    )


_CIFAR_ARCH = dict(channel_mult=[1, 2, 2, 2], attn_resolutions=[16, 8])

PRESETS = {
    'edm2-img512-xxs': _preset(_IMG512, 2048 * Mi, 2048, 64, 0.0170, 70000, 0.00, -0.4, 1.0, 31_309_029),
    'edm2-img512-xs': _preset(_IMG512, 2048 * Mi, 2048, 128, 0.0120, 70000, 0.00, -0.4, 1.0, 124_713_253),
    'edm2-img512-s': _preset(_IMG512, 2048 * Mi, 2048, 192, 0.0100, 70000, 0.00, -0.4, 1.0, 280_212_837),
    'edm2-img512-m': _preset(_IMG512, 2048 * Mi, 2048, 256, 0.0090, 70000, 0.10, -0.4, 1.0, 497_807_781),
    'edm2-img512-l': _preset(_IMG512, 1792 * Mi, 2048, 320, 0.0080, 70000, 0.10, -0.4, 1.0, 777_498_085),
    'edm2-img512-xl': _preset(_IMG512, 1280 * Mi, 2048, 384, 0.0070, 70000, 0.10, -0.4, 1.0, 1_119_283_749),
    'edm2-img512-xxl': _preset(_IMG512, 896 * Mi, 2048, 448, 0.0065, 70000, 0.10, -0.4, 1.0, 1_523_164_773),
    'edm2-img64-xs': _preset(_IMG64, 1024 * Mi, 2048, 128, 0.0120, 35000, 0.00, -0.8, 1.6, 124_710_949),
    'edm2-img64-s': _preset(_IMG64, 1024 * Mi, 2048, 192, 0.0100, 35000, 0.00, -0.8, 1.6, 280_209_381),
    'edm2-img64-m': _preset(_IMG64, 2048 * Mi, 2048, 256, 0.0090, 35000, 0.10, -0.8, 1.6, 497_803_173),
    'edm2-img64-l': _preset(_IMG64, 1024 * Mi, 2048, 320, 0.0080, 35000, 0.10, -0.8, 1.6, 777_492_325),
    'edm2-img64-xl': _preset(_IMG64, 640 * Mi, 2048, 384, 0.0070, 35000, 0.10, -0.8, 1.6, 1_119_276_837),
    'edm2-img32-xxs': _preset(_IMG32, 256 * Mi, 512, 64, 0.0170, 35000, 0.13, -0.8, 1.6, 12_678_501, **_CIFAR_ARCH),
    'edm2-img32-xs': _preset(_IMG32, 256 * Mi, 512, 128, 0.0120, 35000, 0.13, -0.8, 1.6, 50_702_885, **_CIFAR_ARCH),
    'edm2-img32-s': _preset(_IMG32, 256 * Mi, 512, 192, 0.0100, 35000, 0.13, -0.8, 1.6, 114_073_317, **_CIFAR_ARCH),
}


def get(name):
    """A deep copy of the preset `name` (see the module docstring for its fields)."""
    if name not in PRESETS:
        raise KeyError(f'unknown EDM2 preset {name!r}; known: {", ".join(PRESETS)}')
    return copy.deepcopy(PRESETS[name])


def network_kwargs(name, **overrides):
    """Precond kwargs with 'class_name' (no img_resolution/img_channels/label_dim: the dataset sets those)."""
    return {**get(name)['network'], **overrides}


def build(name, device=None, **overrides):
    """Construct the preset's network for its own data shape (override e.g. label_dim=0 or use_fp16=False).

    Use device='meta' to count parameters without allocating them.
    """
    from .networks_edm2 import Precond
    p = get(name)
    kwargs = {**p['network'], **p['interface'], **overrides}
    kwargs.pop('class_name')
    if device is None:
        return Precond(**kwargs)
    with torch.device(device):
        return Precond(**kwargs)


def training_config(name, **overrides):
    """`training_loop_edm2.training_loop` keys for the preset (dataset, run_dir etc. still to be added).

    network_kwargs, loss_kwargs (EDM2Loss P_mean/P_std), lr_kwargs (learning_rate_schedule ref_lr/ref_batches),
    total_nimg and batch_size, as NVlabs train_edm2.py derives them from a preset.
    """
    p = get(name)
    t = p['training']
    config = dict(
        network_kwargs=dict(p['network']),
        loss_kwargs=dict(class_name='EDM2Loss', P_mean=t['P_mean'], P_std=t['P_std']),
        lr_kwargs=dict(func_name='learning_rate_schedule', ref_lr=t['lr'], ref_batches=t['decay']),
        total_nimg=t['duration'],
        batch_size=t['batch'],
    )
    config.update(overrides)
    return config
