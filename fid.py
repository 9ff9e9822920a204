"""Calculate FID as NVlabs fid.py does: `ref`, `calc`, and `gen` (sample and measure without writing images).

  python fid.py ref  --data=datasets/cifar10-32x32.zip --dest=fid-refs/cifar10-32x32.npz
  python fid.py calc --images=fid-tmp --ref=fid-refs/cifar10-32x32.npz [--num=50000] [--seed=0]
  python fid.py gen  --network=edm-cifar10-32x32-cond-vp.pkl --ref=fid-refs/cifar10-32x32.npz --seeds=0-49999
  torchrun --standalone --nproc_per_node=8 fid.py calc --images=fid-tmp --ref=fid-refs/cifar10-32x32.npz

All logic lives in edm_fast/fid.py (also runnable as `python -m edm_fast.fid`); the detector in
edm_fast/inception.py. Pass --detector=inception-2015-12-05.pkl (NVIDIA's) for FIDs comparable with published ones.
"""

from edm_fast.fid import main

if __name__ == '__main__':
    main()
