"""The timing harness: what time_fn measures on CPU and, on a GPU, that kernel=True leaves the host out."""

import time

import pytest
import torch

from bench import harness


def test_cpu_times_the_call_and_reports_host_time():
    def fn():
        time.sleep(0.002)

    t = harness.time_fn(fn, warmup=2, repeats=5, device='cpu', kernel=True)  # kernel= is a no-op on CPU
    assert t['timing'] == 'perf_counter' and t['repeats'] == 5
    assert 2.0 <= t['p20_ms'] <= t['median_ms'] <= t['p80_ms'] < 200
    assert t['host_ms'] >= 2.0


def test_min_time_keeps_repeating():
    t = harness.time_fn(lambda: time.sleep(0.001), warmup=0, repeats=1, device='cpu', min_time_s=0.02)
    assert t['repeats'] >= 10


def test_pad_covers_the_host_time():
    for host in (0.0, 0.05, 1.0, 30.0):
        assert harness.pad_ms(host) >= 2 * host
    assert harness.pad_ms(1e6) == harness.MAX_PAD_MS


@pytest.mark.gpu
def test_kernel_timing_excludes_host_overhead():
    """A call that spends 3 ms on the host before a ~10 us kernel: per-call events see the 3 ms, kernel=True
    sees the kernel only (the regime of every small op in the kernel benchmarks)."""
    x = torch.randn(1 << 20, device='cuda')

    def fn():
        time.sleep(0.003)
        x.mul_(1.0)

    per_call = harness.time_fn(fn, warmup=3, repeats=10, device='cuda')
    gpu_only = harness.time_fn(fn, warmup=3, repeats=10, device='cuda', kernel=True)
    assert per_call['median_ms'] > 2.5, per_call
    assert gpu_only['host_ms'] > 2.5, gpu_only
    assert gpu_only['median_ms'] < 0.5, gpu_only
    assert gpu_only['timing'] == 'gpu-only, cold L2'


@pytest.mark.gpu
def test_kernel_timing_of_a_long_kernel_is_its_length():
    """The spin before the start event is not counted: a known spin inside fn is measured as itself."""
    cycles = int(harness._spin_cycles_per_ms() * 2.0)  # 2 ms

    t = harness.time_fn(lambda: torch.cuda._sleep(cycles), warmup=3, repeats=10, device='cuda', kernel=True)
    assert 1.8 < t['median_ms'] < 2.3, t
