"""Benchmark of the U-Net attention (qkv -> proj input) providers at the preset networks' attention shapes.

    python -m bench.bench_attention [--quick] [--out DIR] [--providers a,b] [--smoke]

Cases: DDPM++/NCSN++ CIFAR-10 (one 256-channel head at 16x16 and 8x8; batch 512 training, 64 sampling) and
ADM ImageNet-64 (64-channel heads at 32x32 C=384, 16x16 C=576, 8x8 C=768; batch 64), fp16 and bf16 (and fp32 for
the SongUNet shapes, whose official models run in fp32), channels-last and NCHW qkv.
Providers (each times the whole op, qkv [N, 3C, H, W] -> [N, C, H, W], including any layout copies):
  reference            NVlabs numerics, eager: fp32 einsum logits/softmax, weights and A.V in the I/O dtype
  reference-compiled   torch.compile of the reference (dynamic shapes, one compile per dtype and mode; run on
                       channels-last inputs only, to bound compile time)
  sdpa-flash / sdpa-efficient / sdpa-cudnn / sdpa-math   PyTorch SDPA pinned to one backend (unavailable ones
                       are recorded with PyTorch's reason)
  cuda                 the fused kernels of csrc/attention/
Modes: fwd, and fwd+bwd (qkv gradient via torch.autograd.grad). Metrics per (case, dtype, layout, mode,
provider): median/p20/p80 ms, TFLOP/s with 4*N*heads*T^2*d FLOPs forward and 2.5x that for fwd+bwd (the count
the task fixed; FlashAttention's papers count 2.5x for the backward alone, i.e. 3.5x for fwd+bwd), the
fraction of the H100's measured 790 TFLOP/s bf16 GEMM roof, speedups of cuda over reference and over the best
SDPA backend, and each provider's max |error| against the fp32 reference. A failing provider records its error
and the others go on. Results: JSON lines appended to bench/results/bench_attention.jsonl (or --out) after every
(case, dtype, layout, mode) group, so a run cut short keeps what it measured; table printed last.
--smoke runs tiny shapes with few repeats (also on a CPU) to check the script itself.
"""

import argparse
import contextlib
import importlib
import time
import traceback
import warnings

import torch

from bench import harness
from edm_fast.ops import reference

attention_mod = importlib.import_module('edm_fast.ops.attention')

BENCH = 'attention'
# (name, N, C, heads, H, W): NCSN++ and the 64x64 SongUNets attend at the same shapes as DDPM++ CIFAR-10.
CASES = [
    ('ddpmpp-16x16-train', 512, 256, 1, 16, 16),
    ('ddpmpp-8x8-train', 512, 256, 1, 8, 8),
    ('ddpmpp-16x16-sample', 64, 256, 1, 16, 16),
    ('ddpmpp-8x8-sample', 64, 256, 1, 8, 8),
    ('adm-32x32', 64, 384, 6, 32, 32),
    ('adm-16x16', 64, 576, 9, 16, 16),
    ('adm-8x8', 64, 768, 12, 8, 8),
]
QUICK_CASES = ('ddpmpp-16x16-train', 'adm-32x32', 'adm-16x16', 'adm-8x8')
SMOKE_CASES = [('smoke-song', 2, 64, 1, 4, 4), ('smoke-adm', 2, 128, 2, 4, 6)]
# reference-compiled runs last in each group: its compiles are the slow part, so under a time limit the other
# providers' results are already written (results are appended after every group).
PROVIDERS = ('cuda', 'reference', 'sdpa-flash', 'sdpa-efficient', 'sdpa-cudnn', 'sdpa-math', 'reference-compiled')


def flops(n, c, heads, h, w, backward):
    t, d = h * w, c // heads
    fwd = 4.0 * n * heads * t * t * d
    return fwd * 2.5 if backward else fwd


_compiled = {}


def provider_fn(provider):
    """qkv, heads -> out for one provider (raises with the reason if it cannot run)."""
    if provider == 'reference':
        return reference.attention
    if provider == 'reference-compiled':
        if 'fn' not in _compiled:
            _compiled['fn'] = torch.compile(reference.attention, dynamic=True)
        return _compiled['fn']
    if provider.startswith('sdpa-'):
        backend = provider[len('sdpa-'):]
        return lambda qkv, heads: attention_mod.attention(qkv, heads, sdpa_backend=backend)
    if provider == 'cuda':
        return lambda qkv, heads: attention_mod.attention(qkv, heads, backend='cuda')
    raise ValueError(f'unknown provider {provider!r}; expected one of {PROVIDERS}')


def make_inputs(n, c, h, w, dtype, layout, device):
    gen = torch.Generator(device=device).manual_seed(0)
    qkv = torch.randn(n, 3 * c, h, w, device=device, generator=gen).to(dtype)
    grad = torch.randn(n, c, h, w, device=device, generator=gen).to(dtype)
    if layout == 'cl':
        qkv, grad = qkv.to(memory_format=torch.channels_last), grad.to(memory_format=torch.channels_last)
    return qkv, grad


def runner(fn, qkv, heads, grad, backward):
    if not backward:
        return lambda: fn(qkv, heads)
    leaf = qkv.detach().requires_grad_(True)

    def step():
        out = fn(leaf, heads)
        return torch.autograd.grad(out, leaf, grad)
    return step


@contextlib.contextmanager
def captured_warnings(sink):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        try:
            yield
        finally:  # also on an exception: SDPA explains an unavailable backend in warnings before it raises
            sink.extend(str(w.message).splitlines()[0][:200] for w in caught)


def bench_one(case, dtype, layout, mode, provider, repeats, warmup, device, records, table, truth, timings):
    name, n, c, heads, h, w = case
    backward = mode == 'fwd+bwd'
    extra = dict(dtype=str(dtype)[6:], layout=layout, mode=mode, shape=[n, 3 * c, h, w], heads=heads, T=h * w,
                 d=c // heads, flops=flops(n, c, heads, h, w, backward))
    key = (name, extra['dtype'], layout, mode)
    notes = []
    try:
        with captured_warnings(notes):
            qkv, grad = make_inputs(n, c, h, w, dtype, layout, device)
            fn = provider_fn(provider)
            if provider == 'cuda':
                reason = attention_mod.cuda_supports(qkv, heads)
                if reason is not None or 'cuda' not in attention_mod.dispatch.implementations('attention'):
                    raise RuntimeError(reason or 'edm_fast._C has no attention kernels (not built here)')
            step = runner(fn, qkv, heads, grad, backward)
            out = step()
            if not backward:
                err = (out.double() - truth(case, dtype, layout)).abs().max().item()
                records.append(harness.record(BENCH, name, provider, 'max_abs_err_vs_fp32_reference', err, '', **extra))
            timing = harness.time_fn(step, warmup=warmup, repeats=repeats, device=device, kernel=True)
    except Exception as e:  # noqa: BLE001  (one failing provider must not stop the others)
        msg = f'{type(e).__name__}: {e}'.splitlines()[0][:300]
        if notes:
            msg += ' | ' + ' | '.join(notes[:3])
        records.append(harness.record(BENCH, name, provider, 'error', None, '', error=msg,
                                      trace=traceback.format_exc()[-2000:], **extra))
        table.append(dict(case=name, dtype=extra['dtype'], layout=layout, mode=mode, provider=provider, ms='-',
                          TFLOPs='-', roof='-', note=msg[:70]))
        return
    finally:
        if device == 'cuda':
            torch.cuda.empty_cache()
    ms = timing['median_ms']
    tflops = extra['flops'] / ms / 1e9
    timings.setdefault(key, {})[provider] = ms
    records.append(harness.record(BENCH, name, provider, 'time', ms, 'ms', p20_ms=timing['p20_ms'],
                                  p80_ms=timing['p80_ms'], repeats=timing['repeats'], host_ms=timing['host_ms'],
                                  timing=timing['timing'], **extra))
    records.append(harness.record(BENCH, name, provider, 'throughput', tflops, 'TFLOP/s', **extra))
    records.append(harness.record(BENCH, name, provider, 'bf16_gemm_roof_fraction', tflops / harness.H100_BF16_TFLOPS,
                                  '', **extra))
    table.append(dict(case=name, dtype=extra['dtype'], layout=layout, mode=mode, provider=provider, ms=ms,
                      TFLOPs=tflops, roof=f'{100 * tflops / harness.H100_BF16_TFLOPS:.1f}%', note=''))


def speedups(records, table, timings):
    """cuda vs the eager reference and vs the fastest SDPA backend, per (case, dtype, layout, mode)."""
    for (name, dtype, layout, mode), ms in timings.items():
        if 'cuda' not in ms:
            continue
        sdpa = {p: t for p, t in ms.items() if p.startswith('sdpa-')}
        extra = dict(dtype=dtype, layout=layout, mode=mode)
        notes = []
        if 'reference' in ms:
            x = ms['reference'] / ms['cuda']
            records.append(harness.record(BENCH, name, 'cuda', 'speedup_vs_reference', x, 'x', **extra))
            notes.append(f'{x:.2f}x ref')
        if sdpa:
            best = min(sdpa, key=sdpa.get)
            x = sdpa[best] / ms['cuda']
            records.append(harness.record(BENCH, name, 'cuda', 'speedup_vs_best_sdpa', x, 'x', best_sdpa=best, **extra))
            notes.append(f'{x:.2f}x {best}')
        for row in table:
            if (row['case'], row['dtype'], row['layout'], row['mode'], row['provider']) == \
                    (name, dtype, layout, mode, 'cuda'):
                row['note'] = ', '.join(notes)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='four cases, fp16 channels-last, fewer repeats')
    parser.add_argument('--smoke', action='store_true', help='tiny shapes and 3 repeats (runs on a CPU too)')
    parser.add_argument('--providers', default=','.join(PROVIDERS), help='comma-separated subset of ' + ','.join(PROVIDERS))
    parser.add_argument('--out', default=None, help='results directory (default bench/results)')
    args = parser.parse_args(argv)
    providers = [p for p in args.providers.split(',') if p]
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown:
        raise SystemExit(f'unknown providers {unknown}; expected names from {PROVIDERS}')
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if device == 'cpu' and not args.smoke:
        raise SystemExit('bench_attention needs a CUDA GPU (or --smoke to check the script on a CPU)')
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 rows are real fp32, as NVlabs and the reference
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)

    if args.smoke:
        cases, dtypes, layouts, repeats, warmup = SMOKE_CASES, [torch.float32], ['cl', 'nchw'], 3, 1
    elif args.quick:
        cases = [c for c in CASES if c[0] in QUICK_CASES]
        dtypes, layouts, repeats, warmup = [torch.float16], ['cl'], 20, 5
    else:
        cases, dtypes, layouts, repeats, warmup = CASES, [torch.float16, torch.bfloat16, torch.float32], \
            ['cl', 'nchw'], 50, 10

    truth_cache = {}

    def truth(case, dtype, layout):
        """fp32 reference output of the case's inputs (the accuracy yardstick of the fwd rows)."""
        k = (case[0], dtype, layout)
        if k not in truth_cache:
            truth_cache.clear()
            qkv, _ = make_inputs(*case[1:3], *case[4:6], dtype, layout, device)
            truth_cache[k] = reference.attention(qkv.float(), case[3]).double()
        return truth_cache[k]

    records, table, timings = [], [], {}
    path = None
    start = time.time()
    for case in cases:
        for dtype in dtypes:
            if dtype == torch.float32 and not (args.smoke or case[0].startswith('ddpmpp')):
                continue  # ADM runs in fp16; fp32 is only the SongUNets' official precision
            for layout in layouts:
                for mode in ('fwd', 'fwd+bwd'):
                    print(f'[{time.time() - start:6.1f}s] {case[0]} {str(dtype)[6:]} {layout} {mode}', flush=True)
                    for provider in providers:
                        if provider == 'reference-compiled' and layout != 'cl':
                            continue
                        bench_one(case, dtype, layout, mode, provider, repeats, warmup, device, records, table,
                                  truth, timings)
                    path = harness.write_results(records, f'bench_{BENCH}', args.out)  # appends
                    records.clear()
    speedups(records, table, timings)
    path = harness.write_results(records, f'bench_{BENCH}', args.out)
    print(f'\nresults -> {path} ({time.time() - start:.0f}s)\n')
    for row in table:
        for k in ('ms', 'TFLOPs'):
            if isinstance(row[k], float):
                row[k] = f'{row[k]:.4g}'
    harness.print_table(table, columns=('case', 'dtype', 'layout', 'mode', 'provider', 'ms', 'TFLOPs', 'roof', 'note'))


if __name__ == '__main__':
    main()
