"""Small helpers shared across the package: constructor-argument recording and JSON-safe values."""

import copy
import functools
import inspect

import numpy as np


def record_init_kwargs(cls):
    """Class decorator: store the arguments a constructor actually received as `self.init_kwargs`.

    Mirrors what NVlabs pickles keep in `_init_kwargs`: only the arguments that were passed (defaults
    are not filled in), positional arguments mapped to their names, `**kwargs` flattened. Snapshots
    rebuild a module as `cls(**init_kwargs)`, so these must be enough to reconstruct it.
    """
    orig_init = cls.__init__
    sig = inspect.signature(orig_init)

    @functools.wraps(orig_init)
    def __init__(self, *args, **kwargs):
        orig_init(self, *args, **kwargs)
        if type(self) is not cls and hasattr(self, 'init_kwargs'):
            return  # a decorated subclass records its own arguments
        bound = sig.bind(self, *args, **kwargs)
        recorded = {}
        for name, value in list(bound.arguments.items())[1:]:
            kind = sig.parameters[name].kind
            if kind == inspect.Parameter.VAR_KEYWORD:
                recorded.update(value)
            elif kind == inspect.Parameter.VAR_POSITIONAL:
                if value:
                    raise TypeError(f'{cls.__name__} cannot record extra positional arguments {value!r}')
            else:
                recorded[name] = value
        object.__setattr__(self, 'init_kwargs', copy.deepcopy(recorded))

    cls.__init__ = __init__
    return cls


def to_jsonable(value):
    """Convert numpy scalars/arrays, tuples and nested containers into plain JSON types."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    raise TypeError(f'cannot store a value of type {type(value).__name__} in a snapshot header: {value!r}')


class Logger:
    """Tee sys.stdout and sys.stderr into a log file (append mode) until close()."""

    def __init__(self, file_name, file_mode='a'):
        import sys
        self.file = open(file_name, file_mode)
        self.stdout, self.stderr = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(self.stdout, self.file), _Tee(self.stderr, self.file)

    def close(self):
        import sys
        sys.stdout, sys.stderr = self.stdout, self.stderr
        self.file.close()


class _Tee:
    def __init__(self, stream, file):
        self.stream, self.file = stream, file

    def write(self, text):
        self.stream.write(text)
        if not self.file.closed:
            self.file.write(text)
            self.file.flush()

    def flush(self):
        self.stream.flush()
        if not self.file.closed:
            self.file.flush()

    def isatty(self):
        return False

    def __getattr__(self, name):
        return getattr(self.stream, name)


def format_time(seconds):
    """'1d 02h 03m', '2h 03m 04s', '3m 04s' or '5s' (NVlabs status-line format)."""
    s = int(round(seconds))
    if s < 60:
        return f'{s}s'
    if s < 60 * 60:
        return f'{s // 60}m {s % 60:02d}s'
    if s < 24 * 60 * 60:
        return f'{s // 3600}h {(s // 60) % 60:02d}m {s % 60:02d}s'
    return f'{s // 86400}d {(s // 3600) % 24:02d}h {(s // 60) % 60:02d}m'


def print_module_summary(module, inputs, max_nesting=3, skip_redundant=True):
    """Print a table of submodules (parameters, buffers, output shape, dtype) from one forward pass.

    The forward runs as the module is (training mode included), so it consumes RNG like NVlabs's
    summary does. Returns the outputs.
    """
    import torch
    entries = []
    nesting = [0]

    def pre_hook(_mod, _inputs):
        nesting[0] += 1

    def post_hook(mod, _inputs, outputs):
        nesting[0] -= 1
        if nesting[0] <= max_nesting:
            outs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
            entries.append((mod, [t for t in outs if isinstance(t, torch.Tensor)]))

    hooks = [m.register_forward_pre_hook(pre_hook) for m in module.modules()]
    hooks += [m.register_forward_hook(post_hook) for m in module.modules()]
    with torch.no_grad():
        outputs = module(*inputs)
    for h in hooks:
        h.remove()

    names = {mod: name for name, mod in module.named_modules()}
    seen = set()
    rows = [[type(module).__name__, 'Parameters', 'Buffers', 'Output shape', 'Datatype'], ['---'] * 5]
    total_p = total_b = 0
    for mod, outs in entries:
        params = [p for p in mod.parameters() if id(p) not in seen]
        buffers = [b for b in mod.buffers() if id(b) not in seen]
        new_outputs = [t for t in outs if id(t) not in seen]
        seen.update(id(t) for t in params + buffers + outs)
        if skip_redundant and not params and not buffers and not new_outputs:
            continue  # as NVlabs: only rows that add nothing new (e.g. a module returning its input) are left out
        np_, nb = sum(p.numel() for p in params), sum(b.numel() for b in buffers)
        total_p, total_b = total_p + np_, total_b + nb
        shapes = [str(list(t.shape)) for t in outs] or ['-']
        dtypes = [str(t.dtype).split('.')[-1] for t in outs] or ['-']
        name = names.get(mod, '?') or '<top-level>'
        for i, (shape, dtype) in enumerate(zip(shapes, dtypes)):
            rows.append([name + (f':{i}' if len(outs) > 1 else '') if i == 0 or len(outs) > 1 else '',
                         str(np_) if i == 0 and np_ else '-', str(nb) if i == 0 and nb else '-', shape, dtype])
    rows += [['---'] * 5, ['Total', str(total_p), str(total_b), '-', '-']]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    print()
    for r in rows:
        print('  '.join(c + ' ' * (w - len(c)) for c, w in zip(r, widths)))  # padded to the last column, as NVlabs
    print()
    return outputs


_umask = None


def _file_mode():
    """0o666 less the process umask, as open() would create a file (mkstemp makes every file 0o600)."""
    global _umask
    if _umask is None:
        import os
        _umask = os.umask(0o022)
        os.umask(_umask)
    return 0o666 & ~_umask


def atomic_write(path, write, durable=True):
    """Write a file atomically: `write(f)` fills a temporary file in the same folder (a binary file object), which
    is renamed over `path`, so a killed process leaves either the old file or the new one. The file gets the
    permissions a plain open() would give (the umask applies). durable: also fsync the file and its folder, so a
    power loss cannot leave an empty file behind a completed rename (snapshots, training states; not worth a
    disk flush per image for PNGs)."""
    import os
    import tempfile
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{os.path.basename(path)}.', suffix='.tmp', dir=folder)
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, 'wb') as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    if durable:
        try:  # make the rename itself durable; not possible on every file system
            dfd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass
    return path


def one_line(error):
    """The message of a user error on one line. An error re-raised from a DataLoader worker carries the worker's
    traceback in its message ('Caught DatasetError in DataLoader worker ...'); its last line is the message.
    Other multi-line messages are joined."""
    import re
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if len(lines) > 1 and lines[0].startswith('Caught '):
        m = re.fullmatch(r'[\w.]*(?:Error|Exception|Warning)\w*: (.*)', lines[-1])
        return m.group(1) if m else lines[-1]
    return ' '.join(lines)
