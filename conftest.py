"""Test configuration for tests/ and bench/: thread limits, the Triton interpreter on CPU, slow/gpu markers."""

import os

# Must happen before any @triton.jit kernel is defined: without a GPU, Triton kernels run through the
# interpreter on CPU tensors.
if 'TRITON_INTERPRET' not in os.environ:
    try:
        import torch as _torch
        _has_gpu = _torch.cuda.is_available()
    except ImportError:
        _has_gpu = False
    if not _has_gpu:
        os.environ['TRITON_INTERPRET'] = '1'

import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# Test helpers (refvec, nvlabs_pickle_writer, ...) live in tests/; make them importable from tests/ops and bench/.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'tests'))

# Oversubscribing the 2-core CI machine is catastrophic: keep torch's threads within the cores.
torch.set_num_threads(max(1, min(int(os.environ.get('OMP_NUM_THREADS', '2')), os.cpu_count() or 1)))


def pytest_addoption(parser):
    parser.addoption('--runslow', action='store_true', default=False,
                     help='also run tests marked slow (full-size networks, long runs)')


def pytest_collection_modifyitems(config, items):
    has_gpu = torch.cuda.is_available()
    for item in items:
        if 'slow' in item.keywords and not config.getoption('--runslow'):
            item.add_marker(pytest.mark.skip(reason='slow test: run with --runslow'))
        if 'gpu' in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason='needs a CUDA GPU; none is available here'))
