"""Triton kernels for depthwise FIR resampling by 2 (the NVlabs Conv2d up/down paths).

Algorithm. Two adjoint primitives, per channel, with an L x L filter f, gain g, padding p:

    down:  y[i, j] = sum_{a,b} g*f[a, b] * x[2i - p + a, 2j - p + b]      (conv2d, stride 2)
    up:    y[o, u] = sum_{a,b} g*f[a, b] * x[(o + p - a)/2, (u + p - b)/2]  (conv_transpose2d, stride 2;
                                                                           only even o + p - a terms)

x is zero outside its H x W map; the output size is passed explicitly. `down` with g=1 is NVlabs' down
path and `up` with g=4 its up path (conv_transpose2d with 4*f). Each is the adjoint of the other with the
same f, g and p (no flip in PyTorch's cross-correlation convention), so the backward of one is the other
with the input's size as output size. The 2-D filter is used as given (no separable split), so any
normalised filter works and the [1,1] paths stay exact: up is pure duplication (g*f = 1) and down
accumulates 0.25*x terms, each exact.

Up runs in polyphase form over output pairs: output o = 2m + s (s = 0, 1) takes x[m + e] with tap
k = s + p - 2e for every e with 0 <= k < L, so one program loads each distinct input offset e once and
feeds the 2 x 2 output phases from registers.

Accumulation. fp32 whatever the I/O dtype (fp16/bf16/fp32 in, same dtype out, one rounding at the store).
Taps are rounded to the I/O dtype first and then scaled by g (what the reference does with
filter.to(x.dtype).mul(4)). Terms are added in row-major tap order with fused multiply-adds starting from
zero: the order and fusion measured for PyTorch's CPU conv2d/conv_transpose2d (for up: tap index
ascending, i.e. input index descending). Other summation orders (GPU convolution algorithms) and the
interpreter (whose FMA is a multiply and an add) differ from it by an ulp or so for non-dyadic taps;
[1,1] products are exact, so those paths depend on the summation order only.

Grid mapping. Program axis 0 runs over rows (NCHW) or positions (NHWC), axis 1 over column or channel
blocks; every tensor keeps the pair structure of the stride-2 index, so loads, arithmetic and stores
share one register layout (compiled for sm_90 with triton 3.7: no shared memory, no spills):
  NCHW (W contiguous). down: tile [BR, BK, 2] of outputs (row = n, c, oh; column ow = 2k + u); each
      filter row is read as 4 contiguous inputs per lane, 2(ow + e) + t, reshaped to [BR, BK, 2, 2] and
      split into the taps b = 2e + t + p it carries. up: tile [BR, BK, 2] of inputs x[m + e] (row = n, c,
      output-row pair; m = 2k + t); the two column phases are joined into 4 contiguous outputs per lane,
      4k + 2t + s, for each of the two output rows.
  NHWC (channels-last, C contiguous): tile [BP positions, BC channels]; a position is one (n, i, j) of
      the output (down) or of the output-pair grid (up). Every load and store is a contiguous run of
      channels (vectorised when C % 16 == 0).

Limits. 4-D inputs in NCHW or channels-last layout (anything else is copied to one of them first),
fp16/bf16/fp32, filter [1, 1, L, L] with 1 <= L <= MAX_TAPS, padding p >= 0 (a constexpr: one
compiled variant per value). Offsets switch to int64 when a tensor has 2**31 elements or more. The
filter is a constant: no gradient flows to it. fp64 is left to the reference (fp32 accumulation).
"""

import os

import torch
import triton
import triton.language as tl

MAX_TAPS = 8
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _tap(f_ptr, idx: tl.constexpr, gain, X_DTYPE: tl.constexpr):
    # The reference casts the filter to the I/O dtype before scaling it: round the tap the same way.
    return tl.load(f_ptr + idx).to(tl.float32).to(X_DTYPE).to(tl.float32) * gain


@triton.jit
def _down_nchw_kernel(x_ptr, f_ptr, y_ptr, gain, R, H, W, OH, OW,
                      L: tl.constexpr, P: tl.constexpr, E_LO: tl.constexpr, E_HI: tl.constexpr,
                      BR: tl.constexpr, BK: tl.constexpr, INT64: tl.constexpr):
    # Tile [BR, BK, 2] of outputs: row = plane * OH + oh, column ow = 2k + u.
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    r = pid * BR + tl.arange(0, BR)
    k = tl.program_id(1) * BK + tl.arange(0, BK)
    r_ok = r < R
    plane = r // OH
    oh = r - plane * OH
    x_plane = plane * H * W
    acc = tl.zeros([BR, BK, 2], dtype=tl.float32)
    for a in tl.static_range(L):
        ih = 2 * oh - P + a
        row_ok = (r_ok & (ih >= 0) & (ih < H))[:, None, None]
        row = (x_plane + ih * W)[:, None, None]
        # Input columns 2(ow + e) + t = 4k + 2e + (2u + t): 4 contiguous inputs per lane, split into the
        # taps b = 2e + t + P they carry (ascending b: the reference's row-major order).
        for e in tl.static_range(E_LO, E_HI + 1):
            iw = (4 * k[:, None] + 2 * e + tl.arange(0, 4)[None, :])[None, :, :]
            v = tl.load(x_ptr + row + iw, mask=row_ok & (iw >= 0) & (iw < W), other=0.0).to(tl.float32)
            v0, v1 = tl.split(tl.reshape(v, [BR, BK, 2, 2]))
            if 2 * e + P >= 0:
                if 2 * e + P < L:
                    acc = tl.fma(v0, _tap(f_ptr, a * L + 2 * e + P, gain, x_ptr.dtype.element_ty), acc)
            if 2 * e + 1 + P >= 0:
                if 2 * e + 1 + P < L:
                    acc = tl.fma(v1, _tap(f_ptr, a * L + 2 * e + 1 + P, gain, x_ptr.dtype.element_ty), acc)
    ow = (2 * k[:, None] + tl.arange(0, 2)[None, :])[None, :, :]
    tl.store(y_ptr + (r * OW)[:, None, None] + ow, acc.to(y_ptr.dtype.element_ty),
             mask=r_ok[:, None, None] & (ow < OW))


@triton.jit
def _nhwc_tile(NP, C, RH, RW, BP: tl.constexpr, BC: tl.constexpr, INT64: tl.constexpr):
    """This program's BP rows q of an [N, RH, RW] grid (q = (n * RH + h) * RW + w, int64 when INT64) and BC
    channels: (q, q < NP, c, c < C, n, h, w)."""
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    q = pid * BP + tl.arange(0, BP)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    n = q // (RH * RW)
    rem = q - n * (RH * RW)
    h = rem // RW
    return q, q < NP, c, c < C, n, h, rem - h * RW


@triton.jit
def _down_nhwc_kernel(x_ptr, f_ptr, y_ptr, gain, NP, C, H, W, OH, OW,
                      L: tl.constexpr, P: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr,
                      INT64: tl.constexpr):
    q, q_ok, c, c_ok, n, oh, ow = _nhwc_tile(NP, C, OH, OW, BP, BC, INT64)  # q = (n * OH + oh) * OW + ow
    acc = tl.zeros([BP, BC], dtype=tl.float32)
    for a in tl.static_range(L):
        ih = 2 * oh - P + a
        row_ok = q_ok & (ih >= 0) & (ih < H)
        row = (n * H + ih) * W
        for b in tl.static_range(L):
            iw = 2 * ow - P + b
            ok = row_ok & (iw >= 0) & (iw < W)
            v = tl.load(x_ptr + ((row + iw) * C)[:, None] + c[None, :], mask=ok[:, None] & c_ok[None, :],
                        other=0.0)
            acc = tl.fma(v.to(tl.float32), _tap(f_ptr, a * L + b, gain, x_ptr.dtype.element_ty), acc)
    tl.store(y_ptr + (q * C)[:, None] + c[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=q_ok[:, None] & c_ok[None, :])


@triton.jit
def _phase_fma(acc, v, f_ptr, gain, KH: tl.constexpr, KW: tl.constexpr, L: tl.constexpr, X_DTYPE: tl.constexpr):
    # Adds tap (KH, KW) times v to one output phase when the tap exists (compile-time decision).
    if KH >= 0:
        if KH < L:
            if KW >= 0:
                if KW < L:
                    acc = tl.fma(v, _tap(f_ptr, KH * L + KW, gain, X_DTYPE), acc)
    return acc


@triton.jit
def _up_nchw_kernel(x_ptr, f_ptr, y_ptr, gain, R, H, W, OH, OW, MH,
                    L: tl.constexpr, P: tl.constexpr, E_LO: tl.constexpr, E_HI: tl.constexpr,
                    BR: tl.constexpr, BK: tl.constexpr, INT64: tl.constexpr):
    # Tile [BR, BK, 2]: row = plane * MH + mh (output rows 2mh, 2mh + 1), column pair m = 2k + t
    # (output columns 2m, 2m + 1). Keeping the (k, t) split in every tensor gives the loads (2 inputs
    # per lane) and the stores (4 outputs per lane) one common register layout.
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    r = pid * BR + tl.arange(0, BR)
    k = tl.program_id(1) * BK + tl.arange(0, BK)
    m = (2 * k[:, None] + tl.arange(0, 2)[None, :])[None, :, :]
    r_ok = r < R
    plane = r // MH
    mh = r - plane * MH
    x_plane = plane * H * W
    acc00 = tl.zeros([BR, BK, 2], dtype=tl.float32)
    acc01 = tl.zeros([BR, BK, 2], dtype=tl.float32)
    acc10 = tl.zeros([BR, BK, 2], dtype=tl.float32)
    acc11 = tl.zeros([BR, BK, 2], dtype=tl.float32)
    # e descending = tap index k = s + P - 2e ascending: row-major tap order within every phase.
    for eh in tl.static_range(E_HI, E_LO - 1, -1):
        ih = mh + eh
        row_ok = (r_ok & (ih >= 0) & (ih < H))[:, None, None]
        row = (x_plane + ih * W)[:, None, None]
        for ew in tl.static_range(E_HI, E_LO - 1, -1):
            iw = m + ew
            v = tl.load(x_ptr + row + iw, mask=row_ok & (iw >= 0) & (iw < W), other=0.0).to(tl.float32)
            acc00 = _phase_fma(acc00, v, f_ptr, gain, P - 2 * eh, P - 2 * ew, L, x_ptr.dtype.element_ty)
            acc01 = _phase_fma(acc01, v, f_ptr, gain, P - 2 * eh, 1 + P - 2 * ew, L, x_ptr.dtype.element_ty)
            acc10 = _phase_fma(acc10, v, f_ptr, gain, 1 + P - 2 * eh, P - 2 * ew, L, x_ptr.dtype.element_ty)
            acc11 = _phase_fma(acc11, v, f_ptr, gain, 1 + P - 2 * eh, 1 + P - 2 * ew, L, x_ptr.dtype.element_ty)
    # Join the column phases s: [BR, BK, 2, 2] -> [BR, BK, 4] holds outputs 2m + s = 4k + 2t + s, so each
    # lane stores 4 contiguous outputs.
    ow = (4 * k[:, None] + tl.arange(0, 4)[None, :])[None, :, :]
    ow_ok = ow < OW
    y_plane = plane * OH * OW
    oh = 2 * mh
    out = tl.reshape(tl.join(acc00, acc01), [BR, BK, 4]).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + (y_plane + oh * OW)[:, None, None] + ow, out, mask=(r_ok & (oh < OH))[:, None, None] & ow_ok)
    oh = oh + 1
    out = tl.reshape(tl.join(acc10, acc11), [BR, BK, 4]).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + (y_plane + oh * OW)[:, None, None] + ow, out, mask=(r_ok & (oh < OH))[:, None, None] & ow_ok)


@triton.jit
def _up_nhwc_kernel(x_ptr, f_ptr, y_ptr, gain, NP, C, H, W, OH, OW, MH, MW,
                    L: tl.constexpr, P: tl.constexpr, E_LO: tl.constexpr, E_HI: tl.constexpr,
                    BP: tl.constexpr, BC: tl.constexpr, INT64: tl.constexpr):
    q, q_ok, c, c_ok, n, mh, mw = _nhwc_tile(NP, C, MH, MW, BP, BC, INT64)  # pair q = (n * MH + mh) * MW + mw
    acc00 = tl.zeros([BP, BC], dtype=tl.float32)
    acc01 = tl.zeros([BP, BC], dtype=tl.float32)
    acc10 = tl.zeros([BP, BC], dtype=tl.float32)
    acc11 = tl.zeros([BP, BC], dtype=tl.float32)
    for eh in tl.static_range(E_HI, E_LO - 1, -1):
        ih = mh + eh
        row_ok = q_ok & (ih >= 0) & (ih < H)
        row = (n * H + ih) * W
        for ew in tl.static_range(E_HI, E_LO - 1, -1):
            iw = mw + ew
            ok = row_ok & (iw >= 0) & (iw < W)
            v = tl.load(x_ptr + ((row + iw) * C)[:, None] + c[None, :], mask=ok[:, None] & c_ok[None, :],
                        other=0.0).to(tl.float32)
            acc00 = _phase_fma(acc00, v, f_ptr, gain, P - 2 * eh, P - 2 * ew, L, x_ptr.dtype.element_ty)
            acc01 = _phase_fma(acc01, v, f_ptr, gain, P - 2 * eh, 1 + P - 2 * ew, L, x_ptr.dtype.element_ty)
            acc10 = _phase_fma(acc10, v, f_ptr, gain, 1 + P - 2 * eh, P - 2 * ew, L, x_ptr.dtype.element_ty)
            acc11 = _phase_fma(acc11, v, f_ptr, gain, 1 + P - 2 * eh, 1 + P - 2 * ew, L, x_ptr.dtype.element_ty)
    oh = 2 * mh
    ow = 2 * mw
    y_row = n * OH + oh
    ok_h0 = q_ok & (oh < OH)
    ok_h1 = q_ok & (oh + 1 < OH)
    ok_w0 = ow < OW
    ok_w1 = ow + 1 < OW
    yt = y_ptr.dtype.element_ty
    cm = c_ok[None, :]
    base = y_ptr + c[None, :]
    tl.store(base + ((y_row * OW + ow) * C)[:, None], acc00.to(yt), mask=(ok_h0 & ok_w0)[:, None] & cm)
    tl.store(base + ((y_row * OW + ow + 1) * C)[:, None], acc01.to(yt), mask=(ok_h0 & ok_w1)[:, None] & cm)
    tl.store(base + (((y_row + 1) * OW + ow) * C)[:, None], acc10.to(yt), mask=(ok_h1 & ok_w0)[:, None] & cm)
    tl.store(base + (((y_row + 1) * OW + ow + 1) * C)[:, None], acc11.to(yt), mask=(ok_h1 & ok_w1)[:, None] & cm)


# ----------------------------------------------------------------------------------------------------
# Host side: layout, tile sizes, launches.

# (elements per program, warps per program) for each direction and layout; for up the elements are output
# pairs per phase, a quarter of the outputs. The interpreter pays per program instance, so it gets larger
# tiles. force_int64 exercises the 64-bit offset path on small tensors (tests).
# bench/bench_resample.py --sweep times alternatives on a GPU.
CONFIG = {'down_nhwc': (2048, 4), 'down_nchw': (1024, 4), 'up_nhwc': (1024, 4), 'up_nchw': (1024, 4),
          'interpret_block': 8192, 'force_int64': False}


def _interpreting(x):
    return x.device.type == 'cpu' and os.environ.get('TRITON_INTERPRET') == '1'


def _pow2_at_most(n, cap):
    return min(triton.next_power_of_2(max(int(n), 1)), cap)


def _strides_like_channels_last(x):
    """PyTorch's rule (is_channels_last_strides_2d) for which memory format a 4-D tensor's strides suggest."""
    sizes, strides = x.shape, x.stride()
    if strides[1] == 0:
        return False
    lo = 0
    for d in (1, 3, 2, 0):
        if sizes[d] == 0 or strides[d] < lo:
            return False
        if d == 0 and lo == strides[1]:
            return False
        lo = strides[d] * (sizes[d] if sizes[d] > 1 else 1)
    return True


def memory_format(x):
    """channels_last when x's strides suggest it (as PyTorch decides for convolutions), else contiguous."""
    return torch.channels_last if _strides_like_channels_last(x) else torch.contiguous_format


def _channel_block(c, cap):
    low = c & -c  # largest power of two dividing C: no half-empty channel blocks when C = 192, 576 ...
    return min(low, cap) if low >= 16 else _pow2_at_most(c, cap)


def _launch(kind, x, f, padding, gain, out_h, out_w):
    if x.dim() != 4 or x.dtype not in _DTYPES:
        raise ValueError(f'resample ({kind}): expected a 4-D fp16/bf16/fp32 tensor, got {x.dtype} {tuple(x.shape)}')
    L = f.shape[-1]
    if f.dim() != 4 or tuple(f.shape[:2]) != (1, 1) or f.shape[-2] != L or not 1 <= L <= MAX_TAPS:
        raise ValueError(f'resample ({kind}): expected a [1, 1, L, L] filter with L <= {MAX_TAPS}, '
                         f'got {tuple(f.shape)}')
    if padding < 0:
        raise ValueError(f'resample ({kind}): padding must be >= 0, got {padding}')
    if f.device != x.device:
        raise ValueError(f'resample ({kind}): filter on {f.device}, input on {x.device}')
    fmt = memory_format(x)
    x = x.contiguous(memory_format=fmt)
    f = f.reshape(L * L).contiguous()
    if f.dtype not in _DTYPES:
        f = f.to(torch.float32)
    n, c, h, w = x.shape
    y = torch.empty((n, c, out_h, out_w), dtype=x.dtype, device=x.device, memory_format=fmt)
    if y.numel() == 0:
        return y
    if x.numel() == 0:
        return y.zero_()
    int64 = CONFIG['force_int64'] or max(x.numel(), y.numel()) >= 2 ** 31
    block, warps = CONFIG[f'{kind}_{"nhwc" if fmt == torch.channels_last else "nchw"}']
    if _interpreting(x):
        block = CONFIG['interpret_block'] // (4 if kind == 'up' else 1)
    if kind == 'down':
        if fmt == torch.channels_last:
            bc = _channel_block(c, 128)
            bp = max(1, block // bc)
            grid = (triton.cdiv(n * out_h * out_w, bp), triton.cdiv(c, bc))
            _down_nhwc_kernel[grid](x, f, y, float(gain), n * out_h * out_w, c, h, w, out_h, out_w,
                                    L=L, P=padding, BP=bp, BC=bc, INT64=int64, num_warps=warps)
        else:
            # taps b = 2e + t + p over input pairs e (t = 0, 1)
            e_lo, e_hi = -((1 + padding) // 2), (L - 1 - padding) // 2
            bk = _pow2_at_most((out_w + 1) // 2, 32)
            br = max(1, block // (2 * bk))
            grid = (triton.cdiv(n * c * out_h, br), triton.cdiv(out_w, 2 * bk))
            _down_nchw_kernel[grid](x, f, y, float(gain), n * c * out_h, h, w, out_h, out_w,
                                    L=L, P=padding, E_LO=e_lo, E_HI=e_hi, BR=br, BK=bk, INT64=int64,
                                    num_warps=warps)
        return y
    # up: output pairs m, o = 2m + s takes x[m + e] with tap s + p - 2e; e spans E_LO..E_HI.
    mh, mw = (out_h + 1) // 2, (out_w + 1) // 2
    e_lo, e_hi = -((L - 1 - padding) // 2), (1 + padding) // 2
    if fmt == torch.channels_last:
        bc = _channel_block(c, 128)
        bp = max(1, block // bc)
        grid = (triton.cdiv(n * mh * mw, bp), triton.cdiv(c, bc))
        _up_nhwc_kernel[grid](x, f, y, float(gain), n * mh * mw, c, h, w, out_h, out_w, mh, mw,
                              L=L, P=padding, E_LO=e_lo, E_HI=e_hi, BP=bp, BC=bc, INT64=int64, num_warps=warps)
    else:
        bk = _pow2_at_most((mw + 1) // 2, 32)
        br = max(1, block // (2 * bk))
        grid = (triton.cdiv(n * c * mh, br), triton.cdiv(mw, 2 * bk))
        _up_nchw_kernel[grid](x, f, y, float(gain), n * c * mh, h, w, out_h, out_w, mh,
                              L=L, P=padding, E_LO=e_lo, E_HI=e_hi, BR=br, BK=bk, INT64=int64, num_warps=warps)
    return y


def fir_down(x, f, padding, gain, out_h, out_w):
    """y[i, j] = sum_ab gain*f[a, b] * x[2i - padding + a, 2j - padding + b]; y: [N, C, out_h, out_w] in x's
    dtype and memory format. x: [N, C, H, W] fp16/bf16/fp32 (CUDA, or CPU under TRITON_INTERPRET=1)."""
    return _launch('down', x, f, padding, gain, out_h, out_w)


def fir_up(x, f, padding, gain, out_h, out_w):
    """y[o, u] = sum_ab gain*f[a, b] * x[(o + padding - a)/2, (u + padding - b)/2] over even numerators
    (conv_transpose2d with stride 2); y: [N, C, out_h, out_w] in x's dtype and memory format."""
    return _launch('up', x, f, padding, gain, out_h, out_w)
