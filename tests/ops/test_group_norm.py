"""Fused GroupNorm (+ pre-add, scale/shift, SiLU): Triton and CUDA backends against the reference.

On CPU the Triton kernels run through the interpreter (TRITON_INTERPRET=1, set by conftest) on small shapes;
the CUDA extension cannot load here, so its Python wiring (schemas, fake kernels, autograd) is checked on
stand-in operators with the same schemas. The GPU tests compare both backends with an fp64 truth over every
GroupNorm shape of the preset networks.

Accuracy rule (DESIGN.md): error against the fp64 truth <= 2x PyTorch's own error at the same precision
plus a small floor, per output and per gradient, errors measured as max|err| / max|truth|.
"""

import collections
import functools
import importlib
import os
import re
import subprocess
import sys

import pytest
import torch

from edm_fast import _ext, networks, ops, presets
from edm_fast.ops import dispatch, reference

gn_module = importlib.import_module('edm_fast.ops.group_norm')  # the module (ops.group_norm is the function)
triton_gn = pytest.importorskip('edm_fast.ops.triton.group_norm')
# Where the small-shape Triton tests run: CPU through the interpreter, or the GPU when there is one (conftest
# sets TRITON_INTERPRET=1 only on machines without a GPU).
DEVICE = 'cpu' if triton_gn.INTERPRETED else 'cuda'

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EPS = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}
VARIANTS = {  # call sites: (pre_add batch, scale batch, shift batch, act); batch 'N' or 1, None = absent
    'norm0_silu': (None, None, None, 'silu'),
    'norm2_plain': (None, None, None, None),
    'ddpmpp_add': ('N', None, None, 'silu'),
    'ddpmpp_add_bcast': (1, None, None, 'silu'),
    'adm_scale_shift': (None, 'N', 'N', 'silu'),
    'adm_scale_shift_bcast': (None, 1, 1, 'silu'),
    'adm_mixed_bcast': (None, 1, 'N', 'silu'),
}


def _make_inputs(shape, num_groups, dtype, channels_last, variant, device=DEVICE, seed=0, adm_chunk=True):
    """Non-zero-mean x (mean 3, std 0.1 per group plus a per-channel offset), parameters and call-site extras."""
    gen = torch.Generator(device=device).manual_seed(seed)
    randn = lambda *size: torch.randn(size, generator=gen, device=device)  # noqa: E731
    N, C, H, W = shape
    x = (randn(*shape) * 0.1 + 3 + 0.05 * randn(1, C, 1, 1)).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight = torch.rand(C, generator=gen, device=device) + 0.5
    bias = randn(C)
    add_n, scale_n, shift_n, act = VARIANTS[variant]
    batch = lambda b: N if b == 'N' else b  # noqa: E731
    pre_add = scale = shift = None
    if add_n is not None:
        pre_add = randn(batch(add_n), C, 1, 1).to(dtype)
    if scale_n is not None:
        if adm_chunk and scale_n == shift_n == 'N':
            # As UNetBlock makes them: the two halves of affine(emb), non-contiguous views.
            scale, shift = (0.5 * randn(N, 2 * C, 1, 1)).to(dtype).chunk(2, dim=1)
        else:
            scale = (0.5 * randn(batch(scale_n), C, 1, 1)).to(dtype)
            shift = randn(batch(shift_n), C, 1, 1).to(dtype)
    return dict(x=x, weight=weight, bias=bias, pre_add=pre_add, scale=scale, shift=shift), act


def _run(inputs, num_groups, eps, act, backend, dy, cast=None):
    """Forward + backward; returns {'y': y, 'x': dx, 'weight': dweight, ...} (cast copies for the truth)."""
    leaves = {}
    for k, v in inputs.items():
        if v is None:
            continue
        v = v.detach()
        if cast is not None:
            v = v.to(cast)
        leaves[k] = v.requires_grad_()
    y = ops.group_norm(leaves['x'], leaves['weight'], leaves['bias'], num_groups, eps, pre_add=leaves.get('pre_add'),
                       scale=leaves.get('scale'), shift=leaves.get('shift'), act=act, backend=backend)
    y.backward(dy.to(y.dtype))
    out = {'y': y.detach()}
    out.update({k: v.grad for k, v in leaves.items()})
    return out


def _errors(got, truth):
    return {k: ((got[k].double() - truth[k]).abs().max() / truth[k].abs().max().clamp_min(1e-30)).item()
            for k in truth}


def _check_against_truth(inputs, num_groups, eps, act, backends, floor_ulps=4.0, seed=1):
    """Run each backend and PyTorch (reference) at the inputs' precision against the fp64 reference.

    Returns {backend: outputs and gradients}. The fp64 truth and PyTorch's error are computed once.
    """
    backends = [backends] if isinstance(backends, str) else backends
    dtype = inputs['x'].dtype
    device = inputs['x'].device
    dy = torch.randn(inputs['x'].shape, generator=torch.Generator(device=device).manual_seed(seed), device=device)
    truth = _run(inputs, num_groups, eps, act, 'reference', dy, cast=torch.float64)
    # PyTorch's own error at this precision, on NCHW input (its CPU channels-last kernel is far less accurate).
    err_torch = _errors(_run({**inputs, 'x': inputs['x'].contiguous()}, num_groups, eps, act, 'reference', dy), truth)
    floor = floor_ulps * EPS[dtype]
    results = {}
    for backend in backends:
        fast = _run(inputs, num_groups, eps, act, backend, dy)
        err = _errors(fast, truth)
        bad = {k: (err[k], err_torch[k]) for k in truth if not err[k] <= 2 * err_torch[k] + floor}
        assert not bad, f'{backend} {dtype} {tuple(inputs["x"].shape)}: error > 2x PyTorch + {floor:.1e} for {bad}'
        for k in truth:
            assert fast[k].shape == truth[k].shape, k
            assert fast[k].dtype == (inputs[k].dtype if k != 'y' else dtype), k
        results[backend] = fast
    return results


# ---- Triton on small shapes (CPU: through the interpreter; a GPU machine: the compiled kernels) ------------

CPU_CASES = [
    # shape, groups, dtype, channels_last, variant
    ((2, 12, 5, 3), 3, torch.float32, False, 'ddpmpp_add'),
    ((2, 12, 5, 3), 3, torch.float32, True, 'adm_scale_shift'),
    ((2, 12, 5, 3), 3, torch.float16, True, 'ddpmpp_add_bcast'),
    ((3, 48, 4, 4), 8, torch.float32, True, 'norm0_silu'),
    ((3, 48, 4, 4), 8, torch.float16, False, 'adm_scale_shift_bcast'),
    ((3, 48, 4, 4), 8, torch.float16, True, 'adm_mixed_bcast'),
    ((2, 48, 6, 6), 3, torch.float32, False, 'norm2_plain'),
    ((2, 48, 6, 6), 3, torch.float16, True, 'ddpmpp_add'),
    ((1, 12, 1, 1), 3, torch.float32, True, 'adm_scale_shift'),
    ((1, 12, 1, 1), 3, torch.float16, False, 'ddpmpp_add'),
    ((4, 8, 1, 1), 2, torch.float32, False, 'norm0_silu'),
    ((1, 64, 8, 8), 16, torch.float32, True, 'ddpmpp_add_bcast'),
    ((2, 48, 4, 4), 8, torch.bfloat16, True, 'adm_scale_shift'),
    ((2, 48, 4, 4), 8, torch.bfloat16, False, 'ddpmpp_add'),
    # Groups bigger than one chunk (interpreter: fwd 16384, bwd 8192 elements): the looping path.
    ((2, 64, 32, 32), 2, torch.float32, True, 'adm_scale_shift'),
    ((2, 64, 32, 32), 2, torch.float16, False, 'ddpmpp_add'),
]


@pytest.mark.parametrize('shape, num_groups, dtype, channels_last, variant', CPU_CASES,
                         ids=[f'{"x".join(map(str, c[0]))}-g{c[1]}-{str(c[2])[6:]}-{"cl" if c[3] else "nchw"}-{c[4]}'
                              for c in CPU_CASES])
def test_triton_matches_reference(shape, num_groups, dtype, channels_last, variant):
    inputs, act = _make_inputs(shape, num_groups, dtype, channels_last, variant)
    with ops.record_backends() as rec:
        out = _check_against_truth(inputs, num_groups, 1e-5, act, 'triton')['triton']
    assert rec[('group_norm', 'triton')] == 1
    if channels_last and shape[2] * shape[3] > 1:
        assert out['y'].is_contiguous(memory_format=torch.channels_last) and not out['y'].is_contiguous()
        assert out['x'].is_contiguous(memory_format=torch.channels_last)
    else:
        assert out['y'].is_contiguous()


GPU_TILE_CASES = [
    # The tiles a GPU launch picks (CONFIG fwd/bwd, two programs per SM on 132 SMs) at network channel counts:
    # ADM's 6 channels per group (24-column tiles, masked to 32) streamed over several chunks, DDPM++'s 8 resident.
    ((1, 192, 64, 64), 32, torch.float16, True, 'adm_scale_shift'),
    ((1, 256, 32, 32), 32, torch.float16, True, 'ddpmpp_add'),
    ((2, 576, 8, 8), 32, torch.float32, True, 'norm0_silu'),
]


@pytest.mark.parametrize('shape, num_groups, dtype, channels_last, variant', GPU_TILE_CASES,
                         ids=[f'{"x".join(map(str, c[0]))}-{c[4]}' for c in GPU_TILE_CASES])
def test_triton_gpu_tiles_match_reference(shape, num_groups, dtype, channels_last, variant, monkeypatch):
    if not triton_gn.INTERPRETED:
        pytest.skip('on a GPU the other tests run these tiles already')
    monkeypatch.setitem(triton_gn.CONFIG, 'interpret_fwd', triton_gn.CONFIG['fwd'])
    monkeypatch.setitem(triton_gn.CONFIG, 'interpret_bwd', triton_gn.CONFIG['bwd'])
    monkeypatch.setattr(triton_gn, '_min_programs', lambda x: 264)
    N, C, H, W = shape
    plan = triton_gn._tile_config(N, C, num_groups, H * W, 2, True, *triton_gn.CONFIG['bwd'], 264)
    assert (plan[4] > 1) == (H * W * C // num_groups > triton_gn.CONFIG['bwd'][0]), plan  # chunks as designed
    inputs, act = _make_inputs(shape, num_groups, dtype, channels_last, variant)
    with ops.record_backends() as rec:
        _check_against_truth(inputs, num_groups, 1e-5, act, 'triton')
    assert rec[('group_norm', 'triton')] == 1


@pytest.mark.parametrize('dtype, channels_last, variant', [(torch.float32, True, 'adm_scale_shift'),
                                                           (torch.float16, False, 'ddpmpp_add'),
                                                           (torch.bfloat16, True, 'adm_mixed_bcast')])
def test_triton_split_equals_loop(dtype, channels_last, variant, monkeypatch):
    """Groups larger than one chunk: one program per (tile, chunk) in two kernels gives bit for bit what one
    program looping over the tile gives (the same per-chunk sums, merged in the same order), forward and backward
    (all six gradients)."""
    inputs, act = _make_inputs((2, 48, 12, 11), 4, dtype, channels_last, variant)  # 12 x 132 per group
    monkeypatch.setitem(triton_gn.CONFIG, 'interpret_fwd', (256, 512))
    monkeypatch.setitem(triton_gn.CONFIG, 'interpret_bwd', (256, 512))
    w, b, add, scale, shift = (inputs[k] for k in ('weight', 'bias', 'pre_add', 'scale', 'shift'))
    x = inputs['x']
    plan = triton_gn._tile_config(2, 48, 4, 132, x.element_size(), channels_last, 256)
    assert plan[4] > 2 and 132 % plan[1], plan  # several chunks, the last one partial
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    outs, grads = {}, {}
    for split in (False, True):
        monkeypatch.setitem(triton_gn.CONFIG, 'split_fwd', split)
        monkeypatch.setitem(triton_gn.CONFIG, 'split_bwd', split)
        outs[split] = y, mean, rstd = triton_gn.forward(x, w, b, add, scale, shift, 4, 1e-5, act == 'silu')
        grads[split] = triton_gn.backward(dy, x, w, b, add, scale, shift, mean, rstd, 4, act == 'silu', True)
    for loop, split in zip(outs[False] + grads[False], outs[True] + grads[True]):
        assert torch.equal(loop, split)
    assert sum(g.numel() > 0 for g in grads[True]) == (4 if add is not None else 5)  # dx, dw, db, + the extras
    assert outs[True][0].is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    # ... and the split forward is as accurate as PyTorch (on NCHW input) against the fp64 truth.
    extras = dict(pre_add=add, scale=scale, shift=shift, act=act)
    d = lambda t: None if t is None else t.double()  # noqa: E731
    truth = reference.group_norm(x.double(), w.double(), b.double(), 4, 1e-5, **{k: d(v) if k != 'act' else v
                                                                                for k, v in extras.items()})
    err = lambda y: ((y.double() - truth).abs().max() / truth.abs().max()).item()  # noqa: E731
    err_torch = err(reference.group_norm(x.contiguous(), w, b, 4, 1e-5, **extras))
    assert err(outs[True][0]) <= 2 * err_torch + 4 * EPS[dtype], (err(outs[True][0]), err_torch)


@pytest.mark.parametrize('path', ['resident', 'loop', 'split'])
def test_triton_stats_survive_large_offsets(path, monkeypatch):
    """mean 1000, std 1e-2 in fp32: a one-pass E[x^2] - E[x]^2 would lose every digit of the variance, and a mean
    merged over chunks as a plain fp32 number would be off by ulp(1000) = 6e-5, 0.6% of the std."""
    if path != 'resident':
        key = 'interpret_fwd' if triton_gn.INTERPRETED else 'fwd'
        monkeypatch.setitem(triton_gn.CONFIG, key, (64, 512))
        monkeypatch.setitem(triton_gn.CONFIG, 'split_fwd', path == 'split')
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    x = torch.randn(2, 16, 8, 8, generator=gen, device=DEVICE) * 1e-2 + 1000
    w, b = torch.ones(16, device=DEVICE), torch.zeros(16, device=DEVICE)
    plan = triton_gn._tile_config(2, 16, 4, 64, 4, False, *triton_gn._config(x, 'fwd'))
    assert (plan[4] > 1) == (path != 'resident'), plan
    y = ops.group_norm(x, w, b, 4, 1e-6, backend='triton')
    truth = torch.nn.functional.group_norm(x.double(), 4, w.double(), b.double(), 1e-6)
    assert (y.double() - truth).abs().max() < 2e-3
    assert (y.double().std() - 1).abs() < 1e-2


def test_triton_accepts_non_dense_input():
    """A strided slice is made dense (NCHW) before the kernel; the result matches the reference."""
    base = torch.randn(2, 24, 6, 10, device=DEVICE) + 2
    x = base[:, ::2, :, ::2]
    w, b = torch.rand(12, device=DEVICE) + 0.5, torch.randn(12, device=DEVICE)
    y = ops.group_norm(x, w, b, 3, 1e-5, act='silu', backend='triton')
    torch.testing.assert_close(y, reference.group_norm(x, w, b, 3, 1e-5, act='silu'), atol=2e-5, rtol=1e-5)


_AOT_SCRIPT = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import edm_fast.ops.triton.group_norm as k

def compile_(fn, ptrs, consts, num_warps):
    consts = {k: v for k, v in consts.items() if k in fn.arg_names}
    sig = {a: 'constexpr' if a in consts else ptrs.get(a, 'fp32' if a == 'eps' else 'i32') for a in fn.arg_names}
    triton.compile(ASTSource(fn, sig, consts), target=GPUTarget('cuda', 90, 32), options=dict(num_warps=num_warps))

for dt, one, ones in (('fp16', True, dict(Cg=8, GPB=4)), ('bf16', False, dict(Cg=6, GPB=4)),
                      ('fp32', True, dict(P=1, Cg=1, GPB=1, sxp=1))):
    flags = dict(HAS_ADD=True, HAS_SS=True, SILU=True, ONE_CHUNK=one, BLOCK_CW=32, BLOCK_G=4, **ones)
    io = dict.fromkeys(('x_ptr', 'y_ptr', 'dy_ptr', 'dx_ptr', 'add_ptr', 'scale_ptr', 'shift_ptr'), '*' + dt)
    f32 = dict.fromkeys(('w_ptr', 'b_ptr', 'mean_ptr', 'rstd_ptr', 'sum1_ptr', 'sum2_ptr', 'sum3_ptr'), '*fp32')
    compile_(k._gn_fwd_kernel, {**io, **f32}, dict(BLOCK_P=256, **flags), 16)
    f32['part_ptr'] = '*fp32'
    compile_(k._gn_fwd_stats_kernel, {**io, **f32}, dict(BLOCK_P=128, **flags), 8)
    compile_(k._gn_fwd_apply_kernel, {**io, **f32}, dict(BLOCK_P=128, **flags), 8)
    compile_(k._gn_bwd_sums_kernel, {**io, **f32}, dict(BLOCK_P=128, **flags), 8)
    compile_(k._gn_bwd_apply_kernel, {**io, **f32}, dict(BLOCK_P=128, NEED_DADD=True, **flags), 8)
    compile_(k._gn_bwd_kernel, {**io, **f32}, dict(BLOCK_P=128, NEED_DADD=True, **flags), 8)
    compile_(k._gn_param_grad_kernel, {**f32, 'dw_ptr': '*fp32', 'db_ptr': '*fp32',
             **dict.fromkeys(('x_ptr', 'scale_ptr', 'dscale_ptr', 'dshift_ptr', 'dadd_ptr'), '*' + dt)},
             dict(BLOCK_N=32, BLOCK_C=128, HAS_SS=True, SCALE_BCAST=one, SHIFT_BCAST=not one, NEED_DADD=True,
                  ADD_BCAST=one), 4)
print('compiled')
"""


def test_triton_kernels_compile_for_sm90():
    """The interpreter never runs Triton's compiler: compile every kernel to an sm_90 cubin (Triton's own
    ptxas, no GPU needed) in a process without TRITON_INTERPRET, incl. ints specialised to 1 (1x1 maps)."""
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
    proc = subprocess.run([sys.executable, '-c', _AOT_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and 'compiled' in proc.stdout, proc.stderr[-4000:]


# Host program over the real csrc/group_norm/group_norm_common.cuh: for ~20k plans (preset shapes at their
# batch sizes, awkward shapes, H100 and small GPUs, clusters on and off, aligned and misaligned pointers) every
# element of a sample is visited by exactly one thread, with the right channel and group, and every
# backward workspace slot is written exactly once.
_PLAN_CHECK_CU = r"""
#include <cstdio>
#include <vector>
#include "group_norm/group_norm_common.cuh"
using namespace edm_fast;
using namespace edm_fast::gn;

static long long g_cases = 0;
#define REQUIRE(cond, ...)                                                                                  \
  do {                                                                                                      \
    if (!(cond)) {                                                                                          \
      std::printf("FAIL %s: N=%d C=%d G=%d P=%d cl=%d vec=%d K=%d gpb=%d threads=%d chunks=%d | ", #cond,   \
                  t.N, t.C, t.G, t.P, (int)CL, VEC, t.K, t.gpb, p.threads, t.chunks);                       \
      std::printf(__VA_ARGS__);                                                                             \
      std::printf("\n");                                                                                    \
      return false;                                                                                         \
    }                                                                                                       \
  } while (0)

template <int VEC, int NV, bool CL>
bool check(const Plan& p, int kmax) {
  const Tile& t = p.t;
  REQUIRE(p.threads % 32 == 0 && p.threads >= 32 && p.threads <= kMaxThreads, "threads");
  REQUIRE(t.K >= 1 && t.K <= kmax && t.gpb >= 1 && t.gpb <= kMaxTileGroups && t.G % t.gpb == 0, "K/gpb");
  REQUIRE(p.blocks == (int64_t)t.N * t.tiles * t.K, "blocks");
  const int n = t.N - 1;
  std::vector<int> seen((size_t)t.C * t.P, 0), ws((size_t)t.C * p.splits, 0);
  for (int tile = 0; tile < t.tiles; ++tile) {
    const int g0 = tile * t.gpb, c0 = g0 * t.Cg;
    for (int k = 0; k < t.K; ++k) {
      for (int tid = 0; tid < p.threads; ++tid) {
        const Lane<VEC, NV, CL> ln(t, n, c0, k, tid);
        if (ln.lg < 0) continue;
        REQUIRE(ln.lg < t.gpb, "lg");
        for (int ch = 0; ch < t.chunks; ++ch)
          for (int j = 0; j < NV; ++j) {
            const int pos = ln.pos(ch, j);
            if (!ln.valid(pos)) continue;
            for (int e = 0; e < VEC; ++e) {
              const int64_t off = ln.offset(pos) + e - (int64_t)n * t.C * t.P;
              REQUIRE(off >= 0 && off < (int64_t)t.C * t.P, "offset %lld", (long long)off);
              REQUIRE(ln.offset(pos) % VEC == 0, "vector alignment");
              const int c = CL ? (int)(off % t.C) : (int)(off / t.P);
              const int pix = CL ? (int)(off / t.C) : (int)(off % t.P);
              REQUIRE(c / t.Cg == g0 + ln.lg && c == ln.c + (CL ? e : 0), "channel %d", c);
              seen[(size_t)c * t.P + pix]++;
            }
          }
        if (!CL && tid % t.tpr == 0) ws[(size_t)ln.c * p.splits + ln.seg]++;
      }
      if (CL)
        for (int col = 0; col < t.gpb * t.Cg; ++col) ws[(size_t)(c0 + col) * p.splits + k]++;
    }
  }
  for (size_t i = 0; i < seen.size(); ++i) REQUIRE(seen[i] == 1, "element %zu seen %d times", i, seen[i]);
  for (size_t i = 0; i < ws.size(); ++i) REQUIRE(ws[i] == 1, "workspace slot %zu written %d times", i, ws[i]);
  ++g_cases;
  return true;
}

template <int VEC, bool CL>
bool run_vec(const Plan& p, int items, int kmax) {
  if (items / VEC == 16) return check<VEC, 16, CL>(p, kmax);
  if (items / VEC == 8) return check<VEC, 8, CL>(p, kmax);
  if (items / VEC == 4) return check<VEC, 4, CL>(p, kmax);
  if (items / VEC == 2) return check<VEC, 2, CL>(p, kmax);
  if (items / VEC == 1) return check<VEC, 1, CL>(p, kmax);
  std::printf("FAIL no instantiation items=%d vec=%d\n", items, VEC);
  return false;
}

template <bool CL>
bool run(const Plan& p, int items, int kmax) {
  switch (p.vec) {
    case 8: return run_vec<8, CL>(p, items, kmax);
    case 4: return run_vec<4, CL>(p, items, kmax);
    case 2: return run_vec<2, CL>(p, items, kmax);
    case 1: return run_vec<1, CL>(p, items, kmax);
  }
  std::printf("FAIL vec %d\n", p.vec);
  return false;
}

bool one(int N, int C, int G, int P, bool cl, int esize, int max_vec, int sms, int kmax) {
  const int items = esize == 4 ? fwd_items<float>() : fwd_items<__half>();
  GroupNormShape s{N, C, P, G, cl, esize == 4 ? c10::ScalarType::Float : c10::ScalarType::Half, 0};
  DeviceInfo dev;
  dev.sms = sms;
  dev.kmax = kmax;
  for (int it : {items, esize == 4 ? bwd_items<float>() : bwd_items<__half>()}) {
    const Plan p = make_plan(s, esize, max_vec, it, dev);
    if (!(cl ? run<true>(p, it, kmax) : run<false>(p, it, kmax))) return false;
  }
  return true;
}

int main() {
  // Preset shapes (both networks) at their batch sizes, plus awkward ones, on an H100 and on small GPUs.
  const int preset[][4] = {{512, 128, 32, 32}, {512, 256, 16, 16}, {512, 256, 32, 32}, {512, 256, 8, 8},
                           {512, 384, 32, 32}, {512, 512, 16, 16}, {512, 512, 32, 32}, {512, 512, 8, 8},
                           {64, 128, 64, 64}, {64, 256, 64, 64}, {64, 384, 64, 64}, {64, 1152, 16, 16},
                           {64, 1344, 16, 16}, {64, 1344, 8, 8}, {64, 1536, 8, 8}, {64, 192, 32, 32},
                           {64, 192, 64, 64}, {64, 576, 64, 64}, {64, 576, 8, 8}, {64, 768, 32, 32},
                           {64, 960, 32, 32}, {1, 576, 64, 64}, {1, 192, 64, 64}, {4, 256, 32, 32}};
  for (auto& s : preset)
    for (int cl = 0; cl < 2; ++cl)
      for (int esize : {2, 4})
        for (int kmax : {8, 1})
          if (!one(s[0], s[1], 32, s[2] * s[3], cl, esize, 16 / esize, 132, kmax)) return 1;
  const int Gs[] = {1, 3, 32}, Cgs[] = {1, 3, 4, 6, 8, 24, 100, 512};
  const int HWs[][2] = {{1, 1}, {2, 2}, {3, 5}, {7, 7}, {8, 8}, {13, 17}, {32, 32}, {64, 64}};
  for (int N : {1, 64})
    for (int G : Gs)
      for (int Cg : Cgs)
        for (auto& hw : HWs)
          for (int cl = 0; cl < 2; ++cl)
            for (int esize : {2, 4})
              for (int max_vec : {16 / esize, 1})
                for (int kmax : {8, 1})
                  for (int sms : {132, 4}) {
                    if ((int64_t)G * Cg * hw[0] * hw[1] > (1 << 18)) continue;
                    if (!one(N, G * Cg, G, hw[0] * hw[1], cl, esize, max_vec, sms, kmax)) return 1;
                  }
  std::printf("ok %lld plans\n", g_cases);
  return 0;
}
"""


def test_cuda_tile_mapping_covers_every_element(tmp_path):
    """The CUDA kernels' plan and per-thread mapping, compiled with nvcc and run on the host (no GPU)."""
    import shutil
    import sysconfig
    from torch.utils import cpp_extension
    nvcc = shutil.which('nvcc')
    if nvcc is None:
        pytest.skip('nvcc not found')
    (tmp_path / 'plan_check.cu').write_text(_PLAN_CHECK_CU)
    includes = [f'-I{d}' for d in cpp_extension.include_paths() + [sysconfig.get_paths()['include'],
                                                                    os.path.join(REPO, 'csrc')]]
    exe = str(tmp_path / 'plan_check')
    build = subprocess.run([nvcc, '-std=c++17', '-O2', '-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE',
                            '-gencode=arch=compute_90,code=compute_90', str(tmp_path / 'plan_check.cu'), '-o', exe]
                           + includes, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([exe], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.startswith('ok'), run.stdout[-2000:]


def test_backend_selection_on_cpu(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    x = torch.randn(2, 8, 4, 4)
    w, b = torch.ones(8), torch.zeros(8)
    with ops.record_backends() as rec:
        ops.group_norm(x, w, b, 2, 1e-5, act='silu')                     # auto on CPU: the reference
        if triton_gn.INTERPRETED:
            ops.group_norm(x, w, b, 2, 1e-5, act='silu', backend='triton')   # explicit: the interpreter
            monkeypatch.setenv(dispatch.ENV_VAR, 'group_norm=triton')
            ops.group_norm(x, w, b, 2, 1e-5, act='silu')                     # asked for through the environment
            monkeypatch.delenv(dispatch.ENV_VAR)
        else:
            with pytest.raises(RuntimeError, match='CUDA tensors'):
                ops.group_norm(x, w, b, 2, 1e-5, backend='triton')
    assert rec == {('group_norm', 'reference'): 1, **({('group_norm', 'triton'): 2} if triton_gn.INTERPRETED else {})}
    x, w, b = x.to(DEVICE), w.to(DEVICE), b.to(DEVICE)
    with pytest.raises(RuntimeError, match='4-D'):
        ops.group_norm(torch.randn(2, 8, 4), w, b, 2, 1e-5, backend='triton')
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run.*pre_add must be"):
        ops.group_norm(x, w, b, 2, 1e-5, pre_add=torch.randn(2, 8), backend='triton')
    with pytest.raises(RuntimeError, match="backend 'cuda'"):
        ops.group_norm(x.cpu(), w.cpu(), b.cpu(), 2, 1e-5, backend='cuda')
    with pytest.raises(ValueError, match='scale and shift'):
        ops.group_norm(x, w, b, 2, 1e-5, scale=torch.randn(2, 8, 1, 1), backend='triton')
    with pytest.raises(ValueError, match='unsupported activation'):
        ops.group_norm(x, w, b, 2, 1e-5, act='gelu', backend='triton')


def _op_args(shape=(2, 12, 5, 3), num_groups=3, channels_last=True, variant='adm_mixed_bcast', grad=True):
    inputs, act = _make_inputs(shape, num_groups, torch.float32, channels_last, variant, adm_chunk=False)
    t = {k: (v.detach().requires_grad_(grad) if v is not None else None) for k, v in inputs.items()}
    return (t['x'], t['weight'], t['bias'], t['pre_add'], t['scale'], t['shift'], num_groups, 1e-5, act == 'silu')


@pytest.mark.parametrize('variant', ['adm_mixed_bcast', 'ddpmpp_add_bcast'])
def test_opcheck_triton_ops(variant):
    fwd = torch.ops.edm_fast.group_norm_triton_fwd
    torch.library.opcheck(fwd, _op_args(variant=variant))
    x, w, b, pre_add, scale, shift, G, eps, silu = _op_args(variant=variant, grad=False)
    y, mean, rstd = fwd(x, w, b, pre_add, scale, shift, G, eps, silu)
    torch.library.opcheck(torch.ops.edm_fast.group_norm_triton_bwd,
                          (torch.randn_like(y), x, w, b, pre_add, scale, shift, mean, rstd, G, silu, True))


def _registration_schemas():
    """The group_norm op schemas from csrc/registration.cpp (adjacent string literals joined)."""
    with open(os.path.join(REPO, 'csrc', 'registration.cpp')) as f:
        text = f.read()
    section = text.split('// ---- group_norm (csrc/group_norm/) ----')[1].split('// ---- end group_norm ----')[0]
    schemas = [''.join(re.findall(r'"([^"]*)"', d)) for d in re.findall(r'm\.def\((.*?)\);', section, re.S)]
    return {s.split('(')[0]: s for s in schemas}


@functools.lru_cache(maxsize=1)
def _stand_in_cuda_ops():
    """The CUDA ops' schemas under a test namespace, implemented by the Triton launchers and wired
    with the same fake kernels and autograd formula as the real ones (edm_fast.ops.group_norm._wire)."""
    lib = torch.library.Library('edm_fast_gn_test', 'DEF')
    schemas = _registration_schemas()
    lib.define(schemas['group_norm_fwd'])
    lib.define(schemas['group_norm_bwd'])
    lib.impl('group_norm_fwd', lambda x, w, b, pre_add, scale, shift, G, eps, silu: triton_gn.forward(
        gn_module._dense(x), w, b, pre_add, scale, shift, G, eps, silu), DEVICE.upper())
    lib.impl('group_norm_bwd', lambda dy, x, *rest: triton_gn.backward(dy, gn_module._dense(x), *rest),
             DEVICE.upper())
    gn_module._wire('edm_fast_gn_test::group_norm_fwd', 'edm_fast_gn_test::group_norm_bwd')
    return lib


def test_cuda_op_schemas_fakes_and_autograd_wiring():
    """Everything Python adds to edm_fast::group_norm_fwd/bwd, checked on stand-ins with the same schemas."""
    schemas = _registration_schemas()
    assert set(schemas) == {'group_norm_fwd', 'group_norm_bwd'}
    _stand_in_cuda_ops()
    fwd = torch.ops.edm_fast_gn_test.group_norm_fwd
    args = _op_args(variant='ddpmpp_add_bcast')
    torch.library.opcheck(fwd, args)
    y, _, _ = fwd(*args)
    y.backward(torch.ones_like(y))
    ref_leaves = [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    ref = reference.group_norm(ref_leaves[0], ref_leaves[1], ref_leaves[2], 3, 1e-5, pre_add=ref_leaves[3],
                               act='silu')
    ref.backward(torch.ones_like(ref))
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(args[:4], ref_leaves[:4]):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-4, rtol=1e-4)
    assert args[3].grad.shape == (1, 12, 1, 1)


def test_compile_fullgraph_no_graph_break():
    """torch.compile(fullgraph=True) through ops.group_norm(backend='triton'), forward and backward: one graph,
    no break, the Triton custom ops in it. The aot_eager backend runs dynamo and AOTAutograd (fake kernels,
    the autograd formula) exactly as inductor would, without its 15-40 s C++ build on this 2-core machine;
    test_gpu_compile_inductor_fullgraph compiles with inductor."""
    torch._dynamo.reset()

    def mix(h):  # something for inductor to fuse between the two norms
        return torch.tanh(h) * 2 + h.flip(1)

    def block(x, w, b, emb):
        h = ops.group_norm(x, w, b, 3, 1e-5, pre_add=emb, act='silu', backend='triton')
        return ops.group_norm(mix(h), w, b, 3, 1e-5, act=None, backend='triton')

    inputs, _ = _make_inputs((2, 12, 5, 3), 3, torch.float32, True, 'ddpmpp_add')
    args = [inputs[k].detach().requires_grad_() for k in ('x', 'weight', 'bias', 'pre_add')]
    compiled = torch.compile(block, fullgraph=True, backend='aot_eager')
    out = compiled(*args)
    out.square().sum().backward()
    grads = [a.grad.clone() for a in args]
    explain = torch._dynamo.explain(block)(*args)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    assert str(explain.graphs[0].code).count('torch.ops.edm_fast.group_norm_triton_fwd(') == 2  # not the reference
    ref_args = [a.detach().clone().requires_grad_() for a in args]
    ref = reference.group_norm(mix(reference.group_norm(ref_args[0], ref_args[1], ref_args[2], 3, 1e-5,
                                                        pre_add=ref_args[3], act='silu')),
                               ref_args[1], ref_args[2], 3, 1e-5)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    for g, r in zip(grads, ref_args):
        torch.testing.assert_close(g, r.grad, atol=1e-3, rtol=1e-3)


# ---- GPU -----------------------------------------------------------------------------------------------------

PRESET_BATCHES = {  # preset -> batch sizes that train/sample it
    'edm-cifar10-32x32-cond-vp': (512, 64),
    'edm-cifar10-32x32-cond-ve': (512,),
    'edm-ffhq-64x64-uncond-vp': (64,),
    'edm-imagenet-64x64-cond-adm': (64,),
}


@functools.lru_cache(maxsize=1)
def _preset_shapes():
    """Every distinct GroupNorm call of the presets at their batch sizes: (N, C, H, W, groups, eps, variant)."""
    found = collections.OrderedDict()

    def hook(x, weight, bias, num_groups, eps, *, pre_add=None, scale=None, shift=None, act=None, backend=None):
        variant = 'ddpmpp_add' if pre_add is not None else 'adm_scale_shift' if scale is not None else \
            'norm0_silu' if act == 'silu' else 'norm2_plain'
        found[(tuple(x.shape[1:]), num_groups, eps, variant)] = None
        return torch.empty_like(x)

    saved = ops.group_norm
    networks.ops.group_norm = hook
    try:
        for name in PRESET_BATCHES:
            cfg = presets.official_config(name)
            with torch.device('meta'):
                net = presets.build(cfg)
                res = cfg['img_resolution']
                labels = torch.zeros(1, net.label_dim) if net.label_dim else None
                net(torch.zeros(1, 3, res, res), torch.ones(1), labels)
            for key in list(found):
                if len(key) == 4:
                    (C, H, W), G, eps, variant = key
                    del found[key]
                    for N in PRESET_BATCHES[name]:
                        found[(N, C, H, W, G, eps, variant)] = None
    finally:
        networks.ops.group_norm = saved
    return list(found)


def test_preset_shapes_are_collected():
    """The GPU tests' shape list: real call sites of DDPM++/NCSN++ and ADM (runs anywhere, meta tensors)."""
    shapes = _preset_shapes()
    assert (512, 256, 32, 32, 32, 1e-6, 'ddpmpp_add') in shapes
    assert (64, 192, 64, 64, 32, 1e-5, 'adm_scale_shift') in shapes
    assert (64, 768, 8, 8, 32, 1e-5, 'norm2_plain') in shapes
    assert any(C // G % 8 and H == 8 for N, C, H, W, G, eps, v in shapes)  # 1344 channels: 42 per group
    assert len(shapes) > 40


def _gpu_backends():
    """The fast backends on this GPU machine: Triton always, CUDA when the extension is built."""
    return [b for b in ('cuda', 'triton') if b in ops.implementations('group_norm')]


def _require(backend):
    if backend == 'cuda' and 'cuda' not in ops.implementations('group_norm'):
        pytest.skip(f'CUDA extension not available: {_ext.reason()}')


@pytest.mark.gpu
@pytest.mark.parametrize('N, C, H, W, G, eps, variant', _preset_shapes(),
                         ids=lambda v: str(v).replace(' ', ''))
def test_gpu_preset_shapes_fp16_channels_last(N, C, H, W, G, eps, variant):
    """The production configuration (fp16, channels-last) on every preset GroupNorm call, fwd + bwd, both
    fast backends against one fp64 truth per call (one test per call: pytest -n spreads them, a time limit
    loses only the rest)."""
    backends = _gpu_backends()
    inputs, act = _make_inputs((N, C, H, W), G, torch.float16, True, variant, device='cuda')
    with ops.record_backends() as rec:
        results = _check_against_truth(inputs, G, eps, act, backends)
    assert all(rec[('group_norm', b)] == 1 for b in backends), rec
    assert all(r['y'].is_contiguous(memory_format=torch.channels_last) for r in results.values())
    del inputs, results
    torch.cuda.empty_cache()


SUBSET = [(512, 256, 32, 32, 32, 1e-6, 'ddpmpp_add'), (512, 256, 8, 8, 32, 1e-6, 'norm2_plain'),
          (64, 192, 64, 64, 32, 1e-5, 'adm_scale_shift'), (64, 576, 64, 64, 32, 1e-5, 'norm0_silu'),
          (64, 1344, 8, 8, 32, 1e-5, 'norm0_silu'), (1, 384, 64, 64, 32, 1e-5, 'adm_scale_shift'),
          (3, 48, 7, 5, 8, 1e-5, 'adm_mixed_bcast'), (2, 12, 1, 1, 3, 1e-5, 'ddpmpp_add_bcast')]


@pytest.mark.gpu
@pytest.mark.parametrize('dtype, channels_last', [(torch.float32, False), (torch.float32, True),
                                                  (torch.bfloat16, True), (torch.float16, False),
                                                  (torch.bfloat16, False)])
def test_gpu_other_precisions_and_layouts(dtype, channels_last):
    """fp32/bf16 and NCHW on a subset: small and large maps, clusters (batch 1), odd groups, 1x1 maps."""
    for N, C, H, W, G, eps, variant in SUBSET:
        inputs, act = _make_inputs((N, C, H, W), G, dtype, channels_last, variant, device='cuda')
        for out in _check_against_truth(inputs, G, eps, act, _gpu_backends()).values():
            if channels_last and H * W > 1:
                assert out['y'].is_contiguous(memory_format=torch.channels_last)
            else:
                assert out['y'].is_contiguous()


@pytest.mark.gpu
def test_gpu_misaligned_and_strided_inputs():
    """Storage offsets break 16-byte alignment (narrower vectors); a strided slice is made dense."""
    gen = torch.Generator(device='cuda').manual_seed(5)
    N, C, H, W, G = 4, 96, 12, 12, 8
    storage = (torch.randn(N * C * H * W + 1, generator=gen, device='cuda') * 0.3 + 2).half()
    x = storage[1:].view(N, H, W, C).permute(0, 3, 1, 2)  # channels-last, 2-byte aligned
    assert x.is_contiguous(memory_format=torch.channels_last) and x.data_ptr() % 16
    inputs = dict(x=x, weight=torch.rand(C, generator=gen, device='cuda') + 0.5,
                  bias=torch.randn(C, generator=gen, device='cuda'), pre_add=None, scale=None, shift=None)
    _check_against_truth(inputs, G, 1e-5, 'silu', _gpu_backends())
    inputs['x'] = storage[1:].view(N, C, H, W)
    _check_against_truth(inputs, G, 1e-5, None, _gpu_backends())
    inputs['x'] = (torch.randn(N, 2 * C, H, W, generator=gen, device='cuda') + 1)[:, ::2]
    _check_against_truth(inputs, G, 1e-5, 'silu', _gpu_backends())


@pytest.mark.gpu
@pytest.mark.parametrize('backend', ['cuda', 'triton'])
def test_gpu_backward_is_deterministic(backend):
    _require(backend)
    inputs, act = _make_inputs((64, 384, 32, 32), 32, torch.float16, True, 'adm_scale_shift_bcast', device='cuda')
    dy = torch.randn(inputs['x'].shape, device='cuda')
    first = _run(inputs, 32, 1e-5, act, backend, dy)
    second = _run(inputs, 32, 1e-5, act, backend, dy)
    for k in first:
        assert torch.equal(first[k], second[k]), k


@pytest.mark.gpu
def test_gpu_auto_takes_the_cuda_kernel(monkeypatch):
    _require('cuda')
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    x = torch.randn(8, 64, 16, 16, device='cuda', dtype=torch.float16).to(memory_format=torch.channels_last)
    w, b = torch.ones(64, device='cuda'), torch.zeros(64, device='cuda')
    with ops.record_backends() as rec:
        y = ops.group_norm(x, w, b, 32, 1e-5, act='silu')
    assert rec == {('group_norm', 'cuda'): 1}
    torch.testing.assert_close(y, reference.group_norm(x, w, b, 32, 1e-5, act='silu'), atol=4e-3, rtol=4e-3)


@pytest.mark.gpu
@pytest.mark.parametrize('backend', ['cuda', 'triton'])
def test_gpu_opcheck(backend):
    _require(backend)
    fwd = torch.ops.edm_fast.group_norm_fwd if backend == 'cuda' else torch.ops.edm_fast.group_norm_triton_fwd
    bwd = torch.ops.edm_fast.group_norm_bwd if backend == 'cuda' else torch.ops.edm_fast.group_norm_triton_bwd
    args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in _op_args(grad=False)]
    args = [a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    torch.library.opcheck(fwd, args)
    with torch.no_grad():
        y, mean, rstd = fwd(*args)
    x, w, b, pre_add, scale, shift, G, eps, silu = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    torch.library.opcheck(bwd, (torch.randn_like(y), x, w, b, pre_add, scale, shift, mean, rstd, G, silu, False))


@pytest.mark.gpu
@pytest.mark.parametrize('backend', ['cuda', 'triton'])
def test_gpu_compile_inductor_fullgraph(backend, monkeypatch, request):
    """An ADM block (scale/shift + SiLU, plain SiLU) compiled whole by inductor, forward and backward."""
    _require(backend)
    # fp32 convolutions and matmuls without TF32 (its 10-bit products would swamp the fp32 comparison)
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', False)
    request.addfinalizer(functools.partial(torch.set_float32_matmul_precision, torch.get_float32_matmul_precision()))
    torch.set_float32_matmul_precision('highest')
    torch._dynamo.reset()
    block = networks.UNetBlock(64, 64, 128, adaptive_scale=True).cuda()
    x = torch.randn(4, 64, 16, 16, device='cuda').to(memory_format=torch.channels_last).requires_grad_()
    emb = torch.randn(4, 128, device='cuda')
    monkeypatch.setenv(dispatch.ENV_VAR, f'group_norm={backend}')
    out = torch.compile(block, fullgraph=True)(x, emb)
    out.sum().backward()
    explain = torch._dynamo.explain(block)(x, emb)
    assert explain.graph_break_count == 0
    op = 'group_norm_fwd' if backend == 'cuda' else 'group_norm_triton_fwd'
    assert str(explain.graphs[0].code).count(f'torch.ops.edm_fast.{op}(') == 2  # norm0 and norm1, fused
    monkeypatch.setenv(dispatch.ENV_VAR, 'group_norm=reference')
    x_ref = x.detach().clone().requires_grad_()
    ref = block(x_ref, emb)
    ref.sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-3, rtol=1e-3)
