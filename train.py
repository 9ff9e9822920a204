"""Train an EDM or EDM2 diffusion model: every option of NVlabs train.py (and train_edm2.py with --preset).

  torchrun --standalone --nproc_per_node=8 train.py --outdir=training-runs --data=datasets/cifar10-32x32.zip \
      --cond=1 --arch=ddpmpp
  torchrun --standalone --nproc_per_node=8 train.py --preset=edm2-img64-s --outdir=training-runs/edm2-img64-s \
      --data=datasets/img64.zip --batch-gpu=32

The command line, its checks and the config it builds live in edm_fast/train_cli.py; the training loops in
edm_fast/training_loop.py (EDM) and edm_fast/training_loop_edm2.py (EDM2).
"""

from edm_fast.train_cli import main

if __name__ == '__main__':
    main()
