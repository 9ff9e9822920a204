"""edm_fast.ops.mp_attention (EDM2 attention): providers against the NVlabs vectors, each other and an fp64 truth.

CPU: the reference is the NVlabs edm2 computation (the edm2 vectors pin it, tests/test_edm2_vectors.py); the sdpa
provider matches it forward and backward, keeps the memory format, is no less accurate than the reference in
reduced precision, and reproduces the EDM2 block and network vectors; dispatch picks the reference on CPU.
GPU (marked `gpu`): the CUDA and SDPA providers at the attention shapes of the EDM2 presets, forward and backward,
fp16/bf16/fp32, NCHW and channels-last, within twice the reference's error against an fp64 truth plus a floor;
proof the kernel ran; a compiled EDM2 block without graph breaks.
"""

import math
import re

import pytest
import torch

import refvec
import test_edm2_vectors
from edm_fast import networks_edm2, ops
from edm_fast.ops import dispatch, reference
from ops.test_attention import EPS, interleave, max_err, split, to_format


def truth64(qkv, heads):
    """EDM2 attention in float64 (differentiable), from the definition: pixel-normalise q/k/v per head, then
    softmax(q.k / sqrt(d)) v; channels head-major."""
    q, k, v = (t.double() for t in split(qkv, heads))
    q, k, v = (t / (1e-4 + t.square().mean(dim=2, keepdim=True).sqrt()) for t in (q, k, v))
    s = torch.einsum('nhcq,nhck->nhqk', q, k) / math.sqrt(q.shape[2])
    out = torch.einsum('nhqk,nhck->nhcq', s.softmax(dim=-1), v)
    return out.reshape(qkv.shape[0], -1, *qkv.shape[2:])


def case(n, heads, d, h, w, dtype=torch.float32, fmt='nchw', seed=0, device='cpu', scale=1.0):
    g = torch.Generator(device=device).manual_seed(seed)
    parts = [torch.randn(n, heads, d, h, w, device=device, generator=g) * scale + 0.3 for _ in range(3)]
    qkv = to_format(interleave(*parts).to(dtype), fmt)
    grad_out = to_format(torch.randn(n, heads * d, h, w, device=device, generator=g).to(dtype), fmt)
    return qkv, grad_out


def fwd_bwd(qkv, heads, grad_out, backend):
    x = qkv.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
    out = ops.mp_attention(x, heads, backend=backend)
    out.backward(grad_out)
    return out.detach(), x.grad


def check_against_truth(what, got, ref, truth, dtype):
    """Error vs the fp64 truth at most twice the reference's at the same precision plus 2 ulps of max |truth|."""
    err, err_ref = max_err(got, truth), max_err(ref, truth)
    floor = 2 * EPS[dtype] * truth.abs().max().item()
    assert torch.isfinite(got.double()).all(), f'{what}: non-finite values'
    assert err <= 2 * err_ref + floor, f'{what}: error {err:.3g} > 2 x reference error {err_ref:.3g} + {floor:.3g}'


@pytest.fixture
def no_backend_env(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)


# ---- CPU ---------------------------------------------------------------------------------------------------

def test_reference_is_the_definition():
    qkv, _ = case(2, 3, 8, 4, 5)  # fp32 (NVlabs' normalize takes the norm in fp32, so no fp64 input)
    assert max_err(reference.mp_attention(qkv, 3), truth64(qkv, 3)) < 1e-5


def test_network_attention_calls_the_op(no_backend_env):
    qkv, _ = case(2, 2, 8, 4, 4)
    with ops.record_backends() as ran:
        out = networks_edm2.attention(qkv, 2)
    assert ran == {('mp_attention', 'reference'): 1}
    assert torch.equal(out, reference.mp_attention(qkv, 2))


@pytest.mark.parametrize('fmt', ['nchw', 'cl'])
@pytest.mark.parametrize('heads', [1, 2, 3])
def test_sdpa_matches_reference_fp32(heads, fmt):
    qkv, grad_out = case(2, heads, 16, 4, 6, fmt=fmt, seed=heads)
    ref_out, ref_grad = fwd_bwd(qkv, heads, grad_out, 'reference')
    out, grad = fwd_bwd(qkv, heads, grad_out, 'sdpa')
    assert out.shape == ref_out.shape and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last if fmt == 'cl' else torch.contiguous_format)
    assert max_err(out, ref_out) < 1e-5
    assert max_err(grad, ref_grad) < 1e-4 * ref_grad.abs().max().item()


def test_sdpa_bf16_no_less_accurate_than_reference():
    """In bf16 the reference rounds logits and softmax to bf16; SDPA keeps fp32 statistics: within the criterion."""
    qkv, grad_out = case(2, 2, 32, 8, 8, dtype=torch.bfloat16, scale=2.0)
    q64 = qkv.detach().double().requires_grad_(True)
    truth = truth64(q64, 2)
    truth.backward(grad_out.double())
    ref_out, ref_grad = fwd_bwd(qkv, 2, grad_out, 'reference')
    out, grad = fwd_bwd(qkv, 2, grad_out, 'sdpa')
    assert out.dtype == grad.dtype == torch.bfloat16
    check_against_truth('out', out, ref_out, truth.detach(), torch.bfloat16)
    check_against_truth('grad', grad, ref_grad, q64.grad, torch.bfloat16)


def test_auto_on_cpu_picks_reference_and_environment_overrides(no_backend_env, monkeypatch):
    qkv, _ = case(1, 1, 8, 2, 2)
    with ops.record_backends() as ran:
        ops.mp_attention(qkv, 1)
    assert ran == {('mp_attention', 'reference'): 1}
    monkeypatch.setenv(dispatch.ENV_VAR, 'mp_attention=sdpa')
    with ops.record_backends() as ran:
        ops.mp_attention(qkv, 1)
    assert ran[('mp_attention', 'sdpa')] == 1 and ran[('attention', 'sdpa')] == 1


def test_explicit_cuda_refuses_cpu_tensors():
    qkv, _ = case(1, 1, 8, 2, 2)
    with pytest.raises(RuntimeError, match='cuda'):
        ops.mp_attention(qkv, 1, backend='cuda')


ATTN_VECTORS = [f for f in refvec.files('edm2_') if re.match(r'edm2_(block|net|gnet)', f)]


@pytest.mark.parametrize('name', ATTN_VECTORS or ['<no vectors>'])
def test_edm2_vectors_through_sdpa(name, monkeypatch):
    """The EDM2 block and network vectors (all with attention) reproduced with attention served by SDPA, at
    their recorded tolerances."""
    refvec.require()
    monkeypatch.setenv(dispatch.ENV_VAR, 'mp_attention=sdpa')
    case_ = refvec.Case(name)
    heads = sum(m.num_heads > 0 for m in test_edm2_vectors.build_edm2(case_).modules()
                if isinstance(m, networks_edm2.Block))
    with ops.record_backends() as ran:
        test_edm2_vectors.CHECKERS[case_.kind](case_)
    assert ran[('mp_attention', 'reference')] == 0
    assert (ran[('mp_attention', 'sdpa')] > 0) == (heads > 0)  # edm2_gnet: 16 channels < 64 per head, no heads


# ---- GPU ---------------------------------------------------------------------------------------------------

gpu = pytest.mark.gpu

# Attention shapes of the EDM2 presets (64-channel heads): img64/img512 S at 16x16 (C 576) and 8x8 (C 768), XS
# (C 256 -> 4 heads at 16x16, 512 at 8x8 -> 8 heads); edm2-img32-xs at 16x16 and 8x8 (C 256). (name, N, heads, d, H, W)
PRESET_SHAPES = [
    ('img64s_16x16_b32', 32, 9, 64, 16, 16),
    ('img64s_8x8_b32', 32, 12, 64, 8, 8),
    ('img64xs_16x16_b64', 64, 4, 64, 16, 16),
    ('img64xs_8x8_b64', 64, 8, 64, 8, 8),
    ('img32xs_16x16_b128', 128, 4, 64, 16, 16),
]


@pytest.fixture(scope='module')
def cuda_ops():
    assert 'cuda' in dispatch.implementations('mp_attention'), 'edm_fast._C has no attention ops (not built?)'
    torch.backends.cuda.matmul.allow_tf32 = False
    return torch.ops.edm_fast


@gpu
@pytest.mark.parametrize('provider', ['cuda', 'sdpa'])
@pytest.mark.parametrize('fmt', ['nchw', 'cl'])
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize('shape', PRESET_SHAPES, ids=lambda s: s[0])
def test_cuda_preset_shapes(cuda_ops, shape, dtype, fmt, provider):
    _, n, heads, d, h, w = shape
    qkv, grad_out = case(n, heads, d, h, w, dtype=dtype, fmt=fmt, device='cuda')
    q64 = qkv.detach().double().requires_grad_(True)
    truth = truth64(q64, heads)
    truth.backward(grad_out.double())
    ref_out, ref_grad = fwd_bwd(qkv, heads, grad_out, 'reference')
    with ops.record_backends() as ran:
        out, grad = fwd_bwd(qkv, heads, grad_out, provider)
    assert ran[('mp_attention', provider)] == 1 and ran[('attention', provider)] == 1
    assert out.is_contiguous(memory_format=torch.channels_last if fmt == 'cl' else torch.contiguous_format)
    check_against_truth(f'{shape[0]} out', out, ref_out, truth.detach(), dtype)
    check_against_truth(f'{shape[0]} grad', grad, ref_grad, q64.grad, dtype)


@gpu
def test_cuda_auto_picks_kernel_for_short_sequences(cuda_ops, no_backend_env):
    qkv, _ = case(4, 4, 64, 8, 8, dtype=torch.float16, fmt='cl', device='cuda')
    with ops.record_backends() as ran:
        ops.mp_attention(qkv, 4)
    assert ran[('mp_attention', 'cuda')] == 1 and ran[('attention', 'cuda')] == 1


@gpu
def test_cuda_edm2_block_compiles_without_graph_breaks(cuda_ops, no_backend_env):
    torch.manual_seed(0)
    block = networks_edm2.Block(128, 128, 64, flavor='dec', attention=True).cuda().eval()
    x = torch.randn(4, 128, 8, 8, device='cuda').half().contiguous(memory_format=torch.channels_last)
    emb = torch.randn(4, 64, device='cuda')
    explained = torch._dynamo.explain(block)(x, emb)
    assert explained.graph_break_count == 0, explained.break_reasons
    with torch.no_grad():
        ref = block(x.float(), emb)
        got = torch.compile(block, fullgraph=True)(x, emb)
    assert max_err(got, ref) < 0.05 * ref.abs().max().item()


def test_gpu_tests_are_marked():
    """Every test that touches the GPU carries the gpu marker (so CPU CI skips them with a reason)."""
    source = open(__file__).read()
    for match in re.finditer(r'\n((?:@[^\n]*\n)*)def (test_cuda_\w+)', source):
        assert '@gpu' in match.group(1), match.group(2)
