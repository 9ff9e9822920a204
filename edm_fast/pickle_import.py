"""Read official NVlabs EDM/EDM2 pickles and training states without running the code inside them.

NVlabs network pickles (`edm-*.pkl`, `network-snapshot-*.pkl`) store every network, loss and augment
object as a call to `torch_utils.persistence._reconstruct_persistent_obj(meta)`, whose `meta` carries the
full source text of the defining module; the official loader `exec`s that text. Here (spec §9.3):

* `RestrictedUnpickler.find_class` resolves only an allow-list of globals. Anything else is refused with
  an error naming the global, before any of it runs.
* `_reconstruct_persistent_obj` maps to a factory returning a passive `PersistentRecord`
  (class name, format version, instance state, sha256 of the module source). The source is never run.
* `torch.nn.ModuleDict` becomes `ModuleDictStub`, which only stores its state.
* Tensors and Parameters are rebuilt by torch's own rebuild functions; the nested legacy storage blobs
  of plain pickles are read with `torch.load(..., weights_only=True)` (fp32 for EDM, fp16 for EDM2 snapshots).
* EDM2 pickles additionally hold `dnnlib.util.EasyDict` containers (a dict subclass here) and numpy
  arrays (the VAE encoder's scale and bias), rebuilt by numpy's own `_reconstruct` / `_frombuffer`.

`load_pickle(path)` reads a network pickle, `load_torch_file(path)` a `training-state-*.pt` (zip
`torch.save`, pickle protocol 2). `iter_state_dict(record)` yields the tensors under the names `state_dict()`
of the reference object would give, and `init_kwargs(record, cls)` its constructor arguments.
"""

import codecs
import collections
import hashlib
import inspect
import io
import pickle
import warnings

import numpy as np
import torch

__all__ = ['CheckpointError', 'PersistentRecord', 'ModuleDictStub', 'EasyDict', 'RestrictedUnpickler',
           'load_pickle', 'load_torch_file', 'torch_pickle_module', 'iter_state_dict', 'init_kwargs',
           'iter_records', 'is_record', 'to_plain']


class CheckpointError(Exception):
    """A checkpoint could not be read: missing, corrupt, refused as unsafe, or not what was expected."""


PERSISTENCE_VERSION = 6  # the only format version of torch_utils.persistence that EDM/EDM2 write

_TRUST_HINT = 'only load checkpoints you trust with the official code'


class PersistentRecord:
    """Passive stand-in for an object stored by NVlabs `torch_utils.persistence`.

    `class_name` is the reference class (e.g. 'EDMPrecond'), `state` its instance `__dict__` as pickled
    (for a Module: training, _parameters, _buffers, _non_persistent_buffers_set, hooks, _modules, plain
    attributes, _init_args, _init_kwargs). `module_src_sha256` identifies the embedded module source
    (kept for provenance only; the text itself is dropped and never run).
    """

    __slots__ = ('class_name', 'version', 'type', 'state', 'module_src_sha256')

    def __init__(self, class_name, version, type, state, module_src_sha256):
        self.class_name = class_name
        self.version = version
        self.type = type
        self.state = state
        self.module_src_sha256 = module_src_sha256

    def __repr__(self):
        return f'PersistentRecord({self.class_name!r}, sha256={self.module_src_sha256[:12]}...)'


class ModuleDictStub:
    """Stand-in for `torch.nn.ModuleDict` (pickled by NEWOBJ + BUILD): keeps its Module `__dict__`."""

    class_name = 'ModuleDict'

    def __init__(self, *args, **kwargs):
        self.state = {}

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f'ModuleDict state is a {type(state).__name__}, expected a dict')
        self.state = state

    def __repr__(self):
        return f'ModuleDictStub({list(self.state.get("_modules", {}))})'


class EasyDict(dict):
    """Stand-in for `dnnlib.util.EasyDict`: a dict with attribute access."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value

    def __delattr__(self, name):
        del self[name]


def is_record(obj):
    return isinstance(obj, (PersistentRecord, ModuleDictStub))


def _load_storage_from_bytes(blob):
    """Replacement for `torch.storage._load_from_bytes`: read a nested legacy torch.save blob safely."""
    if not isinstance(blob, (bytes, bytearray)):
        raise pickle.UnpicklingError(f'torch.storage._load_from_bytes got a {type(blob).__name__}, expected bytes')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # TypedStorage deprecation noise
        return torch.load(io.BytesIO(blob), weights_only=True, map_location='cpu')


def _numpy_attr(name):
    core = getattr(np, '_core', None)
    if core is not None and hasattr(core, 'multiarray') and hasattr(core.multiarray, name):
        return getattr(core.multiarray, name)
    from numpy.core import multiarray  # numpy 1.x
    return getattr(multiarray, name)


def _numpy_frombuffer(buf, dtype, shape, order):
    """numpy's protocol-5 array rebuild: an array of plain (non-object) dtype copied from a byte buffer."""
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise pickle.UnpicklingError(f'refusing a numpy array of object dtype {dtype}')
    return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order).copy()


def _fresh(fn):
    """A throwaway wrapper, so a crafted BUILD on an allowed global cannot alter the real function."""
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)
    wrapper.__name__ = wrapper.__qualname__ = getattr(fn, '__name__', 'wrapper')
    return wrapper


def _allowed_globals():
    """Allow-list (spec §9.3), built per unpickler: Python-level callables and our stub classes are fresh
    wrappers/subclasses, so attribute tampering through BUILD stays inside one load. C types and builtins
    (OrderedDict, numpy) are immutable and used directly."""
    from torch import _utils as tu
    allowed = {
        ('collections', 'OrderedDict'): collections.OrderedDict,
        ('torch._utils', '_rebuild_tensor_v2'): _fresh(tu._rebuild_tensor_v2),
        ('torch._utils', '_rebuild_parameter'): _fresh(tu._rebuild_parameter),
        ('torch._utils', '_rebuild_parameter_with_state'): _fresh(tu._rebuild_parameter_with_state),
        ('torch.storage', '_load_from_bytes'): _fresh(_load_storage_from_bytes),
        ('torch.nn.modules.container', 'ModuleDict'): type('ModuleDict', (ModuleDictStub,), {}),
        ('dnnlib.util', 'EasyDict'): type('EasyDict', (EasyDict,), {}),
        ('numpy', 'dtype'): np.dtype,
        ('numpy', 'ndarray'): np.ndarray,
    }
    for mod in ('numpy.core.multiarray', 'numpy._core.multiarray'):
        allowed[(mod, 'scalar')] = _numpy_attr('scalar')
        allowed[(mod, '_reconstruct')] = _numpy_attr('_reconstruct')
    for mod in ('numpy.core.numeric', 'numpy._core.numeric'):  # arrays in pickle protocol 5 (out-of-band buffers)
        allowed[(mod, '_frombuffer')] = _fresh(_numpy_frombuffer)
    return allowed


# Extra globals that protocol-2 `torch.save` files (training-state-*.pt) need.
_TORCH_SAVE_EXTRAS = {
    ('builtins', 'set'): set,
    ('__builtin__', 'set'): set,
    ('_codecs', 'encode'): codecs.encode,
}

_PERSISTENT_GLOBAL = ('torch_utils.persistence', '_reconstruct_persistent_obj')


class RestrictedUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` that resolves only the globals an EDM checkpoint needs (spec §9.3).

    `source` names the file in error messages. With `torch_save=True` the few extra globals of
    protocol-2 `torch.save` files are allowed as well.
    """

    def __init__(self, file, *, source='<pickle>', torch_save=False, **kwargs):
        super().__init__(file, **kwargs)
        self.source = str(source)
        self._allowed = _allowed_globals()
        if torch_save:
            self._allowed.update(_TORCH_SAVE_EXTRAS)

    def find_class(self, module, name):
        if (module, name) == _PERSISTENT_GLOBAL:
            return self._reconstruct_persistent_obj
        try:
            return self._allowed[(module, name)]
        except (KeyError, TypeError):
            pass
        raise CheckpointError(
            f'refusing to load {self.source}: it references {module}.{name}, which is not an allowed global '
            f'for an EDM checkpoint; {_TRUST_HINT}')

    def _reconstruct_persistent_obj(self, meta):
        """Harmless replacement for `torch_utils.persistence._reconstruct_persistent_obj`."""
        if not isinstance(meta, dict):
            raise CheckpointError(f'refusing to load {self.source}: a persistent object has metadata of type '
                                  f'{type(meta).__name__}, expected a dict')
        class_name = meta.get('class_name')
        version = meta.get('version')
        if version != PERSISTENCE_VERSION:
            raise CheckpointError(
                f'cannot load {self.source}: persistent object {class_name!r} uses torch_utils.persistence '
                f'format version {version!r}, but only version {PERSISTENCE_VERSION} (NVlabs EDM/EDM2) is '
                f'supported; re-export it with the official code')
        if meta.get('type') != 'class':
            raise CheckpointError(f'cannot load {self.source}: persistent object {class_name!r} has type '
                                  f'{meta.get("type")!r}, expected \'class\'')
        state = meta.get('state')
        src = meta.get('module_src')
        if not isinstance(class_name, str) or not isinstance(state, dict) or not isinstance(src, str):
            raise CheckpointError(f'cannot load {self.source}: malformed persistent object record '
                                  f'(class_name={class_name!r}, state of type {type(state).__name__})')
        sha = hashlib.sha256(src.encode('utf-8', 'surrogatepass')).hexdigest()
        return PersistentRecord(class_name, version, 'class', state, sha)


def _wrap_errors(source, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except CheckpointError:
        raise
    except MemoryError:
        raise
    except Exception as e:  # EOFError, UnpicklingError, RuntimeError from torch, ...
        raise CheckpointError(
            f'could not read {source}: {type(e).__name__}: {e}. The file looks truncated or corrupt, or is not an '
            f'EDM checkpoint; check the path or download it again') from e


def load_pickle(path):
    """Unpickle an NVlabs network pickle with the restricted unpickler (persistent objects -> records)."""
    with open(path, 'rb') as f:
        return _wrap_errors(path, lambda: RestrictedUnpickler(f, source=path).load())


class _TorchPickleModule:
    """Module-like object for `torch.load(pickle_module=...)`: restricted Unpickler bound to a source name."""

    __name__ = 'edm_fast.pickle_import'

    def __init__(self, source):
        src = str(source)

        class Unpickler(RestrictedUnpickler):
            def __init__(self, file, **kwargs):
                super().__init__(file, source=src, torch_save=True, **kwargs)

        self.Unpickler = Unpickler
        self.UnpicklingError = pickle.UnpicklingError

    def load(self, file, **kwargs):
        return self.Unpickler(file, **kwargs).load()


def torch_pickle_module(source='<torch file>'):
    return _TorchPickleModule(source)


def load_torch_file(path):
    """Read a zip-format `torch.save` file (e.g. NVlabs training-state-*.pt) through the restricted unpickler."""
    def _load():
        with open(path, 'rb') as f:
            # A file object, not the path: torch.load dispatches '*.safetensors' paths elsewhere.
            return torch.load(f, map_location='cpu', weights_only=False, pickle_module=torch_pickle_module(path))
    return _wrap_errors(path, _load)

# ----------------------------------------------------------------------------------------------------
# Walking records.


def _entries(state, key, source):
    value = state.get(key, {})
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CheckpointError(f'{source}: {key} is a {type(value).__name__}, expected a dict')
    return value


def iter_state_dict(record, prefix='', source='<checkpoint>'):
    """Yield (name, tensor) in `state_dict()` order: parameters, persistent buffers, then children (§9.3)."""
    if not is_record(record):
        raise CheckpointError(f'{source}: expected a module record at {prefix or "<top>"}, got '
                              f'{type(record).__name__}')
    state = record.state
    for name, value in _entries(state, '_parameters', source).items():
        if value is not None:
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f'{source}: parameter {prefix}{name} is a {type(value).__name__}')
            yield prefix + name, value.detach()
    non_persistent = state.get('_non_persistent_buffers_set') or set()
    for name, value in _entries(state, '_buffers', source).items():
        if value is not None and name not in non_persistent:
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f'{source}: buffer {prefix}{name} is a {type(value).__name__}')
            yield prefix + name, value.detach()
    for name, child in _entries(state, '_modules', source).items():
        if child is not None:
            yield from iter_state_dict(child, f'{prefix}{name}.', source)


def iter_records(record, prefix=''):
    """Yield (module name, record) for a record and all its descendants (named_modules order)."""
    yield prefix, record
    for name, child in (record.state.get('_modules') or {}).items():
        if is_record(child):
            yield from iter_records(child, f'{prefix}.{name}' if prefix else name)


def to_plain(value):
    """EasyDicts -> dicts, recursively (numpy scalars kept: the constructors accept them)."""
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(to_plain(v) for v in value)
    return value


def init_kwargs(record, cls=None, source='<checkpoint>'):
    """Constructor kwargs of a record: `_init_kwargs`, plus `_init_args` mapped to names using `cls`."""
    state = record.state
    kwargs = state.get('_init_kwargs')
    args = state.get('_init_args')
    if kwargs is None and args is None:
        raise CheckpointError(f'{source}: {record.class_name} does not record its constructor arguments '
                              f'(_init_args/_init_kwargs are missing)')
    kwargs = to_plain(dict(kwargs or {}))
    args = tuple(args or ())
    if args:
        if cls is None:
            raise CheckpointError(f'{source}: {record.class_name} was built with positional arguments; '
                                  f'their names need the class')
        params = [p for p in inspect.signature(cls).parameters.values()
                  if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        if len(args) > len(params):
            raise CheckpointError(f'{source}: {record.class_name} got {len(args)} positional arguments, but '
                                  f'{cls.__name__} takes at most {len(params)}')
        named = {}
        for p, value in zip(params, args):
            if p.name in kwargs:
                raise CheckpointError(f'{source}: {record.class_name} got {p.name!r} both positionally and by name')
            named[p.name] = to_plain(value)
        kwargs = {**named, **kwargs}
    return kwargs
