"""Loading and saving EDM checkpoints.

Reads, without ever running code stored in the file:

* official NVlabs network pickles (`edm-*.pkl`, `network-snapshot-*.pkl`), through the restricted
  unpickler of `edm_fast.pickle_import` (spec §9.3), EDM and EDM2 alike: an EDM2 pickle is an EasyDict with
  `ema` (a `training.networks_edm2.Precond`, fp16 tensors, loaded into fp32 parameters), `loss_fn` (EDM2Loss),
  `encoder` (StandardRGBEncoder / StabilityVAEEncoder, returned as `edm_fast.encoders` objects) and
  `dataset_kwargs` (spec §9.2);
* official NVlabs `training-state-*.pt` files (zip `torch.save`), through the same unpickler;
* edm_fast snapshots: a safetensors-compatible file (8-byte little-endian header length N, N bytes of
  UTF-8 JSON describing every tensor, then the raw little-endian tensor bytes) whose `__metadata__`
  holds, as a JSON string, the class names and constructor kwargs needed to rebuild the objects.

The file kind is recognised by content, not by extension. Networks are rebuilt as edm_fast classes from
the recorded constructor kwargs and get their tensors through `load_state_dict(strict=True)`.

Public API: `load_network`, `load_snapshot`, `load_training_state`, `save_snapshot`, `read_snapshot_extra`,
`CheckpointError`.
"""

import inspect
import itertools
import json
import math
import os
import sys
import warnings
import zipfile

import numpy as np
import torch

from . import pickle_import
from .pickle_import import CheckpointError
from .util import atomic_write, to_jsonable

__all__ = ['load_network', 'load_snapshot', 'load_training_state', 'save_snapshot', 'read_snapshot_extra',
           'CheckpointError', 'CheckpointWarning', 'detect_format', 'FORMAT_NAME', 'FORMAT_VERSION']

FORMAT_NAME = 'edm_fast.snapshot'
FORMAT_VERSION = 1
_METADATA_KEY = 'edm_fast'
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit

EDM_PRECOND_CLASSES = ('EDMPrecond', 'VPPrecond', 'VEPrecond', 'iDDPMPrecond')
EDM2_PRECOND_CLASSES = ('Precond',)  # NVlabs training.networks_edm2.Precond
PRECOND_CLASSES = EDM_PRECOND_CLASSES + EDM2_PRECOND_CLASSES


class CheckpointWarning(UserWarning):
    """A checkpoint value disagreed with the rebuilt object; the checkpoint value was used."""

# ----------------------------------------------------------------------------------------------------
# File kind.


def _source(path):
    return os.fspath(path)


def detect_format(path):
    """'edm_fast' (safetensors layout), 'pickle' (NVlabs network pickle) or 'zip' (torch.save), by content."""
    src = _source(path)
    if '://' in src and not os.path.exists(src):
        raise CheckpointError(f'cannot load {src}: edm_fast does not download checkpoints; fetch the file (e.g. '
                              f'with wget or curl) and pass its local path')
    if not os.path.exists(src):
        raise CheckpointError(f'cannot load {src}: no such file; check the path')
    if os.path.isdir(src):
        raise CheckpointError(f'cannot load {src}: it is a directory, not a checkpoint file')
    size = os.path.getsize(src)
    if size == 0:
        raise CheckpointError(f'cannot load {src}: the file is empty (an interrupted download or write?); '
                              f'download or save it again')
    with open(src, 'rb') as f:
        head = f.read(9)
    looks_safetensors = len(head) == 9 and head[8:9] == b'{'
    n = int.from_bytes(head[:8], 'little')
    if looks_safetensors and n <= size - 8:
        return 'edm_fast'
    if head[:1] == b'\x80':
        return 'pickle'
    if head[:2] == b'PK':
        try:
            with zipfile.ZipFile(src) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise CheckpointError(f'cannot load {src}: a damaged zip archive ({e}); if it is a training state, the '
                                  f'write was cut short: use an earlier one') from e
        if not any(n.endswith('data.pkl') for n in names):
            what = ' (an image dataset?)' if any(n.endswith(('.png', 'dataset.json')) for n in names) else ''
            raise CheckpointError(f'cannot load {src}: a zip archive{what}, not a checkpoint; pass an edm-*.pkl, a '
                                  f'network-snapshot-*.pkl or a network-snapshot-*.safetensors')
        return 'zip'
    if looks_safetensors:
        raise CheckpointError(f'cannot load {src}: it looks like an edm_fast/safetensors snapshot, but its header '
                              f'length ({n} bytes) exceeds the file size ({size} bytes); the file is truncated or '
                              f'corrupt, save or copy it again')
    raise CheckpointError(f'cannot load {src}: not a checkpoint (expected an NVlabs EDM pickle, a torch.save '
                          f'training state or an edm_fast snapshot; the first bytes are {head[:8]!r})')

# ----------------------------------------------------------------------------------------------------
# Rebuilding objects from NVlabs records.


def _network_class(class_name, src, what):
    from . import networks, networks_edm2
    if class_name not in PRECOND_CLASSES:
        raise CheckpointError(f'cannot load {src}: {what} is a {class_name!r}, which edm_fast cannot rebuild '
                              f'(supported: {", ".join(PRECOND_CLASSES)})')
    return getattr(networks_edm2 if class_name in EDM2_PRECOND_CLASSES else networks, class_name)


def _loss_types():
    from .loss import LOSS_TYPES
    from .loss_edm2 import LOSS_TYPES as EDM2_LOSS_TYPES
    return {**LOSS_TYPES, **EDM2_LOSS_TYPES}


def _construct(cls, kwargs, src, what):
    try:
        with torch.random.fork_rng(devices=[]):  # random init is overwritten; keep the caller's RNG stream
            return cls(**kwargs)
    except MemoryError:
        raise
    except Exception as e:
        raise CheckpointError(f'cannot load {src}: could not rebuild {what} as {cls.__name__}(**{kwargs!r}): '
                              f'{e}') from e


def _default_of(cls, name):
    p = inspect.signature(cls).parameters.get(name)
    return None if p is None or p.default is inspect.Parameter.empty else p.default


def _is_real(v):
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _same(a, b):
    try:
        if _is_real(a) and _is_real(b) and math.isnan(a) and math.isnan(b):
            return True
        return bool(a == b) and type(a == b) in (bool, np.bool_)
    except Exception:
        return False


_SCALARS = (bool, int, float, str, np.generic, type(None))


def _check_attributes(obj, state, label, src, errors, adopt):
    """Compare plain attributes stored in `state` with those of the rebuilt `obj`.

    Floats that differ are taken from the checkpoint (they are authoritative, spec §9.3) with a warning;
    any other difference is collected in `errors`.
    """
    ours_all = vars(obj)
    for key, value in state.items():
        if key.startswith('_') or key == 'training' or key not in ours_all:
            continue
        ours = ours_all[key]
        if not isinstance(value, _SCALARS) or not isinstance(ours, _SCALARS) or _same(value, ours):
            continue
        if adopt and _is_real(value) and _is_real(ours) and (isinstance(value, (float, np.floating))
                                                            or isinstance(ours, (float, np.floating))):
            warnings.warn(f'{src}: {label}.{key} is {value!r} in the checkpoint but {ours!r} in the rebuilt '
                          f'object; using the checkpoint value', CheckpointWarning, stacklevel=4)
            setattr(obj, key, value)
        else:
            errors.append(f'{label}.{key}: checkpoint {value!r}, rebuilt {ours!r}')


def _cross_check_network(record, net, src, what):
    """Module tree, class names and plain attributes of the record tree against the rebuilt network."""
    errors = []
    modules = dict(net.named_modules())
    names = set()
    for name, rec in pickle_import.iter_records(record):
        names.add(name)
        label = f'{what}.{name}' if name else what
        mod = modules.get(name)
        if mod is None:
            errors.append(f'{label}: {rec.class_name} in the checkpoint, absent in the rebuilt network')
            continue
        if rec.class_name != type(mod).__name__:
            errors.append(f'{label}: {rec.class_name} in the checkpoint, {type(mod).__name__} when rebuilt')
            continue
        _check_attributes(mod, rec.state, label, src, errors, adopt=True)
    for name in modules:
        if name not in names:
            errors.append(f'{what}.{name}: {type(modules[name]).__name__} in the rebuilt network, absent in the '
                          f'checkpoint')
    if errors:
        shown = '; '.join(errors[:8]) + (f'; ... ({len(errors) - 8} more)' if len(errors) > 8 else '')
        raise CheckpointError(f'cannot load {src}: the rebuilt {what} does not match the checkpoint ({shown}). '
                              f'The checkpoint was probably written by a modified version of the official code')


def _load_tensors(net, tensors, src, what, assign=False):
    try:
        net.load_state_dict(tensors, strict=True, assign=assign)
    except RuntimeError as e:
        msg = str(e)
        if len(msg) > 2000:
            msg = msg[:2000] + ' ...'
        raise CheckpointError(f'cannot load {src}: the tensors stored for {what} do not fit the network rebuilt '
                              f'from its recorded kwargs: {msg}') from e


def _keep_gain_dtype(net, tensors):
    """EDM2: give every MPConv the stored dtype of the learned gains (fp16 in NVlabs' and our fp16 snapshots), so
    gain / sqrt(fan_in) rounds as in NVlabs, whose snapshot parameters stay fp16 (see MPConv._scale)."""
    low = {t.dtype for name, t in tensors.items() if name.endswith('_gain') and t.dtype in (torch.float16,
                                                                                            torch.bfloat16)}
    if not low:
        return net
    from .networks_edm2 import MPConv
    dtype = torch.float16 if torch.float16 in low else torch.bfloat16
    for m in net.modules():
        if isinstance(m, MPConv):
            m.gain_dtype = dtype
    return net


def _build_and_load(cls, kwargs, tensors, src, what):
    """`cls(**kwargs)` holding `tensors` (its state dict; strict).

    Fast path: build on the meta device (no random init) and assign the loaded tensors, cast to the
    dtypes the module declares. If that fails, or leaves a tensor on the meta device (one that the state
    dict does not carry), build normally and copy the tensors in.
    """
    try:
        with torch.device('meta'):
            net = cls(**kwargs)
    except Exception:
        net = None
    if net is not None:
        expected = net.state_dict()
        cast = {k: t.to(expected[k].dtype).contiguous() if k in expected and t.is_floating_point() else t
                for k, t in tensors.items()}
        _load_tensors(net, cast, src, what, assign=True)
        if not any(t.is_meta for t in itertools.chain(net.parameters(), net.buffers())):
            return _keep_gain_dtype(net, tensors)
    net = _construct(cls, kwargs, src, what)
    _load_tensors(net, tensors, src, what)
    return _keep_gain_dtype(net, tensors)


def _network_from_record(record, src, what='ema'):
    if not isinstance(record, pickle_import.PersistentRecord):
        raise CheckpointError(f'cannot load {src}: {what!r} is a {type(record).__name__}, not a persistent '
                              f'network object written by the official code')
    cls = _network_class(record.class_name, src, what)
    kwargs = pickle_import.init_kwargs(record, cls, src)
    edm2 = record.class_name in EDM2_PRECOND_CLASSES
    child = 'unet' if edm2 else 'model'
    model_type = 'UNet' if edm2 else kwargs.get('model_type', _default_of(cls, 'model_type'))
    model = (record.state.get('_modules') or {}).get(child)
    model_class = getattr(model, 'class_name', type(model).__name__)
    if model_class != model_type:
        built = 'is always built with a UNet' if edm2 else f'was built with model_type={model_type!r}'
        raise CheckpointError(f'cannot load {src}: {what}.{child} is a {model_class}, but {record.class_name} '
                              f'{built}; the file is inconsistent')
    tensors = dict(pickle_import.iter_state_dict(record, source=src))
    net = _build_and_load(cls, kwargs, tensors, src, what)
    _cross_check_network(record, net, src, what)
    return net


def _loss_from_record(record, src):
    LOSS_TYPES = _loss_types()
    if record is None:
        return None
    if not isinstance(record, pickle_import.PersistentRecord):
        raise CheckpointError(f'cannot load {src}: loss_fn is a {type(record).__name__}, not a persistent object')
    if record.class_name not in LOSS_TYPES:
        raise CheckpointError(f'cannot load {src}: loss_fn is a {record.class_name!r}, which edm_fast cannot '
                              f'rebuild (supported: {", ".join(LOSS_TYPES)})')
    cls = LOSS_TYPES[record.class_name]
    loss = _construct(cls, pickle_import.init_kwargs(record, cls, src), src, 'loss_fn')
    errors = []
    _check_attributes(loss, record.state, 'loss_fn', src, errors, adopt=True)
    if errors:
        raise CheckpointError(f'cannot load {src}: loss_fn does not match its record: {"; ".join(errors)}')
    return loss


def _encoder_from_record(record, src):
    """The EDM2 encoder of a pickle as an edm_fast.encoders object (scale/bias taken from the record)."""
    from . import encoders
    if record is None:
        return None
    if not isinstance(record, pickle_import.PersistentRecord):
        raise CheckpointError(f'cannot load {src}: encoder is a {type(record).__name__}, not a persistent object')
    if record.class_name not in encoders.ENCODER_TYPES:
        raise CheckpointError(f'cannot load {src}: encoder is a {record.class_name!r}, which edm_fast cannot '
                              f'rebuild (supported: {", ".join(encoders.ENCODER_TYPES)})')
    cls = encoders.ENCODER_TYPES[record.class_name]
    kwargs = pickle_import.init_kwargs(record, cls, src)
    try:
        return encoders.encoder_from_record(record.class_name, kwargs, record.state)
    except Exception as e:
        raise CheckpointError(f'cannot load {src}: could not rebuild the encoder {record.class_name}(**{kwargs!r}): '
                              f'{e}') from e


def _encoder_to_spec(encoder):
    if encoder is None:
        return None
    if not hasattr(encoder, 'init_kwargs'):
        raise TypeError(f'encoder must be an edm_fast.encoders object (with init_kwargs), got {type(encoder).__name__}')
    spec = {'class_name': type(encoder).__name__, 'init_kwargs': to_jsonable(encoder.init_kwargs)}
    arrays = {k: to_jsonable(np.asarray(getattr(encoder, k))) for k in ('scale', 'bias') if hasattr(encoder, k)}
    if arrays:
        spec['arrays'] = arrays
    return spec


def _encoder_from_spec(spec, src):
    from . import encoders
    if spec is None:
        return None
    if not isinstance(spec, dict) or spec.get('class_name') not in encoders.ENCODER_TYPES \
            or not isinstance(spec.get('init_kwargs'), dict):
        raise CheckpointError(f'cannot load {src}: unknown or malformed encoder {spec!r} (supported: '
                              f'{", ".join(encoders.ENCODER_TYPES)})')
    try:
        return encoders.encoder_from_record(spec['class_name'], spec['init_kwargs'], spec.get('arrays'))
    except Exception as e:
        raise CheckpointError(f'cannot load {src}: could not rebuild the encoder {spec!r}: {e}') from e


def _augment_from_spec(class_name, kwargs):
    """The augment pipe of a snapshot, rebuilt as edm_fast.augment.AugmentPipe (same argument names as NVlabs)."""
    from .augment import AugmentPipe
    if str(class_name).rsplit('.', 1)[-1] != 'AugmentPipe':
        raise CheckpointError(f'unknown augment pipe class {class_name!r}; expected AugmentPipe')
    return AugmentPipe(**dict(kwargs))


def _augment_to_spec(augment_pipe):
    """(class_name, kwargs) of an augment pipe given as an object with init_kwargs or as a description dict."""
    if augment_pipe is None:
        return None
    if isinstance(augment_pipe, dict):
        if 'kwargs' not in augment_pipe:
            raise ValueError("augment_pipe given as a dict needs 'kwargs' (and optionally 'class_name')")
        name = str(augment_pipe.get('class_name', 'AugmentPipe')).rsplit('.', 1)[-1]
        return name, dict(augment_pipe['kwargs'])
    if hasattr(augment_pipe, 'init_kwargs'):
        return type(augment_pipe).__name__, dict(augment_pipe.init_kwargs)
    raise TypeError(f'cannot store an augment pipe of type {type(augment_pipe).__name__}: it needs init_kwargs')


def _augment_from_record(record, src):
    if record is None:
        return None
    if not isinstance(record, pickle_import.PersistentRecord):
        raise CheckpointError(f'cannot load {src}: augment_pipe is a {type(record).__name__}, not a persistent object')
    return _augment_from_spec(record.class_name, pickle_import.init_kwargs(record, None, src))


def _plain_dict(value, src, what):
    if value is None:
        return None
    if not isinstance(value, dict):
        raise CheckpointError(f'cannot load {src}: {what} is a {type(value).__name__}, expected a dict')
    return pickle_import.to_plain(dict(value))


def _read_nvlabs_pickle(src):
    data = pickle_import.load_pickle(src)
    if not isinstance(data, dict):
        raise CheckpointError(f'cannot load {src}: the pickle holds a {type(data).__name__}, not the dict of an '
                              f'EDM/EDM2 network pickle (keys ema, loss_fn, augment_pipe or encoder, dataset_kwargs)')
    if 'ema' not in data:
        hint = ' (this looks like a training state: resume from it with train.py --resume)' if 'net' in data else ''
        raise CheckpointError(f'cannot load {src}: the pickle has no \'ema\' network (keys: '
                              f'{", ".join(map(str, data))}){hint}; pass an edm-*.pkl or network-snapshot-*.pkl file')
    return data


def _read_training_state(src):
    data = pickle_import.load_torch_file(src)
    if not isinstance(data, dict) or 'net' not in data:
        keys = ', '.join(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f'cannot load {src}: not an EDM training state (expected a dict with net and '
                              f'optimizer_state, got {keys})')
    return data

# ----------------------------------------------------------------------------------------------------
# edm_fast snapshots (safetensors layout).

_DTYPES = {
    'F64': torch.float64, 'F32': torch.float32, 'F16': torch.float16, 'BF16': torch.bfloat16,
    'I64': torch.int64, 'I32': torch.int32, 'I16': torch.int16, 'I8': torch.int8, 'U8': torch.uint8,
    'BOOL': torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def _tensor_bytes(t):
    t = t.detach().to('cpu').contiguous().reshape(-1)
    if t.numel() == 0:
        return b''
    b = t.view(torch.uint8)
    if sys.byteorder == 'big' and t.element_size() > 1:
        b = b.reshape(-1, t.element_size()).flip(1).reshape(-1)
    return memoryview(b.numpy())


def _unwrap(module):
    module = getattr(module, '_orig_mod', module)  # torch.compile
    if isinstance(module, torch.nn.parallel.DistributedDataParallel):
        module = module.module
    return module


def _module_spec(module, what):
    module = _unwrap(module)
    if not isinstance(module, torch.nn.Module) or type(module).__name__ not in PRECOND_CLASSES \
            or not hasattr(module, 'init_kwargs'):
        raise TypeError(f'{what} must be an edm_fast preconditioned network ({", ".join(PRECOND_CLASSES)}; '
                        f'Precond is EDM2), got {type(module).__name__}')
    return module, {'class_name': type(module).__name__, 'init_kwargs': to_jsonable(module.init_kwargs)}


def save_snapshot(path, ema, loss_fn=None, augment_pipe=None, dataset_kwargs=None, extra=None, dtype=None,
                  encoder=None):
    """Write an edm_fast snapshot (safetensors layout, no code) atomically.

    `ema`: the network (an edm_fast preconditioner, EDM or EDM2). `loss_fn`: an edm_fast loss or None.
    `encoder`: an `edm_fast.encoders` object (EDM2) or None. `augment_pipe`:
    None, an object with `init_kwargs`, or {'class_name': ..., 'kwargs': {...}}. `dataset_kwargs` and
    `extra` (e.g. {'kimg': 200}): JSON-serialisable dicts. `dtype=torch.float16` (or bfloat16) stores the
    floating-point parameters in that dtype, and for EDM2 networks the buffers too (the Fourier frequencies and
    phases), as NVlabs' `module.to(torch.float16)` snapshots do, so a snapshot computes what NVlabs' snapshot of
    the same weights computes (EDM networks keep their buffers, such as the iDDPM sigma table, in their own
    dtype: NVlabs never stores those in fp16); loading casts them back to fp32.
    """
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f'dtype must be None, torch.float16, torch.bfloat16 or torch.float32, got {dtype}')
    net, net_spec = _module_spec(ema, 'ema')
    cast = {name for name, _ in net.named_parameters()}
    if type(net).__name__ in EDM2_PRECOND_CLASSES:
        cast |= {name for name, _ in net.named_buffers()}
    tensors = {}
    for name, t in net.state_dict().items():
        t = t.detach()
        if dtype is not None and name in cast and t.is_floating_point():
            t = t.to(dtype)
        tensors[f'ema.{name}'] = t

    meta = {'format': FORMAT_NAME, 'version': FORMAT_VERSION, 'modules': {'ema': net_spec}}
    if loss_fn is not None:
        if not hasattr(loss_fn, 'init_kwargs'):
            raise TypeError(f'loss_fn must be an edm_fast loss (with init_kwargs), got {type(loss_fn).__name__}')
        meta['loss_fn'] = {'class_name': type(loss_fn).__name__, 'init_kwargs': to_jsonable(loss_fn.init_kwargs)}
    else:
        meta['loss_fn'] = None
    aug = _augment_to_spec(augment_pipe)
    meta['augment_pipe'] = None if aug is None else {'class_name': aug[0], 'kwargs': to_jsonable(aug[1])}
    meta['dataset_kwargs'] = None if dataset_kwargs is None else to_jsonable(dict(dataset_kwargs))
    meta['extra'] = None if extra is None else to_jsonable(dict(extra))
    meta['param_dtype'] = None if dtype is None else _DTYPE_NAMES[dtype]
    if encoder is not None:  # optional key: readers that predate it ignore it
        meta['encoder'] = _encoder_to_spec(encoder)

    # Layout: largest element size first (keeps every tensor aligned), contiguous, no gaps (safetensors).
    order = sorted(tensors, key=lambda k: -tensors[k].element_size())
    header, offset = {}, 0
    for name in order:
        t = tensors[name]
        if t.dtype not in _DTYPE_NAMES:
            raise TypeError(f'cannot store tensor {name} of dtype {t.dtype}')
        n = t.numel() * t.element_size()
        header[name] = {'dtype': _DTYPE_NAMES[t.dtype], 'shape': list(t.shape), 'data_offsets': [offset, offset + n]}
        offset += n
    header['__metadata__'] = {_METADATA_KEY: json.dumps(meta, sort_keys=False)}
    header_bytes = json.dumps(header, separators=(',', ':'), allow_nan=False).encode('utf-8')
    header_bytes += b' ' * (-len(header_bytes) % 8)

    _atomic_write(path, header_bytes, [tensors[name] for name in order])


def _atomic_write(path, header_bytes, tensors):
    def write(f):
        f.write(len(header_bytes).to_bytes(8, 'little'))
        f.write(header_bytes)
        for t in tensors:
            f.write(_tensor_bytes(t))
    atomic_write(path, write)


def _read_safetensors(src):
    """(tensors, metadata dict) of a safetensors-layout file, validating everything against the file size."""
    def bad(msg):
        return CheckpointError(f'cannot load {src}: {msg}; the file is corrupt or truncated, save or copy it again')

    size = os.path.getsize(src)
    with open(src, 'rb') as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad('shorter than the 8-byte header length')
        n = int.from_bytes(head, 'little')
        if n < 2 or n > size - 8 or n > _MAX_HEADER_BYTES:
            raise bad(f'invalid header length {n} for a file of {size} bytes')
        raw = f.read(n)
        try:
            header = json.loads(raw.decode('utf-8'))
        except (UnicodeDecodeError, ValueError) as e:
            raise bad(f'the header is not valid UTF-8 JSON ({e})')
        if not isinstance(header, dict):
            raise bad('the header is not a JSON object')
        data_len = size - 8 - n
        metadata = header.pop('__metadata__', None)
        if metadata is not None and (not isinstance(metadata, dict)
                                     or not all(isinstance(v, str) for v in metadata.values())):
            raise bad('__metadata__ must map names to strings')
        entries = []
        for name, info in header.items():
            if not isinstance(info, dict) or set(info) != {'dtype', 'shape', 'data_offsets'}:
                raise bad(f'tensor {name!r} needs exactly dtype, shape and data_offsets')
            dtype = _DTYPES.get(info['dtype']) if isinstance(info['dtype'], str) else None
            if dtype is None:
                raise bad(f'tensor {name!r} has unknown dtype {info["dtype"]!r}')
            shape, offs = info['shape'], info['data_offsets']
            if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
                raise bad(f'tensor {name!r} has an invalid shape {shape!r}')
            if not isinstance(offs, list) or len(offs) != 2 or not all(type(o) is int for o in offs):
                raise bad(f'tensor {name!r} has invalid data_offsets {offs!r}')
            begin, end = offs
            if not 0 <= begin <= end:
                raise bad(f'tensor {name!r} has invalid data_offsets {offs!r}')
            if end > data_len:
                raise bad(f'tensor {name!r} ends at byte {end} of the data, but the file holds only {data_len}')
            itemsize = torch.empty((), dtype=dtype).element_size()
            if math.prod(shape) * itemsize != end - begin:
                raise bad(f'tensor {name!r}: shape {shape} x {itemsize} bytes does not match data_offsets {offs}')
            entries.append((begin, end, name, dtype, shape))
        entries.sort()
        pos = 0
        for begin, end, name, _, _ in entries:
            if begin < pos:
                raise bad(f'tensor {name!r} overlaps the previous tensor')
            if begin > pos:
                raise bad(f'bytes {pos}..{begin} of the data belong to no tensor (a gap)')
            pos = end
        if pos != data_len:
            raise bad(f'the tensors cover {pos} bytes but the data section holds {data_len}')

        tensors = {}
        for begin, end, name, dtype, shape in entries:
            if end == begin:
                tensors[name] = torch.empty(shape, dtype=dtype)
                continue
            f.seek(8 + n + begin)
            buf = bytearray(end - begin)
            if f.readinto(buf) != len(buf):
                raise bad(f'tensor {name!r} is cut short')
            t = torch.frombuffer(buf, dtype=torch.uint8)
            itemsize = torch.empty((), dtype=dtype).element_size()
            if sys.byteorder == 'big' and itemsize > 1:
                t = t.reshape(-1, itemsize).flip(1).reshape(-1).contiguous()
            tensors[name] = t.view(dtype).reshape(shape)
    order = {name: i for i, name in enumerate(header)}
    tensors = dict(sorted(tensors.items(), key=lambda kv: order[kv[0]]))
    return tensors, metadata or {}


def read_snapshot_extra(path):
    """The `extra` dict of an edm_fast snapshot, reading only its header (None if absent or not edm_fast)."""
    src = _source(path)
    if detect_format(src) != 'edm_fast':
        return None
    with open(src, 'rb') as f:
        n = int.from_bytes(f.read(8), 'little')
        if n > _MAX_HEADER_BYTES:
            raise CheckpointError(f'cannot load {src}: invalid header length {n}; the file is corrupt')
        try:
            header = json.loads(f.read(n).decode('utf-8'))
            meta = json.loads(header['__metadata__'][_METADATA_KEY])
        except (UnicodeDecodeError, ValueError, KeyError, TypeError):
            return None
    extra = meta.get('extra') if isinstance(meta, dict) else None
    return extra if isinstance(extra, dict) else None


def _read_edm_fast(src):
    tensors, metadata = _read_safetensors(src)
    if _METADATA_KEY not in metadata:
        raise CheckpointError(f'cannot load {src}: a safetensors file, but not an edm_fast snapshot (no '
                              f'{_METADATA_KEY!r} metadata); load its tensors into a network yourself')
    try:
        meta = json.loads(metadata[_METADATA_KEY])
    except ValueError as e:
        raise CheckpointError(f'cannot load {src}: its edm_fast metadata is not valid JSON ({e})') from e
    if not isinstance(meta, dict) or meta.get('format') != FORMAT_NAME:
        name = meta.get('format') if isinstance(meta, dict) else meta
        raise CheckpointError(f'cannot load {src}: unknown snapshot format {name!r} (expected {FORMAT_NAME!r})')
    version = meta.get('version')
    if type(version) is not int or version > FORMAT_VERSION or version < 1:
        raise CheckpointError(f'cannot load {src}: snapshot format version {version!r} is not supported by this '
                              f'edm_fast (it reads up to version {FORMAT_VERSION}); upgrade edm_fast')
    modules = meta.get('modules')
    if not isinstance(modules, dict) or 'ema' not in modules:
        raise CheckpointError(f'cannot load {src}: the snapshot stores no \'ema\' network')
    return tensors, meta


def _network_from_edm_fast(tensors, meta, src, key='ema'):
    spec = meta['modules'][key]
    if not isinstance(spec, dict) or not isinstance(spec.get('init_kwargs'), dict):
        raise CheckpointError(f'cannot load {src}: malformed description of {key!r}')
    cls = _network_class(spec.get('class_name'), src, key)
    prefix = key + '.'
    own = {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}
    return _build_and_load(cls, spec['init_kwargs'], own, src, key)


def _loss_from_edm_fast(spec, src):
    LOSS_TYPES = _loss_types()
    if spec is None:
        return None
    if not isinstance(spec, dict) or spec.get('class_name') not in LOSS_TYPES \
            or not isinstance(spec.get('init_kwargs'), dict):
        raise CheckpointError(f'cannot load {src}: unknown or malformed loss_fn {spec!r} (supported: '
                              f'{", ".join(LOSS_TYPES)})')
    return _construct(LOSS_TYPES[spec['class_name']], spec['init_kwargs'], src, 'loss_fn')

# ----------------------------------------------------------------------------------------------------
# Public loaders.


def _finish(net, device, train=False):
    net = net.train(train).requires_grad_(train)
    return net.to(torch.device(device))


def load_network(path, device='cpu'):
    """The preconditioned network (edm_fast module) of a checkpoint, in eval mode without gradients.

    Accepts NVlabs EDM/EDM2 network pickles (its 'ema'; EDM2 fp16 tensors become fp32 parameters, and the learned
    gains divide in fp16 as NVlabs does with its fp16 parameters: MPConv._scale), NVlabs EDM
    training states (its 'net') and edm_fast snapshots of EDM and EDM2 networks.
    """
    src = _source(path)
    kind = detect_format(src)
    if kind == 'edm_fast':
        tensors, meta = _read_edm_fast(src)
        net = _network_from_edm_fast(tensors, meta, src)
    elif kind == 'pickle':
        net = _network_from_record(_read_nvlabs_pickle(src)['ema'], src, 'ema')
    else:
        data = _read_training_state(src)
        key = 'ema' if 'ema' in data else 'net'
        net = _network_from_record(data[key], src, key)
    return _finish(net, device)


def load_snapshot(path):
    """Everything a snapshot holds: dict(ema, loss_fn, augment_pipe, encoder, dataset_kwargs, extra, format).

    `ema` is on the CPU in eval mode; `loss_fn` an edm_fast loss or None; `encoder` an
    `edm_fast.encoders` object for EDM2 snapshots, else None; `augment_pipe` an `edm_fast.augment.AugmentPipe`
    (rebuilt from its kwargs) or None; `dataset_kwargs` a dict or None; `extra` what
    `save_snapshot` stored (None for NVlabs pickles); `format` 'nvlabs-pickle' or 'edm_fast'.
    """
    src = _source(path)
    kind = detect_format(src)
    if kind == 'edm_fast':
        tensors, meta = _read_edm_fast(src)
        aug = meta.get('augment_pipe')
        if aug is not None and (not isinstance(aug, dict) or not isinstance(aug.get('kwargs'), dict)):
            raise CheckpointError(f'cannot load {src}: malformed augment_pipe description {aug!r}')
        return dict(
            ema=_finish(_network_from_edm_fast(tensors, meta, src), 'cpu'),
            loss_fn=_loss_from_edm_fast(meta.get('loss_fn'), src),
            augment_pipe=None if aug is None else _augment_from_spec(aug.get('class_name', 'AugmentPipe'),
                                                                     aug['kwargs']),
            encoder=_encoder_from_spec(meta.get('encoder'), src),
            dataset_kwargs=_plain_dict(meta.get('dataset_kwargs'), src, 'dataset_kwargs'),
            extra=meta.get('extra'),
            format='edm_fast',
        )
    if kind == 'zip':
        raise CheckpointError(f'cannot load {src} as a network snapshot: it is a training state (a torch.save '
                              f'file); pass the network-snapshot-* file written beside it, or resume the training '
                              f'from it with train.py --resume')
    data = _read_nvlabs_pickle(src)
    return dict(
        ema=_finish(_network_from_record(data['ema'], src, 'ema'), 'cpu'),
        loss_fn=_loss_from_record(data.get('loss_fn'), src),
        augment_pipe=_augment_from_record(data.get('augment_pipe'), src),
        encoder=_encoder_from_record(data.get('encoder'), src),
        dataset_kwargs=_plain_dict(data.get('dataset_kwargs'), src, 'dataset_kwargs'),
        extra=None,
        format='nvlabs-pickle',
    )


def load_training_state(path):
    """An NVlabs `training-state-*.pt`: dict(net=<edm_fast module, CPU, train mode>, optimizer_state=<dict>).

    `optimizer_state` is Adam's state dict (plain tensors and dicts), keyed by parameter index in
    `net.parameters()` order, ready for `optimizer.load_state_dict`.
    """
    src = _source(path)
    kind = detect_format(src)
    if kind != 'zip':
        raise CheckpointError(f'cannot load {src} as a training state: it is '
                              f'{"an NVlabs network pickle" if kind == "pickle" else "an edm_fast snapshot"}, not a '
                              f'training-state-*.pt file; to start from its weights, use --transfer')
    data = _read_training_state(src)
    if 'optimizer_state' not in data or not isinstance(data['optimizer_state'], dict):
        raise CheckpointError(f'cannot load {src}: the training state has no optimizer_state dict')
    net = _network_from_record(data['net'], src, 'net')
    return dict(net=_finish(net, 'cpu', train=True), optimizer_state=data['optimizer_state'])
