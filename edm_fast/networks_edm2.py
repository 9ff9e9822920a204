"""EDM2 networks (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models").

Magnitude-preserving (MP) primitives, MPFourier, MPConv, Block, UNet and the Precond wrapper, with the
NVlabs/edm2 class names, constructor signatures and defaults, module tree, parameter/buffer names and
registration order (../shared/spec/EDM_REFERENCE.md §10.1-10.4), so state dicts and official pickles map
one to one. There are no biases anywhere; every MPConv weight is normalised at use.

Numerics follow NVlabs: norms in fp32, forced weight normalisation of the stored parameters in training
mode, attention with pixel-normalised q/k/v and softmax in the I/O dtype, clipping of block outputs to
±clip_act. Parameters stay fp32 and are cast to the activation dtype at use. Resampling goes through
`edm_fast.ops.resample` and attention through `edm_fast.ops.mp_attention` (fast backends on GPUs; the
reference backend keeps the NVlabs numbers).
"""

import math

import numpy as np
import torch

from . import ops
from .preconditioners import _Precond
from .util import record_init_kwargs

# ----------------------------------------------------------------------------------------------------
# Magnitude-preserving primitives.


normalize = ops.mp_normalize  # NVlabs name; defined with the ops so the attention backends share it


_FILTERS = {}


def _resample_filter(f, device, dtype):
    """Normalised 2-D filter outer(f, f) / sum(f)^2 as [1, 1, L, L] (computed in fp32 like NVlabs), cached."""
    key = (tuple(f), torch.device(device), dtype)
    filt = _FILTERS.get(key)
    if filt is None:
        f32 = np.float32(f)
        if f32.ndim != 1 or len(f32) % 2 != 0:
            raise ValueError(f'resample filter must be a 1-D list of even length, got {f!r}')
        f32 = f32 / f32.sum()
        filt = torch.as_tensor(np.outer(f32, f32)[np.newaxis, np.newaxis], device=device).to(dtype)
        if len(_FILTERS) < 64:
            _FILTERS[key] = filt
    return filt


def resample(x, f=[1, 1], mode='keep'):
    """Depthwise FIR resampling by 2: 'keep' (identity), 'down' (conv, stride 2) or 'up' (transposed conv, 4x filter).

    x: [N, C, H, W]; f: 1-D filter of even length ([1,1]: 2x2 average pooling / nearest-neighbour x2).
    Padding (len(f) - 1) // 2, so the size halves or doubles exactly.
    """
    if mode == 'keep':
        return x
    if mode not in ('down', 'up'):
        raise ValueError(f"resample mode must be 'keep', 'down' or 'up', got {mode!r}")
    filt = _resample_filter(f, x.device, x.dtype)
    pad = (len(f) - 1) // 2
    if mode == 'down':
        return ops.resample(x, filt, down=2, padding=pad)
    return ops.resample(x, filt, up=2, padding=pad)


def mp_silu(x):
    """Magnitude-preserving SiLU: silu(x) / 0.596."""
    return torch.nn.functional.silu(x) / 0.596


def mp_sum(a, b, t=0.5):
    """Magnitude-preserving blend: lerp(a, b, t) / sqrt((1 - t)^2 + t^2); t weights the second argument."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a, b, dim=1, t=0.5):
    """Magnitude-preserving concatenation [a, b] along dim, the parts weighted (1 - t) and t per channel."""
    Na = a.shape[dim]
    Nb = b.shape[dim]
    C = math.sqrt((Na + Nb) / ((1 - t) ** 2 + t ** 2))
    wa = C / math.sqrt(Na) * (1 - t)
    wb = C / math.sqrt(Nb) * t
    return torch.cat([wa * a, wb * b], dim=dim)


def attention(qkv, num_heads):
    """EDM2 self-attention from the qkv conv output: [N, 3C, H, W] -> [N, C, H, W] (see edm_fast.ops.mp_attention)."""
    return ops.mp_attention(qkv, num_heads)

# ----------------------------------------------------------------------------------------------------
# Layers.


@record_init_kwargs
class MPFourier(torch.nn.Module):
    """Random Fourier features sqrt(2) cos(x freqs + phases): x [N] -> [N, num_channels], computed in fp32.

    `freqs` (2 pi N(0,1) bandwidth) and `phases` (2 pi U(0,1)) are persistent buffers drawn at construction;
    load them, never re-draw them.
    """

    def __init__(self, num_channels, bandwidth=1):
        super().__init__()
        self.register_buffer('freqs', 2 * np.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer('phases', 2 * np.pi * torch.rand(num_channels))

    def forward(self, x):
        y = x.to(torch.float32)
        y = y.ger(self.freqs.to(torch.float32))
        y = y + self.phases.to(torch.float32)
        y = y.cos() * np.sqrt(2)
        return y.to(x.dtype)


@record_init_kwargs
class MPConv(torch.nn.Module):
    """Magnitude-preserving convolution (kernel [kh, kw]) or linear layer (kernel []), no bias.

    forward(x, gain=1): x [N, in, H, W] (or [N, in]) -> [N, out, H, W] (or [N, out]) in x.dtype. The weight is
    normalised per output channel at every call and scaled by gain / sqrt(fan_in) (the gain, a number or a
    0-d tensor, multiplies the weight). In training mode the stored parameter is first overwritten, in place
    and without grad, by its normalised version (forced weight normalisation). Padding kernel // 2.

    Eval-mode cache: when no gradient is needed, the normalised weight is computed once per (parameter
    storage, `weight._version`, dtype, device) and reused; every in-place change of the parameter (optimizer
    step, load_state_dict, forced normalisation) bumps `_version` and invalidates it. The cached tensors are
    the same ops on the same values, so results are bit-identical to the uncached path. The cache lives
    outside the state dict and is not pickled or deep-copied. It holds one extra copy of the weight (in the
    activation dtype); set `MPConv.cache_weights = False` (class-wide or per instance) to trade that memory
    for recomputation, or free it with `clear_weight_caches(net)`.
    """

    cache_weights = True
    gain_dtype = None  # set per instance by the snapshot loaders: see _scale

    def __init__(self, in_channels, out_channels, kernel):
        super().__init__()
        self.out_channels = out_channels
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, *kernel))
        self.frozen_key = None  # see freeze_weights

    def __getstate__(self):
        state = super().__getstate__().copy()
        state.pop('_weight_cache', None)
        return state

    def _scale(self, gain, fan_in):
        """gain / sqrt(fan_in). NVlabs divides a tensor gain in its parameter's dtype: fp32 in training, fp16 when
        sampling from any EDM2 snapshot (saved with module.to(float16)). The loaders keep parameters in fp32, so they
        set gain_dtype to the stored dtype and the quotient is rounded as NVlabs rounds it."""
        if isinstance(gain, torch.Tensor) and self.gain_dtype is not None:
            gain = gain.to(self.gain_dtype)
        return gain / np.sqrt(fan_in)

    def _cached_weight(self, gain, dtype):
        """The weight as the forward uses it, from the cache when possible; None when it must be recomputed."""
        weight = self.weight
        if not self.cache_weights or self.training or (torch.is_grad_enabled() and weight.requires_grad) or torch.compiler.is_compiling():
            return None
        if isinstance(gain, torch.Tensor):
            if gain.requires_grad and torch.is_grad_enabled():
                return None
            gain_key = 'tensor'
        elif isinstance(gain, (int, float)) and not isinstance(gain, bool):
            gain_key = float(gain)
        else:
            return None
        storage = weight.untyped_storage()
        key = (weight.data_ptr(), weight._version, weight.device, tuple(weight.shape), dtype, gain_key,
               torch.is_inference_mode_enabled())
        cache = self.__dict__.get('_weight_cache')
        if cache is None or cache[0] != key:
            w = normalize(weight.to(torch.float32))
            if gain_key != 'tensor':  # the whole weight, exactly as the uncached path computes it
                w = (w * self._scale(gain, w[0].numel())).to(dtype)
            # Holding the storage keeps its address from being reused by another tensor while cached.
            cache = (key, storage, w)
            self.__dict__['_weight_cache'] = cache
        w = cache[2]
        if gain_key == 'tensor':
            w = (w * self._scale(gain, w[0].numel())).to(dtype)
        return w

    def clear_cache(self):
        """Drop the eval-mode weight cache (it is also invalidated automatically by any weight change)."""
        self.__dict__.pop('_weight_cache', None)

    def _frozen(self, gain, dtype):
        """The weight from `freeze_weights` (None when not frozen, in training, or for another dtype/gain)."""
        frozen = self._buffers.get('frozen_weight')
        if frozen is None or self.training:
            return None
        if self.frozen_key is None:  # normalised fp32 weight; the gain is applied per call, as uncached
            return (frozen * self._scale(gain, frozen[0].numel())).to(dtype)
        if dtype == self.frozen_key[0] and isinstance(gain, (int, float)) and float(gain) == self.frozen_key[1]:
            return frozen
        return None

    def forward(self, x, gain=1):
        w = self._frozen(gain, x.dtype)
        if w is None:
            w = self._cached_weight(gain, x.dtype)
        if w is None:
            w = self.weight.to(torch.float32)
            if self.training:
                with torch.no_grad():
                    self.weight.copy_(normalize(w))  # forced weight normalisation (w aliases the fp32 parameter)
            w = normalize(w)  # traditional weight normalisation
            w = w * self._scale(gain, w[0].numel())  # magnitude-preserving scaling
            w = w.to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        if w.ndim != 4:
            raise ValueError(f'MPConv supports 2-D (linear) and 4-D (conv) weights, got shape {tuple(w.shape)}')
        return torch.nn.functional.conv2d(x, w, padding=(w.shape[-1] // 2,))

# ----------------------------------------------------------------------------------------------------
# U-Net block.


@record_init_kwargs
class Block(torch.nn.Module):
    """EDM2 U-Net block: resample, (enc: skip conv + pixel norm), residual branch modulated by the
    embedding, optional multi-head self-attention, clip to ±clip_act.

    forward(x [N, in, H, W], emb [N or 1, emb_channels]) -> [N, out, H', W'] in x.dtype.
    heads = out_channels // channels_per_head when attention is requested (0 heads: no attention layers).
    """

    def __init__(self, in_channels, out_channels, emb_channels, flavor='enc', resample_mode='keep',
                 resample_filter=[1, 1], attention=False, channels_per_head=64, dropout=0, res_balance=0.3,
                 attn_balance=0.3, clip_act=256):
        super().__init__()
        if flavor not in ('enc', 'dec'):
            raise ValueError(f"Block flavor must be 'enc' or 'dec', got {flavor!r}")
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_filter = resample_filter
        self.resample_mode = resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        self.emb_gain = torch.nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == 'enc' else in_channels, out_channels, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=[])
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, kernel=[1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=[1, 1]) if self.num_heads != 0 else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=[1, 1]) if self.num_heads != 0 else None

    def forward(self, x, emb):
        # Main branch.
        x = resample(x, f=self.resample_filter, mode=self.resample_mode)
        if self.flavor == 'enc':
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm

        # Residual branch.
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c.unsqueeze(2).unsqueeze(3).to(y.dtype))
        if self.training and self.dropout != 0:
            y = torch.nn.functional.dropout(y, p=self.dropout)
        y = self.conv_res1(y)

        # Connect the branches.
        if self.flavor == 'dec' and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)

        # Self-attention.
        if self.num_heads != 0:
            y = attention(self.attn_qkv(x), self.num_heads)
            y = self.attn_proj(y)
            x = mp_sum(x, y, t=self.attn_balance)

        # Clip activations.
        if self.clip_act is not None:
            x = x.clip_(-self.clip_act, self.clip_act)
        return x

# ----------------------------------------------------------------------------------------------------
# U-Net.


@record_init_kwargs
class UNet(torch.nn.Module):
    """EDM2 U-Net: forward(x [N, img_channels, R, R], noise_labels [N or 1], class_labels [N or 1, label_dim]
    or None) -> [N, img_channels, R, R] in x.dtype (embeddings in fp32).

    Encoder levels R, R/2, ... with `channel_mult`; the input gets a constant ones channel; every encoder
    output is a skip; the decoder mp_cats a skip before each `block*`; out_conv with the learned out_gain.
    """

    def __init__(self, img_resolution, img_channels, label_dim, model_channels=192, channel_mult=[1, 2, 3, 4],
                 channel_mult_noise=None, channel_mult_emb=None, num_blocks=3, attn_resolutions=[16, 8],
                 label_balance=0.5, concat_balance=0.5, **block_kwargs):
        super().__init__()
        cblock = [model_channels * x for x in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        self.out_gain = torch.nn.Parameter(torch.zeros([]))

        # Embedding.
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, kernel=[])
        self.emb_label = MPConv(label_dim, cemb, kernel=[]) if label_dim != 0 else None

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = img_channels + 1
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                cin = cout
                cout = channels
                self.enc[f'{res}x{res}_conv'] = MPConv(cin, cout, kernel=[3, 3])
            else:
                self.enc[f'{res}x{res}_down'] = Block(cout, cout, cemb, flavor='enc', resample_mode='down',
                                                      **block_kwargs)
            for idx in range(num_blocks):
                cin = cout
                cout = channels
                self.enc[f'{res}x{res}_block{idx}'] = Block(cin, cout, cemb, flavor='enc',
                                                            attention=(res in attn_resolutions), **block_kwargs)

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        skips = [block.out_channels for block in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f'{res}x{res}_in0'] = Block(cout, cout, cemb, flavor='dec', attention=True, **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = Block(cout, cout, cemb, flavor='dec', **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = Block(cout, cout, cemb, flavor='dec', resample_mode='up',
                                                    **block_kwargs)
            for idx in range(num_blocks + 1):
                cin = cout + skips.pop()
                cout = channels
                self.dec[f'{res}x{res}_block{idx}'] = Block(cin, cout, cemb, flavor='dec',
                                                            attention=(res in attn_resolutions), **block_kwargs)
        self.out_conv = MPConv(cout, img_channels, kernel=[3, 3])

    def forward(self, x, noise_labels, class_labels):
        # Embedding.
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            emb = mp_sum(emb, self.emb_label(class_labels * np.sqrt(class_labels.shape[1])), t=self.label_balance)
        emb = mp_silu(emb)

        # Encoder.
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if 'conv' in name else block(x, emb)
            skips.append(x)

        # Decoder.
        for name, block in self.dec.items():
            if 'block' in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb)
        x = self.out_conv(x, gain=self.out_gain)
        return x

# ----------------------------------------------------------------------------------------------------
# Preconditioning and uncertainty estimation.


@record_init_kwargs
class Precond(torch.nn.Module):
    """EDM2 preconditioned denoiser D(x; sigma) = c_skip x + c_out F(c_in x; ln(sigma)/4), plus the learned
    uncertainty logvar(sigma) used by EDM2Loss.

    forward(x [N, C, R, R], sigma [N], [], or a number, class_labels [N, label_dim] or None, force_fp32=False,
    return_logvar=False) -> D float32 [N, C, R, R] (and logvar float32 [N or 1, 1, 1, 1] with return_logvar).
    The U-Net runs in fp16 with use_fp16 on CUDA (NVlabs rule) unless force_fp32, or in the dtype chosen at
    run time with set_compute_dtype (fp32/fp16/bf16, any device). No sigma_min/sigma_max/round_sigma:
    sample with edm_fast.sampling_edm2.edm2_sampler.
    """

    def __init__(self, img_resolution, img_channels, label_dim, use_fp16=True, sigma_data=0.5, logvar_channels=128,
                 **unet_kwargs):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_data = sigma_data
        self.unet = UNet(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim, **unet_kwargs)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])

    # The same input handling and run-time compute-dtype override as the EDM preconditioners.
    compute_dtype = _Precond.compute_dtype
    set_compute_dtype = _Precond.set_compute_dtype
    _prepare = _Precond._prepare

    def forward(self, x, sigma, class_labels=None, force_fp32=False, return_logvar=False, **unet_kwargs):
        x, sigma, class_labels = self._prepare(x, sigma, class_labels)
        dtype = self.compute_dtype(x, force_fp32)

        # Preconditioning weights.
        c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt()
        c_in = 1 / (self.sigma_data ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.flatten().log() / 4

        # Run the model.
        x_in = (c_in * x).to(dtype)
        F_x = self.unet(x_in, c_noise, class_labels, **unet_kwargs)
        D_x = c_skip * x + c_out * F_x.to(torch.float32)

        # Estimate uncertainty if requested.
        if return_logvar:
            logvar = self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)
            return D_x, logvar
        return D_x


def freeze_weights(module, *args, **kwargs):
    """Precompute every MPConv weight of an inference module as its forward uses it, so compiled code does no
    weight normalisation per call (the eval-mode cache serves eager calls only); returns `module`.

    One eager forward `module(*args, **kwargs)` (no grad) records each MPConv's input dtype and gain. A conv
    always called with one dtype and the same number as gain stores the final weight in that dtype (what
    the uncached path computes, bit for bit); one with a tensor gain (emb_linear, out_conv) or several dtypes
    stores the normalised fp32 weight and scales and casts it per call, as the uncached path does. The copies
    are non-persistent buffers (not in the state dict; `.to()` and memory-format changes apply to them). Meant
    for a private, frozen copy (edm_fast.fast.FastDenoiser does this): a later change of the parameters is not
    seen until `unfreeze_weights` or another freeze. Training mode ignores them.
    """
    convs = [m for m in module.modules() if isinstance(m, MPConv)]
    unfreeze_weights(module)
    uses = {m: set() for m in convs}

    def record(m, args, kwargs):
        gain = kwargs.get('gain', args[1] if len(args) > 1 else 1)
        number = isinstance(gain, (int, float)) and not isinstance(gain, bool)
        uses[m].add((args[0].dtype, float(gain) if number else None))

    hooks = [m.register_forward_pre_hook(record, with_kwargs=True) for m in convs]
    try:
        with torch.no_grad():
            module(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        for m in convs:
            w = normalize(m.weight.to(torch.float32))
            key = next(iter(uses[m])) if len(uses[m]) == 1 else None
            if key is not None and key[1] is not None:
                w = (w * (key[1] / np.sqrt(w[0].numel()))).to(key[0])
            else:
                key = None
            m.register_buffer('frozen_weight', w, persistent=False)
            m.frozen_key = key
    return module


def unfreeze_weights(module):
    """Drop the weights stored by `freeze_weights` (MPConv then normalises its parameter again)."""
    for m in module.modules():
        if isinstance(m, MPConv) and 'frozen_weight' in m._buffers:
            del m._buffers['frozen_weight']
            m.frozen_key = None
    return module


def clear_weight_caches(module):
    """Drop the eval-mode weight cache of every MPConv in `module` (frees the memory they hold)."""
    for m in module.modules():
        if isinstance(m, MPConv):
            m.clear_cache()
    return module
