"""sample.py --resume: which seeds a killed run still owes, and a guard against mixing runs in one folder.

Every run writes <outdir>/.sample-settings.json (hidden: `ls` and `*` still list images only) with everything
that decides the pixels of an image of a given seed (network file, sampler options, class, guidance, fast path
and its dtype). Batch size, process count, torch.compile and CUDA graphs are left out because they do not
change the images. With --resume, a seed whose PNG exists is skipped. PNGs are written atomically, so an
existing file is a complete image. A resume with different settings, or into a folder whose PNGs have no
settings file, is refused, because the folder would otherwise end up holding images from two different
samplers.
"""

import json
import os

import torch

from . import distributed, image_io
from .util import atomic_write

SETTINGS_FILE = '.sample-settings.json'


def _file_id(path):
    if path is None:
        return None
    path = os.path.realpath(path)
    return dict(path=path, bytes=os.path.getsize(path) if os.path.isfile(path) else None)


def settings(network_path, gnet_path, vae_path, class_idx, guidance, fast_dtype, sampler_kwargs):
    """The settings that decide an image's pixels, as a JSON-able dict (fast_dtype: None on the reference path)."""
    return dict(network=_file_id(network_path), gnet=_file_id(gnet_path), vae=vae_path, class_idx=class_idx,
                guidance=guidance, fast_dtype=fast_dtype,
                sampler={k: sampler_kwargs[k] for k in sorted(sampler_kwargs)})


def _normalise(value):
    return json.loads(json.dumps(value))  # tuples -> lists, inf -> Infinity round trip, as stored


def _plan(outdir, seeds, subdirs, wanted, resume):
    path = os.path.join(outdir, SETTINGS_FILE)
    done = [s for s in seeds if os.path.exists(image_io.image_path(outdir, s, subdirs))] if resume else []
    if resume and done:
        if not os.path.exists(path):
            return (f'--resume: {outdir} holds {len(done)} of the requested PNGs but no {SETTINGS_FILE}, so '
                    f'the settings that made them are unknown; sample into a new --outdir, or drop --resume '
                    f'to overwrite them')
        try:
            with open(path) as f:
                stored = json.load(f)
        except (OSError, ValueError) as e:
            return f'--resume: cannot read {path} ({e}); drop --resume to start over'
        wanted_n = _normalise(wanted)
        differ = sorted(k for k in set(stored) | set(wanted_n) if stored.get(k) != wanted_n.get(k))
        if differ:
            detail = '; '.join(f'{k}: was {stored.get(k)!r}, now {wanted_n.get(k)!r}' for k in differ)
            return (f'--resume: the images in {outdir} were made with other settings ({detail}); use the same '
                    f'flags, another --outdir, or drop --resume to overwrite them')
    atomic_write(path, lambda f: f.write((json.dumps(wanted, indent=2) + '\n').encode()))
    done = set(done)
    return [s for s in seeds if s not in done]


def seeds_to_generate(outdir, seeds, subdirs, wanted, resume):
    """The seeds this run must generate, the same list on every rank; writes the settings file (rank 0).

    Raises ValueError (on every rank) when --resume would mix images of different settings.
    """
    plan = None
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        try:
            plan = _plan(outdir, seeds, subdirs, wanted, resume)
        except OSError as e:  # every rank must leave the broadcast below with the same answer
            plan = f'cannot write {os.path.join(outdir, SETTINGS_FILE)}: {e}'
    plan = distributed.broadcast_from_rank0(plan)
    if isinstance(plan, str):
        raise ValueError(plan)
    return plan
