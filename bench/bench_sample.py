"""Sampling throughput at each preset's paper NFE: images/s and the time for 50,000 images (one FID run).

  python -m bench.bench_sample [--models ddpmpp-cifar10,adm-imagenet64] [--batch 512] [--quick] [--out DIR]
  python -m bench.bench_sample --models edm2-img64-s         # EDM2 sampler, 32 steps (NFE 63)

Providers: 'reference' (the NVlabs path: fp32 NCHW eager network, TF32 off, per-seed generators, fp64 Python
sampler; fp16 U-Net body for ADM and EDM2 as NVlabs runs them; EDM2: the edm2 sampler, weights renormalised per call) and 'fast' (FastDenoiser: fp16 channels-last compiled
network in CUDA graphs, the fused Heun kernel, zero-churn draws skipped). Both run edm_fast.generate, so seed
semantics are identical. Long samplers (ADM: 511 NFE) are timed over --max-steps steps and the per-NFE time is
extrapolated to the paper NFE; the record says so.
"""

import argparse
import time
import traceback

import torch

from bench import harness, models
from edm_fast import generate, sampling
from edm_fast.fast import FastDenoiser


def time_sampling(net, denoiser, seeds, batch, kwargs, backend):
    """Seconds to generate `seeds` (synchronised), after one warm-up batch."""
    with models.backend_env(backend):
        warm = dict(kwargs, num_steps=min(kwargs['num_steps'], 4))
        for _ in generate.generate_images(net, seeds[:batch], max_batch_size=batch, denoiser=denoiser, **warm):
            pass
        sync = torch.cuda.synchronize if models.DEVICE == 'cuda' else (lambda: None)
        sync()
        t0 = time.perf_counter()
        for b in generate.generate_images(net, seeds, max_batch_size=batch, denoiser=denoiser, **kwargs):
            pass
        sync()
        return time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--models', default='ddpmpp-cifar10,ddpmpp-64,adm-imagenet64')
    p.add_argument('--batch', type=int, default=None)
    p.add_argument('--max-steps', type=int, default=40, help='time at most this many steps and extrapolate')
    p.add_argument('--quick', action='store_true')
    p.add_argument('--providers', default='reference,fast')
    p.add_argument('--nvlabs-dir', action='append', default=[], metavar='PATH',
                   help='a local checkout of NVlabs edm and/or edm2 (repeat for both): adds the provider nvlabs')
    p.add_argument('--out', default=None)
    args = p.parse_args(argv)
    providers = args.providers.split(',') + (['nvlabs'] if args.nvlabs_dir and 'nvlabs' not in args.providers else [])
    default_batch = {'ddpmpp-cifar10': 512, 'ncsnpp-cifar10': 512, 'ddpmpp-64': 256, 'adm-imagenet64': 256, 'tiny': 4,
                     'edm2-img64-s': 256, 'edm2-tiny': 4}
    records = []
    for model in args.models.split(','):
        net = models.build(model).eval().requires_grad_(False)
        paper = models.SAMPLING[model]
        paper_nfe = sampling.nfe_per_image(**paper)
        kwargs = dict(paper, num_steps=min(paper['num_steps'], 8 if args.quick else args.max_steps))
        nfe = sampling.nfe_per_image(**kwargs)
        batch = args.batch or default_batch[model]
        seeds = list(range(batch * (1 if args.quick else 2)))
        for provider in providers:
            case = f'{model}/nfe{paper_nfe}/b{batch}'
            try:
                if provider == 'nvlabs':  # the official network in edm_fast's sampler loop (same seeds, same math)
                    official = models.configure(net, 'nvlabs', args.nvlabs_dir)[0].eval().requires_grad_(False)
                    seconds = time_sampling(official, None, seeds, batch, kwargs, 'reference')
                elif provider == 'reference':
                    ref = models.configure(net, 'reference-fp16' if model == 'adm-imagenet64' else 'reference')[0]
                    seconds = time_sampling(ref, None, seeds, batch, kwargs, 'reference')
                else:
                    fast = FastDenoiser(net, dtype='fp16', compile=models.DEVICE == 'cuda')
                    seconds = time_sampling(net, fast, seeds, batch, kwargs, None)
                per_image_s = seconds / len(seeds) * (paper_nfe / nfe)  # scaled to the paper NFE
                extra = dict(model=model, batch=batch, paper_nfe=paper_nfe, timed_nfe=nfe, timed_images=len(seeds),
                             extrapolated=nfe != paper_nfe)
                case_records = [harness.record('sample', case, provider, 'images_per_s', 1 / per_image_s, 'img/s', **extra),
                                harness.record('sample', case, provider, 'minutes_per_50k', 50000 * per_image_s / 60,
                                               'min', **extra)]
            except Exception as e:
                traceback.print_exc()
                case_records = [harness.record('sample', case, provider, 'error', None, '',
                                               error=f'{type(e).__name__}: {e}'[:500])]
            records += case_records
            harness.write_results(case_records, 'sample', args.out)  # kept even if a later case times out
            harness.print_table(case_records)
            if models.DEVICE == 'cuda':
                torch.cuda.empty_cache()
    base = {r['case']: r['value'] for r in records if r['provider'] == 'reference' and r['metric'] == 'images_per_s'}
    speedups = [harness.record('sample', r['case'], r['provider'], 'speedup_vs_reference', r['value'] / base[r['case']], 'x')
                for r in list(records) if r['metric'] == 'images_per_s' and r['case'] in base and r['value']]
    records += speedups
    path = harness.write_results(speedups, 'sample', args.out)
    harness.print_table([r for r in records if r['metric'] in ('images_per_s', 'minutes_per_50k', 'speedup_vs_reference', 'error')])
    print(f'results: {path}')


if __name__ == '__main__':
    main()
