"""Every NVlabs EDM2 reference vector (../shared/reference/edm2_*.npz), checked at its recorded tolerance.

Kinds: edm2_prims (MP primitives + MPFourier), edm2_mpconv (eval/training mode, weight after each call),
edm2_block, edm2_precond (edm2_net, edm2_gnet), edm2_loss (training and eval mode, gradients), edm2_lr,
edm2_phema (profile math, post-hoc coefficients, EMA trajectory) and edm2_sampler (call by call).
"""

import math

import numpy as np
import pytest
import torch

import refvec
from edm_fast import loss_edm2, networks_edm2, phema, sampling_edm2


def build_edm2(case):
    """The EDM2 module of a case (class from networks_edm2, kwargs from config_json, param/* loaded), eval mode."""
    cls = getattr(networks_edm2, case.class_short)
    module = cls(**case.json('config_json'))
    module.load_state_dict(case.params(), strict=True)
    return module.eval()

# ----------------------------------------------------------------------------------------------------
# Primitives, MPConv, Block.


def check_prims(case):
    for out_name, fn_name, inputs, kwargs in case.json('ops_json'):
        fn = getattr(networks_edm2, fn_name)
        case.check(out_name, fn(*[case.t('in/' + name) for name in inputs], **kwargs))
    fourier = networks_edm2.MPFourier(**case.json('config_json'))
    fourier.load_state_dict(case.params(), strict=True)
    case.check('fourier', fourier(case.t('in/noise_labels')))


def check_mpconv(case):
    conv = build_edm2(case)
    x, gain = case.t('in/x'), case.t('in/gain')
    for grad in (False, True):  # no grad: the eval-mode weight cache serves the weight; with grad: recomputed
        conv.requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            case.check('y_eval_gain1', conv(x))
            case.check('y_eval_gain0.5', conv(x, gain=0.5))
            case.check('y_eval_gaint', conv(x, gain=gain))
        case.check('weight_after_eval', conv.weight)
    conv.train()
    with torch.no_grad():
        case.check('y_train', conv(x, gain=gain))
        case.check('weight_after_train', conv.weight)
        case.check('y_train_again', conv(x, gain=gain))
        case.check('weight_after_train_again', conv.weight)


def check_block(case):
    block = build_edm2(case)
    with torch.no_grad():
        y = block(case.t('in/x'), case.t('in/emb'))
    case.check('y', y)
    assert block.num_heads == int(case.d['meta/num_heads'])
    assert int((y.abs() == block.clip_act).sum()) == int(case.d['meta/clipped_count'])

# ----------------------------------------------------------------------------------------------------
# Precond around the UNet.


def _capture_unet_io(net):
    seen = {}

    def pre(module, args, kwargs):
        seen['x'], seen['noise_labels'] = args[0].detach().clone(), args[1].detach().clone()
        seen['class_labels'] = None if args[2] is None else args[2].detach().clone()

    def post(module, args, kwargs, out):
        seen['F'] = out.detach().clone()

    net.unet.register_forward_pre_hook(pre, with_kwargs=True)
    net.unet.register_forward_hook(post, with_kwargs=True)
    return seen


def check_precond(case):
    with torch.device('meta'):
        fresh = networks_edm2.Precond(**case.json('config_json'))
    params = case.params()
    assert {k: tuple(v.shape) for k, v in fresh.state_dict().items()} == {k: tuple(v.shape) for k, v in params.items()}
    net = build_edm2(case)
    heads = {name: block.num_heads for name, block in list(net.unet.enc.items()) + list(net.unet.dec.items())
             if isinstance(block, networks_edm2.Block)}
    assert heads == case.json('meta/num_heads_json')
    seen = _capture_unet_io(net)
    x, sigma, labels = case.t('in/x'), case.t('in/sigma'), case.t('in/class_labels')
    with torch.no_grad():
        D, logvar = net(x, sigma, labels, return_logvar=True)
        case.check('D', D)
        case.check('logvar', logvar)
        case.check('F', seen['F'])
        case.check('unet_x', seen['x'])
        case.check('unet_noise_labels', seen['noise_labels'])
        case.check('unet_class_labels', seen['class_labels'])
        case.check('F', net.unet(seen['x'], seen['noise_labels'], seen['class_labels']))  # called directly
        assert torch.equal(net(x, sigma, labels), D)  # logvar never enters D
        case.check('D_nolabels', net(x, sigma, None))
        case.check('D_sigma_scalar', net(x, case.t('in/sigma_scalar'), labels))

# ----------------------------------------------------------------------------------------------------
# Loss with injected randomness, in training and eval mode.


def check_loss(case):
    assert case.str('loss_class_name').rsplit('.', 1)[-1] == 'EDM2Loss'
    net_case = refvec.Case(case.str('net_npz'))
    for training, loss_key, grad_prefix in ((True, 'loss', 'grad/'), (False, 'loss_eval', 'grad_eval/')):
        net = build_edm2(net_case).train(training).requires_grad_(True)
        seen = {}

        def pre(module, args, kwargs):
            seen['net_input'], seen['sigma'] = args[0].detach().clone(), args[1].detach().clone()
            assert kwargs.get('return_logvar') is True

        def post(module, args, kwargs, out):
            seen['D_yn'], seen['logvar'] = out[0].detach().clone(), out[1].detach().clone()

        net.register_forward_pre_hook(pre, with_kwargs=True)
        net.register_forward_hook(post, with_kwargs=True)
        loss_fn = loss_edm2.EDM2Loss(**case.json('loss_kwargs_json'))
        loss = loss_fn(net, case.t('in/images'), case.t('in/class_labels'), rnd=case.t('in/rnd_normal'),
                       noise=case.t('in/noise'))
        case.check(loss_key, loss)
        if training:
            for key in ('D_yn', 'net_input', 'sigma', 'logvar'):
                case.check(key, seen[key])
        loss.sum().backward()
        grads = dict(net.named_parameters())
        for name in case.keys('out/' + grad_prefix):
            case.check(grad_prefix + name, grads[name].grad)
        if training:
            names = case.json('meta/gradnorm_names_json')
            norms = torch.tensor([grads[n].grad.to(torch.float64).norm().item() for n in names], dtype=torch.float64)
            case.check('gradnorm', norms)

# ----------------------------------------------------------------------------------------------------
# Learning rate and power-function EMA (float64 math).


def check_lr(case):
    assert case.str('function_name').rsplit('.', 1)[-1] == 'learning_rate_schedule'
    lr = [[loss_edm2.learning_rate_schedule(int(n), **cfg) for n in case.d['in/cur_nimg']]
          for cfg in case.json('configs_json')]
    case.check('lr', torch.tensor(lr, dtype=torch.float64))


class _TinyNet(torch.nn.Module):
    """The module of the edm2_phema case: parameters weight [3,4] and bias [3], buffer running [3]."""

    def __init__(self, weight, bias):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.clone())
        self.bias = torch.nn.Parameter(bias.clone())
        self.register_buffer('running', torch.zeros(3))


def check_phema(case):
    d = case.d
    as_t = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float64))  # noqa: E731
    case.check('std_to_exp', as_t(phema.std_to_exp(d['in/std_grid'])))
    case.check('exp_to_std', as_t(phema.exp_to_std(d['in/exp_grid'])))
    case.check('beta', as_t(phema.power_function_beta(d['in/beta_std'], d['in/beta_t_next'], d['in/beta_t_delta'])))
    case.check('response', as_t(phema.power_function_response(d['in/resp_ofs'], d['in/resp_std'],
                                                              int(d['in/resp_len']), axis=0)))
    case.check('correlation', as_t(phema.power_function_correlation(d['in/corr_a_ofs'], d['in/corr_a_std'],
                                                                    d['in/corr_b_ofs'], d['in/corr_b_std'])))
    case.check('posthoc', as_t(phema.solve_posthoc_coefficients(d['in/in_nimg'], d['in/in_std'], d['in/out_nimg'],
                                                                d['in/out_std'])))

    # EMA trajectory: before update k the net holds in/ema_net_*[k].
    cfg = case.json('config_json')
    net = _TinyNet(case.t('in/ema_init_weight'), case.t('in/ema_init_bias'))
    ema = phema.PowerFunctionEMA(net, stds=cfg['stds'])
    traj = {std: ([], []) for std in cfg['stds']}
    for k, cur_nimg in enumerate(d['in/ema_cur_nimg']):
        with torch.no_grad():
            net.weight.copy_(case.t('in/ema_net_weight')[k])
            net.bias.copy_(case.t('in/ema_net_bias')[k])
            net.running.copy_(case.t('in/ema_net_running')[k])
        ema.update(cur_nimg=int(cur_nimg), batch_size=cfg['batch_size'])
        for std, e in zip(cfg['stds'], ema.emas):
            traj[std][0].append(e.weight.detach().clone())
            traj[std][1].append(e.bias.detach().clone())
        assert all(torch.equal(e.running, torch.zeros(3)) for e in ema.emas)  # buffers are not averaged
    got = ema.get()
    assert [suffix for _, suffix in got] == case.json('meta/ema_suffixes_json')
    for std, (module, _) in zip(cfg['stds'], got):
        case.check(f'ema_weight_std{std:.3f}', torch.stack(traj[std][0]))
        case.check(f'ema_bias_std{std:.3f}', torch.stack(traj[std][1]))
        case.check(f'ema_running_after_get_std{std:.3f}', module.running)

# ----------------------------------------------------------------------------------------------------
# Sampler, call by call.


def check_sampler(case):
    assert case.str('sampler_name') == 'edm_sampler'
    net = build_edm2(refvec.Case(case.str('net_npz')))
    gnet = build_edm2(refvec.Case(case.str('gnet_npz'))) if 'gnet_npz' in case else None
    calls, gcalls, randn_calls = [], [], []

    def recorder(module, store):
        def fn(x, t, labels):
            D = module(x, t, labels)
            store.append((x.clone(), t.clone(), D.clone()))
            return D
        return fn

    def randn_like(x):
        randn_calls.append(1)
        return torch.zeros_like(x)

    kwargs = case.json('sampler_kwargs_json')
    kwargs['dtype'] = getattr(torch, kwargs['dtype'])
    with torch.no_grad():
        x = sampling_edm2.edm2_sampler(recorder(net, calls), case.t('in/latents'), case.t('in/class_labels'),
                                       gnet=None if gnet is None else recorder(gnet, gcalls), randn_like=randn_like,
                                       **kwargs)
    assert x.dtype == torch.float32
    case.check('x', x)
    assert len(calls) == int(case.d['meta/nfe']) and len(gcalls) == int(case.d['meta/gnet_nfe'])
    assert len(randn_calls) == int(case.d['meta/randn_like_calls'])
    assert all(c[1].ndim == 0 and c[1].dtype == torch.float32 for c in calls)  # 0-d float32 sigma
    case.check('call_x', torch.stack([c[0] for c in calls]))
    case.check('call_sigma', torch.stack([c[1] for c in calls]))
    case.check('call_D', torch.stack([c[2] for c in calls]))
    if gcalls:
        case.check('gcall_D', torch.stack([c[2] for c in gcalls]))
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(calls, gcalls))
    t_steps = sampling_edm2.edm2_time_steps(kwargs['num_steps'], kwargs['sigma_min'], kwargs['sigma_max'], kwargs['rho'])
    assert (t_steps.dtype == torch.float32) == bool(case.d['meta/t_steps_dtype_float32'])
    case.check('t_steps', t_steps)


CHECKERS = {'edm2_prims': check_prims, 'edm2_mpconv': check_mpconv, 'edm2_block': check_block,
            'edm2_precond': check_precond, 'edm2_loss': check_loss, 'edm2_lr': check_lr, 'edm2_phema': check_phema,
            'edm2_sampler': check_sampler}


def _edm2_files():
    return refvec.files('edm2_')


def test_edm2_vectors_present_and_all_kinds_checked():
    refvec.require()
    kinds = {refvec.Case(f).kind for f in _edm2_files()}
    assert kinds, f'no edm2_*.npz files in {refvec.REF_DIR}'
    assert kinds <= set(CHECKERS), f'EDM2 vector kinds without a checker: {kinds - set(CHECKERS)}'
    assert set(CHECKERS) <= kinds, f'checkers without vectors: {set(CHECKERS) - kinds}'


@pytest.mark.parametrize('name', _edm2_files() or ['<no reference vectors>'])
def test_edm2_vector(name):
    refvec.require()
    case = refvec.Case(name)
    CHECKERS[case.kind](case)


def test_lr_schedule_defaults():
    """NVlabs defaults ref_lr=100e-4, ref_batches=70e3, rampup_Mimg=10 (spec §10.5): lr 0 at the start, ref_lr after the
    ramp, inverse-sqrt decay after ref_batches batches."""
    lr = loss_edm2.learning_rate_schedule
    assert lr(0, 2048) == 0
    assert lr(5_000_000, 2048) == pytest.approx(0.005, rel=1e-15)
    assert lr(10_000_000, 2048) == pytest.approx(0.01, rel=1e-15)
    assert lr(70_000 * 2048, 2048) == pytest.approx(0.01, rel=1e-15)
    assert lr(4 * 70_000 * 2048, 2048) == pytest.approx(0.005, rel=1e-15)
    assert lr(123, 2048, ref_batches=0, rampup_Mimg=0) == 0.01
    assert math.isclose(phema.exp_to_std(0), phema.MAX_STD, rel_tol=1e-15)
