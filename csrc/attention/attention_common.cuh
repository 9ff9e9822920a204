// Device helpers shared by the attention kernels: element conversions, global->shared tile loaders that read
// the interleaved qkv layout directly (NCHW or channels-last), and thin wrappers over ldmatrix / mma.sync.
//
// Shared-memory tiles are token-major: tile[row][channel] with `row` = token - t0 and a row pitch LDS (elements)
// chosen by each kernel. Every loader writes every element of rows [0, ROWS) x channels [0, D_PAD): tokens
// >= T and channels >= d are written as zeros, so the matrix products may run over the padded sizes.
//
// EDM_ATTN_EMULATE (never set in real builds) swaps the CUDA headers and the few inline-PTX wrappers for the
// CPU emulation in csrc/attention/emulator/, which runs this exact kernel source as threads on a CPU so the
// indexing can be checked on machines without a GPU (tests/ops/test_attention.py).
#pragma once
#ifdef EDM_ATTN_EMULATE
#include "attention/emulator/cuda_emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#endif
#include <cstdint>
#include <cstring>

#include "attention/attention_params.h"

#ifdef EDM_ATTN_EMULATE
#define EDM_ATTN_LAUNCH(kernel, blocks, threads, smem, stream, params) \
  ::edm_fast::attn::emu::launch(kernel, blocks, threads, smem, params)
#define EDM_ATTN_CHECK_ALIGNED16(ptr) ::edm_fast::attn::emu::check_aligned16(ptr, __FILE__, __LINE__)
#else
#define EDM_ATTN_LAUNCH(kernel, blocks, threads, smem, stream, params) \
  kernel<<<blocks, threads, smem, stream>>>(params)
#define EDM_ATTN_CHECK_ALIGNED16(ptr) ((void)0)
#endif

namespace edm_fast {
namespace attn {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---- element conversions --------------------------------------------------------------------------------
// Kernels move 16-bit values as raw bits (uint16_t) and convert only where they compute, so no code here
// depends on the __half operator/conversion macros torch's build flags switch off.
template <typename scalar_t> struct Elem;
template <> struct Elem<float> {
  using bits = float;
  static __device__ __forceinline__ float to_f(float v) { return v; }
  static __device__ __forceinline__ float from_f(float v) { return v; }
};
template <> struct Elem<__half> {
  using bits = uint16_t;
  static __device__ __forceinline__ float to_f(uint16_t v) { return __half2float(__ushort_as_half(v)); }
  static __device__ __forceinline__ uint16_t from_f(float v) { return __half_as_ushort(__float2half_rn(v)); }
  // Two floats -> one .f16x2 register: `lo` in bits 0-15 (the lower column index), `hi` in bits 16-31.
  static __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &h, sizeof(u));
    return u;
  }
};
template <> struct Elem<__nv_bfloat16> {
  using bits = uint16_t;
  static __device__ __forceinline__ float to_f(uint16_t v) { return __bfloat162float(__ushort_as_bfloat16(v)); }
  static __device__ __forceinline__ uint16_t from_f(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
  static __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &h, sizeof(u));
    return u;
  }
};

// 2^x with the hardware approximation (relative error ~2^-22); 2^-inf = +0, which the masking relies on.
__device__ __forceinline__ float fast_exp2(float x) {
#ifdef EDM_ATTN_EMULATE
  return emu::exp2_approx(x);
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#endif
}

// atomicAdd of two adjacent fp32 values (p 8-byte aligned). sm_90 has a vector atomicAdd for float2, which halves
// the atomic operations of the backward's dq accumulation; older GPUs add the two values one by one.
__device__ __forceinline__ void atomic_add_pair(float* p, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(p), make_float2(a, b));
#else
  atomicAdd(p, a);
  atomicAdd(p + 1, b);
#endif
}

// The kernel's dynamic shared memory (size given at launch).
__device__ __forceinline__ unsigned char* dynamic_smem() {
#ifdef EDM_ATTN_EMULATE
  return emu::cta_smem();
#else
  extern __shared__ __align__(16) unsigned char edm_attn_dynamic_smem[];
  return edm_attn_dynamic_smem;
#endif
}

// ---- tile loaders ---------------------------------------------------------------------------------------
// One (n, head) slice of a [N, channels, T] tensor: element (channel c, component j, token t) is at
// ptr[c * c_stride + j * j_stride + t * t_stride]. For qkv: ptr -> channel h*3d of batch n, c_stride = 3*sc,
// j_stride = sc. For out-layout tensors (NCOMP = 1): ptr -> channel h*d, c_stride = sc, j unused.
template <typename bits_t>
struct HeadSrc {
  const bits_t* ptr;
  int64_t c_stride, j_stride, t_stride;
};

// Any strides, one element per access. Consecutive threads take consecutive tokens when tokens are contiguous
// in memory (NCHW; coalesced global reads) and consecutive channels otherwise (channels-last).
template <typename bits_t, int NCOMP, int ROWS, int D_PAD, int LDS, int NTHREADS>
__device__ __forceinline__ void load_tile_generic(const HeadSrc<bits_t>& src, int t0, int T, int d,
                                                  bits_t* const (&dst)[3]) {
  const bool token_fastest = src.t_stride == 1;
  for (int idx = threadIdx.x; idx < ROWS * D_PAD; idx += NTHREADS) {
    int r, c;
    if (token_fastest) {
      r = idx % ROWS;
      c = idx / ROWS;
    } else {
      c = idx % D_PAD;
      r = idx / D_PAD;
    }
    const int t = t0 + r;
    const bool valid = t < T && c < d;
#pragma unroll
    for (int j = 0; j < NCOMP; ++j) {
      if (dst[j] == nullptr) continue;
      bits_t v = bits_t(0);
      if (valid) v = src.ptr[c * src.c_stride + j * src.j_stride + static_cast<int64_t>(t) * src.t_stride];
      dst[j][r * LDS + c] = v;
    }
  }
}

// NCHW: tokens contiguous (t_stride == 1), T % 8 == 0 and every 8-token run 16-byte aligned (checked on the
// host). A thread moves 8 tokens of one channel with one 16-byte load and writes them down one column of the
// tile; consecutive threads take consecutive channels, so each 2-byte shared store of a warp hits one row.
template <int NCOMP, int ROWS, int D_PAD, int LDS, int NTHREADS>
__device__ __forceinline__ void load_tile_token_vec(const HeadSrc<uint16_t>& src, int t0, int T, int d,
                                                    uint16_t* const (&dst)[3]) {
  static_assert(ROWS % 8 == 0, "tiles hold whole 8-token runs");
  constexpr int RUNS = ROWS / 8;
  for (int idx = threadIdx.x; idx < RUNS * D_PAD; idx += NTHREADS) {
    const int c = idx % D_PAD;
    const int run = idx / D_PAD;
    const int t = t0 + run * 8;
    const bool valid = t < T && c < d;  // T % 8 == 0: a run is entirely inside or entirely outside
#pragma unroll
    for (int j = 0; j < NCOMP; ++j) {
      if (dst[j] == nullptr) continue;
      union {
        uint4 v;
        uint16_t e[8];
      } u;
      u.v = make_uint4(0u, 0u, 0u, 0u);
      if (valid) {
        const uint16_t* p = src.ptr + c * src.c_stride + j * src.j_stride + t;
        EDM_ATTN_CHECK_ALIGNED16(p);
        u.v = *reinterpret_cast<const uint4*>(p);
      }
#pragma unroll
      for (int i = 0; i < 8; ++i) dst[j][(run * 8 + i) * LDS + c] = u.e[i];
    }
  }
}

// Channels-last: the NCOMP components of a head's channels are one contiguous run per token (qkv: q0 k0 v0 q1
// k1 v1 ..., NCOMP = 3; out-layout: NCOMP = 1), d % 8 == 0 and 16-byte aligned (checked on the host). A thread
// moves 8 channels of all components of one token: NCOMP 16-byte loads, de-interleaved in registers, one
// 16-byte shared store per wanted component.
template <int NCOMP, int ROWS, int D_PAD, int LDS, int NTHREADS>
__device__ __forceinline__ void load_tile_chan_vec(const HeadSrc<uint16_t>& src, int t0, int T, int d,
                                                   uint16_t* const (&dst)[3]) {
  static_assert(D_PAD % 8 == 0 && LDS % 8 == 0, "16-byte shared stores need 8-element aligned rows");
  constexpr int GROUPS = D_PAD / 8;  // 8-channel groups per row
  for (int idx = threadIdx.x; idx < ROWS * GROUPS; idx += NTHREADS) {
    const int grp = idx % GROUPS;
    const int r = idx / GROUPS;
    const int t = t0 + r;
    const int c = grp * 8;
    const bool valid = t < T && c < d;  // d % 8 == 0: a group is entirely inside or entirely outside
    union {
      uint4 v[NCOMP];
      uint16_t e[8 * NCOMP];  // e[NCOMP * i + j] = component j of channel c + i
    } in;
#pragma unroll
    for (int k = 0; k < NCOMP; ++k) in.v[k] = make_uint4(0u, 0u, 0u, 0u);
    if (valid) {
      const uint16_t* p = src.ptr + static_cast<int64_t>(t) * src.t_stride + c * NCOMP;
      EDM_ATTN_CHECK_ALIGNED16(p);
#pragma unroll
      for (int k = 0; k < NCOMP; ++k) in.v[k] = reinterpret_cast<const uint4*>(p)[k];
    }
#pragma unroll
    for (int j = 0; j < NCOMP; ++j) {
      if (dst[j] == nullptr) continue;
      union {
        uint4 v;
        uint16_t e[8];
      } o;
#pragma unroll
      for (int i = 0; i < 8; ++i) o.e[i] = in.e[NCOMP * i + j];
      EDM_ATTN_CHECK_ALIGNED16(dst[j] + r * LDS + c);
      *reinterpret_cast<uint4*>(dst[j] + r * LDS + c) = o.v;
    }
  }
}

// Fills tile rows for tokens [t0, t0 + ROWS) of the wanted components (null destinations are skipped).
template <typename bits_t, int NCOMP, int ROWS, int D_PAD, int LDS, int NTHREADS>
__device__ __forceinline__ void load_tile(const HeadSrc<bits_t>& src, int mode, int t0, int T, int d, bits_t* dst0,
                                          bits_t* dst1, bits_t* dst2) {
  bits_t* const dst[3] = {dst0, dst1, dst2};
  if constexpr (sizeof(bits_t) == 2) {
    if (mode == kLoadTokenVec) {
      load_tile_token_vec<NCOMP, ROWS, D_PAD, LDS, NTHREADS>(src, t0, T, d, dst);
      return;
    }
    if (mode == kLoadChanVec) {
      load_tile_chan_vec<NCOMP, ROWS, D_PAD, LDS, NTHREADS>(src, t0, T, d, dst);
      return;
    }
  }
  load_tile_generic<bits_t, NCOMP, ROWS, D_PAD, LDS, NTHREADS>(src, t0, T, d, dst);
}

// ---- tensor-core wrappers (sm_80+) ----------------------------------------------------------------------
// Fragment layouts of mma.m16n8k16 (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"),
// with g = lane / 4 and q = lane % 4:
//   A (16x16, row-major) 4 regs: a[0] = A[g][2q..2q+1], a[1] = A[g+8][2q..], a[2] = A[g][2q+8..], a[3] = A[g+8][2q+8..]
//   B (16x8, k x n)      2 regs: b[0] = B[2q..2q+1][g],  b[1] = B[2q+8..2q+9][g]
//   C (16x8, fp32)       4 regs: c[0..1] = C[g][2q..2q+1], c[2..3] = C[g+8][2q..2q+1]
// ldmatrix.x4 loads four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i and register i
// receives it. Plain: lane gets M[lane/4][2(lane%4)..+1]. With .trans: lane gets M[2(lane%4)..+1][lane/4].
#ifdef EDM_ATTN_EMULATE
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const uint16_t* p) { emu::ldmatrix_x4(r, p, false); }
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const uint16_t* p) { emu::ldmatrix_x4(r, p, true); }
#else
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const uint16_t* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p))
               : "memory");
}

__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const uint16_t* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p))
               : "memory");
}
#endif

// Lane addresses for the three ways the kernels feed ldmatrix.x4 (tile pitch `ld` elements, lane = lane id):
// A operand (16 rows m0.. x 16 cols k0..) from a tile stored [m][k]: plain ldmatrix, regs = a[0..3].
__device__ __forceinline__ const uint16_t* a_rowmajor_addr(const uint16_t* tile, int ld, int m0, int k0, int lane) {
  return tile + (m0 + (lane & 15)) * ld + k0 + (lane >> 4) * 8;
}
// A operand (m0.. x k0..) from a tile stored [k][m] (transposed): .trans ldmatrix, regs = a[0..3].
__device__ __forceinline__ const uint16_t* a_colmajor_addr(const uint16_t* tile, int ld, int m0, int k0, int lane) {
  return tile + (k0 + (lane & 7) + (lane >> 4) * 8) * ld + m0 + ((lane >> 3) & 1) * 8;
}
// B operands of two adjacent n-tiles (n0.. and n0+8.., k0..k0+15) from a tile stored [n][k]: plain ldmatrix,
// regs {r0, r1} = b of n-tile n0 and {r2, r3} = b of n-tile n0 + 8.
__device__ __forceinline__ const uint16_t* b_nk_addr(const uint16_t* tile, int ld, int n0, int k0, int lane) {
  return tile + (n0 + (lane & 7) + (lane >> 4) * 8) * ld + k0 + ((lane >> 3) & 1) * 8;
}
// B operands of two adjacent n-tiles from a tile stored [k][n]: .trans ldmatrix, same register order.
__device__ __forceinline__ const uint16_t* b_kn_addr(const uint16_t* tile, int ld, int n0, int k0, int lane) {
  return tile + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + n0 + (lane >> 4) * 8;
}

template <typename scalar_t> struct Mma;
template <> struct Mma<__half> {
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef EDM_ATTN_EMULATE
    emu::mma_m16n8k16(c, a, b0, b1, /*bf16=*/false);
#else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
  }
};
template <> struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef EDM_ATTN_EMULATE
    emu::mma_m16n8k16(c, a, b0, b1, /*bf16=*/true);
#else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
  }
};

// Accumulators of two adjacent n-tiles (16 x 16 block, fp32) -> the A operand of the next product in 16-bit:
// the C layout of n-tiles 2i and 2i+1 is exactly the A layout of k-step i (see the layouts above).
template <typename scalar_t>
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[4], const float (&lo)[4], const float (&hi)[4]) {
  a[0] = Elem<scalar_t>::pack2(lo[0], lo[1]);
  a[1] = Elem<scalar_t>::pack2(lo[2], lo[3]);
  a[2] = Elem<scalar_t>::pack2(hi[0], hi[1]);
  a[3] = Elem<scalar_t>::pack2(hi[2], hi[3]);
}

}  // namespace attn
}  // namespace edm_fast
