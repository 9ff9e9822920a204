// Plain-data kernel parameters of the attention kernels and the two host entry points (defined in
// attention_launch.cu) that attention.cpp calls after validating and normalising its tensors. No CUDA or ATen
// headers: the .cpp includes this and must compile without them (torch's ATen headers need C++20, which the
// .cu files are not compiled with).
//
// Tensor geometry. The three [N, channels, H, W] tensors are addressed through element strides, with the two
// spatial dims flattened to one token index t = y*W + x (valid because every tensor here is either NCHW- or
// channels-last-contiguous, where stride_h == W * stride_w):
//   qkv  [N, 3C, T]: q/k/v of channel c of head h at channel index h*3d + 3c + j (j = 0 q, 1 k, 2 v)
//   out  [N,  C, T]: channel index h*d + c (head-major, what the proj conv consumes); grad_out likewise
//   lse, delta [N*heads, T] fp32 contiguous; dq_acc [N*heads, T, d] fp32 contiguous
#pragma once
#include <cstdint>

namespace edm_fast {
namespace attn {

// How a tile loader reads a source tensor (chosen on the host from strides and alignment in attention.cpp).
enum LoadMode : int {
  kLoadGeneric = 0,   // any strides: one element per access
  kLoadTokenVec = 1,  // tokens contiguous (NCHW), T % 8 == 0, 16-byte aligned: 8 tokens per 16-byte load
  kLoadChanVec = 2,   // channels contiguous (channels-last), d % 8 == 0, 16-byte aligned: 8 channels per load
};

struct Strides {  // element strides of a [N, channels, T] view
  int64_t n, c, t;
};

struct FwdParams {
  const void* qkv;
  Strides qkv_s;
  int qkv_mode;
  void* out;
  Strides out_s;
  float* lse;         // [N*heads, T]: natural-log logsumexp over keys of the scaled logits q.k / sqrt(d)
  int heads, d, T;
  int n_qtiles;       // query tiles per (n, head)
  float scale;        // 1 / sqrt(d) (fp32 kernels work in natural-log units)
  float scale_log2;   // log2(e) / sqrt(d) (tensor-core kernels work in base 2)
};

struct BwdParams {
  const void* qkv;
  Strides qkv_s;
  int qkv_mode;
  const void* dout;   // gradient of out, [N, C, T] head-major
  Strides dout_s;
  int dout_mode;
  const float* lse;
  const float* delta;  // [N*heads, T]: rowsum(dout * out)
  void* dqkv;          // gradient of qkv, same geometry as qkv (own strides)
  Strides dqkv_s;
  float* dq_acc;       // [N*heads, T, d] fp32, zero on entry; receives dq (already multiplied by scale)
  int heads, d, T;
  int n_ktiles;        // key tiles per (n, head)
  int n_chunks;        // output-channel chunks per key tile (tensor-core kernel with d > 128)
  float scale;         // 1 / sqrt(d)
  float scale_log2;    // log2(e) / sqrt(d)
};

struct DeltaParams {
  const void* dout;
  Strides dout_s;
  const void* out;
  Strides out_s;
  float* delta;
  int heads, d, T;
  int64_t rows;  // N * heads * T
};

struct DqParams {
  const float* dq_acc;
  void* dqkv;
  Strides dqkv_s;
  int heads, d, T;
  int64_t total;  // N * heads * T * d
};

// 0 = float32, 1 = float16, 2 = bfloat16 (kept free of c10 headers so every .cu stays light).
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// Padded head dim the kernels are instantiated for: 64, 128 or 256 (channels beyond d are zero-filled).
inline int padded_head_dim(int d) { return d <= 64 ? 64 : (d <= 128 ? 128 : 256); }

// Host entry points (attention_launch.cu): select the kernels for dtype and head dim and run them on the current
// CUDA stream of `device`. n_heads_total = N * heads. The params' tile counts are filled in by the launchers.
void run_forward(const FwdParams& p, int64_t n_heads_total, DType dtype, int device);
// delta kernel, main backward kernel (dk, dv into dqkv; dq into the zero-filled fp32 buffer), dq -> dqkv.
void run_backward(const DeltaParams& dp, const BwdParams& p, const DqParams& qp, int64_t n_heads_total, DType dtype,
                  int device);

}  // namespace attn
}  // namespace edm_fast
