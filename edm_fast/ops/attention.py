"""edm_fast.ops.attention: U-Net self-attention from the interleaved qkv tensor."""

from . import dispatch, reference


def attention(qkv, num_heads, *, backend=None):
    """qkv: [N, 3C, H, W] (q/k/v interleaved per channel within each head) -> [N, C, H, W].

    Softmax(q^T k / sqrt(C/heads)) over keys in fp32, weighted sum of v in the I/O dtype, output
    channels head-major: the tensor the block's proj conv consumes.
    """
    _, impl = dispatch.select('attention', backend, qkv, num_heads)
    return impl(qkv, num_heads)


def attention_weights(q, k, *, backend=None):
    """NVlabs AttentionOp: q [B, c, Q], k [B, c, K] -> softmax weights [B, Q, K] in q.dtype."""
    _, impl = dispatch.select('attention_weights', backend, q, k)
    return impl(q, k)


dispatch.register('attention', 'reference', reference.attention)
dispatch.register('attention_weights', 'reference', reference.attention_weights)
