"""Backend selection: explicit argument > EDM_FAST_BACKEND > auto, with a record of what ran."""

import pytest
import torch

from edm_fast import ops
from edm_fast.ops import dispatch


@pytest.fixture
def fake_op(monkeypatch):
    """A throwaway op with a reference and a 'triton' implementation that only takes even sizes."""
    monkeypatch.setitem(dispatch._registry, 'fake', {})
    dispatch.register('fake', 'reference', lambda x: ('reference', x))
    dispatch.register('fake', 'triton', lambda x: ('triton', x),
                      supports=lambda x: None if x % 2 == 0 else 'odd sizes are not supported')

    def call(x, backend=None):
        name, impl = dispatch.select('fake', backend, x)
        return impl(x)[0]
    return call


def test_auto_prefers_fast_backend_and_falls_back_quietly(fake_op, monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert fake_op(2) == 'triton'
    assert fake_op(3) == 'reference'


def test_explicit_backend_that_cannot_run_raises(fake_op):
    assert fake_op(3, backend='reference') == 'reference'
    with pytest.raises(RuntimeError, match='odd sizes are not supported'):
        fake_op(3, backend='triton')
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        fake_op(2, backend='cuda')
    with pytest.raises(ValueError, match='unknown backend'):
        fake_op(2, backend='tpu')


def test_environment_variable(fake_op, monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, 'reference')
    assert fake_op(2) == 'reference'
    monkeypatch.setenv(dispatch.ENV_VAR, 'auto,fake=reference')
    assert fake_op(2) == 'reference'
    monkeypatch.setenv(dispatch.ENV_VAR, 'reference,fake=triton')
    assert fake_op(2) == 'triton'
    assert fake_op(2, backend='reference') == 'reference'  # the call's argument wins
    monkeypatch.setenv(dispatch.ENV_VAR, 'fake=quantum')
    with pytest.raises(ValueError, match='quantum'):
        fake_op(2)


def test_record_backends_counts_what_ran(fake_op, monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    with ops.record_backends() as rec:
        fake_op(2)
        fake_op(3)
        fake_op(4)
    assert rec == {('fake', 'triton'): 2, ('fake', 'reference'): 1}


def test_cpu_tensors_take_the_reference(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    x = torch.randn(2, 8, 4, 4)
    with ops.record_backends() as rec:
        ops.group_norm(x, torch.ones(8), torch.zeros(8), 2, 1e-5, act='silu')
        ops.attention(torch.randn(1, 3 * 8, 2, 2), 1)
    assert rec[('group_norm', 'reference')] == 1 and rec[('attention', 'reference')] == 1


def test_group_norm_reference_fusions_match_unfused():
    x = torch.randn(2, 8, 5, 3) + 3
    w, b = torch.rand(8) + 0.5, torch.randn(8)
    add, scale, shift = torch.randn(2, 8, 1, 1), torch.randn(2, 8, 1, 1), torch.randn(1, 8, 1, 1)
    gn = torch.nn.functional.group_norm
    assert torch.equal(ops.group_norm(x, w, b, 2, 1e-6, pre_add=add, act='silu'),
                       torch.nn.functional.silu(gn(x + add, 2, w, b, 1e-6)))
    assert torch.equal(ops.group_norm(x, w, b, 2, 1e-5, scale=scale, shift=shift, act='silu'),
                       torch.nn.functional.silu(torch.addcmul(shift, gn(x, 2, w, b, 1e-5), scale + 1)))
    with pytest.raises(ValueError, match='scale and shift'):
        ops.group_norm(x, w, b, 2, 1e-5, scale=scale)
    with pytest.raises(ValueError, match='activation'):
        ops.group_norm(x, w, b, 2, 1e-5, act='gelu')


def test_resample_rejects_bad_factors():
    with pytest.raises(ValueError, match='up=2 or down=2'):
        ops.resample(torch.randn(1, 1, 4, 4), torch.ones(1, 1, 2, 2) / 4, up=2, down=2)


def test_extension_status_is_reported():
    import edm_fast
    if not edm_fast.extension_available():
        assert 'pip install' in edm_fast._ext.reason()


def test_auto_preference_passes_a_backend_over(fake_op, monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    dispatch.set_preference('fake', 'triton', lambda x: x < 100)
    assert fake_op(2) == 'triton'
    assert fake_op(200) == 'reference'  # auto passes triton over for large inputs
    assert fake_op(200, backend='triton') == 'triton'  # an explicit request still runs it
