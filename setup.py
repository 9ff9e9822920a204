"""Build script: pure-Python install everywhere; the CUDA extension edm_fast._C where it can be built.

The extension is compiled from every .cu/.cpp file under csrc/ when torch is a CUDA build and nvcc is
found. Otherwise the package installs without it (reference + Triton backends) and says why.
Set EDM_FAST_NO_CUDA=1 to skip the extension, TORCH_CUDA_ARCH_LIST to choose GPU architectures.
"""

import glob
import json
import os
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _say(message):
    print(f'edm_fast setup: {message}', file=sys.stderr, flush=True)


def cuda_extension():
    """Return ([extensions], cmdclass, reason-if-skipped)."""
    sources = sorted(glob.glob(os.path.join('csrc', '**', '*.cu'), recursive=True)
                     + glob.glob(os.path.join('csrc', '**', '*.cpp'), recursive=True))
    if not sources:
        return [], {}, 'csrc/ holds no CUDA/C++ sources'
    if os.environ.get('EDM_FAST_NO_CUDA', '') not in ('', '0'):
        return [], {}, 'EDM_FAST_NO_CUDA is set'
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return [], {}, 'torch is not importable (install torch first, then pip install -e . --no-build-isolation)'
    if torch.version.cuda is None:
        return [], {}, f'torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)'
    nvcc = os.path.join(cpp_extension.CUDA_HOME, 'bin', 'nvcc') if cpp_extension.CUDA_HOME else shutil.which('nvcc')
    if not nvcc or not os.path.exists(nvcc):
        return [], {}, 'nvcc was not found (set CUDA_HOME or put nvcc on PATH)'
    os.environ.setdefault('TORCH_CUDA_ARCH_LIST', '8.0;9.0')
    ext = cpp_extension.CUDAExtension(
        name='edm_fast._C',
        sources=sources,
        include_dirs=[os.path.join(HERE, 'csrc')],
        extra_compile_args={'cxx': ['-O3'],
                            'nvcc': ['-O3', '-lineinfo', '--expt-relaxed-constexpr']},
    )
    _say(f'building edm_fast._C from {len(sources)} sources for TORCH_CUDA_ARCH_LIST='
         f'{os.environ["TORCH_CUDA_ARCH_LIST"]} with {nvcc}')
    return [ext], {'build_ext': cpp_extension.BuildExtension}, None


ext_modules, cmdclass, reason = cuda_extension()
if reason:
    _say(f'not building the CUDA extension edm_fast._C: {reason}. '
         f'edm_fast will use its PyTorch reference and Triton backends.')
# Remembered for `python -m edm_fast`, which reports it (pip hides build output unless run with -v).
with open(os.path.join(HERE, 'edm_fast', '_build_info.json'), 'w') as f:
    json.dump({'cuda_extension': not reason, 'reason': reason}, f)

setup(ext_modules=ext_modules, cmdclass=cmdclass, package_data={'edm_fast': ['_build_info.json', 'assets/*.safetensors']})
