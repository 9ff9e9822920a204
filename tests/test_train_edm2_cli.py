"""EDM2 end to end through the CLIs at tiny size: train.py --preset, reconstruct_phema.py, sample.py (guided)."""

import glob
import json
import os
import subprocess
import sys

import pytest

from test_training import ENV, REPO, make_dataset


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp('data'))


def cli(script, *args, timeout=600):
    return subprocess.run([sys.executable, os.path.join(REPO, script), *args], env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def test_edm2_dry_run_and_option_errors(data, tmp_path):
    r = cli('train.py', '--preset=edm2-img64-s', f'--outdir={tmp_path / "run"}', f'--data={data}', '--dry-run')
    assert r.returncode == 0, r.stderr[-2000:]
    assert '"ref_lr": 0.01' in r.stdout and '"ref_batches": 35000' in r.stdout and '"P_mean": -0.8' in r.stdout
    assert '"model_channels": 192' in r.stdout and '"total_nimg": 1073741824' in r.stdout
    assert not (tmp_path / 'run').exists()
    r = cli('train.py', '--preset=edm2-img64-s', f'--outdir={tmp_path}', f'--data={data}', '--arch=adm', '--dry-run')
    assert r.returncode != 0 and '--arch' in r.stderr
    r = cli('train.py', '--preset=edm9', f'--outdir={tmp_path}', f'--data={data}', '--dry-run')
    assert r.returncode != 0 and '--preset' in r.stderr
    r = cli('train.py', f'--outdir={tmp_path}', f'--data={data}', '--decay=5', '--dry-run')
    assert r.returncode != 0 and '--decay' in r.stderr and '--preset' in r.stderr


def test_edm2_train_reconstruct_and_sample(data, tmp_path):
    run = tmp_path / 'run'
    r = cli('train.py', '--preset=edm2-img32-xs', f'--outdir={run}', f'--data={data}', '--channels=64', '--batch=32',
            '--duration=2Ki', '--status=256', '--snapshot=1Ki', '--checkpoint=1Ki', '--fp16=0', '--workers=0',
            '--device=cpu')
    assert r.returncode == 0, r.stderr[-3000:]
    snaps = sorted(os.path.basename(p) for p in glob.glob(str(run / 'network-snapshot-*.safetensors')))
    assert 'network-snapshot-0000002-0.050.safetensors' in snaps and 'network-snapshot-0000002-0.100.safetensors' in snaps
    stats = [json.loads(line) for line in open(run / 'stats.jsonl')]
    assert stats and all(isinstance(v, float) for v in stats[-1].values())

    out = tmp_path / 'phema'
    r = cli('reconstruct_phema.py', f'--indir={run}', f'--outdir={out}', '--outstd=0.07,0.12')
    assert r.returncode == 0, r.stderr[-3000:]
    made = sorted(os.listdir(out))
    assert made == ['phema-0000002-0.070.safetensors', 'phema-0000002-0.120.safetensors']

    imgs = tmp_path / 'img'
    r = cli('sample.py', f'--network={out / made[0]}', f'--gnet={run / "network-snapshot-0000001-0.050.safetensors"}',
            '--guidance=1.5', f'--outdir={imgs}', '--seeds=0-3', '--steps=4', '--device=cpu')
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(f for f in os.listdir(imgs) if not f.startswith('.')) == [f'{s:06d}.png' for s in range(4)] and '14 NFE per image' in r.stdout
    r = cli('reconstruct_phema.py', f'--indir={run}', f'--outdir={out}', '--outstd=0.5')
    assert r.returncode != 0 and '--outstd' in r.stderr


def _as_nvlabs_state(ours, path):
    """Rewrite an edm_fast EDM2 state as NVlabs edm2's CheckpointIO writes it: a dict of state_dicts, its `state`
    a dnnlib.util.EasyDict(cur_nimg, total_elapsed_time), the loss_fn as its attribute dict."""
    import torch
    import nvlabs_pickle_writer as writer
    st = torch.load(ours, map_location='cpu', weights_only=True)
    easydict = writer.make_easydict_type()
    data = dict(state=easydict(cur_nimg=st['cur_nimg'], total_elapsed_time=st['total_elapsed_time']), net=st['net'],
                loss_fn=dict(P_mean=-0.8, P_std=1.6, sigma_data=0.5), optimizer=st['optimizer'], ema=st['ema'])
    with writer._fake_modules(**{'dnnlib.util.EasyDict': easydict}):
        torch.save(data, path)


def test_edm2_resumes_an_nvlabs_training_state(data, tmp_path):
    """A run directory holding NVlabs edm2's training-state-*.pt continues from it (read without running code),
    exactly as from our own state at the same point."""
    import shutil
    import torch
    args = ['--preset=edm2-img32-xs', f'--data={data}', '--channels=64', '--batch=16', '--status=256',
            '--snapshot=0', '--checkpoint=1Ki', '--fp16=0', '--workers=0', '--device=cpu']
    ours, theirs = tmp_path / 'ours', tmp_path / 'theirs'
    r = cli('train.py', *args, f'--outdir={ours}', '--duration=1Ki')
    assert r.returncode == 0, r.stderr[-3000:]
    shutil.copytree(ours, theirs)
    _as_nvlabs_state(ours / 'training-state-0000001.pt', theirs / 'training-state-0000001.pt')
    with pytest.raises(Exception):  # the file really is NVlabs' layout: weights_only refuses its EasyDict
        torch.load(theirs / 'training-state-0000001.pt', weights_only=True)
    for run in (ours, theirs):
        r = cli('train.py', *args, f'--outdir={run}', '--duration=2Ki')
        assert r.returncode == 0, r.stderr[-3000:]
        assert 'Resuming from' in r.stdout
    a = torch.load(ours / 'training-state-0000002.pt', weights_only=True)
    b = torch.load(theirs / 'training-state-0000002.pt', weights_only=True)
    assert a['cur_nimg'] == b['cur_nimg'] == 2048
    for name, t in a['net'].items():
        assert torch.equal(t, b['net'][name]), name
    assert all(torch.equal(t, b['ema']['emas'][0][n]) for n, t in a['ema']['emas'][0].items())
