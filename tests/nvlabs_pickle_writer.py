"""Test helper: write files in the official NVlabs formats from edm_fast objects (spec §9.1-9.2).

Every edm_fast network/loss object (and `FakeAugmentPipe`) is pickled the way NVlabs
`torch_utils.persistence` does it: a call `torch_utils.persistence._reconstruct_persistent_obj(meta)` with
meta = {'type': 'class', 'version': 6, 'module_src': ..., 'class_name': ..., 'state': <instance __dict__
with _init_args/_init_kwargs>}. The module source text is supplied by the test (it must never run).
`torch.nn.ModuleDict`, tensors and Parameters pickle natively. A throwaway `torch_utils.persistence`
module exists in sys.modules only while dumping, so that pickle can name the global.
"""

import contextlib
import copy
import pickle
import sys
import types

import torch

DEFAULT_MODULE_SRC = "raise RuntimeError('this module source must never be executed')\n"


class FakeAugmentPipe:
    """Stands in for NVlabs AugmentPipe (not implemented yet): only its constructor kwargs matter."""

    def __init__(self, p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1):
        self.init_kwargs = dict(p=p, xflip=xflip, yflip=yflip, scale=scale, rotate_frac=rotate_frac, aniso=aniso,
                                translate_frac=translate_frac)
        for name, value in self.init_kwargs.items():  # NVlabs stores each probability as a float attribute
            setattr(self, name, float(value))


def _is_persistent(obj):
    if isinstance(obj, FakeAugmentPipe):
        return True
    mod = type(obj).__module__ or ''
    return mod.startswith('edm_fast.') and hasattr(obj, 'init_kwargs')


def _class_name(obj):
    return 'AugmentPipe' if isinstance(obj, FakeAugmentPipe) else type(obj).__name__


@contextlib.contextmanager
def _fake_modules(**objects):
    """Register throwaway modules holding the given globals ('pkg.mod.name' -> object) while dumping."""
    created = {}
    for qualified, obj in objects.items():
        module_name, name = qualified.rsplit('.', 1)
        parts = module_name.split('.')
        for i in range(1, len(parts) + 1):
            mname = '.'.join(parts[:i])
            if mname not in created:
                if mname in sys.modules:
                    raise RuntimeError(f'module {mname} already exists; refusing to shadow it')
                created[mname] = types.ModuleType(mname)
                created[mname].__path__ = []
                if i > 1:
                    setattr(created['.'.join(parts[:i - 1])], parts[i - 1], created[mname])
        obj.__module__ = module_name
        obj.__qualname__ = name
        setattr(created[module_name], name, obj)
    sys.modules.update(created)
    try:
        yield
    finally:
        for mname in created:
            sys.modules.pop(mname, None)


def _fake_reconstruct():
    def _reconstruct_persistent_obj(meta):
        raise RuntimeError('the fake torch_utils.persistence must never be used for loading')
    return _reconstruct_persistent_obj


def make_easydict_type():
    """A stand-in for dnnlib.util.EasyDict (pickled as that global inside `dump_nvlabs(easydict_type=...)`)."""
    class EasyDict(dict):
        pass
    return EasyDict


def make_pickle_module(module_src=DEFAULT_MODULE_SRC, reconstruct=None, version=6):
    """A module-like object (Pickler/dump) whose Pickler emits NVlabs persistent records.

    `reconstruct` is the function object pickle names as `torch_utils.persistence._reconstruct_persistent_obj`
    (it must be registered in sys.modules while dumping: see `_fake_modules`). `version` is the
    persistence format version written into every record (6 in all real files).
    """

    class Pickler(pickle.Pickler):
        def reducer_override(self, obj):
            if not _is_persistent(obj):
                return NotImplemented
            if isinstance(obj, torch.nn.Module):
                state = obj.__getstate__()
            else:
                state = dict(vars(obj))
            state = dict(state)
            init_kwargs = copy.deepcopy(state.pop('init_kwargs'))
            state['_init_args'] = ()
            state['_init_kwargs'] = init_kwargs
            meta = dict(type='class', version=version, module_src=module_src, class_name=_class_name(obj), state=state)
            return reconstruct, (meta,)

    def dump(obj, file, protocol=4):
        Pickler(file, protocol=protocol).dump(obj)

    return types.SimpleNamespace(__name__='nvlabs_pickle_writer', Pickler=Pickler, dump=dump,
                                 Unpickler=pickle.Unpickler, load=pickle.load)


def dump_nvlabs(obj, path, module_src=DEFAULT_MODULE_SRC, protocol=4, version=6, easydict_type=None):
    """Pickle any object (edm_fast objects become persistent records), like NVlabs `pickle.dump`.

    If `easydict_type` (from `make_easydict_type`) is given, its instances are pickled as
    `dnnlib.util.EasyDict`, as in EDM2 pickles.
    """
    reconstruct = _fake_reconstruct()
    fakes = {'torch_utils.persistence._reconstruct_persistent_obj': reconstruct}
    if easydict_type is not None:
        fakes['dnnlib.util.EasyDict'] = easydict_type
    with _fake_modules(**fakes):
        pm = make_pickle_module(module_src, reconstruct, version)
        with open(path, 'wb') as f:
            pm.dump(obj, f, protocol=protocol)


def write_network_pickle(path, ema, loss_fn=None, augment_pipe=None, dataset_kwargs=None,
                         module_src=DEFAULT_MODULE_SRC, **kwargs):
    """An official-format `network-snapshot-*.pkl` / `edm-*.pkl` (spec §5.5, §9.2)."""
    data = dict(ema=ema, loss_fn=loss_fn, augment_pipe=augment_pipe,
                dataset_kwargs=dict(dataset_kwargs) if dataset_kwargs is not None else None)
    dump_nvlabs(data, path, module_src=module_src, **kwargs)


def write_training_state(path, net, optimizer, module_src=DEFAULT_MODULE_SRC, extra=None):
    """An official-format `training-state-*.pt`: zip torch.save with pickle protocol 2 (spec §5.5).

    `extra` (a dict) is merged into the saved dict, e.g. to plant objects for refusal tests.
    """
    reconstruct = _fake_reconstruct()
    with _fake_modules(**{'torch_utils.persistence._reconstruct_persistent_obj': reconstruct}):
        pm = make_pickle_module(module_src, reconstruct)
        data = dict(net=net, optimizer_state=optimizer.state_dict(), **(extra or {}))
        torch.save(data, path, pickle_module=pm, pickle_protocol=2)
