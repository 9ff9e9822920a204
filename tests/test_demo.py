"""The built-in demo model: `python sample.py` out of the box, and a quality check of what it generates.

Quality measures that fail for noise or collapse: a classifier trained here on the demo's own training data
(scikit-learn's digits at 16x16) must recognise the requested class of >= 80% of conditional samples, and the
samples' pixel mean/std must lie close to the data's. A negative control shows the same measures reject noise.
"""

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from edm_fast import generate
from edm_fast.checkpoint import load_network, load_snapshot
from edm_fast.demo import DEMO_SNAPSHOT, DEMO_TRAIN_COMMAND, build_digits_dataset, load_digits_images

sklearn = pytest.importorskip('sklearn', reason='the demo data come from scikit-learn: pip install scikit-learn')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def digits():
    images, labels = load_digits_images(16)
    return images.reshape(len(images), -1).astype(np.float64) / 255, labels


@pytest.fixture(scope='module')
def classifier(digits):
    from sklearn.linear_model import LogisticRegression
    x, y = digits
    clf = LogisticRegression(max_iter=3000).fit(x[:1500], y[:1500])
    assert clf.score(x[1500:], y[1500:]) > 0.85  # the judge itself must be competent on held-out real digits
    return clf


@pytest.fixture(scope='module')
def samples():
    """10 conditional samples per class, seeded, 18 steps on the CPU."""
    net = load_network(DEMO_SNAPSHOT)
    images, labels = [], []
    for cls in range(10):
        batch = next(generate.generate_images(net, list(range(100 * cls, 100 * cls + 10)), class_idx=cls,
                                              max_batch_size=10, num_steps=18))
        images.append(batch.images[:, 0].reshape(10, -1).double().numpy() / 255)
        labels += [cls] * 10
    return np.concatenate(images), np.array(labels)


def test_demo_snapshot_is_what_the_readme_says():
    snap = load_snapshot(DEMO_SNAPSHOT)
    net = snap['ema']
    assert (net.img_resolution, net.img_channels, net.label_dim) == (16, 1, 10)
    assert 1_000_000 < sum(p.numel() for p in net.parameters()) < 10_000_000  # "a few million parameters"
    assert snap['extra']['kimg'] > 500 and snap['dataset_kwargs']['resolution'] == 16
    assert os.path.getsize(DEMO_SNAPSHOT) < 8e6
    assert '--arch=ddpmpp' in DEMO_TRAIN_COMMAND and '--cond=1' in DEMO_TRAIN_COMMAND


def test_conditional_samples_are_recognised(classifier, samples):
    images, labels = samples
    accuracy = (classifier.predict(images) == labels).mean()
    print(f'classifier accuracy on conditional samples: {accuracy:.3f}')
    assert accuracy >= 0.8


def test_sample_statistics_match_the_data(digits, samples):
    data, _ = digits
    images, _ = samples
    assert abs(images.mean() - data.mean()) < 0.05 and abs(images.std() - data.std()) < 0.05
    per_pixel = np.abs(images.mean(0) - data.mean(0))
    assert per_pixel.mean() < 0.06  # where strokes are, on average
    assert images.std(0).mean() > 0.5 * data.std(0).mean()  # no collapse onto one image per class


def test_measures_reject_noise_and_collapse(digits, classifier):
    data, labels = digits
    rng = np.random.default_rng(0)
    noise = rng.uniform(0, 1, size=(100, data.shape[1]))
    assert (classifier.predict(noise) == np.repeat(np.arange(10), 10)).mean() < 0.5
    assert abs(noise.std() - data.std()) > 0.05 or abs(noise.mean() - data.mean()) > 0.05
    collapsed = np.repeat(data[:1], 100, axis=0)
    assert collapsed.std(0).mean() < 0.5 * data.std(0).mean()


def test_rebuild_training_set(tmp_path):
    from edm_fast.dataset import ImageFolderDataset
    build_digits_dataset(str(tmp_path / 'digits.zip'))
    ds = ImageFolderDataset(str(tmp_path / 'digits.zip'), use_labels=True)
    assert len(ds) == 1797 and ds.resolution == 16 and ds.num_channels == 1 and ds.label_dim == 10


def test_python_sample_py_out_of_the_box(tmp_path):
    """README quickstart: `python sample.py` with no flags writes 64 PNGs into out/ (nothing else, so FID tools read
    exactly the samples) and the grid beside it as out-grid.png, in under a minute."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '2'))
    t0 = time.time()
    proc = subprocess.run([sys.executable, os.path.join(REPO, 'sample.py'), '--device', 'cpu'], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    seconds = time.time() - t0
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = sorted(f for f in os.listdir(tmp_path / 'out') if not f.startswith('.'))  # .sample-settings.json
    assert files == sorted(f'{s:06d}.png' for s in range(64))
    assert seconds < 60, f'took {seconds:.1f} s'
    import PIL.Image
    assert PIL.Image.open(tmp_path / 'out-grid.png').size == (8 * 18 + 2, 8 * 18 + 2)
