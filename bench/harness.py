"""The one benchmark harness: warm-up, many repeats, median and spread, CUDA events on GPUs.

Every bench_*.py builds a list of records with `record(...)` and writes them with `write_results(...)` as JSON
lines under bench/results/: {bench, case, provider, metric, value, unit, gpu, torch, triton, cuda, commit,
date, ...extra}. A number without the environment fields is not a result.
"""

import datetime
import json
import os
import statistics
import subprocess
import time

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')

# Measured ceilings on the H100 (ENVIRONMENT.md): device-to-device copy (bytes read + written) and bf16 GEMM.
H100_COPY_GBPS = 3000.0
H100_BF16_TFLOPS = 790.0


def _sync(device):
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize(device)


def time_fn(fn, warmup=10, repeats=50, device=None, min_time_s=0.0):
    """Median, 20th and 80th percentile of fn()'s run time in milliseconds.

    On CUDA each repeat is timed with its own pair of events (no host timing of async work); on CPU with
    perf_counter. `min_time_s` keeps repeating until at least that much time was measured.
    """
    device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    cuda = torch.device(device).type == 'cuda'
    spent = 0.0
    while len(times) < repeats or spent < min_time_s:
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t0) * 1e3
        times.append(ms)
        spent += ms / 1e3
    times.sort()
    q = statistics.quantiles(times, n=5) if len(times) >= 5 else [times[0]] * 4
    return dict(median_ms=statistics.median(times), p20_ms=q[0], p80_ms=q[3], repeats=len(times))


def env_info():
    """GPU name, torch/triton/CUDA versions, git commit and UTC date."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True,
                                cwd=os.path.dirname(RESULTS_DIR)).stdout.strip() or None
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], capture_output=True,
                               text=True, cwd=os.path.dirname(RESULTS_DIR)).stdout.strip()
        if commit and dirty:
            commit += '-dirty'
    except OSError:
        commit = None
    commit = os.environ.get('EDM_FAST_COMMIT', commit)
    return dict(gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu', torch=torch.__version__,
                triton=triton_version, cuda=torch.version.cuda,
                commit=commit, date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ'))


def record(bench, case, provider, metric, value, unit, **extra):
    return dict(bench=bench, case=case, provider=provider, metric=metric, value=value, unit=unit, **extra)


def write_results(records, name, out_dir=None):
    """Append records (with the environment fields) to <out_dir>/<name>.jsonl and return the path."""
    out_dir = out_dir or os.environ.get('EDM_FAST_RESULTS_DIR', RESULTS_DIR)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f'{name}.jsonl')
    env = env_info()
    with open(path, 'a') as f:
        for r in records:
            f.write(json.dumps({**r, **{k: v for k, v in env.items() if k not in r}}) + '\n')
    return path


def print_table(records, columns=('case', 'provider', 'metric', 'value', 'unit')):
    """A short fixed-width table of the records (the last thing a GPU run prints)."""
    rows = [[str(r.get(c, '')) if not isinstance(r.get(c), float) else f'{r[c]:.4g}' for c in columns] for r in records]
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(columns)]
    print('  '.join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in rows:
        print('  '.join(v.ljust(w) for v, w in zip(row, widths)))
