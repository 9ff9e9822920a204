"""Create EDM and EDM2 datasets: the command lines of NVlabs edm and edm2 dataset_tool.py. The logic lives in
edm_fast.dataset_tool; this file only parses flags.

EDM form (no subcommand; NVlabs edm):
  python dataset_tool.py --source=downloads/cifar10/cifar-10-python.tar.gz --dest=datasets/cifar10-32x32.zip
  python dataset_tool.py --source=downloads/ffhq/images1024x1024 --dest=datasets/ffhq-64x64.zip --resolution=64x64
  python dataset_tool.py --source=downloads/imagenet/ILSVRC/Data/CLS-LOC/train \\
      --dest=datasets/imagenet-64x64.zip --resolution=64x64 --transform=center-crop

EDM2 form (subcommands; NVlabs edm2):
  python dataset_tool.py convert --source=downloads/imagenet/ILSVRC/Data/CLS-LOC/train \\
      --dest=datasets/img64.zip --resolution=64x64 --transform=center-crop-dhariwal
  python dataset_tool.py convert --source=downloads/imagenet/ILSVRC/Data/CLS-LOC/train \\
      --dest=datasets/img512.zip --resolution=512x512 --transform=center-crop-dhariwal
  python dataset_tool.py encode --source=datasets/img512.zip --dest=datasets/img512-sd.zip --model-url=<VAE dir>
"""

import os
import sys

import click

from edm_fast import cli_options
from edm_fast.dataset_tool import TRANSFORMS, DatasetToolError, convert_dataset, encode_dataset, parse_resolution


def _parse_resolution(ctx, param, value):
    try:
        return parse_resolution(value)
    except DatasetToolError as e:
        raise click.BadParameter(str(e))


def _single_process():
    if os.environ.get('WORLD_SIZE', '1') != '1':
        raise click.ClickException('dataset_tool.py runs in one process: start it with python, not torchrun')


_SOURCES_HELP = '''\b
--source may be:
  a directory of images (recursive); labels come from its dataset.json, else from the names of
    its top-level sub-directories when there is more than one
  a .zip of images (labels from its dataset.json)
  cifar-10-python.tar.gz (the CIFAR-10 python tarball: 50,000 training images with labels)
  train-images-idx3-ubyte.gz (MNIST; train-labels-idx1-ubyte.gz beside it; padded to 32x32)
LSUN lmdb folders are not supported here: export their images to a folder first.'''

_TRANSFORMS_HELP = '''\b
--transform (default: none, LANCZOS resize to --resolution if given):
  center-crop           crop the largest centred square, then resize to WxH (needs --resolution)
  center-crop-wide      crop to the WxH aspect ratio, resize, then pad to a WxW square with black
                        (needs --resolution; images narrower than W are skipped)
  center-crop-dhariwal  the ADM crop used for ImageNet in EDM2 (needs --resolution=RxR): halve
                        with BOX while the short side >= 2R, BICUBIC-scale the short side to R,
                        centre-crop RxR'''

_DEST_HELP = '''\b
--dest is a .zip (written under a temporary name and renamed when complete) or an empty directory.
Images are named 00000/img00000000.png, 00000/img00000001.png, ... All must end up square,
of one power-of-two size.'''


def _convert_options(fn):
    for option in reversed([
        click.option('--source', help='Directory or archive name for input dataset', required=True, metavar='PATH'),
        click.option('--dest', help='Output directory or archive name for output dataset', required=True,
                     metavar='PATH'),
        click.option('--max-images', help='Output only up to `max-images` images', type=click.IntRange(min=1),
                     default=None),
        click.option('--transform', help='Input crop/resize mode', type=click.Choice(TRANSFORMS)),
        click.option('--resolution', help='Output resolution (e.g., \'512x512\')', metavar='WxH',
                     callback=_parse_resolution),
    ]):
        fn = option(fn)
    return fn


def _run_convert(flavor, source, dest, max_images, transform, resolution):
    try:
        convert_dataset(source=source, dest=dest, max_images=max_images, transform=transform, resolution=resolution,
                        flavor=flavor)
    except DatasetToolError as e:
        raise click.ClickException(str(e))


@click.command(help=f'''Convert an image dataset into the format EDM training reads (uncompressed PNGs plus
dataset.json, in a ZIP_STORED zip or an empty directory). Grayscale images stay grayscale (L).

{_SOURCES_HELP}

{_TRANSFORMS_HELP}

{_DEST_HELP} RGB or grayscale.
''')
@_convert_options
def edm_main(source, dest, max_images, transform, resolution):
    _run_convert('edm', source, dest, max_images, transform, resolution)


class _DatasetTool(click.Group):
    """The EDM2 subcommands, plus the EDM form: a command line that starts with an option other than --help
    (`dataset_tool.py --source=... --dest=...`) runs the EDM conversion, exactly as before."""

    def main(self, args=None, prog_name=None, **extra):
        argv = list(sys.argv[1:] if args is None else args)
        if argv and argv[0].startswith('-') and argv[0] != '--help':
            return edm_main.main(argv, prog_name=prog_name, **extra)
        return super().main(args, prog_name, **extra)


@click.group(cls=_DatasetTool, help=f'''Create datasets for EDM and EDM2 training.

\b
EDM form:   python dataset_tool.py --source=PATH --dest=PATH [--resolution=WxH] [--transform=...]
EDM2 form:  python dataset_tool.py convert --source=PATH --dest=PATH [...]
            python dataset_tool.py encode --source=PATH --dest=PATH --model-url=VAE_DIR
The EDM form keeps grayscale images grayscale; convert reads every image as RGB (as NVlabs edm2).
Both accept the options below; see `dataset_tool.py convert --help` and `dataset_tool.py encode --help`.

{_SOURCES_HELP}

{_TRANSFORMS_HELP}
''')
def main():
    pass


@main.command(help=f'''Convert an image dataset into archive format for EDM2 training (uncompressed RGB PNGs plus
dataset.json). Every image is read as RGB (gray replicated, alpha dropped); folder images are taken in the
order of their path strings. Example (ImageNet 512x512, then `encode`):

\b
  python dataset_tool.py convert --source=downloads/imagenet/ILSVRC/Data/CLS-LOC/train \\
      --dest=datasets/img512.zip --resolution=512x512 --transform=center-crop-dhariwal

{_SOURCES_HELP}

{_TRANSFORMS_HELP}

{_DEST_HELP}
''')
@_convert_options
def convert(source, dest, max_images, transform, resolution):
    _single_process()
    _run_convert('edm2', source, dest, max_images, transform, resolution)


@main.command(help='''Encode pixel data to Stable Diffusion VAE latents (the dataset EDM2 latent models train on).

Every image (read as RGB, not resized: convert it first) becomes a float32 array [8, H/8, W/8] holding the
VAE posterior mean and std, stored with np.save; dataset.json keeps the labels. File names:

\b
  00000/img-mean-std-00000000.npy, 00000/img-mean-std-00000001.npy, ...

The VAE (stabilityai/sd-vae-ft-mse) cannot be downloaded by edm_fast: download it yourself and give its local
directory (a diffusers AutoencoderKL with config.json and diffusion_pytorch_model.safetensors) as
--model-url; the diffusers package must be installed. A Hugging Face name works when the model is already
in the local Hugging Face cache.

\b
  python dataset_tool.py encode --source=datasets/img512.zip --dest=datasets/img512-sd.zip \\
      --model-url=downloads/sd-vae-ft-mse
''')
@click.option('--model-url', help='VAE encoder model: a local diffusers AutoencoderKL directory', metavar='DIR',
              type=str, default='stabilityai/sd-vae-ft-mse', show_default=True)
@click.option('--source', help='Input directory or archive name', metavar='PATH', type=str, required=True)
@click.option('--dest', help='Output directory or archive name', metavar='PATH', type=str, required=True)
@click.option('--max-images', help='Maximum number of images to output', metavar='INT', type=click.IntRange(min=1),
              default=None)
@click.option('--device', help='Where the VAE runs  [default: cuda if available, else cpu]', metavar='cpu|cuda[:N]',
              callback=cli_options.parse_device, default=None)
@click.option('--batch', 'batch_size', help='Images per VAE call', metavar='INT', type=click.IntRange(min=1),
              default=1, show_default=True)
def encode(model_url, source, dest, max_images, device, batch_size):
    _single_process()
    try:
        encode_dataset(source=source, dest=dest, model_url=model_url, max_images=max_images, device=device,
                       batch_size=batch_size)
    except DatasetToolError as e:
        raise click.ClickException(str(e))


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
