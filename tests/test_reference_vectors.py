"""Every NVlabs reference vector in ../shared/reference, checked at its recorded tolerance.

New .npz files are picked up automatically: each file's `case_kind` selects a checker below. A kind
without a checker fails `test_every_vector_kind_has_a_checker`, so no vector goes unexercised.
"""

import math
import os

import numpy as np
import pytest
import torch

import refvec
from edm_fast import loss as loss_module
from edm_fast import networks, ops

# ----------------------------------------------------------------------------------------------------
# Layers (Linear, Conv2d, GroupNorm, embeddings, UNetBlock).


def check_layer(case):
    net = refvec.build_net(case)
    x = case.t('in/x')
    with torch.no_grad():
        y = net(x, case.t('in/emb')) if 'in/emb' in case else net(x)
    case.check('y', y)
    if 'meta/effective_num_groups' in case:
        assert net.num_groups == int(case.d['meta/effective_num_groups'])
    if 'meta/num_heads' in case:
        assert net.num_heads == int(case.d['meta/num_heads'])
    if 'meta/skip_kernel' in case:
        kernel = -1 if net.skip is None else (0 if net.skip.weight is None else net.skip.weight.shape[-1])
        assert kernel == int(case.d['meta/skip_kernel'])


# ----------------------------------------------------------------------------------------------------
# AttentionOp forward and its hand-written backward.


def check_attention_op(case):
    for fn in (networks.AttentionOp.apply, lambda q, k: ops.attention_weights(q, k, backend='reference')):
        q = case.t('in/q').requires_grad_(True)
        k = case.t('in/k').requires_grad_(True)
        w = fn(q, k)
        assert w.dtype == q.dtype
        case.check('w', w)
        w.backward(case.t('in/dw'))
        case.check('dq', q.grad)
        case.check('dk', k.grad)


# ----------------------------------------------------------------------------------------------------
# Preconditioners around small U-Nets.


def _capture_model_io(net):
    seen = {}

    def pre(module, args, kwargs):
        seen['x'], seen['noise_labels'] = args[0].detach().clone(), args[1].detach().clone()
        labels = kwargs.get('class_labels')
        seen['class_labels'] = None if labels is None else labels.detach().clone()

    def post(module, args, kwargs, out):
        seen['F'] = out.detach().clone()

    net.model.register_forward_pre_hook(pre, with_kwargs=True)
    net.model.register_forward_hook(post, with_kwargs=True)
    return seen


def check_precond(case):
    cfg = case.json('config_json')
    cls = getattr(networks, case.class_short)
    fresh = cls(**cfg)
    assert fresh.sigma_min == float(case.d['meta/sigma_min'])
    assert fresh.sigma_max == float(case.d['meta/sigma_max'])
    params = case.params()
    if 'u' in params:  # the iDDPM table must come out of our own fp32 recursion bit for bit
        assert torch.equal(fresh.u, params['u'])
    assert set(fresh.state_dict().keys()) == set(params.keys())  # .npz keys are sorted, not in module order
    assert {k: tuple(v.shape) for k, v in fresh.state_dict().items()} == {k: tuple(v.shape) for k, v in params.items()}

    net = refvec.build_net(case)
    seen = _capture_model_io(net)
    x, sigma = case.t('in/x'), case.t('in/sigma')
    labels = case.t('in/class_labels') if 'in/class_labels' in case else None
    aug = case.t('in/augment_labels') if 'in/augment_labels' in case else None
    aug_kwargs = {} if aug is None else dict(augment_labels=aug)
    with torch.no_grad():
        D = net(x, sigma, labels, **aug_kwargs)
        case.check('D', D)
        case.check('F', seen['F'])
        case.check('model_x', seen['x'])
        case.check('model_noise_labels', seen['noise_labels'])
        if 'out/model_class_labels' in case:
            case.check('model_class_labels', seen['class_labels'])
        else:
            assert seen['class_labels'] is None
        if 'out/D_noaug' in case:
            case.check('D_noaug', net(x, sigma, labels))
        if 'out/D_nolabels' in case:
            case.check('D_nolabels', net(x, sigma, None, **aug_kwargs))
        case.check('D_sigma_scalar', net(x, case.t('in/sigma_scalar'), labels))

    if 'in/round_sigma_sigma' in case:
        s = case.t('in/round_sigma_sigma')
        case.check('round_sigma_index', net.round_sigma(s, return_index=True))
        value = net.round_sigma(s)
        assert value.dtype == torch.float64
        case.check('round_sigma_value', value)
        value32 = net.round_sigma(s.to(torch.float32))
        assert value32.dtype == torch.float32
        case.check('round_sigma_value_f32in', value32)


# ----------------------------------------------------------------------------------------------------
# Losses with injected randomness, and their gradients.


class _IdentityAugment:
    """Returns the images unchanged with fixed augment labels, as the vectors were recorded."""

    def __init__(self, labels):
        self.labels = labels

    def __call__(self, images):
        return images, self.labels


def _loss_and_grads(case, hooks=None):
    """(per-element loss, {name: parameter}) of the case's loss on its network after loss.sum().backward()."""
    net = refvec.build_net(refvec.Case(case.str('net_npz')))
    net.requires_grad_(True)
    for hook in hooks or ():
        hook(net)
    loss_cls = loss_module.LOSS_TYPES[case.str('loss_class_name').rsplit('.', 1)[-1]]
    loss_fn = loss_cls(**case.json('loss_kwargs_json'))
    rnd = case.t('in/rnd_normal' if 'in/rnd_normal' in case else 'in/rnd_uniform')
    labels = case.t('in/class_labels') if 'in/class_labels' in case else None
    pipe = _IdentityAugment(case.t('in/augment_labels')) if 'in/augment_labels' in case else None
    loss = loss_fn(net=net, images=case.t('in/images'), labels=labels, augment_pipe=pipe, rnd=rnd,
                   noise=case.t('in/noise'))
    loss.sum().backward()
    return loss, dict(net.named_parameters())


def _gradnorms(grads, names):
    return torch.tensor([grads[n].grad.to(torch.float64).norm().item() for n in names], dtype=torch.float64)


def check_loss(case):
    seen = {}

    def pre(module, args, kwargs):
        seen['net_input'], seen['sigma'] = args[0].detach().clone(), args[1].detach().clone()

    def post(module, args, kwargs, out):
        seen['D_yn'] = out.detach().clone()

    loss, grads = _loss_and_grads(case, hooks=(lambda net: net.register_forward_pre_hook(pre, with_kwargs=True),
                                                lambda net: net.register_forward_hook(post, with_kwargs=True)))
    case.check('loss', loss)
    for key in ('D_yn', 'net_input', 'sigma'):
        case.check(key, seen[key])
    for name in case.keys('out/grad/'):
        case.check('grad/' + name, grads[name].grad)
    # Each gradient norm gets, on top of its recorded tolerance, the spread between two of PyTorch's own CPU
    # convolution backends on this machine (oneDNN and the native one). Where the tolerance sits at its floor
    # (8 float32 ulps), the summation order of the CPU's convolution kernels moves some norms further than
    # that. On an AVX2 AMD EPYC it moved one norm each of loss_edm_ddpmpp_grad and loss_ve to 1.1-1.7x its
    # tolerance (22-34 ulps from out/), depending on the thread count and backend. The two backends
    # disagree with each other by up to 48 ulps on the same math. A wrong term would still be far outside.
    names = case.json('meta/gradnorm_names_json')
    norms = _gradnorms(grads, names)
    with torch.backends.mkldnn.flags(enabled=not torch.backends.mkldnn.enabled):
        other = _gradnorms(_loss_and_grads(case)[1], names)
    case.check('gradnorm', norms, slack=(norms - other).abs())


CHECKERS = {'layer': check_layer, 'attention_op': check_attention_op, 'precond': check_precond, 'loss': check_loss}

# Kinds checked by the test module of the feature that implements them.
CHECKED_ELSEWHERE = {'sampler': 'test_sampler_vectors.py', 'tsteps': 'test_sampler_vectors.py',
                     **{k: 'test_edm2_vectors.py' for k in ('edm2_block', 'edm2_loss', 'edm2_lr', 'edm2_mpconv',
                                                            'edm2_phema', 'edm2_precond', 'edm2_prims', 'edm2_sampler')}}
# Kinds whose feature has not landed yet, with the issue that brings it (reported as skips below).
PENDING = {}


def _cases(kinds):
    return [f for f in refvec.files() if refvec.Case(f).kind in kinds]


def test_reference_vectors_present():
    refvec.require()
    assert len(refvec.files()) > 0, f'no .npz files in {refvec.REF_DIR}'


def test_every_vector_kind_has_a_checker():
    refvec.require()
    known = set(CHECKERS) | set(CHECKED_ELSEWHERE) | set(PENDING)
    unknown = {f: refvec.Case(f).kind for f in refvec.files() if refvec.Case(f).kind not in known}
    assert not unknown, f'reference vectors with no checker: {unknown}'
    for kind, module in CHECKED_ELSEWHERE.items():
        assert os.path.exists(os.path.join(os.path.dirname(__file__), module)), module


@pytest.mark.parametrize('name', _cases(PENDING) or ['<none pending>'])
def test_vector_pending(name):
    if name == '<none pending>':
        return
    pytest.skip(f'{name}: {refvec.Case(name).kind} vectors are checked once {PENDING[refvec.Case(name).kind]} lands')


@pytest.mark.parametrize('name', _cases(CHECKERS) or ['<no reference vectors>'])
def test_vector(name):
    refvec.require()
    case = refvec.Case(name)
    CHECKERS[case.kind](case)


def test_positional_embedding_spec_values():
    """Spec §1.7's hand-written vectors for C=8, x=0.5."""
    x = torch.tensor([0.5])
    got_t = networks.PositionalEmbedding(8, endpoint=True)(x)[0]
    got_f = networks.PositionalEmbedding(8, endpoint=False)(x)[0]
    want_t = [0.87758255, 0.99973071, 0.99999940, 1.0, 0.47942555, 0.023205860, 0.0010772169, 4.9999999e-05]
    want_f = [0.87758255, 0.99875027, 0.99998748, 0.99999988, 0.47942555, 0.049979169, 0.0049999789, 0.00049999997]
    assert torch.allclose(got_t, torch.tensor(want_t), rtol=1e-6, atol=1e-8)
    assert torch.allclose(got_f, torch.tensor(want_f), rtol=1e-6, atol=1e-8)


def test_vp_and_iddpm_constants():
    """Spec §12: fp32 artefacts of the VP range and the iDDPM table."""
    with torch.device('meta'):
        vp = networks.VPPrecond(8, 3, model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[])
    assert vp.sigma_min == 0.0009765625 and vp.sigma_max == 152.16697692871094
    idd = networks.iDDPMPrecond(8, 3, model_channels=16, channel_mult=[1], num_blocks=1, attn_resolutions=[])
    assert idd.sigma_min == pytest.approx(0.006422337144613266, abs=0) and idd.sigma_max == 20291.171875
    assert [round(float(v), 4) for v in idd.u[:5]] == [20291.1719, 641.6624, 320.8304, 213.8861, 160.4137]
    assert idd.round_sigma(torch.tensor(80.0), return_index=True).item() == 8
    assert idd.round_sigma(torch.tensor(1.0), return_index=True).item() == 504
    assert idd.round_sigma(torch.tensor(0.002), return_index=True).item() == 1000
    assert math.isclose(float(idd.round_sigma(torch.tensor(80.0))), 80.2037, rel_tol=1e-5)
    assert np.isclose(float(networks.Conv2d(1, 1, 0, down=True, resample_filter=[1, 3, 3, 1]).resample_filter[0, 0, 1, 1]),
                      0.140625)
