"""Network throughput: forward (sampling), forward+backward (train) and the whole optimisation step (step) of the
preset networks.

  python -m bench.bench_model [--models ddpmpp-cifar10,adm-imagenet64] [--batches 64,512] [--quick] [--out DIR]
  python -m bench.bench_model --models edm2-img64-s          # EDM2-S ImageNet-64 (EDM2Loss for training)
  python -m bench.bench_model --nvlabs-dir ~/src/edm --nvlabs-dir ~/src/edm2   # also time the official code

For each model, batch and provider (bench/models.py): images/s, achieved TFLOP/s (model FLOPs counted by
torch's FlopCounterMode), model-FLOP utilisation against the measured 790 TFLOP/s bf16 ceiling, peak memory,
and the speed-up over the NVlabs-style reference measured in the same run. `step` is what train.py does per
batch on one GPU (training_step: EDM's augment pipe, or EDM2's encoder and learning-rate schedule, the loss
forward and backward, gradient sanitising, Adam and the EMA update, on uint8 images already on the device);
its FLOPs and MFU count the network's forward and backward only. A failing provider is recorded and the others continue. Optional --profile adds a per-op-type time breakdown of the fast path.
"""

import argparse
import gc
import traceback

import torch

from bench import harness, models
from edm_fast import augment as augment_module
from edm_fast import loss as loss_module
from edm_fast import loss_edm2, networks_edm2, training_loop
from edm_fast.training_stats import Collector


def training_step(model, module, fn, batch, labels, channels_last):
    """One optimisation step as train.py runs it per batch, on uint8 images already on the device; returns a
    no-argument callable. EDM (edm_fast.training_loop): the augment pipe at p = 0.12, EDMLoss, gradient
    sanitising, Adam, the EMA. EDM2 (edm_fast.training_loop_edm2): the RGB encoder, EDM2Loss, the learning-rate
    schedule, force_finite, Adam (betas 0.9, 0.99), the power-function EMA at two stds."""
    import copy

    from edm_fast import encoders, phema, training_loop_edm2
    device = next(module.parameters()).device
    g = torch.Generator(device).manual_seed(2)
    images = torch.randint(0, 256, [batch, module.img_channels, module.img_resolution, module.img_resolution],
                           dtype=torch.uint8, device=device, generator=g)
    stats = Collector()

    def channels(x):
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    if models.is_edm2(model):
        encoder, loss_fn = encoders.StandardRGBEncoder(), loss_edm2.EDM2Loss(P_mean=-0.8, P_std=1.6)
        optimizer = torch.optim.Adam(module.parameters(), lr=1e-4, betas=(0.9, 0.99), eps=1e-8)
        ema = phema.PowerFunctionEMA(module, stds=[0.05, 0.10])
        nimg = [0]

        def step():
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(net=fn, images=channels(encoder.encode_latents(images)), labels=labels)
            stats.report('Loss/loss', loss)
            loss.sum().mul(1 / batch).backward()
            for group in optimizer.param_groups:
                group['lr'] = loss_edm2.learning_rate_schedule(nimg[0], batch, ref_lr=1e-2, ref_batches=35000)
            training_loop_edm2.sanitize_gradients(module)
            optimizer.step()
            nimg[0] += batch
            ema.update(cur_nimg=nimg[0], batch_size=batch)
        return step

    augment_pipe = augment_module.AugmentPipe(p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1,
                                              translate_frac=1) if module.model.map_augment is not None else None
    loss_fn = loss_module.EDMLoss()
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8)
    ema = copy.deepcopy(module).eval().requires_grad_(False)

    def prepare(images, labels):
        return channels(images.to(torch.float32) / 127.5 - 1), labels

    def step():
        optimizer.zero_grad(set_to_none=True)
        training_loop.accumulate_gradients(fn, loss_fn, [(images, labels)], 1, batch, augment_pipe, stats, prepare)
        training_loop.sanitize_gradients(module)
        optimizer.step()
        training_loop.update_ema(ema, module, 0.999)
    return step


def run_case(model, net, provider, batch, mode, flops, warmup, repeats, nvlabs_dirs=()):
    module, fn, backend = models.configure(net, provider, nvlabs_dirs)
    with models.backend_env(backend):
        x, sigma, labels = models.inputs(module, batch, channels_last=provider.startswith('fast'))
        if mode == 'forward':
            module.eval().requires_grad_(False)
            if provider.startswith('fast') and models.is_edm2(model):
                networks_edm2.freeze_weights(module, x, sigma, labels)  # as FastDenoiser does for inference

            def step():
                with torch.no_grad():
                    fn(x, sigma, labels)
        elif mode == 'train':
            module.train().requires_grad_(True)
            loss_fn = loss_edm2.EDM2Loss(P_mean=-0.8, P_std=1.6) if models.is_edm2(model) else loss_module.EDMLoss()
            images = x.clamp(-1, 1)

            def step():
                loss_fn(fn, images, labels).sum().backward()
        else:
            module.train().requires_grad_(True)
            step = training_step(model, module, fn, batch, labels, provider.startswith('fast'))
        cuda = models.DEVICE == 'cuda'
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t = harness.time_fn(step, warmup=warmup, repeats=repeats, device=models.DEVICE)
        peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else float('nan')
    ips = batch / (t['median_ms'] / 1e3)
    tflops = flops * ips / 1e12
    case = f'{model}/{mode}/b{batch}'
    common = dict(model=model, mode=mode, batch=batch, p20_ms=t['p20_ms'], p80_ms=t['p80_ms'])
    return [harness.record('model', case, provider, 'images_per_s', ips, 'img/s', **common),
            harness.record('model', case, provider, 'ms', t['median_ms'], 'ms', **common),
            harness.record('model', case, provider, 'tflops', tflops, 'TFLOP/s', **common),
            harness.record('model', case, provider, 'mfu', tflops / harness.H100_BF16_TFLOPS, 'fraction', **common),
            harness.record('model', case, provider, 'peak_mem', peak, 'GiB', **common)]


def profile_fast(model, net, batch, mode='forward', provider='fast-bf16'):
    """Time per op category of one fast-path step (CUDA kernel time from torch.profiler)."""
    module, fn, backend = models.configure(net, provider)
    with models.backend_env(backend):
        x, sigma, labels = models.inputs(module, batch, channels_last=True)
        module.eval().requires_grad_(False)
        for _ in range(3):
            with torch.no_grad():
                fn(x, sigma, labels)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            with torch.no_grad():
                fn(x, sigma, labels)
            torch.cuda.synchronize()
    buckets = {}
    for evt in prof.key_averages():
        name = evt.key.lower()
        cat = ('gemm/conv' if any(k in name for k in ('gemm', 'conv', 'cutlass', 'sm90', 'xmma', 'cudnn', 'wgrad', 'dgrad'))
               else 'group_norm' if 'group_norm' in name or 'groupnorm' in name
               else 'attention' if any(k in name for k in ('attention', 'flash', 'fmha', 'softmax'))
               else 'resample' if 'resample' in name
               else 'elementwise/fused (triton)' if 'triton' in name
               else 'other')
        buckets[cat] = buckets.get(cat, 0.0) + getattr(evt, 'device_time_total', getattr(evt, 'cuda_time_total', 0)) / 1e3
    total = sum(buckets.values()) or 1.0
    case = f'{model}/{mode}/b{batch}'
    return [harness.record('model_profile', case, provider, f'time_{cat}', ms, 'ms', fraction=ms / total)
            for cat, ms in sorted(buckets.items(), key=lambda kv: -kv[1])]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--models', default='ddpmpp-cifar10,ncsnpp-cifar10,ddpmpp-64,adm-imagenet64')
    p.add_argument('--batches', default=None, help='comma list (default: per model)')
    p.add_argument('--modes', default='forward,train,step')
    p.add_argument('--providers', default=','.join(models.PROVIDERS))
    p.add_argument('--quick', action='store_true', help='fewer repeats, one batch size per model')
    p.add_argument('--profile', action='store_true')
    p.add_argument('--nvlabs-dir', action='append', default=[], metavar='PATH',
                   help='a local checkout of NVlabs edm and/or edm2 (repeat for both): adds the provider nvlabs')
    p.add_argument('--out', default=None)
    args = p.parse_args(argv)
    providers = args.providers.split(',') + (['nvlabs'] if args.nvlabs_dir and 'nvlabs' not in args.providers else [])
    warmup, repeats = (3, 10) if args.quick else (5, 30)
    default_batches = {'ddpmpp-cifar10': [512, 128], 'ncsnpp-cifar10': [512], 'ddpmpp-64': [256], 'adm-imagenet64': [64, 256],
                       'tiny': [4], 'edm2-img64-s': [128], 'edm2-tiny': [4]}
    records = []
    for model in args.models.split(','):
        net = models.build(model)
        flops = {m: models.count_flops(net, train=(m != 'forward')) for m in args.modes.split(',')}
        counts = [harness.record('model', f'{model}/{m}', 'count', 'gflops_per_image', f / 1e9, 'GFLOP')
                  for m, f in flops.items()]
        records += counts
        harness.write_results(counts, 'model', args.out)
        batches = [int(b) for b in args.batches.split(',')] if args.batches else default_batches[model]
        if args.quick:
            batches = batches[:1]
        for mode in args.modes.split(','):
            for batch in batches:
                for provider in providers:
                    if provider == 'reference-fp16' and model != 'adm-imagenet64':
                        continue  # NVlabs trains only ADM in fp16
                    try:
                        case_records = run_case(model, net, provider, batch, mode, flops[mode], warmup, repeats,
                                                args.nvlabs_dir)
                    except Exception as e:  # record and go on: one provider must not sink the run
                        traceback.print_exc()
                        case_records = [harness.record('model', f'{model}/{mode}/b{batch}', provider, 'error', None, '',
                                                       error=f'{type(e).__name__}: {e}'[:500])]
                    records += case_records
                    harness.write_results(case_records, 'model', args.out)  # kept even if a later case times out
                    harness.print_table(case_records)
                    gc.collect()
                    if models.DEVICE == 'cuda':
                        torch.cuda.empty_cache()
        if args.profile:
            try:
                prof = profile_fast(model, net, default_batches[model][0])
            except Exception as e:
                prof = [harness.record('model_profile', model, 'fast-bf16', 'error', None, '', error=str(e)[:500])]
            records += prof
            harness.write_results(prof, 'model', args.out)
        del net
    # Speed-ups over the NVlabs-style reference of the same case, measured in this run.
    base = {r['case']: r['value'] for r in records if r['provider'] == 'reference' and r['metric'] == 'images_per_s'}
    if any(r['provider'] == 'reference-fp16' for r in records):
        base.update({r['case']: r['value'] for r in records
                     if r['provider'] == 'reference-fp16' and r['metric'] == 'images_per_s' and 'adm' in r['case']})
    speedups = [harness.record('model', r['case'], r['provider'], 'speedup_vs_reference', r['value'] / base[r['case']], 'x')
                for r in list(records) if r['metric'] == 'images_per_s' and r['case'] in base and r['value']]
    records += speedups
    path = harness.write_results(speedups, 'model', args.out)
    harness.print_table([r for r in records if r['metric'] in ('images_per_s', 'mfu', 'speedup_vs_reference', 'error')])
    print(f'results: {path}')


if __name__ == '__main__':
    main()
