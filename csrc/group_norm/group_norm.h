// Host launchers of the fused GroupNorm kernels (group_norm_fwd.cu, group_norm_bwd.cu), called by the op
// implementations in group_norm.cpp. Plain structs of pointers, sizes and strides: the .cu files include no
// ATen header (ATen/core/TensorBase.h needs C++20 with torch >= 2.13 and the compile check builds C++17),
// and the .cpp needs no CUDA header. Absent optional tensors are null pointers.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace edm_fast {

struct GroupNormShape {
  int64_t N, C, P, G;   // P = H * W
  bool channels_last;   // dense channels-last, else dense NCHW
  c10::ScalarType dtype;
  int device;           // CUDA device index
};

// A [N or 1, C, 1, 1] per-channel input: sample stride 0 when broadcast over the batch.
struct ChannelInput {
  const void* data = nullptr;
  int64_t sn = 0, sc = 0;
};

struct GroupNormFwdParams {
  GroupNormShape s;
  const void* x;
  void* y;
  const float* weight;  // fp32 [C]
  const float* bias;
  ChannelInput pre_add, scale, shift;  // x's dtype
  float* mean;  // fp32 [N, G]
  float* rstd;
  double eps;
  bool silu;
};

struct GroupNormBwdParams {
  GroupNormShape s;
  const void* dy;
  const void* x;
  void* dx;
  const float* weight;
  const float* bias;
  ChannelInput pre_add, scale, shift;
  const float* mean;
  const float* rstd;
  bool silu;
  float* workspace;    // fp32 [3, group_norm_bwd_workspace(...)]
  float* dweight;      // fp32 [C]
  float* dbias;
  void* dpre_add;      // x's dtype, contiguous [N or 1, C]; null when not wanted
  bool pre_add_bcast;  // dpre_add is [1, C]: summed over the batch
  void* dscale;        // null without scale/shift
  bool scale_bcast;
  void* dshift;
  bool shift_bcast;
};

void group_norm_fwd_cuda(const GroupNormFwdParams& p);

// Floats in each of the backward's three per-(n, c) partial-sum workspaces.
int64_t group_norm_bwd_workspace(const GroupNormShape& s, const void* dy, const void* x, const void* dx);

void group_norm_bwd_cuda(const GroupNormBwdParams& p);

}  // namespace edm_fast
