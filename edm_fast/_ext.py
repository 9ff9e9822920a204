"""Loads the optional CUDA extension `edm_fast._C` and remembers why it is missing if it is."""

import importlib

_module = None
_reason = None


def load():
    """Return the extension module, or None when it was not built or cannot load here."""
    global _module, _reason
    if _module is None and _reason is None:
        try:
            _module = importlib.import_module('edm_fast._C')
        except ImportError as e:
            _reason = f'edm_fast._C is not built or failed to load ({e}); reinstall with a CUDA toolchain ' \
                      f'and a CUDA build of torch: pip install -e . --no-build-isolation'
    return _module


def available():
    return load() is not None


def reason():
    """Why the extension is unavailable (None when it loaded)."""
    load()
    return _reason
