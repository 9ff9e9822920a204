"""Bit-exactness across processes needs the same CPU thread count everywhere (reduction order depends on it)."""

import contextlib

import torch

# Subprocesses in the exactness tests run with OMP_NUM_THREADS=1; in-process runs they are compared with must too.
SUBPROCESS_THREADS = 1


@contextlib.contextmanager
def torch_threads(n=SUBPROCESS_THREADS):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
