"""Convert raw images into an EDM dataset (the flags of NVlabs dataset_tool.py). The logic lives in
edm_fast.dataset_tool; this file only parses flags.

  python dataset_tool.py --source=downloads/cifar10/cifar-10-python.tar.gz --dest=datasets/cifar10-32x32.zip
  python dataset_tool.py --source=downloads/ffhq/images1024x1024 --dest=datasets/ffhq-64x64.zip --resolution=64x64
  python dataset_tool.py --source=downloads/imagenet/ILSVRC/Data/CLS-LOC/train \\
      --dest=datasets/imagenet-64x64.zip --resolution=64x64 --transform=center-crop
"""

import click

from edm_fast.dataset_tool import DatasetToolError, convert_dataset, parse_resolution


def _parse_resolution(ctx, param, value):
    try:
        return parse_resolution(value)
    except DatasetToolError as e:
        raise click.BadParameter(str(e))


@click.command()
@click.option('--source', help='Directory or archive name for input dataset', required=True, metavar='PATH')
@click.option('--dest', help='Output directory or archive name for output dataset', required=True, metavar='PATH')
@click.option('--max-images', help='Output only up to `max-images` images', type=click.IntRange(min=1), default=None)
@click.option('--transform', help='Input crop/resize mode', type=click.Choice(['center-crop', 'center-crop-wide']))
@click.option('--resolution', help='Output resolution (e.g., \'512x512\')', metavar='WxH', callback=_parse_resolution)
def main(source, dest, max_images, transform, resolution):
    """Convert an image dataset into the format EDM training reads (uncompressed PNGs plus dataset.json,
    in a ZIP_STORED zip or an empty directory).

    \b
    --source may be:
      a directory of images (recursive); labels come from its dataset.json, else from the names of
        its top-level sub-directories when there is more than one
      a .zip of images (labels from its dataset.json)
      cifar-10-python.tar.gz (the CIFAR-10 python tarball: 50,000 training images with labels)
      train-images-idx3-ubyte.gz (MNIST; train-labels-idx1-ubyte.gz beside it; padded to 32x32)
    LSUN lmdb folders are not supported here: export their images to a folder first.

    \b
    --transform (default: none, LANCZOS resize to --resolution if given):
      center-crop       crop the largest centred square, then resize to WxH (needs --resolution)
      center-crop-wide  crop to the WxH aspect ratio, resize, then pad to a WxW square with black
                        (needs --resolution; images narrower than W are skipped)

    \b
    --dest is a .zip (written under a temporary name and renamed when complete) or an empty directory.
    Images are named 00000/img00000000.png, 00000/img00000001.png, ... All must end up square,
    of one power-of-two size, and RGB or grayscale.
    """
    try:
        convert_dataset(source=source, dest=dest, max_images=max_images, transform=transform, resolution=resolution)
    except DatasetToolError as e:
        raise click.ClickException(str(e))


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
