"""edm_fast.ops.resample: depthwise FIR up/down-sampling by 2 (NVlabs Conv2d resampling)."""

from . import dispatch, reference


def resample(x, filter, *, up=1, down=1, padding=0, backend=None):
    """x: [N, C, H, W]; filter: normalised 2-D FIR [1, 1, L, L] (cast to x.dtype).

    up=2: transposed depthwise conv with 4x the filter, stride 2; down=2: depthwise conv, stride 2.
    `padding` is the per-side padding the NVlabs call site uses.
    """
    _, impl = dispatch.select('resample', backend, x, filter, up=up, down=down, padding=padding)
    return impl(x, filter, up=up, down=down, padding=padding)


dispatch.register('resample', 'reference', reference.resample)
