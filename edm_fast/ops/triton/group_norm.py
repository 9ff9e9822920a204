"""Triton GroupNorm fused with its U-Net neighbours: y = act(shift + group_norm(x + pre_add) * (scale + 1)).

Algorithm. One program owns GPB whole groups of one sample: a tile of [pixels, GPB*Cg channels] addressed
through (sample, channel, pixel) strides, so the same kernel serves NCHW (pixel stride 1) and channels-last
(channel stride 1); several groups per program give channels-last rows of at least ~64 bytes.
  forward   for each chunk of BLOCK_P pixels, mean and M2 in registers by the corrected two-pass algorithm
            (mean0 = sum/n, then sum(v - mean0) recovers the rounding of that sum and
            M2 = sum (v - mean0)^2 - n*corr^2), merged across chunks with Chan's parallel formula as offsets
            from the group's first element (so the mean keeps its low bits when |mean| >> std); never
            E[x^2] - E[x]^2. Then, per channel, y = act((v - mean) * A + B), A = rstd*w*s1,
            B = b*s1 + shift, s1 = scale + 1 (centred first: folding the mean into B cancels
            catastrophically when |mean| >> std). A group that fits one chunk stays in registers (x is
            read once); a larger one is read again for the second pass (from L2 while it fits there).
  backward  per channel S1 = sum_p du, S2 = sum_p du*xhat (du = dy * silu'(u)); the group means of
            dxhat = du*w*s1 and dxhat*xhat follow from them, then dx = rstd*(dxhat - m1 - xhat*m2) and,
            for the pre-add gradient, S3 = sum_p dx. A second kernel reduces the fp32 [N, C] sums over the
            batch into the weight/bias gradients (and broadcast scale/shift/pre-add ones) in a fixed order:
            deterministic, no atomics.
Grid: one program per (sample, block of GPB groups); the parameter-gradient kernel one per BLOCK_C channels. A
forward or backward whose groups exceed one chunk runs split instead (CONFIG['split_fwd'], ['split_bwd']): one
program per (tile, chunk) for the chunk sums, then one per (tile, chunk) that merges them in chunk order and
computes its chunk's output.
Precision: everything in fp32 right after loading (bf16 arithmetic is also unreliable in the interpreter).
As the reference casts weight/bias to x.dtype and computes x + pre_add and scale + 1 in x.dtype, those
values are rounded to x.dtype before use; nothing else is rounded until the output.
Limits: 4-D inputs, C divisible by num_groups, at most MAX_GROUP_CHANNELS channels per group.
"""

import os

import torch
import triton
import triton.language as tl

MAX_GROUP_CHANNELS = 8192
# Kernels defined under TRITON_INTERPRET=1 run through the interpreter on CPU tensors (and only there).
INTERPRETED = os.environ.get('TRITON_INTERPRET') == '1'
# (elements per chunk, elements per warp) of each direction. A group that fits one chunk stays in registers (x is
# read once); a larger one is streamed chunk by chunk and read again for the second pass, from L2 while the data
# in flight fits there (not at ADM 64x64's 24576-element groups). Warps follow from the chunk: one per `elements
# per warp` (32 per thread at 1024), at most 16. Compiled for sm_90 (bench/kernel_resources.py), the forward at
# DDPM++ 512x256x32x32 fp16 channels-last keeps each 8192-element group resident with 8 warps, 79 registers and
# 3 programs per SM (the backward: 128 registers, 2 per SM). The H100 measured 30% of copy bandwidth with 16384-
# element chunks (16 warps, 112 registers, 1 program per SM, so each SM's loads, reductions and stores took turns)
# and 2-byte accesses. Smaller chunks give more programs per SM but stream, so x is read twice: 4096 gives 4 per SM.
# The interpreter pays per program instead, so it keeps large chunks. Not yet timed on a GPU:
# bench/bench_group_norm.py --sweep times the alternatives.
# split_fwd, split_bwd: a group larger than one chunk is handled by one program per (tile, chunk) in two kernels
# (chunk sums, then merge and apply) rather than by one program looping over the tile (_gn_fwd_stats_kernel,
# _gn_bwd_sums_kernel).
CONFIG = {'fwd': (8192, 1024), 'bwd': (8192, 1024), 'interpret_fwd': (16384, 512), 'interpret_bwd': (8192, 512),
          'split_fwd': True, 'split_bwd': True}


def _next_pow2(v):
    return 1 << max(0, int(v) - 1).bit_length()


def channels_last(x):
    """True when x is laid out channels-last (and not also plain contiguous, as 1x1 maps are)."""
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _tile_config(N, C, G, P, esize, cl, max_tile, warp_elems=512, min_programs=1):
    """(groups per program, BLOCK_P, BLOCK_CW, BLOCK_G, number of chunks, num_warps)."""
    Cg = C // G
    single = max(2, _next_pow2(Cg)) * _next_pow2(P)
    # Channels-last: neighbouring groups share every pixel row, so take enough of them for rows of >= 64
    # bytes. NCHW groups are contiguous already; only tiny ones (1x1 maps) are batched.
    want_cols = max(Cg, 64 // esize) if cl else Cg
    gpb = 1
    for d in range(1, G + 1):
        if G % d:
            continue
        cols = d * Cg
        fits = cols <= want_cols if cl else cols * P <= 1024
        # Keep a group that fits one chunk in registers rather than trading that for wider rows, and keep
        # enough programs to fill the GPU.
        keeps_resident = max(2, _next_pow2(cols)) * _next_pow2(P) <= max_tile or single > max_tile
        if fits and keeps_resident and (d == 1 or N * (G // d) >= min_programs):
            gpb = d
    block_cw = max(2, _next_pow2(gpb * Cg))
    block_p = max(2, min(_next_pow2(P), max_tile // block_cw))  # aranges of >= 2 (size 1 is fragile)
    chunks = triton.cdiv(P, block_p)
    num_warps = max(1, min(16, block_p * block_cw // warp_elems))
    return gpb, block_p, block_cw, max(2, _next_pow2(gpb)), chunks, num_warps


def _config(x, direction):
    """(elements per chunk, elements per warp) for x's device."""
    return CONFIG[f'interpret_{direction}' if INTERPRETED and x.device.type == 'cpu' else direction]


def _min_programs(x):
    """Programs that keep every SM busy: two per SM on a GPU (the interpreter runs them one by one)."""
    if x.device.type != 'cuda':
        return 1
    return 2 * torch.cuda.get_device_properties(x.device).multi_processor_count


def _layout(x):
    """(channels_last, strides of sample, channel, pixel) for a dense 4-D x."""
    N, C, H, W = x.shape
    P = H * W
    cl = channels_last(x)
    return cl, (C * P, 1, C) if cl else (C * P, P, 1)


def _bcast_strides(t):
    """(sample stride, channel stride) of a [N or 1, C, 1, 1] tensor; sample stride 0 when broadcast."""
    if t is None:
        return 0, 0
    return (t.stride(0) if t.shape[0] > 1 else 0), t.stride(1)


@triton.jit
def _onehot(Cg: tl.constexpr, GPB: tl.constexpr, BLOCK_CW: tl.constexpr, BLOCK_G: tl.constexpr):
    """Column index, valid-column mask and the [BLOCK_CW, BLOCK_G] column->group indicator matrix."""
    cw = tl.arange(0, BLOCK_CW)
    col_ok = cw < GPB * Cg
    hot = ((cw // Cg)[:, None] == tl.arange(0, BLOCK_G)[None, :]) & col_ok[:, None]
    return cw, col_ok, hot.to(tl.float32)


@triton.jit
def _channel_params(w_ptr, b_ptr, scale_ptr, shift_ptr, n, c, col_ok, sc_sn, sc_sc, sh_sn, sh_sc, dtype,
                    HAS_SS: tl.constexpr):
    """Per-column w, b (rounded to x.dtype like the reference's cast), scale + 1 (rounded) and shift."""
    w = tl.load(w_ptr + c, mask=col_ok, other=0.0).to(tl.float32).to(dtype).to(tl.float32)
    b = tl.load(b_ptr + c, mask=col_ok, other=0.0).to(tl.float32).to(dtype).to(tl.float32)
    if HAS_SS:
        s1 = tl.load(scale_ptr + n * sc_sn + c * sc_sc, mask=col_ok, other=0.0).to(tl.float32)
        s1 = (s1 + 1.0).to(dtype).to(tl.float32)
        sh = tl.load(shift_ptr + n * sh_sn + c * sh_sc, mask=col_ok, other=0.0).to(tl.float32)
    else:
        s1 = tl.where(col_ok, 1.0, 0.0)
        sh = tl.zeros_like(s1)
    return w, b, s1, sh


@triton.jit
def _load_v(x_ptr, base, a, p, sxp, m, dtype, HAS_ADD: tl.constexpr):
    """v = x (+ pre_add, rounded to x.dtype as the reference adds in x.dtype), 0 outside the mask."""
    v = tl.load(x_ptr + base[None, :] + p[:, None] * sxp, mask=m, other=0.0).to(tl.float32)
    if HAS_ADD:
        v = tl.where(m, (v + a[None, :]).to(dtype).to(tl.float32), 0.0)
    return v


@triton.jit
def _chunk_stats(v, m, hot, count):
    """Per-group (mean0, correction, M2) of one chunk (count elements per group), corrected two-pass:
    mean = mean0 + correction, where the correction sum(v - mean0)/count recovers the rounding error of the
    first sum (|mean| >> std in fp32) and M2 = sum (v - mean0)^2 - count*correction^2."""
    gmean = tl.sum(tl.sum(v, axis=0)[:, None] * hot, axis=0) / count
    d = tl.where(m, v - tl.sum(hot * gmean[None, :], axis=1)[None, :], 0.0)
    corr = tl.sum(tl.sum(d, axis=0)[:, None] * hot, axis=0) / count
    gm2 = tl.maximum(tl.sum(tl.sum(d * d, axis=0)[:, None] * hot, axis=0) - count * corr * corr, 0.0)
    return gmean, corr, gm2


@triton.jit
def _silu(u):
    return u * tl.sigmoid(u)


@triton.jit
def _tile(add_ptr, G, Cg: tl.constexpr, GPB: tl.constexpr, sxn, sxc, add_sn, add_sc, BLOCK_CW: tl.constexpr,
          BLOCK_G: tl.constexpr, HAS_ADD: tl.constexpr):
    """This program's tile: sample n, first group g0, the tile's channel columns (cw within the tile, c absolute,
    col_ok, the group one-hot), the int64 offsets of the columns' (n, c) origins and the pre-add per column."""
    pid = tl.program_id(0)
    tiles = G // GPB
    n = pid // tiles
    g0 = (pid % tiles) * GPB
    cw, col_ok, hot = _onehot(Cg, GPB, BLOCK_CW, BLOCK_G)
    # Cg and GPB are compile-time constants: the compiler then knows the tile's first column is a multiple of
    # GPB * Cg and which columns are valid, so channels-last rows load and store as 16-byte vectors (with runtime
    # values every access was a 2-byte one: bench/kernel_resources.py).
    c = (pid % tiles) * (GPB * Cg) + cw
    base = n.to(tl.int64) * sxn + c * sxc
    if HAS_ADD:
        a = tl.load(add_ptr + n * add_sn + c * add_sc, mask=col_ok, other=0.0).to(tl.float32)
    else:
        a = tl.zeros([BLOCK_CW], tl.float32)
    return n, g0, cw, col_ok, hot, c, base, a


@triton.jit
def _chunk_counts(ch, P, Cg: tl.constexpr, BLOCK_P: tl.constexpr):
    """Elements per group before chunk ch (every chunk but the last is full) and in chunk ch."""
    return ch * BLOCK_P * Cg * 1.0, (tl.minimum(P - ch * BLOCK_P, BLOCK_P) * Cg).to(tl.float32)


@triton.jit
def _group_shift(x_ptr, add_ptr, n, g0, sxn, sxc, add_sn, add_sc, Cg: tl.constexpr, GPB: tl.constexpr,
                 BLOCK_G: tl.constexpr, HAS_ADD: tl.constexpr):
    """A value near each group's mean (its first element v) that chunked statistics are taken relative to: a
    chunk's mean minus it is exact, so the merged mean is kept as shift + small offset, as precise as the resident
    path's mean + mean_lo even when |mean| >> std (a merged plain mean would carry an error of ulp(mean))."""
    gi = tl.arange(0, BLOCK_G)
    c = (g0 + gi) * Cg
    ok = gi < GPB
    v = tl.load(x_ptr + n.to(tl.int64) * sxn + c * sxc, mask=ok, other=0.0).to(tl.float32)
    if HAS_ADD:
        v = (v + tl.load(add_ptr + n * add_sn + c * add_sc, mask=ok, other=0.0).to(tl.float32)).to(
            x_ptr.dtype.element_ty).to(tl.float32)
    return v


@triton.jit
def _chan_merge(mean, m2, count, mean_b, m2_b, count_b):
    """Chan's parallel formula: (mean, M2) of count elements merged with a chunk's (mean_b, M2_b) of count_b."""
    total = count + count_b
    delta = mean_b - mean
    return mean + delta * (count_b / total), m2 + m2_b + delta * delta * (count * count_b / total)


@triton.jit
def _fold_affine(w, b, s1, sh, hot, mean, mean_lo, rstd):
    """Per column: the group mean and y = (v - mean) * A + B with A = rstd*w*s1, B = b*s1 + shift - mean_lo*A."""
    A = tl.sum(hot * rstd[None, :], axis=1) * w * s1
    return tl.sum(hot * mean[None, :], axis=1), A, b * s1 + sh - tl.sum(hot * mean_lo[None, :], axis=1) * A


@triton.jit
def _store_y(y_ptr, v, base, p, sxp, m, c_mean, A, B, SILU: tl.constexpr):
    # Padding lanes (v = 0) would give huge |u|: zero them so the SiLU never overflows there.
    u = tl.where(m, (v - c_mean[None, :]) * A[None, :] + B[None, :], 0.0)
    if SILU:
        u = _silu(u)
    tl.store(y_ptr + base[None, :] + p[:, None] * sxp, u.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _gn_fwd_kernel(x_ptr, y_ptr, w_ptr, b_ptr, add_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr,
                   P, G, sxn, sxc, sxp, add_sn, add_sc, sc_sn, sc_sc, sh_sn, sh_sc, eps, num_chunks,
                   Cg: tl.constexpr, GPB: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_CW: tl.constexpr,
                   BLOCK_G: tl.constexpr, HAS_ADD: tl.constexpr, HAS_SS: tl.constexpr, SILU: tl.constexpr,
                   ONE_CHUNK: tl.constexpr):
    n, g0, cw, col_ok, hot, c, base, a = _tile(add_ptr, G, Cg, GPB, sxn, sxc, add_sn, add_sc, BLOCK_CW, BLOCK_G,
                                               HAS_ADD)
    dtype = x_ptr.dtype.element_ty
    rows = tl.arange(0, BLOCK_P)

    if ONE_CHUNK:
        m = (rows < P)[:, None] & col_ok[None, :]
        v = _load_v(x_ptr, base, a, rows, sxp, m, dtype, HAS_ADD)
        # The mean as mean + mean_lo: v - mean is exact for v near the mean, then mean_lo is subtracted.
        mean, mean_lo, m2 = _chunk_stats(v, m, hot, P * Cg * 1.0)
    else:
        mean = _group_shift(x_ptr, add_ptr, n, g0, sxn, sxc, add_sn, add_sc, Cg, GPB, BLOCK_G, HAS_ADD)
        mean_lo = tl.zeros([BLOCK_G], tl.float32)  # the mean is mean + mean_lo: the shift plus a merged offset
        m2 = tl.zeros([BLOCK_G], tl.float32)
        for ch in range(0, num_chunks):
            p = ch * BLOCK_P + rows
            mc = (p < P)[:, None] & col_ok[None, :]
            vc = _load_v(x_ptr, base, a, p, sxp, mc, dtype, HAS_ADD)
            count, count_b = _chunk_counts(ch, P, Cg, BLOCK_P)
            mean_b, corr_b, m2_b = _chunk_stats(vc, mc, hot, count_b)
            mean_lo, m2 = _chan_merge(mean_lo, m2, count, (mean_b - mean) + corr_b, m2_b, count_b)
    rstd = 1.0 / tl.sqrt(m2 / (P * Cg * 1.0) + eps)
    gi = tl.arange(0, BLOCK_G)
    tl.store(mean_ptr + n * G + g0 + gi, mean + mean_lo, mask=gi < GPB)
    tl.store(rstd_ptr + n * G + g0 + gi, rstd, mask=gi < GPB)

    w, b, s1, sh = _channel_params(w_ptr, b_ptr, scale_ptr, shift_ptr, n, c, col_ok, sc_sn, sc_sc, sh_sn, sh_sc,
                                   dtype, HAS_SS)
    c_mean, A, B = _fold_affine(w, b, s1, sh, hot, mean, mean_lo, rstd)
    if ONE_CHUNK:
        _store_y(y_ptr, v, base, rows, sxp, m, c_mean, A, B, SILU)
    else:
        for ch in range(0, num_chunks):
            p = ch * BLOCK_P + rows
            mc = (p < P)[:, None] & col_ok[None, :]
            _store_y(y_ptr, _load_v(x_ptr, base, a, p, sxp, mc, dtype, HAS_ADD), base, p, sxp, mc, c_mean, A, B,
                     SILU)


# Split forward, for groups larger than one chunk: program (tile, chunk) instead of one program looping over a
# tile's chunks, so a few large groups (ADM 64x64 at batch 64: 512 tiles of 16 chunks) still fill the GPU. The
# stats kernel writes each chunk's (mean minus the group's shift, M2) per group; the apply kernel merges a tile's
# partials in chunk order with the same formula as the loop (so both paths give bit-identical results), then
# normalises its chunk.
@triton.jit
def _gn_fwd_stats_kernel(x_ptr, add_ptr, part_ptr, P, G, sxn, sxc, sxp, add_sn, add_sc, num_chunks,
                         Cg: tl.constexpr, GPB: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_CW: tl.constexpr,
                         BLOCK_G: tl.constexpr, HAS_ADD: tl.constexpr):
    n, g0, cw, col_ok, hot, c, base, a = _tile(add_ptr, G, Cg, GPB, sxn, sxc, add_sn, add_sc, BLOCK_CW, BLOCK_G,
                                               HAS_ADD)
    ch = tl.program_id(1)
    p = ch * BLOCK_P + tl.arange(0, BLOCK_P)
    m = (p < P)[:, None] & col_ok[None, :]
    v = _load_v(x_ptr, base, a, p, sxp, m, x_ptr.dtype.element_ty, HAS_ADD)
    _, count_b = _chunk_counts(ch, P, Cg, BLOCK_P)
    mean_b, corr_b, m2_b = _chunk_stats(v, m, hot, count_b)
    gi = tl.arange(0, BLOCK_G)
    part = part_ptr + ((n * G + g0 + gi) * num_chunks + ch) * 2  # [N, G, chunks, (mean, M2)] fp32
    shift = _group_shift(x_ptr, add_ptr, n, g0, sxn, sxc, add_sn, add_sc, Cg, GPB, BLOCK_G, HAS_ADD)
    tl.store(part, (mean_b - shift) + corr_b, mask=gi < GPB)  # offset from the group's shift, as the loop
    tl.store(part + 1, m2_b, mask=gi < GPB)


@triton.jit
def _gn_fwd_apply_kernel(x_ptr, y_ptr, w_ptr, b_ptr, add_ptr, scale_ptr, shift_ptr, part_ptr, mean_ptr, rstd_ptr,
                         P, G, sxn, sxc, sxp, add_sn, add_sc, sc_sn, sc_sc, sh_sn, sh_sc, eps, num_chunks,
                         Cg: tl.constexpr, GPB: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_CW: tl.constexpr,
                         BLOCK_G: tl.constexpr, HAS_ADD: tl.constexpr, HAS_SS: tl.constexpr, SILU: tl.constexpr):
    n, g0, cw, col_ok, hot, c, base, a = _tile(add_ptr, G, Cg, GPB, sxn, sxc, add_sn, add_sc, BLOCK_CW, BLOCK_G,
                                               HAS_ADD)
    dtype = x_ptr.dtype.element_ty
    gi = tl.arange(0, BLOCK_G)
    g_ok = gi < GPB
    mean = _group_shift(x_ptr, add_ptr, n, g0, sxn, sxc, add_sn, add_sc, Cg, GPB, BLOCK_G, HAS_ADD)
    mean_lo = tl.zeros([BLOCK_G], tl.float32)
    m2 = tl.zeros([BLOCK_G], tl.float32)
    part = part_ptr + (n * G + g0 + gi) * num_chunks * 2
    for k in range(0, num_chunks):
        count, count_b = _chunk_counts(k, P, Cg, BLOCK_P)
        mean_lo, m2 = _chan_merge(mean_lo, m2, count, tl.load(part + 2 * k, mask=g_ok, other=0.0),
                                  tl.load(part + 2 * k + 1, mask=g_ok, other=0.0), count_b)
    rstd = 1.0 / tl.sqrt(m2 / (P * Cg * 1.0) + eps)
    ch = tl.program_id(1)
    if ch == 0:
        tl.store(mean_ptr + n * G + g0 + gi, mean + mean_lo, mask=g_ok)
        tl.store(rstd_ptr + n * G + g0 + gi, rstd, mask=g_ok)
    w, b, s1, sh = _channel_params(w_ptr, b_ptr, scale_ptr, shift_ptr, n, c, col_ok, sc_sn, sc_sc, sh_sn, sh_sc,
                                   dtype, HAS_SS)
    c_mean, A, B = _fold_affine(w, b, s1, sh, hot, mean, mean_lo, rstd)
    p = ch * BLOCK_P + tl.arange(0, BLOCK_P)
    m = (p < P)[:, None] & col_ok[None, :]
    _store_y(y_ptr, _load_v(x_ptr, base, a, p, sxp, m, dtype, HAS_ADD), base, p, sxp, m, c_mean, A, B, SILU)


@triton.jit
def _bwd_chunk(dy_ptr, x_ptr, base, a, p, sxp, m, c_mean, c_rstd, w, b, s1, sh, dtype,
               HAS_ADD: tl.constexpr, SILU: tl.constexpr):
    """(du, xhat) of one chunk, zero outside the mask."""
    v = _load_v(x_ptr, base, a, p, sxp, m, dtype, HAS_ADD)
    dy = tl.load(dy_ptr + base[None, :] + p[:, None] * sxp, mask=m, other=0.0).to(tl.float32)
    xhat = tl.where(m, (v - c_mean[None, :]) * c_rstd[None, :], 0.0)
    if SILU:
        u = (xhat * w[None, :] + b[None, :]) * s1[None, :] + sh[None, :]
        sig = tl.sigmoid(u)
        dy = dy * sig * (1.0 + u * (1.0 - sig))
    return dy, xhat


@triton.jit
def _bwd_tile(add_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, G, sxn, sxc, add_sn, add_sc, sc_sn,
              sc_sc, sh_sn, sh_sc, dtype, Cg: tl.constexpr, GPB: tl.constexpr, BLOCK_CW: tl.constexpr,
              BLOCK_G: tl.constexpr, HAS_ADD: tl.constexpr, HAS_SS: tl.constexpr):
    """The tile of _tile plus its per-column parameters and forward statistics."""
    n, g0, cw, col_ok, hot, c, base, a = _tile(add_ptr, G, Cg, GPB, sxn, sxc, add_sn, add_sc, BLOCK_CW, BLOCK_G,
                                               HAS_ADD)
    w, b, s1, sh = _channel_params(w_ptr, b_ptr, scale_ptr, shift_ptr, n, c, col_ok, sc_sn, sc_sc, sh_sn, sh_sc,
                                   dtype, HAS_SS)
    c_mean = tl.load(mean_ptr + n * G + g0 + cw // Cg, mask=col_ok, other=0.0)
    c_rstd = tl.load(rstd_ptr + n * G + g0 + cw // Cg, mask=col_ok, other=0.0)
    return n, col_ok, hot, c, base, a, w, b, s1, sh, c_mean, c_rstd


@triton.jit
def _group_means(ws1, sum1, sum2, hot, inv_count):
    """Group means of dxhat = du*w*s1 and of dxhat*xhat from the per-column sums, broadcast back to the columns."""
    m1 = tl.sum(hot * (tl.sum((ws1 * sum1)[:, None] * hot, axis=0) * inv_count)[None, :], axis=1)
    m2 = tl.sum(hot * (tl.sum((ws1 * sum2)[:, None] * hot, axis=0) * inv_count)[None, :], axis=1)
    return m1, m2


@triton.jit
def _store_dx(dx_ptr, du, xhat, base, p, sxp, m, c_rstd, ws1, m1, m2):
    """dx = rstd*(dxhat - m1 - xhat*m2) of one chunk, stored; returns its per-column sum (the pre-add gradient)."""
    dx = tl.where(m, c_rstd[None, :] * (ws1[None, :] * du - m1[None, :] - xhat * m2[None, :]), 0.0)
    tl.store(dx_ptr + base[None, :] + p[:, None] * sxp, dx.to(dx_ptr.dtype.element_ty), mask=m)
    return tl.sum(dx, axis=0)


@triton.jit
def _gn_bwd_kernel(dy_ptr, x_ptr, dx_ptr, w_ptr, b_ptr, add_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr,
                   sum1_ptr, sum2_ptr, sum3_ptr,
                   P, C, G, sxn, sxc, sxp, add_sn, add_sc, sc_sn, sc_sc, sh_sn, sh_sc, num_chunks,
                   Cg: tl.constexpr, GPB: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_CW: tl.constexpr,
                   BLOCK_G: tl.constexpr, HAS_ADD: tl.constexpr, HAS_SS: tl.constexpr, SILU: tl.constexpr,
                   NEED_DADD: tl.constexpr, ONE_CHUNK: tl.constexpr):
    dtype = x_ptr.dtype.element_ty
    n, col_ok, hot, c, base, a, w, b, s1, sh, c_mean, c_rstd = _bwd_tile(
        add_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, G, sxn, sxc, add_sn, add_sc, sc_sn, sc_sc,
        sh_sn, sh_sc, dtype, Cg, GPB, BLOCK_CW, BLOCK_G, HAS_ADD, HAS_SS)
    rows = tl.arange(0, BLOCK_P)

    if ONE_CHUNK:
        m = (rows < P)[:, None] & col_ok[None, :]
        du, xhat = _bwd_chunk(dy_ptr, x_ptr, base, a, rows, sxp, m, c_mean, c_rstd, w, b, s1, sh, dtype,
                              HAS_ADD, SILU)
        sum1 = tl.sum(du, axis=0)
        sum2 = tl.sum(du * xhat, axis=0)
    else:
        sum1 = tl.zeros([BLOCK_CW], tl.float32)
        sum2 = tl.zeros([BLOCK_CW], tl.float32)
        for ch in range(0, num_chunks):
            p = ch * BLOCK_P + rows
            mc = (p < P)[:, None] & col_ok[None, :]
            duc, xhatc = _bwd_chunk(dy_ptr, x_ptr, base, a, p, sxp, mc, c_mean, c_rstd, w, b, s1, sh, dtype,
                                    HAS_ADD, SILU)
            sum1 += tl.sum(duc, axis=0)
            sum2 += tl.sum(duc * xhatc, axis=0)
    tl.store(sum1_ptr + n * C + c, sum1, mask=col_ok)
    tl.store(sum2_ptr + n * C + c, sum2, mask=col_ok)

    ws1 = w * s1
    m1, m2 = _group_means(ws1, sum1, sum2, hot, 1.0 / (P * Cg * 1.0))
    if ONE_CHUNK:
        sum3 = _store_dx(dx_ptr, du, xhat, base, rows, sxp, m, c_rstd, ws1, m1, m2)
    else:
        sum3 = tl.zeros([BLOCK_CW], tl.float32)
        for ch in range(0, num_chunks):
            p = ch * BLOCK_P + rows
            mc = (p < P)[:, None] & col_ok[None, :]
            duc, xhatc = _bwd_chunk(dy_ptr, x_ptr, base, a, p, sxp, mc, c_mean, c_rstd, w, b, s1, sh, dtype,
                                    HAS_ADD, SILU)
            sum3 += _store_dx(dx_ptr, duc, xhatc, base, p, sxp, mc, c_rstd, ws1, m1, m2)
    if NEED_DADD:
        tl.store(sum3_ptr + n * C + c, sum3, mask=col_ok)


# Split backward, for groups larger than one chunk (as the split forward): the sums kernel writes each chunk's
# per-channel sums of du and du*xhat ([N, chunks, 2, C]); the apply kernel adds a sample's partials in chunk order
# (as the loop does, so both paths agree bit for bit), computes dx for its chunk and writes that chunk's per-channel
# sum of dx ([N, chunks, C]), which the parameter-gradient kernel adds in chunk order.
@triton.jit
def _gn_bwd_sums_kernel(dy_ptr, x_ptr, w_ptr, b_ptr, add_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, part_ptr,
                        P, C, G, sxn, sxc, sxp, add_sn, add_sc, sc_sn, sc_sc, sh_sn, sh_sc, num_chunks,
                        Cg: tl.constexpr, GPB: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_CW: tl.constexpr,
                        BLOCK_G: tl.constexpr, HAS_ADD: tl.constexpr, HAS_SS: tl.constexpr, SILU: tl.constexpr):
    dtype = x_ptr.dtype.element_ty
    n, col_ok, hot, c, base, a, w, b, s1, sh, c_mean, c_rstd = _bwd_tile(
        add_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, G, sxn, sxc, add_sn, add_sc, sc_sn, sc_sc,
        sh_sn, sh_sc, dtype, Cg, GPB, BLOCK_CW, BLOCK_G, HAS_ADD, HAS_SS)
    ch = tl.program_id(1)
    p = ch * BLOCK_P + tl.arange(0, BLOCK_P)
    m = (p < P)[:, None] & col_ok[None, :]
    du, xhat = _bwd_chunk(dy_ptr, x_ptr, base, a, p, sxp, m, c_mean, c_rstd, w, b, s1, sh, dtype, HAS_ADD, SILU)
    part = part_ptr + (n * num_chunks + ch) * 2 * C + c
    tl.store(part, tl.sum(du, axis=0), mask=col_ok)
    tl.store(part + C, tl.sum(du * xhat, axis=0), mask=col_ok)


@triton.jit
def _gn_bwd_apply_kernel(dy_ptr, x_ptr, dx_ptr, w_ptr, b_ptr, add_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr,
                         part_ptr, sum1_ptr, sum2_ptr, sum3_ptr,
                         P, C, G, sxn, sxc, sxp, add_sn, add_sc, sc_sn, sc_sc, sh_sn, sh_sc, num_chunks,
                         Cg: tl.constexpr, GPB: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_CW: tl.constexpr,
                         BLOCK_G: tl.constexpr, HAS_ADD: tl.constexpr, HAS_SS: tl.constexpr, SILU: tl.constexpr,
                         NEED_DADD: tl.constexpr):
    dtype = x_ptr.dtype.element_ty
    n, col_ok, hot, c, base, a, w, b, s1, sh, c_mean, c_rstd = _bwd_tile(
        add_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, G, sxn, sxc, add_sn, add_sc, sc_sn, sc_sc,
        sh_sn, sh_sc, dtype, Cg, GPB, BLOCK_CW, BLOCK_G, HAS_ADD, HAS_SS)
    sum1 = tl.zeros([BLOCK_CW], tl.float32)
    sum2 = tl.zeros([BLOCK_CW], tl.float32)
    for k in range(0, num_chunks):
        part = part_ptr + (n * num_chunks + k) * 2 * C + c
        sum1 += tl.load(part, mask=col_ok, other=0.0)
        sum2 += tl.load(part + C, mask=col_ok, other=0.0)
    ch = tl.program_id(1)
    if ch == 0:
        tl.store(sum1_ptr + n * C + c, sum1, mask=col_ok)
        tl.store(sum2_ptr + n * C + c, sum2, mask=col_ok)
    ws1 = w * s1
    m1, m2 = _group_means(ws1, sum1, sum2, hot, 1.0 / (P * Cg * 1.0))
    p = ch * BLOCK_P + tl.arange(0, BLOCK_P)
    m = (p < P)[:, None] & col_ok[None, :]
    du, xhat = _bwd_chunk(dy_ptr, x_ptr, base, a, p, sxp, m, c_mean, c_rstd, w, b, s1, sh, dtype, HAS_ADD, SILU)
    sum3 = _store_dx(dx_ptr, du, xhat, base, p, sxp, m, c_rstd, ws1, m1, m2)
    if NEED_DADD:
        tl.store(sum3_ptr + (n * num_chunks + ch) * C + c, sum3, mask=col_ok)


@triton.jit
def _gn_param_grad_kernel(sum1_ptr, sum2_ptr, sum3_ptr, x_ptr, w_ptr, b_ptr, scale_ptr, sc_sn, sc_sc,
                          dw_ptr, db_ptr, dscale_ptr, dshift_ptr, dadd_ptr, N, C, K,
                          BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, HAS_SS: tl.constexpr,
                          SCALE_BCAST: tl.constexpr, SHIFT_BCAST: tl.constexpr, NEED_DADD: tl.constexpr,
                          ADD_BCAST: tl.constexpr):
    """Reduce the [N, C] channel sums over the batch, BLOCK_N samples at a time, in a fixed order."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    dtype = x_ptr.dtype.element_ty
    w = tl.load(w_ptr + c, mask=c_ok, other=0.0).to(tl.float32).to(dtype).to(tl.float32)
    b = tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32).to(dtype).to(tl.float32)
    dw = tl.zeros([BLOCK_C], tl.float32)
    db = tl.zeros([BLOCK_C], tl.float32)
    dscale = tl.zeros([BLOCK_C], tl.float32)
    dshift = tl.zeros([BLOCK_C], tl.float32)
    dadd = tl.zeros([BLOCK_C], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        ok = (n < N)[:, None] & c_ok[None, :]
        nc = n[:, None] * C + c[None, :]
        s1 = tl.load(sum1_ptr + nc, mask=ok, other=0.0)
        s2 = tl.load(sum2_ptr + nc, mask=ok, other=0.0)
        if HAS_SS:
            k = tl.load(scale_ptr + n[:, None] * sc_sn + c[None, :] * sc_sc, mask=ok, other=0.0).to(tl.float32)
            k = (k + 1.0).to(dtype).to(tl.float32)
            dw += tl.sum(k * s2, axis=0)
            db += tl.sum(k * s1, axis=0)
            ds = w[None, :] * s2 + b[None, :] * s1   # d(scale) = sum_p du * (xhat*w + b)
            if SCALE_BCAST:
                dscale += tl.sum(ds, axis=0)
            else:
                tl.store(dscale_ptr + nc, ds.to(dscale_ptr.dtype.element_ty), mask=ok)
            if SHIFT_BCAST:
                dshift += tl.sum(s1, axis=0)
            else:
                tl.store(dshift_ptr + nc, s1.to(dshift_ptr.dtype.element_ty), mask=ok)
        else:
            dw += tl.sum(s2, axis=0)
            db += tl.sum(s1, axis=0)
        if NEED_DADD:
            # sum3: [N, K, C], K chunk partials per sample (1 unless the backward ran split), added in order.
            s3 = tl.load(sum3_ptr + n[:, None] * K * C + c[None, :], mask=ok, other=0.0)
            for k in range(1, K):
                s3 += tl.load(sum3_ptr + (n[:, None] * K + k) * C + c[None, :], mask=ok, other=0.0)
            if ADD_BCAST:
                dadd += tl.sum(s3, axis=0)
            else:
                tl.store(dadd_ptr + nc, s3.to(dadd_ptr.dtype.element_ty), mask=ok)
    tl.store(dw_ptr + c, dw.to(dw_ptr.dtype.element_ty), mask=c_ok)
    tl.store(db_ptr + c, db.to(db_ptr.dtype.element_ty), mask=c_ok)
    if HAS_SS:
        if SCALE_BCAST:
            tl.store(dscale_ptr + c, dscale.to(dscale_ptr.dtype.element_ty), mask=c_ok)
        if SHIFT_BCAST:
            tl.store(dshift_ptr + c, dshift.to(dshift_ptr.dtype.element_ty), mask=c_ok)
    if NEED_DADD:
        if ADD_BCAST:
            tl.store(dadd_ptr + c, dadd.to(dadd_ptr.dtype.element_ty), mask=c_ok)


def forward(x, weight, bias, pre_add, scale, shift, num_groups, eps, silu):
    """(y, mean [N, G] fp32, rstd [N, G] fp32). x: dense NCHW or channels-last [N, C, H, W]; y in x's layout."""
    N, C, H, W = x.shape
    P, G = H * W, num_groups
    cl, (sxn, sxc, sxp) = _layout(x)
    gpb, block_p, block_cw, block_g, chunks, num_warps = _tile_config(N, C, G, P, x.element_size(), cl,
                                                                      *_config(x, 'fwd'), _min_programs(x))
    y = torch.empty_like(x)
    mean = torch.empty((N, G), device=x.device, dtype=torch.float32)
    rstd = torch.empty((N, G), device=x.device, dtype=torch.float32)
    w = weight.to(torch.float32).contiguous()
    b = bias.to(torch.float32).contiguous()
    has_ss = scale is not None
    add, sc, sh = pre_add if pre_add is not None else x, scale if has_ss else x, shift if has_ss else x
    tiles = N * (G // gpb)
    tile = dict(Cg=C // G, GPB=gpb, BLOCK_P=block_p, BLOCK_CW=block_cw, BLOCK_G=block_g, HAS_ADD=pre_add is not None,
                num_warps=num_warps)
    flags = dict(HAS_SS=has_ss, SILU=bool(silu))
    strides = (*_bcast_strides(pre_add), *_bcast_strides(scale), *_bcast_strides(shift))
    if chunks > 1 and CONFIG['split_fwd']:
        part = torch.empty((N, G, chunks, 2), device=x.device, dtype=torch.float32)
        _gn_fwd_stats_kernel[(tiles, chunks)](x, add, part, P, G, sxn, sxc, sxp, *strides[:2], chunks, **tile)
        _gn_fwd_apply_kernel[(tiles, chunks)](x, y, w, b, add, sc, sh, part, mean, rstd, P, G, sxn, sxc, sxp,
                                              *strides, float(eps), chunks, **tile, **flags)
    else:
        _gn_fwd_kernel[(tiles,)](x, y, w, b, add, sc, sh, mean, rstd, P, G, sxn, sxc, sxp, *strides, float(eps),
                                 chunks, **tile, **flags, ONE_CHUNK=chunks == 1)
    return y, mean, rstd


def backward(dy, x, weight, bias, pre_add, scale, shift, mean, rstd, num_groups, silu, need_pre_add_grad):
    """(dx, dweight, dbias, dpre_add, dscale, dshift); absent gradients are empty tensors.

    x: dense [N, C, H, W]; dy any layout (made x's); mean, rstd: the forward's [N, G] statistics.
    """
    N, C, H, W = x.shape
    P, G = H * W, num_groups
    cl, (sxn, sxc, sxp) = _layout(x)
    dy = dy.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    gpb, block_p, block_cw, block_g, chunks, num_warps = _tile_config(N, C, G, P, x.element_size(), cl,
                                                                      *_config(x, 'bwd'), _min_programs(x))
    dx = torch.empty_like(x)
    f32 = dict(device=x.device, dtype=torch.float32)
    need_dadd = bool(need_pre_add_grad) and pre_add is not None
    split = chunks > 1 and CONFIG['split_bwd']
    parts = chunks if split else 1  # sum3 partials per sample
    sum1, sum2 = torch.empty((N, C), **f32), torch.empty((N, C), **f32)
    sum3 = torch.empty((N, parts, C), **f32) if need_dadd else sum1
    w = weight.to(torch.float32).contiguous()
    b = bias.to(torch.float32).contiguous()
    has_ss = scale is not None
    add, sc, sh = pre_add if pre_add is not None else x, scale if has_ss else x, shift if has_ss else x
    tiles = N * (G // gpb)
    args = (P, C, G, sxn, sxc, sxp, *_bcast_strides(pre_add), *_bcast_strides(scale), *_bcast_strides(shift), chunks)
    meta = dict(Cg=C // G, GPB=gpb, BLOCK_P=block_p, BLOCK_CW=block_cw, BLOCK_G=block_g, HAS_ADD=pre_add is not None,
                HAS_SS=has_ss, SILU=bool(silu), num_warps=num_warps)
    if split:
        part = torch.empty((N, chunks, 2, C), **f32)
        _gn_bwd_sums_kernel[(tiles, chunks)](dy, x, w, b, add, sc, sh, mean, rstd, part, *args, **meta)
        _gn_bwd_apply_kernel[(tiles, chunks)](dy, x, dx, w, b, add, sc, sh, mean, rstd, part, sum1, sum2, sum3,
                                              *args, **meta, NEED_DADD=need_dadd)
    else:
        _gn_bwd_kernel[(tiles,)](dy, x, dx, w, b, add, sc, sh, mean, rstd, sum1, sum2, sum3, *args, **meta,
                                 NEED_DADD=need_dadd, ONE_CHUNK=chunks == 1)

    empty = lambda: x.new_empty(0)  # noqa: E731  (a fresh one each: operator outputs must not alias)
    dweight = torch.empty_like(weight, memory_format=torch.contiguous_format)
    dbias = torch.empty_like(bias, memory_format=torch.contiguous_format)
    dscale = scale.new_empty(scale.shape) if has_ss else empty()
    dshift = shift.new_empty(shift.shape) if has_ss else empty()
    dpre_add = pre_add.new_empty(pre_add.shape) if need_dadd else empty()
    block_c = min(128, max(2, _next_pow2(C)))
    block_n = max(2, min(_next_pow2(N), 4096 // block_c))
    _gn_param_grad_kernel[(triton.cdiv(C, block_c),)](
        sum1, sum2, sum3, x, w, b, scale if has_ss else x, *_bcast_strides(scale),
        dweight, dbias, dscale if has_ss else dweight, dshift if has_ss else dweight,
        dpre_add if need_dadd else dweight, N, C, parts,
        BLOCK_N=block_n, BLOCK_C=block_c, HAS_SS=has_ss, SCALE_BCAST=has_ss and scale.shape[0] < N,
        SHIFT_BCAST=has_ss and shift.shape[0] < N, NEED_DADD=need_dadd, ADD_BCAST=need_dadd and pre_add.shape[0] < N,
        num_warps=4)
    return dx, dweight, dbias, dpre_add, dscale, dshift
