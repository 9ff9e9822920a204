"""edm_fast.ops.heun_euler / heun_correct: the EDM sampler's update, one pass over the fp64 state.

The reference evaluates exactly the expressions of Algorithm 2 as edm_fast.sampling always has; the CUDA
kernel (csrc/heun/) performs the same IEEE fp64 operations in the same order without FMA contraction, so
both backends give bit-identical states. Sampling only: no autograd.
"""

import torch

from .. import _ext
from . import dispatch


def _t(t, x):
    # 0-d float64 tensors on x's device, as the sampler passes them: on CUDA, dividing by a Python float would be
    # a multiplication by its reciprocal (a different rounding); a device tensor divides exactly, as the kernel.
    return t if isinstance(t, torch.Tensor) else torch.tensor(t, dtype=torch.float64, device=x.device)


def _reference_euler(x_hat, denoised, t_hat, t_next):
    t_hat, t_next = _t(t_hat, x_hat), _t(t_next, x_hat)
    d_cur = (x_hat - denoised.to(torch.float64)) / t_hat
    return x_hat + (t_next - t_hat) * d_cur


def _reference_correct(x_hat, x_next, denoised, denoised_next, t_hat, t_next):
    t_hat, t_next = _t(t_hat, x_hat), _t(t_next, x_hat)
    d_cur = (x_hat - denoised.to(torch.float64)) / t_hat
    d_prime = (x_next - denoised_next.to(torch.float64)) / t_next
    return x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)


def heun_euler(x_hat, denoised, t_hat, t_next, *, backend=None):
    """Euler step: x_hat + (t_next - t_hat) (x_hat - D) / t_hat.

    x_hat: float64 [B, C, H, W]; denoised: D(x_hat; t_hat) in fp32/fp16/bf16 or fp64; t_hat, t_next: 0-d float64
    tensors or floats. Returns float64.
    """
    _, impl = dispatch.select('heun_euler', backend, x_hat, denoised)
    return impl(x_hat, denoised, t_hat, t_next)


def heun_correct(x_hat, x_next, denoised, denoised_next, t_hat, t_next, *, backend=None):
    """Heun's second-order correction: x_hat + h (0.5 d(x_hat, D) + 0.5 d(x_next, D')), h = t_next - t_hat."""
    _, impl = dispatch.select('heun_correct', backend, x_hat, denoised, x_next, denoised_next)
    return impl(x_hat, x_next, denoised, denoised_next, t_hat, t_next)


dispatch.register('heun_euler', 'reference', _reference_euler)
dispatch.register('heun_correct', 'reference', _reference_correct)


def _cuda_supports(x_hat, denoised, *more):
    if not _ext.available():
        return f'the CUDA extension is unavailable: {_ext.reason()}'
    if x_hat.device.type != 'cuda':
        return 'tensors are not on a CUDA device'
    if x_hat.dtype != torch.float64 or any(t.dtype != torch.float64 for t in more[:1]):
        return 'the sampler state must be float64'
    if denoised.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f'denoised dtype {denoised.dtype} is not fp32/fp16/bf16'
    return None


if _ext.available() and hasattr(torch.ops.edm_fast, 'heun_euler'):
    @torch.library.register_fake('edm_fast::heun_euler')
    def _(x_hat, denoised, t_hat, t_next):
        return torch.empty_like(x_hat)

    @torch.library.register_fake('edm_fast::heun_correct')
    def _(x_hat, x_next, denoised, denoised_next, t_hat, t_next):
        return torch.empty_like(x_hat)

    def _cuda_euler(x_hat, denoised, t_hat, t_next):
        return torch.ops.edm_fast.heun_euler(x_hat.contiguous(), denoised.contiguous(), float(t_hat), float(t_next))

    def _cuda_correct(x_hat, x_next, denoised, denoised_next, t_hat, t_next):
        return torch.ops.edm_fast.heun_correct(x_hat.contiguous(), x_next.contiguous(), denoised.contiguous(),
                                               denoised_next.contiguous(), float(t_hat), float(t_next))

    dispatch.register('heun_euler', 'cuda', _cuda_euler, _cuda_supports)
    dispatch.register('heun_correct', 'cuda', _cuda_correct, _cuda_supports)
