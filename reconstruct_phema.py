"""Post-hoc EMA reconstruction for EDM2 runs: the flags of NVlabs reconstruct_phema.py.

  python reconstruct_phema.py --indir=training-runs/00000-img512-xs --outdir=out --outstd=0.100,0.135
  python reconstruct_phema.py --indir=raw-snapshots/edm2-img512-xs --outdir=out --outstd=0.135 --outkimg=2147483
  python reconstruct_phema.py --indir=raw-snapshots/edm2-img512-xs --outdir=out --outstd=0.010,0.015,...,0.250 --skip

Inputs are the `network-snapshot-{kimg}-{std}` files of one run: edm_fast .safetensors snapshots or official
EDM2 .pkl files (read without running code from them). Outputs are edm_fast snapshots
`{outprefix}-{kimg:07d}-{std:.3f}.safetensors` in fp16 (parameters and buffers, as NVlabs), usable with sample.py / load_network.
"""

import os

import click

from edm_fast import phema
from edm_fast.checkpoint import CheckpointError

_FLAGS = {'in_dir': '--indir', 'in_snapshots': '--indir', 'out_std': '--outstd', 'out_kimg': '--outkimg',
          'max_batch_size': '--batch', 'in_std': '--instd', 'out_dir': '--outdir'}


def parse_std_list(ctx, param, value):
    """Click callback: '0.05,0.1' or '0.010,0.015,...,0.250' -> sorted list of EMA lengths in (0, 0.289);
    None stays None (see edm_fast.phema.parse_std_list)."""
    if value is None:
        return None
    try:
        return phema.parse_std_list(value)
    except ValueError as e:
        raise click.BadParameter(f'{value!r}: {e}') from None


@click.command(context_settings=dict(show_default=True))
@click.option('--indir', 'in_dir', help='Directory containing the input snapshots', metavar='DIR', type=str, required=True)
@click.option('--inprefix', 'in_prefix', help='Filter inputs based on filename prefix', metavar='STR', type=str, default=None)
@click.option('--instd', 'in_std', help='Filter inputs based on EMA length (same syntax as --outstd)', metavar='LIST',
              callback=parse_std_list, default=None)
@click.option('--outdir', 'out_dir', help='Where to save the reconstructed snapshots', metavar='DIR', type=str,
              required=True)
@click.option('--outprefix', 'out_prefix', help='Output filename prefix', metavar='STR', type=str, default='phema')
@click.option('--outstd', 'out_std', help='List of desired relative standard deviations, each in (0, 0.289); '
              '"a,b,...,c" continues the step b-a up to c', metavar='LIST', callback=parse_std_list, required=True)
@click.option('--outkimg', 'out_kimg', help='Training time of the snapshot to reconstruct  [default: newest input]',
              metavar='KIMG', type=click.IntRange(min=1), default=None)
@click.option('--skip', 'skip_existing', help='Skip output files that already exist', is_flag=True)
@click.option('--batch', 'max_batch_size', help='Maximum simultaneous reconstructions', metavar='INT',
              type=click.IntRange(min=1), default=8)
def main(in_dir, in_prefix, in_std, out_dir, out_prefix, out_std, out_kimg, skip_existing, max_batch_size):
    """Reconstruct power-function EMA profiles of any length from the snapshots of an EDM2 training run.

    \b
    Examples:
      # One EMA length at the end of a run
      python reconstruct_phema.py --indir=training-runs/00000-img512-xs --outdir=out --outstd=0.150
      # 49 lengths 0.010, 0.015, ..., 0.250, 8 per pass over the inputs; rerun with --skip to resume
      python reconstruct_phema.py --indir=raw-snapshots/edm2-img512-xs --outdir=out \\
          --outstd=0.010,0.015,...,0.250 --batch=8 --skip
    """
    if os.environ.get('WORLD_SIZE', '1') != '1':
        raise click.ClickException('reconstruct_phema.py runs in one process: start it with python, not torchrun')
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise click.BadParameter(f'cannot create {out_dir!r}: {e.strerror}', param_hint="'--outdir'") from None
    try:
        phema.reconstruct_phema(in_dir, out_std, out_kimg=out_kimg, out_dir=out_dir, out_prefix=out_prefix,
                                max_batch_size=max_batch_size, in_prefix=in_prefix, in_std=in_std,
                                skip_existing=skip_existing)
    except phema.PhemaError as e:
        flag = _FLAGS.get(e.param)
        if flag is None:
            raise click.ClickException(str(e)) from None
        raise click.BadParameter(str(e), param_hint=f"'{flag}'") from None
    except CheckpointError as e:
        raise click.ClickException(f'{e} (check --indir)') from None
    except OSError as e:
        raise click.ClickException(str(e)) from None


if __name__ == '__main__':
    main()
