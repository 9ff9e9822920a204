"""Training losses of EDM (spec §3): VPLoss, VELoss, EDMLoss.

Each is a callable plain object with the NVlabs signature `loss(net, images, labels, augment_pipe=None)`
returning the unreduced per-element loss [N, C, H, W]. Random draws happen in the NVlabs order (sigma,
then the augment pipe's draws, then the noise). For tests and exact replays the draws can be injected
with the keyword-only `rnd` (the uniform/normal [N,1,1,1] draw behind sigma) and `noise` (a
standard-normal tensor shaped like the images).
"""

import torch

from .util import record_init_kwargs


class _Loss:
    def _finish(self, net, images, labels, augment_pipe, sigma, weight, noise):
        y, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
        n = (torch.randn_like(y) if noise is None else noise.to(y.device, y.dtype)) * sigma
        D_yn = net(y + n, sigma, labels, augment_labels=augment_labels)
        return weight * ((D_yn - y) ** 2)

    def __repr__(self):
        args = ', '.join(f'{k}={v!r}' for k, v in self.init_kwargs.items())
        return f'{type(self).__name__}({args})'


def _draw(rnd, fn, images):
    if rnd is not None:
        return rnd.to(images.device, torch.float32).reshape(images.shape[0], 1, 1, 1)
    return fn([images.shape[0], 1, 1, 1], device=images.device)


@record_init_kwargs
class VPLoss(_Loss):
    """Loss of the VP formulation (Song et al. 2021): t ~ U(epsilon_t, 1), weight 1/sigma^2."""

    def __init__(self, beta_d=19.9, beta_min=0.1, epsilon_t=1e-5):
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.epsilon_t = epsilon_t

    def __call__(self, net, images, labels, augment_pipe=None, *, rnd=None, noise=None):
        rnd_uniform = _draw(rnd, torch.rand, images)
        sigma = self.sigma(1 + rnd_uniform * (self.epsilon_t - 1))
        weight = 1 / sigma ** 2
        return self._finish(net, images, labels, augment_pipe, sigma, weight, noise)

    def sigma(self, t):
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * (t ** 2) + self.beta_min * t).exp() - 1).sqrt()


@record_init_kwargs
class VELoss(_Loss):
    """Loss of the VE formulation: sigma log-uniform in [sigma_min, sigma_max], weight 1/sigma^2."""

    def __init__(self, sigma_min=0.02, sigma_max=100):
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def __call__(self, net, images, labels, augment_pipe=None, *, rnd=None, noise=None):
        rnd_uniform = _draw(rnd, torch.rand, images)
        sigma = self.sigma_min * ((self.sigma_max / self.sigma_min) ** rnd_uniform)
        weight = 1 / sigma ** 2
        return self._finish(net, images, labels, augment_pipe, sigma, weight, noise)


@record_init_kwargs
class EDMLoss(_Loss):
    """EDM loss: ln(sigma) ~ N(P_mean, P_std^2), weight (sigma^2 + sigma_data^2) / (sigma sigma_data)^2."""

    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def __call__(self, net, images, labels=None, augment_pipe=None, *, rnd=None, noise=None):
        rnd_normal = _draw(rnd, torch.randn, images)
        sigma = (rnd_normal * self.P_std + self.P_mean).exp()
        weight = (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
        return self._finish(net, images, labels, augment_pipe, sigma, weight, noise)


LOSS_TYPES = {'VPLoss': VPLoss, 'VELoss': VELoss, 'EDMLoss': EDMLoss}
