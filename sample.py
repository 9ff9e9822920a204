"""Generate images with an EDM network: the flags of NVlabs generate.py, plus --device, --grid, --npz and --resume.

  python sample.py --network=edm-cifar10-32x32-cond-vp.pkl --outdir=out --seeds=0-63 --batch=64
  torchrun --standalone --nproc_per_node=8 sample.py --network=... --outdir=fid-tmp --seeds=0-49999 --subdirs

--network takes an official NVlabs pickle (read without running code from it) or an edm_fast snapshot.
"""

import os
import time

import click
import numpy as np
import torch

from edm_fast import cli_options, distributed, generate, image_io, sample_resume
from edm_fast.cli_options import parse_seeds  # noqa: F401  (part of this script's interface, tests use it)


def check_outdir(outdir):
    try:
        os.makedirs(outdir, exist_ok=True)
    except OSError as e:
        raise click.BadParameter(f'cannot create {outdir!r}: {e.strerror}', param_hint="'--outdir'")
    error = cli_options.write_probe(outdir)
    if error:
        raise click.BadParameter(f'cannot write to {outdir!r}: {error}', param_hint="'--outdir'")


def demo_grid_path(outdir):
    """The demo's grid goes beside --outdir, not into it: a folder of samples then holds only the per-seed PNGs, so
    `fid.py calc --images=out` and dataset_tool.py read exactly the generated images."""
    folder = os.path.normpath(outdir)
    if os.path.basename(folder) in ('', '.', '..'):
        folder = os.path.abspath(folder)
    return folder + '-grid.png'


@click.command(context_settings=dict(show_default=True))
@click.option('--network', 'network_path', help='Network: NVlabs pickle or edm_fast snapshot  [default: the built-in '
              'demo model (digits), which also writes the grid <outdir>-grid.png]', metavar='PATH')
@click.option('--outdir', help='Where to save the PNGs', metavar='DIR', default='out')
@click.option('--seeds', help='Random seeds (e.g. 1,2,5-10)', metavar='LIST', callback=cli_options.parse_seeds, default='0-63')
@click.option('--subdirs', help='Create subdirectory for every 1000 seeds', is_flag=True)
@click.option('--resume', help='Keep the PNGs a killed run already wrote to --outdir and generate the missing seeds '
              f'(same settings required; --outdir/{sample_resume.SETTINGS_FILE} records them)', is_flag=True)
@cli_options.BATCH_OPTION
@cli_options.apply(cli_options.SAMPLER_OPTIONS + cli_options.GUIDANCE_OPTIONS)
@cli_options.device_option()
@click.option('--grid', 'grid_path', help='Also write all images as one grid PNG', metavar='PNG')
@click.option('--npz', 'npz_path', help='Also write all images to one uint8 .npz (arr_0 [N,H,W,C], seeds, labels)', metavar='NPZ')
@cli_options.apply(cli_options.FAST_OPTIONS)
def main(network_path, outdir, seeds, subdirs, resume, class_idx, max_batch_size, device, grid_path, npz_path, fast, dtype,
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
        grid_path = grid_path or demo_grid_path(outdir)
        grid_pad = 2  # the demo digits fill their frames: separate the tiles
    rank, world, device = distributed.init_from_env(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    check_outdir(outdir)
    cli_options.check_output_file(grid_path, "'--grid'")
    cli_options.check_output_file(npz_path, "'--npz'")
    setup = cli_options.load_sampling_setup(network_path, gnet_path, vae_path, class_idx, guidance, sampler_kwargs, device,
                                            fast, dtype, compile_net, graphs)
    net, gnet, encoder, denoiser = setup['net'], setup['gnet'], setup['encoder'], setup['denoiser']
    wanted = sample_resume.settings(network_path, gnet_path, vae_path, class_idx, guidance,
                                    dtype if denoiser is not None else None, sampler_kwargs)
    try:
        todo = sample_resume.seeds_to_generate(outdir, seeds, subdirs, wanted, resume)
    except ValueError as e:
        raise click.UsageError(str(e))
    if rank == 0 and len(todo) < len(seeds):
        print(f'--resume: {len(seeds) - len(todo)} of {len(seeds)} images are already in {outdir}; '
              f'generating the other {len(todo)}')

    keep = grid_path is not None or npz_path is not None
    kept = []
    start = time.perf_counter()
    for batch in generate.generate_images(net, todo, max_batch_size=max_batch_size, class_idx=class_idx, device=device,
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
    sample_resume.finish(outdir, todo)

    gathered = distributed.gather_to_rank0(kept) if keep else None
    if rank == 0:
        if keep:
            parts = [p for rank_parts in gathered for p in rank_parts]
            by_seed = {s: (img, lab) for seeds_, imgs, labs in parts for s, img, lab in zip(seeds_, imgs, labs)}
            earlier = [s for s in seeds if s not in by_seed]  # kept from the run that --resume continues
            if earlier:
                labels = generate.class_labels_of(net, earlier, device, class_idx, max_batch_size)
                for i, s in enumerate(earlier):
                    by_seed[s] = (image_io.read_png(image_io.image_path(outdir, s, subdirs)),
                                  int(labels[i]) if labels is not None else -1)
            images = np.stack([by_seed[s][0] for s in seeds])
            if grid_path:
                image_io.save_png(image_io.make_grid(images, pad=grid_pad, pad_value=96), grid_path)
            if npz_path:
                labels = np.array([by_seed[s][1] for s in seeds]) if net.label_dim else None
                image_io.save_npz(npz_path, images, seeds, labels)
        nfe = generate.nfe_per_image(net, guidance, **sampler_kwargs)
        print(f'Generated {len(todo)} images in {seconds:.2f} s: {len(todo) / max(seconds, 1e-9):.2f} images/s, '
              f'{nfe} NFE per image, {world} process(es) on {device.type}'
              f'{f" (fast path: {dtype}" + (", compiled" if compile_net else "") + (", CUDA graphs" if graphs and device.type == "cuda" else "") + ")" if denoiser else ""}'
              f'; PNGs in {outdir}'
              + (f', grid {grid_path}' if grid_path else '') + (f', npz {npz_path}' if npz_path else ''))
    distributed.shutdown()


if __name__ == '__main__':
    main()
