// CUDA implementations of edm_fast::group_norm_fwd / group_norm_bwd (schemas in csrc/registration.cpp):
// input checks, the memory-format rule, output and workspace allocation, then the launchers in the .cu files.
// Fake (meta) kernels and autograd live in edm_fast/ops/group_norm.py and must produce the same shapes,
// dtypes and strides as these functions.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "group_norm/group_norm.h"

namespace {

using at::Tensor;

constexpr int64_t kMaxGroupChannels = 512;  // edm_fast/ops/group_norm.py: CUDA_MAX_GROUP_CHANNELS

// The kernels index dense NCHW or dense channels-last; anything else is made dense (same rule as _dense in
// edm_fast/ops/group_norm.py, so the fake kernels predict the output strides).
Tensor dense(const Tensor& x) {
  if (x.is_contiguous()) return x;
  const bool cl = x.is_contiguous(at::MemoryFormat::ChannelsLast) || x.stride(1) == 1;
  return x.contiguous(cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}

bool channels_last(const Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

void check_channel_input(const std::optional<Tensor>& t, const char* name, const Tensor& x) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->dim() == 4 && (t->size(0) == 1 || t->size(0) == x.size(0)) && t->size(1) == x.size(1) &&
                  t->size(2) == 1 && t->size(3) == 1,
              "group_norm: ", name, " must be [N or 1, C, 1, 1], got ", t->sizes());
  TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->device() == x.device(), "group_norm: ", name,
              " must have x's dtype and device");
}

edm_fast::ChannelInput channel_input(const std::optional<Tensor>& t) {
  edm_fast::ChannelInput c;
  if (t.has_value()) {
    c.data = t->const_data_ptr();
    c.sn = t->size(0) > 1 ? t->stride(0) : 0;
    c.sc = t->stride(1);
  }
  return c;
}

edm_fast::GroupNormShape check_inputs(const Tensor& x, const Tensor& weight, const Tensor& bias,
                                      const std::optional<Tensor>& pre_add, const std::optional<Tensor>& scale,
                                      const std::optional<Tensor>& shift, int64_t num_groups) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 4, "group_norm: x must be a 4-D CUDA tensor");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "group_norm: x must be float32, float16 or bfloat16, got ", dt);
  const int64_t C = x.size(1);
  TORCH_CHECK(num_groups > 0 && C % num_groups == 0, "group_norm: ", C, " channels do not split into ", num_groups,
              " groups");
  TORCH_CHECK(C / num_groups <= kMaxGroupChannels, "group_norm: at most ", kMaxGroupChannels,
              " channels per group on CUDA");
  // Offsets are 64-bit; per-sample positions and (sample, channel) indices are 32-bit.
  TORCH_CHECK(x.numel() > 0 && x.size(0) * C < (int64_t{1} << 31) && x.size(2) * x.size(3) < (int64_t{1} << 31),
              "group_norm: unsupported size ", x.sizes());
  TORCH_CHECK(weight.numel() == C && bias.numel() == C && weight.device() == x.device() &&
                  bias.device() == x.device(),
              "group_norm: weight and bias must be [C] tensors on x's device");
  TORCH_CHECK(scale.has_value() == shift.has_value(), "group_norm: scale and shift go together");
  check_channel_input(pre_add, "pre_add", x);
  check_channel_input(scale, "scale", x);
  check_channel_input(shift, "shift", x);
  return {x.size(0), C, x.size(2) * x.size(3), num_groups, channels_last(x), dt, x.get_device()};
}

std::tuple<Tensor, Tensor, Tensor> group_norm_fwd(const Tensor& x_in, const Tensor& weight, const Tensor& bias,
                                                  const std::optional<Tensor>& pre_add,
                                                  const std::optional<Tensor>& scale,
                                                  const std::optional<Tensor>& shift, int64_t num_groups, double eps,
                                                  bool silu) {
  const Tensor x = dense(x_in);
  const edm_fast::GroupNormShape s = check_inputs(x, weight, bias, pre_add, scale, shift, num_groups);
  const Tensor w = weight.to(at::kFloat).contiguous(), b = bias.to(at::kFloat).contiguous();
  Tensor y = at::empty_like(x);
  Tensor mean = at::empty({s.N, num_groups}, x.options().dtype(at::kFloat));
  Tensor rstd = at::empty({s.N, num_groups}, x.options().dtype(at::kFloat));
  edm_fast::GroupNormFwdParams p{};
  p.s = s;
  p.x = x.const_data_ptr();
  p.y = y.mutable_data_ptr();
  p.weight = w.const_data_ptr<float>();
  p.bias = b.const_data_ptr<float>();
  p.pre_add = channel_input(pre_add);
  p.scale = channel_input(scale);
  p.shift = channel_input(shift);
  p.mean = mean.mutable_data_ptr<float>();
  p.rstd = rstd.mutable_data_ptr<float>();
  p.eps = eps;
  p.silu = silu;
  edm_fast::group_norm_fwd_cuda(p);
  return {y, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> group_norm_bwd(
    const Tensor& dy_in, const Tensor& x_in, const Tensor& weight, const Tensor& bias,
    const std::optional<Tensor>& pre_add, const std::optional<Tensor>& scale, const std::optional<Tensor>& shift,
    const Tensor& mean, const Tensor& rstd, int64_t num_groups, bool silu, bool need_pre_add_grad) {
  const Tensor x = dense(x_in);
  const edm_fast::GroupNormShape s = check_inputs(x, weight, bias, pre_add, scale, shift, num_groups);
  TORCH_CHECK(dy_in.sizes() == x.sizes() && dy_in.scalar_type() == x.scalar_type() && dy_in.device() == x.device(),
              "group_norm_bwd: dy must match x");
  TORCH_CHECK(mean.numel() == s.N * num_groups && rstd.numel() == s.N * num_groups &&
                  mean.scalar_type() == at::kFloat && rstd.scalar_type() == at::kFloat,
              "group_norm_bwd: mean and rstd must be the forward's fp32 [N, G] statistics");
  const Tensor dy = dy_in.contiguous(s.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  const Tensor w = weight.to(at::kFloat).contiguous(), b = bias.to(at::kFloat).contiguous();
  const Tensor mean_c = mean.contiguous(), rstd_c = rstd.contiguous();
  Tensor dx = at::empty_like(x);
  const bool need_dadd = need_pre_add_grad && pre_add.has_value();
  const int64_t ws = edm_fast::group_norm_bwd_workspace(s, dy.const_data_ptr(), x.const_data_ptr(),
                                                        dx.const_data_ptr());
  Tensor workspace = at::empty({need_dadd ? 3 : 2, ws}, x.options().dtype(at::kFloat));
  Tensor dweight = at::empty({s.C}, x.options().dtype(at::kFloat));
  Tensor dbias = at::empty({s.C}, x.options().dtype(at::kFloat));
  // Absent gradients are distinct empty tensors (operator outputs must not alias each other).
  Tensor dpre = need_dadd ? at::empty(pre_add->sizes(), pre_add->options()) : at::empty({0}, x.options());
  Tensor dscale = scale.has_value() ? at::empty(scale->sizes(), scale->options()) : at::empty({0}, x.options());
  Tensor dshift = shift.has_value() ? at::empty(shift->sizes(), shift->options()) : at::empty({0}, x.options());

  edm_fast::GroupNormBwdParams p{};
  p.s = s;
  p.dy = dy.const_data_ptr();
  p.x = x.const_data_ptr();
  p.dx = dx.mutable_data_ptr();
  p.weight = w.const_data_ptr<float>();
  p.bias = b.const_data_ptr<float>();
  p.pre_add = channel_input(pre_add);
  p.scale = channel_input(scale);
  p.shift = channel_input(shift);
  p.mean = mean_c.const_data_ptr<float>();
  p.rstd = rstd_c.const_data_ptr<float>();
  p.silu = silu;
  p.workspace = workspace.mutable_data_ptr<float>();
  p.dweight = dweight.mutable_data_ptr<float>();
  p.dbias = dbias.mutable_data_ptr<float>();
  p.dpre_add = need_dadd ? dpre.mutable_data_ptr() : nullptr;
  p.pre_add_bcast = need_dadd && pre_add->size(0) < s.N;
  p.dscale = scale.has_value() ? dscale.mutable_data_ptr() : nullptr;
  p.scale_bcast = scale.has_value() && scale->size(0) < s.N;
  p.dshift = shift.has_value() ? dshift.mutable_data_ptr() : nullptr;
  p.shift_bcast = shift.has_value() && shift->size(0) < s.N;
  edm_fast::group_norm_bwd_cuda(p);
  return {dx, dweight.to(weight.scalar_type()), dbias.to(bias.scalar_type()), dpre, dscale, dshift};
}

}  // namespace

TORCH_LIBRARY_IMPL(edm_fast, CUDA, m) {
  m.impl("group_norm_fwd", &group_norm_fwd);
  m.impl("group_norm_bwd", &group_norm_bwd);
}
