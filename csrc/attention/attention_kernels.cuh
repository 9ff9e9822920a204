// Per-file kernel launchers of the attention op (declared here, defined next to their kernels), called by
// attention_launch.cu on a given stream. Included by .cu files only.
#pragma once
#ifdef EDM_ATTN_EMULATE
#include "attention/emulator/cuda_emu.h"
#else
#include <cuda_runtime_api.h>
#endif

#include <cstdint>

#include "attention/attention_params.h"

namespace edm_fast {
namespace attn {

// attention_fwd.cu: tensor-core forward, fp16 / bf16.
void launch_fwd_tc(const FwdParams& p, int64_t n_heads_total, DType dtype, cudaStream_t stream);
// attention_bwd.cu: tensor-core backward (fp16 / bf16) and the delta / dq kernels (all dtypes).
void launch_bwd_delta(const DeltaParams& p, DType dtype, cudaStream_t stream);
void launch_bwd_tc(BwdParams p, int64_t n_heads_total, DType dtype, cudaStream_t stream);
void launch_bwd_dq(const DqParams& p, DType dtype, cudaStream_t stream);
// attention_fp32.cu: FMA forward and backward for float32.
void launch_fwd_f32(const FwdParams& p, int64_t n_heads_total, cudaStream_t stream);
void launch_bwd_f32(BwdParams p, int64_t n_heads_total, cudaStream_t stream);

}  // namespace attn
}  // namespace edm_fast
