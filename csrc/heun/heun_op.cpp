// CUDA implementations of edm_fast::heun_euler / heun_correct (schemas in csrc/registration.cpp).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/checks.h"

namespace edm_fast {
void heun_euler_launch(const double* x_hat, const void* denoised, int dtype, double* x_next, double t_hat,
                       double t_next, int64_t n, cudaStream_t stream);
void heun_correct_launch(const double* x_hat, const double* x_next, const void* denoised, const void* denoised_next,
                         int dtype, double* out, double t_hat, double t_next, int64_t n, cudaStream_t stream);

namespace {

void check_state(const at::Tensor& t, const char* name) {
  EDM_CHECK_CUDA(t);
  TORCH_CHECK(t.scalar_type() == at::kDouble, name, " must be float64 (the sampler state), got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_denoised(const at::Tensor& d, const at::Tensor& x, const char* name) {
  EDM_CHECK_CUDA(d);
  EDM_CHECK_SAME_DEVICE(d, x);
  TORCH_CHECK(d.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(d.sizes() == x.sizes(), name, " must have the shape of x_hat");
}

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default: TORCH_CHECK(false, "denoised must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

at::Tensor heun_euler_cuda(const at::Tensor& x_hat, const at::Tensor& denoised, double t_hat, double t_next) {
  check_state(x_hat, "x_hat");
  check_denoised(denoised, x_hat, "denoised");
  c10::cuda::CUDAGuard guard(x_hat.device());
  at::Tensor x_next = at::empty_like(x_hat);
  heun_euler_launch(x_hat.const_data_ptr<double>(), denoised.const_data_ptr(), dtype_code(denoised),
                    x_next.mutable_data_ptr<double>(), t_hat, t_next, x_hat.numel(),
                    c10::cuda::getCurrentCUDAStream().stream());
  return x_next;
}

at::Tensor heun_correct_cuda(const at::Tensor& x_hat, const at::Tensor& x_next, const at::Tensor& denoised,
                             const at::Tensor& denoised_next, double t_hat, double t_next) {
  check_state(x_hat, "x_hat");
  check_state(x_next, "x_next");
  check_denoised(denoised, x_hat, "denoised");
  check_denoised(denoised_next, x_hat, "denoised_next");
  TORCH_CHECK(denoised.scalar_type() == denoised_next.scalar_type(), "denoised and denoised_next must share a dtype");
  c10::cuda::CUDAGuard guard(x_hat.device());
  at::Tensor out = at::empty_like(x_hat);
  heun_correct_launch(x_hat.const_data_ptr<double>(), x_next.const_data_ptr<double>(), denoised.const_data_ptr(),
                      denoised_next.const_data_ptr(), dtype_code(denoised), out.mutable_data_ptr<double>(), t_hat, t_next,
                      x_hat.numel(), c10::cuda::getCurrentCUDAStream().stream());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(edm_fast, CUDA, m) {
  m.impl("heun_euler", &heun_euler_cuda);
  m.impl("heun_correct", &heun_correct_cuda);
}

}  // namespace edm_fast
