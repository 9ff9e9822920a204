"""The four EDM preconditioners (spec §2): D(x; sigma) = c_skip x + c_out F(c_in x; c_noise).

All share `forward(x, sigma, class_labels=None, force_fp32=False, **model_kwargs)` and expose
img_resolution, img_channels, label_dim, use_fp16, sigma_min, sigma_max, round_sigma(), as NVlabs.
Re-exported by edm_fast.networks.
"""

import numpy as np
import torch

from .util import record_init_kwargs


def _as_tensor(x):
    # torch.as_tensor(t) would move an existing CPU tensor under a `with torch.device(...)` context.
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(x)


def _build_model(model_type, **kwargs):
    from .networks import MODEL_TYPES
    if model_type not in MODEL_TYPES:
        raise ValueError(f'unknown model_type {model_type!r}; expected one of {sorted(MODEL_TYPES)}')
    return MODEL_TYPES[model_type](**kwargs)


class _Precond(torch.nn.Module):
    """Shared input handling and the c_skip/c_out/c_in/c_noise combination."""

    def _setup(self, img_resolution, img_channels, label_dim, use_fp16):
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16

    def compute_dtype(self, x, force_fp32=False):
        """Activation dtype of the inner U-Net: fp16 with use_fp16 on CUDA unless forced to fp32 (NVlabs), or
        the dtype chosen at run time with set_compute_dtype (e.g. bf16), which applies on any device."""
        if force_fp32:
            return torch.float32
        override = self.__dict__.get('_compute_dtype')
        if override is not None:
            return override
        return torch.float16 if (self.use_fp16 and x.device.type == 'cuda') else torch.float32

    def set_compute_dtype(self, dtype):
        """Run the U-Net body in `dtype` (fp32/fp16/bf16); None restores the use_fp16 rule. Parameters stay
        fp32 and this setting is not part of the state dict or the constructor arguments."""
        if dtype not in (None, torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f'compute dtype must be float32, float16, bfloat16 or None, got {dtype}')
        self.__dict__['_compute_dtype'] = dtype
        return self

    def _prepare(self, x, sigma, class_labels):
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        return x, sigma, class_labels

    def _run_model(self, x, c_in, c_noise, class_labels, force_fp32, model_kwargs):
        dtype = self.compute_dtype(x, force_fp32)
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        if F_x.dtype != dtype:
            raise RuntimeError(f'{type(self).__name__}: model returned {F_x.dtype}, expected {dtype}')
        return F_x

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)


@record_init_kwargs
class VPPrecond(_Precond):
    """Variance-preserving preconditioning (Song et al. 2021, DDPM++)."""

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, beta_d=19.9, beta_min=0.1,
                 M=1000, epsilon_t=1e-5, model_type='SongUNet', **model_kwargs):
        super().__init__()
        self._setup(img_resolution, img_channels, label_dim, use_fp16)
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        # fp32 torch arithmetic on the CPU, as NVlabs: sigma_min comes out as 2**-10.
        self.sigma_min = float(self.sigma(torch.as_tensor(epsilon_t, device='cpu')))
        self.sigma_max = float(self.sigma(torch.as_tensor(1, device='cpu')))
        self.model = _build_model(model_type, img_resolution=img_resolution, in_channels=img_channels,
                                  out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x, sigma, class_labels = self._prepare(x, sigma, class_labels)
        c_skip = 1
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = (self.M - 1) * self.sigma_inv(sigma)
        F_x = self._run_model(x, c_in, c_noise, class_labels, force_fp32, model_kwargs)
        return c_skip * x + c_out * F_x.to(torch.float32)

    def sigma(self, t):
        t = _as_tensor(t)
        return ((0.5 * self.beta_d * (t ** 2) + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma):
        sigma = _as_tensor(sigma)
        return ((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()).sqrt() - self.beta_min) / self.beta_d


@record_init_kwargs
class VEPrecond(_Precond):
    """Variance-exploding preconditioning (Song et al. 2021, NCSN++)."""

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0.02, sigma_max=100,
                 model_type='SongUNet', **model_kwargs):
        super().__init__()
        self._setup(img_resolution, img_channels, label_dim, use_fp16)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.model = _build_model(model_type, img_resolution=img_resolution, in_channels=img_channels,
                                  out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x, sigma, class_labels = self._prepare(x, sigma, class_labels)
        c_skip = 1
        c_out = sigma
        c_in = 1
        c_noise = (0.5 * sigma).log()
        F_x = self._run_model(x, c_in, c_noise, class_labels, force_fp32, model_kwargs)
        return c_skip * x + c_out * F_x.to(torch.float32)


@record_init_kwargs
class iDDPMPrecond(_Precond):
    """Improved-DDPM preconditioning (Nichol & Dhariwal 2021): discrete sigmas u[0..M], u[M] = 0."""

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, C_1=0.001, C_2=0.008, M=1000,
                 model_type='DhariwalUNet', **model_kwargs):
        super().__init__()
        self._setup(img_resolution, img_channels, label_dim, use_fp16)
        self.C_1 = C_1
        self.C_2 = C_2
        self.M = M
        self.model = _build_model(model_type, img_resolution=img_resolution, in_channels=img_channels,
                                  out_channels=img_channels * 2, label_dim=label_dim, **model_kwargs)
        u = torch.zeros(M + 1, device='cpu')  # fp32 recursion, as NVlabs: the values differ from an fp64 one
        for j in range(M, 0, -1):
            u[j - 1] = ((u[j] ** 2 + 1) / (self.alpha_bar(j - 1) / self.alpha_bar(j)).clip(min=C_1) - 1).sqrt()
        self.register_buffer('u', u)
        self.sigma_min = float(u[M - 1])
        self.sigma_max = float(u[0])

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x, sigma, class_labels = self._prepare(x, sigma, class_labels)
        c_skip = 1
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = self.M - 1 - self.round_sigma(sigma, return_index=True).to(torch.float32)
        F_x = self._run_model(x, c_in, c_noise, class_labels, force_fp32, model_kwargs)
        return c_skip * x + c_out * F_x[:, :self.img_channels].to(torch.float32)

    def alpha_bar(self, j):
        j = j if isinstance(j, torch.Tensor) else torch.as_tensor(j, device='cpu')
        return (0.5 * np.pi * j / self.M / (self.C_2 + 1)).sin() ** 2

    def round_sigma(self, sigma, return_index=False):
        """Snap sigma to the nearest entry of u (or return its index).

        Distances are evaluated as torch.cdist does for many candidates, ((-2s)u + s^2) + u^2 in fp32,
        clamped at 0, with the first minimum winning, so near-midpoint ties resolve as in NVlabs.
        """
        sigma = torch.as_tensor(sigma)
        s = sigma.to(self.u.device).to(torch.float32).reshape(-1, 1)
        u = self.u.reshape(1, -1)
        dist = ((-2 * s) * u + s * s) + u * u
        index = dist.clamp_min(0).argmin(1)
        result = index if return_index else self.u[index].to(sigma.dtype)
        return result.reshape(sigma.shape).to(sigma.device)


@record_init_kwargs
class EDMPrecond(_Precond):
    """EDM preconditioning (Karras et al. 2022, Table 1)."""

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0,
                 sigma_max=float('inf'), sigma_data=0.5, model_type='DhariwalUNet', **model_kwargs):
        super().__init__()
        self._setup(img_resolution, img_channels, label_dim, use_fp16)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data
        self.model = _build_model(model_type, img_resolution=img_resolution, in_channels=img_channels,
                                  out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x, sigma, class_labels = self._prepare(x, sigma, class_labels)
        c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt()
        c_in = 1 / (self.sigma_data ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        F_x = self._run_model(x, c_in, c_noise, class_labels, force_fp32, model_kwargs)
        return c_skip * x + c_out * F_x.to(torch.float32)
