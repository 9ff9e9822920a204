"""Triton kernels, one file per op, no dispatch logic (registered by the matching edm_fast.ops module)."""
