"""generate_images(): batched, distributed image generation with NVlabs seed semantics (spec §4.3-4.4).

Seeds are split across torchrun ranks exactly as NVlabs generate.py splits them; each image draws its
latents, then its class index, then one churn-noise tensor per step from its own generator, so an image
depends only on its seed. A faster denoiser (compiled, graph-captured) can be passed as `denoiser`
without changing callers: the sampler still reads sigma_min/sigma_max/round_sigma from `net`.
"""

import collections
import math

import torch

from . import sampling, sampling_edm2

Batch = collections.namedtuple('Batch', ['images', 'labels', 'seeds'])
Batch.__doc__ = """images: uint8 [B, C, H, W] on the sampling device; labels: int64 class indices [B] or None;
seeds: list of the B seeds."""

ABLATION_KEYS = ('solver', 'discretization', 'schedule', 'scaling')


def dist_rank_world():
    """(rank, world size) of torch.distributed, or (0, 1) when it is not initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def rank_batches(seeds, max_batch_size, rank=0, world_size=1):
    """This rank's seed batches: ceil(n / (batch * world)) * world near-equal contiguous chunks,
    dealt round-robin (chunk r, r + world, ...), as NVlabs does. Some batches may be empty."""
    if max_batch_size < 1:
        raise ValueError(f'max_batch_size must be >= 1, got {max_batch_size}')
    num_batches = max(math.ceil(len(seeds) / (max_batch_size * world_size)), 1) * world_size
    chunks = torch.as_tensor(list(seeds), dtype=torch.int64).tensor_split(num_batches)
    return [chunk.tolist() for chunk in chunks[rank::world_size]]


def select_sampler(**sampler_kwargs):
    """(sampler function, kwargs): options set to None are dropped; any ablation option selects the
    ablation sampler, otherwise edm_sampler runs (NVlabs generate.py rule)."""
    kwargs = {k: v for k, v in sampler_kwargs.items() if v is not None}
    if any(k in kwargs for k in ABLATION_KEYS):
        return sampling.ablation_sampler, kwargs
    return sampling.edm_sampler, kwargs


def to_uint8(x):
    """NVlabs conversion: clip(127.5 x + 128, 0, 255) truncated toward zero."""
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)


class Denoiser:
    """Presents `fn(x, sigma, class_labels)` to the samplers with `net`'s sigma range and round_sigma (EDM)."""

    def __init__(self, net, fn):
        self.net, self.fn = net, fn
        for name in ('sigma_min', 'sigma_max', 'round_sigma'):
            if hasattr(net, name):
                setattr(self, name, getattr(net, name))

    def __call__(self, x, sigma, class_labels=None):
        return self.fn(x, sigma, class_labels)


def randn_like(rnd, fn, kwargs):
    """The churn-noise source: per-seed draws, or zeros when edm_sampler runs with S_churn = 0.

    With S_churn = 0 every draw is multiplied by 0 and nothing draws from the generators afterwards, so
    skipping the B per-seed launches per step leaves every image bit-identical (NVlabs draws them anyway).
    The ablation sampler always draws: its t_hat can differ from t_cur by rounding, so the noise matters.
    """
    if fn is sampling.edm_sampler and kwargs.get('S_churn', 0) == 0:
        return torch.zeros_like
    return rnd.randn_like


def check_class(net, class_idx):
    if class_idx is None:
        return
    if not net.label_dim:
        raise ValueError(f'class {class_idx} requested, but the network is unconditional (label_dim = 0)')
    if not 0 <= class_idx < net.label_dim:
        raise ValueError(f'class {class_idx} is out of range: the network has {net.label_dim} classes (0..{net.label_dim - 1})')


def is_edm2(net):
    """True for EDM2 preconditioners: ours, or another implementation's `Precond` (e.g. the official class, timed
    by bench/ with --nvlabs-dir), which has no round_sigma unlike every EDM preconditioner."""
    from .networks_edm2 import Precond
    return isinstance(net, Precond) or (type(net).__name__ == 'Precond' and not hasattr(net, 'round_sigma'))


def sampler_for(net, gnet=None, guidance=None, **sampler_kwargs):
    """(sampler function, kwargs) for this network: EDM2 networks take the EDM2 sampler (with optional
    guidance by `gnet`), EDM networks edm_sampler or the ablation sampler (NVlabs generate.py rule)."""
    lo, hi = sampler_kwargs.get('sigma_min'), sampler_kwargs.get('sigma_max')
    if lo is not None and hi is not None and lo >= hi:
        raise ValueError(f'--sigma_min={lo:g} must be below --sigma_max={hi:g} (the noise levels run from sigma_max '
                         f'down to sigma_min)')
    if is_edm2(net):
        kwargs = {k: v for k, v in sampler_kwargs.items() if v is not None}
        ablation = sorted(k for k in ABLATION_KEYS if k in kwargs)
        if ablation:
            raise ValueError(f'{", ".join(ablation)}: the ablation sampler is for EDM networks, not EDM2 ones')
        if guidance not in (None, 1) and gnet is None:
            raise ValueError(f'--guidance={guidance:g} needs a guiding network: pass --gnet (an unconditional or '
                             f'weaker model of the same resolution), or drop --guidance')
        if gnet is not None:
            mine = (net.img_resolution, net.img_channels)
            theirs = (gnet.img_resolution, gnet.img_channels)
            if theirs != mine:
                raise ValueError(f'--gnet works on {theirs[0]}x{theirs[0]}x{theirs[1]} inputs but the network on '
                                 f'{mine[0]}x{mine[0]}x{mine[1]}: the guiding network must match it')
            if gnet.label_dim not in (0, net.label_dim):
                raise ValueError(f'--gnet has {gnet.label_dim} classes but the network {net.label_dim}: the guiding '
                                 f'network must be unconditional or use the same classes')
        if guidance is not None:
            kwargs['guidance'] = guidance
        if gnet is not None:
            kwargs['gnet'] = gnet
        return sampling_edm2.edm2_sampler, kwargs
    if gnet is not None or guidance not in (None, 1):
        raise ValueError('guidance (gnet, guidance != 1) is defined for EDM2 networks; this is an EDM network')
    return select_sampler(**sampler_kwargs)


def nfe_per_image(net, guidance=None, **sampler_kwargs):
    """Network evaluations per image for the sampler generate_images would run."""
    kwargs = {k: v for k, v in sampler_kwargs.items() if v is not None}
    if is_edm2(net):
        return sampling_edm2.nfe_per_image(kwargs.get('num_steps', 32), 1 if guidance is None else guidance)
    return sampling.nfe_per_image(kwargs.get('num_steps', 18), kwargs.get('solver'))


def _draw(net, seeds, device, class_idx=None):
    """(generator, latents, labels) of a batch: each seed's generator draws its latents, then its class index
    (drawn even when class_idx overrides it, so the churn noise that follows is the same)."""
    rnd = sampling.StackedRandomGenerator(device, seeds)
    latents = rnd.randn([len(seeds), net.img_channels, net.img_resolution, net.img_resolution], device=device)
    labels = None
    if net.label_dim:
        labels = rnd.randint(net.label_dim, size=[len(seeds)], device=device)
        if class_idx is not None:
            labels = torch.full_like(labels, class_idx)
    return rnd, latents, labels


@torch.no_grad()
def class_labels_of(net, seeds, device, class_idx=None, max_batch_size=64):
    """The class index generate_images gives each seed (int64 [len(seeds)]), or None for an unconditional net:
    the same draws, without sampling."""
    if not net.label_dim:
        return None
    parts = [_draw(net, seeds[i:i + max_batch_size], device, class_idx)[2].cpu()
             for i in range(0, len(seeds), max_batch_size)]
    return torch.cat(parts) if parts else torch.zeros([0], dtype=torch.int64)


@torch.no_grad()
def generate_images(net, seeds, *, max_batch_size=64, class_idx=None, device=None, denoiser=None, progress=False,
                    gnet=None, guidance=None, encoder=None, **sampler_kwargs):
    """Yield Batch(images, labels, seeds) for this rank's share of `seeds`.

    net: a preconditioner (eval mode) on `device`, EDM or EDM2; sampler_kwargs: sampler options (num_steps,
    sigma_min, ..., solver, discretization, schedule, scaling for EDM; None means the sampler's default).
    denoiser: a faster drop-in for net (e.g. edm_fast.fast.FastDenoiser); gnet, guidance: EDM2 guidance (gnet
    may itself be a FastDenoiser); encoder: decodes the sampler output to uint8 (EDM2 encoders), default
    trunc(clip(127.5 x + 128)). Under torch.distributed every rank must call this with the same seeds.
    """
    device = torch.device(device) if device is not None else next(net.parameters()).device
    check_class(net, class_idx)
    if any(int(s) != s or s < 0 for s in seeds):
        raise ValueError('seeds must be non-negative integers')
    fn, kwargs = sampler_for(net, gnet, guidance, **sampler_kwargs)
    model = Denoiser(net, denoiser) if denoiser is not None else net
    decode = encoder.decode if encoder is not None else to_uint8
    rank, world = dist_rank_world()
    batches = rank_batches(seeds, max_batch_size, rank, world)
    bar = None
    if progress and rank == 0:
        import tqdm
        bar = tqdm.tqdm(total=sum(map(len, batches)), unit='img', desc=f'Generating (rank 0 of {world})')
    try:
        for batch_seeds in batches:
            if world > 1:
                torch.distributed.barrier()
            if not batch_seeds:
                continue
            rnd, latents, labels = _draw(net, batch_seeds, device, class_idx)
            class_labels = torch.eye(net.label_dim, device=device)[labels] if labels is not None else None
            x = fn(model, latents, class_labels, randn_like=randn_like(rnd, fn, kwargs), **kwargs)
            yield Batch(decode(x), labels, batch_seeds)
            if bar is not None:
                bar.update(len(batch_seeds))
    finally:
        if bar is not None:
            bar.close()
