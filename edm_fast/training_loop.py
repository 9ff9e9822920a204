"""The EDM training loop (spec §5): one `training_loop(**config)` function, called by train.py.

NVlabs semantics: global batch split over ranks with gradient accumulation (DDP sync on the last round
only), Adam with a linear learning-rate ramp (lr = 0 on the very first step), static loss scaling never
undone, NaN -> 0 / ±inf -> ±1e5 gradients, EMA of the parameters with half-life and ramp-up, ticks with a
status line, stats.jsonl, snapshots every `snapshot_ticks` (tick 0 included) and state dumps every
`state_dump_ticks`. Beyond NVlabs: snapshots are edm_fast files that cannot run code; a state dump holds
everything needed to continue bit-exactly (network, EMA, optimizer, every rank's RNG, the data position,
tick counters); files are written atomically; SIGTERM/SIGINT write a final state on all ranks and exit.
"""

import contextlib
import copy
import json
import os
import resource
import signal
import time

import numpy as np
import torch

from . import checkpoint, training_state, util
from .training_state import TrainingConfigError
from .training_stats import Collector

# ----------------------------------------------------------------------------------------------------
# Construction of the configured objects (names resolved from an allow-list, never imported freely).


def _short(class_name):
    return str(class_name).rsplit('.', 1)[-1]


def construct(kwargs, **extra):
    """Build the object a config dict with 'class_name' describes (edm_fast classes and torch.optim.Adam)."""
    from . import augment, dataset, loss, networks
    registry = {
        'EDMPrecond': networks.EDMPrecond, 'VPPrecond': networks.VPPrecond, 'VEPrecond': networks.VEPrecond,
        'iDDPMPrecond': networks.iDDPMPrecond, 'Adam': torch.optim.Adam, 'AugmentPipe': augment.AugmentPipe,
        'ImageFolderDataset': dataset.ImageFolderDataset, **loss.LOSS_TYPES,
    }
    kwargs = dict(kwargs)
    name = _short(kwargs.pop('class_name'))
    if name not in registry:
        raise TrainingConfigError(f'unknown class_name {name!r} in the training config; expected one of '
                                  f'{sorted(registry)}')
    return registry[name](**kwargs, **extra)


def _named(label, value):
    return f'{label}={value}' if label.startswith('--') else f'{label} = {value}'


def split_batch(batch_size, batch_gpu, world, batch_label='--batch', batch_gpu_label='--batch-gpu'):
    """(batch_gpu, accumulation rounds) for a total batch over `world` processes (NVlabs arithmetic, spec §5.3).

    batch_gpu None (or 0) or above batch_size / world means no limit. Raises TrainingConfigError, naming the
    options by the labels given, when the batch does not split into equal full rounds on every process.
    """
    def multiples(unit):
        lower, upper = batch_size // unit * unit, (batch_size // unit + 1) * unit
        return f'{lower} or {upper}' if lower > 0 else f'{upper}'

    batch_gpu_total = batch_size // world
    if batch_size % world != 0 or batch_gpu_total == 0:
        raise TrainingConfigError(f'{_named(batch_label, batch_size)} must be a multiple of the number of processes '
                                  f'({world}); use e.g. {multiples(world)}')
    if not batch_gpu or batch_gpu > batch_gpu_total:
        batch_gpu = batch_gpu_total
    rounds = batch_gpu_total // batch_gpu
    if batch_size != batch_gpu * rounds * world:
        flag = batch_gpu_label.split('(')[-1].rstrip(')')
        raise TrainingConfigError(
            f'{_named(batch_label, batch_size)} is {batch_gpu_total} images per process ({world} process(es)), which '
            f'{_named(batch_gpu_label, batch_gpu)} does not split into whole accumulation rounds; use a total batch '
            f'that is a multiple of {batch_gpu * world} (e.g. {multiples(batch_gpu * world)}) or a {flag} that '
            f'divides {batch_gpu_total}')
    return batch_gpu, rounds


# ----------------------------------------------------------------------------------------------------
# Distributed helpers.


def _rank_world():
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class StopVote:
    """Every rank agrees on the step at which a stop request (SIGTERM/SIGINT on any rank) takes effect.

    The vote cast after step k is read after step k + 1: the all-reduce and its copy to the host are queued
    behind step k's kernels, and by the time step k + 1 is queued they are done or nearly so, so the host
    never drains the GPU's queue to learn the answer (a blocking read every step would idle the GPU while the
    host prepares the next step). A stop therefore lands one step after the request, on every rank alike.
    """

    def __init__(self, device):
        self.device = device
        self._pending = None  # (host tensor, CUDA event or None) of the previous vote
        self._host = None  # pinned landing place of the vote, reused: the previous copy is waited for first

    def poll(self, requested):
        if not torch.distributed.is_initialized():
            return bool(requested)
        result = False
        if self._pending is not None:
            host, event = self._pending
            if event is not None:
                event.synchronize()
            result = bool(host.item())
        on_gpu = torch.distributed.get_backend() == 'nccl'
        # torch.full, not torch.tensor: a host-to-device copy of a Python list blocks until the stream drains
        vote = torch.full((1,), float(requested), dtype=torch.float32, device=self.device if on_gpu else 'cpu')
        torch.distributed.all_reduce(vote, op=torch.distributed.ReduceOp.MAX, async_op=True).wait()
        event = None
        if on_gpu:  # wait() only made the stream wait; copy behind it without blocking the host
            if self._host is None:
                self._host = torch.empty(1, dtype=torch.float32, pin_memory=True)
            self._host.copy_(vote, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            vote = self._host
        self._pending = (vote, event)
        return result


def check_ddp_consistency(module):
    """Every rank must hold the same parameters and buffers (NaNs compared as equal)."""
    if not torch.distributed.is_initialized():
        return
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        t = tensor.detach().nan_to_num()
        other = t.clone()
        torch.distributed.broadcast(other, src=0)
        if not torch.equal(t, other):
            raise RuntimeError(f'DDP consistency check failed: {name} differs between rank 0 and rank '
                               f'{torch.distributed.get_rank()}')


def _cpu_mem_gb():
    try:
        with open('/proc/self/statm') as f:
            return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2 ** 30
    except (OSError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def _report_memory(stats, device, rank):
    """Report CPU and peak GPU memory to `stats` (rank 0 keeps them), reset the GPU peak; the status-line fields
    (cpumem, then gpumem and reserved on CUDA), each the value recorded, read once as NVlabs does."""
    cpumem = _cpu_mem_gb()
    stats.report0('Resources/cpu_mem_gb', cpumem, rank)
    if device.type != 'cuda':
        return [f'cpumem {cpumem:<6.2f}']
    gpumem = torch.cuda.max_memory_allocated(device) / 2 ** 30
    reserved = torch.cuda.max_memory_reserved(device) / 2 ** 30
    stats.report0('Resources/peak_gpu_mem_gb', gpumem, rank)
    stats.report0('Resources/peak_gpu_mem_reserved_gb', reserved, rank)
    torch.cuda.reset_peak_memory_stats(device)
    return [f'cpumem {cpumem:<6.2f}', f'gpumem {gpumem:<6.2f}', f'reserved {reserved:<6.2f}']

# ----------------------------------------------------------------------------------------------------
# One optimisation step, in parts that tests can check against their closed forms.


def learning_rate(cur_nimg, lr, lr_rampup_kimg):
    """Linear ramp over lr_rampup_kimg, evaluated at the image count before the step (0 on the first step)."""
    return lr * min(cur_nimg / max(lr_rampup_kimg * 1000, 1e-8), 1)


def ema_beta(cur_nimg, batch_size, ema_halflife_kimg, ema_rampup_ratio):
    """0.5 ** (batch / half-life), the half-life capped at cur_nimg * rampup (so beta = 0 on the first step)."""
    ema_halflife_nimg = ema_halflife_kimg * 1000
    if ema_rampup_ratio is not None:
        ema_halflife_nimg = min(ema_halflife_nimg, cur_nimg * ema_rampup_ratio)
    return 0.5 ** (batch_size / max(ema_halflife_nimg, 1e-8))


@torch.no_grad()
def update_ema(ema, net, beta):
    """p_ema <- p_net + beta (p_ema - p_net) for parameters only (buffers keep their copied values)."""
    for p_ema, p_net in zip(ema.parameters(), net.parameters()):
        p_ema.copy_(p_net.detach().lerp(p_ema, beta))


def sanitize_gradients(module):
    """NaN -> 0, +inf -> 1e5, -inf -> -1e5 in place (NVlabs EDM)."""
    for param in module.parameters():
        if param.grad is not None:
            torch.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5, out=param.grad)


def accumulate_gradients(ddp, loss_fn, batches, loss_scaling, batch_gpu_total, augment_pipe=None, stats=None,
                         prepare=None):
    """Backward of sum(loss) * loss_scaling / batch_gpu_total over the accumulation rounds, with DDP gradient
    sync on the last round only. `batches` yields (images uint8 [b,C,H,W], labels); returns nothing."""
    rounds = list(batches)
    for round_idx, (images, labels) in enumerate(rounds):
        sync = round_idx == len(rounds) - 1 or not hasattr(ddp, 'no_sync')
        with (contextlib.nullcontext() if sync else ddp.no_sync()):
            images, labels = prepare(images, labels) if prepare is not None else (images, labels)
            loss = loss_fn(net=ddp, images=images, labels=labels, augment_pipe=augment_pipe)
            if stats is not None:
                stats.report('Loss/loss', loss)
            loss.sum().mul(loss_scaling / batch_gpu_total).backward()

# ----------------------------------------------------------------------------------------------------
# Stop requests (SIGTERM/SIGINT): finish the step, write a state on all ranks, exit cleanly.


class _StopFlag:
    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second signal: give up immediately
            raise KeyboardInterrupt
        self.requested = True
        print(f'\nReceived {signal.Signals(signum).name}: finishing the current step and writing a training state '
              f'(a second signal quits at once, without saving)...', flush=True)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

# ----------------------------------------------------------------------------------------------------


def training_loop(
    run_dir='.',                  # Output directory.
    dataset_kwargs={},            # Options of the training set (class_name ImageFolderDataset).
    data_loader_kwargs={},        # Options of torch.utils.data.DataLoader.
    network_kwargs={},            # Options of the preconditioned network (class_name EDMPrecond, ...).
    loss_kwargs={},               # Options of the loss (class_name EDMLoss, ...).
    optimizer_kwargs={},          # Options of the optimizer (class_name torch.optim.Adam).
    augment_kwargs=None,          # Options of the augmentation pipe, None = disable.
    seed=0,                       # Global random seed.
    batch_size=512,               # Total batch size for one training iteration.
    batch_gpu=None,               # Limit batch size per GPU, None = no limit.
    total_kimg=200000,            # Training duration, measured in thousands of training images.
    ema_halflife_kimg=500,        # Half-life of the exponential moving average (EMA) of model weights.
    ema_rampup_ratio=0.05,        # EMA ramp-up coefficient, None = no rampup.
    lr_rampup_kimg=10000,         # Learning rate ramp-up duration.
    loss_scaling=1,               # Loss scaling factor for reducing FP16 under/overflows.
    kimg_per_tick=50,             # Interval of progress prints.
    snapshot_ticks=50,            # How often to save network snapshots, None = disable.
    state_dump_ticks=500,         # How often to dump training state, None = disable.
    resume_pkl=None,              # Network weights to start from (NVlabs pickle or edm_fast snapshot).
    resume_state_dump=None,       # Training state to resume from (edm_fast state or NVlabs training-state .pt).
    resume_kimg=0,                # kimg of an NVlabs state dump (edm_fast states carry their own counters).
    cudnn_benchmark=True,         # Enable torch.backends.cudnn.benchmark?
    device=None,                  # torch device; default cuda:LOCAL_RANK if available, else cpu.
    precision=None,               # None (use_fp16 rule, as NVlabs), 'fp32', 'fp16' or 'bf16' compute dtype.
    channels_last=False,          # Run the network in channels-last memory format.
    compile=False,                # torch.compile the network.
    backend=None,                 # edm_fast op backend(s), as EDM_FAST_BACKEND.
    max_steps=None,               # Stop (with a state dump) after this many steps of this process, for tests.
):
    start_time = time.time()
    rank, world = _rank_world()
    device = torch.device(device) if device is not None else (
        torch.device('cuda', torch.cuda.current_device()) if torch.cuda.is_available() else torch.device('cpu'))
    if backend is not None:
        os.environ['EDM_FAST_BACKEND'] = backend
    np.random.seed((seed * world + rank) % (1 << 31))
    torch.manual_seed(np.random.randint(1 << 31))
    torch.backends.cudnn.benchmark = cudnn_benchmark
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False

    # Batch size per process and accumulation rounds.
    batch_gpu_total = batch_size // world
    batch_gpu, num_accumulation_rounds = split_batch(batch_size, batch_gpu, world)

    # Resume state first: it decides where the data stream continues.
    state = None
    if resume_state_dump is not None:
        kind, state = training_state.probe(resume_state_dump)
        if kind == 'edm_fast':
            training_state.check_compatible(state, batch_size=batch_size, world=world, network_kwargs=network_kwargs,
                                            path=resume_state_dump)
    cur_nimg = state['cur_nimg'] if state is not None else resume_kimg * 1000

    # Data.
    from .dataset import InfiniteSampler
    if rank == 0:
        print('Loading dataset...')
    dataset_obj = construct(dataset_kwargs)
    sampler = InfiniteSampler(len(dataset_obj), rank=rank, num_replicas=world, seed=seed,
                              start_idx=cur_nimg if state is not None else 0)
    loader_kwargs = dict(data_loader_kwargs)
    if loader_kwargs.get('num_workers', 0) == 0:
        loader_kwargs.pop('prefetch_factor', None)
    if device.type != 'cuda':
        loader_kwargs['pin_memory'] = False
    dataset_iterator = iter(torch.utils.data.DataLoader(dataset_obj, sampler=sampler, batch_size=batch_gpu,
                                                        **loader_kwargs))

    # Network, loss, optimizer, augmentation.
    if rank == 0:
        print('Constructing network...')
    interface_kwargs = dict(img_resolution=dataset_obj.resolution, img_channels=dataset_obj.num_channels,
                            label_dim=dataset_obj.label_dim)
    net = construct(network_kwargs, **interface_kwargs)
    net.train().requires_grad_(True).to(device)
    if precision is not None:
        net.set_compute_dtype({'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}[precision])
    if channels_last:
        net.to(memory_format=torch.channels_last)
    if rank == 0 and state is None:
        with torch.no_grad():
            images = torch.zeros([batch_gpu, net.img_channels, net.img_resolution, net.img_resolution], device=device)
            sigma = torch.ones([batch_gpu], device=device)
            labels = torch.zeros([batch_gpu, net.label_dim], device=device)
            util.print_module_summary(net, [images, sigma, labels], max_nesting=2)

    if rank == 0:
        print('Setting up optimizer...')
    loss_fn = construct(loss_kwargs)
    optimizer = construct(optimizer_kwargs, params=net.parameters())
    augment_pipe = construct(augment_kwargs) if augment_kwargs is not None else None
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    # Compile the network itself (one graph, fullgraph), then let DDP wrap it; EMA and snapshots use `net`.
    from .fast import compile_network
    train_module = compile_network(net) if compile else net
    ddp = train_module
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(train_module,
                                                        device_ids=[device] if device.type == 'cuda' else None)
    train_fn = ddp

    # Resume.
    cur_tick, tick_start_nimg, elapsed_before = 0, cur_nimg, 0.0
    if resume_pkl is not None:
        if rank == 0:
            print(f'Loading network weights from "{resume_pkl}"...')
        source = checkpoint.load_snapshot(resume_pkl)['ema']
        training_state.copy_params_and_buffers(source, net, require_all=False)
        training_state.copy_params_and_buffers(source, ema, require_all=False)
        del source
    if state is not None:
        if rank == 0:
            print(f'Resuming from "{resume_state_dump}" at {cur_nimg / 1000:.3f} kimg...')
        training_state.restore(state, net=net, ema=ema, optimizer=optimizer, rank=rank, device=device)
        cur_tick, tick_start_nimg, elapsed_before = state['cur_tick'], state['tick_start_nimg'], state['elapsed_s']
        del state
    elif resume_state_dump is not None:
        if rank == 0:
            print(f'Loading NVlabs training state from "{resume_state_dump}"...')
        nv = checkpoint.load_training_state(resume_state_dump)
        training_state.copy_params_and_buffers(nv['net'], net, require_all=True)
        optimizer.load_state_dict(nv['optimizer_state'])
        del nv

    def prepare(images, labels):
        images = images.to(device).to(torch.float32) / 127.5 - 1
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels.to(device)

    # Train.
    if rank == 0:
        print(f'Training for {total_kimg} kimg...')
        print()
    stats = Collector()
    tick_start_time = time.time()
    maintenance_time = tick_start_time - start_time
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    steps_done = 0
    stop_requested = False
    vote = StopVote(device)
    with _StopFlag() as stop:
        while True:
            # Accumulate gradients, then update the weights and the EMA.
            optimizer.zero_grad(set_to_none=True)
            accumulate_gradients(train_fn, loss_fn,
                                 (next(dataset_iterator) for _ in range(num_accumulation_rounds)),
                                 loss_scaling, batch_gpu_total, augment_pipe, stats, prepare)
            for g in optimizer.param_groups:
                g['lr'] = learning_rate(cur_nimg, optimizer_kwargs['lr'], lr_rampup_kimg)
            sanitize_gradients(net)
            optimizer.step()
            update_ema(ema, net, ema_beta(cur_nimg, batch_size, ema_halflife_kimg, ema_rampup_ratio))

            # Progress.
            cur_nimg += batch_size
            steps_done += 1
            done = cur_nimg >= total_kimg * 1000
            stop_requested = vote.poll(stop.requested) or (max_steps is not None and steps_done >= max_steps)
            if not (done or stop_requested or cur_tick == 0 or cur_nimg >= tick_start_nimg + kimg_per_tick * 1000):
                continue

            # Status line.
            tick_end_time = time.time()
            total_s = tick_end_time - start_time + elapsed_before
            fields = [f'tick {cur_tick:<5d}', f'kimg {cur_nimg / 1e3:<9.1f}', f'time {util.format_time(total_s):<12s}',
                      f'sec/tick {tick_end_time - tick_start_time:<7.1f}',
                      f'sec/kimg {(tick_end_time - tick_start_time) / max(cur_nimg - tick_start_nimg, 1) * 1e3:<7.2f}',
                      f'maintenance {maintenance_time:<6.1f}']
            stats.report0('Progress/tick', cur_tick, rank)
            stats.report0('Progress/kimg', cur_nimg / 1e3, rank)
            stats.report0('Timing/total_sec', total_s, rank)
            stats.report0('Timing/sec_per_tick', tick_end_time - tick_start_time, rank)
            stats.report0('Timing/sec_per_kimg', (tick_end_time - tick_start_time) / max(cur_nimg - tick_start_nimg, 1) * 1e3, rank)
            stats.report0('Timing/maintenance_sec', maintenance_time, rank)
            fields += _report_memory(stats, device, rank)
            if rank == 0:
                print(' '.join(fields), flush=True)

            # Network snapshot.
            if snapshot_ticks is not None and (done or cur_tick % snapshot_ticks == 0):
                check_ddp_consistency(ema)
                if rank == 0:
                    path = os.path.join(run_dir, f'network-snapshot-{cur_nimg // 1000:06d}.safetensors')
                    checkpoint.save_snapshot(path, ema=ema, loss_fn=loss_fn, augment_pipe=augment_pipe,
                                             dataset_kwargs=dict(dataset_kwargs),
                                             extra=dict(kimg=cur_nimg / 1000, cur_nimg=cur_nimg))

            # Statistics.
            collected = stats.collect(device=device)
            if rank == 0:
                with open(os.path.join(run_dir, 'stats.jsonl'), 'at') as f:
                    f.write(json.dumps(dict(collected, timestamp=time.time())) + '\n')

            # Training state, after the stats so a resumed run continues the log (also written on a stop request).
            final = done or stop_requested
            if (state_dump_ticks is not None and (final or cur_tick % state_dump_ticks == 0) and cur_tick != 0) \
                    or stop_requested:
                training_state.save(
                    run_dir, rank=rank, device=device, net=net, ema=ema, optimizer=optimizer, cur_nimg=cur_nimg,
                    cur_tick=cur_tick + 1, tick_start_nimg=cur_nimg, elapsed_s=total_s, batch_size=batch_size,
                    world=world, seed=seed, network_kwargs=network_kwargs)

            # Next tick.
            cur_tick += 1
            tick_start_nimg = cur_nimg
            tick_start_time = time.time()
            maintenance_time = tick_start_time - tick_end_time
            if final:
                break

    if rank == 0:
        print()
        print('Stopped at the request; resume with --resume.' if stop_requested and not done else 'Exiting...')
    return dict(cur_nimg=cur_nimg, stopped=stop_requested and not done)
