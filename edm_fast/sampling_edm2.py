"""The EDM2 sampler with classifier-free guidance / autoguidance (spec §10.7; NVlabs generate_images.py).

Differences from the EDM sampler (edm_fast.sampling.edm_sampler), all NVlabs EDM2 behaviour:
* the state, the time steps and the denoiser outputs are in `dtype` (float32 by default, not float64);
* no round_sigma and no clamping of sigma_min/sigma_max to the network's range (EDM2 nets have none);
* the churn noise is drawn only when S_churn > 0 and S_min <= t <= S_max (no draw otherwise);
* guidance: D(x) = gnet(x).lerp(net(x), guidance); gnet is never called when guidance == 1.
The networks are called as net(x, t, labels) with t a 0-d tensor in `dtype`. Per-image noise comes from
`randn_like` (e.g. edm_fast.sampling.StackedRandomGenerator(...).randn_like), as in EDM.
"""

import numpy as np
import torch


def edm2_time_steps(num_steps=32, sigma_min=0.002, sigma_max=80, rho=7, dtype=torch.float32, device=None):
    """t_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho in `dtype`, then t_N = 0.

    Returns [num_steps + 1] (the arithmetic is in `dtype`, as NVlabs: float32 by default).
    """
    if int(num_steps) != num_steps or num_steps < 2:
        raise ValueError(f'num_steps must be an integer >= 2 (the step formula divides by num_steps - 1), '
                         f'got {num_steps}')
    step_indices = torch.arange(num_steps, dtype=dtype, device=device)
    t_steps = (sigma_max ** (1 / rho) + step_indices / (num_steps - 1) *
               (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t_steps, torch.zeros_like(t_steps[:1])])


def guided_denoiser(net, gnet, labels, guidance, dtype):
    """D(x, t) = net(x, t, labels) for guidance == 1, else gnet(x, t, labels).lerp(net(x, t, labels), guidance)."""
    if guidance != 1 and gnet is None:
        raise ValueError(f'guidance={guidance} needs a guiding network gnet (an unconditional or weaker model); '
                         f'pass gnet or use guidance=1')

    def denoise(x, t):
        Dx = net(x, t, labels).to(dtype)
        if guidance == 1:
            return Dx
        ref_Dx = gnet(x, t, labels).to(dtype)
        return ref_Dx.lerp(Dx, guidance)

    return denoise


def edm2_sampler(net, noise, labels=None, gnet=None, num_steps=32, sigma_min=0.002, sigma_max=80, rho=7, guidance=1,
                 S_churn=0, S_min=0, S_max=float('inf'), S_noise=1, dtype=torch.float32, randn_like=torch.randn_like):
    """Heun's 2nd-order sampler (EDM Algorithm 2) with EDM2 semantics; NFE = 2N - 1 per network.

    noise: standard-normal latents [B, C, H, W]; labels: [B, label_dim] one-hot or None (passed to both nets).
    Returns x_0 [B, C, H, W] in `dtype`. Call under torch.no_grad() for sampling.
    """
    denoise = guided_denoiser(net, gnet, labels, guidance, dtype)
    t_steps = edm2_time_steps(num_steps, sigma_min, sigma_max, rho, dtype, noise.device)

    # Main sampling loop.
    x_next = noise.to(dtype) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):  # 0, ..., N-1
        x_cur = x_next

        # Increase the noise level temporarily (only when churn is active: no draw otherwise).
        if S_churn > 0 and S_min <= t_cur <= S_max:
            gamma = min(S_churn / num_steps, np.sqrt(2) - 1)
            t_hat = t_cur + gamma * t_cur
            x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)
        else:
            t_hat = t_cur
            x_hat = x_cur

        # Euler step.
        d_cur = (x_hat - denoise(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur

        # Second-order correction, except on the last step (t_next = 0).
        if i < num_steps - 1:
            d_prime = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def nfe_per_image(num_steps=32, guidance=1):
    """Network evaluations per image: 2N - 1, doubled when a guiding network runs too (guidance != 1)."""
    return (2 * num_steps - 1) * (1 if guidance == 1 else 2)
