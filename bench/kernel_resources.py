"""Offline resource report for the Triton kernels on an H100 (sm_90), without a GPU.

    python -m bench.kernel_resources [--case NAME ...] [--json]

Runs the real host wrappers (edm_fast/ops/triton/*.py) at the benchmark shapes, but every Triton launch is
turned into a compile-only warm-up for an sm_90 target (a stub driver stands in for CUDA; CPU tensors are
allocated and never touched). For each kernel it compiles, it reports what decides bandwidth before any
timing: registers per thread and spills (Triton's own ptxas -v), shared memory, programs resident per SM
(from the H100 register file, warp and shared-memory limits), bytes each program moves, and the width of
every global load and store in the PTX (a channels-last kernel that issues 2-byte loads cannot reach copy
bandwidth however it is tuned). tests/ops/test_kernel_resources.py asserts on this report.
"""

import argparse
import collections
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

# H100 SXM (sm_90) per-SM limits.
SM90 = dict(regs=65536, max_warps=64, max_blocks=32, smem=228 * 1024, smem_per_block_reserved=1024, sms=132)


class _StubDriver:
    """Enough of Triton's active driver for JITFunction to compile (never to launch) for sm_90."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget('cuda', 90, 32)

    def get_active_torch_device(self):
        return torch.device('cpu')


@contextlib.contextmanager
def compile_only():
    """Within the block, every Triton kernel launch compiles for sm_90 and is recorded instead of run.

    Yields the list of (kernel name, grid, CompiledKernel) in launch order.
    """
    if os.environ.get('TRITON_INTERPRET') == '1':
        raise RuntimeError('kernel_resources needs the Triton compiler: unset TRITON_INTERPRET')
    from triton.runtime import jit
    from triton.runtime.driver import driver
    launches = []
    original = jit.JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        kernel = original(self, *args, grid=grid, warmup=True, **kwargs)
        launches.append((self.__name__, grid, kernel))
        return kernel

    previous = driver._active  # None until first used; on a CPU machine no real driver can be created
    driver.set_active(_StubDriver())
    jit.JITFunction.run = run
    try:
        yield launches
    finally:
        jit.JITFunction.run = original
        driver._active = previous


def _ptxas(ptx, arch='sm_90a'):
    """(registers, spill store bytes, spill load bytes) from ptxas -v."""
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = get_ptxas(90).path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, 'k.ptx')
        with open(src, 'w') as f:
            f.write(ptx)
        out = subprocess.run([ptxas, '-v', f'--gpu-name={arch}', src, '-o', os.path.join(tmp, 'k.cubin')],
                             capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r'Used (\d+) registers', out).group(1))
    spill = re.search(r'(\d+) bytes spill stores, (\d+) bytes spill loads', out)
    return regs, *(map(int, spill.groups()) if spill else (0, 0))


_ACCESS = re.compile(r'\b(ld|st)\.global((?:\.[\w:]+)+)')


def access_widths(ptx):
    """{'ld': {bytes: count}, 'st': {bytes: count}} over the global loads and stores in the PTX text
    (qualifiers such as .L1::evict_last or .nc are skipped; .vN multiplies the element type's width)."""
    widths = {'ld': collections.Counter(), 'st': collections.Counter()}
    for op, qualifiers in _ACCESS.findall(ptx):
        parts = qualifiers.split('.')[1:]
        vec = next((int(q[1:]) for q in parts if re.fullmatch(r'v\d', q)), 1)
        bits = int(re.fullmatch(r'[bfus](\d+)', parts[-1]).group(1))
        widths[op][vec * bits // 8] += 1
    return {k: dict(sorted(v.items())) for k, v in widths.items()}


def occupancy(regs, num_warps, smem, limits=SM90):
    """Programs resident per SM (registers are allocated per warp in units of 256)."""
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = limits['regs'] // (per_warp * num_warps)
    by_warps = limits['max_warps'] // num_warps
    by_smem = limits['smem'] // (smem + limits['smem_per_block_reserved'])
    return max(0, min(by_regs, by_warps, limits['max_blocks'], by_smem))


def report(launches, bytes_moved):
    """One row per launch; bytes_moved: {kernel name: activation bytes it reads and writes} for the kernels that
    stream activations (the others, small reductions over per-channel sums, get None)."""
    rows = []
    for name, grid, k in launches:
        regs, spill_st, spill_ld = _ptxas(k.asm['ptx'])
        warps = k.metadata.num_warps
        programs = 1
        for g in grid:
            programs *= g
        resident = occupancy(regs, warps, k.metadata.shared)
        rows.append(dict(kernel=name, grid=list(grid), programs=programs, num_warps=warps, regs=regs,
                         spill_bytes=spill_st + spill_ld, shared=k.metadata.shared, programs_per_sm=resident,
                         waves=round(programs / max(1, resident * SM90['sms']), 2),
                         bytes_per_program=round(bytes_moved[name] / programs) if name in bytes_moved else None,
                         access=access_widths(k.asm['ptx'])))
    return rows


# ---- cases: the benchmark shapes, through the real host wrappers ----------------------------------------------


def _gn_case(shape, groups, variant, fmt, dtype=torch.float16, mode='fwd', min_programs=2 * SM90['sms']):
    def run():
        from edm_fast.ops.triton import group_norm as k
        N, C, H, W = shape
        x = torch.empty(shape, dtype=dtype).contiguous(memory_format=fmt)
        w, b = torch.empty(C), torch.empty(C)
        add = torch.empty(N, C, 1, 1, dtype=dtype) if variant == 'add' else None
        ss = (torch.empty(N, C, 1, 1, dtype=dtype),) * 2 if variant == 'adm' else (None, None)
        with _patched(k, '_min_programs', lambda x: min_programs):
            if mode == 'fwd':
                k.forward(x, w, b, add, *ss, groups, 1e-5, True)
            else:
                mean = rstd = torch.empty(N, groups)
                k.backward(torch.empty_like(x), x, w, b, add, *ss, mean, rstd, groups, True, add is not None)
        size = x.numel() * x.element_size()
        return {'_gn_fwd_kernel': 2 * size, '_gn_fwd_stats_kernel': size, '_gn_fwd_apply_kernel': 2 * size,
                '_gn_bwd_kernel': 3 * size, '_gn_bwd_sums_kernel': 2 * size, '_gn_bwd_apply_kernel': 3 * size}
    return run


def _resample_case(shape, taps, up, fmt, dtype=torch.float16):
    def run():
        from edm_fast.ops.triton import resample as k
        x = torch.empty(shape, dtype=dtype).contiguous(memory_format=fmt)
        f = torch.ones(1, 1, taps, taps) / taps ** 2
        H = shape[2]
        if up:
            y = k.fir_up(x, f, 0 if taps == 2 else 1, 4.0, 2 * H, 2 * H)
        else:
            y = k.fir_down(x, f, 0 if taps == 2 else 1, 1.0, H // 2, H // 2)
        size = (x.numel() + y.numel()) * x.element_size()
        return {'_up_nhwc_kernel': size, '_up_nchw_kernel': size, '_down_nhwc_kernel': size,
                '_down_nchw_kernel': size}
    return run


@contextlib.contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


CL, NCHW = torch.channels_last, torch.contiguous_format
CASES = {
    'gn-ddpmpp-32-add-cl-fwd': _gn_case((512, 256, 32, 32), 32, 'add', CL),
    'gn-ddpmpp-32-add-nchw-fwd': _gn_case((512, 256, 32, 32), 32, 'add', NCHW),
    'gn-ddpmpp-8-add-cl-fwd': _gn_case((512, 256, 8, 8), 32, 'add', CL),
    'gn-adm-64-adm-cl-fwd': _gn_case((64, 192, 64, 64), 32, 'adm', CL),
    'gn-adm-8-adm-cl-fwd': _gn_case((64, 768, 8, 8), 32, 'adm', CL),
    'gn-ddpmpp-32-add-cl-bwd': _gn_case((512, 256, 32, 32), 32, 'add', CL, mode='bwd'),
    'gn-adm-64-adm-cl-bwd': _gn_case((64, 192, 64, 64), 32, 'adm', CL, mode='bwd'),
    'resample-down-11-cl': _resample_case((512, 256, 32, 32), 2, False, CL),
    'resample-up-11-cl': _resample_case((512, 256, 16, 16), 2, True, CL),
    'resample-down-1331-cl': _resample_case((512, 256, 32, 32), 4, False, CL),
    'resample-up-1331-cl': _resample_case((512, 256, 16, 16), 4, True, CL),
    'resample-down-11-nchw': _resample_case((512, 128, 32, 32), 2, False, NCHW, torch.float32),
    'resample-up-1331-nchw': _resample_case((512, 128, 16, 16), 4, True, NCHW, torch.float32),
}


def run_case(name):
    with compile_only() as launches:
        moved = CASES[name]()
    rows = report(launches, moved)
    for r in rows:
        r['case'] = name
    return rows


def _fmt_access(a):
    return ' '.join(f'{op}:' + ','.join(f'{w}Bx{n}' for w, n in v.items()) for op, v in a.items())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--case', action='append', choices=sorted(CASES), help='default: all')
    parser.add_argument('--json', action='store_true', help='print JSON lines instead of a table')
    args = parser.parse_args(argv)
    for name in args.case or CASES:
        for r in run_case(name):
            if args.json:
                print(json.dumps(r))
                continue
            print(f"{name:28s} {r['kernel']:24s} warps {r['num_warps']:2d} regs {r['regs']:3d} "
                  f"spill {r['spill_bytes']:4d} smem {r['shared']:6d} prog/SM {r['programs_per_sm']:2d} "
                  f"waves {r['waves']:7.2f} B/prog {r['bytes_per_program'] or '-'!s:>7} {_fmt_access(r['access'])}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
