"""ImageFolderDataset (spec §7.2) and InfiniteSampler (spec §5.3): layout, labels, subsets, flips, caching,
DataLoader workers, every user-caused error, and the exact sampler stream including resume."""

import io
import itertools
import json
import os
import pickle
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch

from edm_fast.dataset import DatasetError, EpochSampler, ImageFolderDataset, InfiniteSampler


def _png(array_hwc):
    image = PIL.Image.fromarray(array_hwc[:, :, 0] if array_hwc.shape[2] == 1 else array_hwc)
    buf = io.BytesIO()
    image.save(buf, format='PNG')
    return buf.getvalue()


def _images(n, res=8, channels=3, seed=0):
    return np.random.RandomState(seed).randint(0, 256, size=[n, res, res, channels], dtype=np.uint8)


def _write(root, files, as_zip):
    """files: {relative name: bytes or str}. Returns the dataset path (a folder or a .zip)."""
    os.makedirs(root, exist_ok=True)
    if as_zip:
        path = os.path.join(root, 'data.zip')
        with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_STORED) as z:
            for name, data in files.items():
                z.writestr(name, data)
        return path
    path = os.path.join(root, 'data')
    for name, data in files.items():
        full = os.path.join(path, name)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, 'wb') as f:
            f.write(data.encode() if isinstance(data, str) else data)
    return path


def _dataset_files(images, labels=None, names=None):
    names = names or [f'{i // 1000:05d}/img{i:08d}.png' for i in range(len(images))]
    files = {name: _png(img) for name, img in zip(names, images)}
    if labels is not None:
        files['dataset.json'] = json.dumps({'labels': [[n, lab] for n, lab in zip(names, labels)]})
    return files, names


# ----------------------------------------------------------------------------------------------------
# Layout and labels.


@pytest.mark.parametrize('as_zip', [False, True])
@pytest.mark.parametrize('channels', [1, 3])
def test_unlabelled_images_round_trip(tmp_path, as_zip, channels):
    images = _images(5, res=8, channels=channels)
    # Names written out of order, in nested folders, plus a non-image file that must be ignored.
    names = ['b/x2.png', 'a/x1.png', 'a/x0.png', 'c.png', 'b/x10.png']
    files, _ = _dataset_files(images, names=names)
    files['notes.txt'] = 'not an image'
    ds = ImageFolderDataset(_write(tmp_path, files, as_zip))
    order = sorted(range(5), key=lambda i: names[i])
    assert len(ds) == 5
    assert ds.image_shape == [channels, 8, 8] and ds.num_channels == channels and ds.resolution == 8
    assert ds.raw_shape == [5, channels, 8, 8]
    assert ds.name == 'data'
    assert ds.label_shape == [0] and ds.label_dim == 0 and not ds.has_labels
    for i, j in enumerate(order):
        image, label = ds[i]
        assert image.dtype == np.uint8 and image.shape == (channels, 8, 8)
        np.testing.assert_array_equal(image, images[j].transpose(2, 0, 1))
        assert label.dtype == np.float32 and label.shape == (0,)


@pytest.mark.parametrize('as_zip', [False, True])
def test_int_labels_are_one_hot(tmp_path, as_zip):
    images = _images(4)
    classes = [2, 0, 5, 2]
    files, _ = _dataset_files(images, classes)
    ds = ImageFolderDataset(_write(tmp_path, files, as_zip), use_labels=True)
    assert ds.label_shape == [6] and ds.label_dim == 6 and ds.has_labels and ds.has_onehot_labels
    for i, c in enumerate(classes):
        _, label = ds[i]
        expected = np.zeros(6, np.float32)
        expected[c] = 1
        np.testing.assert_array_equal(label, expected)
        assert label.dtype == np.float32
        details = ds.get_details(i)
        assert details.raw_idx == i and details.xflip is False and int(details.raw_label) == c
    # The same files without use_labels: no labels, dataset.json is not even read.
    ds = ImageFolderDataset(_write(tmp_path / 'again', files, as_zip), use_labels=False)
    assert ds.label_dim == 0 and ds[0][1].shape == (0,)


def test_float_labels_are_vectors(tmp_path):
    images = _images(3)
    vectors = [[0.5, -1.0], [2.0, 0.25], [0.0, 3.5]]
    files, _ = _dataset_files(images, vectors)
    ds = ImageFolderDataset(_write(tmp_path, files, True), use_labels=True)
    assert ds.label_shape == [2] and ds.label_dim == 2 and not ds.has_onehot_labels
    for i, v in enumerate(vectors):
        label = ds[i][1]
        assert label.dtype == np.float32
        np.testing.assert_array_equal(label, np.float32(v))


def test_xflip_doubles_with_mirrored_second_half(tmp_path):
    images = _images(3)
    files, _ = _dataset_files(images, [0, 1, 2])
    ds = ImageFolderDataset(_write(tmp_path, files, True), use_labels=True, xflip=True)
    assert len(ds) == 6
    for i in range(3):
        a, la = ds[i]
        b, lb = ds[i + 3]
        np.testing.assert_array_equal(a, images[i].transpose(2, 0, 1))
        np.testing.assert_array_equal(b, a[:, :, ::-1])
        np.testing.assert_array_equal(la, lb)
        assert ds.get_details(i + 3).xflip is True and ds.get_details(i + 3).raw_idx == i
        assert b.flags['C_CONTIGUOUS']


def test_max_size_subset_is_seeded_sorted_and_before_xflip(tmp_path):
    images = _images(20, res=4)
    files, _ = _dataset_files(images)
    path = _write(tmp_path, files, True)

    def raw_indices(ds):
        return [ds.get_details(i).raw_idx for i in range(len(ds))]

    a = raw_indices(ImageFolderDataset(path, max_size=7, random_seed=3))
    b = raw_indices(ImageFolderDataset(path, max_size=7, random_seed=3))
    c = raw_indices(ImageFolderDataset(path, max_size=7, random_seed=4))
    expected = np.arange(20)
    np.random.RandomState(3).shuffle(expected)
    assert a == b == sorted(expected[:7].tolist())
    assert a == sorted(a) and len(set(a)) == 7
    assert c != a
    # Seeds wrap at 2**31, as NVlabs.
    assert raw_indices(ImageFolderDataset(path, max_size=7, random_seed=3 + 2 ** 31)) == a
    flipped = ImageFolderDataset(path, max_size=7, random_seed=3, xflip=True)
    assert len(flipped) == 14 and raw_indices(flipped) == a + a
    # A max_size at or above the size keeps everything in order.
    assert raw_indices(ImageFolderDataset(path, max_size=20)) == list(range(20))
    np.testing.assert_array_equal(ImageFolderDataset(path, max_size=7, random_seed=3)[0][0],
                                  images[a[0]].transpose(2, 0, 1))


def test_cache_keeps_decoded_images(tmp_path):
    images = _images(2)
    files, names = _dataset_files(images)
    path = _write(tmp_path, files, False)
    cached = ImageFolderDataset(path, cache=True)
    uncached = ImageFolderDataset(path, cache=False)
    first, _ = cached[1]
    uncached[1]
    first[:] = 0  # the returned array is a copy: the cache must not change
    os.remove(os.path.join(path, names[1]))  # now only a cache can serve image 1
    again, _ = cached[1]
    np.testing.assert_array_equal(again, images[1].transpose(2, 0, 1))
    with pytest.raises(DatasetError, match=rf'{names[1]}: cannot read the file'):
        uncached[1]


def test_pickle_and_dataloader_workers(tmp_path):
    images = _images(12, res=4)
    files, _ = _dataset_files(images, list(range(12)))
    ds = ImageFolderDataset(_write(tmp_path, files, True), use_labels=True, xflip=True)
    ds[0]  # opens the zip in this process
    assert ds._zipfile is not None
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._zipfile is None
    np.testing.assert_array_equal(clone[5][0], ds[5][0])

    # A forked worker inherits the object but must not share the parent's file handle (shared offsets).
    parent_handle = ds._get_zipfile()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, 'getpid', lambda: -12345)
        assert ds._get_zipfile() is not parent_handle
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=2, shuffle=False)
    got_images, got_labels = zip(*loader)
    got_images = torch.cat(got_images).numpy()
    got_labels = torch.cat(got_labels).numpy()
    assert got_images.shape == (24, 3, 4, 4) and got_labels.shape == (24, 12)
    for i in range(24):
        np.testing.assert_array_equal(got_images[i], ds[i][0])
        np.testing.assert_array_equal(got_labels[i], ds[i][1])


# ----------------------------------------------------------------------------------------------------
# Errors that name the file and the fix.


def test_error_path_neither_dir_nor_zip(tmp_path):
    txt = tmp_path / 'images.txt'
    txt.write_text('x')
    with pytest.raises(DatasetError, match=r'images\.txt.*not a directory or a \.zip'):
        ImageFolderDataset(str(txt))
    with pytest.raises(DatasetError, match='no such file'):
        ImageFolderDataset(str(tmp_path / 'missing.zip'))
    broken = tmp_path / 'broken.zip'
    broken.write_bytes(b'not a zip at all')
    with pytest.raises(DatasetError, match=r'broken\.zip.*re-create'):
        ImageFolderDataset(str(broken))


def test_error_no_images(tmp_path):
    path = _write(tmp_path, {'readme.txt': 'hello'}, False)
    with pytest.raises(DatasetError, match=r'data: no image files found'):
        ImageFolderDataset(path)


def test_error_corrupt_image_named(tmp_path):
    files, names = _dataset_files(_images(3))
    files[names[2]] = b'\x89PNG\r\n\x1a\n garbage'
    ds = ImageFolderDataset(_write(tmp_path, files, True))
    with pytest.raises(DatasetError, match=rf'data\.zip:{names[2]}: cannot decode image'):
        ds[2]
    files[names[0]] = b'garbage'  # a corrupt first image fails at construction
    with pytest.raises(DatasetError, match=rf'{names[0]}: cannot decode image'):
        ImageFolderDataset(_write(tmp_path / 'b', files, False))


def test_error_mismatched_resolution_or_channels_named(tmp_path):
    files, names = _dataset_files(_images(3, res=8))
    files[names[1]] = _png(_images(1, res=16)[0])
    files[names[2]] = _png(_images(1, res=8, channels=1)[0])
    ds = ImageFolderDataset(_write(tmp_path, files, True))
    np.testing.assert_array_equal(ds[0][0].shape, (3, 8, 8))
    with pytest.raises(DatasetError, match=rf'{names[1]}: image is 16x16 with 3 channel\(s\), but {names[0]} is 8x8'):
        ds[1]
    with pytest.raises(DatasetError, match=rf'{names[2]}: image is 8x8 with 1 channel\(s\).*dataset_tool'):
        ds[2]


def test_error_non_square_or_non_power_of_two(tmp_path):
    rect = np.zeros([8, 16, 3], np.uint8)
    with pytest.raises(DatasetError, match=r'a\.png: image is 16x8; EDM needs square images'):
        ImageFolderDataset(_write(tmp_path / '1', {'a.png': _png(rect)}, False))
    odd = np.zeros([12, 12, 3], np.uint8)
    with pytest.raises(DatasetError, match=r'a\.png: image is 12x12; EDM needs a power-of-two'):
        ImageFolderDataset(_write(tmp_path / '2', {'a.png': _png(odd)}, True))


def test_error_unsupported_mode_named(tmp_path):
    rgba = np.zeros([8, 8, 4], np.uint8)
    buf = io.BytesIO()
    PIL.Image.fromarray(rgba, 'RGBA').save(buf, format='PNG')
    with pytest.raises(DatasetError, match=r"a\.png: image mode 'RGBA'.*dataset_tool"):
        ImageFolderDataset(_write(tmp_path, {'a.png': buf.getvalue()}, True))


def test_error_resolution_argument_mismatch(tmp_path):
    files, names = _dataset_files(_images(2, res=8))
    message = rf'images are 8x8 \(e\.g\. {names[0]}\), not the requested resolution 16x16'
    with pytest.raises(DatasetError, match=message):
        ImageFolderDataset(_write(tmp_path, files, True), resolution=16)
    assert ImageFolderDataset(_write(tmp_path / 'ok', files, True), resolution=8).resolution == 8


def test_error_use_labels_without_labels(tmp_path):
    files, _ = _dataset_files(_images(2))
    with pytest.raises(DatasetError, match=r'no dataset\.json.*--cond=False'):
        ImageFolderDataset(_write(tmp_path / '1', files, True), use_labels=True)
    files['dataset.json'] = json.dumps({'labels': None})
    with pytest.raises(DatasetError, match=r'dataset\.json: "labels" is null'):
        ImageFolderDataset(_write(tmp_path / '2', files, True), use_labels=True)


@pytest.mark.parametrize('content, message', [
    ('{"labels": [["00000/img00000000.png", 1],', r'dataset\.json: not valid JSON'),
    ('[1, 2]', r'dataset\.json: expected an object'),
    ('{"labels": [["00000/img00000000.png", 1], ["00000/img00000001.png", 0.5]]}', r"has the label 0\.5"),
    ('{"labels": [["00000/img00000000.png", 1]]}', r"1 image\(s\) have no label, e\.g\. '00000/img00000001\.png'"),
    ('{"labels": [["00000/img00000000.png", 1], ["00000/img00000001.png", [0.5]]]}',
     r"inconsistent label shapes: '00000/img00000000\.png' has label 1 but '00000/img00000001\.png' has \[0\.5\]"),
    ('{"labels": [["00000/img00000000.png", [1, 2]], ["00000/img00000001.png", [0.5]]]}',
     r"inconsistent label shapes: '00000/img00000000\.png' has 2 values but '00000/img00000001\.png' has 1"),
    ('{"labels": [["00000/img00000000.png", -1], ["00000/img00000001.png", 0]]}', r'negative class label -1'),
    ('{"labels": [["00000/img00000000.png", "cat"], ["00000/img00000001.png", 0]]}', r"has the label 'cat'"),
])
def test_error_malformed_dataset_json(tmp_path, content, message):
    files, _ = _dataset_files(_images(2))
    files['dataset.json'] = content
    with pytest.raises(DatasetError, match=message):
        ImageFolderDataset(_write(tmp_path, files, True), use_labels=True)


# ----------------------------------------------------------------------------------------------------
# InfiniteSampler.


def _reference_stream(n, count, rank=0, num_replicas=1, seed=0, shuffle=True, window_size=0.5):
    """A literal transcription of spec §5.3, with numpy arrays, for comparison."""
    order = np.arange(n)
    rnd = None
    window = 0
    if shuffle:
        rnd = np.random.RandomState(seed)
        rnd.shuffle(order)
        window = int(np.rint(order.size * window_size))
    out = []
    idx = 0
    while len(out) < count:
        i = idx % order.size
        if idx % num_replicas == rank:
            out.append(int(order[i]))
        if window >= 2:
            j = (i - rnd.randint(window)) % order.size
            order[i], order[j] = order[j], order[i]
        idx += 1
    return out


def _take(sampler, count):
    return [int(x) for x in itertools.islice(iter(sampler), count)]


@pytest.mark.parametrize('n, seed, window_size', [(10, 0, 0.5), (37, 5, 0.5), (64, 1, 0.1), (3, 2, 1.0), (1, 0, 0.5)])
def test_sampler_matches_spec_stream(n, seed, window_size):
    got = _take(InfiniteSampler(n, seed=seed, window_size=window_size), 4 * n + 3)
    assert got == _reference_stream(n, 4 * n + 3, seed=seed, window_size=window_size)
    assert _take(InfiniteSampler(n, seed=seed, window_size=window_size), 4 * n + 3) == got  # deterministic


def test_sampler_seed_shuffle_and_sized_dataset():
    assert _take(InfiniteSampler(50, seed=0), 50) != _take(InfiniteSampler(50, seed=1), 50)
    assert _take(InfiniteSampler(5, shuffle=False), 12) == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]
    assert _take(InfiniteSampler(list(range(9)), seed=3), 20) == _take(InfiniteSampler(9, seed=3), 20)


@pytest.mark.parametrize('num_replicas', [2, 3])
def test_sampler_ranks_partition_the_stream(num_replicas):
    n, per_rank = 23, 40
    full = _take(InfiniteSampler(n, seed=7), per_rank * num_replicas)
    streams = [_take(InfiniteSampler(n, rank=r, num_replicas=num_replicas, seed=7), per_rank)
               for r in range(num_replicas)]
    interleaved = [streams[k % num_replicas][k // num_replicas] for k in range(per_rank * num_replicas)]
    assert interleaved == full
    assert streams[0] != streams[1]


@pytest.mark.parametrize('start_idx', [0, 1, 6, 23, 57, 200])
@pytest.mark.parametrize('num_replicas, rank', [(1, 0), (2, 1), (3, 0)])
def test_sampler_resume_reproduces_continuation(start_idx, num_replicas, rank):
    n = 23
    full = _take(InfiniteSampler(n, seed=11), start_idx + 90)  # the one-rank global stream by idx
    expected = [full[idx] for idx in range(start_idx, start_idx + 90) if idx % num_replicas == rank]
    resumed = _take(InfiniteSampler(n, rank=rank, num_replicas=num_replicas, seed=11, start_idx=start_idx),
                    len(expected))
    assert resumed == expected


def test_sampler_position_resumes_bit_exactly():
    n, R = 31, 2
    samplers = [InfiniteSampler(n, rank=r, num_replicas=R, seed=4) for r in range(R)]
    iters = [iter(s) for s in samplers]
    first = [[next(it) for _ in range(17)] for it in iters]
    assert all(s.num_yielded == 17 for s in samplers)
    position = samplers[0].position
    assert position == samplers[1].position == 17 * R == samplers[0].position_after(17)
    uninterrupted = [[next(it) for _ in range(25)] for it in iters]
    resumed = [_take(InfiniteSampler(n, rank=r, num_replicas=R, seed=4, start_idx=position), 25) for r in range(R)]
    assert resumed == uninterrupted
    assert first != uninterrupted
    # Position accounting continues from a resumed start.
    s = InfiniteSampler(n, rank=1, num_replicas=R, seed=4, start_idx=position)
    it = iter(s)
    [next(it) for _ in range(5)]
    assert s.position == position + 5 * R


@pytest.mark.parametrize('n, seed', [(7, 0), (50, 1), (101, 2), (256, 3)])
def test_sampler_covers_every_index_evenly(n, seed):
    # The window swaps move items backwards (and wrap around near the start of an epoch), so an epoch is not
    # a permutation and full coverage can take several epochs (up to ~6 measured for n <= 1000, 2 epochs
    # were not enough in 79 of 120 trials). What holds: every index shows up, and at the same long-run rate.
    stream = _take(InfiniteSampler(n, seed=seed), 40 * n)
    assert set(stream[:8 * n]) == set(range(n))
    counts = np.bincount(stream, minlength=n)
    assert counts.min() >= 0.6 * 40 and counts.max() <= 1.4 * 40
    assert len(set(stream[:n])) >= 0.5 * n  # the first epoch is mostly distinct


def test_sampler_replays_long_resume_quickly():
    import time
    t0 = time.perf_counter()
    resumed = _take(InfiniteSampler(1000, seed=0, start_idx=300_000), 10)
    elapsed = time.perf_counter() - t0
    assert resumed == _reference_stream(1000, 300_010, seed=0)[300_000:]
    assert elapsed < 5, f'replaying 300k swaps took {elapsed:.1f}s'


def test_sampler_drives_a_dataloader(tmp_path):
    files, _ = _dataset_files(_images(6, res=4), [0, 1, 2, 3, 4, 5])
    ds = ImageFolderDataset(_write(tmp_path, files, True), use_labels=True)
    sampler = InfiniteSampler(ds, seed=2)
    batches = itertools.islice(iter(torch.utils.data.DataLoader(ds, sampler=sampler, batch_size=4)), 3)
    classes = torch.cat([labels.argmax(1) for _, labels in batches]).tolist()
    assert classes == _reference_stream(6, 12, seed=2)


def test_sampler_argument_errors():
    with pytest.raises(ValueError, match='non-empty'):
        InfiniteSampler(0)
    with pytest.raises(ValueError, match='rank'):
        InfiniteSampler(5, rank=2, num_replicas=2)
    with pytest.raises(ValueError, match='window_size'):
        InfiniteSampler(5, window_size=1.5)
    with pytest.raises(ValueError, match='start_idx'):
        InfiniteSampler(5, start_idx=-1)


def _edm2_stream(n, count, seed, start=0):
    """Spec §10.5 written out: epoch e is RandomState(hash((seed, e)) mod 2^31).shuffle(arange(n))."""
    out = []
    for idx in range(start, start + count):
        order = np.arange(n)
        np.random.RandomState(hash((seed, idx // n)) % (1 << 31)).shuffle(order)
        out.append(int(order[idx % n]))
    return out


@pytest.mark.parametrize('n,seed', [(1, 0), (7, 0), (10, 3), (100, 12345)])
def test_edm2_sampler_reshuffles_every_epoch(n, seed):
    stream = list(itertools.islice(iter(EpochSampler(n, seed=seed)), 3 * n))
    assert stream == _edm2_stream(n, 3 * n, seed)
    for e in range(3):
        assert sorted(stream[e * n:(e + 1) * n]) == list(range(n))  # every item once per epoch
    if n >= 10:
        assert stream[:n] != stream[n:2 * n] and stream[:n] != list(range(n))
        assert list(itertools.islice(iter(EpochSampler(n, seed=seed, shuffle=False)), n)) == list(range(n))


@pytest.mark.parametrize('num_replicas', [1, 3])
@pytest.mark.parametrize('start_idx', [0, 5, 37])
def test_edm2_sampler_ranks_stride_and_resume(num_replicas, start_idx):
    """Rank r takes global positions start_idx + r + k * num_replicas; a resume at cur_nimg continues exactly."""
    n, count = 11, 30
    want = _edm2_stream(n, count * num_replicas, seed=4, start=start_idx)
    for rank in range(num_replicas):
        got = list(itertools.islice(iter(EpochSampler(n, rank=rank, num_replicas=num_replicas, seed=4,
                                                      start_idx=start_idx)), count))
        assert got == want[rank::num_replicas]


def test_edm2_sampler_argument_errors():
    with pytest.raises(ValueError, match='non-empty'):
        EpochSampler(0)
    with pytest.raises(ValueError, match='rank'):
        EpochSampler(5, rank=2, num_replicas=2)
    with pytest.raises(ValueError, match='start_idx'):
        EpochSampler(5, start_idx=-1)


def test_images_and_npy_arrays_do_not_mix(tmp_path):
    """A stray .npy in an image folder (or an image among latents) is an error naming both kinds, not a sample."""
    for i in range(4):
        PIL.Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / f'{i}.png')
    assert not ImageFolderDataset(str(tmp_path)).holds_arrays
    np.save(tmp_path / 'x.npy', np.zeros([3, 8, 8], np.uint8))
    with pytest.raises(DatasetError, match=r'mixes 1 \.npy array\(s\) \(e\.g\. x\.npy\) with 4 image file'):
        ImageFolderDataset(str(tmp_path))
    latents = tmp_path / 'latents'
    latents.mkdir()
    np.save(latents / 'a.npy', np.zeros([8, 4, 4], np.float32))
    ds = ImageFolderDataset(str(latents))
    assert ds.holds_arrays and len(ds) == 1


def test_square_pow2_is_the_networks_rule_only(tmp_path):
    PIL.Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(tmp_path / 'a.png')
    with pytest.raises(DatasetError, match='square'):
        ImageFolderDataset(str(tmp_path))
    assert ImageFolderDataset(str(tmp_path), square_pow2=False).image_shape == [3, 32, 48]


def test_labels_as_nvlabs_reads_them(tmp_path):
    """Whole floats are class indices (NVlabs casts 1-D labels to int64), and entries for files that are not images
    of the dataset (a removed image, a stray name) are ignored."""
    files, _ = _dataset_files(_images(2))
    files['dataset.json'] = json.dumps({'labels': [['00000/img00000000.png', 2.0], ['00000/img00000001.png', 0.0],
                                                   ['00000/ghost.png', 1]]})
    ds = ImageFolderDataset(_write(tmp_path, files, True), use_labels=True)
    assert ds.label_shape == [3] and ds.get_label(0).tolist() == [0, 0, 1] and ds.get_label(1).tolist() == [1, 0, 0]


@pytest.mark.parametrize('as_zip', [False, True])
def test_check_shapes_reads_headers(tmp_path, as_zip):
    """The header scan (the fast IHDR path for 8-bit gray/RGB PNGs, PIL for other files) names the first misfit and
    counts them; palette and 16-bit PNGs are read through PIL and refused by mode."""
    def encode(image, fmt='png'):
        buf = io.BytesIO()
        (image if isinstance(image, PIL.Image.Image) else PIL.Image.fromarray(image)).save(buf, format=fmt)
        return buf.getvalue()
    png = encode
    rgb = np.zeros((8, 8, 3), np.uint8)
    files = {f'{i}.png': png(rgb) for i in range(3)}
    files['3.jpg'] = encode(rgb, 'jpeg')
    ImageFolderDataset(_write(tmp_path / 'ok', files, as_zip)).check_shapes()
    cases = [({'4.png': png(np.zeros((8, 8), np.uint8))}, r'4\.png: image is 8x8 with 1 channel\(s\).*\(1 of 5'),
             ({'4.png': png(np.zeros((16, 8, 3), np.uint8)), '5.png': png(np.zeros((8, 4, 3), np.uint8))},
              r'4\.png: image is 8x16 with 3 channel\(s\).*\(2 of 6'),
             ({'4.png': png(PIL.Image.fromarray(rgb).convert('P'))}, r"4\.png: image mode 'P'"),
             ({'4.png': png(np.zeros((8, 8), np.uint16))}, r"4\.png: image mode 'I;16'")]
    for k, (extra, message) in enumerate(cases):
        ds = ImageFolderDataset(_write(tmp_path / f'bad{k}', {**files, **extra}, as_zip))
        with pytest.raises(DatasetError, match=message):
            ds.check_shapes()
