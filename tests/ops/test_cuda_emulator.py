"""The CPU CUDA emulator itself (csrc/common/emulator/): small kernels that check what it promises to model --
barriers, shuffles, shared-memory poisoning, clusters with distributed shared memory -- and that it reports the
bugs it is there to catch (a missing barrier, a cluster sibling read after it exited, out-of-bounds shared and
global accesses, a barrier after an exit, a deadlock, clusters on a GPU without them, too much shared memory)."""

import os
import subprocess

import numpy as np
import pytest
import torch

import cuda_emulator

_SELF_TEST_CU = r'''
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace cg = cooperative_groups;

// y[t] = x[(t + 32) % 128]: every warp reads another warp's slot.
__global__ void rotate_kernel(const float* x, float* y, int mode) {
  __shared__ float buf[128];
  buf[threadIdx.x] = x[threadIdx.x];
  if (mode != 1) __syncthreads();
  if (mode == 2 && threadIdx.x == 0) buf[128] = 0.f;  // one past the end
  y[threadIdx.x] = buf[(threadIdx.x + 32) % 128] + (mode == 3 ? x[128] : 0.f);
}

__global__ void warp_sum_kernel(const float* x, float* y) {
  float v = x[threadIdx.x];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  y[threadIdx.x] = v;
}

// Each block of a 4-block cluster adds up the ranks its siblings hold in shared memory.
__global__ void cluster_kernel(float* y, int final_sync) {
  __shared__ float mine[2];
  cg::cluster_group cluster = cg::this_cluster();
  if (threadIdx.x == 0) mine[1] = static_cast<float>(cluster.block_rank());
  cluster.sync();
  float s = 0.f;
  for (int r = 0; r < static_cast<int>(cluster.num_blocks()); ++r) s += cluster.map_shared_rank(mine, r)[1];
  if (final_sync) cluster.sync();
  y[blockIdx.x * blockDim.x + threadIdx.x] = s;
}

__global__ void bad_barrier_kernel(int mode) {
  if (mode == 0 && threadIdx.x == 0) return;  // then the others wait for it
  if (mode == 1) {
    if (threadIdx.x < 32) __syncthreads();
    else cg::this_cluster().sync();  // different barriers: nobody gets through
  }
  __syncthreads();
}

__global__ void big_smem_kernel(float* y) {
  __shared__ float big[13000];  // 52 KB > 48 KB of static shared memory
  big[threadIdx.x] = 1.f;
  y[threadIdx.x] = big[threadIdx.x];
}

__global__ void trap_kernel() { __trap(); }

// Float -> half and bfloat16 bits, for comparison with PyTorch's round-to-nearest-even conversions.
void convert(const char* in_path, const char* out_path) {
  FILE* in = std::fopen(in_path, "rb");
  std::vector<float> v(1 << 20);
  v.resize(std::fread(v.data(), 4, v.size(), in));
  std::fclose(in);
  std::vector<uint16_t> h(v.size()), b(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    h[i] = __half_as_ushort(__float2half_rn(v[i]));
    b[i] = __bfloat16_as_ushort(__float2bfloat16_rn(v[i]));
    const float back = __half2float(__ushort_as_half(h[i])), back_b = __bfloat162float(__ushort_as_bfloat16(b[i]));
    if (!(back == back) && v[i] == v[i]) std::abort();  // a number never becomes NaN
    if (back_b != back_b && v[i] == v[i]) std::abort();
  }
  FILE* out = std::fopen(out_path, "wb");
  std::fwrite(h.data(), 2, h.size(), out);
  std::fwrite(b.data(), 2, b.size(), out);
  std::fclose(out);
}

int main(int argc, char** argv) {
  const std::string test = argv[1];
  if (test == "convert") {
    convert(argv[2], argv[3]);
    return 0;
  }
  std::vector<float> x(129), y(512, -1.f);
  for (int i = 0; i < 129; ++i) x[i] = static_cast<float>(i);
  auto launch_cluster = [&](int final_sync) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(8);
    cfg.blockDim = dim3(64);
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = 4;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    cudaLaunchKernelEx(&cfg, cluster_kernel, y.data(), final_sync);
  };
  bool ok = true;
  if (test == "rotate" || test == "rotate-race" || test == "shared-oob" || test == "global-oob") {
    std::vector<float> xs(x.begin(), x.begin() + (test == "global-oob" ? 128 : 129));  // exactly sized
    const int mode = test == "rotate" ? 0 : test == "rotate-race" ? 1 : test == "shared-oob" ? 2 : 3;
    rotate_kernel<<<1, 128>>>(xs.data(), y.data(), mode);
    for (int t = 0; t < 128; ++t) ok = ok && y[t] == static_cast<float>((t + 32) % 128);
  } else if (test == "warp-sum") {
    warp_sum_kernel<<<1, 64>>>(x.data(), y.data());
    for (int t = 0; t < 64; ++t) ok = ok && y[t] == static_cast<float>(t < 32 ? 496 : 1520);
  } else if (test == "cluster" || test == "cluster-no-final-sync") {
    launch_cluster(test == "cluster");
    for (int t = 0; t < 512; ++t) ok = ok && y[t] == 6.f;  // 0 + 1 + 2 + 3
  } else if (test == "exit-then-barrier" || test == "deadlock") {
    bad_barrier_kernel<<<1, 64>>>(test == "deadlock");
  } else if (test == "smem-too-big") {
    big_smem_kernel<<<1, 32>>>(y.data());
  } else if (test == "trap") {
    trap_kernel<<<1, 32>>>();
  }
  std::printf("%s\n", ok ? "ok" : "wrong");
  return 0;
}
'''


@pytest.fixture(scope='module')
def self_test(tmp_path_factory):
    if cuda_emulator.compiler() is None:
        pytest.skip('no C++ compiler to build the kernel emulator')
    out = tmp_path_factory.mktemp('emulator_self_test')
    (out / 'self_test.cu').write_text(_SELF_TEST_CU)
    return cuda_emulator.build(str(out), 'self_test', [str(out / 'self_test.cu')])


def _run(exe, test, seed=0, cc_major=9, args=()):
    env = dict(os.environ, ASAN_OPTIONS='detect_leaks=0', EDM_EMU_SEED=str(seed), EDM_EMU_CC_MAJOR=str(cc_major))
    return subprocess.run([exe, test, *args], capture_output=True, text=True, env=env, timeout=120)


def test_16_bit_conversions_round_to_nearest_even(self_test, tmp_path):
    """__float2half_rn / __float2bfloat16_rn give PyTorch's bits (round to nearest, ties to even) for ties, values
    one ulp around them, subnormals, overflow, infinities and random floats; NaN gives the canonical 0x7FFF."""
    gen = torch.Generator().manual_seed(0)
    h = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16)
    ties = [h.view(torch.float16).float(), h.view(torch.bfloat16).float()]  # every 16-bit value, exactly
    for t in list(ties):
        mid = t[torch.isfinite(t)]
        ties += [torch.nextafter(mid, torch.full_like(mid, float('inf'))), (mid[:-1] + mid[1:]) / 2]
    x = torch.cat(ties + [torch.randn(1 << 16, generator=gen) * 10.0 ** torch.randint(-8, 8, (1 << 16,), generator=gen),
                          torch.tensor([65504.0, 65520.0, 65519.99, 1e30, -1e30, float('inf'), -float('inf'), 0.0, -0.0,
                                        2.0 ** -25, 2.0 ** -24 * 1.5, 3e38, float('nan')])])
    x = x[:1 << 20]
    (tmp_path / 'in.bin').write_bytes(x.numpy().tobytes())
    proc = _run(self_test, 'convert', args=[str(tmp_path / 'in.bin'), str(tmp_path / 'out.bin')])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = torch.from_numpy(np.frombuffer((tmp_path / 'out.bin').read_bytes(), dtype=np.int16).copy())
    half, bf16 = out[:len(x)], out[len(x):]
    num = ~torch.isnan(x)
    assert torch.equal(half[num], x[num].half().view(torch.int16))
    assert torch.equal(bf16[num], x[num].bfloat16().view(torch.int16))
    assert (half[~num] == 0x7FFF).all() and (bf16[~num] == 0x7FFF).all()


@pytest.mark.parametrize('test', ['rotate', 'warp-sum', 'cluster'])
def test_correct_kernels_run(self_test, test):
    for seed in (0, 1, 2):  # in order, CTAs/warps running ahead, uniformly random
        proc = _run(self_test, test, seed)
        assert proc.returncode == 0 and proc.stdout.strip() == 'ok', (seed, proc.stdout, proc.stderr[-3000:])


@pytest.mark.parametrize('test, seed, cc_major, expect', [
    ('rotate-race', 1, 9, 'wrong'),  # a missing __syncthreads: another warp's slot is still NaN
    ('cluster-no-final-sync', 1, 9, 'of the cluster has exited'),
    ('shared-oob', 0, 9, 'AddressSanitizer: heap-buffer-overflow'),
    ('global-oob', 0, 9, 'AddressSanitizer: '),
    ('exit-then-barrier', 0, 9, 'a participating thread exited'),
    ('deadlock', 0, 9, 'deadlock'),
    ('cluster', 0, 8, 'thread-block clusters need sm_90'),
    ('smem-too-big', 0, 9, 'exceeds 48 KB'),
    ('trap', 0, 9, '__trap()'),
])
def test_bugs_are_reported(self_test, test, seed, cc_major, expect):
    proc = _run(self_test, test, seed, cc_major)
    if expect == 'wrong':
        assert proc.returncode == 0 and proc.stdout.strip() == 'wrong', (proc.stdout, proc.stderr[-3000:])
    else:
        assert proc.returncode != 0 and expect in proc.stderr, (proc.returncode, proc.stderr[-3000:])
