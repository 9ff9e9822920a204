"""Command-line options shared by sample.py and fid.py gen, defined once (NVlabs generate.py names and meanings).

Also the loading of the networks those options name, so both commands report the same one-line errors.
"""

import math
import re

import click

from .checkpoint import CheckpointError, load_network, load_snapshot


class Number(click.FloatRange):
    """A float within optional bounds that is not NaN, nor infinite unless allow_inf (click.FloatRange lets 'nan' and
    'inf' through, and they fail later with a traceback)."""

    def __init__(self, *args, allow_inf=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.allow_inf = allow_inf

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if math.isnan(number) or (math.isinf(number) and not self.allow_inf):
            self.fail(f'{value!r} is not a finite number', param, ctx)
        return number


MAX_SEED = (1 << 32) - 1  # a seed is a 32-bit generator seed (NVlabs seeds with seed % 2**32)
MAX_SEEDS = 100_000_000  # per command: FID takes 50,000; far more is a typo, and the list would exhaust memory


def parse_ranges(text):
    """'0-3,10,20-21' -> [(0, 3), (10, 10), (20, 21)]: non-negative integers and inclusive ranges a-b with a <= b;
    None for any other text."""
    parts = []
    for part in str(text).split(','):
        m = re.fullmatch(r'\s*(\d+)\s*(?:-\s*(\d+)\s*)?', part)
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            return None
        parts.append((int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))))
    return parts


def parse_seeds(ctx, param, value):
    """'0-63,100,200-210' -> [0, ..., 63, 100, 200, ..., 210] (ranges inclusive); None stays None."""
    if value is None or isinstance(value, list):
        return value
    parts = parse_ranges(value)
    if parts is None:
        raise click.BadParameter(f'{value!r}: expected a comma-separated list of non-negative integers and '
                                 f'inclusive ranges a-b with a <= b, e.g. 0-63,100,200-210')
    for first, last in parts:
        if last > MAX_SEED:
            raise click.BadParameter(f'{value!r}: seed {last} is above {MAX_SEED}; seeds are 32-bit generator seeds')
    count = sum(last - first + 1 for first, last in parts)
    if count > MAX_SEEDS:
        raise click.BadParameter(f'{value!r}: {count:,} seeds; at most {MAX_SEEDS:,} per command (FID needs 50,000: '
                                 f'0-49999)')
    return [s for first, last in parts for s in range(first, last + 1)]


def parse_device(ctx, param, value):
    """--device: cpu, cuda or cuda:N, checked against this torch (None: cuda if available, else cpu)."""
    import torch
    if value is None:
        return None
    try:
        device = torch.device(value)
    except RuntimeError:
        device = None
    if device is None or device.type not in ('cpu', 'cuda'):
        raise click.BadParameter(f'{value!r}: expected cpu, cuda or cuda:N')
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            build = 'a CPU-only build' if torch.version.cuda is None else f'a CUDA {torch.version.cuda} build'
            raise click.BadParameter(f'{value!r}: no CUDA device is available (torch {torch.__version__} is {build}); '
                                     f'use --device=cpu, or a machine with a GPU and a CUDA build of torch')
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise click.BadParameter(f'{value!r}: this machine has {torch.cuda.device_count()} CUDA device(s)')
    return value


def check_output_file(path, param_hint):
    """Fail before any work when the file `path` could not be written at the end (folders are created)."""
    import os
    if not path:
        return
    if os.path.isdir(path):
        raise click.BadParameter(f'{path!r} is a directory; give a file name', param_hint=param_hint)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        blocker = folder
        while blocker != os.path.dirname(blocker) and not os.path.exists(blocker):
            blocker = os.path.dirname(blocker)
        why = f'{blocker} is a file, not a folder' if os.path.isfile(blocker) else e.strerror
        raise click.BadParameter(f'cannot create the folder of {path!r}: {why}', param_hint=param_hint)
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise click.BadParameter(f'cannot write {path!r}: permission denied', param_hint=param_hint)
    error = write_probe(folder)
    if error:
        raise click.BadParameter(f'cannot write {path!r}: {error}', param_hint=param_hint)


def write_probe(folder):
    """Create and remove a hidden temporary file in `folder` as the final write will (a temporary file renamed into
    place); None when that works, else the reason. Permission bits alone do not tell (root, /proc, read-only
    mounts, full disks)."""
    import os
    import tempfile
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix='.write-test-')
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        return e.strerror or str(e)
    return None


def device_option(help='Device  [default: cuda if available, else cpu]'):
    return click.option('--device', help=help, metavar='cpu|cuda[:N]', callback=parse_device)


BATCH_OPTION = click.option('--batch', 'max_batch_size', help='Maximum batch size', metavar='INT',
                            type=click.IntRange(min=1), default=64)

SAMPLER_OPTIONS = [
    click.option('--class', 'class_idx', help='Class label  [default: random]', metavar='INT', type=click.IntRange(min=0)),
    click.option('--steps', 'num_steps', help='Number of sampling steps  [default: 18 (EDM), 32 (EDM2)]', metavar='INT',
                 type=click.IntRange(min=2, max=100_000)),
    click.option('--sigma_min', help='Lowest noise level  [default: varies]', metavar='FLOAT',
                 type=Number(min=0, min_open=True)),
    click.option('--sigma_max', help='Highest noise level  [default: varies]', metavar='FLOAT',
                 type=Number(min=0, min_open=True)),
    click.option('--rho', help='Time step exponent', metavar='FLOAT', type=Number(min=0, min_open=True), default=7),
    click.option('--S_churn', 'S_churn', help='Stochasticity strength', metavar='FLOAT', type=Number(min=0), default=0),
    click.option('--S_min', 'S_min', help='Stoch. min noise level', metavar='FLOAT', type=Number(min=0), default=0),
    click.option('--S_max', 'S_max', help='Stoch. max noise level', metavar='FLOAT', type=Number(min=0, allow_inf=True), default='inf'),
    click.option('--S_noise', 'S_noise', help='Stoch. noise inflation', metavar='FLOAT', type=Number(), default=1),
    click.option('--solver', help='Ablate ODE solver', metavar='euler|heun', type=click.Choice(['euler', 'heun'])),
    click.option('--disc', 'discretization', help='Ablate time step discretization {t_i}', metavar='vp|ve|iddpm|edm',
                 type=click.Choice(['vp', 've', 'iddpm', 'edm'])),
    click.option('--schedule', help='Ablate noise schedule sigma(t)', metavar='vp|ve|linear',
                 type=click.Choice(['vp', 've', 'linear'])),
    click.option('--scaling', help='Ablate signal scaling s(t)', metavar='vp|none', type=click.Choice(['vp', 'none'])),
]

GUIDANCE_OPTIONS = [
    click.option('--gnet', 'gnet_path', help='EDM2 guiding network: unconditional (CFG) or weaker (autoguidance)',
                 metavar='PATH'),
    click.option('--guidance', help='EDM2 guidance strength (1 = off)  [default: 1]', metavar='FLOAT',
                 type=Number(min=0)),
    click.option('--vae', 'vae_path', help='Local Stable Diffusion VAE (diffusers AutoencoderKL dir) for latent EDM2 nets',
                 metavar='DIR'),
]

FAST_OPTIONS = [
    click.option('--fast/--no-fast', help='Fast path: channels-last, reduced precision, compiled, CUDA graphs  '
                 '[default: on for cuda]', default=None),
    click.option('--dtype', help='Compute dtype of the fast path', type=click.Choice(['fp16', 'bf16', 'fp32']),
                 default='fp16'),
    click.option('--compile/--no-compile', 'compile_net', help='torch.compile the network (fast path)', default=True),
    click.option('--graphs/--no-graphs', help='Capture CUDA graphs per batch shape (fast path)', default=True),
]


def apply(options):
    """Decorator adding click options in the listed order."""
    def decorate(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn
    return decorate


def load_sampling_setup(network_path, gnet_path, vae_path, class_idx, guidance, sampler_kwargs, device, fast, dtype,
                        compile_net, graphs):
    """Load --network (and --gnet), prepare the encoder and the fast path; one-line errors name the flag.

    Returns dict(net, gnet, encoder, denoiser) for generate_images(net, ..., denoiser=, gnet=, encoder=).
    """
    from . import generate
    try:
        snapshot = load_snapshot(network_path)
    except (CheckpointError, OSError) as e:
        raise click.BadParameter(str(e), param_hint="'--network'")
    net = snapshot['ema'].to(device)
    encoder = snapshot.get('encoder')
    if encoder is not None:
        if vae_path is not None and hasattr(encoder, 'vae_name'):
            encoder.vae_name = vae_path
        try:
            encoder.init(device)
        except RuntimeError as e:
            raise click.BadParameter(str(e), param_hint="'--vae'")
    gnet = None
    if gnet_path is not None:
        try:
            gnet = load_network(gnet_path, device=device)
        except (CheckpointError, OSError) as e:
            raise click.BadParameter(str(e), param_hint="'--gnet'")
    try:
        generate.check_class(net, class_idx)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'--class'")
    try:
        generate.sampler_for(net, gnet, guidance, **sampler_kwargs)
    except ValueError as e:
        raise click.UsageError(str(e))
    denoiser = None
    if fast if fast is not None else device.type == 'cuda':
        from .fast import FastDenoiser
        denoiser = FastDenoiser(net, dtype=dtype, compile=compile_net, cuda_graphs=graphs)
        if gnet is not None:
            gnet = FastDenoiser(gnet, dtype=dtype, compile=compile_net, cuda_graphs=graphs)
    return dict(net=net, gnet=gnet, encoder=encoder, denoiser=denoiser)
