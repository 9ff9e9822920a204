"""edm_fast.ops.attention: every provider against the NVlabs vectors and an fp64 truth, and the CUDA kernels.

CPU: the reference and sdpa providers (vectors, UNetBlock forward/backward, the qkv interleave, heads, layouts,
dispatch); the Python glue of the CUDA ops (fake kernels, autograd, opcheck, torch.compile) on a CPU stand-in
library with the same schemas; and the CUDA kernel source itself, run on the CPU by the emulator in
csrc/attention/emulator/ (AddressSanitizer on, shared memory and outputs poisoned with NaN).
GPU (marked `gpu`): the kernels at every attention shape of the preset networks and at awkward shapes, forward and
backward, fp16/bf16/fp32, NCHW and channels-last, against an fp64 truth with the project's criterion (error at
most twice PyTorch's reference at the same precision plus a small floor); opcheck; torch.compile of a UNetBlock.
"""

import copy
import importlib
import math
import os
import re
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

try:
    import refvec
except ImportError:  # tests/ is only on sys.path when pytest imported a module from there first
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import refvec
from edm_fast import _ext, networks, ops
from edm_fast.ops import dispatch, reference

attention_mod = importlib.import_module('edm_fast.ops.attention')  # the package re-exports the function by that name

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EPS = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7, torch.float32: 2.0 ** -23, torch.float64: 2.0 ** -52}


# ---- helpers: the interleave as the spec states it, and an fp64 truth -------------------------------------

def interleave(q, k, v):
    """q, k, v [N, heads, d, H, W] -> qkv [N, 3*heads*d, H, W] with channel head*3d + 3c + j (spec §1.6)."""
    n, heads, d, h, w = q.shape
    return torch.stack([q, k, v], dim=3).reshape(n, heads * d * 3, h, w)


def split(qkv, heads):
    """qkv [N, 3C, H, W] -> q, k, v [N, heads, d, T] (views of the interleave)."""
    n, c3, h, w = qkv.shape
    x = qkv.reshape(n, heads, c3 // (3 * heads), 3, h * w)
    return x[:, :, :, 0], x[:, :, :, 1], x[:, :, :, 2]


def truth64(qkv, heads):
    """Exact attention in float64 (differentiable): out [N, C, H, W] (head-major channels), lse [N*heads, T]."""
    q, k, v = (t.double() for t in split(qkv, heads))
    s = torch.einsum('nhcq,nhck->nhqk', q, k) / math.sqrt(q.shape[2])
    out = torch.einsum('nhqk,nhck->nhcq', s.softmax(dim=-1), v)
    return out.reshape(qkv.shape[0], -1, *qkv.shape[2:]), torch.logsumexp(s, dim=-1).reshape(-1, s.shape[2])


def to_format(x, fmt):
    return x.contiguous(memory_format=torch.channels_last if fmt == 'cl' else torch.contiguous_format)


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


ATTN_BLOCKS = [f for f in refvec.files('layer_unetblock') if 'attn' in f]


@pytest.fixture
def no_backend_env(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)


# ---- NVlabs vectors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', refvec.files('layer_attention_op') or ['<no vectors>'])
def test_sdpa_matches_attention_op_vectors(name):
    """SDPA with v = identity returns the softmax weights, so its forward and backward are NVlabs' AttentionOp."""
    case = refvec.Case(name)
    q, k = case.t('in/q'), case.t('in/k')  # [B, c, Q], [B, c, K]
    qs = q.transpose(1, 2)[:, None].detach().requires_grad_(True)  # [B, 1, Q, c]
    ks = k.transpose(1, 2)[:, None].detach().requires_grad_(True)
    eye = torch.eye(k.shape[2], dtype=q.dtype).expand(q.shape[0], 1, -1, -1)
    w = attention_mod.sdpa(qs, ks, eye, 1 / math.sqrt(q.shape[1]), 'math')[:, 0]
    assert w.dtype == q.dtype
    case.check('w', w)
    w.backward(case.t('in/dw'))
    case.check('dq', qs.grad[:, 0].transpose(1, 2))
    case.check('dk', ks.grad[:, 0].transpose(1, 2))


@pytest.mark.parametrize('name', ATTN_BLOCKS or ['<no vectors>'])
def test_unetblock_vectors_through_sdpa(name, monkeypatch):
    case = refvec.Case(name)
    net = refvec.build_net(case)
    monkeypatch.setenv(dispatch.ENV_VAR, 'attention=sdpa')
    with ops.record_backends() as ran, torch.no_grad():
        y = net(case.t('in/x'), case.t('in/emb'))
    case.check('y', y)
    assert ran[('attention', 'sdpa')] == 1 and ran[('attention', 'reference')] == 0, ran


def _block_grads(net, x, emb, w_out, dtype):
    net = copy.deepcopy(net).to(dtype)
    x = x.to(dtype).requires_grad_(True)
    (net(x, emb.to(dtype)) * w_out.to(dtype)).sum().backward()
    return [('x', x.grad)] + [(n, p.grad) for n, p in net.named_parameters()]


@pytest.mark.parametrize('name', ATTN_BLOCKS or ['<no vectors>'])
def test_unetblock_backward_sdpa_vs_reference(name, monkeypatch):
    """Gradients of the block input and every parameter, fp32, sdpa vs reference, both against an fp64 truth.

    The truth runs the block in float64 with the sdpa provider (NVlabs' AttentionOp always computes in fp32, so the
    reference cannot be the truth). Both fp32 paths differ from the truth only by fp32 rounding in different
    summation orders, so sdpa's error must be within 2x the reference's plus 8 fp32 ulps of the largest gradient
    (the project's criterion for fast paths).
    """
    case = refvec.Case(name)
    net = refvec.build_net(case)
    x, emb = case.t('in/x'), case.t('in/emb')
    w_out = torch.randn(case.d['out/y'].shape, generator=torch.Generator().manual_seed(0))
    monkeypatch.setenv(dispatch.ENV_VAR, 'attention=sdpa')
    truth = _block_grads(net, x, emb, w_out, torch.float64)
    with ops.record_backends() as ran:
        fast = _block_grads(net, x, emb, w_out, torch.float32)
    assert ran[('attention', 'sdpa')] == 1 and ran[('attention', 'reference')] == 0, ran
    monkeypatch.setenv(dispatch.ENV_VAR, 'attention=reference')
    ref = _block_grads(net, x, emb, w_out, torch.float32)
    for (pname, t), (_, a), (_, b) in zip(truth, fast, ref):
        err_fast, err_ref = max_err(a, t), max_err(b, t)
        floor = 8 * EPS[torch.float32] * t.abs().max().item()
        assert err_fast <= 2 * err_ref + floor, f'{name} d/d{pname}: sdpa error {err_fast:.3g} vs reference {err_ref:.3g}'
    # The attention branch matters for these gradients (a test that could not fail proves nothing).
    qkv_grad = dict(truth)['qkv.weight']
    assert qkv_grad.abs().max() > 1e-3


# ---- the interleave, heads, layouts -----------------------------------------------------------------------

def _qkv_parts(n, heads, d, h, w, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, heads, d, h, w, generator=g, dtype=dtype)
    k = torch.randn(n, heads, d, h, w, generator=g, dtype=dtype) * 1.5
    v = torch.randn(n, heads, d, h, w, generator=g, dtype=dtype) + 3.0  # offset: a q/k slot read as v shows
    return q, k, v


def _attention_from_parts(q, k, v):
    """Per-head attention straight from q, k, v [N, heads, d, H, W] -> [N, heads*d, H, W] (independent of split())."""
    n, heads, d, h, w = q.shape
    qf, kf, vf = (t.reshape(n, heads, d, h * w) for t in (q, k, v))
    p = (torch.einsum('nhcq,nhck->nhqk', qf, kf) / math.sqrt(d)).softmax(-1)
    return torch.einsum('nhqk,nhck->nhcq', p, vf).reshape(n, heads * d, h, w)


PROVIDERS_CPU = ['reference', 'sdpa']


@pytest.mark.parametrize('provider', PROVIDERS_CPU)
@pytest.mark.parametrize('heads', [1, 2, 3])
@pytest.mark.parametrize('fmt', ['nchw', 'cl'])
def test_interleave_heads_and_layouts(provider, heads, fmt):
    q, k, v = _qkv_parts(2, heads, 8, 3, 5)
    truth = _attention_from_parts(q, k, v)
    qkv = to_format(interleave(q, k, v).float(), fmt)
    with ops.record_backends() as ran:
        out = ops.attention(qkv, heads, backend=provider)
    assert ran[('attention', provider)] == 1
    assert out.shape == truth.shape and out.dtype == torch.float32
    assert max_err(out, truth) < 2e-5 * truth.abs().max().item()
    if provider == 'sdpa':  # the fast providers keep the memory format
        assert out.is_contiguous(memory_format=torch.channels_last if fmt == 'cl' else torch.contiguous_format)
    # The same numbers laid out as [Q | K | V] blocks must give something else: the test can tell layouts apart.
    blocked = torch.cat([q, k, v], dim=1).reshape(2, -1, 3, 5).float()
    assert max_err(ops.attention(blocked, heads, backend=provider), truth) > 0.1


@pytest.mark.parametrize('provider', PROVIDERS_CPU)
def test_constant_v_passes_through_in_head_major_order(provider):
    """With v constant over tokens every softmax row averages it back: out[n, h*d + c] == v[n, h, c]."""
    q, k, _ = _qkv_parts(2, 3, 8, 4, 4, seed=1)
    vals = torch.arange(2 * 3 * 8, dtype=torch.float64).reshape(2, 3, 8, 1, 1)
    v = vals.expand(2, 3, 8, 4, 4)
    out = ops.attention(interleave(q, k, v), 3, backend=provider)
    assert max_err(out, vals.reshape(2, 24, 1, 1).expand_as(out)) < 1e-5 * vals.max().item()


@pytest.mark.parametrize('provider', PROVIDERS_CPU)
def test_zero_q_averages_v(provider):
    """q = 0 makes every weight 1/T: out = mean of v over tokens (k must not leak into the result)."""
    _, k, v = _qkv_parts(1, 2, 8, 3, 3, seed=2)
    out = ops.attention(interleave(torch.zeros_like(k), k, v), 2, backend=provider)
    want = v.reshape(1, 16, 9).mean(-1, keepdim=True).reshape(1, 16, 1, 1).expand(1, 16, 3, 3)
    assert max_err(out, want) < 1e-5


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_sdpa_dtypes_follow_input(dtype):
    qkv = interleave(*_qkv_parts(1, 2, 16, 4, 4, seed=3)).to(dtype)
    out = ops.attention(qkv, 2, backend='sdpa')
    assert out.dtype == dtype
    truth = truth64(qkv, 2)[0]  # from the rounded inputs: only the computation's own rounding is measured
    assert max_err(out, truth) < 8 * EPS[dtype] * truth.abs().max().item()


# ---- dispatch ---------------------------------------------------------------------------------------------

def test_auto_on_cpu_picks_reference(no_backend_env):
    qkv = torch.randn(1, 48, 4, 4)
    with ops.record_backends() as ran:
        ops.attention(qkv, 1)
    assert ran == {('attention', 'reference'): 1}


def test_environment_selects_sdpa_on_cpu(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, 'auto,attention=sdpa')
    with ops.record_backends() as ran:
        ops.attention(torch.randn(1, 48, 4, 4), 2)
    assert ran == {('attention', 'sdpa'): 1}


def test_sdpa_backend_argument(no_backend_env):
    qkv = torch.randn(1, 48, 4, 4)
    with ops.record_backends() as ran:
        out = ops.attention(qkv, 2, sdpa_backend='math')
    assert ran == {('attention', 'sdpa'): 1}
    assert max_err(out, ops.attention(qkv, 2, backend='reference')) < 1e-5
    with pytest.raises(ValueError, match='unknown sdpa_backend'):
        ops.attention(qkv, 2, sdpa_backend='fastest')
    with pytest.raises(ValueError, match='needs backend'):
        ops.attention(qkv, 2, backend='reference', sdpa_backend='math')


def test_explicit_cuda_refuses_cpu_tensors():
    with pytest.raises(RuntimeError, match="backend 'cuda'"):
        ops.attention(torch.randn(1, 48, 4, 4), 1, backend='cuda')
    assert 'CUDA tensor' in attention_mod.cuda_supports(torch.randn(1, 48, 4, 4), 1)


class _FakeCudaTensor:
    """Just what cuda_supports() looks at, for a CUDA tensor on a machine without one."""

    def __init__(self, *shape, dtype=torch.float16):
        self.shape, self.dtype, self.device = torch.Size(shape), dtype, torch.device('cuda', 0)

    def dim(self):
        return len(self.shape)


def test_kernel_support_reasons():
    assert 'multiple of 8' in attention_mod.cuda_supports(_FakeCudaTensor(1, 36, 4, 4), 1)  # d = 12
    assert 'multiple of 8' in attention_mod.cuda_supports(_FakeCudaTensor(1, 3 * 264, 4, 4), 1)  # d = 264
    assert 'divisible' in attention_mod.cuda_supports(_FakeCudaTensor(1, 50, 4, 4), 1)
    assert 'dtype' in attention_mod.cuda_supports(_FakeCudaTensor(1, 48, 4, 4, dtype=torch.float64), 1)
    assert '[N, 3C, H, W]' in attention_mod.cuda_supports(_FakeCudaTensor(48, 4, 4), 1)


def test_auto_order_is_set():
    assert dispatch._auto_order['attention'] == ('cuda', 'sdpa', 'reference')


def test_schemas_match_registration():
    text = open(os.path.join(REPO, 'csrc', 'registration.cpp')).read()
    section = text[text.index('// ---- attention (csrc/attention/) ----'):text.index('// ---- end attention ----')]
    for schema in (attention_mod.FWD_SCHEMA, attention_mod.BWD_SCHEMA):
        assert f'm.def("{schema}");' in section, schema


# ---- the Python glue of the CUDA ops, on a CPU stand-in library with the same schemas ------------------------

STAND_IN = 'edm_fast_attention_cpu_stand_in'


def _stand_in_fwd(qkv, num_heads):
    out, lse = truth64(qkv, num_heads)
    return out.to(qkv.dtype).contiguous(memory_format=attention_mod._out_memory_format(qkv)), lse.float()


def _stand_in_bwd(grad_out, qkv, out, lse, num_heads):
    """The kernels' recomputation scheme in float64: P from the saved lse, delta from the saved output."""
    q, k, v = (t.double() for t in split(qkv, num_heads))
    n, heads, d, t_len = q.shape
    do = grad_out.double().reshape(n, heads, d, t_len)
    p = (torch.einsum('nhcq,nhck->nhqk', q, k) / math.sqrt(d) - lse.double().reshape(n, heads, t_len, 1)).exp()
    delta = (do * out.double().reshape(n, heads, d, t_len)).sum(2)  # [n, heads, T]
    dv = torch.einsum('nhqk,nhcq->nhck', p, do)
    ds = p * (torch.einsum('nhcq,nhck->nhqk', do, v) - delta[..., None])
    dq = torch.einsum('nhqk,nhck->nhcq', ds, k) / math.sqrt(d)
    dk = torch.einsum('nhqk,nhcq->nhck', ds, q) / math.sqrt(d)
    grad = torch.stack([dq, dk, dv], dim=3).reshape(qkv.shape)
    return grad.to(qkv.dtype).contiguous(memory_format=attention_mod._out_memory_format(qkv))


@pytest.fixture(scope='module')
def stand_in():
    if not hasattr(stand_in, 'lib'):  # a namespace can be defined once per process
        lib = torch.library.Library(STAND_IN, 'DEF')
        lib.define(attention_mod.FWD_SCHEMA)
        lib.define(attention_mod.BWD_SCHEMA)
        lib.impl('attention_fwd', _stand_in_fwd, 'CPU')
        lib.impl('attention_bwd', _stand_in_bwd, 'CPU')
        attention_mod.register_op_glue(STAND_IN)
        stand_in.lib = lib
    return getattr(torch.ops, STAND_IN)


@pytest.mark.parametrize('fmt', ['nchw', 'cl'])
def test_glue_autograd_matches_fp64_truth(stand_in, fmt):
    qkv = to_format(torch.randn(2, 3 * 2 * 8, 3, 4, dtype=torch.float64), fmt).requires_grad_(True)
    out, lse = stand_in.attention_fwd(qkv, 2)
    assert not lse.requires_grad and out.requires_grad
    assert out.is_contiguous(memory_format=torch.channels_last if fmt == 'cl' else torch.contiguous_format)
    grad_out = torch.randn_like(out)
    (g,) = torch.autograd.grad(out, qkv, grad_out)
    qkv_t = qkv.detach().clone().requires_grad_(True)
    (g_t,) = torch.autograd.grad(truth64(qkv_t, 2)[0], qkv_t, grad_out)
    # The only rounding on this path is the saved lse, float32 by the op's contract: P = exp(S - lse) is then off
    # by about one fp32 ulp of lse, relatively.
    assert max_err(g, g_t) < 1e-6 * g_t.abs().max().item() and g_t.abs().max() > 1e-3


@pytest.mark.parametrize('fmt', ['nchw', 'cl'])
def test_glue_opcheck(stand_in, fmt):
    qkv = to_format(torch.randn(2, 3 * 2 * 8, 3, 4), fmt)
    torch.library.opcheck(stand_in.attention_fwd.default, (qkv.requires_grad_(True), 2))
    out, lse = stand_in.attention_fwd(qkv.detach(), 2)
    torch.library.opcheck(stand_in.attention_bwd.default, (torch.randn_like(out), qkv.detach(), out, lse, 2))


def test_glue_compiles_without_graph_breaks(stand_in):
    def f(qkv):
        out, _ = stand_in.attention_fwd(qkv, 2)
        return (out * out).sum()

    qkv = to_format(torch.randn(2, 48, 4, 4), 'cl')
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend='aot_eager')
    a = qkv.clone().requires_grad_(True)
    b = qkv.clone().requires_grad_(True)
    compiled(a).backward()
    f(b).backward()
    assert max_err(a.grad, b.grad) < 1e-5


# ---- the CUDA kernel source, run on the CPU by the emulator -------------------------------------------------

EMU_DIR = os.path.join(REPO, 'csrc', 'attention')
LOAD_GENERIC, LOAD_TOKEN_VEC, LOAD_CHAN_VEC = 0, 1, 2
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@pytest.fixture(scope='session')
def emulator(tmp_path_factory):
    cxx = os.environ.get('CXX') or shutil.which('g++')
    if cxx is None:
        pytest.skip('no C++ compiler to build the kernel emulator')
    exe = str(tmp_path_factory.mktemp('attention_emulator') / 'attention_emulator')
    cmd = [cxx, '-std=c++20', '-O0', '-pthread', '-fsanitize=address', '-DEDM_ATTN_EMULATE',
           f'-I{os.path.join(REPO, "csrc")}', os.path.join(EMU_DIR, 'emulator', 'attention_emulator.cc'), '-o', exe]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f'emulator build failed:\n{proc.stderr[-5000:]}'
    return exe


def _storage(x, fmt, offset):
    """Flat storage of x in a layout, with `offset` leading padding elements, and the (n, c, t) strides."""
    n, c, h, w = x.shape
    if fmt == 'nchw':
        flat, strides = x.contiguous().reshape(-1), (c * h * w, h * w, 1)
    else:
        flat, strides = x.permute(0, 2, 3, 1).contiguous().reshape(-1), (h * w * c, 1, c)
    return torch.cat([torch.zeros(offset, dtype=x.dtype), flat]), strides


def _unstorage(flat, offset, shape, fmt):
    n, c, h, w = shape
    x = flat[offset:offset + n * c * h * w]
    return x.reshape(n, c, h, w) if fmt == 'nchw' else x.reshape(n, h, w, c).permute(0, 3, 1, 2)


def _bytes(t):
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()


def _from_bytes(b, dtype, count):
    if dtype == torch.bfloat16:
        return torch.from_numpy(np.frombuffer(b, dtype=np.int16, count=count).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.frombuffer(b, dtype={torch.float32: np.float32, torch.float16: np.float16}[dtype],
                                          count=count).copy())


def load_modes(strides, offset, elem_size, d, t_len):
    """Loader modes valid for a tensor (csrc/attention/attention.cpp load_mode; storage bases are 16-byte aligned)."""
    modes = [LOAD_GENERIC]
    if elem_size == 2 and (offset * elem_size) % 16 == 0 and strides[0] % 8 == 0:
        if strides[2] == 1 and t_len % 8 == 0 and strides[1] % 8 == 0:
            modes.append(LOAD_TOKEN_VEC)
        if strides[1] == 1 and d % 8 == 0 and strides[2] % 8 == 0:
            modes.append(LOAD_CHAN_VEC)
    return modes


def run_emulator(exe, tmp_path, op, qkv, heads, fmt, offset=0, qkv_mode=0, dout_mode=0, out=None, dout=None,
                 lse=None, dout_fmt=None):
    n, c3, h, w = qkv.shape
    c, t_len = c3 // 3, h * w
    es = qkv.element_size()
    q_flat, q_strides = _storage(qkv, fmt, offset)
    out_strides = (c * t_len, t_len, 1) if fmt == 'nchw' else (t_len * c, 1, c)
    header = [0xA77E, op, DTYPE_CODE[qkv.dtype], n, heads, c // heads, t_len, qkv_mode, dout_mode]
    header += [*q_strides, q_flat.numel(), offset, *out_strides, n * c * t_len, 0]
    payload = _bytes(q_flat)
    if op == 1:
        d_flat, d_strides = _storage(dout, dout_fmt or fmt, 0)
        header += [*d_strides, d_flat.numel(), 0]
        payload += _bytes(_storage(out, fmt, 0)[0]) + _bytes(d_flat) + lse.float().contiguous().numpy().tobytes()
    else:
        header += [0] * 5
    header += [*q_strides, q_flat.numel(), offset]  # grad_qkv: qkv's layout
    path_in, path_out = tmp_path / 'emu_in.bin', tmp_path / 'emu_out.bin'
    path_in.write_bytes(struct.pack(f'<{len(header)}q', *header) + payload)
    env = dict(os.environ, ASAN_OPTIONS='detect_leaks=0:abort_on_error=0')
    proc = subprocess.run([exe, str(path_in), str(path_out)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f'emulated kernel failed (rc {proc.returncode}):\n{proc.stderr[-6000:]}'
    raw = path_out.read_bytes()
    if op == 0:
        count = n * c * t_len
        o = _unstorage(_from_bytes(raw[:count * es], qkv.dtype, count), 0, (n, c, h, w), fmt)
        return o, torch.from_numpy(np.frombuffer(raw[count * es:], dtype=np.float32).copy()).reshape(n * heads, t_len)
    return _unstorage(_from_bytes(raw, qkv.dtype, q_flat.numel()), offset, qkv.shape, fmt)


def _check_against_truth(what, got, ref, truth, dtype, scale=None):
    """The project's criterion: error vs the fp64 truth <= 2 x PyTorch's reference at the same precision + floor.

    The floor is 2 ulps of the largest value the computation handles: `scale` when given (for dq/dk, whose
    rounding comes from dO.v-sized terms even where the true dq is exactly 0, e.g. a single key), else |truth|.
    """
    err, err_ref = max_err(got, truth), max_err(ref, truth)
    floor = 2 * EPS[dtype] * max(truth.abs().max().item(), 0.0 if scale is None else scale)
    assert torch.isfinite(got.double()).all(), f'{what}: non-finite values'
    assert err <= 2 * err_ref + floor, f'{what}: error {err:.3g} > 2 x reference error {err_ref:.3g} + {floor:.3g}'


def _reference_fwd_bwd(qkv, heads, grad_out):
    """NVlabs numerics at the input precision (ops/reference.py), forward and autograd backward."""
    x = qkv.detach().clone().requires_grad_(True)
    out = reference.attention(x, heads)
    out.backward(grad_out)
    return out.detach(), x.grad


# (dtype, N, C, heads, H, W, qkv layout, storage offset, grad_out layout, logit scale): together these run every
# loader (generic / token-vector / channel-vector), padded head dims 64/128/256 including the two-chunk backward
# (d > 128), several key tiles (online-softmax rescaling), partial tiles, and peaky logits. Kept small: the
# emulation runs every thread of every CTA on the CPU. EMULATED_CASES_SLOW (--runslow) adds larger ones.
EMULATED_CASES = [
    (torch.float16, 1, 128, 2, 5, 8, 'nchw', 0, 'cl', 1.0),
    (torch.bfloat16, 1, 200, 1, 5, 7, 'cl', 0, 'nchw', 2.5),
    (torch.float32, 1, 144, 2, 7, 7, 'cl', 1, 'nchw', 1.0),
    (torch.float16, 1, 48, 3, 5, 5, 'nchw', 1, 'nchw', 1.0),
]
EMULATED_CASES_SLOW = [
    (torch.float16, 2, 128, 2, 9, 15, 'cl', 0, 'nchw', 3.0),
    (torch.bfloat16, 1, 64, 1, 16, 9, 'nchw', 0, 'nchw', 1.0),
    (torch.float16, 1, 256, 1, 8, 9, 'cl', 0, 'cl', 2.0),
    (torch.float32, 2, 256, 1, 9, 9, 'nchw', 0, 'cl', 2.0),
    (torch.bfloat16, 1, 96, 1, 1, 1, 'cl', 0, 'cl', 1.0),
]


def _emulated_id(c):
    return f'{str(c[0])[6:]}-N{c[1]}C{c[2]}h{c[3]}-{c[4]}x{c[5]}-{c[6]}-o{c[7]}'


@pytest.mark.parametrize('case', EMULATED_CASES + [pytest.param(c, marks=pytest.mark.slow) for c in EMULATED_CASES_SLOW],
                         ids=_emulated_id)
def test_emulated_kernels(emulator, tmp_path, case):
    dtype, n, c, heads, h, w, fmt, offset, dout_fmt, scale = case
    d, t_len = c // heads, h * w
    g = torch.Generator().manual_seed(0)
    qkv = (torch.randn(n, 3 * c, h, w, generator=g) * scale + 0.25).to(dtype)
    grad_out = torch.randn(n, c, h, w, generator=g).to(dtype)
    q64 = qkv.double().requires_grad_(True)
    out_t, lse_t = truth64(q64, heads)
    out_t.backward(grad_out.double())
    ref_out, ref_grad = _reference_fwd_bwd(qkv, heads, grad_out)
    es = qkv.element_size()
    q_modes = load_modes(_storage(qkv, fmt, offset)[1], offset, es, d, t_len)
    d_modes = load_modes(_storage(grad_out, dout_fmt, 0)[1], 0, es, d, t_len)
    out = None
    for mode in q_modes:
        out, lse = run_emulator(emulator, tmp_path, 0, qkv, heads, fmt, offset, mode)
        _check_against_truth(f'out (loader {mode})', out, ref_out, out_t.detach(), dtype)
        assert max_err(lse, lse_t) < 1e-5 * max(1.0, lse_t.abs().max().item()), f'lse (loader {mode})'
    # The backward gets the kernel's own out and lse, as autograd would give it; every loader of qkv and of
    # grad_out runs at least once (paired up, not all combinations, to keep the emulation short).
    for i in range(max(len(q_modes), len(d_modes))):
        mode, dmode = q_modes[i % len(q_modes)], d_modes[-1 - i % len(d_modes)]
        grad = run_emulator(emulator, tmp_path, 1, qkv, heads, fmt, offset, mode, dmode, out=out, dout=grad_out,
                            lse=lse, dout_fmt=dout_fmt)
        for j, slot in enumerate('qkv'):
            _check_against_truth(f'd{slot} (loaders {mode}/{dmode})', split(grad, heads)[j],
                                 split(ref_grad, heads)[j], split(q64.grad, heads)[j], dtype)


def test_emulated_cases_cover_every_loader():
    seen = set()
    for dtype, n, c, heads, h, w, fmt, offset, dout_fmt, _ in EMULATED_CASES:
        x = torch.empty(n, 3 * c, h, w, dtype=dtype)
        seen.update(load_modes(_storage(x, fmt, offset)[1], offset, x.element_size(), c // heads, h * w))
        seen.update(load_modes(_storage(x[:, :c], dout_fmt, 0)[1], 0, x.element_size(), c // heads, h * w))
    assert seen == {LOAD_GENERIC, LOAD_TOKEN_VEC, LOAD_CHAN_VEC}
    assert {c // heads for _, _, c, heads, *_ in EMULATED_CASES} >= {64, 200}  # padded 64 and 256 (two chunks)


# ---- GPU --------------------------------------------------------------------------------------------------

gpu = pytest.mark.gpu

# Attention shapes of the preset networks (spec §1.9-1.13): SongUNet (DDPM++ and NCSN++, CIFAR-10 and the 64x64
# variants) attends with one 256-channel head at 16x16 and at the deepest level 8x8; ADM ImageNet-64 uses 64-channel
# heads at 32x32 (C 384), 16x16 (C 576) and 8x8 (C 768). (name, N, C, heads, H, W)
PRESET_SHAPES = [
    ('ddpmpp_16x16_b512', 512, 256, 1, 16, 16),
    ('ddpmpp_8x8_b512', 512, 256, 1, 8, 8),
    ('ddpmpp_16x16_b64', 64, 256, 1, 16, 16),
    ('ddpmpp_8x8_b64', 64, 256, 1, 8, 8),
    ('adm_32x32_b64', 64, 384, 6, 32, 32),
    ('adm_16x16_b64', 64, 576, 9, 16, 16),
    ('adm_8x8_b64', 64, 768, 12, 8, 8),
]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.fixture(scope='module')
def cuda_ops():
    assert _ext.available(), f'edm_fast._C did not load: {_ext.reason()}'
    assert 'cuda' in dispatch.implementations('attention'), 'edm_fast._C loaded but has no attention ops (stale build?)'
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference must be real fp32 (PyTorch's default)
    return torch.ops.edm_fast


def _gpu_case(n, c, heads, h, w, dtype, fmt, scale=1.0, seed=0, offset=0):
    g = torch.Generator(device='cuda').manual_seed(seed)
    qkv = (torch.randn(n, 3 * c, h, w, device='cuda', generator=g) * scale + 0.25).to(dtype)
    qkv = to_format(qkv, fmt)
    if offset:  # same values in a storage that starts `offset` elements later: forces the element-wise loader
        buf = torch.empty(qkv.numel() + offset, dtype=dtype, device='cuda')
        qkv = buf[offset:].as_strided(qkv.shape, qkv.stride()).copy_(qkv)
    grad_out = to_format(torch.randn(n, c, h, w, device='cuda', generator=g).to(dtype), fmt)
    return qkv, grad_out


def _check_cuda_fwd_bwd(what, qkv, heads, grad_out):
    dtype = qkv.dtype
    q64 = qkv.detach().double().requires_grad_(True)
    out_t, _ = truth64(q64, heads)
    out_t.backward(grad_out.double())
    ref_out, ref_grad = _reference_fwd_bwd(qkv, heads, grad_out)
    x = qkv.detach().requires_grad_(True)  # keeps the storage (and a deliberate misalignment)
    with ops.record_backends() as ran:
        out = ops.attention(x, heads, backend='cuda')
    assert ran == {('attention', 'cuda'): 1}
    assert out.dtype == dtype and out.shape == ref_out.shape
    _check_against_truth(f'{what} out', out, ref_out, out_t.detach(), dtype)
    out.backward(grad_out)
    for j, slot in enumerate('qkv'):
        _check_against_truth(f'{what} d{slot}', split(x.grad, heads)[j], split(ref_grad, heads)[j],
                             split(q64.grad, heads)[j], dtype, scale=q64.grad.abs().max().item())


@gpu
@pytest.mark.parametrize('fmt', ['nchw', 'cl'])
@pytest.mark.parametrize('dtype', DTYPES, ids=str)
@pytest.mark.parametrize('shape', PRESET_SHAPES, ids=lambda s: s[0])
def test_cuda_preset_shapes(cuda_ops, shape, dtype, fmt):
    name, n, c, heads, h, w = shape
    qkv, grad_out = _gpu_case(n, c, heads, h, w, dtype, fmt)
    _check_cuda_fwd_bwd(f'{name} {dtype} {fmt}', qkv, heads, grad_out)


# (N, C, heads, H, W, logit scale, storage offset): T = 1, odd T, T not a multiple of any tile, d not a power of
# two (padded), d > 128 (two backward chunks), T = 4096, peaky logits, misaligned storage (element-wise loader).
AWKWARD_SHAPES = [
    (2, 64, 1, 1, 1, 1.0, 0),
    (3, 128, 2, 7, 7, 1.0, 0),
    (2, 72, 1, 5, 13, 1.0, 0),
    (1, 400, 2, 17, 19, 1.0, 0),
    (1, 136, 1, 31, 33, 1.0, 0),
    (2, 48, 3, 9, 9, 1.0, 0),
    (1, 64, 1, 64, 64, 1.0, 0),
    (2, 256, 1, 16, 16, 6.0, 0),
    (2, 384, 6, 8, 8, 1.0, 1),
    (1, 200, 1, 11, 11, 3.0, 1),
]


@gpu
@pytest.mark.parametrize('fmt', ['nchw', 'cl'])
@pytest.mark.parametrize('dtype', DTYPES, ids=str)
@pytest.mark.parametrize('shape', AWKWARD_SHAPES, ids=lambda s: 'x'.join(map(str, s[:5])) + f'-s{s[5]}-o{s[6]}')
def test_cuda_awkward_shapes(cuda_ops, shape, dtype, fmt):
    n, c, heads, h, w, scale, offset = shape
    qkv, grad_out = _gpu_case(n, c, heads, h, w, dtype, fmt, scale=scale, seed=1, offset=offset)
    _check_cuda_fwd_bwd(f'{shape} {dtype} {fmt}', qkv, heads, grad_out)


@gpu
def test_cuda_kernels_ran(cuda_ops, no_backend_env):
    """The selection counter and the profiler both show the fused kernels, not a fallback."""
    qkv, grad_out = _gpu_case(2, 128, 2, 16, 16, torch.float16, 'cl')
    qkv.requires_grad_(True)
    with ops.record_backends() as ran, torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        ops.attention(qkv, 2).backward(grad_out)  # auto
        torch.cuda.synchronize()
    assert ran == {('attention', 'cuda'): 1}
    names = ' '.join(e.name for e in prof.events())
    for kernel in ('edm_attn_fwd_tc_kernel', 'edm_attn_bwd_tc_kernel', 'edm_attn_bwd_delta_kernel',
                   'edm_attn_bwd_dq_kernel'):
        assert kernel in names, kernel
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        ops.attention(qkv.detach().float(), 2)
        torch.cuda.synchronize()
    assert 'edm_attn_fwd_f32_kernel' in ' '.join(e.name for e in prof.events())


@gpu
def test_cuda_forward_is_deterministic_and_keeps_format(cuda_ops):
    for fmt in ('nchw', 'cl'):
        qkv, _ = _gpu_case(4, 384, 6, 16, 16, torch.bfloat16, fmt)
        a, b = ops.attention(qkv, 6, backend='cuda'), ops.attention(qkv, 6, backend='cuda')
        assert torch.equal(a, b)
        assert a.is_contiguous(memory_format=torch.channels_last if fmt == 'cl' else torch.contiguous_format)


@gpu
def test_cuda_backward_with_expanded_grad(cuda_ops):
    """out.sum().backward() hands the op a stride-0 gradient; the op must make it dense itself."""
    qkv, _ = _gpu_case(2, 128, 2, 8, 8, torch.float16, 'cl')
    x = qkv.detach().clone().requires_grad_(True)
    out = ops.attention(x, 2, backend='cuda')
    out.sum().backward()  # the gradient reaching the op is ones expanded from a scalar (all strides 0)
    y = qkv.detach().clone().requires_grad_(True)
    ops.attention(y, 2, backend='cuda').backward(torch.ones(2, 128, 8, 8, device='cuda', dtype=torch.float16))
    assert torch.allclose(x.grad.float(), y.grad.float(), atol=1e-3, rtol=1e-2)


@gpu
def test_cuda_unsupported_inputs_fall_back_under_auto(cuda_ops, no_backend_env):
    qkv = torch.randn(1, 3 * 12, 4, 4, device='cuda', dtype=torch.float16)  # d = 12
    with ops.record_backends() as ran:
        ops.attention(qkv, 1)
    assert ran == {('attention', 'sdpa'): 1}
    with pytest.raises(RuntimeError, match='multiple of 8'):
        ops.attention(qkv, 1, backend='cuda')


@gpu
@pytest.mark.parametrize('fmt', ['nchw', 'cl'])
def test_cuda_opcheck(cuda_ops, fmt):
    for dtype in (torch.float16, torch.bfloat16):
        qkv, _ = _gpu_case(2, 128, 2, 5, 7, dtype, fmt)
        torch.library.opcheck(cuda_ops.attention_fwd.default, (qkv.requires_grad_(True), 2))
    qkv, grad_out = _gpu_case(2, 128, 2, 5, 7, torch.float32, fmt)
    out, lse = cuda_ops.attention_fwd(qkv, 2)
    torch.library.opcheck(cuda_ops.attention_bwd.default, (grad_out, qkv, out, lse, 2))


@gpu
def test_cuda_unetblock_compiles_without_graph_breaks(cuda_ops, monkeypatch):
    from torch._dynamo.utils import counters
    monkeypatch.setenv(dispatch.ENV_VAR, 'reference,attention=cuda')  # only this op's fast path under test
    torch.manual_seed(0)
    block = networks.UNetBlock(128, 128, 64, attention=True, channels_per_head=64).cuda()
    for p in block.parameters():  # ADM zero-initialises proj and conv1; give the attention branch weight
        torch.nn.init.normal_(p, std=0.05)
    x = to_format(torch.randn(4, 128, 16, 16, device='cuda'), 'cl').half()
    emb = torch.randn(4, 64, device='cuda')
    eager_x = x.clone().requires_grad_(True)
    with ops.record_backends() as ran:
        y_eager = block(eager_x, emb)
    assert ran[('attention', 'cuda')] == 1
    y_eager.float().square().sum().backward()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(block, fullgraph=True)
    comp_x = x.clone().requires_grad_(True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        y = compiled(comp_x, emb)
        y.float().square().sum().backward()
        torch.cuda.synchronize()
    assert not counters['graph_break'], dict(counters['graph_break'])
    names = ' '.join(e.name for e in prof.events())
    assert 'edm_attn_fwd_tc_kernel' in names and 'edm_attn_bwd_tc_kernel' in names
    assert max_err(y, y_eager) <= 2e-2 * y_eager.abs().max().item()
    assert max_err(comp_x.grad, eager_x.grad) <= 5e-2 * eager_x.grad.abs().max().item()


@gpu
@pytest.mark.parametrize('sdpa_backend', attention_mod.SDPA_BACKENDS)
def test_cuda_sdpa_provider_backends(cuda_ops, sdpa_backend):
    """The sdpa provider (the benchmark's baselines) on the GPU, each PyTorch backend that can run fp16 here."""
    qkv, grad_out = _gpu_case(2, 384, 6, 8, 8, torch.float16, 'cl')
    x = qkv.detach().requires_grad_(True)
    try:
        out = ops.attention(x, 6, sdpa_backend=sdpa_backend)
    except RuntimeError as e:
        pytest.skip(f'SDPA backend {sdpa_backend} unavailable here: {e}')
    out.backward(grad_out)
    q64 = qkv.detach().double().requires_grad_(True)
    out_t, _ = truth64(q64, 6)
    out_t.backward(grad_out.double())
    ref_out, ref_grad = _reference_fwd_bwd(qkv, 6, grad_out)
    _check_against_truth(f'sdpa-{sdpa_backend} out', out, ref_out, out_t.detach(), torch.float16)
    _check_against_truth(f'sdpa-{sdpa_backend} dqkv', x.grad, ref_grad, q64.grad, torch.float16)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_gpu_tests_are_marked():
    """Every test that touches the GPU carries the gpu marker (so CPU CI skips them with a reason)."""
    source = open(__file__).read()
    for match in re.finditer(r'\n((?:@[^\n]*\n)*)def (test_cuda_\w+)', source):
        assert '@gpu' in match.group(1), match.group(2)
