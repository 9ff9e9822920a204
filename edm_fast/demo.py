"""The built-in demo: handwritten digits from scikit-learn's wheel, and the DDPM++ model trained on them.

  python -m edm_fast.demo data --dest datasets/digits-16x16.zip     # rebuild the training set

The data are scikit-learn's 1,797 8x8 digits (16 grey levels, 10 classes), which ship inside its wheel: no
download. Each is scaled to 0..255 and resized to 16x16 with Lanczos, then written through our dataset tool
(labels from the class sub-folders). The trained snapshot ships in edm_fast/assets/ and is what
`python sample.py` samples from when no --network is given; DEMO_TRAIN_COMMAND is how it was made.
"""

import os
import tempfile

import click
import numpy as np

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'assets')
DEMO_SNAPSHOT = os.path.join(ASSETS, 'demo-digits-16x16.safetensors')
DEMO_TRAIN_COMMAND = (
    'python -m edm_fast.demo data --dest datasets/digits-16x16.zip && '
    'python train.py --outdir=training-runs --nosubdir --data=datasets/digits-16x16.zip --cond=1 --arch=ddpmpp '
    '--cbase=32 --cres=1,2,2 --batch=256 --duration=20 --lr=1e-3 --lr-rampup=100 --ema=0.2 --augment=0 '
    '--dropout=0.13 --tick=100 --snap=1 --dump=5 --seed=0 --workers=2 --device=cuda --backend=reference'
)
# The shipped snapshot came from that command on one H100, stopped by time (bench/gpu_run.sh demo:SECONDS);
# its kimg is recorded in the snapshot header (checkpoint.load_snapshot(DEMO_SNAPSHOT)['extra']).


def load_digits_images(resolution=16):
    """(uint8 [N, resolution, resolution] images, int64 [N] labels) from scikit-learn's digits."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise click.ClickException('the demo data come from scikit-learn: pip install scikit-learn') from e
    import PIL.Image
    digits = load_digits()
    images = []
    for img in digits.images:
        small = PIL.Image.fromarray(np.round(img * (255 / 16)).astype(np.uint8), 'L')
        images.append(np.asarray(small.resize((resolution, resolution), PIL.Image.LANCZOS)))
    return np.stack(images), digits.target.astype(np.int64)


def build_digits_dataset(dest, resolution=16):
    """Write the demo training set (an NVlabs-format zip with class labels) to `dest`."""
    import PIL.Image

    from .dataset_tool import convert_dataset
    images, labels = load_digits_images(resolution)
    with tempfile.TemporaryDirectory() as tmp:
        for i, (img, label) in enumerate(zip(images, labels)):
            folder = os.path.join(tmp, f'{label}')
            os.makedirs(folder, exist_ok=True)
            PIL.Image.fromarray(img, 'L').save(os.path.join(folder, f'{i:04d}.png'))
        os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
        return convert_dataset(tmp, dest, progress=False)


@click.group()
def main():
    """The built-in demo model and its training data."""


@main.command()
@click.option('--dest', help='Output zip (or empty directory)', metavar='PATH', default='datasets/digits-16x16.zip',
              show_default=True)
@click.option('--resolution', help='Image size', type=click.IntRange(min=8), default=16, show_default=True)
def data(dest, resolution):
    """Build the demo training set from scikit-learn's digits."""
    build_digits_dataset(dest, resolution)
    click.echo(f'Wrote {dest}')


@main.command()
def command():
    """Print the command that trained the shipped demo snapshot."""
    click.echo(DEMO_TRAIN_COMMAND)


if __name__ == '__main__':
    main()
