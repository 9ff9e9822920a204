"""Encoders between dataset pixels and the space an EDM2 network works in (spec §10.5; NVlabs
`training/encoders.py` names and semantics).

* `StandardRGBEncoder`: pixel-space models. encode: uint8 [N, 3, H, W] -> float32 x / 127.5 - 1;
  decode: float -> uint8 trunc(clip(127.5 x + 128, 0, 255)).
* `StabilityVAEEncoder`: latent-space models (img512 presets) on the Stable Diffusion VAE
  'stabilityai/sd-vae-ft-mse'. Datasets store the VAE's raw latent mean and std (8 channels);
  `encode_latents` samples mean + randn * std and maps each channel to final_std / raw_std scale and
  final_mean bias, which needs no VAE. `encode_pixels`/`decode` run the VAE itself, which edm_fast does not
  ship and cannot download: give a local copy (a diffusers AutoencoderKL directory) as `vae_name`, or a
  Hugging Face name already in the local Hugging Face cache, with the `diffusers` package installed, or
  these raise `VAEUnavailableError` saying so. As in NVlabs, the VAE sees pixels scaled to [0, 1] (not
  [-1, 1]) and its decoder output is read as [0, 1]: the raw_mean/raw_std statistics and every official
  EDM2 latent model assume exactly that.

Every encoder: encode(x) = encode_latents(encode_pixels(x)); init(device) does any lazy set-up.
"""

import abc
import os

import numpy as np
import torch

from .util import record_init_kwargs


class VAEUnavailableError(RuntimeError):
    """The Stable Diffusion VAE needed to encode pixels or decode latents is not available here."""


class Encoder(abc.ABC):
    """Base class: encode = encode_latents(encode_pixels(x)); decode maps network outputs to uint8 pixels."""

    def init(self, device):
        """Lazy set-up on `device` (nothing by default)."""

    def encode(self, x):
        return self.encode_latents(self.encode_pixels(x))

    @abc.abstractmethod
    def encode_pixels(self, x):
        """uint8 dataset pixels -> the encoder's raw representation."""

    @abc.abstractmethod
    def encode_latents(self, x):
        """Raw representation -> what the network is trained on."""

    @abc.abstractmethod
    def decode(self, x):
        """Network output -> uint8 pixels [N, C, H, W]."""

    def __repr__(self):
        args = ', '.join(f'{k}={v!r}' for k, v in getattr(self, 'init_kwargs', {}).items())
        return f'{type(self).__name__}({args})'


@record_init_kwargs
class StandardRGBEncoder(Encoder):
    """Pixel space: uint8 [N, 3, H, W] <-> float32 in [-1, 1]."""

    def __init__(self):
        super().__init__()

    def encode_pixels(self, x):
        """uint8 -> uint8 (identity)."""
        return x

    def encode_latents(self, x):
        """uint8 (or float pixel values) [N, C, H, W] -> float32 x / 127.5 - 1."""
        return x.to(torch.float32) / 127.5 - 1

    def decode(self, x):
        """float [N, C, H, W] -> uint8 trunc(clip(127.5 x + 128, 0, 255))."""
        return (x.to(torch.float32) * 127.5 + 128).clip(0, 255).to(torch.uint8)


@record_init_kwargs
class StabilityVAEEncoder(Encoder):
    """Latent space of the SD VAE: 8-channel raw latents (mean, std) -> 4-channel normalised latents.

    scale = final_std / raw_std and bias = final_mean - raw_mean * scale (float32 numpy arrays, as in NVlabs
    pickles, which store them). To encode pixels or decode, `vae_name` must be a local diffusers
    AutoencoderKL directory (or a name in the local Hugging Face cache); nothing is downloaded. A loaded
    VAE can also be given directly by setting `_vae` (any module whose encode(x)['latent_dist'] has .mean
    and .std, and whose decode(z)['sample'] is the image).
    """

    def __init__(self, vae_name='stabilityai/sd-vae-ft-mse', raw_mean=[5.81, 3.25, 0.12, -2.15],
                 raw_std=[4.17, 4.62, 3.71, 3.28], final_mean=0, final_std=0.5, batch_size=8):
        super().__init__()
        self.vae_name = vae_name
        self.scale = np.float32(final_std) / np.float32(raw_std)
        self.bias = np.float32(final_mean) - np.float32(raw_mean) * self.scale
        self.batch_size = int(batch_size)
        self._vae = None

    def __getstate__(self):
        return dict(self.__dict__, _vae=None)  # never pickle the VAE

    def init(self, device):
        if self._vae is None:
            self._vae = _load_vae(self.vae_name, device)
        else:
            self._vae.to(device)

    def _const(self, value, x):
        return torch.as_tensor(np.asarray(value, dtype=np.float32), device=x.device).reshape(1, -1, 1, 1)

    def encode_pixels(self, x):
        """uint8 [N, 3, H, W] -> raw latents float32 [N, 8, H/8, W/8] (mean and std of the VAE posterior).

        The VAE gets x / 255, i.e. [0, 1], as NVlabs (the raw_mean/raw_std defaults are statistics of that)."""
        self.init(x.device)
        x = x.to(torch.float32) / 255
        out = []
        for batch in x.split(self.batch_size):
            d = self._vae.encode(batch)['latent_dist']
            out.append(torch.cat([d.mean, d.std], dim=1))
        return torch.cat(out)

    def encode_latents(self, x):
        """Raw latents [N, 8, h, w] (mean, std) -> float32 [N, 4, h, w]: (mean + randn * std) * scale + bias."""
        mean, std = x.to(torch.float32).chunk(2, dim=1)
        x = mean + torch.randn_like(mean) * std
        x = x * self._const(self.scale, x)
        x = x + self._const(self.bias, x)
        return x

    def decode(self, x):
        """Latents [N, 4, h, w] -> uint8 RGB [N, 3, 8h, 8w]: trunc(255 clamp(VAE decoder output, 0, 1)).

        The decoder output is read as [0, 1], matching the [0, 1] input of encode_pixels (as NVlabs)."""
        self.init(x.device)
        x = x.to(torch.float32)
        x = x - self._const(self.bias, x)
        x = x / self._const(self.scale, x)
        x = torch.cat([self._vae.decode(batch)['sample'] for batch in x.split(self.batch_size)])
        return x.clamp(0, 1).mul(255).to(torch.uint8)


VAE_HINT = ('The Stable Diffusion VAE (stabilityai/sd-vae-ft-mse, a diffusers AutoencoderKL) is required to encode '
            'pixels or decode latents of a latent-space model. edm_fast cannot download it: download it yourself '
            '(the directory holds config.json and diffusion_pytorch_model.safetensors) and pass its local directory '
            '(sample.py --vae=<dir>, dataset_tool.py encode --model-url=<dir>, or '
            'StabilityVAEEncoder(vae_name=<dir>)), with the diffusers package installed.')


def _load_vae(vae_name, device):
    """The diffusers AutoencoderKL at the local directory `vae_name` (or in the local Hugging Face cache)."""
    vae_name = str(vae_name)
    is_dir = os.path.isdir(vae_name)
    try:
        from diffusers.models import AutoencoderKL
    except ImportError as e:
        where = '' if is_dir else f' vae_name={vae_name!r} is not a local directory either.'
        raise VAEUnavailableError(f'{VAE_HINT} The diffusers package is not installed ({e}).{where}') from e
    try:
        vae = AutoencoderKL.from_pretrained(vae_name, local_files_only=True)  # never downloads
    except Exception as e:  # diffusers/huggingface_hub raise several types for a missing or broken model
        where = f'{vae_name!r} could not be loaded as a diffusers AutoencoderKL' if is_dir else \
            f'vae_name={vae_name!r} is not a local directory, nor in the local Hugging Face cache'
        raise VAEUnavailableError(f'{VAE_HINT} {where} ({type(e).__name__}: {e}).') from e
    return vae.eval().requires_grad_(False).to(device)


ENCODER_TYPES = {'StandardRGBEncoder': StandardRGBEncoder, 'StabilityVAEEncoder': StabilityVAEEncoder}


def encoder_from_record(class_name, init_kwargs, state=None):
    """An edm_fast encoder for an NVlabs encoder record (class name, constructor kwargs, instance state).

    Stored scale/bias arrays in `state` are authoritative (they are what the model was trained with).
    """
    name = str(class_name).rsplit('.', 1)[-1]
    if name not in ENCODER_TYPES:
        raise ValueError(f'unknown encoder class {class_name!r}; expected one of {", ".join(ENCODER_TYPES)}')
    enc = ENCODER_TYPES[name](**dict(init_kwargs or {}))
    if state is not None and name == 'StabilityVAEEncoder':
        for key in ('scale', 'bias'):
            if key in state and state[key] is not None:
                setattr(enc, key, np.asarray(state[key], dtype=np.float32).copy())
    return enc
