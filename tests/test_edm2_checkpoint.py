"""EDM2 checkpoints: official-format EDM2 pickles (EasyDict, fp16 tensors, EDM2Loss, encoders with numpy
arrays) read without running their code, and edm_fast snapshots of EDM2 networks."""

import copy
import os
import sys

import numpy as np
import pytest
import torch

import nvlabs_pickle_writer as writer
from edm_fast import checkpoint, encoders, loss_edm2, pickle_import
from edm_fast.checkpoint import CheckpointError
from edm_fast.networks_edm2 import Precond


def make_net(label_dim=6, seed=0):
    """A small EDM2 Precond with random weights and non-zero gains, as released nets have (kwargs as
    train_edm2.py passes them)."""
    torch.manual_seed(seed)
    net = Precond(img_resolution=16, img_channels=4, label_dim=label_dim, model_channels=32, channel_mult=[1, 2],
                  num_blocks=1, attn_resolutions=[8], dropout=0.0, use_fp16=True, logvar_channels=16)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.uniform_(0.3, 1.0)
    return net.eval()


def fp16_rounded(net):
    """The network NVlabs loads from its fp16 snapshot: the module itself in fp16 (module.to(float16)), parameters
    and buffers; on the CPU it computes in fp32, except the learned gains' gain / sqrt(fan_in), done in fp16."""
    return copy.deepcopy(net).to(torch.float16)


def outputs(net, label_dim=6):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 16, 16, generator=g)
    sigma = torch.tensor([0.02, 0.7, 30.0])
    labels = torch.eye(label_dim)[[0, 3, 5]] if label_dim else None
    with torch.no_grad():
        return net(x, sigma, labels, return_logvar=True)


def write_official(path, net, encoder, loss_fn=None, dataset_kwargs=None):
    """An EDM2 `network-snapshot-*.pkl` as the NVlabs training loop writes it (spec §9.2, §10.5)."""
    ED = writer.make_easydict_type()
    data = ED(encoder=encoder, dataset_kwargs=ED(dataset_kwargs or dict(
        class_name='training.dataset.ImageFolderDataset', path='img512-sd.zip', use_labels=True)),
        loss_fn=loss_fn if loss_fn is not None else loss_edm2.EDM2Loss(P_mean=-0.4, P_std=1.0))
    data['ema'] = copy.deepcopy(net).cpu().eval().requires_grad_(False).to(torch.float16)
    writer.dump_nvlabs(data, path, easydict_type=ED)


def test_official_edm2_pickle_round_trip(tmp_path):
    net = make_net()
    path = tmp_path / 'network-snapshot-0001024-0.100.pkl'
    write_official(path, net, encoders.StandardRGBEncoder())
    raw = pickle_import.load_pickle(path)  # what the file holds, read without running its code
    assert type(raw).__name__ == 'EasyDict' and isinstance(raw, dict)
    assert raw['ema'].class_name == 'Precond' and raw['loss_fn'].class_name == 'EDM2Loss'
    assert raw['encoder'].class_name == 'StandardRGBEncoder'
    tensors = dict(pickle_import.iter_state_dict(raw['ema']))
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    assert list(tensors) == list(net.state_dict())

    loaded = checkpoint.load_network(path)
    assert isinstance(loaded, Precond) and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    assert all(t.dtype == torch.float32 for t in loaded.state_dict().values())
    assert loaded.init_kwargs == net.init_kwargs
    (D, logvar), (D_ref, logvar_ref) = outputs(loaded), outputs(fp16_rounded(net))
    assert torch.equal(D, D_ref) and torch.equal(logvar, logvar_ref)  # identical up to the fp16 storage
    D_exact = outputs(net)[0]
    assert 0 < (outputs(loaded)[0] - D_exact).abs().max() < 1e-2 * D_exact.abs().max()

    snap = checkpoint.load_snapshot(path)
    assert snap['format'] == 'nvlabs-pickle' and snap['augment_pipe'] is None and snap['extra'] is None
    assert isinstance(snap['loss_fn'], loss_edm2.EDM2Loss)
    assert (snap['loss_fn'].P_mean, snap['loss_fn'].P_std, snap['loss_fn'].sigma_data) == (-0.4, 1.0, 0.5)
    assert isinstance(snap['encoder'], encoders.StandardRGBEncoder)
    assert type(snap['dataset_kwargs']) is dict and snap['dataset_kwargs']['path'] == 'img512-sd.zip'
    assert not any(name.startswith('_imported_module_') for name in sys.modules)


def test_official_edm2_pickle_with_vae_encoder(tmp_path):
    net = make_net(label_dim=0)
    enc = encoders.StabilityVAEEncoder(raw_mean=[5.0, 3.0, 0.1, -2.0])
    enc.scale = enc.scale * np.float32(1.25)  # stored arrays are authoritative, not recomputed from kwargs
    path = tmp_path / 'network-snapshot-0000000-0.050.pkl'
    write_official(path, net, enc)
    raw = pickle_import.load_pickle(path)
    assert isinstance(raw['encoder'].state['scale'], np.ndarray) and raw['encoder'].state['_vae'] is None
    snap = checkpoint.load_snapshot(path)
    got = snap['encoder']
    assert isinstance(got, encoders.StabilityVAEEncoder) and got.init_kwargs == enc.init_kwargs
    np.testing.assert_array_equal(got.scale, enc.scale)
    np.testing.assert_array_equal(got.bias, enc.bias)
    a, b = outputs(snap['ema'], label_dim=0), outputs(fp16_rounded(net), label_dim=0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(encoders.VAEUnavailableError, match='stabilityai/sd-vae-ft-mse'):
        got.decode(torch.zeros(1, 4, 2, 2))


def test_official_edm2_pickle_mismatch_is_refused(tmp_path):
    net = make_net()
    net.init_kwargs['model_channels'] = 16  # the recorded kwargs no longer describe the stored tensors
    path = tmp_path / 'bad.pkl'
    write_official(path, net, encoders.StandardRGBEncoder())
    with pytest.raises(CheckpointError, match='do not fit the network rebuilt'):
        checkpoint.load_network(path)

    # A global outside the allow-list next to the network: refused by name before anything runs.
    path2 = tmp_path / 'evil.pkl'
    ED = writer.make_easydict_type()
    writer.dump_nvlabs(ED(ema=make_net(), payload=eval), path2, easydict_type=ED)
    with pytest.raises(CheckpointError, match=r'builtins\.eval'):
        checkpoint.load_network(path2)


def test_own_snapshot_of_edm2_net(tmp_path):
    net = make_net()
    enc = encoders.StabilityVAEEncoder(final_std=0.6)
    path = tmp_path / 'network-snapshot-0000002-0.100.safetensors'
    checkpoint.save_snapshot(path, net, loss_fn=loss_edm2.EDM2Loss(P_mean=-0.8, P_std=1.6), encoder=enc,
                             dataset_kwargs=dict(path='x.zip'), extra=dict(cur_nimg=2048, ema_std=0.1),
                             dtype=torch.float16)
    assert checkpoint.detect_format(path) == 'edm_fast'
    assert checkpoint.read_snapshot_extra(path) == dict(cur_nimg=2048, ema_std=0.1)
    snap = checkpoint.load_snapshot(path)
    loaded = snap['ema']
    assert loaded.init_kwargs == net.init_kwargs and not loaded.training
    ref = fp16_rounded(net)  # as NVlabs' module.to(float16): the Fourier freqs/phases buffers are rounded too
    a, b = outputs(loaded), outputs(ref)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for fourier in (loaded.unet.emb_fourier, loaded.logvar_fourier):
        assert fourier.freqs.dtype == torch.float32
    assert torch.equal(loaded.unet.emb_fourier.freqs, net.unet.emb_fourier.freqs.half().float())
    assert torch.equal(loaded.logvar_fourier.phases, net.logvar_fourier.phases.half().float())
    assert not torch.equal(net.unet.emb_fourier.freqs.half().float(), net.unet.emb_fourier.freqs)  # test has teeth
    assert snap['loss_fn'].init_kwargs == dict(P_mean=-0.8, P_std=1.6)
    assert isinstance(snap['encoder'], encoders.StabilityVAEEncoder)
    np.testing.assert_array_equal(snap['encoder'].scale, enc.scale)
    assert snap['dataset_kwargs'] == dict(path='x.zip') and snap['format'] == 'edm_fast'

    # Without dtype the parameters are stored exactly.
    exact = tmp_path / 'exact.safetensors'
    checkpoint.save_snapshot(exact, net)
    a, b = outputs(checkpoint.load_network(exact)), outputs(net)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert checkpoint.load_snapshot(exact)['encoder'] is None
    assert checkpoint.read_snapshot_extra(exact) is None


def test_save_snapshot_refuses_foreign_objects(tmp_path):
    with pytest.raises(TypeError, match='Precond is EDM2'):
        checkpoint.save_snapshot(tmp_path / 'x.safetensors', torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match='edm_fast.encoders'):
        checkpoint.save_snapshot(tmp_path / 'x.safetensors', make_net(), encoder=object())
    assert not os.path.exists(tmp_path / 'x.safetensors')


def test_reconstruct_phema_from_official_pickles(tmp_path):
    """Post-hoc reconstruction reads official network-snapshot-{kimg:07d}-{std:.3f}.pkl files (nimg from the kimg in
    the name) and writes sum_i X[i] theta_i (fp32 accumulation of the fp16 inputs) as an edm_fast snapshot."""
    from edm_fast import phema
    indir = tmp_path / 'in'
    indir.mkdir()
    nets = {}
    for kimg in (1, 2, 3):
        for std in (0.05, 0.1):
            net = make_net(seed=10 * kimg + int(std * 100))
            nets[(kimg, std)] = fp16_rounded(net)
            write_official(indir / f'network-snapshot-{kimg:07d}-{std:.3f}.pkl', net, encoders.StandardRGBEncoder())
    (indir / 'network-snapshot-0000003.pkl').write_bytes(b'not matched: no std in the name')
    listed = phema.list_input_snapshots(str(indir))
    assert [(s['nimg'], s['std']) for s in listed] == [(n, s) for n in (1024, 2048, 3072) for s in (0.05, 0.1)]

    out = phema.reconstruct_phema(str(indir), [0.08], out_dir=str(tmp_path / 'out'), verbose=False)
    assert os.path.basename(out[0]['path']) == 'phema-0000003-0.080.safetensors'
    X = out[0]['coefs']
    np.testing.assert_array_equal(X, phema.solve_posthoc_coefficients([1024, 1024, 2048, 2048, 3072, 3072],
                                                                     [0.05, 0.1] * 3, 3072, [0.08]).ravel())
    snap = checkpoint.load_snapshot(out[0]['path'])
    assert isinstance(snap['loss_fn'], loss_edm2.EDM2Loss) and isinstance(snap['encoder'], encoders.StandardRGBEncoder)
    assert snap['extra']['cur_nimg'] == 3072 and snap['extra']['ema_std'] == 0.08
    keys = [(k, s) for k in (1, 2, 3) for s in (0.05, 0.1)]
    got = dict(snap['ema'].named_parameters())
    for name, _ in nets[keys[0]].named_parameters():
        params = [dict(nets[k].named_parameters())[name].float() for k in keys]  # fp32 accumulation
        want = sum(p * float(c) for p, c in zip(params, X))
        assert torch.allclose(got[name], want.to(torch.float16).float(), rtol=2 ** -10, atol=1e-6), name
    for name, buf in nets[keys[-1]].named_buffers():  # buffers come from the newest input
        assert torch.equal(dict(snap['ema'].named_buffers())[name], buf.float())
