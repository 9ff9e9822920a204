"""Training states: everything needed to continue a run bit-exactly, in a file that cannot run code.

A state is a torch.save'd dict of tensors and plain values only, loaded with torch.load(weights_only=True):
network and EMA state dicts, the optimizer state, every rank's RNG states, the number of images seen (which
is also the data position of the InfiniteSampler), tick counters and the run's batch size, world size and
network config (checked on resume). Files are written atomically: a kill at any moment leaves the previous
state intact.
"""

import glob
import json
import os
import re
import warnings

import numpy as np
import torch

from .util import atomic_write


class TrainingConfigError(ValueError):
    """A training option is invalid, or does not fit the data or the run being resumed or transferred from.

    The message names the option and what to do; train.py shows it as a one-line error. A ValueError, so code
    that caught the plain ValueErrors raised before keeps working.
    """


FORMAT = 'edm_fast.training_state'
VERSION = 1
_NAME = re.compile(r'training-state-(\d+)\.pt$')


def state_path(run_dir, cur_nimg):
    return os.path.join(run_dir, f'training-state-{cur_nimg // 1000:06d}.pt')


def latest_state(run_dir):
    """The newest training-state-*.pt in run_dir (by kimg in the name, then modification time), or None."""
    files = [f for f in glob.glob(os.path.join(run_dir, 'training-state-*.pt')) if _NAME.search(f)]
    if not files:
        return None
    return max(files, key=lambda f: (int(_NAME.search(f).group(1)), os.path.getmtime(f)))


def _rng_state(device):
    np_state = np.random.get_state()
    return dict(torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state(device) if torch.device(device).type == 'cuda' else None,
                numpy_keys=torch.from_numpy(np_state[1].astype(np.int64)), numpy_pos=int(np_state[2]),
                numpy_has_gauss=int(np_state[3]), numpy_gauss=float(np_state[4]))


def _set_rng_state(rng, device):
    torch.set_rng_state(rng['torch'])
    if rng.get('cuda') is not None and torch.device(device).type == 'cuda':
        torch.cuda.set_rng_state(rng['cuda'], device)
    np.random.set_state(('MT19937', rng['numpy_keys'].numpy().astype(np.uint32), rng['numpy_pos'],
                         rng['numpy_has_gauss'], rng['numpy_gauss']))


def _cpu_state_dict(module):
    return {k: v.detach().to('cpu', copy=True) for k, v in module.state_dict().items()}


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to('cpu', copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def save(run_dir, *, rank, device, net, ema, optimizer, cur_nimg, cur_tick, tick_start_nimg, elapsed_s, batch_size,
         world, seed, network_kwargs):
    """Collective: every rank contributes its RNG state; rank 0 writes the file atomically. Returns its path."""
    rng = _rng_state(device)
    if torch.distributed.is_initialized():
        rngs = [None] * world if rank == 0 else None
        torch.distributed.gather_object(rng, rngs, dst=0)
    else:
        rngs = [rng]
    path = state_path(run_dir, cur_nimg)
    if rank == 0:
        state = dict(format=FORMAT, version=VERSION, net=_cpu_state_dict(net), ema=_cpu_state_dict(ema),
                     optimizer=_to_cpu(optimizer.state_dict()), rng=rngs, cur_nimg=int(cur_nimg),
                     cur_tick=int(cur_tick), tick_start_nimg=int(tick_start_nimg), elapsed_s=float(elapsed_s),
                     batch_size=int(batch_size), world=int(world), seed=int(seed),
                     network_kwargs_json=json.dumps(network_kwargs, sort_keys=True))
        atomic_write(path, lambda f: torch.save(state, f))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return path


def probe(path):
    """('edm_fast', state) for our state files, ('nvlabs', None) for an NVlabs training-state .pt.

    Raises a clear error for a missing, empty or unreadable file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f'training state {path!r} does not exist')
    if os.path.getsize(path) == 0:
        raise TrainingConfigError(f'training state {path!r} is empty (an interrupted write?); resume from an earlier '
                                  f'state')
    with open(path, 'rb') as f:
        head = f.read(9)
    if head[:1] == b'\x80' or head[8:9] == b'{':  # a pickle or a safetensors file: a network, not a state
        raise TrainingConfigError(f'{path!r} is a network snapshot, not a training state; resume from a '
                                  f'training-state-*.pt, or start from these weights with --transfer')
    if head[:2] != b'PK':  # every torch.save file (ours and NVlabs') is a zip archive
        raise TrainingConfigError(f'{path!r} is not a training state (not a torch.save file); resume from a '
                                  f'training-state-*.pt written by train.py')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # NVlabs states hold pickled modules, which weights_only refuses
        if 'weights_only' in str(e) or 'Unsupported global' in str(e) or 'GLOBAL' in str(e):
            return 'nvlabs', None
        raise TrainingConfigError(f'cannot read training state {path!r}: {_first_line(e)}; it is truncated or not a '
                                  f'training state, resume from another one') from e
    if isinstance(state, dict) and state.get('format') == 'edm_fast.training_state_edm2':
        raise TrainingConfigError(f'{path!r} is the state of an EDM2 (--preset) run; EDM2 runs continue by rerunning '
                                  f'train.py with the same --preset and --outdir={os.path.dirname(path) or "."} (no '
                                  f'--resume)')
    if not isinstance(state, dict) or state.get('format') != FORMAT:
        raise TrainingConfigError(f'{path!r} is not an edm_fast or NVlabs training state; resume from a '
                                  f'training-state-*.pt written by train.py')
    if state.get('version') != VERSION:
        raise TrainingConfigError(f'{path!r} has training-state version {state.get("version")}; this edm_fast reads '
                                  f'{VERSION}')
    return 'edm_fast', state


def _first_line(e):
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def describe_differences(saved, current):
    """'key: <saved> in the state, <current> now; ...' for the keys whose values differ (JSON-normalised)."""
    current = json.loads(json.dumps(current, sort_keys=True))
    missing = object()
    parts = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, missing), current.get(key, missing)
        if a != b:
            parts.append(f'{key}: {"unset" if a is missing else json.dumps(a)} in the state, '
                         f'{"unset" if b is missing else json.dumps(b)} now')
    return '; '.join(parts)


def check_compatible(state, *, batch_size, world, network_kwargs, path='the training state', warn=True):
    """Refuse resumes that cannot continue the same run (TrainingConfigError); warn when exactness is lost (other
    world size) unless warn=False."""
    if state['batch_size'] != batch_size:
        raise TrainingConfigError(
            f'{path} was written with --batch={state["batch_size"]}, this run uses --batch={batch_size}: the '
            f'learning-rate/EMA schedule and data position would not continue; resume with '
            f'--batch={state["batch_size"]}')
    saved = json.loads(state['network_kwargs_json'])
    if saved != json.loads(json.dumps(network_kwargs, sort_keys=True)):
        raise TrainingConfigError(
            f'{path} was written for a different network ({describe_differences(saved, network_kwargs)}); resume '
            f'with the options the run was started with (its training_options.json lists them)')
    if warn and state['world'] != world:
        warnings.warn(f'{path} was written by {state["world"]} processes and is resumed by {world}: training continues, '
                      f'but the per-rank random streams cannot be restored, so it is no longer bit-exact')


def restore(state, *, net, ema, optimizer, rank, device):
    net.load_state_dict(state['net'], strict=True)
    ema.load_state_dict(state['ema'], strict=True)
    optimizer.load_state_dict(state['optimizer'])
    if state['world'] == (torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1):
        _set_rng_state(state['rng'][rank], device)


def _named_tensors(module):
    """name -> tensor over parameters and buffers; a dict (a state dict) is taken as it is."""
    if isinstance(module, dict):
        return dict(module)
    tensors = dict(module.named_parameters())
    tensors.update(module.named_buffers())
    return tensors


def check_source_fits(src, dst, require_all=False, what='the source network', fix='use a network of the same '
                      'architecture and size'):
    """Raise TrainingConfigError unless copy_params_and_buffers(src, dst, require_all) would copy cleanly.

    Tensors are matched by name; a matched pair must have the same shape (never broadcast), at least one name must
    match, and with require_all every tensor of dst must be in src. src and dst are modules or state dicts; dst may
    live on the meta device.
    """
    src_tensors, dst_tensors = _named_tensors(src), _named_tensors(dst)
    matched = [name for name in dst_tensors if name in src_tensors]
    wrong = [name for name in matched if tuple(src_tensors[name].shape) != tuple(dst_tensors[name].shape)]
    if wrong:
        name = wrong[0]
        raise TrainingConfigError(
            f'{what} does not fit this run\'s network: {len(wrong)} tensor(s) differ in shape, e.g. {name} is '
            f'{list(src_tensors[name].shape)} there but {list(dst_tensors[name].shape)} here; {fix}')
    missing = [name for name in dst_tensors if name not in src_tensors]
    if not matched or (require_all and missing):
        example = f', e.g. {missing[0]}' if missing else ''
        raise TrainingConfigError(
            f'{what} does not fit this run\'s network: {len(missing)} of its {len(dst_tensors)} tensors are missing '
            f'there{example}; {fix}')


@torch.no_grad()
def copy_params_and_buffers(src, dst, require_all=False):
    """Copy tensors from src to dst by name (parameters and buffers); names missing in src are left alone.

    Raises TrainingConfigError (see check_source_fits) instead of copying tensors of another shape.
    """
    check_source_fits(src, dst, require_all=require_all)
    src_tensors = _named_tensors(src)
    for name, tensor in _named_tensors(dst).items():
        if name in src_tensors:
            tensor.copy_(src_tensors[name].detach())
