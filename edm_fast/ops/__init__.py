"""The only kernel API the rest of edm_fast calls. Each op dispatches to a backend (see dispatch)."""

import torch.nn.functional as _F

from .attention import attention, attention_weights
from .dispatch import backend_counts, implementations, record_backends
from .group_norm import group_norm
from .heun import heun_correct, heun_euler
from .mp_attention import mp_attention
from .reference import conv2d, linear, mp_normalize
from .resample import resample

silu = _F.silu

__all__ = ['attention', 'attention_weights', 'backend_counts', 'conv2d', 'group_norm', 'heun_correct', 'heun_euler', 'implementations',
           'linear', 'mp_attention', 'mp_normalize', 'record_backends', 'resample', 'silu']
