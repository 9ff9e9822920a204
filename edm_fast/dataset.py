"""Training data: `ImageFolderDataset` (a zip or folder of PNGs plus dataset.json) and `InfiniteSampler`.

Semantics follow NVlabs `training/dataset.py` and `torch_utils/misc.InfiniteSampler` (spec §5.3, §7):
the same listing, ordering, max_size subset, x-flip doubling, labels and sampler stream, so an index
means the same image here as there. Differences are stricter checks: problems a user can cause
(a missing or corrupt file, mixed image sizes, a malformed dataset.json) raise `DatasetError` naming
the file and what to do, instead of an assertion deep inside a DataLoader worker.

Public API: `ImageFolderDataset`, `InfiniteSampler`, `DatasetError`.
"""

import io
import json
import os
import zipfile

import numpy as np
import PIL.Image
import torch

__all__ = ['ImageFolderDataset', 'InfiniteSampler', 'DatasetError']


class DatasetError(OSError):
    """A dataset on disk is missing, corrupt or inconsistent. The message names the file and the fix."""


_CONVERT_HINT = 'convert the source images with python dataset_tool.py --source=... --dest=...'


def _file_ext(fname):
    return os.path.splitext(fname)[1].lower()


def _image_extensions():
    """What a dataset may hold: any image Pillow reads, and .npy arrays (the VAE latents of
    `dataset_tool.py encode`, as NVlabs edm2 reads them)."""
    PIL.Image.init()
    return set(PIL.Image.EXTENSION) | {'.npy'}


def decode_array(data, where):
    """.npy bytes -> [C, H, W] numpy array (the stored array with its leading axes merged into C, as NVlabs)."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # ValueError, EOFError, OSError: anything that is not a plain .npy array
        raise DatasetError(f'{where}: cannot read the array ({type(e).__name__}: {e}); the file is corrupt or not '
                           f'a .npy array: re-create the dataset with dataset_tool.py encode') from e
    if array.ndim < 2 or not np.issubdtype(array.dtype, np.number):
        raise DatasetError(f'{where}: expected a numeric array [..., H, W], got {array.dtype} {list(array.shape)}; '
                           f're-create the dataset with dataset_tool.py encode')
    return array.reshape(-1, *array.shape[-2:])


def decode_image(data, where):
    """Encoded image bytes -> uint8 [C, H, W] numpy array with C = 1 (mode L) or 3 (mode RGB).

    `where` names the file in error messages. Other modes (palette, alpha, 16-bit) are refused rather
    than silently reinterpreted.
    """
    try:
        with PIL.Image.open(io.BytesIO(data)) as image:
            image.load()
            mode = image.mode
            array = np.array(image)
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise DatasetError(f'{where}: cannot decode image ({type(e).__name__}: {e}); the file is corrupt or '
                           f'not an image: replace or remove it, or re-create the dataset with dataset_tool.py') from e
    if mode not in ('L', 'RGB') or array.dtype != np.uint8:
        raise DatasetError(f'{where}: image mode {mode!r} ({array.dtype}) is not supported; datasets must hold '
                           f'8-bit grayscale (L) or RGB images: {_CONVERT_HINT}')
    if array.ndim == 2:
        array = array[:, :, np.newaxis]
    return array.transpose(2, 0, 1)


# ----------------------------------------------------------------------------------------------------


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images from a directory or an uncompressed zip, as NVlabs `ImageFolderDataset` (spec §7.2).

    `dataset[i]` returns (image uint8 [C, H, W] numpy array, or the stored array of a .npy file such as the
    float32 [8, H/8, W/8] VAE latents of `dataset_tool.py encode`, label float32 [label_dim]): a one-hot vector
    for integer class labels, the stored vector for float labels, and an empty array without labels.
    Indices are over the max_size subset, doubled by xflip (second half mirrored along W).

    Args:
        path: a directory (searched recursively) or a `.zip` file.
        resolution: if given, the images must be this size (raises `DatasetError` otherwise).
        use_labels: read labels from dataset.json; it must exist and hold a label for every image.
        max_size: keep a random subset of this many images (`RandomState(random_seed % 2**31)`), sorted.
        xflip: append an x-mirrored copy of every image (the dataset length doubles).
        random_seed: seed of the max_size subset.
        cache: keep decoded images in memory, one cache per process (each DataLoader worker has its own).
        square_pow2: require square images of a power-of-two size, as the networks take them (fid.py turns this
            off: the detector resizes any image, as NVlabs fid.py reads any image folder).
    """

    def __init__(self, path, resolution=None, use_labels=False, max_size=None, xflip=False, random_seed=0,
                 cache=False, use_pyspng=None, square_pow2=True):
        # use_pyspng is accepted so NVlabs dataset_kwargs (which may contain it) construct unchanged;
        # decoding always goes through Pillow, which gives the same pixels.
        del use_pyspng
        self._path = os.fspath(path)
        self._zipfile = None
        self._zipfile_pid = None
        self._use_labels = bool(use_labels)
        self._cache = bool(cache)
        self._cached_images = {}

        if os.path.isdir(self._path):
            self._type = 'dir'
            self._all_fnames = {os.path.relpath(os.path.join(root, fname), start=self._path)
                                for root, _dirs, files in os.walk(self._path) for fname in files}
        elif _file_ext(self._path) == '.zip' and os.path.isfile(self._path):
            self._type = 'zip'
            try:
                self._all_fnames = set(self._get_zipfile().namelist())
            except (zipfile.BadZipFile, OSError) as e:
                raise DatasetError(f'{self._path}: cannot read the zip file ({e}); it is damaged or incomplete: '
                                   f're-create it with dataset_tool.py') from e
        elif not os.path.exists(self._path):
            raise DatasetError(f'{self._path}: no such file or directory; --data must point to a directory of '
                               f'images or a .zip made by dataset_tool.py')
        else:
            raise DatasetError(f'{self._path}: not a directory or a .zip file; --data must point to a directory of '
                               f'images or a .zip made by dataset_tool.py')

        extensions = _image_extensions()
        self._image_fnames = sorted(f for f in self._all_fnames if _file_ext(f) in extensions)
        if not self._image_fnames:
            raise DatasetError(f'{self._path}: no image files found (looked for {", ".join(sorted(extensions)[:6])}, '
                               f'...); point --data at the folder or zip that holds the images')

        arrays = sum(_file_ext(f) == '.npy' for f in self._image_fnames)
        if 0 < arrays < len(self._image_fnames):
            raise DatasetError(f'{self._path}: mixes {arrays} .npy array(s) (e.g. '
                               f'{next(f for f in self._image_fnames if _file_ext(f) == ".npy")}) with '
                               f'{len(self._image_fnames) - arrays} image file(s); a dataset holds either images or '
                               f'the latents of dataset_tool.py encode: move the other kind out of it')
        self._holds_arrays = arrays > 0

        self._name = os.path.splitext(os.path.basename(self._path.rstrip('/\\')))[0]
        first = self._load_raw_image(0, check_shape=False)
        self._raw_shape = [len(self._image_fnames)] + list(first.shape)
        c, h, w = first.shape
        where = self._where(0)
        if square_pow2 and h != w:
            raise DatasetError(f'{where}: image is {w}x{h}; EDM needs square images: {_CONVERT_HINT} '
                               f'--transform=center-crop --resolution=RxR')
        if square_pow2 and w & (w - 1) != 0:
            raise DatasetError(f'{where}: image is {w}x{h}; EDM needs a power-of-two resolution: {_CONVERT_HINT} '
                               f'--resolution=RxR (R a power of two)')
        if resolution is not None and resolution != w:
            raise DatasetError(f'{self._path}: images are {w}x{h} (e.g. {self._image_fnames[0]}), not the requested '
                               f'resolution {resolution}x{resolution}; drop the resolution option or re-create the '
                               f'dataset with dataset_tool.py --resolution={resolution}x{resolution}')
        self._close_zipfile()  # opened again lazily in each process (a handle must not be shared across fork)

        self._raw_labels = self._load_raw_labels() if self._use_labels else None
        if self._raw_labels is None:
            self._raw_labels = np.zeros([self._raw_shape[0], 0], dtype=np.float32)
            self._label_shape = [0]
        elif self._raw_labels.dtype == np.int64:
            self._label_shape = [int(self._raw_labels.max()) + 1]
        else:
            self._label_shape = list(self._raw_labels.shape[1:])

        # The subset and the flip layout: index i -> raw image self._raw_idx[i], mirrored if self._xflip[i].
        self._raw_idx = np.arange(self._raw_shape[0], dtype=np.int64)
        if max_size is not None and self._raw_idx.size > max_size:
            np.random.RandomState(random_seed % (1 << 31)).shuffle(self._raw_idx)
            self._raw_idx = np.sort(self._raw_idx[:max_size])
        self._xflip = np.zeros(self._raw_idx.size, dtype=np.uint8)
        if xflip:
            self._raw_idx = np.tile(self._raw_idx, 2)
            self._xflip = np.concatenate([self._xflip, np.ones_like(self._xflip)])

    # ------------------------------------------------------------------------------------------------
    # Files.

    def _where(self, raw_idx):
        return f'{self._path}:{self._image_fnames[raw_idx]}' if self._type == 'zip' else \
            os.path.join(self._path, self._image_fnames[raw_idx])

    def _get_zipfile(self):
        assert self._type == 'zip'
        if self._zipfile is None or self._zipfile_pid != os.getpid():
            self._zipfile = zipfile.ZipFile(self._path)
            self._zipfile_pid = os.getpid()
        return self._zipfile

    def _close_zipfile(self):
        if self._zipfile is not None and self._zipfile_pid == os.getpid():
            self._zipfile.close()
        self._zipfile = None
        self._zipfile_pid = None

    def _read_bytes(self, fname):
        if self._type == 'dir':
            with open(os.path.join(self._path, fname), 'rb') as f:
                return f.read()
        return self._get_zipfile().read(fname)

    def close(self):
        """Close the zip handle of this process (reopened on the next access)."""
        self._close_zipfile()

    def __getstate__(self):
        # DataLoader workers get a copy without the open zip handle; each opens its own.
        return dict(self.__dict__, _zipfile=None, _zipfile_pid=None)

    def __del__(self):
        try:
            self._close_zipfile()
        except Exception:
            pass

    # ------------------------------------------------------------------------------------------------
    # Images and labels.

    def _load_raw_image(self, raw_idx, check_shape=True):
        where = self._where(raw_idx)
        try:
            data = self._read_bytes(self._image_fnames[raw_idx])
        except (OSError, KeyError, zipfile.BadZipFile) as e:
            raise DatasetError(f'{where}: cannot read the file ({e}); check that the dataset is complete') from e
        image = decode_array(data, where) if _file_ext(self._image_fnames[raw_idx]) == '.npy' else \
            decode_image(data, where)
        if check_shape and list(image.shape) != self._raw_shape[1:]:
            c, h, w = image.shape
            c0, h0, w0 = self._raw_shape[1:]
            raise DatasetError(f'{where}: image is {w}x{h} with {c} channel(s), but {self._image_fnames[0]} is '
                               f'{w0}x{h0} with {c0}; all images must match: {_CONVERT_HINT} --resolution={w0}x{h0}')
        return image

    def _load_raw_labels(self):
        """dataset.json -> int64 [n] class indices or float32 [n, D] vectors, in image order; errors name the fix."""
        fname = 'dataset.json'
        where = os.path.join(self._path, fname) if self._type == 'dir' else f'{self._path}:{fname}'
        if fname not in self._all_fnames:
            raise DatasetError(f'{self._path}: use_labels=True (--cond=True) but there is no {fname}; label the '
                               f'images with dataset_tool.py (class sub-folders become labels) or train with '
                               f'--cond=False')
        try:
            meta = json.loads(self._read_bytes(fname).decode('utf-8'))
        except (ValueError, UnicodeDecodeError) as e:
            raise DatasetError(f'{where}: not valid JSON ({e}); fix the file or re-create the dataset with '
                               f'dataset_tool.py') from e
        finally:
            self._close_zipfile()
        if not isinstance(meta, dict) or 'labels' not in meta:
            raise DatasetError(f'{where}: expected an object {{"labels": [[filename, label], ...]}}; fix the file '
                               f'or re-create the dataset with dataset_tool.py')
        entries = meta['labels']
        if entries is None:
            raise DatasetError(f'{where}: "labels" is null, so the dataset is unlabelled, but use_labels=True '
                               f'(--cond=True); train with --cond=False or add labels')
        if not isinstance(entries, list) or not all(isinstance(e, list) and len(e) == 2 and isinstance(e[0], str)
                                                    for e in entries):
            raise DatasetError(f'{where}: "labels" must be a list of [filename, label] pairs; fix the file or '
                               f're-create the dataset with dataset_tool.py')
        labels = {name.replace('\\', '/'): label for name, label in entries}
        image_names = [f.replace('\\', '/') for f in self._image_fnames]
        # Entries for files that are not (or no longer) images of the dataset are ignored, as NVlabs does.
        missing = [f for f in image_names if f not in labels]
        if missing:
            raise DatasetError(f'{where}: {len(missing)} image(s) have no label, e.g. {missing[0]!r}; every image '
                               f'needs a label when use_labels=True (--cond=True)')
        values = [labels[f] for f in image_names]
        return _labels_to_array(values, image_names, where)

    def check_shapes(self):
        """Check that every image the dataset serves has the size and channel count of its first image.

        Reads only the headers (PIL opens lazily; .npy arrays by their format header), so it costs a file open
        per image, not a decode. Raises DatasetError naming the first misfit, how many there are, and the fix.
        The x-flip copies and the images outside a max_size subset are not read; files whose header cannot say
        their shape are left to the decoder.
        """
        c0, h0, w0 = self.raw_shape[1:]
        names = self._image_fnames
        extensions = set(PIL.Image.registered_extensions())
        bad = []

        def npy_shape(f):
            """(C, H, W) of a .npy array as the dataset reads it (leading axes merged into C), or None."""
            version = np.lib.format.read_magic(f)
            read = {(1, 0): np.lib.format.read_array_header_1_0,
                    (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            shape = read(f)[0] if read is not None else ()
            return (int(np.prod(shape[:-2])), shape[-2], shape[-1]) if len(shape) >= 2 else None

        def png_shape(f):
            """(C, H, W) from an 8-bit gray or RGB PNG's IHDR chunk (the first 26 bytes: what dataset_tool writes,
            about 3x faster than PIL's open), or None for any other PNG, which PIL then reads."""
            head = f.read(26)
            if len(head) < 26 or head[:8] != b'\x89PNG\r\n\x1a\n' or head[12:16] != b'IHDR' or head[24] != 8:
                return None
            channels = {0: 1, 2: 3}.get(head[25])
            return None if channels is None else (channels, int.from_bytes(head[20:24], 'big'),
                                                  int.from_bytes(head[16:20], 'big'))

        zip_file = self._get_zipfile() if self._type == 'zip' else None
        try:
            for raw_idx in np.unique(self._raw_idx).tolist():
                name = names[raw_idx]
                ext = os.path.splitext(name)[1].lower()
                if ext != '.npy' and ext not in extensions:
                    continue
                where = self._where(raw_idx)
                try:
                    f = zip_file.open(name) if zip_file is not None else open(os.path.join(self.path, name), 'rb')
                    with f:
                        if ext == '.npy':
                            shape = npy_shape(f)
                            if shape is None:
                                continue
                            channels, h, w = shape
                        else:
                            shape = png_shape(f) if ext == '.png' else None
                            if shape is not None:
                                channels, h, w = shape
                                mode = 'L' if channels == 1 else 'RGB'
                            else:
                                f.seek(0)
                                with PIL.Image.open(f) as image:
                                    (w, h), mode = image.size, image.mode
                            channels = {'L': 1, 'RGB': 3}.get(mode)
                            if channels is None:
                                raise DatasetError(f'{where}: image mode {mode!r} is not supported; datasets '
                                                   f'must hold 8-bit grayscale (L) or RGB images: {_CONVERT_HINT}')
                except (OSError, KeyError, zipfile.BadZipFile, SyntaxError, ValueError) as e:
                    if isinstance(e, DatasetError):
                        raise
                    raise DatasetError(f'{where}: cannot read the header ({type(e).__name__}: {e}); the file is '
                                       f'corrupt or not an image: replace or remove it, or re-create the dataset '
                                       f'with dataset_tool.py') from e
                if (channels, h, w) != (c0, h0, w0):
                    bad.append((where, w, h, channels, ext))
        finally:
            if zip_file is not None:
                self._close_zipfile()
        if bad:
            where, w, h, c, ext = bad[0]
            fix = 're-create the dataset with python dataset_tool.py encode' if ext == '.npy' else \
                f'{_CONVERT_HINT} --resolution={w0}x{h0}'
            raise DatasetError(f'{where}: image is {w}x{h} with {c} channel(s), but {names[0]} is {w0}x{h0} with '
                               f'{c0} ({len(bad)} of {len(np.unique(self._raw_idx))} images differ); all images '
                               f'must match: {fix}')

    def get_label(self, idx):
        """float32 [label_dim]: one-hot for class labels, the stored vector otherwise, [0] without labels."""
        label = self._raw_labels[self._raw_idx[idx]]
        if label.dtype == np.int64:
            onehot = np.zeros(self._label_shape, dtype=np.float32)
            onehot[label] = 1
            return onehot
        return label.copy()

    def get_details(self, idx):
        """dict(raw_idx=int, xflip=bool, raw_label=array) for dataset index idx (attribute access works too)."""
        raw_idx = int(self._raw_idx[idx])
        return _Details(raw_idx=raw_idx, xflip=bool(self._xflip[idx] != 0),
                        raw_label=self._raw_labels[raw_idx].copy())

    def __len__(self):
        return self._raw_idx.size

    def __getitem__(self, idx):
        raw_idx = int(self._raw_idx[idx])
        image = self._cached_images.get(raw_idx)
        if image is None:
            image = self._load_raw_image(raw_idx)
            if self._cache:
                self._cached_images[raw_idx] = image
        if self._xflip[idx]:
            image = image[:, :, ::-1]
        return image.copy(), self.get_label(idx)

    # ------------------------------------------------------------------------------------------------
    # Properties (NVlabs names).

    @property
    def holds_arrays(self):
        """True for a dataset of .npy arrays (VAE latents), False for one of image files."""
        return self._holds_arrays

    @property
    def name(self):
        return self._name

    @property
    def path(self):
        return self._path

    @property
    def raw_shape(self):
        """[number of image files, C, H, W]."""
        return list(self._raw_shape)

    @property
    def image_shape(self):
        return list(self._raw_shape[1:])

    @property
    def num_channels(self):
        return self._raw_shape[1]

    @property
    def resolution(self):
        return self._raw_shape[2]

    @property
    def label_shape(self):
        return list(self._label_shape)

    @property
    def label_dim(self):
        return self._label_shape[0]

    @property
    def has_labels(self):
        return any(x != 0 for x in self._label_shape)

    @property
    def has_onehot_labels(self):
        return self._raw_labels.dtype == np.int64


class _Details(dict):
    """A dict whose keys also read as attributes (NVlabs returns an EasyDict)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _labels_to_array(values, names, where):
    """JSON label values -> int64 [n] (all integers >= 0; whole floats such as 3.0 count, as NVlabs casts 1-D labels
    to int64) or float32 [n, D] (all lists of D numbers)."""
    def is_int(v):
        return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer())

    def is_number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if all(is_int(v) for v in values):
        array = np.array([int(v) for v in values], dtype=np.int64)
        if array.size and array.min() < 0:
            i = int(np.argmin(array))
            raise DatasetError(f'{where}: {names[i]!r} has the negative class label {values[i]}; class labels must '
                               f'be integers 0, 1, 2, ...')
        return array
    if all(isinstance(v, list) and all(is_number(x) for x in v) for v in values):
        lengths = sorted({len(v) for v in values})
        if len(lengths) > 1:
            i = next(i for i, v in enumerate(values) if len(v) != len(values[0]))
            raise DatasetError(f'{where}: inconsistent label shapes: {names[0]!r} has {len(values[0])} values but '
                               f'{names[i]!r} has {len(values[i])}; all label vectors must have the same length')
        if lengths[0] == 0:
            raise DatasetError(f'{where}: every label is an empty list, so the dataset is unlabelled, but '
                               f'use_labels=True (--cond=True); train with --cond=False or add labels')
        return np.array(values, dtype=np.float32)
    def kind(v):
        return 'int' if is_int(v) else 'list' if isinstance(v, list) and all(is_number(x) for x in v) else 'other'

    kinds = [kind(v) for v in values]
    if 'other' in kinds:
        j = kinds.index('other')
        raise DatasetError(f'{where}: {names[j]!r} has the label {values[j]!r}; a label must be an integer class '
                           f'index or a list of numbers')
    i = next(i for i, k in enumerate(kinds) if k != kinds[0])
    raise DatasetError(f'{where}: inconsistent label shapes: {names[0]!r} has label {values[0]!r} but {names[i]!r} '
                       f'has {values[i]!r}; labels must be all integer class indices or all lists of numbers of '
                       f'one length')


# ----------------------------------------------------------------------------------------------------


class InfiniteSampler(torch.utils.data.Sampler):
    """Endless index stream over a dataset, shuffled with a sliding window, split across ranks (spec §5.3).

    The stream: `order = RandomState(seed)` permutation of range(dataset_len); walk idx = 0, 1, 2, ...;
    at position i = idx % len the item order[i] belongs to rank idx % num_replicas; after each idx
    order[i] is swapped with order[(i - rnd.randint(window)) % len], window = round(window_size * len).
    All ranks replay the same RNG, so together they consume each global idx exactly once.

    Resuming: `start_idx` is the global idx to begin at; the stream from there is exactly what an
    uninterrupted sampler yields from that idx on (the swaps before it are replayed: about 0.1 us per
    idx, so ~20 s to resume at 200M images).
    After this rank has taken k items, `position_after(k)` = start_idx + k * num_replicas is the idx to
    resume from (all ranks take the same number of items per step in training). `position` gives that
    for the iterator of this object; with a DataLoader, which reads ahead, count the items the training
    loop actually consumed and use `position_after`.

    Args:
        dataset_len: number of items (an int, or a sized dataset as in NVlabs).
        rank, num_replicas: this process and the number of processes.
        seed: permutation and window RNG seed (shared by all ranks).
        shuffle: False walks 0, 1, 2, ... in order.
        window_size: window as a fraction of the dataset length (0 to 1).
        start_idx: global idx to start at (>= 0).
    """

    def __init__(self, dataset_len, rank=0, num_replicas=1, seed=0, shuffle=True, window_size=0.5, start_idx=0):
        if not isinstance(dataset_len, (int, np.integer)):
            dataset_len = len(dataset_len)
        dataset_len = int(dataset_len)
        if dataset_len <= 0:
            raise ValueError(f'InfiniteSampler needs a non-empty dataset, got dataset_len={dataset_len}')
        if num_replicas <= 0 or not 0 <= rank < num_replicas:
            raise ValueError(f'InfiniteSampler: need 0 <= rank < num_replicas, got rank={rank}, '
                             f'num_replicas={num_replicas}')
        if not 0 <= window_size <= 1:
            raise ValueError(f'InfiniteSampler: window_size must be in [0, 1], got {window_size}')
        if start_idx < 0:
            raise ValueError(f'InfiniteSampler: start_idx must be >= 0, got {start_idx}')
        super().__init__()
        self.dataset_len = dataset_len
        self.rank = int(rank)
        self.num_replicas = int(num_replicas)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.window_size = window_size
        self.start_idx = int(start_idx)
        self.num_yielded = 0  # items the current iterator of this object has yielded

    @property
    def position(self):
        """Global idx to resume from after the items this object's iterator has yielded so far."""
        return self.position_after(self.num_yielded)

    def position_after(self, num_items):
        """Global idx to resume from once this rank has consumed num_items items since start_idx."""
        return self.start_idx + int(num_items) * self.num_replicas

    def _initial_state(self):
        order = np.arange(self.dataset_len)
        rnd = None
        window = 0
        if self.shuffle:
            rnd = np.random.RandomState(self.seed)
            rnd.shuffle(order)
            window = int(np.rint(order.size * self.window_size))
        return order, rnd, window

    def __iter__(self):
        order, rnd, window = self._initial_state()
        n = order.size
        order = order.tolist()  # list element swaps are several times faster than numpy scalar swaps
        swapping = window >= 2  # randint(0) is undefined and randint(1) always 0: no swaps then

        # Replay the swaps of idx < start_idx (about 0.1 us each). Bulk randint draws equal successive
        # scalar draws; a negative list index j = i - r is exactly position (i - r) % n, as r < window <= n.
        idx = 0
        while swapping and idx < self.start_idx:
            count = min(1 << 20, self.start_idx - idx)
            draws = iter(rnd.randint(window, size=count).tolist())
            k = 0
            while k < count:
                i0 = (idx + k) % n
                segment = min(count - k, n - i0)  # positions i0 .. i0 + segment - 1 without wrapping
                for i, r in zip(range(i0, i0 + segment), draws):  # zip stops on range first: no draw lost
                    j = i - r
                    order[i], order[j] = order[j], order[i]
                k += segment
            idx += count
        idx = self.start_idx

        self.num_yielded = 0
        while True:
            i = idx % n
            if idx % self.num_replicas == self.rank:
                self.num_yielded += 1
                yield order[i]
            if swapping:
                j = (i - rnd.randint(window)) % n
                order[i], order[j] = order[j], order[i]
            idx += 1


class EpochSampler(torch.utils.data.Sampler):
    """Endless index stream of NVlabs edm2 (spec §10.5): epoch e = idx // len is the permutation
    `RandomState(hash((seed, e)) % 2^31).shuffle(arange(len))` (or arange without shuffle), and rank r takes
    the global positions idx = start_idx + r, start_idx + r + num_replicas, ... So every epoch shows each item
    once, and a run resumed with start_idx = cur_nimg continues the stream exactly, with no replay.

    Args match `InfiniteSampler` (there is no window)."""

    def __init__(self, dataset_len, rank=0, num_replicas=1, seed=0, shuffle=True, start_idx=0):
        if not isinstance(dataset_len, (int, np.integer)):
            dataset_len = len(dataset_len)
        if int(dataset_len) <= 0:
            raise ValueError(f'EpochSampler needs a non-empty dataset, got dataset_len={dataset_len}')
        if num_replicas <= 0 or not 0 <= rank < num_replicas:
            raise ValueError(f'EpochSampler: need 0 <= rank < num_replicas, got rank={rank}, num_replicas={num_replicas}')
        if start_idx < 0:
            raise ValueError(f'EpochSampler: start_idx must be >= 0, got {start_idx}')
        super().__init__()
        self.dataset_len, self.rank, self.num_replicas = int(dataset_len), int(rank), int(num_replicas)
        self.seed, self.shuffle, self.start_idx = int(seed), bool(shuffle), int(start_idx)

    def epoch_order(self, epoch):
        """The item order of one epoch (all ranks alike)."""
        order = np.arange(self.dataset_len)
        if self.shuffle:
            np.random.RandomState(hash((self.seed, int(epoch))) % (1 << 31)).shuffle(order)
        return order

    def __iter__(self):
        idx, epoch, order = self.start_idx + self.rank, None, None
        while True:
            if epoch != idx // self.dataset_len:
                epoch = idx // self.dataset_len
                order = self.epoch_order(epoch)
            yield int(order[idx % self.dataset_len])
            idx += self.num_replicas
