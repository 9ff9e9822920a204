"""EDM2 networks through generate_images and sample.py: the EDM2 sampler, guidance, seeds, errors."""

import os

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

from edm_fast import generate, sampling, sampling_edm2
from edm_fast.checkpoint import save_snapshot
from edm_fast.encoders import StandardRGBEncoder
from test_edm2_networks import tiny_net

import sample  # noqa: E402  (repo root is on sys.path when pytest runs from it)


def _net(label_dim=5, seed=0):
    return tiny_net(label_dim=label_dim, seed=seed, img_channels=3).eval().requires_grad_(False)


def test_generate_uses_edm2_sampler_with_nvlabs_seed_semantics():
    net = _net()
    seeds = [4, 8, 15]
    got = next(generate.generate_images(net, seeds, num_steps=4)).images
    rnd = sampling.StackedRandomGenerator('cpu', seeds)
    noise = rnd.randn([3, 3, net.img_resolution, net.img_resolution])
    labels = torch.eye(5)[rnd.randint(5, size=[3])]
    x = sampling_edm2.edm2_sampler(net, noise, labels, num_steps=4, randn_like=rnd.randn_like)
    assert torch.equal(got, StandardRGBEncoder().decode(x))
    assert generate.nfe_per_image(net, num_steps=4) == 7 and generate.nfe_per_image(net, 2.0, num_steps=4) == 14


def test_guidance_with_gnet_equal_to_net_is_unguided():
    net = _net()
    plain = next(generate.generate_images(net, [0, 1], num_steps=4)).images
    guided = next(generate.generate_images(net, [0, 1], num_steps=4, gnet=net, guidance=1.7)).images
    weaker = next(generate.generate_images(net, [0, 1], num_steps=4, gnet=_net(seed=3), guidance=1.7)).images
    assert torch.equal(plain, guided) and not torch.equal(plain, weaker)


def test_edm2_option_errors():
    net = _net()
    with pytest.raises(ValueError, match='ablation'):
        next(generate.generate_images(net, [0], solver='euler'))
    with pytest.raises(ValueError, match='gnet'):
        next(generate.generate_images(net, [0], num_steps=4, guidance=2.0))
    from test_generate import tiny_net as edm_net
    with pytest.raises(ValueError, match='EDM2'):
        next(generate.generate_images(edm_net(), [0], gnet=edm_net(), guidance=2.0))


def test_guidance_flag_errors_before_sampling(tmp_path):
    """--guidance without --gnet, or a --gnet of another resolution or class count: a flag error, no traceback."""
    path = str(tmp_path / 'net.safetensors')
    save_snapshot(path, ema=_net(), encoder=StandardRGBEncoder())
    others = {'other-classes': _net(label_dim=3),
              'other-res': tiny_net(label_dim=5, img_channels=3, img_resolution=8, attn_resolutions=[4])}
    for name, gnet in others.items():
        save_snapshot(str(tmp_path / f'{name}.safetensors'), ema=gnet.eval(), encoder=StandardRGBEncoder())
    cases = [([], 'needs a guiding network'), (['--gnet', str(tmp_path / 'other-classes.safetensors')], '3 classes'),
             (['--gnet', str(tmp_path / 'other-res.safetensors')], 'must match')]
    for extra, words in cases:
        r = CliRunner().invoke(sample.main, ['--network', path, '--device', 'cpu', '--outdir', str(tmp_path / 'o'),
                                             '--guidance', '2', *extra])
        assert r.exit_code == 2 and words in r.output and 'Traceback' not in r.output, r.output
        assert not os.path.exists(tmp_path / 'o' / '000000.png')


def test_sample_cli_with_guidance(tmp_path):
    path, weak = str(tmp_path / 'net.safetensors'), str(tmp_path / 'weak.safetensors')
    save_snapshot(path, ema=_net(), encoder=StandardRGBEncoder())
    save_snapshot(weak, ema=_net(seed=3), encoder=StandardRGBEncoder())
    run = lambda *a: CliRunner().invoke(sample.main, ['--network', path, '--device', 'cpu', '--steps', '3', *a],
                                        catch_exceptions=False)
    r = run('--outdir', str(tmp_path / 'a'), '--seeds', '0-2', '--gnet', weak, '--guidance', '2', '--class', '1')
    assert r.exit_code == 0, r.output
    assert '10 NFE per image' in r.output  # (2*3 - 1) * 2 networks
    assert sorted(f for f in os.listdir(tmp_path / 'a') if f.endswith('.png')) == ['000000.png', '000001.png', '000002.png']
    assert np.asarray(PIL.Image.open(tmp_path / 'a' / '000001.png')).shape == (16, 16, 3)
    r = run('--outdir', str(tmp_path / 'b'), '--disc', 'vp')
    assert r.exit_code != 0 and 'ablation' in r.output
    r = run('--outdir', str(tmp_path / 'c'), '--gnet', str(tmp_path / 'missing.pkl'), '--guidance', '2')
    assert r.exit_code != 0 and '--gnet' in r.output


def test_generate_images_preset_runs_net_and_gnet_from_the_models_folder(tmp_path):
    """generate_images.py --preset finds the preset's two .pkl files in --models and samples seeds 16-19 with its
    guidance, exactly as sample.py given the same network, gnet and guidance."""
    import generate_images
    from edm_fast import pretrained
    net_name, gnet_name, guidance = pretrained.EDM2_PRESETS['edm2-img64-s-autog-fid']
    models = tmp_path / 'models'
    models.mkdir()
    net, gnet = str(models / pretrained.edm2_file(net_name)), str(models / pretrained.edm2_file(gnet_name))
    save_snapshot(net, ema=_net(), encoder=StandardRGBEncoder())  # our format under the NVlabs name: the loader
    save_snapshot(gnet, ema=_net(seed=3), encoder=StandardRGBEncoder())  # goes by content, not by extension
    common = ['--device', 'cpu', '--steps', '3']
    r = CliRunner().invoke(generate_images.main, ['--preset', 'edm2-img64-s-autog-fid', '--models', str(models),
                                                  '--outdir', str(tmp_path / 'a'), *common], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(sample.main, ['--network', net, '--gnet', gnet, '--guidance', str(guidance), '--seeds',
                                         '16-19', '--outdir', str(tmp_path / 'b'), *common], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    names = [f'{s:06d}.png' for s in range(16, 20)]
    assert sorted(f for f in os.listdir(tmp_path / 'a') if f.endswith('.png')) == names
    for name in names:
        assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / 'a' / name)),
                              np.asarray(PIL.Image.open(tmp_path / 'b' / name))), name

    r = CliRunner().invoke(generate_images.main, ['--preset', 'edm2-img512-xs-fid', '--models', str(models), *common])
    assert r.exit_code == 2 and pretrained.EDM2_ROOT + '/edm2-img512-xs-2147483-0.135.pkl' in r.output, r.output
    r = CliRunner().invoke(generate_images.main, ['--outdir', str(tmp_path / 'c'), *common])
    assert r.exit_code == 2 and '--preset or --net' in r.output, r.output
