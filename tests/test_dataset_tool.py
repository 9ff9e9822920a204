"""dataset_tool (spec §7.3): sources (folders with class sub-folders, zips, CIFAR-10 and MNIST archives),
transforms, the output layout read back through ImageFolderDataset, atomic writes, errors and the CLI."""

import gzip
import importlib.util
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import zipfile

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

from edm_fast.dataset import DatasetError, ImageFolderDataset
from edm_fast.dataset_tool import DatasetToolError, archive_fname, convert_dataset, encode_dataset, parse_resolution

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli():
    spec = importlib.util.spec_from_file_location('dataset_tool_cli', os.path.join(REPO, 'dataset_tool.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _save(path, array, fmt='PNG'):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    PIL.Image.fromarray(array).save(path, format=fmt)


def _rand(shape, seed):
    return np.random.RandomState(seed).randint(0, 256, size=shape, dtype=np.uint8)


def _convert(*args, **kwargs):
    return convert_dataset(*args, progress=False, **kwargs)


# ----------------------------------------------------------------------------------------------------


def test_folder_with_class_subdirs_round_trips_through_zip(tmp_path):
    src = tmp_path / 'src'
    layout = {'dogs/b.png': 1, 'cats/z.png': 0, 'cats/a.png': 0, 'dogs/a/deeper.png': 1, 'emus/x.png': 2}
    arrays = {name: _rand([8, 8, 3], i) for i, name in enumerate(layout)}
    for name, array in arrays.items():
        _save(str(src / name), array)
    (src / 'cats' / 'notes.txt').write_text('ignored')
    dest = tmp_path / 'out' / 'ds.zip'
    result = _convert(str(src), str(dest))
    assert result['num_images'] == 5 and result['labelled'] and result['resolution'] == (8, 8)

    order = ['cats/a.png', 'cats/z.png', 'dogs/a/deeper.png', 'dogs/b.png', 'emus/x.png']  # sorted by components
    with zipfile.ZipFile(dest) as z:
        assert sorted(z.namelist()) == sorted([archive_fname(i) for i in range(5)] + ['dataset.json'])
        assert all(info.compress_type == zipfile.ZIP_STORED for info in z.infolist())
        meta = json.loads(z.read('dataset.json'))
    assert archive_fname(0) == '00000/img00000000.png' and archive_fname(1234) == '00001/img00001234.png'
    assert meta['labels'] == [[archive_fname(i), layout[name]] for i, name in enumerate(order)]

    ds = ImageFolderDataset(str(dest), use_labels=True)
    assert len(ds) == 5 and ds.label_dim == 3 and ds.resolution == 8
    for i, name in enumerate(order):
        image, label = ds[i]
        np.testing.assert_array_equal(image, arrays[name].transpose(2, 0, 1))  # PNG is lossless
        assert int(label.argmax()) == layout[name] and label.sum() == 1
    assert not [f for f in os.listdir(dest.parent) if f != 'ds.zip']  # no temporary files left


def test_folder_with_dataset_json_to_directory(tmp_path):
    src = tmp_path / 'src'
    arrays = [_rand([4, 4], i) for i in range(3)]  # grayscale
    for i, array in enumerate(arrays):
        _save(str(src / f'im{i}.png'), array)
    vectors = [[0.5, 1.0], [-2.0, 0.0], [3.25, 4.0]]
    (src / 'dataset.json').write_text(json.dumps({'labels': [[f'im{i}.png', v] for i, v in enumerate(vectors)]}))
    dest = tmp_path / 'empty_dir'
    dest.mkdir()
    result = _convert(str(src), str(dest))
    assert result['channels'] == 1 and result['labelled']
    assert sorted(os.listdir(dest)) == ['00000', 'dataset.json']
    ds = ImageFolderDataset(str(dest), use_labels=True)
    assert ds.image_shape == [1, 4, 4] and ds.label_shape == [2]
    for i in range(3):
        np.testing.assert_array_equal(ds[i][0][0], arrays[i])
        np.testing.assert_array_equal(ds[i][1], np.float32(vectors[i]))


def test_unlabelled_sources_give_null_labels(tmp_path):
    src = tmp_path / 'src'
    _save(str(src / 'only' / 'a.png'), _rand([4, 4, 3], 0))  # a single sub-folder: no class labels
    _save(str(src / 'only' / 'b.png'), _rand([4, 4, 3], 1))
    _convert(str(src), str(tmp_path / 'a.zip'))
    with zipfile.ZipFile(tmp_path / 'a.zip') as z:
        assert json.loads(z.read('dataset.json')) == {'labels': None}
    # A zip source carries labels only through its dataset.json; max_images cuts the list.
    _convert(str(tmp_path / 'a.zip'), str(tmp_path / 'b.zip'), max_images=1)
    ds = ImageFolderDataset(str(tmp_path / 'b.zip'))
    assert len(ds) == 1 and not ds.has_labels


def _write_cifar(path, per_batch=3):
    data, labels = [], []
    with tarfile.open(path, 'w:gz') as tar:
        for batch in range(1, 6):
            x = _rand([per_batch, 3072], batch)
            y = [(batch * 3 + k) % 10 for k in range(per_batch)]
            blob = pickle.dumps({'batch_label': f'training batch {batch} of 5', 'data': x, 'labels': y,
                                 'filenames': [f'f{k}.png' for k in range(per_batch)]})
            info = tarfile.TarInfo(f'cifar-10-batches-py/data_batch_{batch}')
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
            data.append(x)
            labels += y
    return np.concatenate(data), labels


def test_cifar10_tarball(tmp_path):
    tarball = tmp_path / 'cifar-10-python.tar.gz'
    data, labels = _write_cifar(str(tarball))
    result = _convert(str(tarball), str(tmp_path / 'cifar.zip'))
    assert result['num_images'] == 15 and result['resolution'] == (32, 32) and result['channels'] == 3
    ds = ImageFolderDataset(str(tmp_path / 'cifar.zip'), use_labels=True)
    assert len(ds) == 15 and ds.label_dim == max(labels) + 1
    for i in (0, 7, 14):
        np.testing.assert_array_equal(ds[i][0], data[i].reshape(3, 32, 32))
        assert int(ds[i][1].argmax()) == labels[i]
    _convert(str(tarball), str(tmp_path / 'few.zip'), max_images=4)
    assert len(ImageFolderDataset(str(tmp_path / 'few.zip'))) == 4


def test_cifar10_refuses_code_in_pickles(tmp_path):
    tarball = tmp_path / 'cifar-10-python.tar.gz'
    with tarfile.open(tarball, 'w:gz') as tar:
        blob = pickle.dumps({'data': os.system, 'labels': []})  # a global outside numpy
        info = tarfile.TarInfo('cifar-10-batches-py/data_batch_1')
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))
    with pytest.raises(DatasetToolError, match=r'data_batch_1: cannot read the batch.*refusing to load'):
        _convert(str(tarball), str(tmp_path / 'x.zip'))
    assert not os.path.exists(tmp_path / 'x.zip')


def test_mnist_is_padded_to_32(tmp_path):
    images = _rand([5, 28, 28], 3)
    labels = np.array([3, 1, 4, 1, 5], np.uint8)
    with gzip.open(tmp_path / 'train-images-idx3-ubyte.gz', 'wb') as f:
        f.write((0x803).to_bytes(4, 'big') + b''.join(v.to_bytes(4, 'big') for v in (5, 28, 28)) + images.tobytes())
    with gzip.open(tmp_path / 'train-labels-idx1-ubyte.gz', 'wb') as f:
        f.write((0x801).to_bytes(4, 'big') + (5).to_bytes(4, 'big') + labels.tobytes())
    _convert(str(tmp_path / 'train-images-idx3-ubyte.gz'), str(tmp_path / 'mnist.zip'))
    ds = ImageFolderDataset(str(tmp_path / 'mnist.zip'), use_labels=True)
    assert ds.image_shape == [1, 32, 32] and len(ds) == 5
    for i in range(5):
        image = ds[i][0][0]
        np.testing.assert_array_equal(image[2:30, 2:30], images[i])
        assert image[:2].sum() == 0 and image[:, 30:].sum() == 0
        assert int(ds[i][1].argmax()) == labels[i]


def test_resolution_resizes_with_lanczos(tmp_path):
    src = tmp_path / 'src'
    array = _rand([16, 16, 3], 0)
    _save(str(src / 'a.png'), array)
    _convert(str(src), str(tmp_path / 'r.zip'), resolution='8x8')
    expected = np.array(PIL.Image.fromarray(array).resize((8, 8), PIL.Image.LANCZOS))
    np.testing.assert_array_equal(ImageFolderDataset(str(tmp_path / 'r.zip'))[0][0], expected.transpose(2, 0, 1))
    assert parse_resolution('64x64') == (64, 64) and parse_resolution('32,16') == (32, 16)
    with pytest.raises(DatasetToolError, match='use WxH'):
        parse_resolution('64')


def test_center_crop(tmp_path):
    src = tmp_path / 'src'
    wide = _rand([16, 24], 1)  # grayscale 24x16: becomes RGB
    _save(str(src / 'a.png'), wide)
    _convert(str(src), str(tmp_path / 'c.zip'), transform='center-crop', resolution=(8, 8))
    square = np.repeat(wide[:, 4:20, None], 3, axis=2)
    expected = np.array(PIL.Image.fromarray(square, 'RGB').resize((8, 8), PIL.Image.LANCZOS))
    ds = ImageFolderDataset(str(tmp_path / 'c.zip'))
    assert ds.image_shape == [3, 8, 8]
    np.testing.assert_array_equal(ds[0][0], expected.transpose(2, 0, 1))


def test_center_crop_wide_skips_but_keeps_numbering(tmp_path):
    src = tmp_path / 'src'
    _save(str(src / 'a.png'), _rand([20, 32, 3], 0))  # wide enough
    _save(str(src / 'b.png'), _rand([20, 8, 3], 1))   # narrower than W: skipped
    _save(str(src / 'c.png'), _rand([24, 40, 3], 2))
    result = _convert(str(src), str(tmp_path / 'w.zip'), transform='center-crop-wide', resolution='16x8')
    assert result['num_images'] == 2 and result['num_skipped'] == 1
    with zipfile.ZipFile(tmp_path / 'w.zip') as z:
        names = sorted(n for n in z.namelist() if n.endswith('.png'))
    assert names == [archive_fname(0), archive_fname(2)]
    image = ImageFolderDataset(str(tmp_path / 'w.zip'))[0][0]
    assert image.shape == (3, 16, 16)
    assert image[:, :4].sum() == 0 and image[:, 12:].sum() == 0  # black bars above and below


# ----------------------------------------------------------------------------------------------------
# Errors.


def test_error_mismatched_sizes_names_the_image(tmp_path):
    src = tmp_path / 'src'
    _save(str(src / 'a.png'), _rand([8, 8, 3], 0))
    _save(str(src / 'b.png'), _rand([16, 16, 3], 1))
    with pytest.raises(DatasetToolError, match=r'b\.png: image attributes differ.*width 8 vs 16'):
        _convert(str(src), str(tmp_path / 'bad.zip'))
    assert os.listdir(tmp_path) == ['src']  # atomic: neither the zip nor a temporary file remains
    with pytest.raises(DatasetToolError, match=r'b\.png: image attributes differ'):
        _convert(str(src), str(tmp_path / 'bad_dir'))
    assert os.listdir(tmp_path) == ['src']


def test_error_shape_checks_on_first_image(tmp_path):
    _save(str(tmp_path / 'rect' / 'a.png'), _rand([8, 16, 3], 0))
    with pytest.raises(DatasetToolError, match=r'a\.png: image is 16x8.*square.*--transform=center-crop'):
        _convert(str(tmp_path / 'rect'), str(tmp_path / 'o1.zip'))
    _save(str(tmp_path / 'odd' / 'a.png'), _rand([12, 12, 3], 0))
    with pytest.raises(DatasetToolError, match=r'a\.png: image is 12x12.*power of two'):
        _convert(str(tmp_path / 'odd'), str(tmp_path / 'o2.zip'))
    _save(str(tmp_path / 'alpha' / 'a.png'), _rand([8, 8, 4], 0))
    with pytest.raises(DatasetToolError, match=r'a\.png: image has 4 channels'):
        _convert(str(tmp_path / 'alpha'), str(tmp_path / 'o3.zip'))
    (tmp_path / 'corrupt').mkdir()
    (tmp_path / 'corrupt' / 'a.png').write_bytes(b'not a png')
    with pytest.raises(DatasetToolError, match=r'corrupt/a\.png: cannot decode image'):
        _convert(str(tmp_path / 'corrupt'), str(tmp_path / 'o4.zip'))


def test_error_destination_and_source(tmp_path):
    src = tmp_path / 'src'
    _save(str(src / 'a.png'), _rand([8, 8, 3], 0))
    full = tmp_path / 'full'
    full.mkdir()
    (full / 'keep.txt').write_text('x')
    with pytest.raises(DatasetToolError, match=r'full: --dest folder must be empty'):
        _convert(str(src), str(full))
    assert os.listdir(full) == ['keep.txt']
    (tmp_path / 'data.rar').write_bytes(b'x')
    with pytest.raises(DatasetToolError, match=r'data\.rar: unknown source type; --source must be'):
        _convert(str(tmp_path / 'data.rar'), str(tmp_path / 'o.zip'))
    with pytest.raises(DatasetToolError, match=r'nowhere: no such file or directory'):
        _convert(str(tmp_path / 'nowhere'), str(tmp_path / 'o.zip'))
    (tmp_path / 'x_lmdb').mkdir()
    with pytest.raises(DatasetToolError, match='LSUN lmdb sources are not supported'):
        _convert(str(tmp_path / 'x_lmdb'), str(tmp_path / 'o.zip'))
    with pytest.raises(DatasetToolError, match=r'--transform=center-crop needs --resolution=WxH'):
        _convert(str(src), str(tmp_path / 'o.zip'), transform='center-crop')
    (tmp_path / 'bad_json').mkdir()
    _save(str(tmp_path / 'bad_json' / 'a.png'), _rand([8, 8, 3], 0))
    (tmp_path / 'bad_json' / 'dataset.json').write_text('{"labels": [')
    with pytest.raises(DatasetToolError, match=r'bad_json/dataset\.json: malformed dataset\.json'):
        _convert(str(tmp_path / 'bad_json'), str(tmp_path / 'o.zip'))
    (tmp_path / 'empty').mkdir()
    with pytest.raises(DatasetToolError, match=r'empty: no images found'):
        _convert(str(tmp_path / 'empty'), str(tmp_path / 'o.zip'))
    assert not os.path.exists(tmp_path / 'o.zip')


def test_cli(tmp_path):
    src = tmp_path / 'src'
    for i in range(3):
        _save(str(src / 'ab'[min(i, 1)] / f'{i}.png'), _rand([16, 16, 3], i))
    main = _cli()
    runner = CliRunner()
    result = runner.invoke(main, ['--source', str(src), '--dest', str(tmp_path / 'out.zip'), '--resolution=8x8',
                                  '--max-images=2'])
    assert result.exit_code == 0, result.output
    ds = ImageFolderDataset(str(tmp_path / 'out.zip'), use_labels=True)
    assert len(ds) == 2 and ds.resolution == 8 and ds.label_dim == 2
    result = runner.invoke(main, ['--source', str(tmp_path / 'missing'), '--dest', str(tmp_path / 'x.zip')])
    assert result.exit_code == 1 and 'missing: no such file or directory' in result.output
    result = runner.invoke(main, ['--source', str(src), '--dest', str(tmp_path / 'x.zip'), '--resolution=abc'])
    assert result.exit_code == 2 and 'use WxH' in result.output
    help_text = runner.invoke(main, ['--help']).output
    assert 'LSUN lmdb folders are not supported' in help_text and 'cifar-10-python.tar.gz' in help_text


def test_cli_script_runs(tmp_path):
    src = tmp_path / 'src'
    _save(str(src / 'a.png'), _rand([8, 8, 3], 0))
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, os.path.join(REPO, 'dataset_tool.py'), f'--source={src}',
                           f'--dest={tmp_path / "d.zip"}'], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(ImageFolderDataset(str(tmp_path / 'd.zip'))) == 1


# ----------------------------------------------------------------------------------------------------
# EDM2 dataset_tool.py: the convert and encode subcommands.


def _zip_names(path):
    with zipfile.ZipFile(path) as z:
        return sorted(z.namelist())


def _zip_png(path, name):
    with zipfile.ZipFile(path) as z:
        return np.array(PIL.Image.open(io.BytesIO(z.read(name))))


def _zip_json(path):
    with zipfile.ZipFile(path) as z:
        return json.loads(z.read('dataset.json'))


def test_convert_subcommand_reads_rgb_and_sorts_by_path_string(tmp_path):
    """`convert` is NVlabs edm2: every image read as RGB, folders listed in path-string order ('a-b/...' sorts
    before 'a/...' as '-' < '/'); the EDM form (no subcommand) is unchanged: grayscale stays L, folders in
    path-component order ('a' before 'a-b')."""
    src = tmp_path / 'src'
    gray = {'a/0.png': _rand([8, 8], 1), 'a-b/0.png': _rand([8, 8], 2)}
    for name, img in gray.items():
        _save(str(src / name), img)
    main, runner = _cli(), CliRunner()

    r = runner.invoke(main, ['convert', f'--source={src}', f'--dest={tmp_path / "edm2.zip"}'])
    assert r.exit_code == 0, r.output
    first, second = _zip_png(tmp_path / 'edm2.zip', archive_fname(0)), _zip_png(tmp_path / 'edm2.zip', archive_fname(1))
    assert first.shape == (8, 8, 3) and np.array_equal(first, np.repeat(gray['a-b/0.png'][:, :, None], 3, axis=2))
    assert np.array_equal(second[:, :, 1], gray['a/0.png'])
    # Labels from the top-level folder names: classes sorted by name ('a' = 0, 'a-b' = 1), whatever the order.
    assert _zip_json(tmp_path / 'edm2.zip')['labels'] == [[archive_fname(0), 1], [archive_fname(1), 0]]

    r = runner.invoke(main, [f'--source={src}', f'--dest={tmp_path / "edm.zip"}'])
    assert r.exit_code == 0, r.output
    first = _zip_png(tmp_path / 'edm.zip', archive_fname(0))
    assert first.shape == (8, 8) and np.array_equal(first, gray['a/0.png'])
    assert _zip_json(tmp_path / 'edm.zip')['labels'] == [[archive_fname(0), 0], [archive_fname(1), 1]]

    # RGBA is flattened to RGB by convert (PIL convert('RGB')), refused by the EDM form.
    rgba = _rand([8, 8, 4], 3)
    _save(str(tmp_path / 'rgba' / 'x.png'), rgba)
    r = runner.invoke(main, ['convert', f'--source={tmp_path / "rgba"}', f'--dest={tmp_path / "rgba.zip"}'])
    assert r.exit_code == 0, r.output
    assert np.array_equal(_zip_png(tmp_path / 'rgba.zip', archive_fname(0)), rgba[:, :, :3])
    r = runner.invoke(main, [f'--source={tmp_path / "rgba"}', f'--dest={tmp_path / "rgba2.zip"}'])
    assert r.exit_code == 1 and '4 channels' in r.output


def _dhariwal_expected(img, steps):
    """Apply hand-derived ADM crop steps: ('box', (w, h)) / ('bicubic', (w, h)) resizes, then ('crop', top, left, R)."""
    image = PIL.Image.fromarray(img)
    for step in steps:
        if step[0] == 'box':
            image = image.resize(step[1], resample=PIL.Image.BOX)
        elif step[0] == 'bicubic':
            image = image.resize(step[1], resample=PIL.Image.BICUBIC)
        else:
            _, top, left, r = step
            return np.array(image)[top:top + r, left:left + r]


# (W, H), R, and the ADM steps worked out by hand: halve with BOX while the short side >= 2R, scale the short side
# to R (each side round(side * R / short), halves to even) with BICUBIC, centre-crop R x R with floor offsets.
DHARIWAL_CASES = [
    ((300, 200), 64, [('box', (150, 100)), ('bicubic', (96, 64)), ('crop', 0, 16, 64)]),
    ((14, 8), 6, [('bicubic', (10, 6)), ('crop', 0, 2, 6)]),          # 14 * 0.75 = 10.5 rounds to even: 10
    ((33, 70), 16, [('box', (16, 35)), ('bicubic', (16, 35)), ('crop', 9, 0, 16)]),
    ((130, 520), 32, [('box', (65, 260)), ('box', (32, 130)), ('bicubic', (32, 130)), ('crop', 49, 0, 32)]),
    ((5, 7), 8, [('bicubic', (8, 11)), ('crop', 1, 0, 8)]),           # smaller than R: scaled up
]


@pytest.mark.parametrize('size, r, steps', DHARIWAL_CASES)
def test_center_crop_dhariwal_matches_adm_steps(size, r, steps):
    from edm_fast.dataset_tool import make_transform
    img = _rand([size[1], size[0], 3], size[0])
    got = make_transform('center-crop-dhariwal', r, r)(img)
    assert got.shape == (r, r, 3) and np.array_equal(got, _dhariwal_expected(img, steps))


def test_convert_center_crop_dhariwal_cli(tmp_path):
    src = tmp_path / 'src'
    imgs = [_rand([200, 300, 3], 10), _rand([70, 33, 3], 11)]
    for i, img in enumerate(imgs):
        _save(str(src / f'{i}.png'), img)
    main, runner = _cli(), CliRunner()
    r = runner.invoke(main, ['convert', f'--source={src}', f'--dest={tmp_path / "out"}', '--resolution=16x16',
                             '--transform=center-crop-dhariwal', '--max-images=2'])
    assert r.exit_code == 0, r.output
    want0 = _dhariwal_expected(imgs[0], [('box', (150, 100)), ('box', (75, 50)), ('box', (37, 25)),
                                          ('bicubic', (24, 16)), ('crop', 0, 4, 16)])
    want1 = _dhariwal_expected(imgs[1], [('box', (16, 35)), ('bicubic', (16, 35)), ('crop', 9, 0, 16)])
    for idx, want in enumerate([want0, want1]):
        assert np.array_equal(np.array(PIL.Image.open(tmp_path / 'out' / archive_fname(idx))), want)
    ds = ImageFolderDataset(str(tmp_path / 'out'))
    assert len(ds) == 2 and ds.resolution == 16 and ds.num_channels == 3
    # The EDM form accepts the transform too (a superset of NVlabs edm).
    r = runner.invoke(main, [f'--source={src}', f'--dest={tmp_path / "edm.zip"}', '--resolution=16x16',
                             '--transform=center-crop-dhariwal'])
    assert r.exit_code == 0, r.output
    assert np.array_equal(_zip_png(tmp_path / 'edm.zip', archive_fname(0)), want0)

    for args, message in [(['--resolution=16x8'], 'give --resolution=RxR, not 16x8'),
                          ([], 'needs --resolution=WxH')]:
        r = runner.invoke(main, ['convert', f'--source={src}', f'--dest={tmp_path / "bad.zip"}',
                                 '--transform=center-crop-dhariwal'] + args)
        assert r.exit_code == 1 and message in r.output, r.output
    r = runner.invoke(main, ['convert', f'--source={src}', f'--dest={tmp_path / "bad.zip"}', '--transform=foo'])
    assert r.exit_code == 2 and 'center-crop-dhariwal' in r.output
    assert not os.path.exists(tmp_path / 'bad.zip')
    help_text = runner.invoke(main, ['convert', '--help']).output
    assert 'center-crop-dhariwal' in help_text and 'RGB' in help_text
    assert 'convert' in runner.invoke(main, ['--help']).output
    r = runner.invoke(main, ['convert', f'--source={src}', f'--dest={tmp_path / "bad.zip"}'], env={'WORLD_SIZE': '2'})
    assert r.exit_code == 1 and 'not torchrun' in r.output


def _labelled_images(root, n=3, size=16):
    """n images in class0/ and class1/ (each with a 0 and a 255 pixel); returns them in dataset order."""
    names = []
    for i in range(n):
        img = _rand([size, size, 3], 20 + i)
        img[0, 0] = [0, 0, 0]
        img[0, 1] = [255, 255, 255]
        names.append(f'class{i % 2}/{i}.png')
        _save(str(root / names[-1]), img)
    return [np.array(PIL.Image.open(root / name)) for name in sorted(names)]


def test_encode_writes_the_latent_dataset_nvlabs_reads(tmp_path, monkeypatch):
    """encode: one float32 .npy [8, H/8, W/8] per image (VAE posterior mean, std of x / 255), named
    NNNNN/img-mean-std-NNNNNNNN.npy, labels in dataset.json; read back as NVlabs edm2 does (np.load, then
    reshape(-1, h, w)) it feeds StabilityVAEEncoder.encode_latents. The VAE comes from --model-url, a local
    directory; here a tiny stand-in with the diffusers interface takes the real VAE's place."""
    import torch
    from vae_standin import StandInVAE, reference_raw_latents
    from edm_fast import encoders
    images = _labelled_images(tmp_path / 'src')
    convert_dataset(str(tmp_path / 'src'), str(tmp_path / 'img.zip'), progress=False, flavor='edm2')
    vae_dir = tmp_path / 'sd-vae-ft-mse'
    vae_dir.mkdir()
    vae = StandInVAE()
    loaded = []

    def fake_load(vae_name, device):
        loaded.append((vae_name, str(device)))
        return vae
    monkeypatch.setattr(encoders, '_load_vae', fake_load)

    main, runner = _cli(), CliRunner()
    r = runner.invoke(main, ['encode', f'--source={tmp_path / "img.zip"}', f'--dest={tmp_path / "lat.zip"}',
                             f'--model-url={vae_dir}', '--device=cpu', '--batch=2'])
    assert r.exit_code == 0, r.output
    assert loaded == [(str(vae_dir), 'cpu')]
    assert [x.shape[0] for x in vae.encoded] == [2, 1]
    assert all(x.min() == 0 and x.max() == 1 for x in vae.encoded)  # the VAE sees [0, 1] pixels, as NVlabs
    names = [f'{i // 1000:05d}/img-mean-std-{i:08d}.npy' for i in range(3)]
    assert _zip_names(tmp_path / 'lat.zip') == sorted(names + ['dataset.json'])
    labels = _zip_json(tmp_path / 'lat.zip')['labels']
    assert labels == [[names[0], 0], [names[1], 0], [names[2], 1]]  # class0/0, class0/2, class1/1
    with zipfile.ZipFile(tmp_path / 'lat.zip') as z:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
        raw = [np.load(io.BytesIO(z.read(name)), allow_pickle=False) for name in names]
    want = reference_raw_latents(vae, torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2))
    for got, w in zip(raw, want):
        assert got.dtype == np.float32 and got.shape == (8, 2, 2)
        np.testing.assert_array_equal(got, w.numpy())
    lat = np.stack([x.reshape(-1, *x.shape[-2:]) for x in raw])
    final = encoders.StabilityVAEEncoder().encode_latents(torch.from_numpy(lat))
    assert final.shape == (3, 4, 2, 2) and torch.isfinite(final).all()

    # Python API, with an encoder object given directly; a directory destination; --max-images.
    enc = encoders.StabilityVAEEncoder()
    enc._vae = vae
    out = encode_dataset(str(tmp_path / 'img.zip'), str(tmp_path / 'lat_dir'), encoder=enc, max_images=2,
                         device='cpu', progress=False)
    assert out == dict(dest=str(tmp_path / 'lat_dir'), num_images=2, latent_shape=[8, 2, 2], labelled=True)
    np.testing.assert_array_equal(np.load(tmp_path / 'lat_dir' / names[1]), want[1].numpy())

    # Mixed image sizes are refused, naming the image.
    _save(str(tmp_path / 'src' / 'class1' / '9.png'), _rand([24, 24, 3], 5))
    with pytest.raises(DatasetToolError, match=r'9\.png: image is 24x24, but the first image is 16x16'):
        encode_dataset(str(tmp_path / 'src'), str(tmp_path / 'mixed.zip'), encoder=enc, device='cpu', progress=False)
    assert not os.path.exists(tmp_path / 'mixed.zip')


def _latent_dataset(tmp_path, n=3, size=16):
    from vae_standin import StandInVAE
    from edm_fast import encoders
    _labelled_images(tmp_path / 'src', n=n, size=size)
    enc = encoders.StabilityVAEEncoder()
    enc._vae = StandInVAE()
    encode_dataset(str(tmp_path / 'src'), str(tmp_path / 'lat.zip'), encoder=enc, device='cpu', progress=False)
    return str(tmp_path / 'lat.zip')


def test_training_dataset_reads_encoded_latents(tmp_path):
    """ImageFolderDataset serves the .npy latents of encode as stored (x-flipped copies mirrored along W), with
    their labels; a corrupt .npy is a DatasetError naming the file."""
    path = _latent_dataset(tmp_path)
    ds = ImageFolderDataset(path, use_labels=True, xflip=True)
    assert len(ds) == 6 and ds.label_dim == 2 and ds.num_channels == 8 and ds.resolution == 2
    with zipfile.ZipFile(path) as z:
        names = sorted(n for n in z.namelist() if n.endswith('.npy'))
        stored = [np.load(io.BytesIO(z.read(n))) for n in names]
    for i in range(3):
        x, label = ds[i]
        assert x.dtype == np.float32 and np.array_equal(x, stored[i]) and label.shape == (2,)
        assert np.array_equal(ds[i + 3][0], stored[i][:, :, ::-1])
    bad = tmp_path / 'bad'
    bad.mkdir()
    np.save(bad / 'a.npy', stored[0])
    (bad / 'b.npy').write_bytes(b'not an array')
    with pytest.raises(DatasetError, match='b.npy'):
        ImageFolderDataset(str(bad))[1]


def test_edm2_training_runs_on_encoded_latents(tmp_path):
    """An 8-channel latent dataset trains a 4-channel EDM2 net through StabilityVAEEncoder (chosen by the channel
    count, as train_edm2.py does), and the snapshot carries that encoder."""
    import torch
    from edm_fast import checkpoint, encoders
    from edm_fast import training_loop_edm2 as tl
    path = _latent_dataset(tmp_path, n=4, size=32)
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    torch.manual_seed(0)
    result = tl.training_loop(
        run_dir=str(run_dir), dataset_kwargs=dict(class_name='ImageFolderDataset', path=path, use_labels=True),
        data_loader_kwargs=dict(num_workers=0),
        network_kwargs=dict(class_name='Precond', model_channels=8, channel_mult=[1, 2], num_blocks=1,
                            attn_resolutions=[], logvar_channels=8),
        loss_kwargs=dict(class_name='EDM2Loss'), lr_kwargs=dict(func_name='learning_rate_schedule', ref_lr=1e-2,
                                                                 ref_batches=16, rampup_Mimg=0.001),
        ema_kwargs=dict(class_name='PowerFunctionEMA', stds=[0.05]), seed=1, batch_size=16, total_nimg=1024,
        status_nimg=1024, snapshot_nimg=1024, checkpoint_nimg=None, device='cpu')
    assert result['cur_nimg'] == 1024
    snaps = sorted(p for p in os.listdir(run_dir) if p.startswith('network-snapshot'))
    snap = checkpoint.load_snapshot(str(run_dir / snaps[-1]))
    assert isinstance(snap['encoder'], encoders.StabilityVAEEncoder)
    assert snap['ema'].img_channels == 4 and snap['ema'].img_resolution == 4 and snap['ema'].label_dim == 2


def test_encode_without_the_vae_fails_clearly(tmp_path):
    """Without a local VAE (or without diffusers) encode stops before writing anything and says what to provide."""
    _labelled_images(tmp_path / 'src', n=1)
    main, runner = _cli(), CliRunner()
    for url in ['stabilityai/sd-vae-ft-mse', str(tmp_path / 'missing')]:
        r = runner.invoke(main, ['encode', f'--source={tmp_path / "src"}', f'--dest={tmp_path / "lat.zip"}',
                                 f'--model-url={url}', '--device=cpu'])
        assert r.exit_code == 1, r.output
        assert f'--model-url={url}' in r.output and 'cannot download' in r.output and 'local directory' in r.output
        assert 'diffusers' in r.output
    assert sorted(os.listdir(tmp_path)) == ['src']
    help_text = runner.invoke(main, ['encode', '--help']).output
    assert '--model-url' in help_text and 'img-mean-std' in help_text


def test_dest_must_not_be_the_source(tmp_path):
    """--dest equal to --source (or inside a source folder) would replace the source with the (smaller) new dataset."""
    folder = tmp_path / 'src'
    for i in range(3):
        _save(folder / f'{i}.png', _rand((8, 8, 3), i))
    zipped = tmp_path / 'src.zip'
    convert_dataset(str(folder), str(zipped), progress=False)
    before = zipped.read_bytes()
    for source, dest in [(zipped, zipped), (folder, folder), (folder, folder / 'out.zip')]:
        with pytest.raises(DatasetToolError, match='is --source=.* or inside it'):
            convert_dataset(str(source), str(dest), max_images=1, progress=False)
    assert zipped.read_bytes() == before and sorted(os.listdir(folder)) == ['0.png', '1.png', '2.png']
