// dtype dispatch for the activation types the kernels support: fp32, fp16, bf16.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#define EDM_DISPATCH_FLOATING(stype, name, ...)                                   \
  [&] {                                                                           \
    switch (stype) {                                                              \
      case c10::ScalarType::Float: { using scalar_t = float; return __VA_ARGS__(); }        \
      case c10::ScalarType::Half: { using scalar_t = __half; return __VA_ARGS__(); }         \
      case c10::ScalarType::BFloat16: { using scalar_t = __nv_bfloat16; return __VA_ARGS__(); } \
      default: TORCH_CHECK(false, name, ": unsupported dtype ", stype, " (expected float32, float16 or bfloat16)"); \
    }                                                                             \
  }()

namespace edm_fast {
template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
}  // namespace edm_fast
