"""edm_fast.ops.attention: U-Net self-attention from the interleaved qkv tensor.

Providers of `attention(qkv, num_heads)`:
  reference  NVlabs numerics (ops/reference.py): fp32 logits and softmax, weights and A.V in the I/O dtype.
  sdpa       torch.nn.functional.scaled_dot_product_attention on q/k/v de-interleaved by one permute-copy;
             `sdpa_backend=` picks PyTorch's flash / efficient / cudnn / math kernel (default: PyTorch's choice).
  cuda       the fused kernels of edm_fast._C (csrc/attention/): read the interleaved qkv directly (NCHW or
             channels-last), online softmax with fp32 statistics, write the head-major output; fp16/bf16 on
             tensor cores, fp32 on FMA; backward by recomputation from the saved logsumexp.
The fast providers are not bit-identical to NVlabs (which rounds the weights before A.V); their error against an
fp64 truth is what tests/ops/test_attention.py bounds.
"""

import math

import torch

from .. import _ext
from . import dispatch, reference

SDPA_BACKENDS = ('flash', 'efficient', 'cudnn', 'math')

# Schemas of the CUDA ops, exactly as csrc/registration.cpp defines them (a test checks that they match).
FWD_SCHEMA = 'attention_fwd(Tensor qkv, int num_heads) -> (Tensor out, Tensor lse)'
BWD_SCHEMA = 'attention_bwd(Tensor grad_out, Tensor qkv, Tensor out, Tensor lse, int num_heads) -> Tensor grad_qkv'


def attention(qkv, num_heads, *, backend=None, sdpa_backend=None):
    """Multi-head self-attention of the U-Net blocks: qkv [N, 3C, H, W] -> [N, C, H, W].

    qkv is the qkv conv output, q/k/v interleaved per channel inside each head (channel head*(3C/heads) + 3c + j,
    j = 0 q, 1 k, 2 v), NCHW or channels-last, fp32/fp16/bf16. Returns softmax(q^T k / sqrt(C/heads)) applied to v,
    channels head-major (head*(C/heads) + c), the input of the block's proj conv; the fast providers return it in
    qkv's memory format. `backend`: 'reference', 'sdpa', 'cuda' or None (EDM_FAST_BACKEND, else auto: on CUDA
    tensors the first of the auto order that supports the inputs, on CPU the reference). `sdpa_backend` (one of
    SDPA_BACKENDS) implies backend='sdpa' and pins PyTorch's kernel, for benchmarking.
    """
    if sdpa_backend is not None:
        if backend not in (None, 'sdpa'):
            raise ValueError(f'edm_fast.ops.attention: sdpa_backend={sdpa_backend!r} needs backend=\'sdpa\', '
                             f'got backend={backend!r}')
        backend = 'sdpa'
    elif backend is None and qkv.device.type == 'cpu' and dispatch.requested_backend('attention') == 'auto':
        # DESIGN: CPU tensors take the reference under auto (PyTorch's CPU SDPA is no faster on the shapes of
        # these networks and does not round like NVlabs); an explicit request still gets sdpa on CPU.
        backend = 'reference'
    name, impl = dispatch.select('attention', backend, qkv, num_heads)
    if name == 'sdpa':
        return impl(qkv, num_heads, sdpa_backend=sdpa_backend)
    return impl(qkv, num_heads)


def attention_weights(q, k, *, backend=None):
    """NVlabs AttentionOp: q [B, c, Q], k [B, c, K] -> softmax weights [B, Q, K] in q.dtype."""
    _, impl = dispatch.select('attention_weights', backend, q, k)
    return impl(q, k)


# ---- sdpa -------------------------------------------------------------------------------------------------

def _sdpa_backend_enum(name):
    from torch.nn.attention import SDPBackend
    members = {'flash': SDPBackend.FLASH_ATTENTION, 'efficient': SDPBackend.EFFICIENT_ATTENTION,
               'cudnn': SDPBackend.CUDNN_ATTENTION, 'math': SDPBackend.MATH}
    if name not in members:
        raise ValueError(f'unknown sdpa_backend {name!r}; expected one of {SDPA_BACKENDS}')
    return members[name]


def sdpa(q, k, v, scale, sdpa_backend=None):
    """scaled_dot_product_attention(q, k, v, scale=scale), optionally pinned to one PyTorch backend.

    q, k, v: [B, heads, T, d] (k and v may have their own lengths and v its own width). An unavailable pinned
    backend raises PyTorch's RuntimeError saying why.
    """
    if sdpa_backend is None:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
    from torch.nn.attention import sdpa_kernel
    with sdpa_kernel(_sdpa_backend_enum(sdpa_backend)):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)


def _channels_last(x):
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def sdpa_attention(qkv, num_heads, *, sdpa_backend=None):
    """The 'sdpa' provider of attention(): same contract, computed by PyTorch's SDPA.

    One copy de-interleaves qkv into [3, N, T, heads, d] (head dim contiguous, what the fused SDPA kernels need;
    viewed as [N, heads, T, d]); the scale is 1/sqrt(C/heads). For channels-last input the result is returned
    channels-last, which is a free view of SDPA's output whenever the kernel writes it as [N, T, heads, d] (flash
    does); NCHW input gets an NCHW result.
    """
    n, c3, h, w = qkv.shape
    c = c3 // 3
    d = c // num_heads
    q, k, v = qkv.reshape(n, num_heads, d, 3, h * w).permute(3, 0, 4, 1, 2).contiguous().unbind(0)
    out = sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 1 / math.sqrt(d), sdpa_backend)
    if _channels_last(qkv):
        out = out.permute(0, 2, 1, 3).reshape(n, h, w, c).permute(0, 3, 1, 2)
        return out.contiguous(memory_format=torch.channels_last)
    return out.transpose(2, 3).reshape(n, c, h, w).contiguous()


def _sdpa_supports(qkv, num_heads, **_):
    if qkv.dim() != 4 or num_heads < 1 or qkv.shape[1] % (3 * num_heads):
        return f'qkv {tuple(qkv.shape)} is not [N, 3C, H, W] with 3C divisible by 3 * num_heads = {3 * num_heads}'
    if not qkv.dtype.is_floating_point:
        return f'dtype {qkv.dtype} is not a floating-point type'
    return None


# ---- cuda: glue for the ops of csrc/attention/ ------------------------------------------------------------

def _out_memory_format(qkv):
    """Memory format of the CUDA op's outputs (mirrors csrc/attention/attention.cpp)."""
    return torch.channels_last if _channels_last(qkv) else torch.contiguous_format


def register_op_glue(namespace):
    """Fake (meta) kernels and the autograd rule of `namespace`::attention_fwd / ::attention_bwd.

    Called for 'edm_fast' when the extension is loaded; tests call it for a CPU stand-in library with the same
    schemas, so that the Python side (fake shapes and strides, autograd, torch.compile) is exercised without a GPU.
    """
    ops = getattr(torch.ops, namespace)

    @torch.library.register_fake(f'{namespace}::attention_fwd')
    def _fwd_fake(qkv, num_heads):
        n, c3, h, w = qkv.shape
        out = torch.empty((n, c3 // 3, h, w), dtype=qkv.dtype, device=qkv.device,
                          memory_format=_out_memory_format(qkv))
        lse = qkv.new_empty((n * num_heads, h * w), dtype=torch.float32)
        return out, lse

    @torch.library.register_fake(f'{namespace}::attention_bwd')
    def _bwd_fake(grad_out, qkv, out, lse, num_heads):
        return torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device, memory_format=_out_memory_format(qkv))

    def setup_context(ctx, inputs, output):
        qkv, num_heads = inputs
        out, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(qkv, out, lse)
        ctx.num_heads = num_heads

    def backward(ctx, grad_out, grad_lse):
        qkv, out, lse = ctx.saved_tensors
        if grad_out is None:
            return None, None
        return ops.attention_bwd(grad_out, qkv, out, lse, ctx.num_heads), None

    torch.library.register_autograd(f'{namespace}::attention_fwd', backward, setup_context=setup_context)


def _cuda_attention(qkv, num_heads):
    return torch.ops.edm_fast.attention_fwd(qkv, num_heads)[0]


def cuda_supports(qkv, num_heads, **_):
    """None when the CUDA kernel can run these inputs, else the reason (also used by tests and benchmarks)."""
    if qkv.device.type != 'cuda':
        return f'qkv is on {qkv.device}; the CUDA kernel needs a CUDA tensor'
    if qkv.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f'dtype {qkv.dtype} is not float32, float16 or bfloat16'
    if qkv.dim() != 4 or num_heads < 1 or qkv.shape[1] % (3 * num_heads):
        return f'qkv {tuple(qkv.shape)} is not [N, 3C, H, W] with 3C divisible by 3 * num_heads = {3 * num_heads}'
    d = qkv.shape[1] // (3 * num_heads)
    if d % 8 or not 8 <= d <= 256:
        return f'{d} channels per head; the kernel needs a multiple of 8 in [8, 256]'
    if not torch.compiler.is_compiling() and torch.cuda.get_device_capability(qkv.device) < (8, 0):
        return 'the kernel needs compute capability 8.0 or newer (mma.sync m16n8k16, ldmatrix)'
    return None


def _cuda_ops_available():
    return _ext.available() and hasattr(torch.ops.edm_fast, 'attention_fwd')


dispatch.register('attention', 'reference', reference.attention)
dispatch.register('attention', 'sdpa', sdpa_attention, supports=_sdpa_supports)
if _cuda_ops_available():
    register_op_glue('edm_fast')
    dispatch.register('attention', 'cuda', _cuda_attention, supports=cuda_supports)
# AUTO choice for 'attention' on CUDA tensors (CPU tensors take the reference, see attention()), from
# bench/results/bench_attention.jsonl (H100, fp16 channels-last): the CUDA kernel is fastest up to 256 tokens
# (ADM 16x16 fwd 0.120 ms vs cuDNN SDPA 0.144, 8x8 0.048 vs 0.090 for efficient), cuDNN SDPA beyond (ADM 32x32
# fwd 0.50 ms vs 0.65, fwd+bwd 1.95 vs 3.38). Both are 3-9x faster than the NVlabs-style reference.
CUDA_MAX_TOKENS = 256
dispatch.set_auto_order('attention', ('cuda', 'sdpa', 'reference'))
if _cuda_ops_available():
    dispatch.set_preference('attention', 'cuda', lambda qkv, num_heads, **_: qkv.shape[2] * qkv.shape[3] <= CUDA_MAX_TOKENS)
dispatch.register('attention_weights', 'reference', reference.attention_weights)
