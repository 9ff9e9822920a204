"""edm_fast.ops.group_norm: GroupNorm fused with its neighbours at every U-Net call site."""

from . import dispatch, reference


def group_norm(x, weight, bias, num_groups, eps, *, pre_add=None, scale=None, shift=None, act=None,
               backend=None):
    """act(shift + group_norm(x + pre_add) * (scale + 1)), each extra optional.

    x: [N, C, H, W] fp32/fp16/bf16, NCHW or channels-last; weight, bias: [C] (fp32, cast to x.dtype);
    pre_add, scale, shift: [N or 1, C, 1, 1] in x.dtype; act: None or 'silu'. Call sites:
    silu(norm0(x)); SongUNet silu(norm1(x + affine(emb))); ADM silu(shift + norm1(x) * (scale + 1));
    norm2(x) before attention; silu(aux_norm(x)) / silu(out_norm(x)).
    """
    _, impl = dispatch.select('group_norm', backend, x, weight, bias, num_groups, eps,
                              pre_add=pre_add, scale=scale, shift=shift, act=act)
    return impl(x, weight, bias, num_groups, eps, pre_add=pre_add, scale=scale, shift=shift, act=act)


dispatch.register('group_norm', 'reference', reference.group_norm)
