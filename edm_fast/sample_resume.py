"""sample.py --resume: which seeds a killed run still owes, and a record of which settings made which PNG.

<outdir>/.sample-settings.json (hidden: `ls` and `*` still list images only) records, for every seed a run
wrote into the folder, the settings that decide its pixels (network file, sampler options, class, guidance,
fast path and its dtype; batch size, process count, torch.compile and CUDA graphs do not change an image):

    {"runs": [{"settings": {...}, "seeds": [[0, 49999]], "pending": [[100, 199]], "pending_since": ns}, ...]}

`seeds` are inclusive ranges. `pending` are seeds whose PNG existed with other (or unrecorded) settings when a
run that owes them started: until that run finishes, such a PNG may be the stale image, so --resume
regenerates it unless the file is newer than the run's start (`pending_since`). A plain run (no --resume) overwrites as NVlabs generate.py does and replaces the record of its
seeds. With --resume, a seed whose PNG exists and is recorded with the same settings is skipped (PNGs are
written atomically, so an existing file is a complete image); a PNG recorded with other settings, or not at
all, is refused, because the folder would otherwise hold images of two different samplers. A record in the
first format (one flat settings dict) is read as covering every seed.
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


def _to_ranges(seeds):
    ranges = []
    for s in sorted(seeds):
        if ranges and s == ranges[-1][1] + 1:
            ranges[-1][1] = s
        else:
            ranges.append([s, s])
    return ranges


def _from_ranges(ranges):
    """[[a, b], ...] -> the seeds a..b; ValueError for ranges no run can have written (a damaged file)."""
    from .cli_options import MAX_SEED, MAX_SEEDS
    if not isinstance(ranges, list) or not all(isinstance(r, list) and len(r) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_SEED for v in r) and r[0] <= r[1]
            for r in ranges) or sum(b - a + 1 for a, b in ranges) > MAX_SEEDS:
        raise ValueError(f'seed ranges {str(ranges)[:60]} are not ranges of seeds 0..{MAX_SEED}')
    return {s for a, b in ranges for s in range(a, b + 1)}


class Record:
    """The settings file as runs [settings, seeds, pending, since]; seeds None = every seed not listed elsewhere.

    `since` is the settings file's own modification time when the run that left seeds pending started: a pending
    PNG modified at or after it was written by that run (or a later one with the same settings), not left over.
    It comes from the file system's clock, as PNG times do.
    """

    def __init__(self, runs=()):
        self.runs = [list(r) for r in runs]

    @classmethod
    def read(cls, path):
        with open(path) as f:
            data = json.load(f)
        if 'runs' not in data:  # first format: one settings dict for the whole folder
            return cls([(data, None, set(), None)])
        return cls([(r['settings'], None if r['seeds'] is None else _from_ranges(r['seeds']),
                     _from_ranges(r.get('pending', [])), r.get('pending_since')) for r in data['runs']])

    def write(self, path):
        runs = [dict(settings=s, seeds=None if seeds is None else _to_ranges(seeds), pending=_to_ranges(pending),
                     pending_since=since) for s, seeds, pending, since in self.runs if seeds is None or seeds]
        atomic_write(path, lambda f: f.write((json.dumps(dict(runs=runs), indent=1) + '\n').encode()))

    def lookup(self, seed):
        """(settings, pending since or None) of the run that last wrote `seed`; (None, None) if none did."""
        for s, seeds, pending, since in self.runs:
            if seeds is not None and seed in seeds:
                return s, (since if seed in pending else None)
        for s, seeds, pending, since in self.runs:
            if seeds is None:
                return s, (since if seed in pending else None)
        return None, None

    def assign(self, wanted, seeds, pending):
        """Record `seeds` as written with `wanted`; `pending` of them may still hold stale PNGs. Returns the run."""
        seeds = set(seeds)
        for run in self.runs:
            run[1] = None if run[1] is None else run[1] - seeds
            run[2] = run[2] - seeds
        mine = [run for run in self.runs if run[0] == wanted and run[1] is not None]
        if not mine:
            mine = [[wanted, set(), set(), None]]
            self.runs.append(mine[0])
        mine[0][1] |= seeds
        mine[0][2] |= set(pending)
        return mine[0]

    def settle(self, seeds):
        """A run finished: its seeds are no longer pending."""
        for run in self.runs:
            run[2] = run[2] - set(seeds)


def _refusal(outdir, wanted, stale):
    settings_, seeds = next(iter(stale.items()))
    count = sum(len(v) for v in stale.values())
    example = ', '.join(str(s) for s in seeds[:5]) + (' ...' if len(seeds) > 5 else '')
    if settings_ is None:
        why = f'{count} of the requested PNGs (seeds {example}) are not recorded in {SETTINGS_FILE}'
    else:
        stored = json.loads(settings_)
        differ = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
        detail = '; '.join(f'{k}: was {stored.get(k)!r}, now {wanted.get(k)!r}' for k in differ)
        why = f'{count} of the requested PNGs (seeds {example}) were made with other settings ({detail})'
    return (f'--resume: {why}; use the same flags, another --outdir, or drop --resume to overwrite them')


def _plan(outdir, seeds, subdirs, wanted, resume):
    path = os.path.join(outdir, SETTINGS_FILE)
    wanted = _normalise(wanted)
    existing = [s for s in seeds if os.path.exists(image_io.image_path(outdir, s, subdirs))]
    if resume:
        present = set(existing)
        other = [s for s in seeds if s not in present and os.path.exists(image_io.image_path(outdir, s, not subdirs))]
        if other:
            example = image_io.image_path(outdir, other[0], not subdirs)
            return (f'--resume: {len(other)} of the requested PNGs (e.g. {example}) '
                    f'are {"directly in" if subdirs else "in the per-1000 subfolders of"} {outdir}: they were sampled '
                    f'{"without" if subdirs else "with"} --subdirs; {"drop" if subdirs else "add"} --subdirs to continue '
                    f'them')
    record = Record()
    if os.path.exists(path):
        try:
            record = Record.read(path)
        except (OSError, ValueError, KeyError, TypeError) as e:
            if resume and existing:
                return f'--resume: cannot read {path} ({e}); drop --resume to start over'
    elif resume and existing:
        return (f'--resume: {outdir} holds {len(existing)} of the requested PNGs but no {SETTINGS_FILE}, so the '
                f'settings that made them are unknown; sample into a new --outdir, or drop --resume to overwrite them')
    done, pending, stale = set(), set(), {}
    for s in existing:
        made_with, pending_since = record.lookup(s)
        if made_with != wanted:
            stale.setdefault(None if made_with is None else json.dumps(made_with, sort_keys=True), []).append(s)
            pending.add(s)
        elif pending_since is not None and os.stat(image_io.image_path(outdir, s, subdirs)).st_mtime_ns < pending_since:
            pending.add(s)  # may still be the image a killed plain run was replacing
        elif resume and not image_io.is_complete_png(image_io.image_path(outdir, s, subdirs)):
            pending.add(s)  # cut short (not by us: our writes are atomic): generate it again
        elif resume:
            done.add(s)
    if resume and stale:
        return _refusal(outdir, wanted, stale)
    run = record.assign(wanted, seeds, pending)
    record.write(path)
    if run[2]:
        run[3] = os.stat(path).st_mtime_ns  # before any PNG of this run is written
        record.write(path)
    return [s for s in seeds if s not in done]


def seeds_to_generate(outdir, seeds, subdirs, wanted, resume):
    """The seeds this run must generate, the same list on every rank; records them in the settings file (rank 0).

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


def finish(outdir, seeds):
    """Every rank wrote its PNGs: none of `seeds` can hold a stale image any more (call on every rank)."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        if torch.distributed.get_rank() != 0:
            return
    path = os.path.join(outdir, SETTINGS_FILE)
    record = Record.read(path)
    record.settle(seeds)
    record.write(path)
