"""The EDM2 training loop (spec §10.5): one `training_loop(**config)` function.

NVlabs/edm2 semantics: EDM2Loss with learned uncertainty weighting; Adam (0.9, 0.99, eps 1e-8) with the
inverse-sqrt learning-rate schedule and linear ramp-up, evaluated at the image count before the step;
static loss scaling (never undone); NaN/±inf gradients -> 0 (force_finite); gradient accumulation with DDP
sync on the last round only; every step reseeds torch and numpy with hash((seed, rank, cur_nimg)) so a
step depends only on its position; sizes are counted in images (Ki/Mi/Gi suffixes, see `parse_nimg`);
status lines, network snapshots and training states at multiples of their intervals; power-function EMAs
with one snapshot per std (`network-snapshot-{kimg:07d}-{std:.3f}.safetensors`, fp16 parameters and buffers);
automatic resume from the newest `training-state-{kimg:07d}.pt` in run_dir.

Beyond NVlabs: snapshots and states cannot run code when loaded (states are torch.save'd tensors and plain
values, read with weights_only=True); files are written atomically (temp file + os.replace), so a kill at
any moment leaves the previous files intact; SIGTERM/SIGINT finish the step, write a state and exit.
Because of the per-step reseeding and the sampler restarting at cur_nimg, a resumed run continues
bit-exactly (same world size).

Config keys: run_dir, dataset_kwargs, encoder_kwargs, data_loader_kwargs, network_kwargs, loss_kwargs,
optimizer_kwargs, lr_kwargs, ema_kwargs, seed, batch_size, batch_gpu, total_nimg, slice_nimg, status_nimg,
snapshot_nimg, checkpoint_nimg, loss_scaling, force_finite, cudnn_benchmark, device, precision,
channels_last, compile, backend (see the signature for meanings and defaults).
"""

import contextlib
import copy
import json
import math
import os
import re
import time
import warnings

import numpy as np
import torch

from . import checkpoint, pickle_import, training_state, util
from .training_loop import (StopVote, _rank_world, _report_memory, _short, _StopFlag,
                            check_ddp_consistency, split_batch)
from .training_state import TrainingConfigError
from .training_stats import Collector

STATE_FORMAT = 'edm_fast.training_state_edm2'
STATE_VERSION = 1

# ----------------------------------------------------------------------------------------------------
# Sizes in images.

_SUFFIXES = {'Ki': 1 << 10, 'Mi': 1 << 20, 'Gi': 1 << 30}


def parse_nimg(value, what='size'):
    """An image count: an int, or a string of digits with an optional Ki/Mi/Gi suffix (powers of 2).

    '128Ki' -> 131072, '8Mi' -> 8388608, '2Gi' -> 2147483648, '5000' -> 5000; None stays None.
    `what` names the option in the error message.
    """
    if value is None:
        return None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if value < 0:
            raise TrainingConfigError(f'{what}={value} must not be negative')
        return int(value)
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    m = re.fullmatch(r'\s*(\d+)\s*(Ki|Mi|Gi)?\s*', str(value))
    if m is None:
        raise TrainingConfigError(f'{what}={value!r} is not an image count; use an integer with an optional Ki, Mi '
                                  f'or Gi suffix, e.g. 128Ki, 8Mi or 2Gi')
    return int(m.group(1)) * _SUFFIXES.get(m.group(2), 1)


def format_nimg(nimg):
    """Inverse of parse_nimg for display: 131072 -> '128Ki', 5000 -> '5000'."""
    for suffix, unit in (('Gi', 1 << 30), ('Mi', 1 << 20), ('Ki', 1 << 10)):
        if nimg and nimg % unit == 0:
            return f'{nimg // unit}{suffix}'
    return str(nimg)

# ----------------------------------------------------------------------------------------------------
# Construction from config dicts (allow-listed names; NVlabs dotted names accepted).


def construct(kwargs, **extra):
    """Build the object a config dict with 'class_name' describes (EDM2 classes, Adam, the dataset)."""
    from . import dataset, encoders, loss_edm2, networks_edm2, phema
    registry = {
        'Precond': networks_edm2.Precond, 'EDM2Loss': loss_edm2.EDM2Loss, 'Adam': torch.optim.Adam,
        'ImageFolderDataset': dataset.ImageFolderDataset, **encoders.ENCODER_TYPES, **phema.EMA_TYPES,
    }
    kwargs = dict(kwargs)
    if 'class_name' not in kwargs:
        raise TrainingConfigError(f'training config entry {kwargs!r} has no class_name')
    name = _short(kwargs.pop('class_name'))
    if name not in registry:
        raise TrainingConfigError(f'unknown class_name {name!r} in the EDM2 training config; expected one of '
                                  f'{sorted(registry)}')
    return registry[name](**kwargs, **extra)


def _lr_function(lr_kwargs):
    from . import loss_edm2
    kwargs = dict(lr_kwargs)
    name = _short(kwargs.pop('func_name', 'learning_rate_schedule'))
    if name != 'learning_rate_schedule':
        raise TrainingConfigError(f'unknown lr_kwargs func_name {name!r}; expected learning_rate_schedule')
    return loss_edm2.learning_rate_schedule, kwargs


def set_random_seed(*args):
    """Seed torch (all devices) and numpy with hash(args) mod 2^31 (NVlabs misc.set_random_seed)."""
    seed = hash(args) % (1 << 31)
    torch.manual_seed(seed)
    np.random.seed(seed)


def sanitize_gradients(module):
    """NaN, +inf and -inf gradients -> 0 in place (EDM2; EDM maps ±inf to ±1e5)."""
    for param in module.parameters():
        if param.grad is not None:
            torch.nan_to_num(param.grad, nan=0, posinf=0, neginf=0, out=param.grad)

# ----------------------------------------------------------------------------------------------------
# Training states.


def state_path(run_dir, cur_nimg):
    return os.path.join(run_dir, f'training-state-{cur_nimg // 1000:07d}.pt')


def save_state(run_dir, *, rank, net, optimizer, ema, cur_nimg, total_elapsed_time, batch_size, world, seed,
               network_kwargs):
    """Collective: rank 0 writes the state atomically (tensors and plain values only); returns its path."""
    path = state_path(run_dir, cur_nimg)
    if rank == 0:
        state = dict(format=STATE_FORMAT, version=STATE_VERSION, cur_nimg=int(cur_nimg),
                     total_elapsed_time=float(total_elapsed_time), batch_size=int(batch_size), world=int(world),
                     seed=int(seed), network_kwargs_json=json.dumps(util.to_jsonable(network_kwargs), sort_keys=True),
                     net=training_state._cpu_state_dict(net), optimizer=training_state._to_cpu(optimizer.state_dict()),
                     ema=None if ema is None else training_state._to_cpu(ema.state_dict()))
        util.atomic_write(path, lambda f: torch.save(state, f))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return path


NVLABS_STATE_KEYS = ('state', 'net', 'optimizer', 'ema')  # NVlabs edm2 CheckpointIO (spec §10.5), plus loss_fn


def _from_nvlabs_state(data):
    """An NVlabs edm2 training state (dict of state_dicts; `state` holds cur_nimg and total_elapsed_time) in the
    layout of save_state. Batch size, world size, seed and network options are not in it: None."""
    progress = data['state']
    return dict(format=STATE_FORMAT, version=STATE_VERSION, origin='nvlabs', cur_nimg=int(progress['cur_nimg']),
                total_elapsed_time=float(progress['total_elapsed_time']), batch_size=None, world=None, seed=None,
                network_kwargs_json=None, net=data['net'], optimizer=data['optimizer'], ema=data['ema'])


def _is_nvlabs_state(data):
    return isinstance(data, dict) and 'format' not in data and all(k in data for k in NVLABS_STATE_KEYS) \
        and isinstance(data['state'], dict) and 'cur_nimg' in data['state']


def load_state(path, mmap=False):
    """Read an EDM2 training state: one written by save_state (weights_only: no code runs), or NVlabs edm2's
    `training-state-*.pt` (read through the allow-listed unpickler of pickle_import, which never runs code; its
    EasyDict is what weights_only refuses), returned in save_state's layout with origin='nvlabs'.

    mmap=True maps the tensors instead of reading them (cheap when only the plain values are needed).
    Raises TrainingConfigError for a file that is neither.
    """
    try:
        state = torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
    except Exception as e:
        try:
            state = pickle_import.load_torch_file(path)
        except Exception:
            state = None
        if not _is_nvlabs_state(state):
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TrainingConfigError(f'cannot resume from {path}: it is not an EDM2 training state of edm_fast or '
                                      f'NVlabs ({first}). Move it out of the run directory or start a new one') from e
    if _is_nvlabs_state(state):
        return _from_nvlabs_state(state)
    if not isinstance(state, dict) or state.get('format') != STATE_FORMAT:
        what = f'a {state["format"]!r} file' if isinstance(state, dict) and state.get('format') else \
            f'a dict with keys {", ".join(map(str, state))}' if isinstance(state, dict) else f'a {type(state).__name__}'
        raise TrainingConfigError(f'cannot resume from {path}: it is {what}, not an EDM2 training state of edm_fast '
                                  f'or NVlabs. Move it out of the run directory or start a new one')
    if state.get('version') != STATE_VERSION:
        raise TrainingConfigError(f'cannot resume from {path}: training-state version {state.get("version")}; this '
                                  f'edm_fast reads version {STATE_VERSION}')
    return state


def check_resume(state, path, *, batch_size, network_kwargs, tracks_ema):
    """Raise TrainingConfigError unless the state at `path` can continue a run with these options (tracks_ema:
    whether the run keeps an EMA, i.e. its ema_kwargs are not False)."""
    if state['batch_size'] is not None and state['batch_size'] != batch_size:
        raise TrainingConfigError(
            f'{path} was written with batch_size (--batch) = {state["batch_size"]}, this run uses {batch_size}: the '
            f'schedules and data position would not continue; use --batch={state["batch_size"]} or a new run '
            f'directory')
    saved = json.loads(state['network_kwargs_json']) if state['network_kwargs_json'] is not None else None
    current = util.to_jsonable(network_kwargs)
    if saved is not None and saved != json.loads(json.dumps(current, sort_keys=True)):
        raise TrainingConfigError(
            f'{path} was written for a different network ({training_state.describe_differences(saved, current)}); '
            f'resume with the options the run was started with (its training_options.json lists them) or use a new '
            f'run directory')
    if tracks_ema and state['ema'] is None:
        raise TrainingConfigError(f'{path} holds no EMA, but this run tracks one; resume with the same ema_kwargs or '
                                  f'use a new run directory')


def default_encoder_kwargs(channels):
    """The encoder for a dataset of `channels`-channel images (NVlabs train_edm2.py): pixels (1 or 3 channels)
    or VAE latents (8 channels: mean and std). TrainingConfigError otherwise."""
    if channels in (1, 3):
        return dict(class_name='StandardRGBEncoder')
    if channels == 8:
        return dict(class_name='StabilityVAEEncoder')
    raise TrainingConfigError(f'the dataset has {channels}-channel images; EDM2 trains on RGB (3) or grayscale (1) '
                              f'pixels, or on 8-channel VAE latents (dataset_tool.py encode); convert the dataset or '
                              f'give encoder_kwargs explicitly')


def check_sizes(*, batch_size, batch_gpu, world, total_nimg, slice_nimg=None, status_nimg=None, snapshot_nimg=None,
                checkpoint_nimg=None):
    """Parse and check the image counts of a run (see training_loop); raises TrainingConfigError naming the option.

    Returns dict(batch_size, batch_gpu, num_accumulation_rounds, total_nimg, slice_nimg, status_nimg, snapshot_nimg,
    checkpoint_nimg): counts as ints, 0 or None = disabled for slice/status/snapshot/checkpoint (as NVlabs).
    """
    batch_size = parse_nimg(batch_size, 'batch_size (--batch)')
    batch_gpu = parse_nimg(batch_gpu, 'batch_gpu (--batch-gpu)') or None
    total_nimg = parse_nimg(total_nimg, 'total_nimg (--duration)')
    slice_nimg = parse_nimg(slice_nimg, 'slice_nimg (--slice)') or None
    status_nimg = parse_nimg(status_nimg, 'status_nimg (--status)') or None
    snapshot_nimg = parse_nimg(snapshot_nimg, 'snapshot_nimg (--snapshot)') or None
    checkpoint_nimg = parse_nimg(checkpoint_nimg, 'checkpoint_nimg (--checkpoint)') or None
    batch_gpu, rounds = split_batch(batch_size, batch_gpu, world, 'batch_size (--batch)', 'batch_gpu (--batch-gpu)')
    intervals = (('total_nimg', total_nimg, '--duration', 1), ('slice_nimg', slice_nimg, '--slice', 1),
                 ('status_nimg', status_nimg, '--status', 1), ('snapshot_nimg', snapshot_nimg, '--snapshot', 1024),
                 ('checkpoint_nimg', checkpoint_nimg, '--checkpoint', 1024))
    for name, value, flag, align in intervals:
        if value is None:
            continue
        if value <= 0 or value % batch_size != 0 or value % align != 0:
            need = f'a positive multiple of the batch size ({batch_size})'
            if align > 1:
                need += ' and of 1024 (so the kimg in file names is unique and invertible)'
            unit = math.lcm(batch_size, align)
            hint = f'use a multiple of {format_nimg(unit)} such as {format_nimg(max(value // unit, 1) * unit)}'
            if name not in ('total_nimg', 'slice_nimg'):
                hint += ', or 0 to disable'
            raise TrainingConfigError(f'{name} ({flag}) = {value} must be {need}; {hint}')
    return dict(batch_size=batch_size, batch_gpu=batch_gpu, num_accumulation_rounds=rounds, total_nimg=total_nimg,
                slice_nimg=slice_nimg, status_nimg=status_nimg, snapshot_nimg=snapshot_nimg,
                checkpoint_nimg=checkpoint_nimg)

# ----------------------------------------------------------------------------------------------------


def _snapshot_items(ema, net):
    """[(network, file-name suffix, EMA std or None)]: one per tracked EMA, or the raw net without an EMA."""
    if ema is None:
        return [(net, '', None)]
    got = ema.get()
    if not isinstance(got, list):
        return [(got, '', None)]
    stds = getattr(ema, 'stds', [None] * len(got))
    return [(module, suffix, std) for (module, suffix), std in zip(got, stds)]


def training_loop(
    run_dir='.',                  # Output directory; resumes from its newest training-state-*.pt.
    dataset_kwargs=None,          # Training set: dict(class_name='ImageFolderDataset', path=..., use_labels=...).
    encoder_kwargs=None,          # Encoder (StandardRGBEncoder / StabilityVAEEncoder); None = by channel count.
    data_loader_kwargs=None,      # torch.utils.data.DataLoader options (num_workers, pin_memory, prefetch_factor).
    network_kwargs=None,          # Precond options (model_channels, dropout, use_fp16, ...), class_name 'Precond'.
    loss_kwargs=None,             # EDM2Loss options (P_mean, P_std, sigma_data).
    optimizer_kwargs=None,        # Adam options; default betas=(0.9, 0.99), eps 1e-8.
    lr_kwargs=None,               # learning_rate_schedule options (ref_lr, ref_batches, rampup_Mimg).
    ema_kwargs=None,              # EMA: dict(class_name='PowerFunctionEMA', stds=[...]) (default), or False = none.
    seed=0,                       # Global random seed.
    batch_size=2048,              # Total batch size for one training iteration.
    batch_gpu=None,               # Limit batch size per GPU (gradient accumulation); None = no limit.
    total_nimg=8 << 30,           # Train for a total of this many images (Ki/Mi/Gi strings accepted).
    slice_nimg=None,              # Stop this invocation after at most this many images; None or 0 = no limit.
    status_nimg=128 << 10,        # Status line + stats.jsonl every N images; None or 0 = disable.
    snapshot_nimg=8 << 20,        # Network snapshots every N images; None or 0 = disable.
    checkpoint_nimg=128 << 20,    # Training states every N images; None or 0 = disable.
    loss_scaling=1,               # Loss scaling factor for reducing FP16 under/overflows (never undone).
    force_finite=True,            # Replace NaN/Inf gradients by 0 before the optimizer step.
    cudnn_benchmark=True,         # torch.backends.cudnn.benchmark.
    device=None,                  # torch device; default cuda:current if available, else cpu.
    precision=None,               # None (use_fp16 rule), 'fp32', 'fp16' or 'bf16' compute dtype of the U-Net.
    channels_last=False,          # Feed the network channels-last images.
    compile=False,                # torch.compile the network for training.
    backend=None,                 # edm_fast op backend(s), as EDM_FAST_BACKEND.
):
    """Train an EDM2 network; returns dict(cur_nimg, stopped). See the module docstring."""
    start_time = time.time()
    rank, world = _rank_world()
    device = torch.device(device) if device is not None else (
        torch.device('cuda', torch.cuda.current_device()) if torch.cuda.is_available() else torch.device('cpu'))
    if backend is not None:
        os.environ['EDM_FAST_BACKEND'] = backend
    dataset_kwargs = dict(class_name='ImageFolderDataset', path=None) if dataset_kwargs is None \
        else dict(dataset_kwargs)
    data_loader_kwargs = dict(pin_memory=True, num_workers=2, prefetch_factor=2) if data_loader_kwargs is None \
        else dict(data_loader_kwargs)
    network_kwargs = dict(class_name='Precond') if network_kwargs is None else dict(network_kwargs)
    loss_kwargs = dict(class_name='EDM2Loss') if loss_kwargs is None else dict(loss_kwargs)
    optimizer_kwargs = dict(class_name='Adam', betas=(0.9, 0.99)) if optimizer_kwargs is None \
        else dict(optimizer_kwargs)
    lr_kwargs = dict(func_name='learning_rate_schedule') if lr_kwargs is None else dict(lr_kwargs)
    if ema_kwargs is None:
        ema_kwargs = dict(class_name='PowerFunctionEMA')
    ema_kwargs = dict(ema_kwargs) if ema_kwargs else None

    # Sizes.
    sizes = check_sizes(batch_size=batch_size, batch_gpu=batch_gpu, world=world, total_nimg=total_nimg,
                        slice_nimg=slice_nimg, status_nimg=status_nimg, snapshot_nimg=snapshot_nimg,
                        checkpoint_nimg=checkpoint_nimg)
    batch_size, batch_gpu, num_accumulation_rounds = (sizes['batch_size'], sizes['batch_gpu'],
                                                      sizes['num_accumulation_rounds'])
    total_nimg, slice_nimg, status_nimg = sizes['total_nimg'], sizes['slice_nimg'], sizes['status_nimg']
    snapshot_nimg, checkpoint_nimg = sizes['snapshot_nimg'], sizes['checkpoint_nimg']
    batch_gpu_total = batch_size // world

    set_random_seed(seed, rank)
    torch.backends.cudnn.benchmark = cudnn_benchmark
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False

    # Data and encoder.
    from .dataset import EpochSampler
    if rank == 0:
        print('Loading dataset...')
    dataset_obj = construct(dataset_kwargs)
    ref_image, _ref_label = dataset_obj[0]
    if encoder_kwargs is None:
        encoder_kwargs = default_encoder_kwargs(ref_image.shape[0])
    encoder = construct(encoder_kwargs)
    ref_latent = encoder.encode_latents(torch.as_tensor(np.asarray(ref_image)).to(device).unsqueeze(0))
    interface_kwargs = dict(img_resolution=ref_latent.shape[-1], img_channels=ref_latent.shape[1],
                            label_dim=dataset_obj.label_dim)

    # Network, loss, optimizer.
    if rank == 0:
        print('Constructing network...')
    net = construct(network_kwargs, **interface_kwargs)
    net.train().requires_grad_(True).to(device)
    if precision is not None:
        dtypes = {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}
        if precision not in dtypes:
            raise TrainingConfigError(f'precision={precision!r}; expected None, fp32, fp16 or bf16')
        net.set_compute_dtype(dtypes[precision])
    if rank == 0:
        with torch.no_grad():
            util.print_module_summary(net, [
                torch.zeros([batch_gpu, net.img_channels, net.img_resolution, net.img_resolution], device=device),
                torch.ones([batch_gpu], device=device),
                torch.zeros([batch_gpu, net.label_dim], device=device),
            ], max_nesting=2)

    if rank == 0:
        print('Setting up training state...')
    loss_fn = construct(loss_kwargs)
    optimizer = construct(optimizer_kwargs, params=net.parameters())
    lr_fn, lr_args = _lr_function(lr_kwargs)
    ddp = net
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == 'cuda' else None)
    ema = construct(ema_kwargs, net=net) if ema_kwargs is not None else None
    train_fn = torch.compile(ddp) if compile else ddp

    # Resume from the newest training state in run_dir.
    cur_nimg, total_elapsed_time = 0, 0.0
    resume_path = training_state.latest_state(run_dir)
    if resume_path is not None:
        if rank == 0:
            print(f'Resuming from "{resume_path}"...')
        state = load_state(resume_path)
        check_resume(state, resume_path, batch_size=batch_size, network_kwargs=network_kwargs,
                     tracks_ema=ema_kwargs is not None)
        if state['world'] is not None and state['world'] != world:
            warnings.warn(f'{resume_path} was written by {state["world"]} processes and is resumed by {world}: '
                          f'training continues, but the data split and random streams differ from an '
                          f'uninterrupted run')
        try:
            net.load_state_dict(state['net'], strict=True)
            optimizer.load_state_dict(state['optimizer'])
            if ema is not None:
                ema.load_state_dict(state['ema'])
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TrainingConfigError(f'cannot resume from {resume_path}: its network, optimizer or EMA does not fit '
                                      f'this run ({first}); resume with the options the run was started with or use '
                                      f'a new run directory') from e
        cur_nimg, total_elapsed_time = state['cur_nimg'], state['total_elapsed_time']
        del state
    start_nimg = cur_nimg
    stop_at_nimg = total_nimg
    if slice_nimg is not None:
        granularity = checkpoint_nimg or snapshot_nimg or batch_size
        stop_at_nimg = min(stop_at_nimg, max((cur_nimg + slice_nimg) // granularity * granularity,
                                             cur_nimg + batch_size))
    if rank == 0:
        print(f'Training from {cur_nimg // 1000} kimg to {stop_at_nimg // 1000} kimg ({format_nimg(stop_at_nimg)} '
              f'images):')
        print()

    # Data stream from the current position.
    sampler = EpochSampler(len(dataset_obj), rank=rank, num_replicas=world, seed=seed, start_idx=cur_nimg)
    loader_kwargs = dict(data_loader_kwargs)
    loader_kwargs.pop('class_name', None)
    if loader_kwargs.get('num_workers', 0) == 0:
        loader_kwargs.pop('prefetch_factor', None)
    if device.type != 'cuda':
        loader_kwargs['pin_memory'] = False
    dataset_iterator = iter(torch.utils.data.DataLoader(dataset_obj, sampler=sampler, batch_size=batch_gpu,
                                                        **loader_kwargs))

    # Main loop.
    stats = Collector()
    prev_status_time = time.time()
    prev_status_nimg = cur_nimg
    maintenance_time = prev_status_time - start_time
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    stop_requested = False
    vote = StopVote(device)
    with _StopFlag() as stop:
        while True:
            done = cur_nimg >= stop_at_nimg
            fresh_or_moved = cur_nimg != start_nimg or start_nimg == 0

            # Status line and statistics.
            if status_nimg is not None and (done or cur_nimg % status_nimg == 0) and fresh_or_moved:
                now = time.time()
                sec_per_kimg = (now - prev_status_time) / max(cur_nimg - prev_status_nimg, 1) * 1e3
                fields = [f'kimg {cur_nimg / 1e3:<9.1f}', f'time {util.format_time(total_elapsed_time):<12s}',
                          f'sec/tick {now - prev_status_time:<7.1f}', f'sec/kimg {sec_per_kimg:<7.2f}',
                          f'maintenance {maintenance_time:<6.1f}']
                stats.report0('Progress/kimg', cur_nimg / 1e3, rank)
                stats.report0('Timing/total_sec', total_elapsed_time, rank)
                stats.report0('Timing/sec_per_kimg', sec_per_kimg, rank)
                stats.report0('Timing/maintenance_sec', maintenance_time, rank)
                fields += _report_memory(stats, device, rank)
                if rank == 0:
                    print(' '.join(fields), flush=True)
                collected = stats.collect(device=device)
                if rank == 0:
                    line = {name: value['mean'] for name, value in collected.items()}
                    line['timestamp'] = time.time()
                    with open(os.path.join(run_dir, 'stats.jsonl'), 'at') as f:
                        f.write(json.dumps(line) + '\n')
                prev_status_time, prev_status_nimg = time.time(), cur_nimg
                maintenance_time = 0.0

            # Network snapshots, one per EMA.
            if snapshot_nimg is not None and cur_nimg % snapshot_nimg == 0 and fresh_or_moved:
                t0 = time.time()
                if rank == 0:
                    for ema_net, suffix, std in _snapshot_items(ema, net):
                        path = os.path.join(run_dir, f'network-snapshot-{cur_nimg // 1000:07d}{suffix}.safetensors')
                        checkpoint.save_snapshot(path, ema_net, loss_fn=loss_fn, encoder=encoder,
                                                 dataset_kwargs=dataset_kwargs, dtype=torch.float16,
                                                 extra=dict(kimg=cur_nimg / 1000, cur_nimg=cur_nimg, ema_std=std))
                maintenance_time += time.time() - t0

            # Training state.
            if (checkpoint_nimg is not None and (done or cur_nimg % checkpoint_nimg == 0) and cur_nimg != start_nimg) \
                    or (stop_requested and cur_nimg != start_nimg):
                t0 = time.time()
                save_state(run_dir, rank=rank, net=net, optimizer=optimizer, ema=ema, cur_nimg=cur_nimg,
                           total_elapsed_time=total_elapsed_time, batch_size=batch_size, world=world, seed=seed,
                           network_kwargs=network_kwargs)
                check_ddp_consistency(net)
                maintenance_time += time.time() - t0

            if done or stop_requested:
                break

            # Evaluate the loss and accumulate gradients.
            batch_start_time = time.time()
            set_random_seed(seed, rank, cur_nimg)
            optimizer.zero_grad(set_to_none=True)
            for round_idx in range(num_accumulation_rounds):
                sync = round_idx == num_accumulation_rounds - 1 or not hasattr(ddp, 'no_sync')
                with (contextlib.nullcontext() if sync else ddp.no_sync()):
                    images, labels = next(dataset_iterator)
                    images = encoder.encode_latents(images.to(device))
                    if channels_last:
                        images = images.contiguous(memory_format=torch.channels_last)
                    loss = loss_fn(net=train_fn, images=images, labels=labels.to(device))
                    stats.report('Loss/loss', loss)
                    loss.sum().mul(loss_scaling / batch_gpu_total).backward()

            # Update the weights.
            lr = lr_fn(cur_nimg=cur_nimg, batch_size=batch_size, **lr_args)
            stats.report('Loss/learning_rate', lr)
            for g in optimizer.param_groups:
                g['lr'] = lr
            if force_finite:
                sanitize_gradients(net)
            optimizer.step()

            # Update the EMA and the counters.
            cur_nimg += batch_size
            if ema is not None:
                ema.update(cur_nimg=cur_nimg, batch_size=batch_size)
            total_elapsed_time += time.time() - batch_start_time
            stop_requested = vote.poll(stop.requested) and cur_nimg < stop_at_nimg

    if rank == 0:
        print()
        print('Stopped at the request; run again with the same run directory to resume.' if stop_requested
              else 'Exiting...')
    return dict(cur_nimg=cur_nimg, stopped=stop_requested)


def default_config(**overrides):
    """The NVlabs train_edm2.py command-line defaults as training_loop keys (sizes in images)."""
    config = dict(
        dataset_kwargs=dict(class_name='ImageFolderDataset', path=None, use_labels=True),
        encoder_kwargs=None,
        data_loader_kwargs=dict(pin_memory=True, num_workers=2, prefetch_factor=2),
        network_kwargs=dict(class_name='Precond', use_fp16=True),
        loss_kwargs=dict(class_name='EDM2Loss'),
        optimizer_kwargs=dict(class_name='Adam', betas=(0.9, 0.99)),
        lr_kwargs=dict(func_name='learning_rate_schedule'),
        ema_kwargs=dict(class_name='PowerFunctionEMA'),
        seed=0, batch_size=2048, batch_gpu=None, loss_scaling=1, status_nimg=128 << 10, snapshot_nimg=8 << 20,
        checkpoint_nimg=128 << 20,
    )
    config.update(copy.deepcopy(overrides))
    return config
