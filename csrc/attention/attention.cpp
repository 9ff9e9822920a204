// CUDA implementations of edm_fast::attention_fwd / edm_fast::attention_bwd (schemas in csrc/registration.cpp,
// fake kernels and autograd in edm_fast/ops/attention.py): input validation and normalisation, output
// allocation, element strides and tile-loader modes, then the host entry points of attention_launch.cu.
//
// Layout rule (mirrored by the fake kernels): inputs that are neither NCHW- nor channels-last-contiguous are
// made NCHW-contiguous; out and grad_qkv are channels-last exactly when qkv is channels-last-contiguous and not
// NCHW-contiguous, NCHW-contiguous otherwise.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <tuple>

#include "attention/attention_params.h"

namespace {

namespace attn = edm_fast::attn;

bool is_channels_last(const at::Tensor& t) {
  return t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous();
}

at::Tensor dense(const at::Tensor& t) {
  return (t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast)) ? t : t.contiguous();
}

at::MemoryFormat format_like(const at::Tensor& t) {
  return is_channels_last(t) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

attn::DType dtype_of(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return attn::kF32;
    case at::kHalf: return attn::kF16;
    case at::kBFloat16: return attn::kBF16;
    default: break;
  }
  TORCH_CHECK(false, op, ": unsupported dtype ", t.scalar_type(), " (expected float32, float16 or bfloat16)");
  return attn::kF32;
}

struct Geometry {
  int64_t N, C, H, W, heads, d, T;
};

Geometry check_qkv(const at::Tensor& qkv, int64_t heads, const char* op) {
  TORCH_CHECK(qkv.is_cuda(), op, ": qkv must be a CUDA tensor, got ", qkv.device());
  TORCH_CHECK(qkv.dim() == 4, op, ": qkv must be [N, 3C, H, W], got ", qkv.dim(), " dims");
  TORCH_CHECK(heads >= 1, op, ": num_heads must be >= 1, got ", heads);
  TORCH_CHECK(qkv.size(1) % (3 * heads) == 0, op, ": qkv channels (", qkv.size(1),
              ") must be divisible by 3 * num_heads (", 3 * heads, ")");
  dtype_of(qkv, op);
  const Geometry g{qkv.size(0), qkv.size(1) / 3, qkv.size(2), qkv.size(3), heads, qkv.size(1) / (3 * heads),
                   qkv.size(2) * qkv.size(3)};
  TORCH_CHECK(g.d % 8 == 0 && g.d >= 8 && g.d <= 256, op,
              ": channels per head must be a multiple of 8 in [8, 256], got ", g.d);
  TORCH_CHECK(g.T < (int64_t(1) << 31) && g.N * heads < (int64_t(1) << 31), op, ": tensor too large");
  return g;
}

void check_like_out(const at::Tensor& x, const at::Tensor& qkv, const Geometry& g, const char* name, const char* op) {
  TORCH_CHECK(x.device() == qkv.device() && x.scalar_type() == qkv.scalar_type(), op, ": ", name, " (", x.device(), ", ",
              x.scalar_type(), ") must match qkv (", qkv.device(), ", ", qkv.scalar_type(), ")");
  TORCH_CHECK(x.dim() == 4 && x.size(0) == g.N && x.size(1) == g.C && x.size(2) == g.H && x.size(3) == g.W, op, ": ",
              name, " must be [", g.N, ", ", g.C, ", ", g.H, ", ", g.W, "], got ", x.sizes());
}

// (n, c, t) element strides of a dense [N, C, H, W] tensor with t = y * W + x: stride_h == W * stride_w holds for
// NCHW- and channels-last-contiguous tensors (size-1 spatial dims may carry any stride).
attn::Strides strides_of(const at::Tensor& x) {
  const int64_t H = x.size(2), W = x.size(3);
  int64_t st = x.stride(3);
  if (W == 1) {
    st = x.stride(2);
  } else {
    TORCH_CHECK(H == 1 || x.stride(2) == W * x.stride(3), "edm_fast attention: internal error, strides ", x.strides(),
                " do not flatten H and W");
  }
  return attn::Strides{x.stride(0), x.stride(1), st};
}

// Vector tile loaders need 16-bit elements and 16-byte aligned 8-element runs (csrc/attention/attention_common.cuh).
int load_mode(const at::Tensor& x, const attn::Strides& s, int64_t d, int64_t T) {
  if (x.element_size() != 2) return attn::kLoadGeneric;
  if (reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 != 0 || s.n % 8 != 0) return attn::kLoadGeneric;
  if (s.t == 1 && T % 8 == 0 && s.c % 8 == 0) return attn::kLoadTokenVec;
  if (s.c == 1 && d % 8 == 0 && s.t % 8 == 0) return attn::kLoadChanVec;
  return attn::kLoadGeneric;
}

float scale_of(int64_t d) { return static_cast<float>(1.0 / std::sqrt(static_cast<double>(d))); }
float scale_log2_of(int64_t d) { return static_cast<float>(1.4426950408889634 / std::sqrt(static_cast<double>(d))); }

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& qkv_in, int64_t num_heads) {
  const char* op = "edm_fast::attention_fwd";
  const Geometry g = check_qkv(qkv_in, num_heads, op);
  const at::Tensor qkv = dense(qkv_in);
  at::Tensor out = at::empty({g.N, g.C, g.H, g.W}, qkv.options().memory_format(format_like(qkv)));
  at::Tensor lse = at::empty({g.N * g.heads, g.T}, qkv.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};

  attn::FwdParams p{};
  p.qkv = qkv.data_ptr();
  p.qkv_s = strides_of(qkv);
  p.qkv_mode = load_mode(qkv, p.qkv_s, g.d, g.T);
  p.out = out.data_ptr();
  p.out_s = strides_of(out);
  p.lse = lse.data_ptr<float>();
  p.heads = static_cast<int>(g.heads);
  p.d = static_cast<int>(g.d);
  p.T = static_cast<int>(g.T);
  p.scale = scale_of(g.d);
  p.scale_log2 = scale_log2_of(g.d);
  attn::run_forward(p, g.N * g.heads, dtype_of(qkv, op), qkv.get_device());
  return {out, lse};
}

at::Tensor attention_bwd_cuda(const at::Tensor& grad_out_in, const at::Tensor& qkv_in, const at::Tensor& out_in,
                              const at::Tensor& lse_in, int64_t num_heads) {
  const char* op = "edm_fast::attention_bwd";
  const Geometry g = check_qkv(qkv_in, num_heads, op);
  check_like_out(grad_out_in, qkv_in, g, "grad_out", op);
  check_like_out(out_in, qkv_in, g, "out", op);
  TORCH_CHECK(lse_in.device() == qkv_in.device() && lse_in.scalar_type() == at::kFloat && lse_in.dim() == 2 &&
                  lse_in.size(0) == g.N * g.heads && lse_in.size(1) == g.T,
              op, ": lse must be float32 [", g.N * g.heads, ", ", g.T, "] on ", qkv_in.device(), ", got ",
              lse_in.scalar_type(), " ", lse_in.sizes());
  const at::Tensor qkv = dense(qkv_in);
  const at::Tensor grad_out = dense(grad_out_in);
  const at::Tensor out = dense(out_in);
  const at::Tensor lse = lse_in.contiguous();
  at::Tensor grad_qkv = at::empty(qkv.sizes(), qkv.options().memory_format(format_like(qkv)));
  if (grad_qkv.numel() == 0) return grad_qkv;
  at::Tensor delta = at::empty({g.N * g.heads, g.T}, qkv.options().dtype(at::kFloat));
  at::Tensor dq_acc = at::zeros({g.N * g.heads, g.T, g.d}, qkv.options().dtype(at::kFloat));

  attn::DeltaParams dp{};
  dp.dout = grad_out.data_ptr();
  dp.dout_s = strides_of(grad_out);
  dp.out = out.data_ptr();
  dp.out_s = strides_of(out);
  dp.delta = delta.data_ptr<float>();
  dp.heads = static_cast<int>(g.heads);
  dp.d = static_cast<int>(g.d);
  dp.T = static_cast<int>(g.T);
  dp.rows = g.N * g.heads * g.T;

  attn::BwdParams p{};
  p.qkv = qkv.data_ptr();
  p.qkv_s = strides_of(qkv);
  p.qkv_mode = load_mode(qkv, p.qkv_s, g.d, g.T);
  p.dout = grad_out.data_ptr();
  p.dout_s = dp.dout_s;
  p.dout_mode = load_mode(grad_out, p.dout_s, g.d, g.T);
  p.lse = lse.data_ptr<float>();
  p.delta = dp.delta;
  p.dqkv = grad_qkv.data_ptr();
  p.dqkv_s = strides_of(grad_qkv);
  p.dq_acc = dq_acc.data_ptr<float>();
  p.heads = dp.heads;
  p.d = dp.d;
  p.T = dp.T;
  p.scale = scale_of(g.d);
  p.scale_log2 = scale_log2_of(g.d);

  attn::DqParams qp{};
  qp.dq_acc = p.dq_acc;
  qp.dqkv = p.dqkv;
  qp.dqkv_s = p.dqkv_s;
  qp.heads = p.heads;
  qp.d = p.d;
  qp.T = p.T;
  qp.total = g.N * g.heads * g.T * g.d;

  attn::run_backward(dp, p, qp, g.N * g.heads, dtype_of(qkv, op), qkv.get_device());
  return grad_qkv;
}

}  // namespace

TORCH_LIBRARY_IMPL(edm_fast, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd_cuda);
  m.impl("attention_bwd", &attention_bwd_cuda);
}
