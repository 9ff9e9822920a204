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


_SPIN_CYCLES_PER_MS = {}
_L2_FLUSH = {}
L2_FLUSH_BYTES = 256 * 2 ** 20  # over 5x the H100's 50 MB L2
MAX_PAD_MS = 200.0


def _spin_cycles_per_ms():
    """GPU clock cycles per millisecond of torch.cuda._sleep on the current device (measured once)."""
    dev = torch.cuda.current_device()
    if dev not in _SPIN_CYCLES_PER_MS:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(1000)
        start.record()
        torch.cuda._sleep(2_000_000)
        end.record()
        end.synchronize()
        _SPIN_CYCLES_PER_MS[dev] = 2_000_000 / max(start.elapsed_time(end), 1e-3)
    return _SPIN_CYCLES_PER_MS[dev]


def _flush_l2():
    dev = torch.cuda.current_device()
    if dev not in _L2_FLUSH:
        _L2_FLUSH[dev] = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device='cuda')
    _L2_FLUSH[dev].zero_()


def pad_ms(host_ms):
    """How long the GPU is kept busy before a timed kernel call: comfortably longer than the host needs to
    enqueue the call (host_ms, measured), so the call's launches are all queued when its start event runs."""
    return min(MAX_PAD_MS, max(0.1, 2.0 * host_ms + 0.1))


def _summary(times, host):
    times = sorted(times)
    q = statistics.quantiles(times, n=5) if len(times) >= 5 else [times[0]] * 4
    out = dict(median_ms=statistics.median(times), p20_ms=q[0], p80_ms=q[3], repeats=len(times))
    if host:
        out['host_ms'] = statistics.median(host)
    return out


def time_fn(fn, warmup=10, repeats=50, device=None, min_time_s=0.0, kernel=False):
    """Median, 20th and 80th percentile of fn()'s run time in milliseconds, and `host_ms`, the median time the
    host took to issue one call.

    On CPU: perf_counter around each call. On CUDA each repeat is timed with its own pair of events, then:
    - kernel=False (networks, samplers): events straight around the call, so the time includes the host's
      launch latency whenever the GPU outruns it, as a user's loop would see it;
    - kernel=True (single ops): the GPU time of the call alone, from a cold L2. Before the start event the
      stream gets an L2 flush and a spin (torch.cuda._sleep) longer than the call's host time, so every launch
      of the call is queued before the start event runs: the interval holds kernels only, no host overhead.
      A repeat whose host time outgrew the spin is discarded and the spin lengthened. An op whose host_ms
      exceeds its median_ms is launch-bound when called alone in eager mode (CUDA graphs remove that).
    `min_time_s` keeps repeating until at least that much time was measured.
    """
    device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    cuda = torch.device(device).type == 'cuda'
    host = []
    for i in range(warmup):
        t0 = time.perf_counter()
        fn()
        if i >= warmup // 2:
            host.append((time.perf_counter() - t0) * 1e3)
        _sync(device)
    times, spent, host = [], 0.0, host[-3:]
    kernel = kernel and cuda
    if kernel:
        cycles = _spin_cycles_per_ms()
        pad = pad_ms(max(host, default=1.0))
    retries = 0
    while len(times) < repeats or spent < min_time_s:
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if kernel:
                _flush_l2()
                torch.cuda._sleep(int(pad * cycles))
            start.record()
            t0 = time.perf_counter()
            fn()
            host_ms = (time.perf_counter() - t0) * 1e3
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
            if kernel and host_ms > 0.5 * pad and pad < MAX_PAD_MS and retries < 2 * repeats:
                retries += 1
                pad = pad_ms(host_ms)  # the spin may have run out before the call was queued: repeat it
                continue
        else:
            t0 = time.perf_counter()
            fn()
            ms = host_ms = (time.perf_counter() - t0) * 1e3
        times.append(ms)
        host.append(host_ms)
        spent += ms / 1e3
    out = _summary(times, host[-len(times):])
    out['timing'] = 'gpu-only, cold L2' if kernel else ('cuda events per call' if cuda else 'perf_counter')
    return out


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
