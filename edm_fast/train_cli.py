"""train.py's command line: every option of NVlabs train.py (and train_edm2.py with --preset), plus a performance
group; train.py at the top level runs `main`.

  torchrun --standalone --nproc_per_node=8 train.py --outdir=training-runs --data=datasets/cifar10-32x32.zip \\
      --cond=1 --arch=ddpmpp

It builds the config dict (written as training_options.json), checks it, and calls
edm_fast.training_loop.training_loop(**config) (EDM2: edm_fast.training_loop_edm2). Snapshots are edm_fast files
(sample.py --network reads them); --resume takes an edm_fast training state or run directory (continuing it in
place, bit-exactly) or an NVlabs training-state-*.pt; --transfer takes an NVlabs pickle or an edm_fast snapshot.

Mistakes a user can make (options that do not fit together or do not fit the data, a missing or foreign
--transfer/--resume file, a dataset whose images differ in size, an --outdir that is a file) are found before
anything is written, on every rank alike, and end in a one-line error that names the fix; a dry run (-n) finds
all but the image-size scan. The project's own error types raised later, during training, end the same way.
"""

import contextlib
import json
import os
import re

import click
import torch

from . import cli_options, distributed, presets, training_state, util
from .checkpoint import CheckpointError
from .dataset import DatasetError
from .encoders import VAEUnavailableError
from .training_loop import training_loop
from .training_loop_edm2 import parse_nimg
from .training_state import TrainingConfigError
from .util import one_line

# The project's errors for mistakes a user can cause: each message names the problem and the fix, so the CLI shows it
# as a one-line error instead of a traceback. Anything else (a bug) keeps its traceback.
USER_ERRORS = (DatasetError, CheckpointError, TrainingConfigError, VAEUnavailableError)


@contextlib.contextmanager
def all_ranks_agree(world):
    """Setup block after which every rank goes on or every rank fails, with the same message.

    A user error on any rank becomes a ClickException on all of them, so no rank is left waiting in a collective
    for one that quit. A bug keeps its traceback on the rank that hit it; the others report it in one line.
    """
    error = None
    try:
        yield
    except USER_ERRORS as e:
        error = click.ClickException(one_line(e))
    except click.ClickException as e:
        error = e
    except Exception as e:
        error = e
    if world > 1 and torch.distributed.is_initialized():
        mine = None if error is None else error.format_message() if isinstance(error, click.ClickException) \
            else f'{type(error).__name__}: {one_line(error)}'
        messages = [None] * world
        torch.distributed.all_gather_object(messages, mine)
        if error is None:
            failed = [r for r, m in enumerate(messages) if m is not None]
            if failed:
                error = click.ClickException(f'{messages[failed[0]]} (reported by rank {failed[0]})')
    if error is not None:
        raise error


def shutdown(ok):
    """End torch.distributed: with a barrier after success; without one after a failure, since the other ranks may
    be inside a collective that will never complete (torchrun then stops them)."""
    if ok:
        distributed.shutdown()
    elif torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def launch(loop, c, perf, device, rank, write_options):
    """Rank 0 creates the run directory, writes training_options.json (if write_options) and tees the output to
    log.txt; every rank runs loop(**c, **perf, device=device). A user error that ends training is recorded in
    log.txt (click prints it after the log is closed)."""
    logger = None
    try:
        if rank == 0:
            os.makedirs(c['run_dir'], exist_ok=True)
            if write_options:
                with open(os.path.join(c['run_dir'], 'training_options.json'), 'wt') as f:
                    json.dump(dict(c, edm_fast_performance=perf), f, indent=2, default=str)
            logger = util.Logger(os.path.join(c['run_dir'], 'log.txt'), file_mode='a')
        try:
            loop(**c, **perf, device=device)
        except USER_ERRORS as e:
            if logger is not None:
                logger.file.write(f'Error: {one_line(e)}\n')
                logger.file.flush()
            raise
    finally:
        if logger is not None:
            logger.close()


def check_outdir(path, flag='--outdir'):
    """Refuse, before anything is written, an output directory that is a file or cannot be created or written."""
    target = os.path.abspath(path)
    if os.path.exists(target) and not os.path.isdir(target):
        raise click.ClickException(f'{flag}={path} is a file, not a directory; choose another {flag} or move the file')
    parent = target
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise click.ClickException(f'{flag}={path} cannot be created: {parent} is a file, not a directory; choose '
                                   f'another {flag}')
    error = cli_options.write_probe(parent)
    if error:
        raise click.ClickException(f'{flag}={path} cannot be written: {error} in {parent}; choose another {flag}')


class ImageCount(click.ParamType):
    """An integer with an optional Ki/Mi/Gi suffix (powers of two), as NVlabs train_edm2.py: 512, 2Ki, 8Mi."""
    name = 'nimg'

    def __init__(self, min=0):
        self.min = min

    def convert(self, value, param, ctx):
        try:
            n = parse_nimg(value, f'--{param.name.replace("_", "-")}' if param is not None else 'value')
        except ValueError as e:
            self.fail(str(e), param, ctx)
        if n < self.min:
            self.fail(f'{value!r} is below the minimum {self.min}', param, ctx)
        return n


def parse_int_list(ctx, param, value):
    """'1,2,2,2' or '1-3,4' -> list of positive ints (None stays None): the channel multiplier per resolution."""
    if value is None or isinstance(value, list):
        return value
    parts = cli_options.parse_ranges(value)
    if parts is None:
        raise click.BadParameter(f'{value!r}: expected comma-separated integers or ranges a-b')
    count = sum(b - a + 1 for a, b in parts)  # checked before the list is built: '0-99999999999' is one range
    out = [v for a, b in parts for v in range(a, b + 1)] if count <= 16 else []
    if not out or min(out) < 1:
        raise click.BadParameter(f'{value!r}: expected 1 to 16 channel multipliers, each at least 1 (one per '
                                 f'resolution, e.g. 2,2,2)')
    return out


@click.command(context_settings=dict(show_default=True))
# Main options.
@click.option('--outdir', help='Where to save the results', metavar='DIR', type=str, required=True)
@click.option('--data', help='Path to the dataset', metavar='ZIP|DIR', type=str, required=True)
@click.option('--cond', help='Train class-conditional model  [default: False; EDM2: True]', metavar='BOOL', type=bool)
@click.option('--arch', help='Network architecture', type=click.Choice(['ddpmpp', 'ncsnpp', 'adm']), default='ddpmpp')
@click.option('--precond', help='Preconditioning & loss function', type=click.Choice(['vp', 've', 'edm']), default='edm')
# Hyperparameters.
@click.option('--duration', help='Training duration: Mimg (EDM, default 200) or images with Ki/Mi/Gi (EDM2)', metavar='MIMG|NIMG')
@click.option('--batch', help='Total batch size  [default: 512; EDM2: preset]', metavar='NIMG', type=ImageCount(min=1),
              default=512, show_default=False)
@click.option('--batch-gpu', help='Limit batch size per GPU, 0 = no limit', metavar='NIMG', type=ImageCount(min=0))
@click.option('--cbase', help='Channel multiplier  [default: varies]', metavar='INT', type=click.IntRange(min=1))
@click.option('--cres', help='Channels per resolution  [default: varies]', metavar='LIST', callback=parse_int_list)
@click.option('--lr', help='Learning rate (EDM2: ref_lr)  [default: 1e-3; EDM2: preset]', metavar='FLOAT',
              type=cli_options.Number(min=0, min_open=True))
@click.option('--ema', help='EMA half-life', metavar='MIMG', type=cli_options.Number(min=0), default=0.5)
@click.option('--dropout', help='Dropout probability  [default: 0.13; EDM2: preset]', metavar='FLOAT',
              type=cli_options.Number(min=0, max=1))
@click.option('--augment', help='Augment probability', metavar='FLOAT', type=cli_options.Number(min=0, max=1), default=0.12)
@click.option('--xflip', help='Enable dataset x-flips', metavar='BOOL', type=bool, default=False)
# Performance-related (NVlabs).
@click.option('--fp16', help='Enable mixed-precision training  [default: False; EDM2: True]', metavar='BOOL', type=bool)
@click.option('--ls', help='Loss scaling', metavar='FLOAT', type=cli_options.Number(min=0, min_open=True), default=1)
@click.option('--bench', help='Enable cuDNN benchmarking', metavar='BOOL', type=bool, default=True)
@click.option('--cache', help='Cache dataset in CPU memory  [default: True; EDM2: False]', metavar='BOOL', type=bool)
@click.option('--workers', help='DataLoader worker processes  [default: 1; EDM2: 2]', metavar='INT',
              type=click.IntRange(min=0))
# I/O-related.
@click.option('--desc', help='String to include in result dir name', metavar='STR', type=str)
@click.option('--nosubdir', help='Do not create a subdirectory for results', is_flag=True)
@click.option('--tick', help='How often to print progress', metavar='KIMG', type=cli_options.Number(min=0, min_open=True), default=50)
@click.option('--snap', help='How often to save snapshots', metavar='TICKS', type=click.IntRange(min=1), default=50)
@click.option('--dump', help='How often to dump state', metavar='TICKS', type=click.IntRange(min=1), default=500)
@click.option('--seed', help='Random seed  [default: random]', metavar='INT', type=click.IntRange(0, (1 << 31) - 1))
@click.option('--transfer', help='Transfer learning from network pickle or snapshot', metavar='PKL', type=str)
@click.option('--resume', help='Resume from a training state or a run directory', metavar='PT|DIR', type=str)
@click.option('-n', '--dry-run', help='Print training options and exit', is_flag=True)
# edm_fast performance options.
@click.option('--bf16', help='Run the network in bfloat16 (parameters stay fp32)', metavar='BOOL', type=bool, default=False)
@click.option('--channels-last', 'channels_last', help='Channels-last memory format', metavar='BOOL', type=bool, default=False)
@click.option('--compile', 'compile_net', help='torch.compile the network', metavar='BOOL', type=bool, default=False)
@click.option('--backend', help='edm_fast op backends, as EDM_FAST_BACKEND (e.g. cuda or group_norm=triton)', metavar='STR')
@cli_options.device_option()
# EDM2 (NVlabs train_edm2.py option names).
@click.option('--preset', help='EDM2 configuration preset (selects the EDM2 network, loss and loop)', type=str)
@click.option('--channels', help='EDM2 channel multiplier  [default: preset]', metavar='INT', type=click.IntRange(min=64))
@click.option('--P_mean', 'P_mean', help='EDM2 noise level mean  [default: preset]', metavar='FLOAT', type=float)
@click.option('--P_std', 'P_std', help='EDM2 noise level standard deviation  [default: preset]', metavar='FLOAT',
              type=cli_options.Number(min=0, min_open=True))
@click.option('--decay', help='EDM2 learning-rate decay (ref_batches)  [default: preset]', metavar='BATCHES',
              type=cli_options.Number(min=0))
@click.option('--status', help='EDM2 interval of status prints, 0 = none', metavar='NIMG', type=ImageCount(),
              default='128Ki')
@click.option('--snapshot', help='EDM2 interval of network snapshots, 0 = none', metavar='NIMG', type=ImageCount(),
              default='8Mi')
@click.option('--checkpoint', help='EDM2 interval of training checkpoints, 0 = none', metavar='NIMG', type=ImageCount(),
              default='128Mi')
@click.option('--lr-rampup', 'lr_rampup', help='Learning-rate ramp-up (NVlabs fixes it at 10000)', metavar='KIMG',
              type=cli_options.Number(min=0), default=10000)
@click.pass_context
def main(ctx, **opts):
    """Train diffusion-based generative model using the techniques described in the paper
    "Elucidating the Design Space of Diffusion-Based Generative Models" (EDM), or with --preset an EDM2 model
    ("Analyzing and Improving the Training Dynamics of Diffusion Models")."""
    explicit = {name for name in opts if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}
    try:
        if opts['preset'] is not None:
            return run_edm2(dict(opts), explicit)
        return run_edm(opts, explicit)
    except USER_ERRORS as e:  # raised during training, after the checks made at setup
        raise click.ClickException(one_line(e)) from None


def run_edm(opts, explicit):
    for name, default in (('cond', False), ('lr', 10e-4), ('dropout', 0.13), ('fp16', False), ('cache', True),
                          ('workers', 1)):
        if opts[name] is None:
            opts[name] = default
    edm2_only = sorted(n for n in ('channels', 'P_mean', 'P_std', 'decay', 'status', 'snapshot', 'checkpoint')
                       if n in explicit)
    if edm2_only:
        raise click.UsageError(f'--{edm2_only[0]} is an EDM2 option: it needs --preset')
    try:
        opts['duration'] = 200.0 if opts['duration'] is None else float(opts['duration'])
        assert 0 < opts['duration'] < 1e9
    except (ValueError, AssertionError):
        raise click.BadParameter(f'{opts["duration"]!r}: expected a positive, finite number of Mimg',
                                 param_hint="'--duration'")
    return run(dict(opts))


def run_edm2(opts, explicit):
    """EDM2 training (NVlabs train_edm2.py semantics): --outdir is the run directory and resumes automatically."""
    from . import presets_edm2, training_loop_edm2
    edm_only = sorted(n for n in ('arch', 'precond', 'cbase', 'cres', 'ema', 'augment', 'xflip', 'tick', 'snap', 'dump',
                                  'transfer', 'resume', 'nosubdir', 'desc', 'lr_rampup') if n in explicit)
    if edm_only:
        hint = ('; an EDM2 run resumes by itself when rerun with its --outdir' if edm_only[0] == 'resume' else '')
        raise click.UsageError(f'--{edm_only[0].replace("_", "-")} is an EDM option; EDM2 (--preset) does not use it'
                               f'{hint}')
    if opts['preset'] not in presets_edm2.PRESETS:
        raise click.BadParameter(f'{opts["preset"]!r}: expected one of {", ".join(sorted(presets_edm2.PRESETS))}',
                                 param_hint="'--preset'")
    try:
        overrides = {}
        if opts['duration'] is not None:
            overrides['total_nimg'] = parse_nimg(opts['duration'], '--duration')
        c = training_loop_edm2.default_config(**presets_edm2.training_config(opts['preset'], **overrides))
    except ValueError as e:
        raise click.UsageError(str(e))
    # 0 disables status lines, snapshots or checkpoints (NVlabs: `opts.get('snapshot', 0) or None`).
    c['status_nimg'] = opts['status'] or None
    c['snapshot_nimg'] = opts['snapshot'] or None
    c['checkpoint_nimg'] = opts['checkpoint'] or None
    c['run_dir'] = opts['outdir']
    # --cache keeps decoded images in memory (EDM's meaning); off unless given, as NVlabs EDM2 never caches (the
    # ImageNet latents would not fit once per DataLoader worker).
    c['dataset_kwargs'].update(path=opts['data'], use_labels=True if opts['cond'] is None else opts['cond'],
                               cache=bool(opts['cache']))
    if opts['workers'] is not None:
        c['data_loader_kwargs']['num_workers'] = opts['workers']
    net = c['network_kwargs']
    net['use_fp16'] = True if opts['fp16'] is None else opts['fp16']
    if opts['channels'] is not None:
        net['model_channels'] = opts['channels']
    if opts['dropout'] is not None:
        net['dropout'] = opts['dropout']
    if opts['P_mean'] is not None:
        c['loss_kwargs']['P_mean'] = opts['P_mean']
    if opts['P_std'] is not None:
        c['loss_kwargs']['P_std'] = opts['P_std']
    if opts['lr'] is not None:
        c['lr_kwargs']['ref_lr'] = opts['lr']
    if opts['decay'] is not None:
        c['lr_kwargs']['ref_batches'] = opts['decay']
    c.update(batch_size=opts['batch'] if 'batch' in explicit else c['batch_size'], batch_gpu=opts['batch_gpu'] or None,
             loss_scaling=opts['ls'], cudnn_benchmark=opts['bench'], seed=0 if opts['seed'] is None else opts['seed'])
    perf = dict(precision='bf16' if opts['bf16'] else None, channels_last=opts['channels_last'],
                compile=opts['compile_net'], backend=opts['backend'])
    device_type = opts['device'] or ('cuda' if torch.cuda.is_available() else 'cpu')
    rank, world, device = distributed.init_from_env(device_type)
    ok = False
    try:
        with all_ranks_agree(world):
            setup_edm2(c, rank, world, scan_images=not opts['dry_run'])
        if rank == 0:
            print('Training options (EDM2):')
            print(json.dumps(dict(c, edm_fast_performance=perf), indent=2, default=str))
            print(f'Output directory: {c["run_dir"]} (resumes from its newest training state)')
        if opts['dry_run']:
            if rank == 0:
                print('Dry run; exiting.')
            ok = True
            return
        launch(training_loop_edm2.training_loop, c, perf, device, rank, write_options=True)
        ok = True
    finally:
        shutdown(ok)


def setup_edm2(c, rank, world, scan_images=True):
    """Check an EDM2 config against the world size, the data and the run directory before anything is written, and
    fill in encoder_kwargs from the dataset (NVlabs train_edm2.py opens the dataset at setup too)."""
    from . import training_loop_edm2
    from .dataset import ImageFolderDataset
    check_outdir(c['run_dir'])
    sizes = training_loop_edm2.check_sizes(
        batch_size=c['batch_size'], batch_gpu=c['batch_gpu'], world=world, total_nimg=c['total_nimg'],
        status_nimg=c['status_nimg'], snapshot_nimg=c['snapshot_nimg'], checkpoint_nimg=c['checkpoint_nimg'])
    data = {k: v for k, v in c['dataset_kwargs'].items() if k != 'class_name'}
    dataset_obj = None
    try:
        dataset_obj = ImageFolderDataset(**data)
        if data.get('use_labels') and not dataset_obj.has_labels:
            raise DatasetError(f'{data["path"]}: --cond=True, but the dataset has no labels; train with --cond=False '
                               f'or label the images with dataset_tool.py')
        c['encoder_kwargs'] = training_loop_edm2.default_encoder_kwargs(dataset_obj.num_channels)
        if rank == 0 and scan_images:
            dataset_obj.check_shapes()
    except (DatasetError, TrainingConfigError) as e:
        raise click.ClickException(f'--data: {one_line(e)}') from None
    finally:
        if dataset_obj is not None:
            dataset_obj.close()

    # Automatic resume: the newest state in the run directory must fit this run.
    state_path = training_state.latest_state(c['run_dir']) if os.path.isdir(c['run_dir']) else None
    if state_path is not None:
        state = training_loop_edm2.load_state(state_path, mmap=True)
        training_loop_edm2.check_resume(state, state_path, batch_size=sizes['batch_size'],
                                        network_kwargs=c['network_kwargs'],
                                        tracks_ema=c.get('ema_kwargs') is None or bool(c['ema_kwargs']))
        del state


def build_config(opts, world):
    """Assemble the training_loop kwargs (spec §5.2) from parsed options; opens the dataset once.

    Returns (config, performance options, dataset name, dataset object).
    """
    from .dataset import ImageFolderDataset
    if opts['transfer'] is not None and opts['resume'] is not None:
        raise click.UsageError('--transfer and --resume cannot be specified at the same time')
    if opts['bf16'] and opts['fp16']:
        raise click.UsageError('--fp16 and --bf16 are mutually exclusive')
    c = {}
    c['dataset_kwargs'] = dict(class_name='edm_fast.dataset.ImageFolderDataset', path=opts['data'], use_labels=opts['cond'],
                               xflip=opts['xflip'], cache=opts['cache'])
    c['data_loader_kwargs'] = dict(pin_memory=True, num_workers=opts['workers'], prefetch_factor=2)
    net = presets.network_kwargs(opts['arch'], opts['precond'], cbase=opts['cbase'], cres=opts['cres'],
                                 dropout=opts['dropout'], augment=opts['augment'], fp16=opts['fp16'])
    net['class_name'] = 'edm_fast.networks.' + net['class_name']
    c['network_kwargs'] = net
    c['loss_kwargs'] = dict(class_name='edm_fast.loss.' + presets.PRECONDS[opts['precond']][1])
    c['optimizer_kwargs'] = dict(class_name='torch.optim.Adam', lr=opts['lr'], betas=[0.9, 0.999], eps=1e-8)
    if opts['augment']:
        c['augment_kwargs'] = dict(class_name='edm_fast.augment.AugmentPipe', p=opts['augment'], xflip=1e8, yflip=1,
                                   scale=1, rotate_frac=1, aniso=1, translate_frac=1)

    try:
        dataset_obj = ImageFolderDataset(**{k: v for k, v in c['dataset_kwargs'].items() if k != 'class_name'})
    except (OSError, ValueError) as e:
        raise click.BadParameter(str(e), param_hint="'--data'")
    c['dataset_kwargs']['resolution'] = dataset_obj.resolution
    c['dataset_kwargs']['max_size'] = len(dataset_obj)
    if opts['cond'] and not dataset_obj.has_labels:
        raise click.BadParameter('--cond=True requires labels specified in dataset.json', param_hint="'--cond'")

    c['total_kimg'] = max(int(opts['duration'] * 1000), 1)
    c['ema_halflife_kimg'] = int(opts['ema'] * 1000)
    c.update(batch_size=opts['batch'], batch_gpu=opts['batch_gpu'] or None, loss_scaling=opts['ls'],
             cudnn_benchmark=opts['bench'])
    c.update(kimg_per_tick=opts['tick'], snapshot_ticks=opts['snap'], state_dump_ticks=opts['dump'])
    if opts['lr_rampup'] != 10000:
        c['lr_rampup_kimg'] = opts['lr_rampup']
    perf = dict(precision='bf16' if opts['bf16'] else None, channels_last=opts['channels_last'],
                compile=opts['compile_net'], backend=opts['backend'])
    return c, perf, dataset_obj.name, dataset_obj


def meta_network(c, dataset_obj):
    """The configured network on the meta device (shapes only, no memory), for checking weights to be loaded."""
    from .training_loop import construct
    with torch.device('meta'):
        return construct(c['network_kwargs'], img_resolution=dataset_obj.resolution,
                         img_channels=dataset_obj.num_channels, label_dim=dataset_obj.label_dim)


def _load(flag, loader, path):
    """loader(path) with a CheckpointError reported against the option that named the file."""
    try:
        return loader(path)
    except CheckpointError as e:
        raise click.ClickException(f'{flag}: {one_line(e)}') from None


def setup_edm(opts, rank, world):
    """Build the EDM config and check it (world size, --resume/--transfer files, output directory, the data) before
    anything is written. Returns (config without seed, performance options, continue_dir or None, dtype name)."""
    from . import checkpoint
    from .training_loop import split_batch
    c, perf, dataset_name, dataset_obj = build_config(opts, world)
    split_batch(c['batch_size'], c['batch_gpu'], world)

    # Resume or transfer: the files must exist, load safely (no code runs) and fit the configured network.
    continue_dir = None
    if opts['resume'] is not None:
        resume = opts['resume']
        if os.path.isdir(resume):
            found = training_state.latest_state(resume)
            if found is None:
                raise click.BadParameter(f'no training-state-*.pt in {resume!r}', param_hint="'--resume'")
            resume = found
        try:
            kind, state = training_state.probe(resume)
        except (OSError, ValueError) as e:
            raise click.BadParameter(str(e), param_hint="'--resume'")
        fix = 'resume with the options the run was started with (its training_options.json lists them)'
        if kind == 'edm_fast':
            if opts['seed'] is not None and opts['seed'] != state['seed']:
                raise click.BadParameter(f'the run being resumed used --seed={state["seed"]}', param_hint="'--seed'")
            opts['seed'] = state['seed']
            training_state.check_compatible(state, batch_size=c['batch_size'], world=world,
                                            network_kwargs=c['network_kwargs'], path=resume, warn=False)
            training_state.check_source_fits(state['net'], meta_network(c, dataset_obj).state_dict(),
                                             require_all=True, what=f'--resume={resume}',
                                             fix=f'{fix} and the same --data')
            if state['cur_nimg'] >= c['total_kimg'] * 1000:
                raise click.ClickException(
                    f'--resume={resume} is at {state["cur_nimg"] / 1000:.3f} kimg, already at or past --duration='
                    f'{opts["duration"]:g} Mimg ({c["total_kimg"]} kimg): nothing to train, and continuing would '
                    f'overwrite its files; raise --duration to train further')
            continue_dir = os.path.dirname(os.path.abspath(resume))
            c['resume_state_dump'] = resume
        else:
            m = re.fullmatch(r'training-state-(\d+)\.pt', os.path.basename(resume))
            if not m:
                raise click.BadParameter('an NVlabs state must be named training-state-<kimg>.pt', param_hint="'--resume'")
            pkl = os.path.join(os.path.dirname(resume), f'network-snapshot-{m.group(1)}.pkl')
            if not os.path.isfile(pkl):
                raise click.ClickException(
                    f'--resume={resume}: an NVlabs training state is resumed together with the network snapshot of '
                    f'the same kimg, but {pkl} does not exist; put that snapshot beside the state (NVlabs writes it '
                    f'when --dump is a multiple of --snap) or resume from a state that has one')
            c['resume_pkl'] = pkl
            c['resume_kimg'] = int(m.group(1))
            c['resume_state_dump'] = resume
            if rank == 0:  # loading is the costly part; all_ranks_agree shares a failure with the other ranks
                target = meta_network(c, dataset_obj)
                source = _load('--resume', checkpoint.load_snapshot, pkl)['ema']
                training_state.check_source_fits(source, target, what=f'the snapshot {pkl}', fix=fix)
                del source
                nv = _load('--resume', checkpoint.load_training_state, resume)
                training_state.check_source_fits(nv['net'], target, require_all=True, what=f'--resume={resume}',
                                                 fix=fix)
                saved = sum(len(g.get('params', [])) for g in nv['optimizer_state'].get('param_groups', []))
                if saved != len(list(target.parameters())):
                    raise TrainingConfigError(f'--resume={resume}: its optimizer state holds {saved} parameters, this '
                                              f'run\'s network has {len(list(target.parameters()))}; {fix}')
                del nv
        del state
    elif opts['transfer'] is not None:
        c['resume_pkl'] = opts['transfer']
        c['ema_rampup_ratio'] = None
        if rank == 0:
            source = _load('--transfer', checkpoint.load_snapshot, opts['transfer'])['ema']
            training_state.check_source_fits(
                source, meta_network(c, dataset_obj), what=f'--transfer={opts["transfer"]}',
                fix='transfer from a network of the same architecture (--arch, --precond, --cbase, --cres) and data '
                    'shape')
            del source

    # Run directory.
    cond_str = 'cond' if c['dataset_kwargs']['use_labels'] else 'uncond'
    dtype_str = 'fp16' if c['network_kwargs']['use_fp16'] else 'bf16' if perf['precision'] == 'bf16' else 'fp32'
    desc = f'{dataset_name}-{cond_str}-{opts["arch"]}-{opts["precond"]}-gpus{world}-batch{c["batch_size"]}-{dtype_str}'
    if opts['desc'] is not None:
        desc += f'-{opts["desc"]}'
    if continue_dir is not None:
        c['run_dir'] = continue_dir
    else:
        check_outdir(opts['outdir'])
        if opts['nosubdir']:
            c['run_dir'] = opts['outdir']
            held = sorted(f for f in (os.listdir(c['run_dir']) if os.path.isdir(c['run_dir']) else [])
                          if re.fullmatch(r'(training-state|network-snapshot)-\d+\.(pt|pkl|safetensors)', f))
            if held:
                raise click.ClickException(f'--outdir={opts["outdir"]} already holds a run ({held[-1]}), which '
                                           f'--nosubdir would overwrite; continue it with --resume={opts["outdir"]}, '
                                           f'or choose another --outdir')
        else:
            # The id counts run directories only (spec §5.2): files in --outdir do not take a number.
            outdir = opts['outdir']
            prev = [x for x in os.listdir(outdir) if os.path.isdir(os.path.join(outdir, x))] \
                if os.path.isdir(outdir) else []
            ids = [int(m.group()) for m in (re.match(r'^\d+', x) for x in prev) if m is not None]
            c['run_dir'] = os.path.join(outdir, f'{max(ids, default=-1) + 1:05d}-{desc}')
            if os.path.exists(c['run_dir']):
                raise click.ClickException(f'run directory {c["run_dir"]} already exists')

    # Every image must have the size of the first (header reads only; skipped by a dry run).
    if rank == 0 and not opts['dry_run']:
        try:
            dataset_obj.check_shapes()
        except DatasetError as e:
            raise click.ClickException(f'--data: {one_line(e)}') from None
    dataset_obj.close()
    return c, perf, continue_dir, dtype_str


def run(opts):
    device_type = opts['device'] or ('cuda' if torch.cuda.is_available() else 'cpu')
    rank, world, device = distributed.init_from_env(device_type)
    ok = False
    try:
        with all_ranks_agree(world):
            c, perf, continue_dir, dtype_str = setup_edm(opts, rank, world)

        # Seed: given, taken from the state being resumed, or random (drawn on rank 0 and broadcast).
        if opts['seed'] is None:
            seed = torch.randint(1 << 31, size=[], device=device)
            if torch.distributed.is_initialized():
                torch.distributed.broadcast(seed, src=0)
            opts['seed'] = int(seed)
        # The spec's key order (§5.2): seed, then the resume/transfer keys, then run_dir.
        tail = {k: c.pop(k) for k in ('resume_pkl', 'ema_rampup_ratio', 'resume_kimg', 'resume_state_dump', 'run_dir')
                if k in c}
        c['seed'] = int(opts['seed'])
        c.update(tail)

        if rank == 0:
            print()
            print('Training options:')
            print(json.dumps(dict(c, **{'edm_fast_performance': perf}), indent=2))
            print()
            print(f'Output directory:        {c["run_dir"]}' + ('  (continuing in place)' if continue_dir else ''))
            print(f'Dataset path:            {c["dataset_kwargs"]["path"]}')
            print(f'Class-conditional:       {c["dataset_kwargs"]["use_labels"]}')
            print(f'Network architecture:    {opts["arch"]}')
            print(f'Preconditioning & loss:  {opts["precond"]}')
            print(f'Number of processes:     {world} ({device.type})')
            print(f'Batch size:              {c["batch_size"]}')
            print(f'Mixed-precision:         {dtype_str}')
            print()
        if opts['dry_run']:
            if rank == 0:
                print('Dry run; exiting.')
            ok = True
            return 0

        if rank == 0:
            print('Creating output directory...')
        launch(training_loop, c, perf, device, rank, write_options=continue_dir is None)
        ok = True
    finally:
        shutdown(ok)
    return 0
