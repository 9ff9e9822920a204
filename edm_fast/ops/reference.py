"""Plain-PyTorch implementations of every edm_fast op: the source of truth.

Each function computes exactly what the NVlabs EDM layers compute, with the same torch calls in the
same order and dtype, so the reference backend reproduces the official numbers (see
../shared/spec/EDM_REFERENCE.md §1 and the test vectors). Fast backends are checked against these.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F


def linear(x, weight, bias=None):
    """y = x @ weight.T (+ bias), parameters cast to x.dtype. x: [..., in], weight: [out, in]."""
    x = x @ weight.to(x.dtype).t()
    if bias is not None:
        x = x.add_(bias.to(x.dtype))
    return x


def conv2d(x, weight, bias=None, padding=0):
    """Plain 2-D convolution with the parameters cast to x.dtype (bias added after, in place)."""
    x = F.conv2d(x, weight.to(x.dtype), padding=padding)
    if bias is not None:
        x = x.add_(bias.to(x.dtype).reshape(1, -1, 1, 1))
    return x


def resample(x, filter, up=1, down=1, padding=0):
    """Depthwise FIR resampling by 2 with a normalised 2-D filter [1, 1, L, L].

    up=2: transposed depthwise conv with 4x the filter, stride 2 (nearest x2 for the [1,1] filter).
    down=2: depthwise conv with the filter, stride 2 (2x2 average pooling for [1,1]).
    One copy of the filter per channel of x; `padding` as NVlabs passes it for each call site.
    """
    if (up, down) not in ((2, 1), (1, 2)):
        raise ValueError(f'resample: expected up=2 or down=2 (exactly one), got up={up}, down={down}')
    f = filter.to(x.dtype)
    c = x.shape[1]
    if up == 2:
        return F.conv_transpose2d(x, f.mul(4).tile([c, 1, 1, 1]), groups=c, stride=2, padding=padding)
    return F.conv2d(x, f.tile([c, 1, 1, 1]), groups=c, stride=2, padding=padding)


def group_norm(x, weight, bias, num_groups, eps, pre_add=None, scale=None, shift=None, act=None):
    """GroupNorm with the optional fusions used by the U-Nets.

    y = group_norm(x + pre_add) ; y = shift + y * (scale + 1) ; y = act(y)
    pre_add, scale, shift: [N or 1, C, 1, 1] in x's dtype. act: None or 'silu'.
    """
    if pre_add is not None:
        x = x + pre_add
    y = F.group_norm(x, num_groups=num_groups, weight=weight.to(x.dtype), bias=bias.to(x.dtype), eps=eps)
    if scale is not None or shift is not None:
        if scale is None or shift is None:
            raise ValueError('group_norm: scale and shift go together (ADM adaptive scale)')
        y = torch.addcmul(shift, y, scale + 1)
    if act == 'silu':
        y = F.silu(y)
    elif act is not None:
        raise ValueError(f'group_norm: unsupported activation {act!r}; expected None or "silu"')
    return y


class AttentionOp(torch.autograd.Function):
    """Attention weights softmax_k(q^T k / sqrt(c)) with NVlabs numerics.

    q: [B, c, Q], k: [B, c, K] -> w: [B, Q, K] in q.dtype. Logits and softmax are computed in fp32
    whatever the input dtype; k is scaled by 1/sqrt(c) in its own dtype first. The backward is
    computed in fp32 from w and cast back, dq and dk each divided by sqrt(c) after the cast.
    """

    @staticmethod
    def forward(ctx, q, k):
        w = torch.einsum('ncq,nck->nqk', q.to(torch.float32),
                         (k / np.sqrt(k.shape[1])).to(torch.float32)).softmax(dim=2).to(q.dtype)
        ctx.save_for_backward(q, k, w)
        return w

    @staticmethod
    def backward(ctx, dw):
        q, k, w = ctx.saved_tensors
        db = torch._softmax_backward_data(grad_output=dw.to(torch.float32), output=w.to(torch.float32),
                                          dim=2, input_dtype=torch.float32)
        dq = torch.einsum('nck,nqk->ncq', k.to(torch.float32), db).to(q.dtype) / np.sqrt(k.shape[1])
        dk = torch.einsum('ncq,nqk->nck', q.to(torch.float32), db).to(k.dtype) / np.sqrt(k.shape[1])
        return dq, dk


def attention_weights(q, k):
    """AttentionOp.apply(q, k); see AttentionOp."""
    return AttentionOp.apply(q, k)


def attention(qkv, num_heads):
    """Multi-head self-attention on the qkv conv output, as the U-Net blocks compute it.

    qkv: [N, 3C, H, W] with q/k/v interleaved per channel inside each head (channel index
    head*(3C/heads) + c*3 + j, j = 0 q, 1 k, 2 v). Returns [N, C, H, W] (head-major channels), the
    input of the proj conv. The weighted sum with v runs in the I/O dtype.
    """
    n, c3, h, w_ = qkv.shape
    c = c3 // 3
    q, k, v = qkv.reshape(n * num_heads, c // num_heads, 3, -1).unbind(2)
    w = AttentionOp.apply(q, k)
    a = torch.einsum('nqk,nck->ncq', w, v)
    return a.reshape(n, c, h, w_)


# ---- EDM2 (magnitude-preserving networks, spec §10.1) -------------------------------------------------------

def mp_normalize(x, dim=None, eps=1e-4):
    """x / (eps + RMS(x)) over `dim` (default: every dim but the first), the norm taken in fp32.

    x: any float tensor; returns x.dtype. eps is added to the RMS, not inside a square root. Pixel norm is
    mp_normalize(x, dim=1); weight normalisation per output channel is the default (NVlabs edm2 `normalize`).
    """
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


def mp_normalize_qkv(qkv, num_heads):
    """Pixel norm of each of q, k and v over the C/heads channels of its head; same shape, strides and dtype."""
    n, c3, h, w = qkv.shape
    y = mp_normalize(qkv.reshape(n, num_heads, -1, 3, h * w), dim=2)
    return y.reshape(n, c3, h, w)


def mp_attention(qkv, num_heads):
    """EDM2 self-attention from the qkv conv output: [N, 3C, H, W] -> [N, C, H, W] (head-major channels).

    q/k/v are interleaved per channel inside each head (view [N, heads, C/heads, 3, HW]); each is
    pixel-normalised over its C/heads channels; weights softmax_k(q.k / sqrt(C/heads)) are computed in the
    I/O dtype (no fp32 upcast, unlike EDM's `attention`).
    """
    n, _, h, w = qkv.shape
    y = qkv.reshape(n, num_heads, -1, 3, h * w)
    q, k, v = mp_normalize(y, dim=2).unbind(3)
    weights = torch.einsum('nhcq,nhck->nhqk', q, k / math.sqrt(q.shape[2])).softmax(dim=3)
    y = torch.einsum('nhqk,nhck->nhcq', weights, v)
    return y.reshape(n, -1, h, w)
