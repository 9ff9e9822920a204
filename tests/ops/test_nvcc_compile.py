"""Compile check of csrc/ on a machine without a GPU: every .cu through nvcc to an object file (PTX for
compute_90; ptxas is skipped to keep CI fast, the GPU build runs it),
every .cpp through the host compiler against the installed torch headers. Objects are thrown away."""

import functools
import glob
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CSRC = os.path.join(REPO, 'csrc')
CU = sorted(glob.glob(os.path.join(CSRC, '**', '*.cu'), recursive=True))
CPP = sorted(glob.glob(os.path.join(CSRC, '**', '*.cpp'), recursive=True))


@functools.lru_cache(maxsize=None)
def _includes():
    from torch.utils import cpp_extension
    dirs = cpp_extension.include_paths() + [sysconfig.get_paths()['include'], CSRC]
    return [f'-I{d}' for d in dirs]


def _run(cmd, source):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f'{os.path.relpath(source, REPO)} failed to compile:\n{proc.stdout}\n{proc.stderr}'


def _nvcc():
    return shutil.which('nvcc') or (os.path.join(os.environ['CUDA_HOME'], 'bin', 'nvcc') if 'CUDA_HOME' in os.environ else None)


@functools.lru_cache(maxsize=None)
def _cuda_include():
    """CUDA's include directory (for .cpp files that include c10/cuda headers), or None."""
    candidates = [os.path.join(os.environ[k], 'include') for k in ('CUDA_HOME', 'CUDA_PATH') if k in os.environ]
    nvcc = _nvcc()
    if nvcc:
        proc = subprocess.run([nvcc, '--dryrun', '-E', '-x', 'cu', os.devnull], capture_output=True, text=True)
        candidates += [tok[len('-I'):].strip('"') for line in proc.stderr.splitlines() for tok in line.split()
                       if tok.startswith('-I') and 'include' in tok]
    candidates += glob.glob('/usr/local/cuda*/include')
    return next((d for d in candidates if os.path.exists(os.path.join(d, 'cuda_runtime.h'))), None)


@pytest.mark.parametrize('source', [os.path.relpath(p, REPO) for p in CU] or ['<no .cu files>'])
def test_cu_compiles(source, tmp_path):
    if source == '<no .cu files>':
        pytest.skip('csrc/ holds no .cu files')
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip('nvcc not found: cannot compile-check CUDA sources on this machine')
    cmd = [nvcc, '-c', os.path.join(REPO, source), '-o', str(tmp_path / 'out.o'), '-std=c++20', '-O1',
           '-gencode=arch=compute_90,code=compute_90', '-Xcompiler', '-fPIC', '-diag-suppress', '3189',
           '--expt-relaxed-constexpr', '-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE', '-U__CUDA_NO_HALF_OPERATORS__',
           '-U__CUDA_NO_HALF_CONVERSIONS__', '-U__CUDA_NO_BFLOAT16_CONVERSIONS__', '-U__CUDA_NO_HALF2_OPERATORS__',
           '-Werror', 'all-warnings'] + _includes()
    _run(cmd, source)


@pytest.mark.parametrize('source', [os.path.relpath(p, REPO) for p in CPP] or ['<no .cpp files>'])
def test_cpp_compiles(source):
    if source == '<no .cpp files>':
        pytest.skip('csrc/ holds no .cpp files')
    cxx = os.environ.get('CXX') or shutil.which('g++') or shutil.which('c++')
    if cxx is None:
        pytest.skip('no C++ compiler found')
    cmd = [cxx, '-fsyntax-only', '-std=c++20', '-Wall', '-Werror', '-Wno-unused-function',
           '-DTORCH_EXTENSION_NAME=_C', '-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE', os.path.join(REPO, source)] + _includes()
    if _cuda_include():
        cmd.append(f'-I{_cuda_include()}')
    _run(cmd, source)


def test_python_headers_match_interpreter():
    assert os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')), sys.version


def test_source_names_are_unique():
    """setup.py's build names each object after its source's stem: x.cu and x.cpp would collide (ninja refuses)."""
    stems = {}
    for path in CU + CPP:
        stem = os.path.splitext(os.path.relpath(path, CSRC))[0]
        assert stem not in stems, f'{os.path.relpath(path, REPO)} and {os.path.relpath(stems[stem], REPO)} build the same object'
        stems[stem] = path
