"""Writing generated images: NVlabs file names, atomic PNG/npz writes, image grids."""

import math
import os

import numpy as np
import PIL.Image

from .util import atomic_write


def image_path(outdir, seed, subdirs=False):
    """<outdir>/<seed:06d>.png, or <outdir>/<seed - seed % 1000:06d>/<seed:06d>.png with subdirs (as NVlabs)."""
    folder = os.path.join(outdir, f'{seed - seed % 1000:06d}') if subdirs else outdir
    return os.path.join(folder, f'{seed:06d}.png')


def to_pil(image_hwc):
    """uint8 [H, W, C] -> PIL image, mode 'L' for one channel and 'RGB' otherwise (as NVlabs)."""
    image_hwc = np.asarray(image_hwc)
    if image_hwc.shape[2] == 1:
        return PIL.Image.fromarray(image_hwc[:, :, 0], 'L')
    return PIL.Image.fromarray(image_hwc, 'RGB')


def save_png(image_hwc, path):
    """Write one uint8 [H, W, C] image as PNG atomically (a temporary file, then rename; no fsync: a killed
    process cannot leave a partial PNG, and 50,000 disk flushes would slow sampling down)."""
    atomic_write(path, lambda f: to_pil(image_hwc).save(f, format='PNG'), durable=False)


_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
_PNG_END = b'\x00\x00\x00\x00IEND\xaeB`\x82'  # the empty IEND chunk every complete PNG ends with


def is_complete_png(path):
    """Whether `path` starts and ends as a whole PNG does (reads 20 bytes): our writes are atomic, but a PNG put
    there by another program that was killed, or by a full disk, can be cut short."""
    try:
        with open(path, 'rb') as f:
            head = f.read(8)
            f.seek(0, os.SEEK_END)
            if f.tell() < 8 + 12:
                return False
            f.seek(-12, os.SEEK_END)
            return head == _PNG_SIGNATURE and f.read(12) == _PNG_END
    except OSError:
        return False


def read_png(path):
    """uint8 [H, W, C] of a PNG written by save_png (C = 1 for mode 'L')."""
    with PIL.Image.open(path) as im:
        image = np.asarray(im)
    return image[:, :, None] if image.ndim == 2 else image


def make_grid(images_nhwc, grid_w=None, pad=0, pad_value=0):
    """Tile N uint8 [H, W, C] images row-major into one image, grid_w columns (default ceil(sqrt(N))),
    with `pad` pixels of `pad_value` between and around tiles (0: tiles touch, as NVlabs example.py)."""
    images_nhwc = np.asarray(images_nhwc)
    n, h, w, c = images_nhwc.shape
    grid_w = grid_w or max(1, math.ceil(math.sqrt(n)))
    grid_h = math.ceil(n / grid_w)
    canvas = np.full([grid_h * (h + pad) + pad, grid_w * (w + pad) + pad, c], pad_value, dtype=np.uint8)
    for i in range(n):
        y, x = pad + (i // grid_w) * (h + pad), pad + (i % grid_w) * (w + pad)
        canvas[y:y + h, x:x + w] = images_nhwc[i]
    return canvas


def save_npz(path, images_nhwc, seeds, labels=None):
    """All images in one .npz: arr_0 = uint8 [N, H, W, C] (the key FID evaluators read), seeds, labels."""
    arrays = dict(arr_0=np.asarray(images_nhwc, dtype=np.uint8), seeds=np.asarray(seeds, dtype=np.int64))
    if labels is not None:
        arrays['labels'] = np.asarray(labels, dtype=np.int64)
    atomic_write(path, lambda f: np.savez(f, **arrays))
