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
