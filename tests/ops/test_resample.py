"""edm_fast.ops.resample: the Triton backend against the reference (CPU: through the Triton interpreter).

The reference (conv_transpose2d / conv2d, NVlabs numerics) is the truth in fp32; fp16/bf16 are checked
against an fp64 truth computed from the same rounded inputs, allowing twice PyTorch's own error at that
precision plus one ulp of the output's magnitude. GPU tests run the preset networks' real resampling
shapes at batch 512.
"""

import importlib
import os

import pytest
import torch

import refvec
from edm_fast import ops
from edm_fast.ops import dispatch

pytest.importorskip('triton')
CUDA = torch.cuda.is_available()
DEVICE = 'cuda' if CUDA else 'cpu'
if not CUDA and os.environ.get('TRITON_INTERPRET') != '1':
    pytest.skip('no GPU and TRITON_INTERPRET is not 1 (conftest.py sets it before Triton is imported)',
                allow_module_level=True)
kernels = importlib.import_module('edm_fast.ops.triton.resample')

FILTERS = {'f11': [1, 1], 'f1331': [1, 3, 3, 1]}


def make_filter(taps, device=DEVICE):
    """The Conv2d resample_filter buffer: outer(f, f) / sum(f)^2, [1, 1, L, L] fp32."""
    f = torch.as_tensor(taps, dtype=torch.float32)
    return (f.ger(f) / f.sum().square())[None, None].to(device)


def _network_cases():
    """(filter, kind, padding) for every resampling call Conv2d makes (kernel 0, 1, 3; plain and fused)."""
    cases = set()
    for name, taps in FILTERS.items():
        f_pad = (len(taps) - 1) // 2
        for kernel in (0, 1, 3):
            w_pad = kernel // 2
            cases.add((name, 'up', f_pad))
            cases.add((name, 'down', f_pad))
            if kernel:
                cases.add((name, 'up', max(f_pad - w_pad, 0)))  # fused up
                cases.add((name, 'down', 0))  # fused down (conv first, padding w_pad + f_pad)
    return sorted(cases)


NETWORK_CASES = _network_cases()
SHAPES = [(2, 5, 7, 6), (1, 3, 4, 4), (1, 16, 2, 2), (3, 2, 5, 9)]  # odd sizes, 4x4 and 2x2 maps, C = 3, 5


def _out_size(size, length, kind, padding):
    return 2 * (size - 1) + length - 2 * padding if kind == 'up' else (size + 2 * padding - length) // 2 + 1


def _out_shape(shape, length, kind, padding):
    return tuple(shape[:2]) + tuple(_out_size(s, length, kind, padding) for s in shape[2:])


def _input(shape, dtype, channels_last, device=DEVICE, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(shape, generator=g, device=device).mul_(2).add_(0.75).to(dtype)  # non-zero mean
    return x.to(memory_format=torch.channels_last) if channels_last else x


def _run(x, f, kind, padding, backend, dy=None):
    """Forward and (with dy) the input gradient through ops.resample."""
    x = x.detach().clone().requires_grad_(dy is not None)
    y = ops.resample(x, f, **{kind: 2}, padding=padding, backend=backend)
    if dy is None:
        return y, None
    (dx,) = torch.autograd.grad(y, x, dy)
    return y.detach(), dx


def _ulp(dtype):
    return torch.finfo(dtype).eps


def _assert_as_accurate(out, truth, torch_out, dtype, what):
    """max|out - truth| <= 2 * max|torch_out - truth| + one ulp of max|truth|."""
    truth = truth.double()
    err = (out.double() - truth).abs().max().item()
    ref_err = (torch_out.double() - truth).abs().max().item()
    floor = _ulp(dtype) * truth.abs().max().item()
    assert err <= 2 * ref_err + floor, f'{what}: error {err:.3g} > 2 x PyTorch {ref_err:.3g} + {floor:.3g}'
    return err, ref_err


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, 'resample=triton')


@pytest.fixture(autouse=True)
def _no_tf32():
    """PyTorch's fp32 GPU convolutions may use TF32 (10-bit mantissa): compare against true fp32."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = saved


# ----------------------------------------------------------------------------------------------------
# NVlabs Conv2d vectors with the resampling forced onto Triton.

def _resampling_conv_vectors():
    names = [n for n in refvec.files('layer_conv2d_')
             if any(refvec.Case(n).json('config_json').get(k) for k in ('up', 'down'))]
    return names or ['<reference vectors not found>']


@pytest.mark.parametrize('name', _resampling_conv_vectors())
def test_conv2d_reference_vectors_on_triton(name, monkeypatch):
    refvec.require()
    case = refvec.Case(name)
    net = refvec.build_net(case).to(DEVICE)
    x = case.t('in/x').to(DEVICE)
    monkeypatch.setenv(dispatch.ENV_VAR, 'resample=triton')
    with torch.no_grad(), ops.record_backends() as rec:
        y = net(x)
    assert rec[('resample', 'triton')] == 1 and rec[('resample', 'reference')] == 0
    case.check('y', y)
    # The same layer on the reference backend: [1,1] is exact either way (duplication / sums of x/4).
    monkeypatch.setenv(dispatch.ENV_VAR, 'resample=reference')
    with torch.no_grad():
        y_ref = net(x)
    if case.json('config_json')['resample_filter'] == [1, 1] and DEVICE == 'cpu':
        assert torch.equal(y, y_ref)
    else:
        torch.testing.assert_close(y, y_ref, rtol=0, atol=8 * _ulp(torch.float32) * y_ref.abs().max().item())


# ----------------------------------------------------------------------------------------------------
# Random shapes against the reference: forward and input gradient.

@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'nhwc'])
@pytest.mark.parametrize('filt,kind,padding', NETWORK_CASES)
def test_fp32_matches_reference(filt, kind, padding, channels_last):
    f = make_filter(FILTERS[filt])
    L = f.shape[-1]
    for i, shape in enumerate(SHAPES):
        if min(_out_size(s, L, kind, padding) for s in shape[2:]) <= 0:
            continue  # the reference rejects these too
        x = _input(shape, torch.float32, channels_last, seed=i)
        dy = _input(_out_shape(shape, L, kind, padding), torch.float32, channels_last, seed=100 + i)
        y_ref, dx_ref = _run(x, f, kind, padding, 'reference', dy)
        y, dx = _run(x, f, kind, padding, 'triton', dy)
        assert y.shape == y_ref.shape and y.dtype == torch.float32
        assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        assert dx.shape == x.shape
        if filt == 'f11' and (kind == 'up' or DEVICE == 'cpu'):
            # [1,1]: duplication (up) and exact x/4 terms summed in the reference's order (down): bit-exact.
            assert torch.equal(y, y_ref), f'{shape}: [1,1] {kind} is not bit-exact'
            assert torch.equal(dx, dx_ref), f'{shape}: [1,1] {kind} gradient is not bit-exact'
        else:
            # Same taps and order; the interpreter's FMA emulation and GPU conv algorithms differ by ulps.
            tol = 8 * _ulp(torch.float32)
            torch.testing.assert_close(y, y_ref, rtol=0, atol=tol * y_ref.abs().max().item())
            torch.testing.assert_close(dx, dx_ref, rtol=0, atol=tol * dx_ref.abs().max().item())


@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'nhwc'])
@pytest.mark.parametrize('filt,kind,padding', NETWORK_CASES)
def test_fp16_against_fp64_truth(filt, kind, padding, channels_last):
    f = make_filter(FILTERS[filt])
    for i, shape in enumerate(SHAPES[:2]):
        x = _input(shape, torch.float16, channels_last, seed=i)
        dy = _input(_out_shape(shape, f.shape[-1], kind, padding), torch.float16, channels_last, seed=50 + i)
        y64, dx64 = _run(x.double(), f.double(), kind, padding, 'reference', dy.double())
        y16, dx16 = _run(x, f, kind, padding, 'reference', dy)
        y, dx = _run(x, f, kind, padding, 'triton', dy)
        assert y.dtype == dx.dtype == torch.float16
        _assert_as_accurate(y, y64, y16, torch.float16, f'{shape} y')
        _assert_as_accurate(dx, dx64, dx16, torch.float16, f'{shape} dx')
        if filt == 'f11' and kind == 'up':
            assert torch.equal(y, y16)  # pure duplication in any dtype


@pytest.mark.parametrize('kind,padding', [('up', 1), ('down', 1)])
def test_bf16(kind, padding):
    """bf16 I/O. The interpreter converts fp32 -> bf16 by truncation, so on CPU one ulp is allowed against
    the correctly rounded fp64 truth; on the GPU the error must be as small as PyTorch's (x2)."""
    f = make_filter(FILTERS['f1331'])
    x = _input((2, 4, 6, 6), torch.bfloat16, True)
    dy = _input(_out_shape(x.shape, 4, kind, padding), torch.bfloat16, True, seed=7)
    y64, dx64 = _run(x.double(), f.double(), kind, padding, 'reference', dy.double())
    y, dx = _run(x, f, kind, padding, 'triton', dy)
    assert y.dtype == dx.dtype == torch.bfloat16
    if CUDA:
        yb, dxb = _run(x, f, kind, padding, 'reference', dy)
        _assert_as_accurate(y, y64, yb, torch.bfloat16, 'y')
        _assert_as_accurate(dx, dx64, dxb, torch.bfloat16, 'dx')
    else:
        for out, truth in ((y, y64), (dx, dx64)):
            rounded = truth.to(torch.bfloat16).double()
            ulp = _ulp(torch.bfloat16) * rounded.abs().clamp_min(1e-30)
            assert ((out.double() - rounded).abs() <= ulp + 1e-30).all()


def test_filter_is_rounded_to_the_input_dtype_first():
    """As the reference casts the filter to x.dtype: with integer inputs every product and sum is exact,
    so the fp16 output must equal the fp64 result with fp16-rounded taps, rounded once."""
    g = torch.Generator().manual_seed(3)
    f = (torch.rand(1, 1, 4, 4, generator=g) * 0.1 + 0.01).to(DEVICE)  # not representable in fp16
    assert not torch.equal(f.half().float(), f)
    x = torch.randint(-4, 5, (2, 3, 6, 6), generator=g).to(DEVICE, torch.float16)
    for kind in ('up', 'down'):
        y = ops.resample(x, f, **{kind: 2}, padding=1, backend='triton')
        exact = ops.resample(x.double(), f.half().double(), **{kind: 2}, padding=1, backend='reference')
        assert torch.equal(y, exact.half())
        unrounded = ops.resample(x.double(), f.double(), **{kind: 2}, padding=1, backend='reference')
        assert not torch.equal(y, unrounded.half())  # the test can tell the difference


def test_non_contiguous_and_explicit_sizes():
    f = make_filter(FILTERS['f1331'])
    x = _input((2, 3, 9, 10), torch.float32, False)[:, :, 1:, ::2]  # neither NCHW- nor NHWC-contiguous
    for kind in ('up', 'down'):
        y = ops.resample(x, f, **{kind: 2}, padding=1, backend='triton')
        torch.testing.assert_close(y, ops.resample(x, f, **{kind: 2}, padding=1, backend='reference'),
                                   rtol=0, atol=1e-6)
    # Adjoint identity with output sizes that are not the natural ones (backward of odd sizes):
    # <down(x), v> == <x, up(v)> with the same filter, gain and padding.
    x = _input((1, 2, 7, 5), torch.float32, False)
    for padding in (0, 1):
        v = _input((1, 2, 4, 3), torch.float32, False, seed=9)
        down = torch.ops.edm_fast.resample_down(x, f, padding, 4.0, 4, 3)
        up = torch.ops.edm_fast.resample_up(v, f, padding, 4.0, 7, 5)
        torch.testing.assert_close((down.double() * v.double()).sum(), (x.double() * up.double()).sum(),
                                   rtol=1e-5, atol=1e-5)


def test_int64_offsets(monkeypatch):
    """The 64-bit offset path (taken from 2**31 elements) on small tensors."""
    monkeypatch.setitem(kernels.CONFIG, 'force_int64', True)
    for filt, kind, padding in [('f11', 'down', 0), ('f1331', 'up', 1), ('f1331', 'down', 1)]:
        f = make_filter(FILTERS[filt])
        for channels_last in (False, True):
            x = _input((2, 3, 5, 6), torch.float32, channels_last)
            y_ref, _ = _run(x, f, kind, padding, 'reference')
            y, _ = _run(x, f, kind, padding, 'triton')
            torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-6)


def test_double_backward():
    f = make_filter(FILTERS['f1331'])
    results = []
    for backend in ('reference', 'triton'):
        x = _input((1, 2, 5, 6), torch.float32, False).requires_grad_(True)
        dy = _input((1, 2, 10, 12), torch.float32, False, seed=4).requires_grad_(True)
        y = ops.resample(x, f, up=2, padding=1, backend=backend)
        (dx,) = torch.autograd.grad(y, x, dy, create_graph=True)
        (ddy,) = torch.autograd.grad((dx * dx).sum(), dy)
        results.append(ddy)
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Custom-op registration, torch.compile, dispatch.

@pytest.mark.parametrize('op', ['resample_down', 'resample_up'])
@pytest.mark.parametrize('dtype,channels_last', [(torch.float32, False), (torch.float32, True),
                                                 (torch.float16, True)], ids=['fp32-nchw', 'fp32-nhwc', 'fp16-nhwc'])
def test_opcheck(op, dtype, channels_last):
    f = make_filter(FILTERS['f1331'])
    x = _input((2, 3, 5, 4), dtype, channels_last).requires_grad_(True)
    size = (3, 2) if op == 'resample_down' else (10, 8)
    torch.library.opcheck(getattr(torch.ops.edm_fast, op).default, (x, f, 1, 4.0, *size))


class _Resampler(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer('f', make_filter(FILTERS['f1331']))
        self.register_buffer('g', make_filter(FILTERS['f11']))

    def forward(self, x):
        x = ops.resample(x, self.f, up=2, padding=1)
        x = ops.resample(torch.nn.functional.silu(x), self.g, down=2)
        return ops.resample(x, self.f, down=2, padding=0) * 2


def test_torch_compile_fullgraph(triton_backend):
    """One graph, no breaks, the Triton custom ops inside it, eager results and gradients reproduced."""
    import torch._dynamo.testing
    torch._dynamo.reset()
    net = _Resampler()
    counter = torch._dynamo.testing.CompileCounterWithBackend('inductor' if CUDA else 'aot_eager')
    compiled = torch.compile(net, backend=counter, fullgraph=True)
    x = _input((2, 3, 6, 6), torch.float32, True).requires_grad_(True)
    y = compiled(x)
    y.square().sum().backward()
    assert counter.frame_count == 1
    targets = {str(n.target) for g in counter.graphs for n in g.graph.nodes if n.op == 'call_function'}
    assert {'edm_fast.resample_up.default', 'edm_fast.resample_down.default'} <= targets, targets
    x_eager = x.detach().clone().requires_grad_(True)
    with ops.record_backends() as rec:
        y_eager = net(x_eager)
    y_eager.square().sum().backward()
    assert rec[('resample', 'triton')] == 3
    torch.testing.assert_close(y, y_eager, rtol=0, atol=1e-6)
    torch.testing.assert_close(x.grad, x_eager.grad, rtol=0, atol=1e-6)


def test_dispatch_records_which_backend_ran(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert 'triton' in ops.implementations('resample')
    f = make_filter(FILTERS['f1331'])
    x = _input((1, 2, 4, 4), torch.float32, False)
    with ops.record_backends() as rec:
        ops.resample(x, f, up=2, padding=1, backend='triton')
        monkeypatch.setenv(dispatch.ENV_VAR, 'auto,resample=triton')
        ops.resample(x, f, down=2, padding=1)
        monkeypatch.delenv(dispatch.ENV_VAR)
        ops.resample(x, f, down=2, padding=1)
    expected_auto = 'triton' if CUDA else 'reference'  # CPU tensors take the reference under auto
    assert rec[('resample', 'triton')] == 2 + (expected_auto == 'triton')
    assert rec[('resample', 'reference')] == (expected_auto == 'reference')

    # A filter that needs a gradient: auto falls back quietly, an explicit request says why.
    f_grad = f.clone().requires_grad_(True)
    with ops.record_backends() as rec:
        ops.resample(x, f_grad, down=2, padding=1)
    assert rec == {('resample', 'reference'): 1}
    with pytest.raises(RuntimeError, match='requires a gradient'):
        ops.resample(x, f_grad, down=2, padding=1, backend='triton')
    with pytest.raises(RuntimeError, match='float64'):
        ops.resample(x.double(), f, down=2, padding=1, backend='triton')
    with pytest.raises(ValueError, match='up=2 or down=2'):
        ops.resample(x, f, up=2, down=2, backend='triton')
    if not CUDA:
        monkeypatch.delenv('TRITON_INTERPRET')
        with pytest.raises(RuntimeError, match='TRITON_INTERPRET'):
            ops.resample(x, f, down=2, padding=1, backend='triton')


# ----------------------------------------------------------------------------------------------------
# GPU: the preset networks' resampling shapes at batch 512, fp16/bf16/fp32, both layouts.

from bench.bench_resample import preset_resample_calls  # noqa: E402  (one tracer for tests and bench)

GPU_PRESETS = ['edm-cifar10-32x32-cond-vp', 'edm-cifar10-32x32-cond-ve', 'edm-ffhq-64x64-uncond-vp',
               'edm-ffhq-64x64-uncond-ve', 'edm-imagenet-64x64-cond-adm']


def test_preset_shapes_are_found():
    calls = preset_resample_calls('edm-cifar10-32x32-cond-ve', 512)
    assert ((512, 256, 32, 32), 4, 1, 2, 1) in calls  # plain down
    assert ((512, 256, 34, 34), 4, 1, 2, 0) in calls  # fused down after a padded 1x1 conv
    assert ((512, 256, 8, 8), 4, 2, 1, 1) in calls  # plain up


@pytest.mark.gpu
@pytest.mark.parametrize('preset', GPU_PRESETS)
def test_gpu_preset_shapes(preset):
    taps = {2: FILTERS['f11'], 4: FILTERS['f1331']}
    for (shape, L, up, down, padding) in sorted(preset_resample_calls(preset, 512)):
        kind = 'up' if up == 2 else 'down'
        f = make_filter(taps[L], 'cuda')
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            x = _input(shape, dtype, False, 'cuda')
            dy = _input(_out_shape(shape, L, kind, padding), dtype, False, 'cuda', seed=1)
            y64, dx64 = _run(x.double(), f.double(), kind, padding, 'reference', dy.double())
            for channels_last in (False, True):
                fmt = torch.channels_last if channels_last else torch.contiguous_format
                xc, dyc = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
                y_pt, dx_pt = _run(xc, f, kind, padding, 'reference', dyc)
                with ops.record_backends() as rec:
                    y, dx = _run(xc, f, kind, padding, 'triton', dyc)
                assert rec[('resample', 'triton')] == 1
                assert y.is_contiguous(memory_format=fmt)
                what = f'{preset} {shape} {kind} L={L} p={padding} {dtype} {"nhwc" if channels_last else "nchw"}'
                _assert_as_accurate(y, y64, y_pt, dtype, what + ' y')
                _assert_as_accurate(dx, dx64, dx_pt, dtype, what + ' dx')
                if L == 2 and kind == 'up':
                    assert torch.equal(y, y_pt)
                del y_pt, dx_pt, y, dx
            del x, dy, y64, dx64
        torch.cuda.empty_cache()


@pytest.mark.gpu
def test_gpu_more_than_2_31_elements():
    """64-bit offsets: the rows past element 2**31, against the [1,1] arithmetic written out."""
    f = make_filter(FILTERS['f11'], 'cuda')
    x = torch.randn(1, 1, 2 ** 16 + 2, 2 ** 15, device='cuda', dtype=torch.float16)
    assert x.numel() >= 2 ** 31
    y = ops.resample(x, f, down=2, backend='triton')
    tail = x[:, :, -4:].float()
    a, b, c, d = tail[..., 0::2, 0::2], tail[..., 0::2, 1::2], tail[..., 1::2, 0::2], tail[..., 1::2, 1::2]
    expected = (((0.25 * a + 0.25 * b) + 0.25 * c) + 0.25 * d).half()  # each term exact; the kernel's order
    assert torch.equal(y[:, :, -2:], expected)
    del x, y
    x = torch.randn(1, 1, 2 ** 15 + 1, 2 ** 15, device='cuda', dtype=torch.float16)
    y = ops.resample(x, f, up=2, backend='triton')
    assert y.numel() >= 2 ** 31
    expected = x[:, :, -2:].repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    assert torch.equal(y[:, :, -4:], expected)
