"""Scalar statistics collected across ranks, the source of stats.jsonl (NVlabs training_stats semantics).

`report(name, value)` accumulates count, sum and sum of squares (float64) of every element; `collect()`
all-reduces them across ranks and returns {name: {num, mean, std}} for the names that received data since
the last collect (a name with no new data keeps its previous value, as NVlabs).
"""

import collections

import numpy as np
import torch


class Collector:
    def __init__(self):
        self._moments = collections.OrderedDict()  # name -> float64 [count, sum, sum of squares]
        self._last = collections.OrderedDict()

    def report(self, name, value):
        """Accumulate every element of `value` (tensor, array or number) under `name`.

        A tensor's moments stay on its device until collect(): reporting the loss every round must not make
        the host wait for the GPU (NVlabs training_stats does not either)."""
        if isinstance(value, torch.Tensor):
            v = value.detach().flatten().to(torch.float64)
            moments = torch.stack([torch.full((), v.numel(), dtype=torch.float64, device=v.device), v.sum(),
                                   v.square().sum()])
        else:
            v = np.asarray(value, dtype=np.float64).ravel()
            moments = torch.tensor([v.size, v.sum(), np.square(v).sum()], dtype=torch.float64)
        old = self._moments.get(name)
        if old is None:
            self._moments[name] = moments
        elif old.device == moments.device:
            old += moments
        else:
            self._moments[name] = old.cpu() + moments.cpu()

    def report0(self, name, value, rank=0):
        """Report only on rank 0 (timing and memory figures)."""
        if rank == 0:
            self.report(name, value)

    def collect(self, device=None):
        """All-reduce the moments over ranks and return {name: dict(num, mean, std)}; resets the counters.

        Every rank must call this with the same set of names reported, in the same order (report the same
        names on every rank, or use report0 only for names that are rank-0-only everywhere).
        """
        names = list(self._moments)
        if torch.distributed.is_initialized():
            # Agree on the union of names first so ranks reporting different sets still line up.
            all_names = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(all_names, names)
            names = list(dict.fromkeys(n for ns in all_names for n in ns))
        stacked = torch.stack([self._moments[n].cpu() if n in self._moments else torch.zeros(3, dtype=torch.float64)
                               for n in names]) \
            if names else torch.zeros(0, 3, dtype=torch.float64)
        if torch.distributed.is_initialized() and names:
            backend = torch.distributed.get_backend()
            dev = device if (backend == 'nccl' and device is not None) else 'cpu'
            t = stacked.to(dev)
            torch.distributed.all_reduce(t)
            stacked = t.cpu()
        for name, (num, total, sq) in zip(names, stacked.tolist()):
            if num > 0:
                mean = total / num
                self._last[name] = dict(num=num, mean=mean, std=float(np.sqrt(max(sq / num - mean ** 2, 0))))
        self._moments.clear()
        return collections.OrderedDict((n, self._last[n]) for n in self._last)
