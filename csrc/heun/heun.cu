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
#include <ATen/core/TensorBase.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "common/dispatch.h"

namespace edm_fast {
namespace {

template <typename scalar_t>
__global__ void heun_euler_kernel(const double* __restrict__ x_hat, const scalar_t* __restrict__ denoised,
                                  double* __restrict__ x_next, double t_hat, double h, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const double xh = x_hat[i];
    const double d = __ddiv_rn(__dsub_rn(xh, (double)to_float(denoised[i])), t_hat);
    x_next[i] = __dadd_rn(xh, __dmul_rn(h, d));
  }
}

template <typename scalar_t>
__global__ void heun_correct_kernel(const double* __restrict__ x_hat, const double* __restrict__ x_next,
                                    const scalar_t* __restrict__ denoised, const scalar_t* __restrict__ denoised_next,
                                    double* __restrict__ out, double t_hat, double t_next, double h, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const double xh = x_hat[i], xn = x_next[i];
    const double d = __ddiv_rn(__dsub_rn(xh, (double)to_float(denoised[i])), t_hat);
    const double dp = __ddiv_rn(__dsub_rn(xn, (double)to_float(denoised_next[i])), t_next);
    out[i] = __dadd_rn(xh, __dmul_rn(h, __dadd_rn(__dmul_rn(0.5, d), __dmul_rn(0.5, dp))));
  }
}

int grid_for(int64_t n) {
  const int64_t blocks = (n + 255) / 256;
  return (int)(blocks < 65535 * 8 ? (blocks > 0 ? blocks : 1) : 65535 * 8);
}

}  // namespace

void heun_euler_launch(const at::TensorBase& x_hat, const at::TensorBase& denoised, const at::TensorBase& x_next,
                       double t_hat, double t_next) {
  const int64_t n = x_hat.numel();
  const double h = t_next - t_hat;  // IEEE double on the host, as torch evaluates t_next - t_hat
  auto stream = c10::cuda::getCurrentCUDAStream();
  EDM_DISPATCH_FLOATING(denoised.scalar_type(), "heun_euler", [&] {
    heun_euler_kernel<scalar_t><<<grid_for(n), 256, 0, stream>>>(
        x_hat.const_data_ptr<double>(), static_cast<const scalar_t*>(denoised.const_data_ptr()),
        x_next.mutable_data_ptr<double>(), t_hat, h, n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void heun_correct_launch(const at::TensorBase& x_hat, const at::TensorBase& x_next, const at::TensorBase& denoised,
                         const at::TensorBase& denoised_next, const at::TensorBase& out, double t_hat, double t_next) {
  const int64_t n = x_hat.numel();
  const double h = t_next - t_hat;
  auto stream = c10::cuda::getCurrentCUDAStream();
  EDM_DISPATCH_FLOATING(denoised.scalar_type(), "heun_correct", [&] {
    heun_correct_kernel<scalar_t><<<grid_for(n), 256, 0, stream>>>(
        x_hat.const_data_ptr<double>(), x_next.const_data_ptr<double>(),
        static_cast<const scalar_t*>(denoised.const_data_ptr()),
        static_cast<const scalar_t*>(denoised_next.const_data_ptr()), out.mutable_data_ptr<double>(), t_hat, t_next, h,
        n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace edm_fast
