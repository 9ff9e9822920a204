"""edm_fast: a fast, faithful implementation of EDM and EDM2 (Karras et al. 2022, 2024).

The reference backend reproduces the official NVlabs numbers; fused CUDA/Triton kernels and
compiled channels-last networks make it fast. `import edm_fast` works with or without the CUDA
extension `edm_fast._C`.
"""

__version__ = '0.1.0'

from . import _ext, ops  # noqa: E402,F401


def extension_available():
    """True when the compiled CUDA extension edm_fast._C loaded."""
    return _ext.available()
