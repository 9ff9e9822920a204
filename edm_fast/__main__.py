"""`python -m edm_fast`: report the installation (versions, CUDA extension, backends per op)."""

import platform

import torch

from . import __version__, _ext, ops


def main():
    print(f'edm_fast {__version__} on Python {platform.python_version()}, torch {torch.__version__}'
          f' (CUDA {torch.version.cuda or "none"}), GPU: '
          f'{torch.cuda.get_device_name() if torch.cuda.is_available() else "none"}')
    try:
        import triton
        print(f'triton {triton.__version__}')
    except ImportError:
        print('triton: not installed')
    if _ext.available():
        print('CUDA extension edm_fast._C: loaded')
    else:
        print(f'CUDA extension edm_fast._C: not available, {_ext.reason()}')
    for op in ('group_norm', 'attention', 'attention_weights', 'resample'):
        print(f'  ops.{op}: backends {", ".join(ops.implementations(op))}')


if __name__ == '__main__':
    main()
