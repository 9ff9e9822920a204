"""Convert raw image collections into the EDM dataset format (spec §7.1, §7.3); the logic of dataset_tool.py.

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

Public API: `convert_dataset`, `open_dataset`, `make_transform`, `parse_resolution`, `DatasetToolError`.
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

__all__ = ['convert_dataset', 'open_dataset', 'make_transform', 'parse_resolution', 'DatasetToolError',
           'archive_fname']


class DatasetToolError(Exception):
    """A problem with the source, destination or options; the message names the thing and the fix."""


SUPPORTED_SOURCES = ('a directory of images, a .zip of images, cifar-10-python.tar.gz, or an MNIST '
                     'train-images-idx3-ubyte.gz (with train-labels-idx1-ubyte.gz beside it)')


def archive_fname(idx):
    """'00000/img00000000.png'-style name of image idx inside a dataset."""
    return f'{idx // 1000:05d}/img{idx:08d}.png'


def _is_image_ext(fname):
    PIL.Image.init()
    return os.path.splitext(str(fname))[1].lower() in PIL.Image.EXTENSION


def _decode(file_or_bytes, where):
    """An encoded image -> uint8 [H, W] or [H, W, C] array (palette, 1-bit and CMYK converted to L/RGB)."""
    try:
        if isinstance(file_or_bytes, (bytes, bytearray)):
            file_or_bytes = io.BytesIO(file_or_bytes)
        with PIL.Image.open(file_or_bytes) as image:
            image.load()
            if image.mode == 'P':
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


def open_image_folder(source_dir, max_images=None):
    paths = []
    for root, _dirs, files in os.walk(source_dir):
        for fname in files:
            if _is_image_ext(fname):
                paths.append(os.path.relpath(os.path.join(root, fname), source_dir).replace('\\', '/'))
    paths.sort(key=lambda p: p.split('/'))  # by path components, as NVlabs sorts pathlib paths

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
            yield dict(img=_decode(where, where), label=labels.get(p), name=where)
    return n, iterate_images()


def open_image_zip(source, max_images=None):
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
                yield dict(img=_decode(z.read(fname), where), label=labels.get(fname), name=where)
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


def open_dataset(source, max_images=None):
    """(number of images, iterator of dict(img, label, name)) for any supported source (see module doc)."""
    source = os.fspath(source)
    if os.path.isdir(source):
        if source.rstrip('/\\').endswith('_lmdb'):
            raise DatasetToolError(f'{source}: LSUN lmdb sources are not supported by edm_fast; export the images '
                                   f'to a folder first and pass that folder as --source')
        return open_image_folder(source, max_images=max_images)
    if os.path.isfile(source):
        base = os.path.basename(source)
        if base == 'cifar-10-python.tar.gz':
            return open_cifar10(source, max_images=max_images)
        if base.endswith('images-idx3-ubyte.gz'):
            return open_mnist(source, max_images=max_images)
        if base.lower().endswith('.zip'):
            return open_image_zip(source, max_images=max_images)
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


def make_transform(transform=None, width=None, height=None):
    """The per-image transform: None (LANCZOS resize when a size is given), 'center-crop' or 'center-crop-wide'."""
    if transform is None:
        return functools.partial(_scale, width, height)
    if transform not in ('center-crop', 'center-crop-wide'):
        raise DatasetToolError(f'unknown transform {transform!r}; use center-crop or center-crop-wide')
    if width is None or height is None:
        raise DatasetToolError(f'--transform={transform} needs --resolution=WxH (e.g. --resolution=64x64)')
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
    if w <= 0 or h <= 0:
        raise DatasetToolError(f'resolution {w}x{h} must be positive, e.g. --resolution=64x64')
    return w, h


# ----------------------------------------------------------------------------------------------------
# Destinations, written under a temporary name and renamed when complete.


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
            os.makedirs(parent, exist_ok=True)
            fd, self.tmp = tempfile.mkstemp(prefix=f'.{base}.', suffix='.tmp', dir=parent)
            os.close(fd)
            self.zip = zipfile.ZipFile(self.tmp, mode='w', compression=zipfile.ZIP_STORED)
        else:
            if os.path.exists(dest) and not os.path.isdir(dest):
                raise DatasetToolError(f'{dest}: --dest exists and is not a directory; give a new or empty '
                                       f'directory, or a .zip file name')
            if os.path.isdir(dest) and os.listdir(dest):
                raise DatasetToolError(f'{dest}: --dest folder must be empty; remove its contents or choose '
                                       f'another folder')
            os.makedirs(parent, exist_ok=True)
            self.tmp = tempfile.mkdtemp(prefix=f'.{base}.', suffix='.tmp', dir=parent)

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


def convert_dataset(source, dest, max_images=None, transform=None, resolution=None, progress=True):
    """Convert `source` into an EDM dataset at `dest` (a .zip or a new/empty directory).

    Args:
        source: see `open_dataset`.
        dest: output .zip (uncompressed) or directory.
        max_images: convert at most this many source images.
        transform: None, 'center-crop' or 'center-crop-wide'.
        resolution: output size as (W, H) or 'WxH'; None keeps the source size (no transform only).
        progress: show a tqdm progress bar.

    Returns dict(dest, num_images (written), num_skipped, resolution, channels, labelled).
    Raises DatasetToolError for anything the user can fix (the message says what).
    """
    source, dest = os.fspath(source), os.fspath(dest)
    if dest == '':
        raise DatasetToolError('--dest must not be empty: give an output .zip file name or directory')
    if max_images is not None and max_images < 1:
        raise DatasetToolError(f'--max-images={max_images} must be at least 1')
    width, height = parse_resolution(resolution) or (None, None)
    transform_image = make_transform(transform, width, height)
    num_files, images = open_dataset(source, max_images=max_images)
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
        labelled = all(x is not None for x in labels)
        out.write('dataset.json', json.dumps({'labels': labels if labelled else None}))
        out.commit()
    except BaseException:
        out.abort()
        raise
    return dict(dest=dest, num_images=len(labels), num_skipped=num_skipped,
                resolution=(attrs['width'], attrs['height']), channels=attrs['channels'], labelled=labelled)
