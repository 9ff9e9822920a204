"""EDM samplers (spec §4): the deterministic/stochastic Heun sampler of Algorithm 2, the ablation sampler
covering the VP/VE/iDDPM/EDM formulations, and per-seed random generators.

Sampler state is float64 as in NVlabs; the network sees x in float64 (the preconditioner casts it to fp32)
and sigma as a 0-d float64 tensor. `net` is anything with the preconditioner interface: callable as
net(x, sigma, class_labels) and exposing sigma_min, sigma_max and round_sigma().
"""


import numpy as np
import torch

from . import ops


def _check_steps(num_steps):
    if int(num_steps) != num_steps or num_steps < 2:
        raise ValueError(f'num_steps must be an integer >= 2 (the step formula divides by num_steps - 1), got {num_steps}')


def edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, device=None):
    """sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, float64 [N]."""
    _check_steps(num_steps)
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    return (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def edm_time_steps(net, num_steps=18, sigma_min=0.002, sigma_max=80, rho=7, device=None):
    """The t_steps of edm_sampler: the range clamped to the net's, rounded by net.round_sigma, then t_N = 0.

    Returns (t_steps float64 [N+1], resolved sigma_min, resolved sigma_max).
    """
    sigma_min = max(sigma_min, net.sigma_min)
    sigma_max = min(sigma_max, net.sigma_max)
    t_steps = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, device)
    t_steps = torch.cat([net.round_sigma(t_steps), torch.zeros_like(t_steps[:1])])
    return t_steps, sigma_min, sigma_max


def churn_gamma(S_churn, num_steps, S_min, S_max, sigma_cur):
    """gamma = min(S_churn / N, sqrt(2) - 1) inside [S_min, S_max] (inclusive), else 0."""
    return min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= sigma_cur <= S_max else 0


def edm_sampler(net, latents, class_labels=None, randn_like=torch.randn_like, num_steps=18, sigma_min=0.002,
                sigma_max=80, rho=7, S_churn=0, S_min=0, S_max=float('inf'), S_noise=1):
    """Algorithm 2 of the EDM paper: Heun's 2nd-order method with optional churn. NFE = 2N - 1.

    latents: [B, C, H, W] standard normal; returns x_0 in float64. `randn_like` is called once per step,
    even when gamma = 0, so per-seed noise streams stay aligned with NVlabs generate.py.
    """
    t_steps, _, _ = edm_time_steps(net, num_steps, sigma_min, sigma_max, rho, latents.device)
    x_next = latents.to(torch.float64) * t_steps[0]
    t_host = t_steps.tolist()  # the churn window test on the host: a device comparison would sync every step
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next

        # Increase the noise level temporarily (churn); the draw happens even when gamma is 0.
        gamma = churn_gamma(S_churn, num_steps, S_min, S_max, t_host[i])
        t_hat = net.round_sigma(t_cur + gamma * t_cur)  # NVlabs' rounding order (not t_cur * (1 + gamma))
        x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)

        # Euler step (ops.heun_*: the fp64 update, fused into one pass on GPUs, bit-identical to the formulas).
        denoised = net(x_hat, t_hat, class_labels)
        x_next = ops.heun_euler(x_hat, denoised, t_hat, t_next)

        # Second-order correction, except on the last step (t_next = 0).
        if i < num_steps - 1:
            denoised_next = net(x_next, t_next, class_labels)
            x_next = ops.heun_correct(x_hat, x_next, denoised, denoised_next, t_hat, t_next)
    return x_next

# ----------------------------------------------------------------------------------------------------
# Ablation sampler: every formulation of Table 1 / Figure 2 of the EDM paper.


def _vp_sigma(beta_d, beta_min, t):
    """sigma(t) = sqrt(e^(beta_d t^2 / 2 + beta_min t) - 1), written as powers (e ** x, then ** 0.5) for tensors and
    Python floats alike, as NVlabs writes it: exp() and sqrt() round differently in the last bit."""
    return (np.e ** (0.5 * beta_d * (t ** 2) + beta_min * t) - 1) ** 0.5


class _Schedule:
    """sigma(t), its derivative and inverse, and the scaling s(t) with its derivative."""

    def __init__(self, schedule, scaling, vp_beta_d, vp_beta_min):
        if schedule not in ('vp', 've', 'linear'):
            raise ValueError(f"schedule must be 'vp', 've' or 'linear', got {schedule!r}")
        if scaling not in ('vp', 'none'):
            raise ValueError(f"scaling must be 'vp' or 'none', got {scaling!r}")
        self.schedule, self.scaling = schedule, scaling
        self.beta_d, self.beta_min = vp_beta_d, vp_beta_min

    def sigma(self, t):
        if self.schedule == 'vp':
            return _vp_sigma(self.beta_d, self.beta_min, t)
        return t.sqrt() if self.schedule == 've' else t

    def sigma_deriv(self, t):
        if self.schedule == 'vp':
            return 0.5 * (self.beta_min + self.beta_d * t) * (self.sigma(t) + 1 / self.sigma(t))
        return 0.5 / t.sqrt() if self.schedule == 've' else 1

    def sigma_inv(self, sigma):
        if self.schedule == 'vp':
            return ((self.beta_min ** 2 + 2 * self.beta_d * (sigma ** 2 + 1).log()).sqrt() - self.beta_min) / self.beta_d
        return sigma ** 2 if self.schedule == 've' else sigma

    def s(self, t):
        return 1 / (1 + self.sigma(t) ** 2).sqrt() if self.scaling == 'vp' else 1

    def s_deriv(self, t):
        return -self.sigma(t) * self.sigma_deriv(t) * (self.s(t) ** 3) if self.scaling == 'vp' else 0

    def direction(self, t, x, denoised):
        """dx/dt of the probability-flow ODE at time t given D(x/s(t); sigma(t))."""
        sigma, s = self.sigma(t), self.s(t)
        return (self.sigma_deriv(t) / sigma + self.s_deriv(t) / s) * x - self.sigma_deriv(t) * s / sigma * denoised


def iddpm_u(M=1000, C_1=0.001, C_2=0.008, device=None):
    """The iDDPM sigma table in float64 storage; the alpha-bar ratios are fp32 as in NVlabs."""
    u = torch.zeros(M + 1, dtype=torch.float64, device=device)

    def alpha_bar(j):  # j: int64 tensor, so the arithmetic below promotes to fp32
        return (0.5 * np.pi * j / M / (C_2 + 1)).sin() ** 2
    for j in torch.arange(M, 0, -1, device=device):
        u[j - 1] = ((u[j] ** 2 + 1) / (alpha_bar(j - 1) / alpha_bar(j)).clip(min=C_1) - 1).sqrt()
    return u


def ablation_sigma_steps(net, num_steps=18, sigma_min=None, sigma_max=None, rho=7, discretization='edm',
                         epsilon_s=1e-3, C_1=0.001, C_2=0.008, M=1000, device=None):
    """Noise levels of the chosen discretisation, the resolved range and the derived VP betas.

    Returns (sigma_steps float64 [N], sigma_min, sigma_max, vp_beta_d, vp_beta_min).
    """
    _check_steps(num_steps)
    if discretization not in ('vp', 've', 'iddpm', 'edm'):
        raise ValueError(f"discretization must be 'vp', 've', 'iddpm' or 'edm', got {discretization!r}")
    if sigma_min is None:
        sigma_min = {'vp': _vp_sigma(19.9, 0.1, epsilon_s), 've': 0.02, 'iddpm': 0.002, 'edm': 0.002}[discretization]
    if sigma_max is None:
        sigma_max = {'vp': _vp_sigma(19.9, 0.1, 1.0), 've': 100, 'iddpm': 81, 'edm': 80}[discretization]
    sigma_min = max(sigma_min, net.sigma_min)
    sigma_max = min(sigma_max, net.sigma_max)

    # VP betas that reproduce the (clamped) range at t = epsilon_s and t = 1.
    vp_beta_d = 2 * (np.log(sigma_min ** 2 + 1) / epsilon_s - np.log(sigma_max ** 2 + 1)) / (epsilon_s - 1)
    vp_beta_min = np.log(sigma_max ** 2 + 1) - 0.5 * vp_beta_d

    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    if discretization == 'vp':
        t = 1 + i / (num_steps - 1) * (epsilon_s - 1)
        sigma_steps = _vp_sigma(vp_beta_d, vp_beta_min, t)
    elif discretization == 've':
        t = (sigma_max ** 2) * ((sigma_min ** 2 / sigma_max ** 2) ** (i / (num_steps - 1)))
        sigma_steps = t.sqrt()
    elif discretization == 'iddpm':
        u = iddpm_u(M, C_1, C_2, device)
        kept = u[torch.logical_and(u >= sigma_min, u <= sigma_max)]
        sigma_steps = kept[((len(kept) - 1) / (num_steps - 1) * i).round().to(torch.int64)]
    else:
        sigma_steps = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, device)
    return sigma_steps, sigma_min, sigma_max, vp_beta_d, vp_beta_min


def ablation_time_steps(net, schedule, sigma_steps):
    """t_i = sigma^-1(round_sigma(sigma_i)) followed by t_N = 0."""
    t_steps = schedule.sigma_inv(net.round_sigma(sigma_steps))
    return torch.cat([t_steps, torch.zeros_like(t_steps[:1])])


def ablation_sampler(net, latents, class_labels=None, randn_like=torch.randn_like, num_steps=18, sigma_min=None,
                     sigma_max=None, rho=7, solver='heun', discretization='edm', schedule='linear', scaling='none',
                     epsilon_s=1e-3, C_1=0.001, C_2=0.008, M=1000, alpha=1, S_churn=0, S_min=0,
                     S_max=float('inf'), S_noise=1):
    """Generalised sampler of the EDM paper's ablations (spec §4.2). NFE: N (euler) or 2N - 1 (heun)."""
    if solver not in ('euler', 'heun'):
        raise ValueError(f"solver must be 'euler' or 'heun', got {solver!r}")
    sigma_steps, sigma_min, sigma_max, vp_beta_d, vp_beta_min = ablation_sigma_steps(
        net, num_steps, sigma_min, sigma_max, rho, discretization, epsilon_s, C_1, C_2, M, latents.device)
    sch = _Schedule(schedule, scaling, vp_beta_d, vp_beta_min)
    t_steps = ablation_time_steps(net, sch, sigma_steps)

    t_next = t_steps[0]
    x_next = latents.to(torch.float64) * (sch.sigma(t_next) * sch.s(t_next))
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next

        # Churn: raise the noise level to sigma(t_hat), rescaling for the change of s(t).
        sigma_cur = sch.sigma(t_cur)
        gamma = churn_gamma(S_churn, num_steps, S_min, S_max, sigma_cur)
        t_hat = sch.sigma_inv(net.round_sigma(sigma_cur + gamma * sigma_cur))
        x_hat = sch.s(t_hat) / sch.s(t_cur) * x_cur + (sch.sigma(t_hat) ** 2 - sigma_cur ** 2).clip(min=0).sqrt() \
            * sch.s(t_hat) * S_noise * randn_like(x_cur)

        # Euler step.
        h = t_next - t_hat
        denoised = net(x_hat / sch.s(t_hat), sch.sigma(t_hat), class_labels).to(torch.float64)
        d_cur = sch.direction(t_hat, x_hat, denoised)
        t_prime = t_hat + alpha * h
        x_prime = x_hat + alpha * h * d_cur

        # Second-order correction.
        if solver == 'euler' or i == num_steps - 1:
            x_next = x_hat + h * d_cur
        else:
            denoised = net(x_prime / sch.s(t_prime), sch.sigma(t_prime), class_labels).to(torch.float64)
            d_prime = sch.direction(t_prime, x_prime, denoised)
            x_next = x_hat + h * ((1 - 1 / (2 * alpha)) * d_cur + 1 / (2 * alpha) * d_prime)
    return x_next


def nfe_per_image(num_steps=18, solver=None, **unused):
    """Network evaluations per image: N for the Euler ablation sampler, 2N - 1 for Heun."""
    return num_steps if solver == 'euler' else 2 * num_steps - 1

# ----------------------------------------------------------------------------------------------------
# Per-seed random numbers.


class StackedRandomGenerator:
    """One torch.Generator per image, seeded with seed % 2**32, so each image depends only on its seed.

    Draws are per image and stacked: independent of batch size, batch composition and world size, and
    bit-compatible with NVlabs generate.py on the same device type (CUDA Philox vs. CPU differ).
    """

    def __init__(self, device, seeds):
        self.generators = [torch.Generator(device).manual_seed(int(seed) % (1 << 32)) for seed in seeds]

    def _check(self, size):
        if size[0] != len(self.generators):
            raise ValueError(f'batch dimension {size[0]} != number of seeds {len(self.generators)}')

    def randn(self, size, **kwargs):
        self._check(size)
        return torch.stack([torch.randn(size[1:], generator=gen, **kwargs) for gen in self.generators])

    def randn_like(self, input):
        return self.randn(input.shape, dtype=input.dtype, layout=input.layout, device=input.device)

    def randint(self, *args, size, **kwargs):
        self._check(size)
        return torch.stack([torch.randint(*args, size=size[1:], generator=gen, **kwargs) for gen in self.generators])
