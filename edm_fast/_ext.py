"""Loads the optional CUDA extension `edm_fast._C` and remembers why it is missing if it is."""

import importlib
import json
import os

_module = None
_reason = None


def _build_reason():
    try:
        with open(os.path.join(os.path.dirname(__file__), '_build_info.json')) as f:
            return json.load(f).get('reason')
    except (OSError, ValueError):
        return None


def load():
    """Return the extension module, or None when it was not built or cannot load here."""
    global _module, _reason
    if _module is None and _reason is None:
        try:
            _module = importlib.import_module('edm_fast._C')
        except ImportError as e:
            why = _build_reason()
            _reason = (f'it was not built: {why}' if why else f'it failed to load ({e})') + \
                '; build it with a CUDA build of torch and nvcc: pip install -e . --no-build-isolation'
    return _module


def available():
    return load() is not None


def reason():
    """Why the extension is unavailable (None when it loaded)."""
    load()
    return _reason
