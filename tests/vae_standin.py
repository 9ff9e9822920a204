"""A tiny stand-in for the Stable Diffusion VAE (diffusers AutoencoderKL interface), for tests that cannot
download the real one: encode(x)['latent_dist'] has .mean and .std [N, 4, H/8, W/8]; decode(z)['sample'] is
[N, 3, 8h, 8w]. Deterministic, and it records the inputs it was given."""

import types

import torch


class StandInVAE(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = torch.nn.Parameter(torch.randn(4, 3, generator=g))
        self.encoded = []  # inputs of encode()
        self.decoded = []  # inputs of decode()
        self.decode_value = None  # if set, decode() returns this constant image

    def encode(self, x):
        self.encoded.append(x.detach().clone())
        pooled = torch.nn.functional.avg_pool2d(x, 8)
        mean = torch.einsum('oc,nchw->nohw', self.proj, pooled) + 0.25
        std = torch.exp(-2 + pooled.mean(1, keepdim=True)).expand_as(mean) * torch.arange(1, 5).reshape(1, 4, 1, 1)
        return {'latent_dist': types.SimpleNamespace(mean=mean, std=std)}

    def decode(self, z):
        self.decoded.append(z.detach().clone())
        img = torch.nn.functional.interpolate(z[:, :3], scale_factor=8)
        if self.decode_value is not None:
            img = torch.full_like(img, self.decode_value)
        return {'sample': img}


def reference_raw_latents(vae, pixels):
    """What the StabilityVAEEncoder should store for uint8 pixels [N, 3, H, W]: cat(mean, std) of x / 255."""
    with torch.no_grad():
        d = StandInVAE.encode(vae, pixels.to(torch.float32) / 255)['latent_dist']
        vae.encoded.pop()
    return torch.cat([d.mean, d.std], dim=1)
