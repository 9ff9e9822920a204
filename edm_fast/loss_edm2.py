"""EDM2 training loss with learned uncertainty weighting, and the EDM2 learning-rate schedule (spec §10.5).

`EDM2Loss(P_mean=-0.4, P_std=1.0, sigma_data=0.5)(net, images, labels=None)` returns the unreduced
per-element loss [N, C, H, W]: ln(sigma) ~ N(P_mean, P_std^2), weight (sigma^2 + sigma_data^2) /
(sigma sigma_data)^2, (D, logvar) = net(y + n, sigma, labels, return_logvar=True),
loss = weight / exp(logvar) * (D - y)^2 + logvar. No augmentation. The two random draws (the normal
[N,1,1,1] draw behind sigma, then the noise) happen in the NVlabs order and can be injected with the
keyword-only `rnd` and `noise`, like `edm_fast.loss`.
"""

import math

import torch

from .loss import _draw
from .util import record_init_kwargs


@record_init_kwargs
class EDM2Loss:
    """EDM2 loss (NVlabs `training.training_loop.EDM2Loss`)."""

    def __init__(self, P_mean=-0.4, P_std=1.0, sigma_data=0.5):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def __call__(self, net, images, labels=None, *, rnd=None, noise=None):
        """images: float32 [N, C, H, W] (already encoded); labels: [N, label_dim] or None.

        rnd: optional standard-normal draw [N] or [N,1,1,1]; noise: optional standard-normal tensor like images.
        Returns float32 [N, C, H, W].
        """
        rnd_normal = _draw(rnd, torch.randn, images)
        sigma = (rnd_normal * self.P_std + self.P_mean).exp()
        weight = (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
        noise = (torch.randn_like(images) if noise is None else noise.to(images.device, images.dtype)) * sigma
        denoised, logvar = net(images + noise, sigma, labels, return_logvar=True)
        loss = (weight / logvar.exp()) * ((denoised - images) ** 2) + logvar
        return loss

    def __repr__(self):
        args = ', '.join(f'{k}={v!r}' for k, v in self.init_kwargs.items())
        return f'EDM2Loss({args})'


def learning_rate_schedule(cur_nimg, batch_size, ref_lr=100e-4, ref_batches=70e3, rampup_Mimg=10):
    """Inverse-square-root decay after ref_batches batches, linear warm-up over rampup_Mimg million images.

    lr = ref_lr / sqrt(max(cur_nimg / (ref_batches batch_size), 1)) * min(cur_nimg / (rampup_Mimg 1e6), 1);
    ref_batches = 0 or rampup_Mimg = 0 switch the factor off. cur_nimg is the image count before the
    current batch (so lr = 0 on the very first step with warm-up). The presets pass ref_batches explicitly
    (70000 for img512, 35000 for img64). Returns a Python float.
    """
    lr = ref_lr
    if ref_batches > 0:
        lr /= math.sqrt(max(cur_nimg / (ref_batches * batch_size), 1))
    if rampup_Mimg > 0:
        lr *= min(cur_nimg / (rampup_Mimg * 1e6), 1)
    return lr


LOSS_TYPES = {'EDM2Loss': EDM2Loss}
