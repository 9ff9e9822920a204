"""The sampler_* and tsteps reference vectors: EDM and ablation samplers, call by call."""

import numpy as np
import pytest
import torch

import refvec
from edm_fast import sampling


class RecordingNet:
    """Wraps a preconditioner, recording the x, sigma and output of every call (as the vectors were made)."""

    def __init__(self, net):
        self.net = net
        self.calls = []
        self.sigma_min, self.sigma_max, self.round_sigma = net.sigma_min, net.sigma_max, net.round_sigma

    def __call__(self, x, sigma, class_labels=None):
        with torch.no_grad():
            D = self.net(x, sigma, class_labels)
        self.calls.append((x.clone(), torch.as_tensor(sigma).clone(), D.clone()))
        return D


class Noise:
    """randn_like that returns the recorded draws in order (or zeros), counting calls."""

    def __init__(self, noise=None):
        self.noise, self.calls = noise, 0

    def __call__(self, x):
        out = torch.zeros_like(x) if self.noise is None else self.noise[self.calls].to(x.dtype)
        self.calls += 1
        return out


def _run(case):
    net = RecordingNet(refvec.build_net(refvec.Case(case.str('net_npz'))))
    kwargs = case.json('sampler_kwargs_json')
    labels = case.t('in/class_labels') if 'in/class_labels' in case else None
    noise = Noise(case.t('in/noise') if 'in/noise' in case else None)
    fn = {'edm_sampler': sampling.edm_sampler, 'ablation_sampler': sampling.ablation_sampler}[case.str('sampler_name')]
    x = fn(net, case.t('in/latents'), labels, randn_like=noise, **kwargs)
    return net, noise, x, kwargs


@pytest.mark.parametrize('name', refvec.files('sampler_') or ['<no reference vectors>'])
def test_sampler_vector(name):
    refvec.require()
    case = refvec.Case(name)
    if case.kind == 'tsteps':
        return _check_tsteps(case)
    net, noise, x, kwargs = _run(case)
    assert x.dtype == torch.float64
    case.check('x', x)
    assert len(net.calls) == int(case.d['meta/nfe'])
    assert noise.calls == int(case.d['meta/randn_like_calls'])
    case.check('call_D', torch.stack([c[2] for c in net.calls]))
    case.check('call_sigma', torch.stack([c[1].to(torch.float64).reshape([]) for c in net.calls]))
    if 'out/call_x' in case:
        case.check('call_x', torch.stack([c[0] for c in net.calls]))
    assert sampling.nfe_per_image(**kwargs) == int(case.d['meta/nfe'])

    # The time steps and the resolved ranges, computed by the same functions the samplers use.
    if case.str('sampler_name') == 'edm_sampler':
        t_steps, smin, smax = sampling.edm_time_steps(net, **{k: v for k, v in kwargs.items()
                                                               if k in ('num_steps', 'sigma_min', 'sigma_max', 'rho')})
    else:
        keys = ('num_steps', 'sigma_min', 'sigma_max', 'rho', 'discretization', 'epsilon_s', 'C_1', 'C_2', 'M')
        sigma_steps, smin, smax, beta_d, beta_min = sampling.ablation_sigma_steps(
            net, **{k: v for k, v in kwargs.items() if k in keys})
        case.check('sigma_steps', sigma_steps)
        assert beta_d == pytest.approx(float(case.d['meta/resolved_vp_beta_d']), rel=1e-12)
        assert beta_min == pytest.approx(float(case.d['meta/resolved_vp_beta_min']), rel=1e-10, abs=1e-14)
        sch = sampling._Schedule(kwargs.get('schedule', 'linear'), kwargs.get('scaling', 'none'), beta_d, beta_min)
        t_steps = sampling.ablation_time_steps(net, sch, sigma_steps)
    case.check('t_steps', t_steps)
    assert smin == pytest.approx(float(case.d['meta/resolved_sigma_min']), rel=1e-15)
    assert smax == pytest.approx(float(case.d['meta/resolved_sigma_max']), rel=1e-15)


def test_edm_sampler_churn_sigma_is_bit_exact():
    """t_hat = round_sigma(t_cur + gamma t_cur), NVlabs' evaluation order: t_cur (1 + gamma) rounds differently
    in the last bit on some steps, which the vector's 2e-13 tolerance would let through. Compared exactly on the
    steps whose t_cur this machine computes bit-identically to the recording (the schedule's pow may differ)."""
    refvec.require()
    case = refvec.Case('sampler_edm_stoch10.npz')
    net, _, _, kwargs = _run(case)
    assert kwargs['S_churn'] > 0
    t_steps = sampling.edm_time_steps(net, **{k: kwargs[k] for k in ('num_steps', 'sigma_min', 'sigma_max', 'rho')})[0]
    recorded_t, recorded_sigma = case.d['out/t_steps'], case.d['out/call_sigma']
    got_sigma = [float(c[1].to(torch.float64)) for c in net.calls]
    same = [i for i in range(kwargs['num_steps']) if float(t_steps[i]) == recorded_t[i]]
    if not same:
        pytest.skip('no t_cur of this machine equals the recorded one bit for bit (pow differs)')
    churned = [i for i in same if kwargs['S_min'] <= recorded_t[i] <= kwargs['S_max']]
    assert churned, 'no churned step to compare'
    assert [got_sigma[2 * i] for i in same] == [recorded_sigma[2 * i] for i in same]


@pytest.mark.parametrize('name', ['sampler_abl_euler_vp_vp_vp.npz', 'sampler_abl_euler_vp_vp_vp_churn.npz',
                                  'sampler_abl_heun_edm_vp_vp.npz'])
def test_vp_schedule_is_bit_exact(name):
    """sigma(t) of the VP schedule is NVlabs' (e ** x - 1) ** 0.5, not sqrt(exp(x) - 1), which differs in the last bit
    (5.7e-14 in sigma_steps, 1.6e-5 in the churned x) and hides inside the vectors' tolerances. Compared exactly
    where this machine's pow reproduces the recorded EDM schedule bit for bit (the recording machine's libm)."""
    refvec.require()
    edm = refvec.Case('sampler_edm_det18.npz')
    edm_net, _, _, edm_kwargs = _run(edm)
    t_edm = sampling.edm_time_steps(edm_net, **{k: edm_kwargs[k] for k in ('num_steps', 'sigma_min', 'sigma_max',
                                                                           'rho') if k in edm_kwargs})[0]
    if not np.array_equal(t_edm.numpy(), edm.d['out/t_steps']):
        pytest.skip('this machine\'s pow does not reproduce the recorded EDM schedule bit for bit')
    case = refvec.Case(name)
    net, _, x, kwargs = _run(case)
    assert case.check('x', x) == 0
    assert case.check('call_sigma', torch.stack([c[1].to(torch.float64).reshape([]) for c in net.calls])) == 0
    keys = ('num_steps', 'sigma_min', 'sigma_max', 'rho', 'discretization', 'epsilon_s', 'C_1', 'C_2', 'M')
    sigma_steps = sampling.ablation_sigma_steps(net, **{k: v for k, v in kwargs.items() if k in keys})[0]
    assert case.check('sigma_steps', sigma_steps) == 0


def _check_tsteps(case):
    net = refvec.build_net(refvec.Case(case.str('net_npz')))
    for num_steps, smin, smax, rho in case.json('tsteps_config_json'):
        t_steps, _, _ = sampling.edm_time_steps(net, num_steps, smin, smax, rho)
        assert t_steps.dtype == torch.float64 and t_steps[-1] == 0
        case.check(f't_steps_{num_steps}', t_steps)


def test_spec_schedule_values():
    """Spec §4.1: the N=18 EDM schedule, float64."""
    want = [80, 57.58598472, 40.7855738, 28.3745846, 19.35245298, 12.91008238, 8.400935309, 5.315194522,
            3.25682152, 1.923339837, 1.088170637, 0.5853481232, 0.2964422845, 0.1395164687, 0.05994731124,
            0.02293451837, 0.007528019963, 0.002]
    got = sampling.edm_sigma_steps(18, 0.002, 80, 7)
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), rtol=1e-9, atol=0)


def test_bad_sampler_arguments():
    class Net:
        sigma_min, sigma_max = 0, float('inf')

        def round_sigma(self, s):
            return torch.as_tensor(s)
    with pytest.raises(ValueError, match='num_steps'):
        sampling.edm_sampler(Net(), torch.zeros(1, 1, 2, 2), num_steps=1)
    for kw, word in (({'solver': 'rk4'}, 'solver'), ({'discretization': 'cosine'}, 'discretization'),
                     ({'schedule': 'cosine'}, 'schedule'), ({'scaling': 've'}, 'scaling')):
        with pytest.raises(ValueError, match=word):
            sampling.ablation_sampler(Net(), torch.zeros(1, 1, 2, 2), **kw)


def test_stacked_generator_depends_only_on_seed():
    a = sampling.StackedRandomGenerator('cpu', [5, 7, 9])
    b = sampling.StackedRandomGenerator('cpu', [7])
    xa = a.randn([3, 2, 4, 4])
    xb = b.randn([1, 2, 4, 4])
    assert torch.equal(xa[1], xb[0])
    assert torch.equal(sampling.StackedRandomGenerator('cpu', [7 + 2 ** 32]).randn([1, 2, 4, 4]), xb)
    ia, ib = a.randint(10, size=[3]), b.randint(10, size=[1])
    assert ia[1] == ib[0]
    with pytest.raises(ValueError, match='number of seeds'):
        a.randn([2, 1])
