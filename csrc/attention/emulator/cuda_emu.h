// CPU emulation of the CUDA features used by the attention kernels, so that the unmodified kernel source in
// csrc/attention/*.cu runs on a machine without a GPU (compiled by g++ with -DEDM_ATTN_EMULATE; see
// attention_emulator.cc and tests/ops/test_attention.py). Not part of any real build: setup.py, CMake and the
// nvcc compile check only pick up .cu/.cpp files, and every include of this header is behind EDM_ATTN_EMULATE.
//
// Model: each CTA of a launch runs as blockDim.x std::threads sharing one exactly-sized shared-memory
// allocation (filled with 0xFF, i.e. NaN, so reading unwritten shared memory shows up in the results);
// __syncthreads is a std::barrier over the CTA; warp-collective operations (shuffles, ldmatrix, mma.sync)
// exchange their operands through a per-warp buffer between two 32-thread barriers and then evaluate the PTX
// semantics (fragment layouts from the PTX ISA, as documented in attention_common.cuh):
//   ldmatrix.x4: lanes 8i..8i+7 give the row addresses of matrix i; plain: lane l gets row l/4, elements
//                2(l%4), 2(l%4)+1; .trans: rows 2(l%4), 2(l%4)+1 of element l/4. Addresses must be 16-byte
//                aligned rows inside the CTA's shared memory (checked).
//   mma.m16n8k16: A/B/C rebuilt from all 32 lanes' registers, D = A B + C with exact products (fp64 sum).
// CTAs run one after another; global-memory races between CTAs are therefore not modelled.
#pragma once
#ifndef EDM_ATTN_EMULATE
#error "cuda_emu.h is only for the CPU emulation build (-DEDM_ATTN_EMULATE)"
#endif

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <sstream>
#include <stdexcept>
#include <thread>
#include <vector>

// ---- language keywords ----------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) { return uint4{x, y, z, w}; }
struct dim3 {
  unsigned int x = 0, y = 0, z = 0;
};

// ---- 16-bit float types (bit-exact round-to-nearest-even conversions) ----------------------------------
struct __half {
  uint16_t x;
};
struct __nv_bfloat16 {
  uint16_t x;
};
struct __half2 {
  __half lo, hi;  // lo at the lower address = bits 0-15 of the 32-bit register, as on the GPU
};
struct __nv_bfloat162 {
  __nv_bfloat16 lo, hi;
};
inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.x, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float v) {
  const _Float16 f = static_cast<_Float16>(v);
  __half h;
  std::memcpy(&h.x, &f, 2);
  return h;
}
inline __half __ushort_as_half(uint16_t u) { return __half{u}; }
inline uint16_t __half_as_ushort(__half h) { return h.x; }
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__float2half_rn(a), __float2half_rn(b)}; }
inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t u = static_cast<uint32_t>(h.x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if (std::isnan(v)) return __nv_bfloat16{static_cast<uint16_t>((u >> 16) | 0x40)};
  u += 0x7FFFu + ((u >> 16) & 1u);
  return __nv_bfloat16{static_cast<uint16_t>(u >> 16)};
}
inline __nv_bfloat16 __ushort_as_bfloat16(uint16_t u) { return __nv_bfloat16{u}; }
inline uint16_t __bfloat16_as_ushort(__nv_bfloat16 h) { return h.x; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return __nv_bfloat162{__float2bfloat16_rn(a), __float2bfloat16_rn(b)};
}

// ---- runtime API bits the launchers touch -----------------------------------------------------------------
using cudaStream_t = void*;
using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
inline cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute, int bytes) {
  // sm_90 allows up to 227 KB of dynamic shared memory per block (232448 bytes).
  if (bytes > 232448) {
    std::fprintf(stderr, "emulator: kernel asks for %d bytes of shared memory (> 227 KB)\n", bytes);
    std::abort();
  }
  return cudaSuccess;
}
#define C10_CUDA_CHECK(expr) (void)(expr)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)

namespace edm_fast {
namespace attn {
namespace emu {
template <typename... A>
[[noreturn]] inline void check_fail(const char* file, int line, const char* cond, const A&... args) {
  std::ostringstream os;
  os << file << ":" << line << ": check failed: " << cond << ": ";
  (os << ... << args);
  throw std::runtime_error(os.str());
}
}  // namespace emu
}  // namespace attn
}  // namespace edm_fast
#define TORCH_CHECK(cond, ...)                                                                         \
  do {                                                                                                 \
    if (!(cond)) ::edm_fast::attn::emu::check_fail(__FILE__, __LINE__, #cond __VA_OPT__(, ) __VA_ARGS__); \
  } while (0)

namespace c10 {
using DeviceIndex = int8_t;
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(DeviceIndex) {}
};
struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(DeviceIndex = -1) { return CUDAStream{}; }
}  // namespace cuda
}  // namespace c10

// ---- threads, CTAs, warps ----------------------------------------------------------------------------------
namespace edm_fast {
namespace attn {
namespace emu {

[[noreturn]] inline void fatal(const char* what) {
  std::fprintf(stderr, "emulator: %s\n", what);
  std::fflush(stderr);
  std::abort();
}

struct Warp {
  std::barrier<> bar{32};
  const uint16_t* ptr[32];
  float f[32];
  uint32_t a[32][4], b[32][2];
  void sync() { bar.arrive_and_wait(); }
};

struct Cta {
  explicit Cta(unsigned threads, size_t smem_bytes) : bar(threads), smem_size(smem_bytes) {
    smem.reset(new (std::align_val_t(16)) unsigned char[smem_bytes > 0 ? smem_bytes : 1]);
    std::memset(smem.get(), 0xFF, smem_bytes);
    for (unsigned w = 0; w < (threads + 31) / 32; ++w) warps.emplace_back(new Warp());
  }
  struct AlignedDelete {
    void operator()(unsigned char* p) const { ::operator delete[](p, std::align_val_t(16)); }
  };
  std::barrier<> bar;
  std::unique_ptr<unsigned char[], AlignedDelete> smem;
  size_t smem_size;
  std::vector<std::unique_ptr<Warp>> warps;
};

inline thread_local dim3 t_thread_idx, t_block_idx, t_block_dim;
inline thread_local Cta* t_cta = nullptr;

inline int lane_id() { return static_cast<int>(t_thread_idx.x % 32); }
inline Warp& this_warp() { return *t_cta->warps[t_thread_idx.x / 32]; }
inline unsigned char* cta_smem() { return t_cta->smem.get(); }

template <typename Params>
void launch(void (*kernel)(Params), unsigned blocks, unsigned threads, size_t smem_bytes, const Params& params) {
  if (threads % 32 != 0) fatal("block size must be a multiple of 32");
  for (unsigned b = 0; b < blocks; ++b) {
    Cta cta(threads, smem_bytes);
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        t_thread_idx = dim3{t, 0, 0};
        t_block_idx = dim3{b, 0, 0};
        t_block_dim = dim3{threads, 1, 1};
        t_cta = &cta;
        kernel(params);
      });
    }
    for (auto& th : pool) th.join();
  }
}

inline void check_aligned16(const void* p, const char* file, int line) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) {
    std::fprintf(stderr, "emulator: %s:%d: 16-byte access at misaligned address %p\n", file, line, p);
    std::abort();
  }
}

inline float exp2_approx(float x) { return std::exp2(x); }

inline void check_smem_row(const uint16_t* p) {
  const unsigned char* base = cta_smem();
  const unsigned char* q = reinterpret_cast<const unsigned char*>(p);
  if (q < base || q + 16 > base + t_cta->smem_size) fatal("ldmatrix row address outside the CTA's shared memory");
  if ((q - base) % 16 != 0) fatal("ldmatrix row address not 16-byte aligned");
}

inline void ldmatrix_x4(uint32_t (&r)[4], const uint16_t* p, bool trans) {
  Warp& w = this_warp();
  const int l = lane_id();
  check_smem_row(p);
  w.ptr[l] = p;
  w.sync();
  for (int i = 0; i < 4; ++i) {
    uint32_t lo, hi;
    if (!trans) {
      const uint16_t* row = w.ptr[8 * i + l / 4];
      lo = row[2 * (l % 4)];
      hi = row[2 * (l % 4) + 1];
    } else {
      lo = w.ptr[8 * i + 2 * (l % 4)][l / 4];
      hi = w.ptr[8 * i + 2 * (l % 4) + 1][l / 4];
    }
    r[i] = lo | (hi << 16);
  }
  w.sync();
}

inline float half_bits_to_float(uint32_t bits, bool bf16) {
  return bf16 ? __bfloat162float(__nv_bfloat16{static_cast<uint16_t>(bits)})
              : __half2float(__half{static_cast<uint16_t>(bits)});
}

inline void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16) {
  Warp& w = this_warp();
  const int l = lane_id();
  for (int i = 0; i < 4; ++i) w.a[l][i] = a[i];
  w.b[l][0] = b0;
  w.b[l][1] = b1;
  w.sync();
  float A[16][16], B[16][8];
  for (int s = 0; s < 32; ++s) {
    const int g = s / 4, q = s % 4;
    auto lo = [&](uint32_t v) { return half_bits_to_float(v & 0xFFFFu, bf16); };
    auto hi = [&](uint32_t v) { return half_bits_to_float(v >> 16, bf16); };
    A[g][2 * q] = lo(w.a[s][0]);
    A[g][2 * q + 1] = hi(w.a[s][0]);
    A[g + 8][2 * q] = lo(w.a[s][1]);
    A[g + 8][2 * q + 1] = hi(w.a[s][1]);
    A[g][2 * q + 8] = lo(w.a[s][2]);
    A[g][2 * q + 9] = hi(w.a[s][2]);
    A[g + 8][2 * q + 8] = lo(w.a[s][3]);
    A[g + 8][2 * q + 9] = hi(w.a[s][3]);
    B[2 * q][g] = lo(w.b[s][0]);
    B[2 * q + 1][g] = hi(w.b[s][0]);
    B[2 * q + 8][g] = lo(w.b[s][1]);
    B[2 * q + 9][g] = hi(w.b[s][1]);
  }
  w.sync();
  const int g = l / 4, q = l % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e >> 1), col = 2 * q + (e & 1);
    double acc = c[e];
    for (int k = 0; k < 16; ++k) acc += static_cast<double>(A[row][k]) * B[k][col];
    c[e] = static_cast<float>(acc);
  }
}

inline std::mutex& atomic_mutex() {
  static std::mutex m;
  return m;
}

}  // namespace emu
}  // namespace attn
}  // namespace edm_fast

#define threadIdx ::edm_fast::attn::emu::t_thread_idx
#define blockIdx ::edm_fast::attn::emu::t_block_idx
#define blockDim ::edm_fast::attn::emu::t_block_dim

inline void __syncthreads() { ::edm_fast::attn::emu::t_cta->bar.arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
  if (mask != 0xffffffffu) ::edm_fast::attn::emu::fatal("only full-warp shuffles are emulated");
  auto& w = ::edm_fast::attn::emu::this_warp();
  const int l = ::edm_fast::attn::emu::lane_id();
  w.f[l] = v;
  w.sync();
  const float r = w.f[l ^ lane_mask];
  w.sync();
  return r;
}

inline float atomicAdd(float* p, float v) {
  std::lock_guard<std::mutex> lock(::edm_fast::attn::emu::atomic_mutex());
  const float old = *p;
  *p = old + v;
  return old;
}
