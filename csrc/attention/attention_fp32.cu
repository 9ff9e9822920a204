// Fused multi-head self-attention, forward and backward, for fp32 inputs on CUDA cores (FMA; no TF32, so the
// result is as accurate as PyTorch's fp32 reference). Same algorithm, saved statistics and interleaved qkv /
// head-major output layouts as the tensor-core kernels (attention_fwd.cu, attention_bwd.cu), which handle fp16
// and bf16; this is the slower path the EDM fp32 networks (DDPM++/NCSN++ CIFAR) take.
//
// Forward: online softmax over key tiles of BK = 32 for a query tile of BQ = 32; S, the softmax statistics and
// O are fp32. Backward: one CTA per key tile (BK = 32) loops over query tiles (BQ = 32), recomputes
// P = exp(S - lse), accumulates dK and dV in registers and adds dQ to the fp32 buffer with atomicAdd.
// Unlike the tensor-core kernels these work in natural-log units with the accurate expf/logf: the logits are
// q.k * (1/sqrt(d)), exactly NVlabs' scaling when 1/sqrt(d) is a power of two (d = 64, 256), and no log2(e)
// conversions add rounding to the exponents, which matters at fp32 accuracy (the recomputed P of the backward
// inherits every rounding of S and lse, amplified by |S|). Summation order is chosen for the same reason: dot
// products over channels use four interleaved partial sums, and sums over tokens are formed per 32-token tile
// and then added to the running totals, so no fp32 accumulation chain grows with T (one running sum over
// T = 1024 keys measured 2.7x the error of PyTorch's blocked matmul; per-tile partials 1.1x).
//
// Grid mapping: 1-D grid; forward block b -> (n*heads + h) = b / n_qtiles, query tile b % n_qtiles; backward
// block b -> (n*heads + h) = b / n_ktiles, key tile b % n_ktiles. 256 threads as a 16 x 16 grid (ty, tx): for
// score-like tiles thread (ty, tx) owns rows {ty, ty + 16} x columns {tx, tx + 16}; for [row][channel]
// accumulators it owns rows {ty, ty + 16} x channels tx + 16 m. Row reductions use 16-lane shuffles (the 16
// threads of a row are one half-warp). Shared tiles are [token][channel] with an odd pitch D_PAD + 1, so both
// row-wise and column-wise accesses are bank-conflict-free.
//
// Limits: d % 8 == 0 and 8 <= d <= 256 (padded head dims 64 / 128 / 256), any T >= 1. Shared memory up to
// ~140 KB (backward at d > 128): needs sm_80 or newer.
#include "attention/attention_common.cuh"
#include "attention/attention_kernels.cuh"

namespace edm_fast {
namespace attn {
namespace {

template <int D_PAD>
struct F32Tile {
  static constexpr int kThreads = 256;
  static constexpr int BQ = 32;
  static constexpr int BK = 32;
  static constexpr int LD = D_PAD + 1;  // odd pitch: conflict-free rows and columns
  static constexpr int LP = 33;         // pitch of 32 x 32 score tiles
  static constexpr int kFwdSmem = ((BQ + 2 * BK) * LD + BQ * LP) * 4;
  static constexpr int kBwdSmem = ((2 * BK + 2 * BQ) * LD + 2 * BK * LP + 2 * BQ) * 4;
};

__device__ __forceinline__ float half_warp_max(float v) {
#pragma unroll
  for (int m = 8; m >= 1; m >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, m));
  return v;
}
__device__ __forceinline__ float half_warp_sum(float v) {
#pragma unroll
  for (int m = 8; m >= 1; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  return v;
}

// acc[i][j] += sum_c a_i[c] * b_j[c] over c < d (d % 4 == 0) for two rows a_0, a_1 and two rows b_0, b_1 of
// pitch-LD shared tiles, with four interleaved partial sums (c mod 4) combined pairwise at the end.
template <int LD>
__device__ __forceinline__ void dot2x2(float (&acc)[2][2], const float* a0, const float* a1, const float* b0,
                                       const float* b1, int d) {
  float part[4][2][2];
#pragma unroll
  for (int u = 0; u < 4; ++u)
#pragma unroll
    for (int i = 0; i < 2; ++i) part[u][i][0] = part[u][i][1] = 0.f;
  for (int c = 0; c < d; c += 4) {
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const float x0 = a0[c + u], x1 = a1[c + u], y0 = b0[c + u], y1 = b1[c + u];
      part[u][0][0] = fmaf(x0, y0, part[u][0][0]);
      part[u][0][1] = fmaf(x0, y1, part[u][0][1]);
      part[u][1][0] = fmaf(x1, y0, part[u][1][0]);
      part[u][1][1] = fmaf(x1, y1, part[u][1][1]);
    }
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) acc[i][j] = (part[0][i][j] + part[1][i][j]) + (part[2][i][j] + part[3][i][j]);
}

template <int D_PAD>
__global__ void __launch_bounds__(256) edm_attn_fwd_f32_kernel(const FwdParams p) {
  using Cfg = F32Tile<D_PAD>;
  constexpr int BQ = Cfg::BQ, BK = Cfg::BK, LD = Cfg::LD, LP = Cfg::LP;
  constexpr int M = D_PAD / 16;  // output channels per thread and row
  unsigned char* smem_raw = dynamic_smem();
  float* sQ = reinterpret_cast<float*>(smem_raw);
  float* sK = sQ + BQ * LD;
  float* sV = sK + BK * LD;
  float* sP = sV + BK * LD;  // [query][key]

  const int qtile = blockIdx.x % p.n_qtiles;
  const int bh = blockIdx.x / p.n_qtiles;
  const int n = bh / p.heads, h = bh % p.heads;
  const int q0 = qtile * BQ;
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  const int T = p.T, d = p.d;

  const HeadSrc<float> src{static_cast<const float*>(p.qkv) + n * p.qkv_s.n + static_cast<int64_t>(h) * 3 * d * p.qkv_s.c,
                           3 * p.qkv_s.c, p.qkv_s.c, p.qkv_s.t};
  load_tile<float, 3, BQ, D_PAD, LD, 256>(src, kLoadGeneric, q0, T, d, sQ, nullptr, nullptr);

  float o[2][M];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int m = 0; m < M; ++m) o[i][m] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY};
  float l_run[2] = {0.f, 0.f};  // running softmax denominators (identical in the 16 threads of a row)

  for (int k0 = 0; k0 < T; k0 += BK) {
    __syncthreads();  // the previous iteration is done with sK, sV, sP
    load_tile<float, 3, BK, D_PAD, LD, 256>(src, kLoadGeneric, k0, T, d, nullptr, sK, sV);
    __syncthreads();

    float s[2][2];
    dot2x2<LD>(s, sQ + ty * LD, sQ + (ty + 16) * LD, sK + tx * LD, sK + (tx + 16) * LD, d);
    float alpha[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int j = 0; j < 2; ++j) s[i][j] = (k0 + tx + 16 * j < T) ? s[i][j] * p.scale : -INFINITY;
      const float m_new = fmaxf(m_run[i], half_warp_max(fmaxf(s[i][0], s[i][1])));  // finite: key k0 is valid
      alpha[i] = expf(m_run[i] - m_new);  // 0 on the first tile (m_run = -inf)
      m_run[i] = m_new;
      const float p0 = expf(s[i][0] - m_new), p1 = expf(s[i][1] - m_new);
      l_run[i] = l_run[i] * alpha[i] + half_warp_sum(p0 + p1);  // the tile's full row sum
      sP[(ty + 16 * i) * LP + tx] = p0;
      sP[(ty + 16 * i) * LP + tx + 16] = p1;
    }
    __syncthreads();  // sP complete
    float ot[2][M];  // this tile's P V, added to the running O afterwards (short accumulation chains)
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int m = 0; m < M; ++m) ot[i][m] = 0.f;
    for (int kk = 0; kk < BK; ++kk) {
      const float p0 = sP[ty * LP + kk], p1 = sP[(ty + 16) * LP + kk];
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const float v = sV[kk * LD + tx + 16 * m];
        ot[0][m] = fmaf(p0, v, ot[0][m]);
        ot[1][m] = fmaf(p1, v, ot[1][m]);
      }
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int m = 0; m < M; ++m) o[i][m] = fmaf(o[i][m], alpha[i], ot[i][m]);
  }

  float* out = static_cast<float*>(p.out) + n * p.out_s.n + static_cast<int64_t>(h) * d * p.out_s.c;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float l = l_run[i];
    const float inv_l = 1.f / l;
    const int t = q0 + ty + 16 * i;
    if (t < T) {
      if (tx == 0) p.lse[static_cast<int64_t>(bh) * T + t] = m_run[i] + logf(l);
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const int c = tx + 16 * m;
        if (c < d) out[c * p.out_s.c + static_cast<int64_t>(t) * p.out_s.t] = o[i][m] * inv_l;
      }
    }
  }
}

template <int D_PAD>
__global__ void __launch_bounds__(256) edm_attn_bwd_f32_kernel(const BwdParams p) {
  using Cfg = F32Tile<D_PAD>;
  constexpr int BQ = Cfg::BQ, BK = Cfg::BK, LD = Cfg::LD, LP = Cfg::LP;
  constexpr int M = D_PAD / 16;
  unsigned char* smem_raw = dynamic_smem();
  float* sK = reinterpret_cast<float*>(smem_raw);
  float* sV = sK + BK * LD;
  float* sQ = sV + BK * LD;
  float* sdO = sQ + BQ * LD;
  float* sP = sdO + BQ * LD;  // P^T: [key][query]
  float* sdS = sP + BK * LP;  // dS^T: [key][query]
  float* sLse = sdS + BK * LP;
  float* sDelta = sLse + BQ;

  const int ktile = blockIdx.x % p.n_ktiles;
  const int bh = blockIdx.x / p.n_ktiles;
  const int n = bh / p.heads, h = bh % p.heads;
  const int k0 = ktile * BK;
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  const int T = p.T, d = p.d;

  const HeadSrc<float> qkv{static_cast<const float*>(p.qkv) + n * p.qkv_s.n + static_cast<int64_t>(h) * 3 * d * p.qkv_s.c,
                           3 * p.qkv_s.c, p.qkv_s.c, p.qkv_s.t};
  const HeadSrc<float> dout{static_cast<const float*>(p.dout) + n * p.dout_s.n + static_cast<int64_t>(h) * d * p.dout_s.c,
                            p.dout_s.c, 0, p.dout_s.t};
  load_tile<float, 3, BK, D_PAD, LD, 256>(qkv, kLoadGeneric, k0, T, d, nullptr, sK, sV);

  float dk[2][M], dv[2][M];  // keys {ty, ty + 16} x channels tx + 16 m
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int m = 0; m < M; ++m) dk[i][m] = dv[i][m] = 0.f;

  for (int q0 = 0; q0 < T; q0 += BQ) {
    __syncthreads();
    load_tile<float, 3, BQ, D_PAD, LD, 256>(qkv, kLoadGeneric, q0, T, d, sQ, nullptr, nullptr);
    load_tile<float, 1, BQ, D_PAD, LD, 256>(dout, kLoadGeneric, q0, T, d, sdO, nullptr, nullptr);
    for (int i = threadIdx.x; i < BQ; i += Cfg::kThreads) {
      const int t = q0 + i;
      sLse[i] = t < T ? p.lse[static_cast<int64_t>(bh) * T + t] : 0.f;  // natural log, as the forward stored it
      sDelta[i] = t < T ? p.delta[static_cast<int64_t>(bh) * T + t] : 0.f;
    }
    __syncthreads();

    // S^T and dP^T for keys {ty, ty + 16} x queries {tx, tx + 16}.
    float s[2][2], dp[2][2];
    dot2x2<LD>(s, sK + ty * LD, sK + (ty + 16) * LD, sQ + tx * LD, sQ + (tx + 16) * LD, d);
    dot2x2<LD>(dp, sV + ty * LD, sV + (ty + 16) * LD, sdO + tx * LD, sdO + (tx + 16) * LD, d);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int key = k0 + ty + 16 * i, qc = tx + 16 * j;
        const float pv = (key < T && q0 + qc < T) ? expf(s[i][j] * p.scale - sLse[qc]) : 0.f;
        sP[(ty + 16 * i) * LP + qc] = pv;
        sdS[(ty + 16 * i) * LP + qc] = pv * (dp[i][j] - sDelta[qc]);
      }
    }
    __syncthreads();

    // dV += P^T dO, dK += dS^T Q: this tile's sums first, then added to the running totals.
    {
      float dvt[2][M], dkt[2][M];
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int m = 0; m < M; ++m) dvt[i][m] = dkt[i][m] = 0.f;
      for (int qq = 0; qq < BQ; ++qq) {
        const float p0 = sP[ty * LP + qq], p1 = sP[(ty + 16) * LP + qq];
        const float s0 = sdS[ty * LP + qq], s1 = sdS[(ty + 16) * LP + qq];
#pragma unroll
        for (int m = 0; m < M; ++m) {
          const float o = sdO[qq * LD + tx + 16 * m], q = sQ[qq * LD + tx + 16 * m];
          dvt[0][m] = fmaf(p0, o, dvt[0][m]);
          dvt[1][m] = fmaf(p1, o, dvt[1][m]);
          dkt[0][m] = fmaf(s0, q, dkt[0][m]);
          dkt[1][m] = fmaf(s1, q, dkt[1][m]);
        }
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int m = 0; m < M; ++m) {
          dv[i][m] += dvt[i][m];
          dk[i][m] += dkt[i][m];
        }
    }
    // dQ[q][c] += sum_k dS^T[k][q] K[k][c] for queries {ty, ty + 16} x channels tx + 16 m.
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float acc[M];
#pragma unroll
      for (int m = 0; m < M; ++m) acc[m] = 0.f;
      for (int kk = 0; kk < BK; ++kk) {
        const float ds = sdS[kk * LP + ty + 16 * i];
#pragma unroll
        for (int m = 0; m < M; ++m) acc[m] = fmaf(ds, sK[kk * LD + tx + 16 * m], acc[m]);
      }
      const int q = q0 + ty + 16 * i;
      if (q < T) {
#pragma unroll
        for (int m = 0; m < M; ++m) {
          const int c = tx + 16 * m;
          if (c < d) atomicAdd(p.dq_acc + (static_cast<int64_t>(bh) * T + q) * d + c, acc[m] * p.scale);
        }
      }
    }
  }

  float* dqkv = static_cast<float*>(p.dqkv) + n * p.dqkv_s.n + static_cast<int64_t>(h) * 3 * d * p.dqkv_s.c;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int key = k0 + ty + 16 * i;
    if (key >= T) continue;
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const int c = tx + 16 * m;
      if (c >= d) continue;
      const int64_t off = 3 * c * p.dqkv_s.c + static_cast<int64_t>(key) * p.dqkv_s.t;
      dqkv[off + p.dqkv_s.c] = dk[i][m] * p.scale;
      dqkv[off + 2 * p.dqkv_s.c] = dv[i][m];
    }
  }
}

template <int D_PAD>
void launch_fwd_f32_impl(const FwdParams& p, int64_t n_heads_total, cudaStream_t stream) {
  using Cfg = F32Tile<D_PAD>;
  FwdParams q = p;
  q.n_qtiles = (p.T + Cfg::BQ - 1) / Cfg::BQ;
  const int64_t blocks = n_heads_total * q.n_qtiles;
  if (blocks == 0) return;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "attention_fwd: too many CTAs (", blocks, ") for a 1-D grid");
  auto kernel = edm_attn_fwd_f32_kernel<D_PAD>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kFwdSmem));
  EDM_ATTN_LAUNCH(kernel, static_cast<unsigned>(blocks), Cfg::kThreads, Cfg::kFwdSmem, stream, q);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int D_PAD>
void launch_bwd_f32_impl(BwdParams p, int64_t n_heads_total, cudaStream_t stream) {
  using Cfg = F32Tile<D_PAD>;
  p.n_ktiles = (p.T + Cfg::BK - 1) / Cfg::BK;
  p.n_chunks = 1;
  const int64_t blocks = n_heads_total * p.n_ktiles;
  if (blocks == 0) return;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "attention_bwd: too many CTAs (", blocks, ") for a 1-D grid");
  auto kernel = edm_attn_bwd_f32_kernel<D_PAD>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kBwdSmem));
  EDM_ATTN_LAUNCH(kernel, static_cast<unsigned>(blocks), Cfg::kThreads, Cfg::kBwdSmem, stream, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void launch_fwd_f32(const FwdParams& p, int64_t n_heads_total, cudaStream_t stream) {
  switch (padded_head_dim(p.d)) {
    case 64: return launch_fwd_f32_impl<64>(p, n_heads_total, stream);
    case 128: return launch_fwd_f32_impl<128>(p, n_heads_total, stream);
    default: return launch_fwd_f32_impl<256>(p, n_heads_total, stream);
  }
}

void launch_bwd_f32(BwdParams p, int64_t n_heads_total, cudaStream_t stream) {
  switch (padded_head_dim(p.d)) {
    case 64: return launch_bwd_f32_impl<64>(p, n_heads_total, stream);
    case 128: return launch_bwd_f32_impl<128>(p, n_heads_total, stream);
    default: return launch_bwd_f32_impl<256>(p, n_heads_total, stream);
  }
}

}  // namespace attn
}  // namespace edm_fast
