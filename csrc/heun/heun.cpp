// CUDA implementations of edm_fast::heun_euler / heun_correct (schemas in csrc/registration.cpp).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/checks.h"

namespace edm_fast {
void heun_euler_launch(const at::TensorBase& x_hat, const at::TensorBase& denoised, const at::TensorBase& x_next,
                       double t_hat, double t_next);
void heun_correct_launch(const at::TensorBase& x_hat, const at::TensorBase& x_next, const at::TensorBase& denoised,
                         const at::TensorBase& denoised_next, const at::TensorBase& out, double t_hat, double t_next);

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

at::Tensor heun_euler_cuda(const at::Tensor& x_hat, const at::Tensor& denoised, double t_hat, double t_next) {
  check_state(x_hat, "x_hat");
  check_denoised(denoised, x_hat, "denoised");
  c10::cuda::CUDAGuard guard(x_hat.device());
  at::Tensor x_next = at::empty_like(x_hat);
  heun_euler_launch(x_hat, denoised, x_next, t_hat, t_next);
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
  heun_correct_launch(x_hat, x_next, denoised, denoised_next, out, t_hat, t_next);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(edm_fast, CUDA, m) {
  m.impl("heun_euler", &heun_euler_cuda);
  m.impl("heun_correct", &heun_correct_cuda);
}

}  // namespace edm_fast
