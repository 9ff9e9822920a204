// Fused Heun/Euler sub-steps of the EDM sampler (Algorithm 2), one pass over the sampler state each.
//
// Algorithm: with h = t_next - t_hat,
//   euler:   d = (x_hat - D) / t_hat;                     x_next = x_hat + h * d
//   correct: d = (x_hat - D) / t_hat; d' = (x_next - D') / t_next;
//            x = x_hat + h * (0.5 * d + 0.5 * d')
// D and D' are the network outputs (fp32/fp16/bf16), the state is fp64 as in NVlabs. Every operation is
// an explicitly rounded IEEE fp64 op (__dsub_rn/__ddiv_rn/__dmul_rn/__dadd_rn, no FMA contraction) in the
// order PyTorch evaluates the reference expressions, so results are bit-identical to the Python sampler.
// Grid: 1-D grid-stride loop, 256 threads, one element per thread per iteration; memory-bound (reads
// 8-24 bytes + 2-4 bytes, writes 8 bytes per element). Limits: contiguous tensors of equal numel.
// Host interface: raw pointers and a dtype code only (no ATen headers, so this file builds in C++17 and C++20
// against any torch); tensor checks and allocation live in heun_op.cpp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#include <type_traits>

namespace edm_fast {
namespace {

__device__ __forceinline__ float load_float(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load_float(const __half* p, int64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ float load_float(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }

template <typename scalar_t>
__global__ void heun_euler_kernel(const double* __restrict__ x_hat, const scalar_t* __restrict__ denoised,
                                  double* __restrict__ x_next, double t_hat, double h, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const double xh = x_hat[i];
    const double d = __ddiv_rn(__dsub_rn(xh, (double)load_float(denoised, i)), t_hat);
    x_next[i] = __dadd_rn(xh, __dmul_rn(h, d));
  }
}

template <typename scalar_t>
__global__ void heun_correct_kernel(const double* __restrict__ x_hat, const double* __restrict__ x_next,
                                    const scalar_t* __restrict__ denoised, const scalar_t* __restrict__ denoised_next,
                                    double* __restrict__ out, double t_hat, double t_next, double h, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const double xh = x_hat[i], xn = x_next[i];
    const double d = __ddiv_rn(__dsub_rn(xh, (double)load_float(denoised, i)), t_hat);
    const double dp = __ddiv_rn(__dsub_rn(xn, (double)load_float(denoised_next, i)), t_next);
    out[i] = __dadd_rn(xh, __dmul_rn(h, __dadd_rn(__dmul_rn(0.5, d), __dmul_rn(0.5, dp))));
  }
}

int grid_for(int64_t n) {
  const int64_t blocks = (n + 255) / 256;
  return (int)(blocks < 65535 * 8 ? (blocks > 0 ? blocks : 1) : 65535 * 8);
}

void check_launch(const char* name) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(name) + ": CUDA kernel launch failed: " + cudaGetErrorString(err));
}

// dtype: 0 = float32, 1 = float16, 2 = bfloat16 (of denoised / denoised_next).
template <typename F>
void dispatch_dtype(int dtype, const char* name, F f) {
  switch (dtype) {
    case 0: f(static_cast<const float*>(nullptr)); break;
    case 1: f(static_cast<const __half*>(nullptr)); break;
    case 2: f(static_cast<const __nv_bfloat16*>(nullptr)); break;
    default: throw std::runtime_error(std::string(name) + ": unsupported dtype code");
  }
}

}  // namespace

void heun_euler_launch(const double* x_hat, const void* denoised, int dtype, double* x_next, double t_hat,
                       double t_next, int64_t n, cudaStream_t stream) {
  const double h = t_next - t_hat;  // IEEE double on the host, as torch evaluates t_next - t_hat
  dispatch_dtype(dtype, "heun_euler", [&](auto tag) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    heun_euler_kernel<T><<<grid_for(n), 256, 0, stream>>>(x_hat, static_cast<const T*>(denoised), x_next, t_hat, h, n);
  });
  check_launch("heun_euler");
}

void heun_correct_launch(const double* x_hat, const double* x_next, const void* denoised, const void* denoised_next,
                         int dtype, double* out, double t_hat, double t_next, int64_t n, cudaStream_t stream) {
  const double h = t_next - t_hat;
  dispatch_dtype(dtype, "heun_correct", [&](auto tag) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    heun_correct_kernel<T><<<grid_for(n), 256, 0, stream>>>(x_hat, x_next, static_cast<const T*>(denoised),
                                                           static_cast<const T*>(denoised_next), out, t_hat, t_next, h, n);
  });
  check_launch("heun_correct");
}

}  // namespace edm_fast
