"""Checkpoints: official NVlabs pickles / training states through the restricted unpickler, and the
edm_fast snapshot format (safetensors layout)."""

import hashlib
import io
import itertools
import json
import os
import pickle
import re
import struct
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from edm_fast.augment import AugmentPipe

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import nvlabs_pickle_writer as writer  # noqa: E402
from edm_fast import checkpoint, loss, networks, pickle_import, presets  # noqa: E402
from edm_fast.checkpoint import CheckpointError  # noqa: E402

torch.set_num_threads(1)

# ----------------------------------------------------------------------------------------------------
# Helpers.

SMALL = {
    'vp-songunet-standard': dict(class_name='VPPrecond', img_resolution=8, img_channels=3, label_dim=3,
                                 augment_dim=9, model_type='SongUNet', model_channels=16, channel_mult=[1, 2],
                                 num_blocks=1, attn_resolutions=[4], embedding_type='positional',
                                 encoder_type='standard', decoder_type='standard', resample_filter=[1, 1]),
    've-songunet-residual': dict(class_name='VEPrecond', img_resolution=8, img_channels=3, label_dim=0,
                                 model_type='SongUNet', model_channels=16, channel_mult=[1, 2, 2], num_blocks=1,
                                 attn_resolutions=[4], embedding_type='fourier', channel_mult_noise=2,
                                 encoder_type='residual', decoder_type='standard', resample_filter=[1, 3, 3, 1]),
    'edm-songunet-skip': dict(class_name='EDMPrecond', img_resolution=16, img_channels=2, label_dim=0,
                              model_type='SongUNet', model_channels=16, channel_mult=[1, 2, 1], num_blocks=1,
                              attn_resolutions=[8], encoder_type='skip', decoder_type='skip',
                              resample_filter=[1, 3, 3, 1], sigma_min=0.002, sigma_max=80.0, dropout=0.1),
    'edm-dhariwal': dict(class_name='EDMPrecond', img_resolution=8, img_channels=3, label_dim=5,
                         model_type='DhariwalUNet', model_channels=64, channel_mult=[1, 2], num_blocks=1,
                         attn_resolutions=[4], use_fp16=True),
    'iddpm-dhariwal': dict(class_name='iDDPMPrecond', img_resolution=8, img_channels=3, label_dim=0,
                           model_type='DhariwalUNet', model_channels=64, channel_mult=[1, 2], num_blocks=1,
                           attn_resolutions=[8, 4]),
}


def make_net(config, seed=0):
    """A network in eval mode whose parameters are all random (also the zero-initialised ones)."""
    torch.manual_seed(seed)
    net = presets.build(config).eval().requires_grad_(False)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net


def net_inputs(net, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    res, ch = net.img_resolution, net.img_channels
    x = torch.randn([batch, ch, res, res], generator=g)
    sigma = torch.tensor([0.3, 7.0][:batch] + [1.0] * max(batch - 2, 0))
    labels = None
    if net.label_dim:
        labels = torch.nn.functional.one_hot(torch.arange(batch) % net.label_dim, net.label_dim).float()
    kwargs = {}
    if getattr(net.model, 'map_augment', None) is not None:
        kwargs['augment_labels'] = torch.randn([batch, net.model.map_augment.in_features], generator=g)
    return x, sigma, labels, kwargs


def outputs(net, inputs):
    x, sigma, labels, kwargs = inputs
    with torch.no_grad():
        return net(x, sigma, labels, **kwargs)


def assert_same_network(a, b):
    assert type(a) is type(b)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k
    for attr in ('img_resolution', 'img_channels', 'label_dim', 'use_fp16', 'sigma_min', 'sigma_max'):
        assert getattr(a, attr) == getattr(b, attr), attr
    inputs = net_inputs(a)
    ya, yb = outputs(a, inputs), outputs(b, inputs)
    assert ya.abs().sum() > 0
    assert torch.equal(ya, yb)


def assert_clean_modules():
    bad = [m for m in sys.modules if m.startswith('_imported_module_') or m == 'torch_utils'
           or m.startswith('torch_utils.') or m == 'dnnlib' or m.startswith('dnnlib.')]
    assert not bad, bad


def marker_src(marker):
    """Module source that leaves a file behind if it is ever executed."""
    return f"open({str(marker)!r}, 'w').close()\nraise RuntimeError('this module source must never be executed')\n"


class Evil:
    """Pickles as a call fn(*args)."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.fixture(scope='module')
def small_edm_pickle(tmp_path_factory):
    """(path, net, loss, augment, dataset_kwargs) of an official-format snapshot of a small SongUNet EDM net."""
    path = tmp_path_factory.mktemp('pkl') / 'network-snapshot-000000.pkl'
    net = make_net(SMALL['ve-songunet-residual'] | {'class_name': 'EDMPrecond'})
    loss_fn = loss.EDMLoss(P_mean=-1.1, P_std=1.3)
    aug = writer.FakeAugmentPipe(p=0.15)
    dataset_kwargs = dict(class_name='training.dataset.ImageFolderDataset', path='datasets/x.zip', use_labels=False,
                          xflip=False, cache=True, resolution=8, max_size=100)
    writer.write_network_pickle(path, net, loss_fn, aug, dataset_kwargs)
    return path, net, loss_fn, aug, dataset_kwargs

# ----------------------------------------------------------------------------------------------------
# Official pickles: round trips.


@pytest.mark.parametrize('name', list(SMALL))
def test_nvlabs_pickle_round_trip_small(name, tmp_path):
    net = make_net(SMALL[name])
    marker = tmp_path / 'executed'
    src = marker_src(marker)
    path = tmp_path / 'net.pkl'
    writer.write_network_pickle(path, net, loss.EDMLoss(), None, dict(path='x.zip'), module_src=src)
    assert_clean_modules()
    raw = path.read_bytes()
    assert src.encode() in raw and b'_reconstruct_persistent_obj' in raw  # really the official layout

    # The official unpickler would need the module; plain pickle cannot read the file without it.
    with pytest.raises(ModuleNotFoundError):
        pickle.loads(raw)

    loaded = checkpoint.load_network(path)
    assert not marker.exists()
    assert_clean_modules()
    assert isinstance(loaded, getattr(networks, SMALL[name]['class_name']))
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert loaded.init_kwargs == net.init_kwargs
    assert_same_network(net, loaded)

    # The records keep a hash of the (dropped) module source for provenance.
    data = pickle_import.load_pickle(path)
    assert data['ema'].class_name == SMALL[name]['class_name']
    assert data['ema'].version == 6
    assert data['ema'].module_src_sha256 == hashlib.sha256(src.encode()).hexdigest()
    assert not marker.exists()


def test_iter_state_dict_matches_reference_order(small_edm_pickle):
    path, net, *_ = small_edm_pickle
    data = pickle_import.load_pickle(path)
    walked = list(pickle_import.iter_state_dict(data['ema']))
    ref = net.state_dict()
    assert [k for k, _ in walked] == list(ref)
    assert all(torch.equal(t, ref[k]) for k, t in walked)
    assert 'model.map_noise.freqs' in ref  # a buffer is included
    kwargs = pickle_import.init_kwargs(data['ema'], networks.EDMPrecond)
    assert kwargs == net.init_kwargs
    model = data['ema'].state['_modules']['model']
    assert model.class_name == 'SongUNet'
    assert pickle_import.init_kwargs(model, networks.SongUNet) == net.model.init_kwargs


def test_non_persistent_buffers_are_skipped(tmp_path):
    net = make_net(SMALL['edm-songunet-skip'])
    net.model.register_buffer('scratch', torch.ones(3), persistent=False)
    path = tmp_path / 'net.pkl'
    writer.write_network_pickle(path, net)
    record = pickle_import.load_pickle(path)['ema']
    assert 'scratch' in record.state['_modules']['model'].state['_buffers']
    names = [k for k, _ in pickle_import.iter_state_dict(record)]
    assert 'model.scratch' not in names and names == list(net.state_dict())


def test_init_args_are_mapped_to_names(tmp_path):
    net = make_net(SMALL['edm-songunet-skip'])
    kwargs = dict(net.init_kwargs)
    path = tmp_path / 'net.pkl'
    writer.write_network_pickle(path, net)
    record = pickle_import.load_pickle(path)['ema']
    record.state['_init_args'] = (kwargs.pop('img_resolution'), kwargs.pop('img_channels'))
    record.state['_init_kwargs'] = kwargs
    assert pickle_import.init_kwargs(record, networks.EDMPrecond) == net.init_kwargs
    record.state['_init_kwargs'] = dict(kwargs, img_channels=3)
    with pytest.raises(CheckpointError, match='both positionally and by name'):
        pickle_import.init_kwargs(record, networks.EDMPrecond)


@pytest.mark.parametrize('name', ['edm-cifar10-32x32-cond-vp', 'edm-cifar10-32x32-uncond-ve',
                                  'edm-imagenet-64x64-cond-adm'])
def test_nvlabs_pickle_full_size(name, tmp_path):
    config, n_params = presets.OFFICIAL[name]
    torch.manual_seed(0)
    net = presets.build(config).eval().requires_grad_(False)
    assert sum(p.numel() for p in net.parameters()) == n_params
    with torch.no_grad():  # zero-initialised layers (ADM's conv1/proj/out_conv) would hide half the network
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    path = tmp_path / f'{name}.pkl'
    try:
        writer.write_network_pickle(path, net, loss.EDMLoss(), None, dict(path='x.zip'))
        loaded = checkpoint.load_network(path)
    finally:
        path.unlink(missing_ok=True)  # up to 1.2 GB; pytest keeps old tmp dirs around
    assert_clean_modules()
    assert loaded.init_kwargs == net.init_kwargs
    sa, sb = net.state_dict(), loaded.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    x, sigma, labels, kwargs = net_inputs(net)
    with torch.no_grad():
        ya = net(x, sigma, labels, force_fp32=True, **kwargs)
        yb = loaded(x, sigma, labels, force_fp32=True, **kwargs)
    assert ya.dtype == torch.float32 and torch.equal(ya, yb)


def test_load_snapshot_nvlabs(small_edm_pickle):
    path, net, loss_fn, aug, dataset_kwargs = small_edm_pickle
    snap = checkpoint.load_snapshot(path)
    assert snap['format'] == 'nvlabs-pickle'
    assert_same_network(net, snap['ema'])
    assert next(snap['ema'].parameters()).device.type == 'cpu' and not snap['ema'].training
    assert type(snap['loss_fn']) is loss.EDMLoss
    assert snap['loss_fn'].init_kwargs == loss_fn.init_kwargs == dict(P_mean=-1.1, P_std=1.3)
    assert (snap['loss_fn'].P_mean, snap['loss_fn'].P_std, snap['loss_fn'].sigma_data) == (-1.1, 1.3, 0.5)
    assert type(snap['augment_pipe']) is AugmentPipe and snap['augment_pipe'].init_kwargs == aug.init_kwargs
    assert snap['augment_pipe'].p == 0.15
    assert snap['dataset_kwargs'] == dataset_kwargs and type(snap['dataset_kwargs']) is dict


@pytest.mark.parametrize('loss_fn', [loss.VPLoss(beta_d=18.0), loss.VELoss(sigma_max=50), None])
def test_load_snapshot_other_losses(loss_fn, tmp_path):
    net = make_net(SMALL['vp-songunet-standard'])
    path = tmp_path / 'net.pkl'
    writer.write_network_pickle(path, net, loss_fn, None, None)
    snap = checkpoint.load_snapshot(path)
    assert snap['augment_pipe'] is None and snap['dataset_kwargs'] is None
    if loss_fn is None:
        assert snap['loss_fn'] is None
    else:
        assert type(snap['loss_fn']) is type(loss_fn) and snap['loss_fn'].init_kwargs == loss_fn.init_kwargs
        assert vars(snap['loss_fn']) == vars(loss_fn)


def test_easydict_container(tmp_path):
    """EDM2-style pickles hold EasyDicts (dnnlib.util.EasyDict) at the top level."""
    EasyDict = writer.make_easydict_type()
    net = make_net(SMALL['edm-songunet-skip'])
    path = tmp_path / 'net.pkl'
    writer.dump_nvlabs(EasyDict(ema=net, loss_fn=None, augment_pipe=None,
                                dataset_kwargs=EasyDict(path='x.zip', resolution=16)), path, easydict_type=EasyDict)
    assert_clean_modules()
    assert b'EasyDict' in path.read_bytes()
    data = pickle_import.load_pickle(path)
    assert isinstance(data, dict) and data.dataset_kwargs.resolution == 16
    snap = checkpoint.load_snapshot(path)
    assert snap['dataset_kwargs'] == {'path': 'x.zip', 'resolution': 16} and type(snap['dataset_kwargs']) is dict
    assert_same_network(net, snap['ema'])
    assert_clean_modules()


def test_loading_keeps_the_global_rng(small_edm_pickle):
    path = small_edm_pickle[0]
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    checkpoint.load_network(path)
    assert torch.equal(torch.rand(4), expected)


def test_fallback_when_meta_construction_fails(small_edm_pickle, monkeypatch):
    """Networks are built on the meta device when possible; a constructor that cannot run there still loads."""
    real = networks.weight_init
    meta_calls = []

    def weight_init(*args, **kwargs):
        if torch.get_default_device().type == 'meta':
            meta_calls.append(1)
            raise RuntimeError('no meta device here')
        return real(*args, **kwargs)

    monkeypatch.setattr(networks, 'weight_init', weight_init)
    path, net = small_edm_pickle[:2]
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    loaded = checkpoint.load_network(path)
    assert torch.equal(torch.rand(3), expected)  # the random init of the fallback did not touch the RNG
    assert meta_calls
    assert_same_network(net, loaded)


def test_fallback_for_tensors_outside_the_state_dict(tmp_path, monkeypatch):
    """A non-persistent buffer made in __init__ would stay on the meta device: build normally instead."""
    orig = networks.PositionalEmbedding.__init__

    def init(self, *args, **kwargs):
        orig(self, *args, **kwargs)
        self.register_buffer('scratch', torch.full([2], 3.0), persistent=False)

    monkeypatch.setattr(networks.PositionalEmbedding, '__init__', init)
    net = make_net(SMALL['edm-songunet-skip'])
    path = tmp_path / 'net.pkl'
    writer.write_network_pickle(path, net)
    for loaded in (checkpoint.load_network(path), checkpoint.load_snapshot(path)['ema']):
        assert not any(t.is_meta for t in itertools.chain(loaded.parameters(), loaded.buffers()))
        assert torch.equal(loaded.model.map_noise.scratch, torch.full([2], 3.0))
        assert_same_network(net, loaded)
    own = tmp_path / 'net.safetensors'
    checkpoint.save_snapshot(own, net)
    loaded = checkpoint.load_network(own)
    assert torch.equal(loaded.model.map_noise.scratch, torch.full([2], 3.0))
    assert_same_network(net, loaded)


def test_load_network_device_argument(small_edm_pickle):
    net = checkpoint.load_network(small_edm_pickle[0], device='meta')
    assert all(p.device.type == 'meta' for p in net.parameters())

# ----------------------------------------------------------------------------------------------------
# Official training states.


def test_training_state_round_trip(tmp_path):
    torch.manual_seed(0)
    net = make_net(SMALL['edm-dhariwal']).train().requires_grad_(True)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, betas=[0.9, 0.999], eps=1e-8)
    x, sigma, labels, kwargs = net_inputs(net)
    net(x, sigma, labels, **kwargs).square().mean().backward()
    opt.step()
    marker = tmp_path / 'executed'
    path = tmp_path / 'training-state-000010.pt'
    writer.write_training_state(path, net, opt, module_src=marker_src(marker))
    assert path.read_bytes()[:2] == b'PK'
    assert_clean_modules()

    state = checkpoint.load_training_state(path)
    assert not marker.exists()
    assert_clean_modules()
    loaded = state['net']
    assert type(loaded) is type(net) and loaded.training
    assert all(p.requires_grad for p in loaded.parameters())
    sa, sb = net.state_dict(), loaded.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)

    ref = opt.state_dict()
    got = state['optimizer_state']
    assert got['param_groups'] == ref['param_groups']
    assert set(got['state']) == set(ref['state']) == set(range(len(list(net.parameters()))))
    for i, s in ref['state'].items():
        assert set(got['state'][i]) == set(s)
        for k, v in s.items():
            assert type(got['state'][i][k]) is torch.Tensor and torch.equal(got['state'][i][k], v), (i, k)
    assert any(v['exp_avg'].abs().sum() > 0 for v in got['state'].values())

    # load_network accepts it too ('net', eval mode).
    net_only = checkpoint.load_network(path)
    assert not net_only.training
    assert all(torch.equal(a, b) for a, b in zip(net_only.parameters(), loaded.parameters()))

    # The state can be loaded into an optimizer over the rebuilt network and continues identically.
    opt2 = torch.optim.Adam(loaded.parameters(), lr=1e-3)
    opt2.load_state_dict(got)
    for model, o in ((net, opt), (loaded, opt2)):
        torch.manual_seed(7)  # same dropout masks
        o.zero_grad()
        model(x, sigma, labels, **kwargs).square().mean().backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), loaded.parameters()))



def test_training_state_refuses_unknown_globals(tmp_path):
    net = make_net(SMALL['edm-songunet-skip']).train()
    opt = torch.optim.Adam(net.parameters())
    target = tmp_path / 'pwned'
    path = tmp_path / 'training-state-000001.pt'
    writer.write_training_state(path, net, opt, extra=dict(payload=Evil(os.system, f'touch {target}')))
    with pytest.raises(CheckpointError, match=rf'refusing to load {re.escape(str(path))}: it references '
                                              rf'{os.system.__module__}\.system'):
        checkpoint.load_training_state(path)
    assert not target.exists()


def test_load_training_state_rejects_other_kinds(small_edm_pickle):
    with pytest.raises(CheckpointError, match='not a training-state'):
        checkpoint.load_training_state(small_edm_pickle[0])

# ----------------------------------------------------------------------------------------------------
# Refusing malicious pickles.


def _crafted_os_system(cmd):
    """A protocol-2 pickle whose GLOBAL opcode names `os system` literally."""
    return b'\x80\x02cos\nsystem\n(V' + cmd.encode() + b'\ntR.'


def test_crafted_payload_is_real(tmp_path):
    """Sanity check of the crafted payload: plain pickle really runs it."""
    target = tmp_path / 'ran'
    pickle.loads(_crafted_os_system(f'touch {target}'))
    assert target.exists()


def test_refuses_os_system_global(tmp_path):
    target = tmp_path / 'pwned'
    path = tmp_path / 'x.pkl'
    path.write_bytes(_crafted_os_system(f'touch {target}'))
    with pytest.raises(CheckpointError) as e:
        checkpoint.load_network(path)
    msg = str(e.value)
    assert f'refusing to load {path}' in msg and 'it references os.system' in msg
    assert 'not an allowed global' in msg and 'only load checkpoints you trust' in msg
    assert not target.exists()


@pytest.mark.parametrize('kind', ['os.system', 'builtins.eval', 'subprocess.Popen', 'in-record'])
def test_refuses_payloads(kind, tmp_path):
    target = tmp_path / 'pwned'
    net = make_net(SMALL['edm-songunet-skip'])
    dataset_kwargs = dict(path='x.zip')
    if kind == 'os.system':
        payload, name = Evil(os.system, f'touch {target}'), f'{os.system.__module__}.system'
    elif kind == 'builtins.eval':
        payload, name = Evil(eval, f"open({str(target)!r}, 'w').close()"), 'builtins.eval'
    elif kind == 'subprocess.Popen':
        payload, name = Evil(subprocess.Popen, ['touch', str(target)]), 'subprocess.Popen'
    else:  # hidden inside a persistent record's state, after some tensors
        net.model.map_layer0.extra_attr = Evil(os.system, f'touch {target}')
        payload, name = None, f'{os.system.__module__}.system'
    if payload is not None:
        dataset_kwargs['payload'] = payload
    path = tmp_path / 'net.pkl'
    writer.write_network_pickle(path, net, loss.EDMLoss(), None, dataset_kwargs)
    for load in (checkpoint.load_network, checkpoint.load_snapshot, pickle_import.load_pickle):
        with pytest.raises(CheckpointError, match=rf'refusing to load {re.escape(str(path))}: it references {name},'):
            load(path)
    assert not target.exists()
    assert_clean_modules()


def test_refuses_wrong_persistence_version(tmp_path):
    net = make_net(SMALL['edm-songunet-skip'])
    path = tmp_path / 'net.pkl'
    writer.dump_nvlabs(dict(ema=net), path, version=5)
    with pytest.raises(CheckpointError, match=r'net\.pkl.*version 5.*only version 6'):
        checkpoint.load_network(path)


def test_restricted_unpickler_allow_list_is_isolated():
    """A crafted BUILD on an allowed global must not alter the real torch function."""
    import torch._utils as tu
    before = tu._rebuild_tensor_v2.__defaults__
    # GLOBAL torch._utils _rebuild_tensor_v2, then BUILD with slot state {'__defaults__': (1,)}.
    payload = b'\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}X\x0c\x00\x00\x00__defaults__K\x01\x85s\x86b.'
    obj = pickle_import.RestrictedUnpickler(io.BytesIO(payload)).load()
    assert obj.__defaults__ == (1,)  # the wrapper was modified ...
    assert tu._rebuild_tensor_v2.__defaults__ == before  # ... the real function was not

def test_numpy_globals_both_spellings():
    """numpy scalars/arrays written with numpy 1.x (numpy.core) or 2.x (numpy._core) both load."""
    values = dict(s=np.sqrt(0.5), i=np.int64(3), a=np.arange(6, dtype=np.float32).reshape(2, 3))
    raw = pickle.dumps(values, protocol=3)  # GLOBAL opcodes spell module names as plain text
    assert b'cnumpy._core.multiarray\nscalar\n' in raw and b'_reconstruct' in raw
    for spelling in (b'numpy._core.multiarray', b'numpy.core.multiarray'):
        got = pickle_import.RestrictedUnpickler(io.BytesIO(raw.replace(b'numpy._core.multiarray', spelling))).load()
        assert type(got['s']) is np.float64 and got['s'] == np.sqrt(0.5)
        assert type(got['i']) is np.int64 and got['i'] == 3
        assert got['a'].dtype == np.float32 and np.array_equal(got['a'], values['a'])


def test_torch_save_extras_only_for_torch_files():
    raw = pickle.dumps({'s': {1, 2}, 'b': b'xy'}, protocol=2)  # __builtin__.set and _codecs.encode
    with pytest.raises(CheckpointError, match=r'__builtin__\.set|_codecs\.encode'):
        pickle_import.RestrictedUnpickler(io.BytesIO(raw)).load()
    assert pickle_import.RestrictedUnpickler(io.BytesIO(raw), torch_save=True).load() == {'s': {1, 2}, 'b': b'xy'}

# ----------------------------------------------------------------------------------------------------
# Broken or unexpected files.


def test_broken_files(small_edm_pickle, tmp_path):
    raw = small_edm_pickle[0].read_bytes()
    cases = {
        'truncated.pkl': raw[:len(raw) // 2],
        'empty.pkl': b'',
        'random.pkl': np.random.default_rng(0).bytes(4096),
        'text.pkl': b'this is not a checkpoint\n' * 10,
        'random80.pkl': b'\x80' + np.random.default_rng(1).bytes(4096),
        'zip.pt': b'PK\x03\x04' + np.random.default_rng(2).bytes(100),
    }
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        for load in (checkpoint.load_network, checkpoint.load_snapshot):
            with pytest.raises(CheckpointError, match=re.escape(str(path))):
                load(path)
    for missing in (tmp_path / 'missing.pkl', tmp_path):
        with pytest.raises(CheckpointError, match=re.escape(str(missing))):
            checkpoint.load_network(missing)
    with pytest.raises(CheckpointError, match='no such file'):
        checkpoint.load_snapshot(tmp_path / 'missing.pkl')
    with pytest.raises(CheckpointError, match='empty'):
        checkpoint.load_network(tmp_path / 'empty.pkl')


def test_detect_format_by_content(small_edm_pickle, tmp_path):
    own = tmp_path / 'snapshot.pkl'  # extensions are ignored
    checkpoint.save_snapshot(own, make_net(SMALL['edm-songunet-skip']))
    assert checkpoint.detect_format(own) == 'edm_fast'
    assert checkpoint.detect_format(small_edm_pickle[0]) == 'pickle'
    # A pickle whose 9th byte happens to be '{' is still a pickle.
    odd = tmp_path / 'odd.safetensors'
    odd.write_bytes(b'\x80\x02X\x05\x00\x00\x00a{bcdq\x00.')
    assert pickle.loads(odd.read_bytes()) == 'a{bcd'
    assert checkpoint.detect_format(odd) == 'pickle'
    with pytest.raises(CheckpointError, match='the pickle holds a str'):
        checkpoint.load_network(odd)


def test_pickle_without_ema(tmp_path):
    net = make_net(SMALL['edm-songunet-skip'])
    path = tmp_path / 'x.pkl'
    writer.dump_nvlabs(dict(net=net), path)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))}: the pickle has no 'ema'.*train.py --resume"):
        checkpoint.load_network(path)
    writer.dump_nvlabs([1, 2, 3], path)
    with pytest.raises(CheckpointError, match=rf'{re.escape(str(path))}: the pickle holds a list'):
        checkpoint.load_snapshot(path)


def test_unknown_class_name(tmp_path):
    path = tmp_path / 'x.pkl'
    writer.dump_nvlabs(dict(ema=loss.EDMLoss()), path)
    with pytest.raises(CheckpointError,
                       match=rf"{re.escape(str(path))}: ema is a 'EDMLoss', which edm_fast cannot rebuild"):
        checkpoint.load_network(path)
    writer.dump_nvlabs(dict(ema=make_net(SMALL['edm-songunet-skip']), loss_fn=writer.FakeAugmentPipe()), path)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))}: loss_fn is a 'AugmentPipe'"):
        checkpoint.load_snapshot(path)


def test_state_dict_mismatch(tmp_path):
    net = make_net(SMALL['edm-songunet-skip'])
    net.init_kwargs['model_channels'] = 32  # the recorded kwargs no longer describe the tensors
    path = tmp_path / 'x.pkl'
    writer.write_network_pickle(path, net)
    with pytest.raises(CheckpointError,
                       match=rf'(?s){re.escape(str(path))}: the tensors stored for ema do not fit.*size mismatch'):
        checkpoint.load_network(path)

    net = make_net(SMALL['edm-songunet-skip'])
    del net.model.map_layer0._parameters['bias']  # a tensor is missing
    writer.write_network_pickle(path, net)
    with pytest.raises(CheckpointError, match=r'(?s)Missing key.*model\.map_layer0\.bias'):
        checkpoint.load_network(path)


def test_model_type_mismatch(tmp_path):
    net = make_net(SMALL['edm-songunet-skip'])
    del net.init_kwargs['model_type']  # EDMPrecond's default is DhariwalUNet
    path = tmp_path / 'x.pkl'
    writer.write_network_pickle(path, net)
    with pytest.raises(CheckpointError, match=r"ema\.model is a SongUNet, but EDMPrecond was built with "
                                              r"model_type='DhariwalUNet'"):
        checkpoint.load_network(path)


def test_attribute_cross_check(tmp_path):
    path = tmp_path / 'x.pkl'
    # A float attribute that disagrees with the kwargs: the checkpoint value wins, with a warning.
    net = make_net(SMALL['edm-songunet-skip'])
    net.sigma_data = 0.625
    net.model.enc['16x16_block0'].skip_scale = np.float64(0.75)
    writer.write_network_pickle(path, net)
    with pytest.warns(checkpoint.CheckpointWarning) as record:
        loaded = checkpoint.load_network(path)
    assert any('sigma_data' in str(w.message) for w in record)
    assert any('model.enc.16x16_block0.skip_scale' in str(w.message) for w in record)
    assert loaded.sigma_data == 0.625 and loaded.model.enc['16x16_block0'].skip_scale == 0.75
    assert_same_network(net, loaded)

    # Without disagreement there is no warning.
    net = make_net(SMALL['edm-songunet-skip'])
    writer.write_network_pickle(path, net)
    with warnings.catch_warnings():
        warnings.simplefilter('error', checkpoint.CheckpointWarning)
        checkpoint.load_network(path)

    # A structural attribute that disagrees is an error.
    net = make_net(SMALL['edm-songunet-skip'])
    net.model.enc['16x16_block0'].num_heads = 2
    writer.write_network_pickle(path, net)
    with pytest.raises(CheckpointError, match=r'ema\.model\.enc\.16x16_block0\.num_heads: checkpoint 2, rebuilt 0'):
        checkpoint.load_network(path)

# ----------------------------------------------------------------------------------------------------
# edm_fast snapshots.


def read_layout(path):
    """Parse a safetensors file by hand: (header dict, data bytes, header length)."""
    raw = path.read_bytes()
    (n,) = struct.unpack('<Q', raw[:8])
    header = json.loads(raw[8:8 + n].decode('utf-8'))
    return header, raw[8 + n:], n


def test_own_format_round_trip_exact(tmp_path):
    for name in ('iddpm-dhariwal', 've-songunet-residual', 'vp-songunet-standard'):
        net = make_net(SMALL[name])
        path = tmp_path / f'{name}.safetensors'
        checkpoint.save_snapshot(path, net)
        assert checkpoint.detect_format(path) == 'edm_fast'
        loaded = checkpoint.load_network(path)
        assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
        assert loaded.init_kwargs == net.init_kwargs
        assert_same_network(net, loaded)
        snap = checkpoint.load_snapshot(path)
        assert snap['format'] == 'edm_fast' and snap['loss_fn'] is None and snap['augment_pipe'] is None
        assert snap['dataset_kwargs'] is None and snap['extra'] is None


def test_own_format_layout_is_safetensors(tmp_path):
    net = make_net(SMALL['iddpm-dhariwal'])
    path = tmp_path / 'snap.safetensors'
    checkpoint.save_snapshot(path, net, loss_fn=loss.EDMLoss(), extra=dict(kimg=3))
    header, data, n = read_layout(path)
    assert path.read_bytes()[8:9] == b'{' and n % 8 == 0
    meta = header.pop('__metadata__')
    assert set(meta) == {'edm_fast'} and all(isinstance(v, str) for v in meta.values())
    info = json.loads(meta['edm_fast'])
    assert info['format'] == 'edm_fast.snapshot' and info['version'] == 1
    assert info['modules']['ema'] == {'class_name': 'iDDPMPrecond', 'init_kwargs': json.loads(json.dumps(
        net.init_kwargs))}
    ref = net.state_dict()
    assert set(header) == {f'ema.{k}' for k in ref}
    spans = sorted(tuple(v['data_offsets']) for v in header.values())
    assert spans[0][0] == 0 and spans[-1][1] == len(data)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # contiguous, no overlap
    for key, t in ref.items():
        entry = header[f'ema.{key}']
        assert entry['dtype'] == {torch.float32: 'F32'}[t.dtype]
        assert entry['shape'] == list(t.shape)
        begin, end = entry['data_offsets']
        assert begin % 4 == 0
        assert data[begin:end] == t.numpy().astype('<f4').tobytes(), key
    assert 'ema.u' in header  # iDDPM's buffer


def test_own_format_fp16(tmp_path):
    net = make_net(SMALL['ve-songunet-residual'])
    path = tmp_path / 'snap.safetensors'
    checkpoint.save_snapshot(path, net, dtype=torch.float16)
    header, _, _ = read_layout(path)
    params = dict(net.named_parameters())
    buffers = dict(net.named_buffers())
    for key in params:
        assert header[f'ema.{key}']['dtype'] == 'F16'
    for key in buffers:
        assert header[f'ema.{key}']['dtype'] == 'F32'
    assert 'model.map_noise.freqs' in buffers
    full = tmp_path / 'full.safetensors'
    checkpoint.save_snapshot(full, net)
    assert path.stat().st_size < 0.6 * full.stat().st_size
    loaded = checkpoint.load_network(path)
    for key, p in loaded.named_parameters():
        assert p.dtype == torch.float32
        assert torch.equal(p, params[key].half().float()), key
    assert any(not torch.equal(p, params[k]) for k, p in loaded.named_parameters())  # really rounded
    for key, b in loaded.named_buffers():
        assert torch.equal(b, buffers[key]) and b.dtype == buffers[key].dtype
    ref = outputs(net, net_inputs(net))
    got = outputs(loaded, net_inputs(net))
    assert torch.allclose(got, ref, rtol=1e-2, atol=1e-2)


def test_own_format_metadata(tmp_path):
    net = make_net(SMALL['vp-songunet-standard'])
    path = tmp_path / 'snap.safetensors'
    dataset_kwargs = dict(class_name='training.dataset.ImageFolderDataset', path='d.zip', use_labels=True,
                          xflip=False, cache=True, resolution=8, max_size=123)
    extra = dict(kimg=200, cur_tick=4, note='hello', nested={'a': [1, 2.5]})
    for aug in (AugmentPipe(p=0.2, xflip=1e8, scale=1), {'class_name': 'AugmentPipe', 'kwargs': dict(p=0.3, xflip=1e8)}):
        checkpoint.save_snapshot(path, net, loss_fn=loss.VPLoss(beta_d=18.5, epsilon_t=1e-4), augment_pipe=aug,
                                 dataset_kwargs=dataset_kwargs, extra=extra)
        snap = checkpoint.load_snapshot(path)
        assert snap['format'] == 'edm_fast'
        assert_same_network(net, snap['ema'])
        assert type(snap['loss_fn']) is loss.VPLoss
        assert snap['loss_fn'].init_kwargs == dict(beta_d=18.5, epsilon_t=1e-4)
        assert vars(snap['loss_fn']) == vars(loss.VPLoss(beta_d=18.5, epsilon_t=1e-4))
        expected = aug.init_kwargs if isinstance(aug, AugmentPipe) else aug['kwargs']
        assert type(snap['augment_pipe']) is AugmentPipe and snap['augment_pipe'].init_kwargs == expected
        assert snap['dataset_kwargs'] == dataset_kwargs
        assert snap['extra'] == extra


def test_nvlabs_to_own_format(small_edm_pickle, tmp_path):
    """Convert an official pickle into an edm_fast snapshot without losing anything."""
    snap = checkpoint.load_snapshot(small_edm_pickle[0])
    path = tmp_path / 'converted.safetensors'
    checkpoint.save_snapshot(path, snap['ema'], snap['loss_fn'], snap['augment_pipe'], snap['dataset_kwargs'],
                             extra=dict(kimg=0))
    again = checkpoint.load_snapshot(path)
    assert_same_network(small_edm_pickle[1], again['ema'])
    assert again['dataset_kwargs'] == snap['dataset_kwargs']
    assert again['augment_pipe'].init_kwargs == snap['augment_pipe'].init_kwargs
    assert again['loss_fn'].init_kwargs == snap['loss_fn'].init_kwargs


def test_own_format_atomic_write(tmp_path, monkeypatch):
    net = make_net(SMALL['edm-songunet-skip'])
    path = tmp_path / 'snap.safetensors'
    checkpoint.save_snapshot(path, net, extra=dict(kimg=1))
    assert sorted(os.listdir(tmp_path)) == ['snap.safetensors']
    before = path.read_bytes()

    calls = []
    real = checkpoint._tensor_bytes

    def failing(t):
        calls.append(1)
        if len(calls) > 3:
            raise OSError('disk full (simulated)')
        return real(t)

    monkeypatch.setattr(checkpoint, '_tensor_bytes', failing)
    with pytest.raises(OSError, match='simulated'):
        checkpoint.save_snapshot(path, make_net(SMALL['edm-songunet-skip'], seed=5), extra=dict(kimg=2))
    assert len(calls) == 4
    assert sorted(os.listdir(tmp_path)) == ['snap.safetensors']  # no temporary left behind
    assert path.read_bytes() == before  # the old snapshot is intact
    monkeypatch.setattr(checkpoint, '_tensor_bytes', real)
    checkpoint.save_snapshot(path, net, extra=dict(kimg=3))  # overwriting works
    assert checkpoint.load_snapshot(path)['extra'] == dict(kimg=3)
    assert sorted(os.listdir(tmp_path)) == ['snap.safetensors']


def test_written_files_follow_the_umask(tmp_path):
    """Snapshots and PNGs get the permissions a plain open() gives (mkstemp alone would make them 0600, unreadable
    by the other users of a shared cluster)."""
    from edm_fast import image_io
    umask = os.umask(0o022)
    os.umask(umask)
    checkpoint.save_snapshot(tmp_path / 'snap.safetensors', make_net(SMALL['edm-songunet-skip']))
    image_io.save_png(np.zeros((4, 4, 3), np.uint8), tmp_path / 'img.png')
    for name in ('snap.safetensors', 'img.png'):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o666 & ~umask, name


def _rewrite(path, out, edit_header=None, data_edit=None):
    header, data, _ = read_layout(path)
    if edit_header is not None:
        edit_header(header)
    if data_edit is not None:
        data = data_edit(data)
    hb = json.dumps(header).encode()
    out.write_bytes(struct.pack('<Q', len(hb)) + hb + data)


def test_own_format_corruption(tmp_path):
    net = make_net(SMALL['edm-songunet-skip'])
    path = tmp_path / 'good.safetensors'
    checkpoint.save_snapshot(path, net)
    raw = path.read_bytes()
    header, data, n = read_layout(path)
    names = [k for k in header if k != '__metadata__']
    first = min(names, key=lambda k: header[k]['data_offsets'][0])
    second = sorted(names, key=lambda k: header[k]['data_offsets'][0])[1]

    def shift(h):
        h[second]['data_offsets'] = [h[second]['data_offsets'][0] - 4, h[second]['data_offsets'][1] - 4]

    def set_field(key, field, value):
        return lambda h: h[key].__setitem__(field, value)

    cases = {
        'huge-header-length': (struct.pack('<Q', len(raw)) + raw[8:], 'header length'),
        'bad-json': (raw[:9] + b'#' + raw[10:], 'not valid UTF-8 JSON'),
        'truncated-data': (raw[:-100], 'file holds only|cover'),
        'trailing-garbage': (raw + b'\0' * 16, 'data section holds'),
    }
    for case, (content, msg) in cases.items():
        p = tmp_path / f'{case}.safetensors'
        p.write_bytes(content)
        with pytest.raises(CheckpointError, match=rf'{re.escape(str(p))}.*({msg})'):
            checkpoint.load_network(p)

    edits = {
        'overlap': (shift, 'overlaps'),
        'out-of-range': (set_field(first, 'data_offsets', [0, len(data) + 8]), 'file holds only'),
        'reversed-offsets': (set_field(first, 'data_offsets', [8, 0]), 'invalid data_offsets'),
        'bad-dtype': (set_field(first, 'dtype', 'F128'), 'unknown dtype'),
        'bad-shape': (set_field(first, 'shape', [1, 2, 3]), 'does not match data_offsets'),
        'negative-shape': (set_field(first, 'shape', [-1]), 'invalid shape'),
        'no-metadata': (lambda h: h.pop('__metadata__'), 'not an edm_fast snapshot'),
        'future-version': (lambda h: h['__metadata__'].__setitem__('edm_fast', json.dumps(
            dict(json.loads(h['__metadata__']['edm_fast']), version=99))), 'version 99 is not supported'),
        'unknown-class': (lambda h: h['__metadata__'].__setitem__('edm_fast', json.dumps(
            dict(json.loads(h['__metadata__']['edm_fast']),
                 modules={'ema': {'class_name': 'Evil', 'init_kwargs': {}}}))), "'Evil', which edm_fast cannot"),
        'missing-tensor': (lambda h: h.pop(first), 'gap'),
    }
    for case, (edit, msg) in edits.items():
        p = tmp_path / f'{case}.safetensors'
        _rewrite(path, p, edit)
        with pytest.raises(CheckpointError, match=rf'{re.escape(str(p))}.*({msg})'):
            checkpoint.load_snapshot(p)

    # Sanity: an unmodified rewrite still loads.
    p = tmp_path / 'rewritten.safetensors'
    _rewrite(path, p)
    assert_same_network(net, checkpoint.load_network(p))


def test_zip_that_is_no_checkpoint_is_named(tmp_path):
    """A dataset zip or a cut-short training state given as a network gets a message saying what it is."""
    import zipfile
    with zipfile.ZipFile(tmp_path / 'data.zip', 'w') as z:
        z.writestr('00000/img00000000.png', b'x')
        z.writestr('dataset.json', '{"labels": null}')
    with pytest.raises(CheckpointError, match=r'a zip archive \(an image dataset\?\), not a checkpoint'):
        checkpoint.load_network(tmp_path / 'data.zip')
    (tmp_path / 'cut.pt').write_bytes(b'PK\x03\x04' + bytes(100))
    with pytest.raises(CheckpointError, match='a damaged zip archive'):
        checkpoint.load_network(tmp_path / 'cut.pt')
