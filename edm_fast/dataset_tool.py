"""Convert raw image collections into the EDM/EDM2 dataset format (spec §7.1, §7.3); the logic of dataset_tool.py.

Output: an uncompressed zip (ZIP_STORED) or a new/empty directory holding uncompressed PNGs named
`{idx // 1000:05d}/img{idx:08d}.png` and `dataset.json` = {"labels": [[name, label], ...]} (null unless
every image has a label). Both are written under a temporary name and renamed at the end, so an
interrupted run leaves no half-written dataset behind.

Sources (`open_dataset`):
  * a directory of images (recursive, sorted by path components); labels from its dataset.json, else
    from the top-level sub-directory names (sorted, indexed) when there is more than one;
  * a .zip of images; labels only from its dataset.json;
  * `cifar-10-python.tar.gz`: the training batches data_batch_1..5 (50,000 32x32 images, labels 0-9);
  * `*images-idx3-ubyte.gz` (MNIST and look-alikes) with `*labels-idx1-ubyte.gz` beside it: 28x28
    zero-padded to 32x32, labels 0-9.
  LSUN lmdb folders (`*_lmdb`) are not supported: export their images to a folder first.

Two flavours of conversion (`convert_dataset(flavor=...)`):
  * 'edm' (NVlabs edm `dataset_tool.py --source ... --dest ...`): grayscale stays grayscale (mode L);
    folder images are sorted by path components (as pathlib paths sort).
  * 'edm2' (NVlabs edm2 `dataset_tool.py convert ...`): every image is converted to RGB when read (PIL
    convert('RGB'): gray is replicated, alpha dropped); folder images are sorted by their path strings.
Transforms: center-crop, center-crop-wide (EDM) and center-crop-dhariwal (EDM2; the ADM center crop used
for ImageNet 64x64 and 512x512, see `_center_crop_dhariwal`); all flavours accept all three.

`encode_dataset` (NVlabs edm2 `dataset_tool.py encode`): images -> Stable Diffusion VAE latents, one
float32 .npy file [8, H/8, W/8] (posterior mean then std) per image, named
`{idx // 1000:05d}/img-mean-std-{idx:08d}.npy`, plus dataset.json. It needs the VAE locally (see
`edm_fast.encoders.StabilityVAEEncoder`) or any encoder object with `encode_pixels`.

Public API: `convert_dataset`, `encode_dataset`, `open_dataset`, `make_transform`, `parse_resolution`,
`DatasetToolError`, `archive_fname`, `latent_fname`, `TRANSFORMS`.
"""

import functools
import gzip
import importlib
import io
import json
import os
import pickle
import re
import shutil
import tarfile
import tempfile
import zipfile

import numpy as np
import PIL.Image
from tqdm import tqdm

__all__ = ['convert_dataset', 'encode_dataset', 'open_dataset', 'make_transform', 'parse_resolution',
           'DatasetToolError', 'archive_fname', 'latent_fname', 'TRANSFORMS']

TRANSFORMS = ('center-crop', 'center-crop-wide', 'center-crop-dhariwal')
FLAVORS = ('edm', 'edm2')


class DatasetToolError(Exception):
    """A problem with the source, destination or options; the message names the thing and the fix."""


SUPPORTED_SOURCES = ('a directory of images, a .zip of images, cifar-10-python.tar.gz, or an MNIST '
                     'train-images-idx3-ubyte.gz (with train-labels-idx1-ubyte.gz beside it)')


def archive_fname(idx):
    """'00000/img00000000.png'-style name of image idx inside a dataset."""
    return f'{idx // 1000:05d}/img{idx:08d}.png'


def latent_fname(idx):
    """'00000/img-mean-std-00000000.npy'-style name of the VAE latents of image idx (dataset_tool.py encode)."""
    return f'{idx // 1000:05d}/img-mean-std-{idx:08d}.npy'


def _is_image_ext(fname):
    PIL.Image.init()
    return os.path.splitext(str(fname))[1].lower() in PIL.Image.EXTENSION


def _decode(file_or_bytes, where, rgb=False):
    """An encoded image -> uint8 [H, W] or [H, W, C] array (palette, 1-bit and CMYK converted to L/RGB);
    rgb=True: always [H, W, 3] through PIL convert('RGB'), as NVlabs edm2."""
    try:
        if isinstance(file_or_bytes, (bytes, bytearray)):
            file_or_bytes = io.BytesIO(file_or_bytes)
        with PIL.Image.open(file_or_bytes) as image:
            image.load()
            if rgb:
                image = image.convert('RGB')
            elif image.mode == 'P':
                image = image.convert('RGBA' if 'transparency' in image.info else 'RGB')
            elif image.mode == '1':
                image = image.convert('L')
            elif image.mode in ('CMYK', 'YCbCr'):
                image = image.convert('RGB')
            array = np.array(image)
    except Exception as e:  # PIL raises many types for bad files
        raise DatasetToolError(f'{where}: cannot decode image ({type(e).__name__}: {e}); remove or replace the '
                               f'file') from e
    if array.dtype != np.uint8:
        raise DatasetToolError(f'{where}: image has {array.dtype} pixels; only 8-bit images are supported: '
                               f'convert it to 8-bit grayscale or RGB')
    return array


def _read_labels_json(data, where):
    """dataset.json contents -> {archive name: label} ({} when the labels are null)."""
    try:
        meta = json.loads(data)
        entries = meta['labels']
        if entries is None:
            return {}
        return {str(name).replace('\\', '/'): label for name, label in entries}
    except (ValueError, KeyError, TypeError) as e:
        raise DatasetToolError(f'{where}: malformed dataset.json ({type(e).__name__}: {e}); expected '
                               f'{{"labels": [[filename, label], ...]}} or {{"labels": null}}: fix or remove it') from e


def _limit(n, max_images):
    return n if max_images is None else min(n, max_images)


# ----------------------------------------------------------------------------------------------------
# Sources: each returns (number of images, iterator of dict(img=uint8 HW/HWC array, label=int|list|None, name=str)).


def open_image_folder(source_dir, max_images=None, flavor='edm'):
    paths = []
    for root, _dirs, files in os.walk(source_dir):
        for fname in files:
            if _is_image_ext(fname):
                paths.append(os.path.relpath(os.path.join(root, fname), source_dir).replace('\\', '/'))
    if flavor == 'edm2':
        paths.sort()  # by path string, as NVlabs edm2 sorts its os.scandir paths ('a-b/x' before 'a/x')
    else:
        paths.sort(key=lambda p: p.split('/'))  # by path components, as NVlabs edm sorts pathlib paths
    rgb = flavor == 'edm2'

    labels = {}
    meta_fname = os.path.join(source_dir, 'dataset.json')
    if os.path.isfile(meta_fname):
        with open(meta_fname, 'rb') as f:
            labels = _read_labels_json(f.read(), meta_fname)
    if not labels:
        toplevel = {p: p.split('/')[0] if '/' in p else '' for p in paths}
        class_idx = {name: idx for idx, name in enumerate(sorted(set(toplevel.values())))}
        if len(class_idx) > 1:
            labels = {p: class_idx[name] for p, name in toplevel.items()}

    n = _limit(len(paths), max_images)

    def iterate_images():
        for p in paths[:n]:
            where = os.path.join(source_dir, p)
            yield dict(img=_decode(where, where, rgb), label=labels.get(p), name=where)
    return n, iterate_images()


def open_image_zip(source, max_images=None, flavor='edm'):
    rgb = flavor == 'edm2'
    try:
        with zipfile.ZipFile(source, mode='r') as z:
            names = z.namelist()
            fnames = sorted(f for f in names if _is_image_ext(f))
            labels = _read_labels_json(z.read('dataset.json'), f'{source}:dataset.json') \
                if 'dataset.json' in names else {}
    except zipfile.BadZipFile as e:
        raise DatasetToolError(f'{source}: not a readable zip file ({e}); check the file') from e
    n = _limit(len(fnames), max_images)

    def iterate_images():
        with zipfile.ZipFile(source, mode='r') as z:
            for fname in fnames[:n]:
                where = f'{source}:{fname}'
                yield dict(img=_decode(z.read(fname), where, rgb), label=labels.get(fname), name=where)
    return n, iterate_images()


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a downloaded tarball must not run code."""

    _ALLOWED = {('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
                ('numpy.core.numeric', '_frombuffer'), ('numpy._core.numeric', '_frombuffer'),
                ('numpy', 'ndarray'), ('numpy', 'dtype')}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f'refusing to load {module}.{name}: a CIFAR-10 batch holds only numpy '
                                         f'arrays and lists')
        if module.startswith('numpy.core'):
            try:  # numpy >= 2 moved numpy.core to numpy._core
                return getattr(importlib.import_module(module.replace('numpy.core', 'numpy._core')), name)
            except ImportError:
                pass
        return getattr(importlib.import_module(module), name)


def open_cifar10(tarball, max_images=None):
    """The five training batches of the CIFAR-10 python tarball. Any number of images per batch is accepted
    (the official tarball has 10,000 each); shapes, dtypes and the 0-9 label range are checked."""
    images, labels = [], []
    try:
        with tarfile.open(tarball, 'r:gz') as tar:
            for batch in range(1, 6):
                member = f'cifar-10-batches-py/data_batch_{batch}'
                where = f'{tarball}:{member}'
                try:
                    f = tar.extractfile(member)
                except KeyError:
                    raise DatasetToolError(f'{tarball}: has no {member}; this is not the CIFAR-10 python tarball '
                                           f'(download cifar-10-python.tar.gz)') from None
                try:
                    data = _NumpyOnlyUnpickler(f, encoding='latin1').load()
                except Exception as e:
                    raise DatasetToolError(f'{where}: cannot read the batch ({type(e).__name__}: {e}); the tarball '
                                           f'is damaged: download it again') from e
                finally:
                    f.close()
                if not isinstance(data, dict) or 'data' not in data or 'labels' not in data:
                    raise DatasetToolError(f'{where}: expected a dict with "data" and "labels"; this is not the '
                                           f'CIFAR-10 python tarball')
                x = np.asarray(data['data'])
                y = np.asarray(data['labels'])
                if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
                    raise DatasetToolError(f'{where}: "data" is {x.dtype} {list(x.shape)}, expected uint8 [n, 3072]')
                if y.shape != (x.shape[0],) or y.dtype.kind not in 'iu' or (y.size and (y.min() < 0 or y.max() > 9)):
                    raise DatasetToolError(f'{where}: "labels" must be {x.shape[0]} integers in 0..9')
                images.append(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # NCHW -> NHWC
                labels.append(y.astype(np.int64))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DatasetToolError(f'{tarball}: cannot read the tarball ({type(e).__name__}: {e}); download it '
                               f'again') from e
    images = np.concatenate(images)
    labels = np.concatenate(labels)
    n = _limit(len(images), max_images)

    def iterate_images():
        for idx in range(n):
            yield dict(img=images[idx], label=int(labels[idx]), name=f'{tarball}[{idx}]')
    return n, iterate_images()


def _read_idx(path, magic, ndim):
    """An IDX file (MNIST format, gzip) -> uint8 array with `ndim` dims; errors name the file."""
    try:
        with gzip.open(path, 'rb') as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DatasetToolError(f'{path}: cannot read ({type(e).__name__}: {e}); download it again') from e
    header = 4 + 4 * ndim
    if len(data) < header or int.from_bytes(data[:4], 'big') != magic:
        raise DatasetToolError(f'{path}: not an IDX file of {ndim}-d uint8 data (bad magic number)')
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], 'big') for i in range(ndim)]
    if len(data) != header + int(np.prod(dims)):
        raise DatasetToolError(f'{path}: size does not match its header {dims}; the file is truncated')
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def open_mnist(images_gz, max_images=None):
    """MNIST-format images (28x28, zero-padded to 32x32 as NVlabs) and the labels file beside them."""
    suffix = 'images-idx3-ubyte.gz'
    labels_gz = images_gz[:-len(suffix)] + 'labels-idx1-ubyte.gz'
    if not os.path.isfile(labels_gz):
        raise DatasetToolError(f'{images_gz}: the labels file {labels_gz} is missing; put it beside the images file')
    images = _read_idx(images_gz, 0x803, 3)
    labels = _read_idx(labels_gz, 0x801, 1)
    if labels.shape[0] != images.shape[0]:
        raise DatasetToolError(f'{labels_gz}: has {labels.shape[0]} labels for {images.shape[0]} images in '
                               f'{images_gz}; use the matching pair of files')
    h, w = images.shape[1:]
    side = 1 << max(h, w, 1).bit_length() if max(h, w) & (max(h, w) - 1) else max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    images = np.pad(images, [(0, 0), (top, side - h - top), (left, side - w - left)], 'constant', constant_values=0)
    n = _limit(len(images), max_images)

    def iterate_images():
        for idx in range(n):
            yield dict(img=images[idx], label=int(labels[idx]), name=f'{images_gz}[{idx}]')
    return n, iterate_images()


def _rgb_images(opened):
    """Grayscale images of a source -> RGB (gray replicated), as PIL convert('RGB') in NVlabs edm2."""
    n, images = opened

    def iterate_images():
        for image in images:
            if image['img'].ndim == 2:
                image = dict(image, img=np.repeat(image['img'][:, :, np.newaxis], 3, axis=2))
            yield image
    return n, iterate_images()


def open_dataset(source, max_images=None, flavor='edm'):
    """(number of images, iterator of dict(img, label, name)) for any supported source (see module doc).

    flavor='edm2' reads every image as RGB [H, W, 3] and sorts folder images by path string (NVlabs edm2)."""
    source = os.fspath(source)
    if flavor not in FLAVORS:
        raise ValueError(f'flavor must be one of {FLAVORS}, got {flavor!r}')
    if os.path.isdir(source):
        if source.rstrip('/\\').endswith('_lmdb'):
            raise DatasetToolError(f'{source}: LSUN lmdb sources are not supported by edm_fast; export the images '
                                   f'to a folder first and pass that folder as --source')
        return open_image_folder(source, max_images=max_images, flavor=flavor)
    if os.path.isfile(source):
        base = os.path.basename(source)
        if base == 'cifar-10-python.tar.gz':
            return open_cifar10(source, max_images=max_images)
        if base.endswith('images-idx3-ubyte.gz'):
            opened = open_mnist(source, max_images=max_images)
            return _rgb_images(opened) if flavor == 'edm2' else opened
        if base.lower().endswith('.zip'):
            return open_image_zip(source, max_images=max_images, flavor=flavor)
        raise DatasetToolError(f'{source}: unknown source type; --source must be {SUPPORTED_SOURCES}')
    raise DatasetToolError(f'{source}: no such file or directory; --source must be {SUPPORTED_SOURCES}')


# ----------------------------------------------------------------------------------------------------
# Transforms: uint8 HW/HWC array -> uint8 HW/HWC array, or None to skip the image.


def _resize(img, width, height):
    return np.array(PIL.Image.fromarray(img).resize((width, height), PIL.Image.LANCZOS))


def _scale(width, height, img):
    h, w = img.shape[:2]
    width = w if width is None else width
    height = h if height is None else height
    if (width, height) == (w, h):
        return img
    return _resize(img, width, height)


def _to_rgb(img):
    return img[:, :, np.newaxis].repeat(3, axis=2) if img.ndim == 2 else img


def _center_crop(width, height, img):
    crop = min(img.shape[:2])
    y0, x0 = (img.shape[0] - crop) // 2, (img.shape[1] - crop) // 2
    img = _to_rgb(img[y0:y0 + crop, x0:x0 + crop])
    return np.array(PIL.Image.fromarray(img, 'RGB').resize((width, height), PIL.Image.LANCZOS))


def _center_crop_wide(width, height, img):
    ch = int(np.round(width * img.shape[0] / img.shape[1]))
    if img.shape[1] < width or ch < height:
        return None
    img = _to_rgb(img[(img.shape[0] - ch) // 2:(img.shape[0] + ch) // 2])
    img = _resize(img, width, height)
    canvas = np.zeros([width, width, img.shape[2]], dtype=np.uint8)
    canvas[(width - height) // 2:(width + height) // 2, :] = img
    return canvas


def _center_crop_dhariwal(size, img):
    """The ADM center crop (Dhariwal & Nichol 2021; `center_crop_arr` of openai/guided-diffusion, MIT licence),
    which NVlabs edm2 uses for ImageNet:
      1. while the shorter side is >= 2 * size, halve both sides (floor) with a PIL BOX resize;
      2. scale so that the shorter side is `size`: each side becomes round(side * size / shorter side)
         (Python round, halves to even), PIL BICUBIC;
      3. crop size x size at offsets ((H - size) // 2, (W - size) // 2).
    Never skips an image: smaller images are scaled up."""
    image = PIL.Image.fromarray(img)
    while min(image.size) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), resample=PIL.Image.BOX)
    scale = size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), resample=PIL.Image.BICUBIC)
    out = np.array(image)
    top, left = (out.shape[0] - size) // 2, (out.shape[1] - size) // 2
    return out[top:top + size, left:left + size]


def make_transform(transform=None, width=None, height=None):
    """The per-image transform: None (LANCZOS resize when a size is given), 'center-crop', 'center-crop-wide'
    or 'center-crop-dhariwal' (which needs width == height)."""
    if transform is None:
        return functools.partial(_scale, width, height)
    if transform not in TRANSFORMS:
        raise DatasetToolError(f'unknown transform {transform!r}; use one of {", ".join(TRANSFORMS)}')
    if width is None or height is None:
        raise DatasetToolError(f'--transform={transform} needs --resolution=WxH (e.g. --resolution=64x64)')
    if transform == 'center-crop-dhariwal':
        if width != height:
            raise DatasetToolError(f'--transform=center-crop-dhariwal makes square images: give --resolution=RxR, '
                                   f'not {width}x{height}')
        return functools.partial(_center_crop_dhariwal, width)
    return functools.partial(_center_crop if transform == 'center-crop' else _center_crop_wide, width, height)


def parse_resolution(value):
    """'WxH' or 'W,H' (or a (W, H) pair, or None) -> (W, H) ints or None."""
    if value is None:
        return None
    if isinstance(value, (tuple, list)) and len(value) == 2:
        w, h = (int(v) for v in value)
    else:
        m = re.fullmatch(r'\s*(\d+)\s*[x,]\s*(\d+)\s*', str(value))
        if not m:
            raise DatasetToolError(f'cannot parse resolution {value!r}; use WxH, e.g. --resolution=64x64')
        w, h = int(m.group(1)), int(m.group(2))
    if w <= 0 or h <= 0 or w > 16384 or h > 16384:
        raise DatasetToolError(f'resolution {w}x{h} must be positive and at most 16384x16384, e.g. '
                               f'--resolution=64x64')
    return w, h


# ----------------------------------------------------------------------------------------------------
# Destinations, written under a temporary name and renamed when complete.


def _check_dest(source, dest):
    """--dest must be named and must not be --source or inside it: the new dataset replaces --dest when complete, so
    the source would be lost (or read while it is written)."""
    if dest == '':
        raise DatasetToolError('--dest must not be empty: give an output .zip file name or directory')
    src, dst = os.path.realpath(source), os.path.realpath(dest)
    if dst == src or (os.path.isdir(src) and dst.startswith(src.rstrip(os.sep) + os.sep)):
        raise DatasetToolError(f'--dest={dest} is --source={source} or inside it; writing there would replace or '
                               f'change the source: choose another --dest')


class _Destination:
    """Collects files for a zip (ZIP_STORED) or a directory; `commit()` moves the result into place."""

    def __init__(self, dest):
        self.dest = dest
        parent = os.path.dirname(os.path.abspath(dest))
        base = os.path.basename(os.path.abspath(dest))
        self.is_zip = dest.lower().endswith('.zip')
        if self.is_zip:
            if os.path.isdir(dest):
                raise DatasetToolError(f'{dest}: --dest names a directory; give a .zip file name or a directory '
                                       f'without the .zip ending')
            try:
                os.makedirs(parent, exist_ok=True)
                fd, self.tmp = tempfile.mkstemp(prefix=f'.{base}.', suffix='.tmp', dir=parent)
            except OSError as e:
                raise DatasetToolError(f'{dest}: cannot write there ({e.strerror}); choose another --dest') from e
            os.close(fd)
            self.zip = zipfile.ZipFile(self.tmp, mode='w', compression=zipfile.ZIP_STORED)
        else:
            if os.path.exists(dest) and not os.path.isdir(dest):
                raise DatasetToolError(f'{dest}: --dest exists and is not a directory; give a new or empty '
                                       f'directory, or a .zip file name')
            if os.path.isdir(dest) and os.listdir(dest):
                raise DatasetToolError(f'{dest}: --dest folder must be empty; remove its contents or choose '
                                       f'another folder')
            try:
                os.makedirs(parent, exist_ok=True)
                self.tmp = tempfile.mkdtemp(prefix=f'.{base}.', suffix='.tmp', dir=parent)
            except OSError as e:
                raise DatasetToolError(f'{dest}: cannot write there ({e.strerror}); choose another --dest') from e

    def write(self, fname, data):
        if isinstance(data, str):
            data = data.encode('utf-8')
        if self.is_zip:
            info = zipfile.ZipInfo(fname, date_time=(1980, 1, 1, 0, 0, 0))  # fixed time: reproducible zips
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16
            self.zip.writestr(info, bytes(data))
        else:
            path = os.path.join(self.tmp, fname)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, 'wb') as f:
                f.write(data)

    def finish(self, labels):
        """Write dataset.json (labels: [fname, label] per file, or None entries when unlabelled) and commit.
        Returns whether every file has a label."""
        labelled = all(x is not None for x in labels)
        self.write('dataset.json', json.dumps({'labels': labels if labelled else None}))
        self.commit()
        return labelled

    def commit(self):
        umask = os.umask(0)
        os.umask(umask)
        if self.is_zip:
            self.zip.close()
            os.chmod(self.tmp, 0o666 & ~umask)
            os.replace(self.tmp, self.dest)
        else:
            os.chmod(self.tmp, 0o777 & ~umask)
            if os.path.isdir(self.dest):
                os.rmdir(self.dest)  # empty (checked at the start)
            os.replace(self.tmp, self.dest)

    def abort(self):
        if self.is_zip:
            self.zip.close()
            if os.path.exists(self.tmp):
                os.remove(self.tmp)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------


def convert_dataset(source, dest, max_images=None, transform=None, resolution=None, progress=True, flavor='edm'):
    """Convert `source` into an EDM dataset at `dest` (a .zip or a new/empty directory).

    Args:
        source: see `open_dataset`.
        dest: output .zip (uncompressed) or directory.
        max_images: convert at most this many source images.
        transform: None, 'center-crop', 'center-crop-wide' or 'center-crop-dhariwal'.
        resolution: output size as (W, H) or 'WxH'; None keeps the source size (no transform only).
        progress: show a tqdm progress bar.
        flavor: 'edm' (dataset_tool.py --source ...: grayscale kept) or 'edm2' (dataset_tool.py convert:
            every image read as RGB, folders sorted by path string); see the module doc.

    Returns dict(dest, num_images (written), num_skipped, resolution, channels, labelled).
    Raises DatasetToolError for anything the user can fix (the message says what).
    """
    source, dest = os.fspath(source), os.fspath(dest)
    _check_dest(source, dest)
    if max_images is not None and max_images < 1:
        raise DatasetToolError(f'--max-images={max_images} must be at least 1')
    width, height = parse_resolution(resolution) or (None, None)
    transform_image = make_transform(transform, width, height)
    num_files, images = open_dataset(source, max_images=max_images, flavor=flavor)
    if num_files == 0:
        raise DatasetToolError(f'{source}: no images found; --source must be {SUPPORTED_SOURCES}')

    out = _Destination(dest)
    try:
        attrs = None
        labels = []
        num_skipped = 0
        for idx, image in tqdm(enumerate(images), total=num_files, disable=not progress, unit='img'):
            fname = archive_fname(idx)  # the counter advances for skipped images too, as NVlabs
            img = transform_image(image['img'])
            if img is None:
                num_skipped += 1
                continue
            channels = img.shape[2] if img.ndim == 3 else 1
            cur = dict(width=img.shape[1], height=img.shape[0], channels=channels)
            if attrs is None:
                attrs = cur
                if cur['width'] != cur['height']:
                    raise DatasetToolError(f'{image["name"]}: image is {cur["width"]}x{cur["height"]} after crop and '
                                           f'resize; EDM needs square images: use --transform=center-crop '
                                           f'--resolution=RxR')
                if channels not in (1, 3):
                    raise DatasetToolError(f'{image["name"]}: image has {channels} channels; images must be RGB or '
                                           f'grayscale: remove the alpha channel first')
                if cur['width'] & (cur['width'] - 1):
                    raise DatasetToolError(f'{image["name"]}: image is {cur["width"]}x{cur["height"]} after crop '
                                           f'and resize; the size must be a power of two: use --resolution=RxR, '
                                           f'e.g. --resolution=64x64')
            elif cur != attrs:
                diff = ', '.join(f'{k} {attrs[k]} vs {cur[k]}' for k in attrs if attrs[k] != cur[k])
                raise DatasetToolError(f'{image["name"]}: image attributes differ from the first image ({diff}); '
                                       f'all images must be the same size and channels: use --resolution=WxH '
                                       f'(and --transform=center-crop for mixed aspect ratios)')
            if img.ndim == 3 and channels == 1:
                img = img[:, :, 0]
            buf = io.BytesIO()
            PIL.Image.fromarray(img, {1: 'L', 3: 'RGB'}[channels]).save(buf, format='png', compress_level=0,
                                                                         optimize=False)
            out.write(fname, buf.getbuffer())
            labels.append([fname, image['label']] if image['label'] is not None else None)
        if attrs is None:
            raise DatasetToolError(f'{source}: every image was skipped by --transform={transform} (narrower than '
                                   f'the target width or too short after cropping); choose a smaller --resolution')
        labelled = out.finish(labels)
    except BaseException:
        out.abort()
        raise
    return dict(dest=dest, num_images=len(labels), num_skipped=num_skipped,
                resolution=(attrs['width'], attrs['height']), channels=attrs['channels'], labelled=labelled)


# ----------------------------------------------------------------------------------------------------


def _default_device():
    import torch
    return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


def encode_dataset(source, dest, model_url='stabilityai/sd-vae-ft-mse', max_images=None, device=None, batch_size=1,
                   encoder=None, progress=True):
    """Encode the images of `source` into Stable Diffusion VAE latents at `dest` (NVlabs edm2 `dataset_tool.py
    encode`): the latent dataset an EDM2 latent model (img512 presets, StabilityVAEEncoder) trains on.

    Each image (read as RGB, no transform: convert it to the training resolution first) becomes
    `latent_fname(idx)` = '{idx // 1000:05d}/img-mean-std-{idx:08d}.npy', a float32 array [8, H/8, W/8]
    written with np.save: the VAE posterior mean (4 channels) then its std (4 channels), i.e.
    `encoder.encode_pixels(uint8 [1, 3, H, W])[0]`. dataset.json holds the labels as for images.

    Args:
        source: a directory or .zip of images (or any `open_dataset` source), e.g. the output of convert.
        dest: output .zip (uncompressed) or new/empty directory.
        model_url: the VAE: a local diffusers AutoencoderKL directory (or a name in the local Hugging Face
            cache); nothing is downloaded. Ignored when `encoder` is given.
        max_images: encode at most this many images.
        device: where the VAE runs (default: cuda if available, else cpu).
        batch_size: images per VAE call (NVlabs: 1).
        encoder: an object with encode_pixels(uint8 [N, 3, H, W]) -> float [N, C, h, w] (and optionally
            init(device)); default StabilityVAEEncoder(vae_name=model_url).
        progress: show a tqdm progress bar.

    Returns dict(dest, num_images, latent_shape=[C, h, w], labelled).
    Raises DatasetToolError for anything the user can fix, including a VAE that is not available.
    """
    import torch

    from . import encoders
    source, dest = os.fspath(source), os.fspath(dest)
    _check_dest(source, dest)
    if max_images is not None and max_images < 1:
        raise DatasetToolError(f'--max-images={max_images} must be at least 1')
    if batch_size < 1:
        raise DatasetToolError(f'--batch={batch_size} must be at least 1')
    device = _default_device() if device is None else torch.device(device)
    if encoder is None:
        encoder = encoders.StabilityVAEEncoder(vae_name=model_url, batch_size=batch_size)
    try:
        if hasattr(encoder, 'init'):
            encoder.init(device)  # fails here, before any output exists, when the VAE is missing
    except encoders.VAEUnavailableError as e:
        raise DatasetToolError(f'--model-url={model_url}: {e}') from None
    num_files, images = open_dataset(source, max_images=max_images, flavor='edm2')
    if num_files == 0:
        raise DatasetToolError(f'{source}: no images found; --source must be {SUPPORTED_SOURCES}')

    out = _Destination(dest)
    try:
        labels = []
        shape = latent_shape = None

        def flush(batch):
            nonlocal latent_shape
            x = torch.from_numpy(np.stack([image['img'] for _idx, image in batch])).permute(0, 3, 1, 2)
            with torch.no_grad():
                raw = encoder.encode_pixels(x.to(device))
            raw = raw.detach().to('cpu', torch.float32).numpy()
            for (idx, image), latents in zip(batch, raw):
                buf = io.BytesIO()
                np.save(buf, np.ascontiguousarray(latents), allow_pickle=False)
                out.write(latent_fname(idx), buf.getbuffer())
                labels.append([latent_fname(idx), image['label']] if image['label'] is not None else None)
            latent_shape = list(raw.shape[1:])

        batch = []
        for idx, image in tqdm(enumerate(images), total=num_files, disable=not progress, unit='img'):
            if shape is None:
                shape = image['img'].shape
            elif image['img'].shape != shape:
                raise DatasetToolError(f'{image["name"]}: image is {image["img"].shape[1]}x{image["img"].shape[0]}, '
                                       f'but the first image is {shape[1]}x{shape[0]}; all images must have one size: '
                                       f'convert them first (dataset_tool.py convert --resolution=RxR)')
            batch.append((idx, image))
            if len(batch) == batch_size:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
        labelled = out.finish(labels)
    except BaseException:
        out.abort()
        raise
    return dict(dest=dest, num_images=len(labels), latent_shape=latent_shape, labelled=labelled)
