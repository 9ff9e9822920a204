"""Named network configurations as plain dicts (spec §1.12-1.13).

`network_kwargs(...)` builds what NVlabs train.py builds from --arch/--precond/--cbase/--cres/--dropout/
--augment/--fp16; `OFFICIAL` holds the resolved constructor kwargs of the released EDM checkpoints (and
two reference layouts), each with its measured parameter count. `build(config)` constructs a network.
"""

import copy

ARCHS = {
    'ddpmpp': dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard',
                   decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1], model_channels=128,
                   channel_mult=[2, 2, 2]),
    'ncsnpp': dict(model_type='SongUNet', embedding_type='fourier', encoder_type='residual',
                   decoder_type='standard', channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128,
                   channel_mult=[2, 2, 2]),
    'adm': dict(model_type='DhariwalUNet', model_channels=192, channel_mult=[1, 2, 3, 4]),
}

# --precond -> (preconditioner class, loss class), as NVlabs train.py pairs them.
PRECONDS = {'vp': ('VPPrecond', 'VPLoss'), 've': ('VEPrecond', 'VELoss'), 'edm': ('EDMPrecond', 'EDMLoss')}


def network_kwargs(arch='ddpmpp', precond='edm', cbase=None, cres=None, dropout=0.13, augment=0.12, fp16=False):
    """Preconditioner kwargs (with 'class_name') exactly as NVlabs train.py assembles them."""
    if arch not in ARCHS:
        raise ValueError(f'unknown --arch {arch!r}; expected one of {sorted(ARCHS)}')
    if precond not in PRECONDS:
        raise ValueError(f'unknown --precond {precond!r}; expected one of {sorted(PRECONDS)}')
    kwargs = copy.deepcopy(ARCHS[arch])
    kwargs['class_name'] = PRECONDS[precond][0]
    if cbase is not None:
        kwargs['model_channels'] = cbase
    if cres is not None:
        kwargs['channel_mult'] = list(cres)
    if augment:
        kwargs['augment_dim'] = 9
    kwargs.update(dropout=dropout, use_fp16=fp16)
    return kwargs


def _official(arch, res, label_dim, dropout, augment=0.12, fp16=False, cres=None, precond='edm', **extra):
    kw = network_kwargs(arch, precond, cres=cres, dropout=dropout, augment=augment, fp16=fp16)
    kw.update(extra)
    kw.update(img_resolution=res, img_channels=3, label_dim=label_dim)
    return kw


# Released EDM checkpoints (README commands, see spec §5.1) plus two reference layouts; 'params' is the
# parameter count measured on the official classes.
OFFICIAL = {
    'edm-cifar10-32x32-cond-vp': (_official('ddpmpp', 32, 10, 0.13), 55_735_299),
    'edm-cifar10-32x32-uncond-vp': (_official('ddpmpp', 32, 0, 0.13), 55_733_891),
    'edm-cifar10-32x32-cond-ve': (_official('ncsnpp', 32, 10, 0.13), 56_400_643),
    'edm-cifar10-32x32-uncond-ve': (_official('ncsnpp', 32, 0, 0.13), 56_397_827),
    'edm-ffhq-64x64-uncond-vp': (_official('ddpmpp', 64, 0, 0.05, 0.15, cres=[1, 2, 2, 2]), 61_805_571),
    'edm-ffhq-64x64-uncond-ve': (_official('ncsnpp', 64, 0, 0.05, 0.15, cres=[1, 2, 2, 2]), 62_761_091),
    'edm-afhqv2-64x64-uncond-vp': (_official('ddpmpp', 64, 0, 0.25, 0.15, cres=[1, 2, 2, 2]), 61_805_571),
    'edm-afhqv2-64x64-uncond-ve': (_official('ncsnpp', 64, 0, 0.25, 0.15, cres=[1, 2, 2, 2]), 62_761_091),
    'edm-imagenet-64x64-cond-adm': (_official('adm', 64, 1000, 0.10, 0, fp16=True), 295_899_267),
    # Reference layouts (not the exact kwargs of the baseline-*.pkl files, which come from their pickles):
    'ref-iddpm-imagenet-64x64-cond-adm': (dict(class_name='iDDPMPrecond', model_type='DhariwalUNet',
                                               img_resolution=64, img_channels=3, label_dim=1000), 295_904_454),
    'ref-vp-cifar10-32x32-uncond-ddpmpp': (_official('ddpmpp', 32, 0, 0.13, 0, precond='vp'), 55_732_739),
    'ref-vp-song-32x32-ddpmpp-1222': (_official('ddpmpp', 32, 0, 0.13, 0, precond='vp', cres=[1, 2, 2, 2]),
                                      61_804_419),
}


def official_config(name):
    """Constructor kwargs (with 'class_name') of an official checkpoint or reference layout."""
    if name not in OFFICIAL:
        raise KeyError(f'unknown preset {name!r}; known: {", ".join(sorted(OFFICIAL))}')
    return copy.deepcopy(OFFICIAL[name][0])


def build(config, **overrides):
    """Construct the network a config dict (with 'class_name') describes."""
    from . import networks
    kwargs = {**copy.deepcopy(config), **overrides}
    name = kwargs.pop('class_name').rsplit('.', 1)[-1]
    if name not in ('VPPrecond', 'VEPrecond', 'iDDPMPrecond', 'EDMPrecond'):
        raise ValueError(f'unknown network class {name!r}')
    return getattr(networks, name)(**kwargs)
