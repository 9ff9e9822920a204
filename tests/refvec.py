"""Access to the NVlabs reference vectors in ../shared/reference (see its README.md)."""

import functools
import json
import os

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REF_DIR = os.environ.get('EDM_FAST_REFERENCE_DIR', os.path.join(REPO, '..', 'shared', 'reference'))


def available():
    return os.path.isdir(REF_DIR)


def require():
    if not available():
        pytest.skip(f'reference vectors not found at {os.path.abspath(REF_DIR)} '
                    f'(expected ../shared/reference next to the repository, or set EDM_FAST_REFERENCE_DIR)')


def files(prefix=''):
    if not available():
        return []
    return sorted(f for f in os.listdir(REF_DIR) if f.endswith('.npz') and f.startswith(prefix))


@functools.lru_cache(maxsize=None)
def _load(name):
    with np.load(os.path.join(REF_DIR, name), allow_pickle=False) as d:
        return {k: d[k] for k in d.files}


class Case:
    """One .npz case: arrays by key, with helpers for configs, params and tolerance checks."""

    def __init__(self, name):
        require()
        self.name = name
        self.d = _load(name)

    def __contains__(self, key):
        return key in self.d

    def str(self, key):
        return str(self.d[key])

    def json(self, key):
        return json.loads(str(self.d[key]))

    def t(self, key, dtype=None):
        x = torch.from_numpy(np.array(self.d[key]))
        return x if dtype is None else x.to(dtype)

    @property
    def kind(self):
        return self.str('case_kind')

    @property
    def class_short(self):
        return self.str('class_name').rsplit('.', 1)[-1]

    def params(self):
        return {k[len('param/'):]: torch.from_numpy(np.array(v)) for k, v in self.d.items() if k.startswith('param/')}

    def keys(self, prefix):
        return sorted(k[len(prefix):] for k in self.d if k.startswith(prefix))

    def check(self, key, actual, tol_key=None, slack=None):
        """Assert max |actual - out/key| <= tol/key (+ slack, an elementwise array) elementwise (exact for integer
        outputs)."""
        expected = self.d['out/' + key]
        tol = self.d['tol/' + (tol_key or key)]
        actual = actual.detach().cpu()
        assert tuple(actual.shape) == tuple(expected.shape), f'{self.name} {key}: shape {tuple(actual.shape)} != {expected.shape}'
        if np.issubdtype(expected.dtype, np.integer):
            assert torch.equal(actual.to(torch.int64), torch.from_numpy(expected).to(torch.int64)), f'{self.name} {key}: integers differ'
            return 0.0
        err = (actual.to(torch.float64) - torch.from_numpy(expected).to(torch.float64)).abs()
        bound = torch.from_numpy(np.broadcast_to(tol, expected.shape).astype(np.float64))
        if slack is not None:
            bound = bound + torch.as_tensor(slack, dtype=torch.float64)
        worst = (err - bound).max().item() if err.numel() else 0.0
        assert torch.isfinite(actual.to(torch.float64)).all(), f'{self.name} {key}: non-finite values'
        assert worst <= 0, f'{self.name} {key}: max error {err.max().item():.3g} exceeds tolerance {float(np.max(tol)):.3g}'
        return err.max().item()


def build_net(case):
    """Rebuild the network of a precond/layer case with edm_fast classes and load its parameters."""
    from edm_fast import networks
    cls = getattr(networks, case.class_short)
    net = cls(**case.json('config_json'))
    params = case.params()
    net.load_state_dict(params, strict=True)
    return net.eval()
