"""Network structure, API and dtype rules beyond what the reference vectors pin down."""

import inspect

import numpy as np
import pytest
import torch

from edm_fast import networks, presets


def _meta(config):
    with torch.device('meta'):
        return presets.build(config)


@pytest.mark.parametrize('name', sorted(presets.OFFICIAL))
def test_official_parameter_counts(name):
    config, expected = presets.OFFICIAL[name]
    net = _meta(config)
    assert sum(p.numel() for p in net.parameters()) == expected


def test_state_dict_sizes_and_buffers():
    """Spec §1.13: buffers (elements) and state_dict entries of the official configs."""
    expected = {'edm-cifar10-32x32-cond-vp': (32, 427), 'edm-cifar10-32x32-uncond-ve': (288, 432),
                'edm-ffhq-64x64-uncond-ve': (368, 563), 'edm-imagenet-64x64-cond-adm': (48, 553),
                'ref-iddpm-imagenet-64x64-cond-adm': (1049, 554)}
    for name, (buffers, entries) in expected.items():
        net = _meta(presets.official_config(name))
        assert sum(b.numel() for b in net.buffers()) == buffers, name
        assert len(net.state_dict()) == entries, name


def test_ddpmpp_cifar_state_dict_shapes():
    """Spec §1.14 key patterns of DDPM++ CIFAR-10 cond."""
    sd = _meta(presets.official_config('edm-cifar10-32x32-cond-vp')).state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    want = {
        'model.map_label.weight': (128, 10), 'model.map_augment.weight': (128, 9), 'model.map_layer0.weight': (512, 128),
        'model.map_layer1.weight': (512, 512), 'model.enc.32x32_conv.weight': (128, 3, 3, 3),
        'model.enc.32x32_block0.conv0.weight': (256, 128, 3, 3), 'model.enc.32x32_block0.affine.weight': (256, 512),
        'model.enc.32x32_block0.skip.weight': (256, 128, 1, 1), 'model.enc.16x16_down.conv0.resample_filter': (1, 1, 2, 2),
        'model.enc.16x16_down.skip.resample_filter': (1, 1, 2, 2), 'model.enc.16x16_block0.qkv.weight': (768, 256, 1, 1),
        'model.dec.8x8_block0.conv0.weight': (256, 512, 3, 3), 'model.dec.32x32_block4.norm0.weight': (384,),
        'model.dec.32x32_aux_conv.weight': (3, 256, 3, 3),
    }
    for key, shape in want.items():
        assert shapes[key] == shape, key
    assert 'model.map_augment.bias' not in shapes and 'model.enc.8x8_block0.qkv.weight' not in shapes
    assert 'model.dec.16x16_block3.qkv.weight' not in shapes and 'model.dec.16x16_block4.qkv.weight' in shapes
    assert next(iter(sd)).startswith('model.map_label')


def test_adm_structure():
    sd = _meta(presets.official_config('edm-imagenet-64x64-cond-adm')).state_dict()
    keys = list(sd)
    # ADM registers map_label after map_layer1 (parameter order matters for optimizer states).
    assert keys.index('model.map_layer1.bias') < keys.index('model.map_label.weight') < keys.index('model.enc.64x64_conv.weight')
    assert tuple(sd['model.map_label.weight'].shape) == (768, 1000) and 'model.map_label.bias' not in sd
    assert 'model.enc.32x32_down.skip.resample_filter' in sd and 'model.enc.32x32_down.skip.weight' not in sd
    assert tuple(sd['model.enc.32x32_block0.qkv.weight'].shape) == (1152, 384, 1, 1)
    assert tuple(sd['model.enc.64x64_block0.affine.weight'].shape) == (384, 768)
    assert 'model.dec.8x8_block0.qkv.weight' in sd and 'model.dec.64x64_block0.qkv.weight' not in sd
    dec_in = [sd[f'model.dec.{r}x{r}_block{i}.norm0.weight'].shape[0] for r in (8, 16, 32, 64) for i in range(4)]
    assert dec_in == [1536, 1536, 1536, 1344, 1344, 1152, 1152, 960, 960, 768, 768, 576, 576, 384, 384, 384]
    assert tuple(sd['model.out_conv.weight'].shape) == (3, 192, 3, 3)
    net = _meta(presets.official_config('ref-iddpm-imagenet-64x64-cond-adm'))
    assert next(iter(net.state_dict())) == 'u' and tuple(net.model.out_conv.weight.shape) == (6, 192, 3, 3)


def test_unetblock_registration_order():
    block = networks.UNetBlock(64, 128, 32, down=True, attention=True, channels_per_head=64)
    assert [n for n, _ in block.named_children()] == ['norm0', 'conv0', 'affine', 'norm1', 'conv1', 'skip', 'norm2',
                                                       'qkv', 'proj']
    assert block.num_heads == 2
    assert networks.UNetBlock(32, 32, 8, attention=True).num_heads == 0  # fewer than 64 channels: no head


def test_constructor_defaults():
    def defaults(cls):
        return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    song = defaults(networks.SongUNet)
    assert song == dict(label_dim=0, augment_dim=0, model_channels=128, channel_mult=[1, 2, 2, 2], channel_mult_emb=4,
                        num_blocks=4, attn_resolutions=[16], dropout=0.10, label_dropout=0, embedding_type='positional',
                        channel_mult_noise=1, encoder_type='standard', decoder_type='standard', resample_filter=[1, 1])
    adm = defaults(networks.DhariwalUNet)
    assert adm == dict(label_dim=0, augment_dim=0, model_channels=192, channel_mult=[1, 2, 3, 4], channel_mult_emb=4,
                       num_blocks=3, attn_resolutions=[32, 16, 8], dropout=0.10, label_dropout=0)
    assert defaults(networks.EDMPrecond) == dict(label_dim=0, use_fp16=False, sigma_min=0, sigma_max=float('inf'),
                                                 sigma_data=0.5, model_type='DhariwalUNet')
    assert defaults(networks.VPPrecond)['model_type'] == 'SongUNet'
    assert defaults(networks.iDDPMPrecond) == dict(label_dim=0, use_fp16=False, C_1=0.001, C_2=0.008, M=1000,
                                                   model_type='DhariwalUNet')


def test_group_count_rule():
    assert [networks.GroupNorm(c).num_groups for c in (8, 12, 32, 64, 128, 192, 256)] == [2, 3, 8, 16, 32, 32, 32]


def test_init_kwargs_record_what_was_passed():
    net = networks.EDMPrecond(8, 3, 0, False, model_type='SongUNet', model_channels=8, channel_mult=[1],
                              num_blocks=1, attn_resolutions=[])
    assert net.init_kwargs == dict(img_resolution=8, img_channels=3, label_dim=0, use_fp16=False, model_type='SongUNet',
                                   model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[])
    rebuilt = networks.EDMPrecond(**net.init_kwargs)
    assert [(k, v.shape) for k, v in rebuilt.state_dict().items()] == [(k, v.shape) for k, v in net.state_dict().items()]


def test_init_statistics():
    """Initialisation scales: SongUNet 'zero' init is 1e-5 xavier, ADM zero init is exactly 0."""
    torch.manual_seed(0)
    song = networks.SongUNet(16, 3, 3, model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])
    w = song.enc['16x16_block0'].conv1.weight
    assert 0 < w.abs().max() <= 1e-5 * np.sqrt(6 / (2 * 32 * 9)) * 1.0001
    assert 0 < song.enc['16x16_block0'].affine.weight.abs().max()
    assert torch.all(song.enc['16x16_block0'].affine.bias == 0)
    adm = networks.DhariwalUNet(16, 3, 3, label_dim=10, augment_dim=9, model_channels=64, channel_mult=[1],
                                num_blocks=1, attn_resolutions=[16])
    assert torch.all(adm.out_conv.weight == 0) and torch.all(adm.map_augment.weight == 0)
    assert torch.all(adm.enc['16x16_block0'].conv1.weight == 0)
    bound = 1 / np.sqrt(64 * 9)
    assert adm.enc['16x16_block0'].conv0.bias.abs().max() <= bound and adm.enc['16x16_block0'].conv0.bias.abs().max() > bound / 2
    assert abs(adm.map_label.weight.std().item() - 1) < 0.1  # kaiming_normal * sqrt(label_dim)


def _tiny(cls=networks.EDMPrecond, **kw):
    cfg = dict(img_resolution=8, img_channels=3, label_dim=4, model_type='SongUNet', model_channels=16,
               channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.5)
    cfg.update(kw)
    torch.manual_seed(1)
    net = cls(**cfg)
    for p in net.parameters():  # no zero-initialised layers, so every path shows in the output
        p.data.normal_(0, 0.3)
    return net


def test_dropout_train_vs_eval():
    net = _tiny()
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 2.0])
    labels = torch.eye(4)[:2]
    with torch.no_grad():
        e1, e2 = net.eval()(x, sigma, labels), net(x, sigma, labels)
        t1, t2 = net.train()(x, sigma, labels), net(x, sigma, labels)
    assert torch.equal(e1, e2)
    assert not torch.equal(t1, t2)


def test_label_dropout_only_in_training():
    net = _tiny(label_dropout=1.0, dropout=0)
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 2.0])
    with torch.no_grad():
        train_labels = net.train()(x, sigma, torch.eye(4)[:2])
        train_zero = net(x, sigma, torch.zeros(2, 4))
        eval_labels = net.eval()(x, sigma, torch.eye(4)[:2])
    assert torch.equal(train_labels, train_zero)  # p=1 drops every label
    assert not torch.allclose(eval_labels, train_zero)


def test_reduced_precision_dtype_rules():
    """The U-Net body runs in the compute dtype, the embedding MLP in fp32, D comes back fp32 (spec §1.11)."""
    class LowPrecision(networks.EDMPrecond):
        def compute_dtype(self, x, force_fp32=False):
            return torch.float32 if force_fp32 else torch.bfloat16

    net = _tiny(LowPrecision, dropout=0).eval()
    seen = {}

    def note(key, dtype):
        seen.setdefault(key, dtype)  # hooks must return None, or they replace the output

    net.model.map_layer0.register_forward_hook(lambda m, a, o: note('emb', o.dtype))
    net.model.enc['8x8_block0'].register_forward_pre_hook(lambda m, a: note('block', a[0].dtype))
    net.model.enc['8x8_block0'].affine.register_forward_hook(lambda m, a, o: note('affine', o.dtype))
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 2.0])
    with torch.no_grad():
        low = net(x, sigma)
        full = net(x, sigma, force_fp32=True)
    assert low.dtype == torch.float32
    assert seen == {'emb': torch.float32, 'block': torch.bfloat16, 'affine': torch.float32}
    assert (low - full).abs().max() < 0.05 * full.abs().max()
    assert not torch.equal(low, full)


def test_use_fp16_is_ignored_off_cuda():
    net = _tiny(use_fp16=True).eval()
    assert net.compute_dtype(torch.zeros(1)) == torch.float32


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match='embedding_type'):
        networks.SongUNet(8, 3, 3, embedding_type='learned')
    with pytest.raises(ValueError, match='encoder_type'):
        networks.SongUNet(8, 3, 3, encoder_type='fancy')
    with pytest.raises(ValueError, match='model_type'):
        networks.EDMPrecond(8, 3, model_type='UNet2DModel')
    with pytest.raises(ValueError, match='up and down'):
        networks.Conv2d(3, 3, 3, up=True, down=True)
    with pytest.raises(ValueError, match='init mode'):
        networks.Linear(3, 3, init_mode='orthogonal')


def test_scalar_sigma_broadcasts_like_a_batch():
    net = _tiny(dropout=0).eval()
    x = torch.randn(3, 3, 8, 8)
    labels = torch.eye(4)[:3]
    with torch.no_grad():
        a = net(x, torch.tensor(1.3, dtype=torch.float64), labels)
        b = net(x, torch.full([3], 1.3), labels)
    assert torch.allclose(a, b, atol=1e-6)
