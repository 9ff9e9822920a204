"""edm_fast.ops.group_norm: GroupNorm fused with its neighbours at every U-Net call site.

Backends: 'reference' (PyTorch, the truth), 'triton' (edm_fast/ops/triton/group_norm.py) and 'cuda'
(csrc/group_norm/, in the extension edm_fast._C). The fast backends are torch.library operators with fake
(meta) kernels and autograd formulas registered here, so torch.compile traces them without graph breaks:

  edm_fast::group_norm_fwd / group_norm_bwd                 (CUDA; schemas in csrc/registration.cpp)
  edm_fast::group_norm_triton_fwd / group_norm_triton_bwd   (Triton, torch.library.custom_op)

Both pairs share one signature:
  fwd(x, weight, bias, pre_add?, scale?, shift?, num_groups, eps, silu) -> (y, mean [N, G], rstd [N, G])
  bwd(dy, x, weight, bias, pre_add?, scale?, shift?, mean, rstd, num_groups, silu, need_pre_add_grad)
      -> (dx, dweight, dbias, dpre_add, dscale, dshift)   (absent gradients as empty tensors)
"""

from typing import Optional

import torch

from .. import _ext
from . import dispatch, reference

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# csrc/group_norm/: a channels-last group's vector columns must fit one 512-thread block.
CUDA_MAX_GROUP_CHANNELS = 512

try:
    from .triton import group_norm as _triton
except ImportError:  # triton is optional (not installed on every platform)
    _triton = None


def group_norm(x, weight, bias, num_groups, eps, *, pre_add=None, scale=None, shift=None, act=None,
               backend=None):
    """act(shift + group_norm(x + pre_add) * (scale + 1)), each extra optional.

    x: [N, C, H, W] fp32/fp16/bf16, NCHW or channels-last (the output keeps x's memory format on the fast
    backends); weight, bias: [C] (fp32, cast to x.dtype); pre_add, scale, shift: [N or 1, C, 1, 1] in
    x.dtype; act: None or 'silu'. Call sites: silu(norm0(x)); SongUNet silu(norm1(x + affine(emb)));
    ADM silu(shift + norm1(x) * (scale + 1)); norm2(x) before attention; silu(aux_norm(x)) / silu(out_norm(x)).
    Backends: 'cuda', 'triton' (on CPU only through the Triton interpreter and when asked for) and
    'reference'; gradients for x, weight, bias, pre_add, scale and shift on all of them.
    """
    if act not in (None, 'silu'):
        raise ValueError(f'group_norm: unsupported activation {act!r}; expected None or "silu"')
    if (scale is None) != (shift is None):
        raise ValueError('group_norm: scale and shift go together (ADM adaptive scale)')
    # CPU tensors reach the Triton interpreter only when a backend is named (argument or EDM_FAST_BACKEND).
    explicit = dispatch.requested_backend('group_norm', backend) != 'auto'
    _, impl = dispatch.select('group_norm', backend, x, weight, bias, num_groups, eps, pre_add=pre_add,
                              scale=scale, shift=shift, act=act, explicit=explicit)
    return impl(x, weight, bias, num_groups, eps, pre_add=pre_add, scale=scale, shift=shift, act=act)


def _unsupported_inputs(x, weight, bias, num_groups, pre_add, scale, shift):
    """Reason string when the fused kernels cannot take these inputs, else None."""
    if x.dim() != 4:
        return f'expects a 4-D [N, C, H, W] input, got {x.dim()}-D'
    if x.dtype not in _DTYPES:
        return f'unsupported dtype {x.dtype} (expected float32, float16 or bfloat16)'
    if x.numel() == 0:
        return 'empty input'
    N, C = x.shape[:2]
    if num_groups <= 0 or C % num_groups:
        return f'{C} channels do not split into {num_groups} groups'
    for name, p in (('weight', weight), ('bias', bias)):
        if p.shape != (C,) or p.dtype not in _DTYPES or p.device != x.device:
            return f'{name} must be a float [{C}] tensor on {x.device}'
    for name, t in (('pre_add', pre_add), ('scale', scale), ('shift', shift)):
        if t is None:
            continue
        if t.dim() != 4 or t.shape[0] not in (1, N) or tuple(t.shape[1:]) != (C, 1, 1):
            return f'{name} must be [N or 1, {C}, 1, 1], got {list(t.shape)}'
        if t.dtype != x.dtype or t.device != x.device:
            return f'{name} must be {x.dtype} on {x.device} like x'
    return None


def _outputs_like(x, weight, bias, pre_add, scale, shift, need_pre_add_grad):
    """Empty gradients with the shapes, dtypes and layout the kernels produce; absent ones are distinct
    size-0 tensors (operator outputs must not alias each other)."""
    return (torch.empty_like(x), weight.new_empty(weight.shape), bias.new_empty(bias.shape),
            pre_add.new_empty(pre_add.shape) if pre_add is not None and need_pre_add_grad else x.new_empty(0),
            scale.new_empty(scale.shape) if scale is not None else x.new_empty(0),
            shift.new_empty(shift.shape) if shift is not None else x.new_empty(0))


def _dense(x):
    """x as the kernels index it: channels-last or NCHW, made dense when it is neither (a no-op when dense).

    The same rule is in csrc/group_norm/group_norm.cpp, so real and fake outputs have the same strides.
    """
    if x.is_contiguous():
        return x
    cl = x.is_contiguous(memory_format=torch.channels_last) or x.stride(1) == 1
    return x.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)


def _fake_fwd(x, weight, bias, pre_add, scale, shift, num_groups, eps, silu):
    x = _dense(x)
    stats = x.new_empty((x.shape[0], num_groups), dtype=torch.float32)
    return torch.empty_like(x), stats, torch.empty_like(stats)


def _fake_bwd(dy, x, weight, bias, pre_add, scale, shift, mean, rstd, num_groups, silu, need_pre_add_grad):
    return _outputs_like(_dense(x), weight, bias, pre_add, scale, shift, need_pre_add_grad)


def _wire(fwd_name, bwd_name):
    """Register the fake kernels and the autograd formula of a fwd/bwd operator pair (any namespace)."""
    bwd_op = getattr(getattr(torch.ops, bwd_name.split('::')[0]), bwd_name.split('::')[1])
    torch.library.register_fake(fwd_name)(_fake_fwd)
    torch.library.register_fake(bwd_name)(_fake_bwd)

    def setup_context(ctx, inputs, output):
        x, weight, bias, pre_add, scale, shift, num_groups, eps, silu = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, weight, bias, pre_add, scale, shift, mean, rstd)
        ctx.num_groups, ctx.silu = num_groups, silu

    def backward(ctx, dy, _dmean, _drstd):
        x, weight, bias, pre_add, scale, shift, mean, rstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        need_pre = pre_add is not None and need[3]
        dx, dweight, dbias, dpre, dscale, dshift = bwd_op(dy, x, weight, bias, pre_add, scale, shift, mean, rstd,
                                                          ctx.num_groups, ctx.silu, need_pre)
        ss = scale is not None
        return (dx if need[0] else None, dweight if need[1] else None, dbias if need[2] else None,
                dpre if need_pre else None, dscale if ss and need[4] else None, dshift if ss and need[5] else None,
                None, None, None)

    torch.library.register_autograd(fwd_name, backward, setup_context=setup_context)


def _call(fwd_op):
    def impl(x, weight, bias, num_groups, eps, *, pre_add=None, scale=None, shift=None, act=None):
        return fwd_op(_dense(x), weight, bias, pre_add, scale, shift, num_groups, float(eps), act == 'silu')[0]
    return impl


dispatch.register('group_norm', 'reference', reference.group_norm)

# ---- Triton -------------------------------------------------------------------------------------------------

if _triton is not None:
    @torch.library.custom_op('edm_fast::group_norm_triton_fwd', mutates_args=())
    def _triton_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, pre_add: Optional[torch.Tensor],
                    scale: Optional[torch.Tensor], shift: Optional[torch.Tensor], num_groups: int, eps: float,
                    silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _triton.forward(_dense(x), weight, bias, pre_add, scale, shift, num_groups, eps, silu)

    @torch.library.custom_op('edm_fast::group_norm_triton_bwd', mutates_args=())
    def _triton_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    pre_add: Optional[torch.Tensor], scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
                    mean: torch.Tensor, rstd: torch.Tensor, num_groups: int, silu: bool,
                    need_pre_add_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                      torch.Tensor, torch.Tensor]:
        return _triton.backward(dy, _dense(x), weight, bias, pre_add, scale, shift, mean, rstd, num_groups, silu,
                                need_pre_add_grad)

    _wire('edm_fast::group_norm_triton_fwd', 'edm_fast::group_norm_triton_bwd')

    def _triton_supports(x, weight, bias, num_groups, eps, *, pre_add=None, scale=None, shift=None, act=None,
                         explicit=False):
        if x.device.type != ('cpu' if _triton.INTERPRETED else 'cuda'):
            return (f'x is on {x.device}; the Triton kernels run on '
                    + ('CPU tensors (TRITON_INTERPRET=1)' if _triton.INTERPRETED else 'CUDA tensors'))
        if _triton.INTERPRETED and not explicit:
            return 'CPU tensors take the reference unless the Triton interpreter is asked for explicitly'
        reason = _unsupported_inputs(x, weight, bias, num_groups, pre_add, scale, shift)
        if reason is None and x.shape[1] // num_groups > _triton.MAX_GROUP_CHANNELS:
            reason = f'more than {_triton.MAX_GROUP_CHANNELS} channels per group'
        return reason

    dispatch.register('group_norm', 'triton', _call(torch.ops.edm_fast.group_norm_triton_fwd), _triton_supports)

# ---- CUDA extension -----------------------------------------------------------------------------------------


def _cuda_supports(x, weight, bias, num_groups, eps, *, pre_add=None, scale=None, shift=None, act=None,
                   explicit=False):
    if x.device.type != 'cuda':
        return f'x is on {x.device}, not a CUDA device'
    reason = _unsupported_inputs(x, weight, bias, num_groups, pre_add, scale, shift)
    if reason is None and x.shape[1] // num_groups > CUDA_MAX_GROUP_CHANNELS:
        reason = f'more than {CUDA_MAX_GROUP_CHANNELS} channels per group'
    return reason


if _ext.available() and hasattr(torch.ops.edm_fast, 'group_norm_fwd'):
    _wire('edm_fast::group_norm_fwd', 'edm_fast::group_norm_bwd')
    dispatch.register('group_norm', 'cuda', _call(torch.ops.edm_fast.group_norm_fwd), _cuda_supports)
