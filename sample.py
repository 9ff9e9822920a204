"""Generate images with an EDM network: the flags of NVlabs generate.py, plus --device, --grid and --npz.

  python sample.py --network=edm-cifar10-32x32-cond-vp.pkl --outdir=out --seeds=0-63 --batch=64
  torchrun --standalone --nproc_per_node=8 sample.py --network=... --outdir=fid-tmp --seeds=0-49999 --subdirs

--network takes an official NVlabs pickle (read without running code from it) or an edm_fast snapshot.
"""

import os
import re
import time

import click
import numpy as np
import torch

from edm_fast import distributed, generate, image_io
from edm_fast.checkpoint import CheckpointError, load_network, load_snapshot


def parse_seeds(ctx, param, value):
    """'0-63,100,200-210' -> [0, ..., 63, 100, 200, ..., 210] (ranges inclusive)."""
    if isinstance(value, list):
        return value
    seeds = []
    for part in str(value).split(','):
        m = re.fullmatch(r'\s*(\d+)\s*(?:-\s*(\d+)\s*)?', part)
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise click.BadParameter(f'{value!r}: expected a comma-separated list of non-negative integers and '
                                     f'inclusive ranges a-b with a <= b, e.g. 0-63,100,200-210')
        a = int(m.group(1))
        seeds.extend(range(a, int(m.group(2)) + 1) if m.group(2) is not None else [a])
    return seeds


def check_outdir(outdir):
    try:
        os.makedirs(outdir, exist_ok=True)
        probe = os.path.join(outdir, f'.write-test-{os.getpid()}')
        with open(probe, 'wb'):
            pass
        os.remove(probe)
    except OSError as e:
        raise click.BadParameter(f'cannot write to {outdir!r}: {e.strerror}', param_hint="'--outdir'")


@click.command(context_settings=dict(show_default=True))
@click.option('--network', 'network_path', help='Network: NVlabs pickle or edm_fast snapshot  [default: the built-in '
              'demo model (digits), which also writes out/grid.png]', metavar='PATH')
@click.option('--outdir', help='Where to save the PNGs', metavar='DIR', default='out')
@click.option('--seeds', help='Random seeds (e.g. 1,2,5-10)', metavar='LIST', callback=parse_seeds, default='0-63')
@click.option('--subdirs', help='Create subdirectory for every 1000 seeds', is_flag=True)
@click.option('--class', 'class_idx', help='Class label  [default: random]', metavar='INT', type=click.IntRange(min=0))
@click.option('--batch', 'max_batch_size', help='Maximum batch size', metavar='INT', type=click.IntRange(min=1), default=64)
@click.option('--steps', 'num_steps', help='Number of sampling steps  [default: 18 (EDM), 32 (EDM2)]', metavar='INT',
              type=click.IntRange(min=2))
@click.option('--sigma_min', help='Lowest noise level  [default: varies]', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True))
@click.option('--sigma_max', help='Highest noise level  [default: varies]', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True))
@click.option('--rho', help='Time step exponent', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=7)
@click.option('--S_churn', 'S_churn', help='Stochasticity strength', metavar='FLOAT', type=click.FloatRange(min=0), default=0)
@click.option('--S_min', 'S_min', help='Stoch. min noise level', metavar='FLOAT', type=click.FloatRange(min=0), default=0)
@click.option('--S_max', 'S_max', help='Stoch. max noise level', metavar='FLOAT', type=click.FloatRange(min=0), default='inf')
@click.option('--S_noise', 'S_noise', help='Stoch. noise inflation', metavar='FLOAT', type=float, default=1)
@click.option('--solver', help='Ablate ODE solver', metavar='euler|heun', type=click.Choice(['euler', 'heun']))
@click.option('--disc', 'discretization', help='Ablate time step discretization {t_i}', metavar='vp|ve|iddpm|edm',
              type=click.Choice(['vp', 've', 'iddpm', 'edm']))
@click.option('--schedule', help='Ablate noise schedule sigma(t)', metavar='vp|ve|linear', type=click.Choice(['vp', 've', 'linear']))
@click.option('--scaling', help='Ablate signal scaling s(t)', metavar='vp|none', type=click.Choice(['vp', 'none']))
@click.option('--gnet', 'gnet_path', help='EDM2 guiding network: unconditional (CFG) or weaker (autoguidance)', metavar='PATH')
@click.option('--guidance', help='EDM2 guidance strength (1 = off)  [default: 1]', metavar='FLOAT',
              type=click.FloatRange(min=0))
@click.option('--vae', 'vae_path', help='Local Stable Diffusion VAE (diffusers AutoencoderKL dir) for latent EDM2 nets',
              metavar='DIR')
@click.option('--device', help='Device  [default: cuda if available, else cpu]', metavar='cuda|cpu')
@click.option('--grid', 'grid_path', help='Also write all images as one grid PNG', metavar='PNG')
@click.option('--npz', 'npz_path', help='Also write all images to one uint8 .npz (arr_0 [N,H,W,C], seeds, labels)', metavar='NPZ')
@click.option('--fast/--no-fast', help='Fast path: channels-last, reduced precision, compiled, CUDA graphs  [default: on for cuda]',
              default=None)
@click.option('--dtype', help='Compute dtype of the fast path', type=click.Choice(['fp16', 'bf16', 'fp32']), default='fp16')
@click.option('--compile/--no-compile', 'compile_net', help='torch.compile the network (fast path)', default=True)
@click.option('--graphs/--no-graphs', help='Capture CUDA graphs per batch shape (fast path)', default=True)
def main(network_path, outdir, seeds, subdirs, class_idx, max_batch_size, device, grid_path, npz_path, fast, dtype,
         compile_net, graphs, gnet_path, guidance, vae_path, **sampler_kwargs):
    """Generate images from an EDM network with the EDM sampler (or the ablation sampler when --solver,
    --disc, --schedule or --scaling is given), one PNG per seed named as NVlabs names them."""
    grid_pad = 0
    if network_path is None:  # the main job on a built-in default: the demo model shipped in the package
        from edm_fast.demo import DEMO_SNAPSHOT
        if not os.path.exists(DEMO_SNAPSHOT):
            raise click.BadParameter(f'no --network given and the built-in demo model {DEMO_SNAPSHOT} is missing; '
                                     f'pass --network=PATH', param_hint="'--network'")
        network_path = DEMO_SNAPSHOT
        grid_path = grid_path or os.path.join(outdir, 'grid.png')
        grid_pad = 2  # the demo digits fill their frames: separate the tiles
    rank, world, device = distributed.init_from_env(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    check_outdir(outdir)
    try:
        snapshot = load_snapshot(network_path)
    except (CheckpointError, OSError) as e:
        raise click.BadParameter(str(e), param_hint="'--network'")
    net = snapshot['ema'].to(device)
    encoder = snapshot.get('encoder')
    if encoder is not None:
        if vae_path is not None and hasattr(encoder, 'vae_name'):
            encoder.vae_name = vae_path
        try:
            encoder.init(device)
        except RuntimeError as e:
            raise click.BadParameter(str(e), param_hint="'--vae'")
    gnet = None
    if gnet_path is not None:
        try:
            gnet = load_network(gnet_path, device=device)
        except (CheckpointError, OSError) as e:
            raise click.BadParameter(str(e), param_hint="'--gnet'")
    try:
        generate.check_class(net, class_idx)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'--class'")
    try:
        generate.sampler_for(net, gnet, guidance, **sampler_kwargs)
    except ValueError as e:
        raise click.UsageError(str(e))

    denoiser = None
    if fast if fast is not None else device.type == 'cuda':
        from edm_fast.fast import FastDenoiser
        denoiser = FastDenoiser(net, dtype=dtype, compile=compile_net, cuda_graphs=graphs)
        if gnet is not None:
            gnet = FastDenoiser(gnet, dtype=dtype, compile=compile_net, cuda_graphs=graphs)

    keep = grid_path is not None or npz_path is not None
    kept = []
    start = time.perf_counter()
    for batch in generate.generate_images(net, seeds, max_batch_size=max_batch_size, class_idx=class_idx, device=device,
                                          denoiser=denoiser, gnet=gnet, guidance=guidance, encoder=encoder,
                                          progress=True, **sampler_kwargs):
        images = batch.images.permute(0, 2, 3, 1).cpu().numpy()
        for seed, image in zip(batch.seeds, images):
            image_io.save_png(image, image_io.image_path(outdir, seed, subdirs))
        if keep:
            labels = batch.labels.cpu().numpy() if batch.labels is not None else np.full(len(images), -1)
            kept.append((batch.seeds, images, labels))
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start

    gathered = distributed.gather_to_rank0(kept) if keep else None
    if rank == 0:
        if keep:
            parts = [p for rank_parts in gathered for p in rank_parts]
            by_seed = {s: (img, lab) for seeds_, imgs, labs in parts for s, img, lab in zip(seeds_, imgs, labs)}
            images = np.stack([by_seed[s][0] for s in seeds])
            if grid_path:
                image_io.save_png(image_io.make_grid(images, pad=grid_pad, pad_value=96), grid_path)
            if npz_path:
                labels = np.array([by_seed[s][1] for s in seeds]) if net.label_dim else None
                image_io.save_npz(npz_path, images, seeds, labels)
        nfe = generate.nfe_per_image(net, guidance, **sampler_kwargs)
        print(f'Generated {len(seeds)} images in {seconds:.2f} s: {len(seeds) / seconds:.2f} images/s, '
              f'{nfe} NFE per image, {world} process(es) on {device.type}'
              f'{f" (fast path: {dtype}" + (", compiled" if compile_net else "") + (", CUDA graphs" if graphs and device.type == "cuda" else "") + ")" if denoiser else ""}'
              f'; PNGs in {outdir}'
              + (f', grid {grid_path}' if grid_path else '') + (f', npz {npz_path}' if npz_path else ''))
    distributed.shutdown()


if __name__ == '__main__':
    main()
