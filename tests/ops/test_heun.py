"""The fused Heun/Euler update: reference = the sampler's formulas; CUDA kernel = reference, bit for bit (on the
GPU, and on the CPU through the CUDA emulator, csrc/common/emulator/)."""

import struct

import numpy as np
import pytest
import torch

import cuda_emulator
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


# ---- the CUDA kernel source, run on the CPU by the emulator (csrc/common/emulator/, csrc/heun/emulator/) ----------

@pytest.fixture(scope='module')
def heun_emulator(tmp_path_factory):
    if cuda_emulator.compiler() is None:
        pytest.skip('no C++ compiler to build the kernel emulator')
    out = str(tmp_path_factory.mktemp('heun_emulator'))
    return cuda_emulator.build(out, 'heun_emulator', ['heun/emulator/heun_emulator.cc', 'heun/heun_kernels.cu'])


def _emulate(exe, tmp_path, x_hat, D, x_next, D2, t_hat, t_next):
    """heun_euler and heun_correct through the CUDA launchers and kernels on the emulator."""
    def raw(t):
        return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).contiguous().numpy().tobytes()

    n = x_hat.numel()
    code = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[D.dtype]
    path_in, path_out = tmp_path / 'heun_in.bin', tmp_path / 'heun_out.bin'
    path_in.write_bytes(struct.pack('<3q2d', 0x4E01, code, n, float(t_hat), float(t_next))
                        + raw(x_hat) + raw(D) + raw(x_next) + raw(D2))
    stdout = cuda_emulator.run(exe, path_in, path_out)
    out = torch.from_numpy(np.frombuffer(path_out.read_bytes(), dtype=np.float64).copy())
    return out[:n].reshape(x_hat.shape), out[n:].reshape(x_hat.shape), stdout


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16])
def test_emulated_cuda_kernel_is_bit_identical(heun_emulator, tmp_path, dtype):
    """The CUDA source (heun_kernels.cu) run on the CPU: bit-identical to the reference, as the GPU test asserts;
    1377 elements fill six 256-thread blocks, the last one partly; the 1x1x3x5 case steps to t_next = 0."""
    x_hat, D, x_next, D2, t_hat, t_next = _inputs('cpu', dtype)
    euler, correct, stdout = _emulate(heun_emulator, tmp_path, x_hat, D, x_next, D2, t_hat, t_next)
    assert stdout.count('launch grid=6 block=256') == 2, stdout
    assert torch.equal(euler, ops.heun_euler(x_hat, D, t_hat, t_next, backend='reference'))
    assert torch.equal(correct, ops.heun_correct(x_hat, x_next, D, D2, t_hat, t_next, backend='reference'))
    odd = _inputs('cpu', dtype, shape=(1, 1, 3, 5))
    euler, correct, _ = _emulate(heun_emulator, tmp_path, odd[0], odd[1], odd[2], odd[3], 3.0, 0.0)
    assert torch.equal(euler, ops.heun_euler(odd[0], odd[1], 3.0, 0.0, backend='reference'))
    assert torch.equal(correct, ops.heun_correct(odd[0], odd[2], odd[1], odd[3], 3.0, 0.0, backend='reference'))
