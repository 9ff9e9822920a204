"""StabilityVAEEncoder around a VAE, with a tiny stand-in for the SD VAE (the real one cannot be downloaded here):
NVlabs feeds the VAE pixels in [0, 1] and reads its decoder output as [0, 1]."""

import numpy as np
import torch

from edm_fast import encoders
from vae_standin import StandInVAE, reference_raw_latents


def test_vae_encoder_uses_the_nvlabs_pixel_range():
    enc = encoders.StabilityVAEEncoder(batch_size=2)
    vae = enc._vae = StandInVAE()
    pixels = torch.tensor(np.random.RandomState(0).randint(0, 256, [3, 3, 16, 16]), dtype=torch.uint8)
    pixels[:, :, 0, 0] = 0
    pixels[:, :, 0, 1] = 255
    raw = enc.encode_pixels(pixels)
    assert [x.shape[0] for x in vae.encoded] == [2, 1]  # batch_size
    assert torch.equal(torch.cat(vae.encoded), pixels.float() / 255)  # [0, 1], not [-1, 1]
    assert raw.shape == (3, 8, 2, 2) and torch.equal(raw, reference_raw_latents(vae, pixels))

    # decode: undo scale/bias, run the decoder, read its output as [0, 1]: trunc(255 * clamp(y, 0, 1)).
    z = torch.randn(3, 4, 2, 2)
    vae.decode_value = 0.5
    img = enc.decode(z)
    assert img.dtype == torch.uint8 and img.shape == (3, 3, 16, 16) and (img == 127).all()
    scale = torch.from_numpy(enc.scale).reshape(1, -1, 1, 1)
    bias = torch.from_numpy(enc.bias).reshape(1, -1, 1, 1)
    torch.testing.assert_close(torch.cat(vae.decoded), (z - bias) / scale, rtol=0, atol=0)
    for value, want in [(-0.2, 0), (1.7, 255), (0.999, 254), (0.1, 25)]:
        vae.decode_value = value
        assert (enc.decode(z[:1]) == want).all(), value
