"""Generate images with EDM2 networks under the flags of NVlabs edm2 generate_images.py, run by sample.py.

  python generate_images.py --preset=edm2-img512-s-guid-dino --outdir=out
  python generate_images.py --net=edm2-img64-s-1073741-0.075.pkl --outdir=out --seeds=0-63

--preset picks a network, guiding network and guidance strength by the name NVlabs gives them (edm_fast.pretrained);
the .pkl files must be in --models (nothing is downloaded). --net/--gnet/--guidance override the preset. The seeds
default to 16-19 and the batch to 32, as in NVlabs; every other flag is sample.py's.
"""

import copy

import click

import sample
from edm_fast import pretrained


def _sample_params():
    """sample.py's options, with the EDM2 script's names and defaults."""
    params = []
    for p in sample.main.params:
        p = copy.copy(p)
        if p.name == 'network_path':
            p.opts, p.help = ['--net', '--network'], 'Network pickle filename (or edm_fast snapshot)'
        elif p.name == 'seeds':
            p.default = '16-19'
        elif p.name == 'max_batch_size':
            p.default = 32
        params.append(p)
    return params


def _main(preset, model_dir, **kwargs):
    if preset is not None:
        try:
            found = pretrained.resolve_preset(preset, model_dir)
        except pretrained.PresetError as e:
            raise click.BadParameter(str(e), param_hint="'--preset'")
        for flag, key in (('network_path', 'net'), ('gnet_path', 'gnet'), ('guidance', 'guidance')):
            if kwargs[flag] is None:
                kwargs[flag] = found[key]
    elif kwargs['network_path'] is None:
        raise click.UsageError('Please specify either --preset or --net')
    sample.main.callback(**kwargs)


main = click.Command(
    'generate_images', callback=_main, context_settings=dict(show_default=True), help=__doc__.split('\n\n')[0],
    params=[click.Option(['--preset'], help='Configuration preset', metavar='STR',
                         type=click.Choice(list(pretrained.EDM2_PRESETS))),
            click.Option(['--models', 'model_dir'], help='Folder holding the preset\'s .pkl files', metavar='DIR',
                         default='.')] + _sample_params())

if __name__ == '__main__':
    main()
