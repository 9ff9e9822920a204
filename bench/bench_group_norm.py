"""Benchmark of the fused GroupNorm (+ pre-add / scale-shift / SiLU) against eager and compiled PyTorch.

    python -m bench.bench_group_norm [--quick] [--all] [--providers reference,triton,...] [--out DIR] [--sweep]

Cases: the GroupNorm calls of DDPM++ CIFAR-10 (batch 512) and ADM ImageNet-64 (batch 64), taken from the
networks themselves (meta-device trace), in fp16 channels-last (the fast configuration). Providers:
reference (eager PyTorch, as NVlabs runs it), reference-compiled (torch.compile of the reference), triton
and cuda, plus the eager reference in fp32 NCHW (NVlabs' fp32 configuration). Modes: forward, and forward +
backward (all input gradients via torch.autograd.grad, so nothing accumulates into .grad).

Metrics per (case, mode, provider): median GPU ms (harness.time_fn(kernel=True): cold L2, host overhead
excluded), host_ms (the host's time to issue the call), GB/s over the minimum bytes (every input read once, every
output written once: x + y forward; x + y + dy + x + dx forward+backward, plus the per-channel tensors) and
the fraction of the H100's measured 3.0 TB/s copy bandwidth. A provider that fails records its error and
the others go on. Results: JSON lines in bench/results/bench_group_norm.jsonl (or --out), table last.

--sweep also times the Triton kernels under a few (elements per chunk, elements per warp) settings of
edm_fast.ops.triton.group_norm.CONFIG (forward settings on the forward, backward ones on forward + backward),
summed over the cases, and prints the best setting of each direction next to the default.
"""

import argparse
import collections
import itertools
import traceback

import torch

from bench import harness
from edm_fast import networks, ops, presets
from edm_fast.ops import reference

BENCH = 'group_norm'
NETWORKS = {'ddpmpp-cifar10': ('edm-cifar10-32x32-cond-vp', 512), 'adm-imagenet64': ('edm-imagenet-64x64-cond-adm', 64)}
# Calls timed without --all (each compiled-reference case costs two inductor compiles): every resolution and
# variant once, the largest maps, and channel counts that are not multiples of 32 per group.
DEFAULT = {('ddpmpp-cifar10', 128, 32, 'silu'), ('ddpmpp-cifar10', 256, 32, 'add'),
           ('ddpmpp-cifar10', 512, 32, 'silu'), ('ddpmpp-cifar10', 384, 32, 'silu'),
           ('ddpmpp-cifar10', 256, 16, 'add'), ('ddpmpp-cifar10', 256, 16, 'plain'),
           ('ddpmpp-cifar10', 256, 8, 'add'), ('ddpmpp-cifar10', 512, 8, 'silu'),
           ('adm-imagenet64', 192, 64, 'adm'), ('adm-imagenet64', 384, 64, 'silu'),
           ('adm-imagenet64', 576, 64, 'silu'), ('adm-imagenet64', 384, 32, 'adm'),
           ('adm-imagenet64', 384, 32, 'plain'), ('adm-imagenet64', 576, 16, 'adm'),
           ('adm-imagenet64', 768, 8, 'adm'), ('adm-imagenet64', 1344, 8, 'silu')}
QUICK = {('ddpmpp-cifar10', 256, 32, 'add'), ('ddpmpp-cifar10', 256, 8, 'add'), ('adm-imagenet64', 192, 64, 'adm'),
         ('adm-imagenet64', 768, 8, 'adm')}
PROVIDERS = ('reference', 'reference-compiled', 'triton', 'cuda', 'reference-fp32-nchw')


def network_calls(preset):
    """Ordered {(C, H, W, groups, eps, variant): calls per forward} of a preset network (meta tensors)."""
    calls = collections.Counter()

    def hook(x, weight, bias, num_groups, eps, *, pre_add=None, scale=None, shift=None, act=None, backend=None):
        variant = 'add' if pre_add is not None else 'adm' if scale is not None else 'silu' if act else 'plain'
        calls[(*x.shape[1:], num_groups, eps, variant)] += 1
        return torch.empty_like(x)

    saved = networks.ops.group_norm
    networks.ops.group_norm = hook
    try:
        cfg = presets.official_config(preset)
        with torch.device('meta'):
            net = presets.build(cfg)
            labels = torch.zeros(1, net.label_dim) if net.label_dim else None
            res = cfg['img_resolution']
            net(torch.zeros(1, 3, res, res), torch.ones(1), labels)
    finally:
        networks.ops.group_norm = saved
    return calls


def make_inputs(N, C, H, W, variant, dtype, channels_last, device='cuda'):
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(N, C, H, W, device=device, generator=gen).mul_(0.5).add_(1).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    t = dict(x=x, weight=torch.rand(C, device=device, generator=gen) + 0.5,
             bias=torch.randn(C, device=device, generator=gen), pre_add=None, scale=None, shift=None)
    if variant == 'add':
        t['pre_add'] = torch.randn(N, C, 1, 1, device=device, generator=gen).to(dtype)
    if variant == 'adm':  # the two halves of affine(emb), as UNetBlock passes them
        t['scale'], t['shift'] = torch.randn(N, 2 * C, 1, 1, device=device, generator=gen).to(dtype).chunk(2, dim=1)
    return t, ('silu' if variant != 'plain' else None)


def min_bytes(t, backward):
    big = t['x'].numel() * t['x'].element_size()
    small = sum(v.numel() * v.element_size() for k, v in t.items() if k != 'x' and v is not None)
    # forward: x in, y out; backward: dy and x in, dx out, per-channel gradients out (same sizes as inputs)
    return (5 * big + 2 * small) if backward else (2 * big + small)


def provider_fn(provider, G, eps, act):
    def call(x, weight, bias, pre_add, scale, shift):
        if provider.startswith('reference'):
            return reference.group_norm(x, weight, bias, G, eps, pre_add=pre_add, scale=scale, shift=shift, act=act)
        return ops.group_norm(x, weight, bias, G, eps, pre_add=pre_add, scale=scale, shift=shift, act=act,
                              backend=provider)
    if provider == 'reference-compiled':
        return torch.compile(call, dynamic=False)
    return call


def runner(fn, t, backward):
    names = [k for k in ('x', 'weight', 'bias', 'pre_add', 'scale', 'shift') if t[k] is not None]
    if not backward:
        args = [t[k] for k in ('x', 'weight', 'bias', 'pre_add', 'scale', 'shift')]
        return lambda: fn(*args)
    leaves = {k: t[k].detach().requires_grad_() for k in names}
    args = [leaves.get(k) for k in ('x', 'weight', 'bias', 'pre_add', 'scale', 'shift')]
    dy = torch.randn_like(t['x'])

    def step():
        y = fn(*args)
        return torch.autograd.grad(y, [leaves[k] for k in names], dy)
    return step


def bench_case(net, N, C, H, W, G, eps, variant, repeats, providers, records, table):
    case = f'{net}/{N}x{C}x{H}x{W}/{variant}'
    configs = [('reference', torch.float16, True), ('reference-compiled', torch.float16, True),
               ('triton', torch.float16, True), ('cuda', torch.float16, True), ('reference', torch.float32, False)]
    base_ms = {}  # (reference provider, mode) -> ms, fp16 channels-last
    expected = {}
    for provider, dtype, cl in configs:
        if (provider if cl else 'reference-fp32-nchw') not in providers:
            continue
        layout = f'{str(dtype)[6:]}-{"channels_last" if cl else "nchw"}'
        for backward in (False, True):
            mode = 'fwd+bwd' if backward else 'fwd'
            extra = dict(layout=layout, mode=mode, shape=[N, C, H, W], groups=G, variant=variant)

            def rec(metric, value, unit, **kw):
                records.append(harness.record(BENCH, f'{case} {mode}', provider, metric, value, unit, **extra, **kw))

            try:
                t, act = make_inputs(N, C, H, W, variant, dtype, cl)
                step = runner(provider_fn(provider, G, eps, act), t, backward)
                out = step()
                if not backward and cl:
                    expected.setdefault(mode, out.float())
                    rec('max_abs_diff_vs_reference', (out.float() - expected[mode]).abs().max().item(), '')
                timing = harness.time_fn(step, warmup=5, repeats=repeats, kernel=True)
            except Exception as e:  # noqa: BLE001  (one failing provider must not stop the others)
                msg = f'{type(e).__name__}: {e}'.splitlines()[0][:300]
                rec('error', None, '', error=msg, trace=traceback.format_exc()[-2000:])
                table.append(dict(case=case, mode=mode, provider=provider, layout=layout, ms='-', host_ms='-', GBps='-',
                                  copy='-', vs_compiled=msg[:60]))
                continue
            ms = timing['median_ms']
            gbps = min_bytes(t, backward) / ms / 1e6
            frac = gbps / harness.H100_COPY_GBPS
            rec('time', ms, 'ms', p20_ms=timing['p20_ms'], p80_ms=timing['p80_ms'], repeats=timing['repeats'],
                host_ms=timing['host_ms'], timing=timing['timing'])
            rec('bandwidth', gbps, 'GB/s')
            rec('copy_bandwidth_fraction', frac, '')
            if cl and provider in ('reference', 'reference-compiled'):
                base_ms[(provider, mode)] = ms
            if provider in ('triton', 'cuda'):
                # vs the eager reference (what bench.chart plots) and vs what torch.compile gives for free
                for ref, metric in (('reference', 'speedup_vs_reference'),
                                    ('reference-compiled', 'speedup_vs_compiled_reference')):
                    if (ref, mode) in base_ms:
                        rec(metric, base_ms[(ref, mode)] / ms, 'x')
            vs = base_ms.get(('reference-compiled', mode)) if provider in ('triton', 'cuda') else None
            table.append(dict(case=case, mode=mode, provider=provider, layout=layout, ms=ms, host_ms=timing['host_ms'], GBps=gbps,
                              copy=f'{100 * frac:.0f}%', vs_compiled=f'{vs / ms:.2f}x' if vs else ''))
            del t, step, out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='four representative calls, fewer repeats')
    parser.add_argument('--all', action='store_true', help='every call of both networks (default: 16 of them)')
    parser.add_argument('--providers', default=','.join(PROVIDERS), help=f'comma list from {",".join(PROVIDERS)}')
    parser.add_argument('--out', default=None, help='results directory (default bench/results)')
    parser.add_argument('--sweep', action='store_true', help='also time Triton chunk/warp settings')
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit('bench_group_norm needs a CUDA GPU')
    providers = [p.strip() for p in args.providers.split(',') if p.strip()]
    unknown = sorted(set(providers) - set(PROVIDERS))
    if unknown:
        raise SystemExit(f'unknown providers {unknown}; choose from {",".join(PROVIDERS)}')
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    records, table = [], []
    cases = [(net, N, C, H, W, G, eps, variant) for net, (preset, N) in NETWORKS.items()
             for (C, H, W, G, eps, variant), calls in network_calls(preset).items()
             if args.all or (net, C, H, variant) in (QUICK if args.quick else DEFAULT)]
    for case in cases:
        print(f'{case[0]} {"x".join(map(str, case[1:5]))} {case[-1]}', flush=True)
        bench_case(*case, 20 if args.quick else 100, providers, records, table)
        torch.cuda.empty_cache()
    if args.sweep:
        records += sweep(cases, 20 if args.quick else 50)
    path = harness.write_results(records, f'bench_{BENCH}', args.out)
    print(f'\n{len(records)} records -> {path}\n')
    for row in table:
        for k in ('ms', 'GBps'):
            if isinstance(row[k], float):
                row[k] = f'{row[k]:.4g}'
    harness.print_table(table, columns=('case', 'mode', 'provider', 'layout', 'ms', 'host_ms', 'GBps', 'copy', 'vs_compiled'))


# (elements per chunk, elements per warp[, split]) per direction; split False: groups larger than a chunk are
# looped over by one program instead of split over (tile, chunk) programs (CONFIG split_fwd / split_bwd).
SWEEP = {'fwd': list(itertools.product((2048, 4096, 8192, 16384), (512, 1024))) + [(4096, 512, False),
                                                                                  (8192, 1024, False)],
         'bwd': list(itertools.product((1024, 2048, 4096, 8192), (512, 1024))) + [(2048, 512, False),
                                                                                 (8192, 1024, False)]}


def sweep(cases, repeats, settings=SWEEP):
    """Triton time per CONFIG setting, one direction at a time, summed over the cases (fp16 channels-last)."""
    from edm_fast.ops.triton import group_norm as kernels
    records, summary = [], []
    for direction, options in settings.items():
        backward = direction.endswith('bwd')
        split_key = 'split_bwd' if backward else 'split_fwd'
        default, split, totals = kernels.CONFIG[direction], kernels.CONFIG[split_key], {}
        try:
            for setting in options:
                kernels.CONFIG[direction] = setting[:2]
                kernels.CONFIG[split_key] = setting[2] if len(setting) > 2 else split
                label = f'triton[{direction}={"/".join(map(str, setting))}]'
                totals[setting] = 0.0
                for net, N, C, H, W, G, eps, variant in cases:
                    name = f'{net}/{N}x{C}x{H}x{W}/{variant} {"fwd+bwd" if backward else "fwd"}'
                    try:
                        t, act = make_inputs(N, C, H, W, variant, torch.float16, True)
                        ms = harness.time_fn(runner(provider_fn('triton', G, eps, act), t, backward), warmup=3,
                                             repeats=repeats, kernel=True)['median_ms']
                    except Exception as e:  # noqa: BLE001
                        print(f'sweep {label} {name}: FAILED {type(e).__name__}: {e}'.splitlines()[0])
                        totals[setting] = float('nan')
                        continue
                    totals[setting] += ms
                    records.append(harness.record(f'{BENCH}_sweep', name, label, 'time', ms, 'ms', direction=direction,
                                                  tile=setting[0], warp_elems=setting[1],
                                                  gbps=min_bytes(t, backward) / ms / 1e6))
        finally:
            kernels.CONFIG[direction], kernels.CONFIG[split_key] = default, split
        ranked = sorted((ms, s) for s, ms in totals.items() if ms == ms)
        if ranked:
            summary.append(f'  {direction}: best {ranked[0][1]} {ranked[0][0]:.3f} ms, default {default} '
                           f'{totals.get(default, float("nan")):.3f} ms over {len(cases)} cases')
    print('\nTriton sweep (CONFIG[direction] = (elements per chunk, elements per warp[, split])):\n'
          + '\n'.join(summary))
    return records


if __name__ == '__main__':
    main()
