// Host entry points of the fused attention op (declared in attention_params.h, called by attention.cpp): sanity
// checks on the plain-data parameters, device guard and current stream, then the kernels:
//   forward:  fp16/bf16 -> attention_fwd.cu (tensor cores), fp32 -> attention_fp32.cu (FMA)
//   backward: delta = rowsum(dO * O) -> main kernel (tensor cores or FMA; dk/dv into grad_qkv, dq into an fp32
//             buffer with atomics) -> dq buffer into the q slots of grad_qkv.
// No kernel code here; see those files for algorithms, grid mappings, precision and limits.
#ifndef EDM_ATTN_EMULATE
#include <c10/core/Device.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#endif

#include <cstdint>

#include "attention/attention_common.cuh"
#include "attention/attention_kernels.cuh"
#include "attention/attention_params.h"

namespace edm_fast {
namespace attn {
namespace {

void check_common(int heads, int d, int T, DType dtype, const char* op) {
  TORCH_CHECK(heads >= 1, op, ": heads must be >= 1, got ", heads);
  TORCH_CHECK(d % 8 == 0 && d >= 8 && d <= 256, op, ": channels per head must be a multiple of 8 in [8, 256], got ", d);
  TORCH_CHECK(T >= 1, op, ": empty sequence");
  TORCH_CHECK(dtype == kF32 || dtype == kF16 || dtype == kBF16, op, ": unknown dtype code ", static_cast<int>(dtype));
}

// Vector loader modes are only valid for 16-bit elements (attention_common.cuh); the launchers' callers pick them.
void check_mode(int mode, DType dtype, const char* what, const char* op) {
  TORCH_CHECK(mode == kLoadGeneric || ((mode == kLoadTokenVec || mode == kLoadChanVec) && dtype != kF32), op,
              ": invalid load mode ", mode, " for ", what);
}

c10::cuda::CUDAStream stream_of(int device) {
  return c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device));
}

}  // namespace

void run_forward(const FwdParams& p, int64_t n_heads_total, DType dtype, int device) {
  const char* op = "edm_fast::attention_fwd";
  check_common(p.heads, p.d, p.T, dtype, op);
  check_mode(p.qkv_mode, dtype, "qkv", op);
  TORCH_CHECK(p.qkv != nullptr && p.out != nullptr && p.lse != nullptr, op, ": null pointer");
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  const cudaStream_t stream = stream_of(device).stream();
  if (dtype == kF32) {
    launch_fwd_f32(p, n_heads_total, stream);
  } else {
    launch_fwd_tc(p, n_heads_total, dtype, stream);
  }
}

void run_backward(const DeltaParams& dp, const BwdParams& p, const DqParams& qp, int64_t n_heads_total, DType dtype,
                  int device) {
  const char* op = "edm_fast::attention_bwd";
  check_common(p.heads, p.d, p.T, dtype, op);
  check_mode(p.qkv_mode, dtype, "qkv", op);
  check_mode(p.dout_mode, dtype, "grad_out", op);
  TORCH_CHECK(dp.heads == p.heads && dp.d == p.d && dp.T == p.T && qp.heads == p.heads && qp.d == p.d && qp.T == p.T,
              op, ": inconsistent geometry between the backward kernels");
  TORCH_CHECK(dp.rows == n_heads_total * p.T && qp.total == n_heads_total * p.T * p.d, op, ": inconsistent sizes");
  TORCH_CHECK(dp.delta == p.delta && qp.dq_acc == p.dq_acc && qp.dqkv == p.dqkv, op, ": inconsistent buffers");
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  const cudaStream_t stream = stream_of(device).stream();
  launch_bwd_delta(dp, dtype, stream);
  if (dtype == kF32) {
    launch_bwd_f32(p, n_heads_total, stream);
  } else {
    launch_bwd_tc(p, n_heads_total, dtype, stream);
  }
  launch_bwd_dq(qp, dtype, stream);
}

}  // namespace attn
}  // namespace edm_fast
