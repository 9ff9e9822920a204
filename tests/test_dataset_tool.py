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

from edm_fast.dataset import ImageFolderDataset
from edm_fast.dataset_tool import DatasetToolError, archive_fname, convert_dataset, parse_resolution

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
