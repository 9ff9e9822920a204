"""Builds and runs kernel sources of csrc/ on the CPU CUDA emulator (csrc/common/emulator/), for tests on machines
without a GPU (tests/ops/test_group_norm_emulated.py, test_heun.py, test_cuda_emulator.py).

g++ cannot parse two pieces of CUDA syntax, so the sources are copied to a scratch tree with exactly these
rewritten, one line in, one line out (a `#line` directive keeps diagnostics and sanitizer reports pointing at
the real files):
  kernel<<<grid, block, smem, stream>>>(args)  ->  emu::launch_kernel(kernel, grid, block, smem, stream)(args)
  __shared__ T name[dims];                    ->  auto& name = emu::shared_var<T[dims]>(__FILE__, __LINE__);
(emu = ::edm_fast::emu).
Everything else compiles unchanged against the stand-in headers in csrc/common/emulator/include/. Builds use
AddressSanitizer, -ffp-contract=off (the GPU contracts only where the source lets it; the exact kernels use _rn
intrinsics) and -rdynamic (launch records name the kernel instantiation).
"""

import os
import re
import shutil
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(REPO, 'csrc')

_LAUNCH = re.compile(r'([A-Za-z_][\w:]*(?:<[^<>;(){}]*>)?)[ \t]*<<<(.*?)>>>', re.S)
_SHARED = re.compile(r'\b__shared__\s+([^;{}()]*?)\s*\b(\w+)\s*((?:\[[^\]]*\])*)\s*;')


def rewrite(text, path):
    """CUDA source -> the C++ the emulator compiles (see the module docstring). Fails on anything it cannot
    rewrite rather than letting g++ misread it."""
    out, launches = _LAUNCH.subn(lambda m: f'::edm_fast::emu::launch_kernel({m[1]}, {m[2]})', text)
    out, shared = _SHARED.subn(
        lambda m: f'auto& {m[2]} = ::edm_fast::emu::shared_var<{m[1]}{m[3]}>(__FILE__, __LINE__);', out)
    if launches != text.count('<<<') or shared != len(re.findall(r'\b__shared__\b', text)):
        raise ValueError(f'{path}: a kernel launch or __shared__ declaration the emulator rewrite does not handle')
    if 'extern __shared__' in text:
        raise ValueError(f'{path}: extern __shared__ is not emulated (use emu::cta_smem())')
    assert out.count('\n') == text.count('\n')
    return f'#line 1 "{path}"\n{out}'


def mirror_sources(dst, dirs, patches=()):
    """The folders `dirs` of csrc/ copied to dst with every .cu/.cuh rewritten; returns dst. patches: (path
    relative to csrc/, old, new) text replacements applied first (for tests that the emulator catches bugs)."""
    for root, _, files in (w for d in dirs for w in os.walk(os.path.join(CSRC, d))):
        rel = os.path.relpath(root, CSRC)
        os.makedirs(os.path.join(dst, rel), exist_ok=True)
        for name in files:
            src, out = os.path.join(root, name), os.path.join(dst, rel, name)
            if name.endswith(('.cu', '.cuh')):
                with open(src) as f:
                    text = f.read()
                for path, old, new in patches:
                    if os.path.join(rel, name) == path:
                        assert text.count(old) == 1, (path, old)
                        text = text.replace(old, new)
                text = rewrite(text, src)
                with open(out, 'w') as f:
                    f.write(text)
            else:
                shutil.copyfile(src, out)
    return dst


def compiler():
    return os.environ.get('CXX') or shutil.which('g++')


def build(out_dir, exe_name, sources, defines=(), opt='-O1', patches=()):
    """Compile `sources` (paths relative to csrc/, or absolute paths of sources elsewhere) from a rewritten mirror
    of their folders (and common/) in out_dir, one object per source, two at a time (CI has two cores), and link
    them. Returns the executable."""
    cxx, sources = compiler(), list(sources)
    dirs = sorted({'common', *(src.split('/')[0] for src in sources if not os.path.isabs(src))})
    tree = mirror_sources(os.path.join(out_dir, 'csrc'), dirs, patches)
    for i, src in enumerate(sources):
        if os.path.isabs(src):
            with open(src) as f:
                text = rewrite(f.read(), src)
            sources[i] = os.path.join(out_dir, 'rewritten_' + os.path.basename(src))
            with open(sources[i], 'w') as f:
                f.write(text)
    flags = ['-std=c++20', opt, '-g1', '-fsanitize=address', '-fno-omit-frame-pointer', '-ffp-contract=off',
             '-Wno-unknown-pragmas', '-DEDM_CUDA_EMULATE=1', *[f'-D{d}' for d in defines],
             f'-I{os.path.join(tree, "common", "emulator", "include")}', f'-I{tree}']
    objects, pending, errors = [], [], []
    for src in sources:
        obj = os.path.join(out_dir, os.path.basename(src) + '.o')
        objects.append(obj)
        pending.append(subprocess.Popen([cxx, *flags, '-x', 'c++', '-c', os.path.join(tree, src), '-o', obj],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        while len(pending) >= 2 or (pending and src == sources[-1]):
            proc = pending.pop(0)
            output = proc.communicate(timeout=900)[0]
            if proc.returncode:
                errors.append(output[-6000:])
    if errors:
        raise RuntimeError('emulator build failed:\n' + '\n'.join(errors))
    exe = os.path.join(out_dir, exe_name)
    link = subprocess.run([cxx, '-fsanitize=address', '-rdynamic', *objects, '-o', exe],
                          capture_output=True, text=True, timeout=300)
    if link.returncode:
        raise RuntimeError(f'emulator link failed:\n{link.stderr[-6000:]}')
    return exe


def run(exe, in_path, out_path, env=None, args=(), timeout=300):
    """Run an emulator driver; returns its stdout. Sanitizer reports and emulator errors fail with stderr."""
    full_env = dict(os.environ, ASAN_OPTIONS='detect_leaks=0:abort_on_error=0', **(env or {}))
    proc = subprocess.run([exe, str(in_path), str(out_path), *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f'emulated kernel failed (rc {proc.returncode}):\n{proc.stderr[-8000:]}')
    return proc.stdout
