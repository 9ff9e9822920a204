"""The fused Heun/Euler update: reference = the sampler's formulas; CUDA kernel = reference, bit for bit."""

import pytest
import torch

from edm_fast import ops


def _inputs(device, dtype, shape=(3, 3, 17, 9)):
    g = torch.Generator(device).manual_seed(0)
    x_hat = torch.randn(shape, generator=g, device=device, dtype=torch.float64) * 20
    D = (x_hat * 0.3 + torch.randn(shape, generator=g, device=device, dtype=torch.float64)).to(dtype)
    x_next = x_hat * 0.7
    D2 = (x_next * 0.5).to(dtype)
    return x_hat, D, x_next, D2, torch.tensor(12.91008238, dtype=torch.float64, device=device), \
        torch.tensor(8.400935309, dtype=torch.float64, device=device)


def test_reference_is_the_sampler_formula():
    x_hat, D, x_next, D2, t_hat, t_next = _inputs('cpu', torch.float32)
    d_cur = (x_hat - D.to(torch.float64)) / t_hat
    assert torch.equal(ops.heun_euler(x_hat, D, t_hat, t_next), x_hat + (t_next - t_hat) * d_cur)
    d_prime = (x_next - D2.to(torch.float64)) / t_next
    assert torch.equal(ops.heun_correct(x_hat, x_next, D, D2, t_hat, t_next),
                       x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime))


def test_cpu_takes_reference_and_cuda_refuses_cpu_tensors():
    x_hat, D, *_ = _inputs('cpu', torch.float32)
    with ops.record_backends() as rec:
        ops.heun_euler(x_hat, D, 2.0, 1.0)
    assert rec[('heun_euler', 'reference')] == 1
    with pytest.raises(RuntimeError, match='cuda'):
        ops.heun_euler(x_hat, D, 2.0, 1.0, backend='cuda')


@pytest.mark.gpu
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_kernel_is_bit_identical(dtype):
    x_hat, D, x_next, D2, t_hat, t_next = _inputs('cuda', dtype, shape=(512, 3, 32, 32))
    with ops.record_backends() as rec:
        a = ops.heun_euler(x_hat, D, t_hat, t_next, backend='cuda')
        b = ops.heun_correct(x_hat, x_next, D, D2, t_hat, t_next, backend='cuda')
    assert rec[('heun_euler', 'cuda')] == 1 and rec[('heun_correct', 'cuda')] == 1
    assert torch.equal(a, ops.heun_euler(x_hat, D, t_hat, t_next, backend='reference'))
    assert torch.equal(b, ops.heun_correct(x_hat, x_next, D, D2, t_hat, t_next, backend='reference'))
    odd = _inputs('cuda', dtype, shape=(1, 1, 3, 5))
    assert torch.equal(ops.heun_euler(odd[0], odd[1], 3.0, 0.0, backend='cuda'),
                       ops.heun_euler(odd[0], odd[1], 3.0, 0.0, backend='reference'))
