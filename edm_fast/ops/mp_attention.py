"""edm_fast.ops.mp_attention: the self-attention of EDM2's magnitude-preserving blocks.

EDM2 pixel-normalises q, k and v per head and then computes plain softmax(q.k / sqrt(C/heads)) v, so the
fast providers are a pixel norm of the interleaved qkv (one elementwise pass, fused into the qkv conv's
epilogue under torch.compile) followed by the providers of `edm_fast.ops.attention`:
  reference  NVlabs edm2 numerics (ops/reference.py `mp_attention`): logits and softmax in the I/O dtype.
  sdpa       pixel norm, then PyTorch's scaled_dot_product_attention on the de-interleaved q/k/v.
  cuda       pixel norm, then the fused kernel of csrc/attention/ reading the interleaved layout directly.
The fast providers keep softmax statistics in fp32, so in fp16/bf16 they are closer to the exact result than
the reference; tests/ops/test_mp_attention.py bounds both against an fp64 truth.
"""

from . import dispatch, reference
from .attention import CUDA_MAX_TOKENS, _cuda_ops_available, _sdpa_supports, attention, cuda_supports


def mp_attention(qkv, num_heads, *, backend=None):
    """EDM2 attention: qkv [N, 3C, H, W] (q/k/v interleaved per channel inside each head, NCHW or channels-last,
    fp32/fp16/bf16) -> [N, C, H, W], channels head-major, the input of the block's attn_proj.

    `backend`: 'reference', 'sdpa', 'cuda' or None (EDM_FAST_BACKEND, else auto: CPU tensors take the
    reference; CUDA tensors the CUDA kernel up to 256 tokens and SDPA above, as for `attention`).
    """
    if backend is None and qkv.device.type == 'cpu' and dispatch.requested_backend('mp_attention') == 'auto':
        backend = 'reference'  # as `attention`: NVlabs rounding on CPU unless a fast provider is asked for
    name, impl = dispatch.select('mp_attention', backend, qkv, num_heads)
    return impl(qkv, num_heads)


def _fast(provider):
    def run(qkv, num_heads):
        return attention(reference.mp_normalize_qkv(qkv, num_heads), num_heads, backend=provider)
    run.__name__ = f'mp_attention_{provider}'
    return run


dispatch.register('mp_attention', 'reference', reference.mp_attention)
dispatch.register('mp_attention', 'sdpa', _fast('sdpa'), supports=_sdpa_supports)
if _cuda_ops_available():
    dispatch.register('mp_attention', 'cuda', _fast('cuda'), supports=cuda_supports,
                      prefer=lambda qkv, num_heads, **_: qkv.shape[2] * qkv.shape[3] <= CUDA_MAX_TOKENS)
dispatch.set_auto_order('mp_attention', ('cuda', 'sdpa', 'reference'))
