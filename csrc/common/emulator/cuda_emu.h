// CPU emulation of the CUDA C++ the kernels in csrc/ use, so that their unmodified source runs, as plain C++
// compiled by g++ with -DEDM_CUDA_EMULATE, on a machine without a GPU (tests/cuda_emulator.py builds it;
// tests/ops/test_group_norm_emulated.py, test_heun.py, test_cuda_emulator.py and, through
// attention/emulator/cuda_emu.h, test_attention.py run it under AddressSanitizer). Never part of a real build:
// setup.py, CMake and the nvcc compile check only pick up .cu/.cpp files, and the emulator's files are .h/.cc.
//
// This header: language keywords, vector and 16-bit float types (bit-exact round-to-nearest-even conversions),
// math intrinsics; then the execution model (cuda_emu_exec.h: threads, CTAs, clusters, warps, shared memory,
// launches) and the runtime/c10 API the host launchers call (cuda_emu_api.h). The stand-ins in include/
// (cuda_runtime.h, cooperative_groups.h, c10/cuda/CUDAGuard.h, ...) all resolve to this header, so sources
// keep their normal #includes when that directory is first on the include path.
//
// What nvcc parses but g++ cannot -- kernel<<<...>>>(...) launches and `__shared__` declarations -- is
// rewritten textually before compiling (tests/cuda_emulator.py, one line in, one line out) into
// edm_fast::emu::launch_kernel(...)(...) and edm_fast::emu::shared_var<T>(...).
//
// Approximate intrinsics (__expf, __fdividef, rsqrtf) are evaluated by their defining formula with correctly
// rounded pieces: the hardware's few-ulp approximation error is not reproduced, its flush-to-zero is.
#pragma once
#ifndef EDM_CUDA_EMULATE
#error "cuda_emu.h is only for the CPU emulation build (-DEDM_CUDA_EMULATE)"
#endif

#include <math.h>

#include <cmath>
#include <cstdint>
#include <cstring>

// ---- language keywords ----------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// __restrict__ is a g++ keyword already.

// ---- vector types -----------------------------------------------------------------------------------------
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) { return uint4{x, y, z, w}; }
struct alignas(8) uint2 {
  unsigned int x, y;
};
struct alignas(8) float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }
struct alignas(16) float4 {
  float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

// ---- 16-bit float types (bit-exact round-to-nearest-even conversions, no implicit conversions: torch builds
// with __CUDA_NO_HALF_CONVERSIONS__, so kernels must not rely on them) ----------------------------------------
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
  if (std::isnan(v)) return __half{0x7FFF};     // the canonical NaN cvt.rn.f16.f32 gives
  const _Float16 f = static_cast<_Float16>(v);  // IEEE binary16, round to nearest even
  __half h;
  std::memcpy(&h.x, &f, 2);
  return h;
}
inline __half __float2half(float v) { return __float2half_rn(v); }
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
  if (std::isnan(v)) return __nv_bfloat16{0x7FFF};  // the canonical NaN, as CUDA's conversion
  u += 0x7FFFu + ((u >> 16) & 1u);
  return __nv_bfloat16{static_cast<uint16_t>(u >> 16)};
}
inline __nv_bfloat16 __float2bfloat16(float v) { return __float2bfloat16_rn(v); }
inline __nv_bfloat16 __ushort_as_bfloat16(uint16_t u) { return __nv_bfloat16{u}; }
inline uint16_t __bfloat16_as_ushort(__nv_bfloat16 h) { return h.x; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return __nv_bfloat162{__float2bfloat16_rn(a), __float2bfloat16_rn(b)};
}

// ---- math intrinsics --------------------------------------------------------------------------------------
// Build with -ffp-contract=off: a CUDA `a * b + c` is contracted to an FMA by nvcc, but kernels that must be
// exact use the explicit _rn intrinsics below, which the GPU never contracts.
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __flush_denormal(float v) { return std::fpclassify(v) == FP_SUBNORMAL ? std::copysign(0.f, v) : v; }
// ex2.approx(x * log2(e)) with the product rounded to fp32, as the hardware evaluates it.
inline float __expf(float x) { return __flush_denormal(std::exp2(__flush_denormal(x * 1.44269504088896341f))); }
inline float __exp2f_approx(float x) { return std::exp2(x); }
// x * rcp.approx.ftz(y): 0 when 1/y is subnormal (2^126 < |y| < 2^128), as the CUDA documentation states.
inline float __fdividef(float x, float y) { return x * __flush_denormal(1.f / y); }
inline float rsqrtf(float x) { return static_cast<float>(1.0 / std::sqrt(static_cast<double>(x))); }
inline float __frsqrt_rn(float x) { return rsqrtf(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : (x == x ? x : 0.f)); }

#include "common/emulator/cuda_emu_exec.h"
#include "common/emulator/cuda_emu_api.h"
