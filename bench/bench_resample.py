"""Benchmark of edm_fast.ops.resample (FIR up/down-sampling by 2) on the preset networks' real shapes.

    python -m bench.bench_resample [--quick] [--out DIR] [--batch 512] [--providers reference,compiled,triton]
                                   [--sweep]

Providers: `reference` (eager conv_transpose2d / conv2d, what NVlabs runs), `compiled` (the reference under
torch.compile) and `triton`. Modes: forward, and forward+backward (input gradient). Configurations: fp16
channels-last and fp32 NCHW. Shapes: every distinct resampling call of DDPM++ and NCSN++ CIFAR-10 (32x32)
and of the 64x64 networks (DDPM++/NCSN++ FFHQ, ADM ImageNet), at the given batch.

Reported per case: median GPU ms (p20/p80; harness.time_fn(kernel=True): from a cold L2, host overhead
excluded), the host's time to issue the call (host_ms), GB/s over the minimum bytes (read x + write y; twice that with
the backward, which reads dy and writes dx), the fraction of harness.H100_COPY_GBPS, and for the
non-reference providers the largest deviation from the eager reference relative to its largest value. Per network, the
summed time of all its resampling calls. Results are appended as JSON lines to <out>/bench_resample.jsonl;
a table is printed last. A provider that fails is recorded as an error and the run goes on.

--sweep additionally times the Triton kernels under a few (elements per program, warps) settings of
edm_fast.ops.triton.resample.CONFIG in the forward mode and prints the best setting per kernel family.
"""

import argparse
import collections
import functools
import itertools
import sys

import torch

from bench import harness

SUITES = {
    'ddpmpp-cifar10': ('edm-cifar10-32x32-cond-vp', 'cifar'),
    'ncsnpp-cifar10': ('edm-cifar10-32x32-cond-ve', 'cifar'),
    'ddpmpp-ffhq64': ('edm-ffhq-64x64-uncond-vp', '64'),
    'ncsnpp-ffhq64': ('edm-ffhq-64x64-uncond-ve', '64'),
    'adm-imagenet64': ('edm-imagenet-64x64-cond-adm', '64'),
}
CONFIGS = {'fp16-nhwc': (torch.float16, torch.channels_last), 'fp32-nchw': (torch.float32, torch.contiguous_format)}
PROVIDERS = ('reference', 'compiled', 'triton')
FILTER_TAPS = {2: [1, 1], 4: [1, 3, 3, 1]}


def preset_resample_calls(name, batch):
    """Counter of (shape, L, up, down, padding) over one forward of a preset network (run on 'meta')."""
    from edm_fast import networks, presets
    calls = collections.Counter()
    original = networks.ops.resample

    def record(x, f, *, up=1, down=1, padding=0, backend=None):
        calls[((batch,) + tuple(x.shape[1:]), f.shape[-1], up, down, padding)] += 1
        return original(x, f, up=up, down=down, padding=padding, backend=backend)

    cfg = presets.official_config(name)
    networks.ops.resample = record
    try:
        with torch.device('meta'):
            net = presets.build(cfg)
            res = cfg['img_resolution']
            labels = torch.zeros(1, cfg['label_dim']) if cfg['label_dim'] else None
            net(torch.zeros(1, cfg['img_channels'], res, res), torch.ones(1), labels)
    finally:
        networks.ops.resample = original
    return calls


def make_filter(length, device):
    f = torch.as_tensor(FILTER_TAPS[length], dtype=torch.float32)
    return (f.ger(f) / f.sum().square())[None, None].to(device)


def case_name(shape, length, up, padding):
    kind = 'up' if up == 2 else 'down'
    return f'{kind}-f{length}-p{padding}-{"x".join(map(str, shape))}'


_COMPILED = {}


def _compiled_reference(kind, padding):
    """torch.compile of the reference, one per (direction, padding), with dynamic shapes: a handful of graphs
    (per dtype, layout and mode) instead of one per case. The convolution is an extern call either way."""
    key = (kind, padding)
    if key not in _COMPILED:
        from edm_fast.ops import reference

        def forward(x, f):
            return reference.resample(x, f, **{kind: 2}, padding=padding)
        _COMPILED[key] = torch.compile(forward, dynamic=True)
    return _COMPILED[key]


def _provider_fn(provider, x, f, kind, padding, backward, dy):
    from edm_fast import ops
    from edm_fast.ops import reference
    if provider == 'reference':
        forward = functools.partial(reference.resample, filter=f, **{kind: 2}, padding=padding)
    elif provider == 'compiled':
        compiled = _compiled_reference(kind, padding)
        forward = functools.partial(compiled, f=f)
    elif provider == 'triton':
        forward = functools.partial(ops.resample, filter=f, **{kind: 2}, padding=padding, backend='triton')
    else:
        raise ValueError(f'unknown provider {provider!r}; expected one of {PROVIDERS}')
    if not backward:
        return lambda: forward(x)
    return lambda: torch.autograd.grad(forward(x), x, dy)


def bench_case(shape, length, up, padding, config, provider, backward, device, timing):
    dtype, fmt = CONFIGS[config]
    kind = 'up' if up == 2 else 'down'
    f = make_filter(length, device)
    x = torch.randn(shape, device=device, dtype=dtype).add_(0.5).contiguous(memory_format=fmt)
    x.requires_grad_(backward)
    with torch.no_grad():
        from edm_fast.ops import reference
        y_shape = reference.resample(x[:1].detach(), f, **{kind: 2}, padding=padding).shape[1:]
    dy = torch.randn((shape[0],) + tuple(y_shape), device=device, dtype=dtype).contiguous(memory_format=fmt)
    fn = _provider_fn(provider, x, f, kind, padding, backward, dy)
    stats = harness.time_fn(fn, device=device, kernel=True, **timing)
    nbytes = (x.numel() + dy.numel()) * x.element_size() * (2 if backward else 1)
    if provider != 'reference':  # a fast wrong answer is not a result: relative max deviation from eager
        out = fn()
        ref = _provider_fn('reference', x, f, kind, padding, backward, dy)()
        out, ref = (out[0], ref[0]) if backward else (out, ref)  # backward: the input gradient
        with torch.no_grad():
            stats['max_rel_dev'] = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    return stats, nbytes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--quick', action='store_true', help='CIFAR-10 shapes only, fewer repeats')
    parser.add_argument('--out', default=None, help='results directory (default bench/results)')
    parser.add_argument('--batch', type=int, default=None, help='batch size (default 512 on a GPU, 2 on CPU)')
    parser.add_argument('--providers', default=','.join(PROVIDERS),
                        help='comma-separated subset of ' + ','.join(PROVIDERS))
    parser.add_argument('--sweep', action='store_true', help='also time Triton tile/warp settings (forward)')
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = 'cuda' if cuda else 'cpu'
    batch = args.batch or (512 if cuda else 2)
    providers = [p for p in args.providers.split(',') if p]
    for p in providers:
        if p not in PROVIDERS:
            parser.error(f'unknown provider {p!r}; expected a subset of {PROVIDERS}')
    if not cuda:
        print(f'note: no CUDA GPU; running on CPU at batch {batch} (triton only under TRITON_INTERPRET=1): '
              'a smoke test, not a result', file=sys.stderr)
    timing = dict(warmup=3, repeats=10) if args.quick else dict(warmup=10, repeats=50, min_time_s=0.1)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    suites = {k: v for k, v in SUITES.items() if not args.quick or v[1] == 'cifar'}

    # Distinct calls across the networks, and which network makes each how often.
    uses = collections.defaultdict(dict)
    for suite, (preset, _) in suites.items():
        for (shape, length, up, down, padding), count in preset_resample_calls(preset, batch).items():
            uses[(shape, length, up, padding)][suite] = count
    cases = sorted(uses, key=lambda c: (c[1], c[2], c[0], c[3]))

    records, timings = [], {}
    for (shape, length, up, padding), config, backward, provider in itertools.product(
            cases, CONFIGS, (False, True), providers):
        name = case_name(shape, length, up, padding)
        mode = 'fwd+bwd' if backward else 'fwd'
        common = dict(config=config, mode=mode, shape=list(shape), filter=FILTER_TAPS[length], padding=padding,
                      kind='up' if up == 2 else 'down', networks=uses[(shape, length, up, padding)])
        try:
            stats, nbytes = bench_case(shape, length, up, padding, config, provider, backward, device, timing)
        except Exception as e:  # noqa: BLE001 - one provider failing must not stop the run
            print(f'{name} {config} {mode} {provider}: FAILED {type(e).__name__}: {e}', file=sys.stderr)
            records.append(harness.record('resample', name, provider, 'error', None, None,
                                          error=f'{type(e).__name__}: {e}'[:500], **common))
            continue
        gbps = nbytes / stats['median_ms'] / 1e6
        timings[(name, config, mode, provider)] = stats['median_ms']
        records.append(harness.record('resample', name, provider, 'time', stats['median_ms'], 'ms',
                                      p20_ms=stats['p20_ms'], p80_ms=stats['p80_ms'], repeats=stats['repeats'],
                                      host_ms=stats['host_ms'], timing=stats['timing'], max_rel_dev=stats.get('max_rel_dev'),
                                      min_bytes=nbytes, gbps=gbps, frac_of_copy=gbps / harness.H100_COPY_GBPS,
                                      **common))
        if cuda:
            torch.cuda.empty_cache()

    # Per network: all its resampling calls of one forward (or forward+backward).
    for suite, config, mode, provider in itertools.product(suites, CONFIGS, ('fwd', 'fwd+bwd'), providers):
        parts = [(timings.get((case_name(*c), config, mode, provider)), n)
                 for c, per in uses.items() for s, n in per.items() if s == suite]
        if parts and all(ms is not None for ms, _ in parts):
            total = sum(ms * n for ms, n in parts)
            records.append(harness.record('resample', f'network:{suite}', provider, 'network_total', total, 'ms',
                                          config=config, mode=mode, calls=sum(n for _, n in parts)))

    if args.sweep and 'triton' in providers:
        records += sweep(cases, device, timing)

    path = harness.write_results(records, 'bench_resample', args.out)
    print(f'wrote {len(records)} records to {path}')
    print_summary(records)


SWEEP_BLOCKS = {'down_nhwc': (1024, 2048, 4096), 'down_nchw': (512, 1024, 2048), 'up_nhwc': (512, 1024, 2048),
                'up_nchw': (512, 1024, 2048)}
SWEEP_WARPS = (4, 8)


def sweep(cases, device, timing, blocks=SWEEP_BLOCKS, warps=SWEEP_WARPS):
    """Forward time of the Triton kernels under alternative (elements per program, warps) settings, one
    kernel family (direction x layout) at a time; prints the best setting of each family."""
    from edm_fast.ops.triton import resample as kernels
    layouts = {'nhwc': 'fp16-nhwc', 'nchw': 'fp32-nchw'}
    records, summary = [], []
    for key, sizes in blocks.items():
        kind, layout = key.split('_')
        default = kernels.CONFIG[key]
        family = [c for c in cases if ('up' if c[2] == 2 else 'down') == kind]
        totals = {}
        try:
            for setting in itertools.product(sizes, warps):
                kernels.CONFIG[key] = setting
                label = f'triton[{key}={setting[0]}x{setting[1]}w]'
                total = 0.0
                for shape, length, up, padding in family:
                    name = case_name(shape, length, up, padding)
                    try:
                        stats, nbytes = bench_case(shape, length, up, padding, layouts[layout], 'triton', False,
                                                   device, timing)
                    except Exception as e:  # noqa: BLE001
                        print(f'sweep {label} {name}: FAILED {e}', file=sys.stderr)
                        total = float('nan')
                        continue
                    total += stats['median_ms']
                    records.append(harness.record('resample_sweep', name, label, 'time', stats['median_ms'], 'ms',
                                                  config=layouts[layout], mode='fwd', min_bytes=nbytes,
                                                  gbps=nbytes / stats['median_ms'] / 1e6, family=key,
                                                  block=setting[0], num_warps=setting[1]))
                totals[setting] = total
        finally:
            kernels.CONFIG[key] = default
        ranked = sorted((ms, setting) for setting, ms in totals.items() if ms == ms)
        if ranked:
            summary.append(f'  {key:10s} ({layouts[layout]}, {len(family)} shapes): best {ranked[0][1]} '
                           f'{ranked[0][0]:.3f} ms, default {default} {totals.get(default, float("nan")):.3f} ms')
    print('\nTriton sweep, forward time summed over the shapes (CONFIG[family] = (elements, warps)):')
    print('\n'.join(summary))
    return records


def print_summary(records):
    rows = [r for r in records if r['bench'] == 'resample' and r['metric'] == 'time']
    compiled = {(r['case'], r['config'], r['mode']): r['value'] for r in rows if r['provider'] == 'compiled'}
    for r in rows:
        base = compiled.get((r['case'], r['config'], r['mode']))
        r['vs_compiled'] = base / r['value'] if base else ''
        r['pct_copy'] = 100 * r['frac_of_copy']
    print()
    harness.print_table(rows, columns=('case', 'config', 'mode', 'provider', 'value', 'host_ms', 'gbps',
                                       'pct_copy', 'vs_compiled', 'max_rel_dev'))
    totals = [r for r in records if r['metric'] == 'network_total']
    if totals:
        print()
        harness.print_table(totals, columns=('case', 'config', 'mode', 'provider', 'value', 'calls'))
    errors = [r for r in records if r['metric'] == 'error']
    if errors:
        print(f'\n{len(errors)} provider run(s) failed:')
        for r in errors:
            print(f"  {r['case']} {r['config']} {r['mode']} {r['provider']}: {r['error']}")


if __name__ == '__main__':
    main()
