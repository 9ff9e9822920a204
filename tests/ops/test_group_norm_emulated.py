"""The CUDA GroupNorm kernels (csrc/group_norm/*.cu), unmodified, run on the CPU by the CUDA emulator
(csrc/common/emulator/, driver csrc/group_norm/emulator/group_norm_emulator.cc) under AddressSanitizer, against
the reference: y, mean, rstd and every gradient, with test_group_norm.py's inputs and accuracy rule (error vs an
fp64 truth <= 2x PyTorch's own error at the same precision + 4 ulps). The emulated device is an H100 (132 SMs,
sm_90: clusters of up to 8 blocks) or, with EDM_EMU_CC_MAJOR=8, a GPU without clusters (kmax = 1).

The cases are chosen so that every branch of the host planner (make_plan in group_norm_common.cuh) runs; the
driver prints its plans and test_planner_branches_covered checks that each branch was hit. The emulator runs
every CUDA thread as a fiber on one core (a few microseconds per barrier per thread), so shapes are small; the
preset networks' channel counts and map sizes appear at batch 1-2. --runslow adds every preset call at batch 1,
two at their real batch size, and more precisions and layouts.
"""

import re
import struct

import numpy as np
import pytest
import torch

import cuda_emulator
import test_group_norm as tgn

gn_module = tgn.gn_module
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
NP_DTYPE = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16}


@pytest.fixture(scope='session')
def gn_emulator(tmp_path_factory):
    if cuda_emulator.compiler() is None:
        pytest.skip('no C++ compiler to build the kernel emulator')
    out = str(tmp_path_factory.mktemp('group_norm_emulator'))
    # EDM_GN_HAS_CLUSTERS: what group_norm_common.cuh defines in nvcc's sm_90 device pass (the emulator has no
    # __CUDA_ARCH__), so the cluster code is compiled; EDM_EMU_CC_MAJOR=8 at run time emulates older GPUs.
    return cuda_emulator.build(out, 'group_norm_emulator', ['group_norm/emulator/group_norm_emulator.cc',
                                                             'group_norm/group_norm_fwd.cu',
                                                             'group_norm/group_norm_bwd.cu'],
                               defines=['EDM_GN_HAS_CLUSTERS=1'])


def _raw(t):
    t = t.contiguous()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()


def _from_raw(raw, offset, count, dtype):
    """(tensor of `count` elements at byte `offset`, the offset after them)."""
    t = torch.from_numpy(np.frombuffer(raw, dtype=NP_DTYPE[dtype], count=count, offset=offset).copy())
    return (t.view(torch.bfloat16) if dtype == torch.bfloat16 else t), offset + count * (4 if dtype == F32 else 2)


def _channel_storage(t):
    """(sample stride, channel stride, flat storage spanning exactly the elements of t) for a [B, C, 1, 1] input."""
    B, C = t.shape[:2]
    sn = t.stride(0) if B > 1 else 0  # as group_norm.cpp channel_input
    span = (B - 1) * t.stride(0) + (C - 1) * t.stride(1) + 1
    return sn, t.stride(1), torch.as_strided(t, (span,), (1,)).clone()


def parse_plans(stdout):
    """{'fwd': {...}, 'bwd': {...}} from the driver's `plan` lines, plus 'kmax' and the launches."""
    plans = {'launches': re.findall(r'^launch (.*)$', stdout, re.M)}
    plans['kmax'] = int(re.search(r'^device sms=\d+ kmax=(\d+)$', stdout, re.M)[1])
    for direction, fields in re.findall(r'^plan (fwd|bwd) (.*)$', stdout, re.M):
        plans[direction] = {k: int(v) for k, v in (f.split('=') for f in fields.split())}
    return plans


def emulate(exe, tmp_path, inputs, num_groups, eps, act, dy, need_dadd=True, offsets=(0, 0, 0, 0), kmax1=False,
            seed=0, name='gn', plan_only=False):
    """Forward and backward through the emulated CUDA op. Returns (outputs like test_group_norm._run plus
    'mean'/'rstd', the plans: parse_plans). kmax1: a GPU without clusters; seed: the emulator's schedule (0: in
    order; odd: CTAs and warps run ahead of each other; even: uniformly random); plan_only: (None, plans) without
    running the kernels."""
    x = gn_module._dense(inputs['x'])
    N, C, H, W = x.shape
    P, dtype = H * W, x.dtype
    cl = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)  # group_norm.cpp's rule
    flat = (lambda t: t.permute(0, 2, 3, 1).reshape(-1)) if cl else (lambda t: t.reshape(-1))
    pad = lambda t, off: torch.cat([torch.zeros(off, dtype=dtype), flat(t)])  # noqa: E731
    x_off, y_off, dy_off, dx_off = offsets
    header = struct.pack('<9qd4q', 0x6E01, DTYPE_CODE[dtype], N, C, P, num_groups, int(cl), int(act == 'silu'),
                         int(need_dadd), eps, x_off, y_off, dy_off, dx_off)
    payload = [_raw(pad(x, x_off)), _raw(inputs['weight'].float()), _raw(inputs['bias'].float())]
    present = {}
    for key in ('pre_add', 'scale', 'shift'):
        t = inputs[key]
        if t is None:
            header += struct.pack('<5q', 0, 0, 0, 0, 0)
            continue
        sn, sc, storage = _channel_storage(t)
        present[key] = t.shape[0] < N
        header += struct.pack('<5q', 1, sn, sc, storage.numel(), int(t.shape[0] < N))
        payload.append(_raw(storage))
    dy = dy.to(dtype).contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    payload.append(_raw(pad(dy, dy_off)))
    path_in, path_out = tmp_path / f'{name}_in.bin', tmp_path / f'{name}_out.bin'
    path_in.write_bytes(header + b''.join(payload))
    env = {'EDM_EMU_SEED': str(seed), **({'EDM_EMU_CC_MAJOR': '8'} if kmax1 else {})}
    stdout = cuda_emulator.run(exe, path_in, path_out, env=env, args=['--plan-only'] if plan_only else [])
    if plan_only:
        return None, parse_plans(stdout)
    raw = path_out.read_bytes()
    unflat = (lambda t: t.reshape(N, H, W, C).permute(0, 3, 1, 2)) if cl else (lambda t: t.reshape(N, C, H, W))
    out, o = {}, 0
    y, o = _from_raw(raw, o, N * C * P, dtype)
    out['y'] = unflat(y)
    out['mean'], o = _from_raw(raw, o, N * num_groups, torch.float32)
    out['rstd'], o = _from_raw(raw, o, N * num_groups, torch.float32)
    dx, o = _from_raw(raw, o, N * C * P, dtype)
    out['x'] = unflat(dx)
    out['weight'], o = _from_raw(raw, o, C, torch.float32)
    out['bias'], o = _from_raw(raw, o, C, torch.float32)
    for key in ('pre_add', 'scale', 'shift'):
        if key in present and (key != 'pre_add' or need_dadd):
            g, o = _from_raw(raw, o, (1 if present[key] else N) * C, dtype)
            out[key] = g.reshape(-1, C, 1, 1)
    assert o == len(raw), (o, len(raw))
    return out, parse_plans(stdout)


def features(plans):
    """The planner branches a run took, e.g. 'fwd:cl:vec8', 'bwd:nchw:K>1:loop', 'fwd:nchw:kmax1:resident'."""
    out = set()
    for d in ('fwd', 'bwd'):
        p = plans[d]
        lay = f'{d}:{"cl" if p["cl"] else "nchw"}'
        path = 'loop' if p['chunks'] > 1 else 'resident'
        out |= {f'{lay}:vec{p["vec"]}', f'{lay}:{path}'}
        if p['gpb'] > 1:
            out.add(f'{lay}:gpb>1')
        if p['K'] > 1:
            out.add(f'{lay}:K>1:{path}')
        if plans['kmax'] == 1:
            out.add(f'{lay}:kmax1:{path}')
        if not p['cl']:
            out |= {f'{lay}:segs>1'} if p['segs'] > 1 else set()
            out |= {f'{lay}:tpr<32'} if p['tpr'] < 32 else set()
    return out


ALL_BRANCHES = {f'{d}:{lay}:{b}' for d in ('fwd', 'bwd') for lay in ('cl', 'nchw')
                for b in ('vec1', 'vec2', 'vec4', 'vec8', 'gpb>1', 'resident', 'loop', 'K>1:resident', 'K>1:loop',
                          'kmax1:resident', 'kmax1:loop')} | \
    {f'{d}:nchw:{b}' for d in ('fwd', 'bwd') for b in ('segs>1', 'tpr<32')}


class Case:
    """One emulated call: input shape and options (test_group_norm._make_inputs), and the planner branches it is
    there for (`expect`, names as features() gives them)."""

    def __init__(self, name, shape, groups, dtype, cl, variant, expect=(), kmax1=False, offsets=(0, 0, 0, 0),
                 need_dadd=True, eps=1e-5):
        self.name, self.shape, self.groups, self.dtype, self.cl, self.variant = name, shape, groups, dtype, cl, variant
        self.expect, self.kmax1, self.offsets, self.need_dadd, self.eps = set(expect), kmax1, offsets, need_dadd, eps

    def __repr__(self):
        return self.name


# Each case names the branches it is there for (checked against the plan the driver prints); together they take
# every branch of the planner (test_planner_branches_covered). Preset call sites at batch 1: DDPM++ 256 channels
# at 8x8, ADM 1344 channels (42 per group) at 8x8, 576 (18 per group) at 8x8, 512 at 16x16, 192 at 32x32.
CASES = [
    Case('ddpmpp-256x8x8-f16-cl', (1, 256, 8, 8), 32, F16, True, 'ddpmpp_add', ['fwd:cl:vec8'], eps=1e-6),
    Case('ddpmpp-256x8x8-f16-nchw', (1, 256, 8, 8), 32, F16, False, 'ddpmpp_add_bcast',
         ['fwd:nchw:vec8', 'fwd:nchw:tpr<32'], eps=1e-6),
    Case('adm-1344x8x8-f16-cl', (1, 1344, 8, 8), 32, F16, True, 'norm0_silu', ['fwd:cl:vec2']),
    Case('adm-1344x8x8-f32-nchw', (1, 1344, 8, 8), 32, F32, False, 'norm0_silu', ['fwd:nchw:K>1:resident']),
    Case('adm-576x8x8-f32-cl', (1, 576, 8, 8), 32, F32, True, 'adm_scale_shift', ['fwd:cl:vec2']),
    Case('adm-512x16x16-bf16-cl', (1, 512, 16, 16), 32, BF16, True, 'adm_scale_shift_bcast', ['fwd:cl:K>1:resident']),
    Case('adm-192x32x32-f16-cl', (1, 192, 32, 32), 32, F16, True, 'adm_scale_shift', ['fwd:cl:K>1:resident']),
    Case('odd-48x7x5-f16-nchw', (3, 48, 7, 5), 8, F16, False, 'adm_mixed_bcast', ['fwd:nchw:vec1', 'fwd:nchw:segs>1']),
    Case('odd-48x7x5-bf16-cl', (3, 48, 7, 5), 8, BF16, True, 'ddpmpp_add', ['fwd:cl:vec2']),
    Case('odd-48x5x6-f32-nchw', (2, 48, 5, 6), 3, F32, False, 'norm2_plain', ['fwd:nchw:vec2']),
    Case('1x1-12-f32', (2, 12, 1, 1), 3, F32, True, 'adm_scale_shift', ['fwd:nchw:vec1']),
    Case('1x1-64-f16-gpb', (17, 64, 1, 1), 32, F16, False, 'ddpmpp_add_bcast', ['fwd:nchw:gpb>1']),
    Case('gpb-128x2x2-f16-cl', (17, 128, 2, 2), 32, F16, True, 'ddpmpp_add', ['fwd:cl:gpb>1', 'fwd:cl:vec4']),
    Case('gpb-128x2x2-bf16-nchw', (17, 128, 2, 2), 32, BF16, False, 'adm_scale_shift',
         ['fwd:nchw:gpb>1', 'fwd:nchw:vec4']),
    # Clusters; odd maps leave the last block of a tile (the last segment of a row) partly empty.
    Case('cluster-64x33x31-f32-cl', (1, 64, 33, 31), 2, F32, True, 'ddpmpp_add',
         ['fwd:cl:K>1:resident', 'fwd:cl:vec4']),
    Case('cluster-256x16x16-f16-nchw', (1, 256, 16, 16), 4, F16, False, 'adm_scale_shift', ['fwd:nchw:K>1:resident']),
    Case('cluster7-40x37x29-f16-nchw', (1, 40, 37, 29), 2, F16, False, 'adm_scale_shift_bcast',
         ['fwd:nchw:K>1:resident']),
    Case('cluster-loop-16x48x48-f32-nchw', (1, 16, 48, 48), 1, F32, False, 'norm2_plain',
         ['fwd:nchw:K>1:loop', 'fwd:nchw:vec4']),
    Case('cluster-loop-32x45x47-bf16-cl', (1, 32, 45, 47), 1, BF16, True, 'ddpmpp_add', ['fwd:cl:K>1:loop']),
    Case('kmax1-loop-32x32x32-f32-cl', (2, 32, 32, 32), 2, F32, True, 'adm_scale_shift', ['fwd:cl:kmax1:loop'],
         kmax1=True),
    Case('kmax1-loop-64x16x16-bf16-nchw', (2, 64, 16, 16), 1, BF16, False, 'ddpmpp_add', ['fwd:nchw:kmax1:loop'],
         kmax1=True),
    Case('kmax1-96x8x8-f32-nchw', (1, 96, 8, 8), 2, F32, False, 'norm0_silu', ['fwd:nchw:kmax1:resident'], kmax1=True),
    Case('kmax1-48x6x6-f16-cl', (2, 48, 6, 6), 3, F16, True, 'adm_scale_shift_bcast', ['fwd:cl:kmax1:resident'],
         kmax1=True),
    Case('misaligned-64x6x5-f16-cl', (2, 64, 6, 5), 8, F16, True, 'norm0_silu', ['fwd:cl:vec1'], offsets=(1, 1, 1, 1)),
    Case('misaligned-24x12x12-f16-nchw', (1, 24, 12, 12), 8, F16, False, 'ddpmpp_add', ['fwd:nchw:vec2'],
         offsets=(2, 0, 4, 6)),
    Case('no-pre-add-grad-12x5x3-f32', (2, 12, 5, 3), 3, F32, False, 'ddpmpp_add', need_dadd=False),
]


def _truth_and_torch(inputs, num_groups, eps, act, dy):
    """fp64 truth (on NCHW input: PyTorch's CPU channels-last kernel is less accurate, in fp64 too) and PyTorch's
    own errors at the inputs' precision (NCHW), as test_group_norm._check_against_truth computes them."""
    nchw = {**inputs, 'x': inputs['x'].contiguous()}
    truth = tgn._run(nchw, num_groups, eps, act, 'reference', dy, cast=torch.float64)
    return truth, tgn._errors(tgn._run(nchw, num_groups, eps, act, 'reference', dy), truth)


def _stats_truth(inputs, num_groups, eps):
    """fp64 mean/rstd of v = x + pre_add (added in x.dtype, as the reference) and PyTorch's fp32 statistics."""
    x = inputs['x'].contiguous()
    v = x + inputs['pre_add'] if inputs['pre_add'] is not None else x
    N, C = v.shape[:2]
    vd = v.double().reshape(N, num_groups, -1)
    mean = vd.mean(-1)
    rstd = ((vd - mean[..., None]).square().mean(-1) + eps).rsqrt()
    _, mean32, rstd32 = torch.ops.aten.native_group_norm(v.float(), None, None, N, C, v[0, 0].numel(), num_groups, eps)
    return {'mean': mean.flatten(), 'rstd': rstd.flatten()}, {'mean': mean32.flatten(), 'rstd': rstd32.flatten()}


def _assert_within(what, got, truth, torch_errors, floor):
    err = tgn._errors(got, truth)
    bad = {k: (err[k], torch_errors[k]) for k in truth if not err[k] <= 2 * torch_errors[k] + floor}
    assert not bad, f'{what}: error > 2x PyTorch + {floor:.1e} for {bad}'
    return err


def run_case(exe, tmp_path, case, seed):
    inputs, act = tgn._make_inputs(case.shape, case.groups, case.dtype, case.cl, case.variant, device='cpu')
    dy = torch.randn(case.shape, generator=torch.Generator().manual_seed(1))
    got, plans = emulate(exe, tmp_path, inputs, case.groups, case.eps, act, dy, need_dadd=case.need_dadd,
                         offsets=case.offsets, kmax1=case.kmax1, seed=seed)
    return inputs, act, dy, got, plans


@pytest.mark.parametrize('case', CASES, ids=repr)
def test_emulated_kernels_match_reference(gn_emulator, tmp_path, case):
    # Odd seeds: CTAs and warps run ahead of each other in a random order (csrc/common/emulator/cuda_emu_exec.h).
    _check_case(gn_emulator, tmp_path, case, seed=1 + 2 * CASES.index(case))


def _check_case(exe, tmp_path, case, seed):
    """The emulated op against the fp64 truth: outputs and gradients by test_group_norm's rule, mean and rstd
    against PyTorch's fp32 statistics of the same v = x + pre_add."""
    inputs, act, dy, got, plans = run_case(exe, tmp_path, case, seed)
    assert case.expect <= features(plans), (case.expect - features(plans), plans)
    # The instantiations that ran (the driver has checked grid, block and cluster against the plans).
    for d, launch in zip(('fwd', 'bwd'), plans['launches']):
        vec, cl = re.search(rf'group_norm_{d}_kernel<[^,]+, (\d+), \d+, (true|false)>', launch).groups()
        assert (int(vec), cl == 'true') == (plans[d]['vec'], plans[d]['cl'] == 1), (launch, plans[d])
    truth, err_torch = _truth_and_torch(inputs, case.groups, case.eps, act, dy)
    if not case.need_dadd:
        assert 'pre_add' not in got
        del truth['pre_add'], err_torch['pre_add']
    _assert_within(case.name, {k: got[k] for k in truth}, truth, err_torch, 4 * tgn.EPS[case.dtype])
    stats, stats32 = _stats_truth(inputs, case.groups, case.eps)
    _assert_within(f'{case.name} statistics', got, stats, tgn._errors(stats32, stats), 4 * tgn.EPS[F32])


LARGE_OFFSET_CASES = [  # name, shape, groups, channels_last, kmax1, the branch it is there for
    ('loop-cluster-nchw', (1, 16, 48, 48), 1, False, False, 'fwd:nchw:K>1:loop'),
    ('loop-cluster-cl', (1, 16, 45, 47), 1, True, False, 'fwd:cl:K>1:loop'),
    ('loop-kmax1-cl', (2, 32, 32, 32), 2, True, True, 'fwd:cl:kmax1:loop'),
    ('resident-cluster-cl', (1, 64, 33, 31), 2, True, False, 'fwd:cl:K>1:resident'),
]


@pytest.mark.parametrize('name, shape, groups, cl, kmax1, branch', LARGE_OFFSET_CASES,
                         ids=[c[0] for c in LARGE_OFFSET_CASES])
def test_emulated_stats_survive_large_offsets(gn_emulator, tmp_path, name, shape, groups, cl, kmax1, branch):
    """mean 1000, std 1e-2 in fp32 on the looping and cluster paths.

    The truth is the fp64 reference on x - 1000 (exact in fp32; GroupNorm does not see a per-group offset, and this
    keeps PyTorch's fp64 kernels clear of cancellation). PyTorch's own fp32 error on x itself is ~2e-3 here, 25000x
    its error on the centred input, so the usual 2x-PyTorch rule would accept almost anything: the forward must be
    as accurate as PyTorch is on the centred input (y, rstd), and the mean within an ulp of 1000. The backward keeps
    the usual rule: it recomputes xhat from the forward's fp32 mean, which is off by up to half an ulp of 1000
    (0.3% of the std) in every implementation that passes the mean in fp32, PyTorch's included.
    """
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=gen) * 1e-2 + 1000
    if cl:
        x = x.to(memory_format=torch.channels_last)
    C = shape[1]
    inputs = dict(x=x, weight=torch.rand(C, generator=gen) + 0.5, bias=torch.randn(C, generator=gen), pre_add=None,
                  scale=None, shift=None)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    got, plans = emulate(gn_emulator, tmp_path, inputs, groups, 1e-6, 'silu', dy, kmax1=kmax1, seed=5)
    assert branch in features(plans), plans
    centred = {**inputs, 'x': (x - 1000).contiguous()}
    truth = tgn._run(centred, groups, 1e-6, 'silu', 'reference', dy, cast=torch.float64)
    err_centred = tgn._errors(tgn._run(centred, groups, 1e-6, 'silu', 'reference', dy), truth)
    err_raw = tgn._errors(tgn._run({**inputs, 'x': x.contiguous()}, groups, 1e-6, 'silu', 'reference', dy), truth)
    floor = 4 * tgn.EPS[F32]
    err = _assert_within(f'{name} forward', {'y': got['y']}, {'y': truth['y']}, err_centred, floor)
    err.update(_assert_within(f'{name} backward', got, {k: truth[k] for k in ('x', 'weight', 'bias')}, err_raw, floor))
    stats, stats32 = _stats_truth({**inputs, 'x': x - 1000}, groups, 1e-6)  # of the centred input
    _assert_within(f'{name} rstd', {'rstd': got['rstd']}, {'rstd': stats['rstd']},
                   tgn._errors({'rstd': stats32['rstd']}, {'rstd': stats['rstd']}), floor)
    mean_err = (got['mean'].double() - 1000 - stats['mean']).abs().max().item()
    assert mean_err <= 2.0 ** -14, f'{name}: mean off by {mean_err:.3g} (an ulp of 1000 is 6.1e-5)'


@pytest.mark.parametrize('name', ['cluster-64x33x31-f32-cl', 'cluster7-40x37x29-f16-nchw'])
def test_emulated_kernels_are_deterministic(gn_emulator, tmp_path, name):
    """Bit-identical y, mean, rstd and gradients under three schedules: in order (seed 0), uniformly random (2),
    CTAs and warps running ahead of each other (3). Every sum has a fixed order; no atomics."""
    case = next(c for c in CASES if c.name == name)
    runs = [run_case(gn_emulator, tmp_path, case, seed)[3] for seed in (0, 2, 3)]
    for other in runs[1:]:
        assert runs[0].keys() == other.keys()
        for k in runs[0]:
            assert torch.equal(runs[0][k].view(torch.int16) if runs[0][k].dtype == BF16 else runs[0][k],
                               other[k].view(torch.int16) if other[k].dtype == BF16 else other[k]), k


def test_planner_branches_covered(gn_emulator, tmp_path):
    """The plans of CASES (the driver's --plan-only) take every branch of make_plan: vector widths 1/2/4/8,
    several groups per tile, register-resident and looping tiles, clusters (both paths) and GPUs without
    clusters (both paths), each in both layouts and directions; NCHW rows in several segments and units of
    fewer than 32 lanes."""
    seen = set()
    for case in CASES:
        inputs, act = tgn._make_inputs(case.shape, case.groups, case.dtype, case.cl, case.variant, device='cpu')
        _, plans = emulate(gn_emulator, tmp_path, inputs, case.groups, case.eps, act, torch.zeros(case.shape),
                           offsets=case.offsets, kmax1=case.kmax1, plan_only=True)
        assert case.expect <= features(plans), (case.name, case.expect - features(plans))
        seen |= features(plans)
    assert not ALL_BRANCHES - seen, sorted(ALL_BRANCHES - seen)


def _slow_cases():
    """Every GroupNorm call of the preset networks at batch 1 in the production configuration (fp16, channels-last),
    two at their real batch, and test_group_norm.SUBSET's shapes (batch cut to 2) in the other precisions/layouts."""
    cases = []
    seen = set()
    for N, C, H, W, G, eps, variant in tgn._preset_shapes():
        if (C, H, W, variant) not in seen:
            seen.add((C, H, W, variant))
            cases.append(Case(f'preset-{C}x{H}x{W}-{variant}', (1, C, H, W), G, F16, True, variant, eps=eps))
    cases.append(Case('preset-batch64-768x8x8', (64, 768, 8, 8), 32, F16, True, 'adm_scale_shift'))
    cases.append(Case('preset-batch64-1344x8x8', (64, 1344, 8, 8), 32, F16, True, 'norm0_silu'))
    for N, C, H, W, G, eps, variant in tgn.SUBSET:
        for dtype, cl in ((F32, False), (F32, True), (BF16, True), (F16, False), (BF16, False)):
            cases.append(Case(f'subset-{C}x{H}x{W}-{str(dtype)[6:]}-{"cl" if cl else "nchw"}', (min(N, 2), C, H, W), G,
                              dtype, cl, variant, eps=eps))
    return cases


@pytest.mark.slow
@pytest.mark.parametrize('case', _slow_cases(), ids=repr)
def test_emulated_kernels_match_reference_sweep(gn_emulator, tmp_path, case):
    _check_case(gn_emulator, tmp_path, case, seed=3)


_COMMON = 'group_norm/group_norm_common.cuh'
MUTANTS = {  # name: (patch of the kernel source, case, what must catch it)
    'missing __syncthreads': ((_COMMON, '  s.lgs[tid] = lg;\n  __syncthreads();', '  s.lgs[tid] = lg;'),
                              'cluster7-40x37x29-f16-nchw', 'error >'),
    'missing final cluster.sync': ((_COMMON, '    cluster.sync();  // no block reuses', '    // no block reuses'),
                                   'cluster-64x33x31-f32-cl', 'of the cluster has exited'),
    'rows past the map': ((_COMMON, 'end = imin(t.P, (k + 1) * t.rb);', 'end = (k + 1) * t.rb;'),
                          'cluster-loop-32x45x47-bf16-cl', 'AddressSanitizer: heap-buffer-overflow'),
}


@pytest.mark.slow
@pytest.mark.parametrize('name', list(MUTANTS))
def test_emulation_catches_kernel_bugs(tmp_path, name):
    """The tests above can fail: a missing barrier, a cluster sibling's shared memory read after it exited and
    reads past the end of the map, each put into the real kernel source, are caught (schedule with CTAs and warps
    running ahead: odd seed)."""
    patch, case_name, expect = MUTANTS[name]
    exe = cuda_emulator.build(str(tmp_path), 'mutant', ['group_norm/emulator/group_norm_emulator.cc',
                                                         'group_norm/group_norm_fwd.cu', 'group_norm/group_norm_bwd.cu'],
                              defines=['EDM_GN_HAS_CLUSTERS=1'], patches=[patch])
    with pytest.raises(AssertionError, match=expect):
        _check_case(exe, tmp_path, next(c for c in CASES if c.name == case_name), seed=1)
