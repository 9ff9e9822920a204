"""Backend selection for edm_fast ops.

Every public op (`edm_fast.ops.<op>`) asks `select(op, backend, *args)` for an implementation. The
choice, in order of precedence:

1. an explicit `backend=` argument on the call;
2. the `EDM_FAST_BACKEND` environment variable: one backend for every op (`cuda`), per-op
   entries (`group_norm=triton,attention=reference`), or both (`auto,attention=reference`);
3. `auto`: the op's preferred order (by default the CUDA extension, then Triton, then PyTorch's own
   fused kernels `sdpa`, then the reference), taking the first backend that supports the inputs. An op
   may set its own order with `set_auto_order` when a benchmark shows another provider is faster.

Under `auto` an unsupported backend is skipped quietly; an explicitly requested backend that cannot
run raises an error saying why. Each selection is counted (outside of torch.compile tracing) so tests
can prove which implementation actually ran: see `record_backends()`.
"""

import collections
import contextlib
import os

import torch

BACKENDS = ('reference', 'sdpa', 'triton', 'cuda')
AUTO_ORDER = ('cuda', 'triton', 'sdpa', 'reference')
ENV_VAR = 'EDM_FAST_BACKEND'

# op name -> backend name -> (implementation, supports(*args, **kwargs) -> None or reason string, prefer)
_registry = collections.defaultdict(dict)
_counts = collections.Counter()
_auto_order = {}


def register(op, backend, impl, supports=None, prefer=None):
    """Register `impl` as the `backend` implementation of `op`.

    `supports(*args, **kwargs)` returns None when the implementation can run on these inputs and a
    short reason string when it cannot. `prefer(*args, **kwargs)` (optional) returns False for inputs where
    `auto` should pass this backend over although it could run them (a benchmark found another faster);
    an explicit request still runs it.
    """
    if backend not in BACKENDS:
        raise ValueError(f'unknown backend {backend!r}; expected one of {BACKENDS}')
    _registry[op][backend] = (impl, supports or (lambda *a, **k: None), prefer)


def set_preference(op, backend, prefer):
    """Attach or replace the auto-mode preference of an already registered backend."""
    impl, supports, _ = _registry[op][backend]
    _registry[op][backend] = (impl, supports, prefer)


def set_auto_order(op, order):
    """Backends `auto` tries for `op`, in order (unknown or unregistered names are skipped)."""
    unknown = [b for b in order if b not in BACKENDS]
    if unknown:
        raise ValueError(f'unknown backends {unknown}; expected names from {BACKENDS}')
    _auto_order[op] = tuple(order)


def implementations(op):
    """Names of the backends registered for `op`."""
    return tuple(b for b in BACKENDS if b in _registry[op])


_parsed_env = {}


def _parse_env(value):
    # A plain dict cache (not functools.lru_cache, which torch.compile warns about and traces through).
    if value in _parsed_env:
        return _parsed_env[value]
    default, per_op = 'auto', {}
    for item in filter(None, (s.strip() for s in value.split(','))):
        name, sep, backend = item.partition('=')
        target = backend.strip() if sep else name
        if target not in BACKENDS + ('auto',):
            raise ValueError(f'{ENV_VAR}={value!r}: unknown backend {target!r}; '
                             f'use one of {BACKENDS + ("auto",)}, optionally as op=backend')
        if sep:
            per_op[name.strip()] = target
        else:
            default = target
    _parsed_env[value] = (default, per_op)
    return default, per_op


def requested_backend(op, backend=None):
    """The backend asked for by the call or the environment ('auto' when neither asks)."""
    if backend is not None:
        return backend
    default, per_op = _parse_env(os.environ.get(ENV_VAR, ''))
    return per_op.get(op, default)


def select(op, backend, *args, **kwargs):
    """Return (backend name, implementation) for this call of `op`."""
    want = requested_backend(op, backend)
    impls = _registry[op]
    if want == 'auto':
        for name in _auto_order.get(op, AUTO_ORDER):
            if name not in impls or impls[name][1](*args, **kwargs) is not None:
                continue
            prefer = impls[name][2]
            if prefer is not None and not prefer(*args, **kwargs):
                continue
            return _chosen(op, name, impls[name][0])
        raise RuntimeError(f'edm_fast.ops.{op}: no backend supports these inputs')
    if want not in BACKENDS:
        raise ValueError(f'edm_fast.ops.{op}: unknown backend {want!r}; expected auto or one of {BACKENDS}')
    if want not in impls:
        raise RuntimeError(f'edm_fast.ops.{op}: backend {want!r} is not available '
                           f'({_unavailable_reason(want)}); available: {implementations(op)}')
    reason = impls[want][1](*args, **kwargs)
    if reason is not None:
        raise RuntimeError(f'edm_fast.ops.{op}: backend {want!r} cannot run these inputs: {reason}')
    return _chosen(op, want, impls[want][0])


def _unavailable_reason(backend):
    if backend == 'cuda':
        from .. import _ext
        return _ext.reason() or 'this op has no CUDA kernel'
    if backend == 'triton':
        return 'this op has no Triton kernel or triton is not installed'
    return 'not registered'


def _chosen(op, name, impl):
    if not torch.compiler.is_compiling():
        _counts[(op, name)] += 1
    return name, impl


def backend_counts():
    """A copy of the (op, backend) -> number of calls counter since import."""
    return collections.Counter(_counts)


@contextlib.contextmanager
def record_backends():
    """Context manager yielding a Counter of (op, backend) selections made inside the block."""
    before = collections.Counter(_counts)
    result = collections.Counter()
    try:
        yield result
    finally:
        result.update(_counts - before)
