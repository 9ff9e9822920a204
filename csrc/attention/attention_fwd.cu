// Fused multi-head self-attention forward on tensor cores (fp16 / bf16), reading the U-Net's interleaved qkv
// tensor directly and writing the head-major output the proj conv consumes.
//
// Algorithm: FlashAttention-2 style online softmax. For one (n, head) and a tile of BR = 64 queries:
//   for each key tile of BC keys:  S = Q K^T (fp32 accumulate); keys >= T masked to -inf; c = log2(e)/sqrt(d)
//                                  m_new = max(m, rowmax S); P = 2^(c S - c m_new); l = l 2^(c (m - m_new)) + rowsum P
//                                  O = O 2^(c (m - m_new)) + P V   (P rounded to the I/O dtype, fp32 accumulate)
//   out = O / l;  lse = (c m + log2 l) ln 2  (natural-log logsumexp of the scaled logits, saved for backward)
// The T x T score matrix never leaves registers. Numerics vs NVlabs AttentionOp (spec §1.5): logits, softmax
// statistics and both accumulations are fp32; the probabilities enter P V in the I/O dtype as NVlabs' weights
// do; the 1/sqrt(d) scale is applied to the fp32 logits (NVlabs scales k in the I/O dtype, exact for d = 64
// and 256) - the error against an fp64 truth is what the tests bound.
//
// Grid mapping: 1-D grid, block b -> (n*heads + h) = b / n_qtiles, query tile = b % n_qtiles, so the CTAs that
// share one head's K/V run next to each other (L2 reuse). 128 threads = 4 warps; warp w owns query rows
// 16w..16w+15 of the tile. Shared memory: Q [BR][LDS], K and V [BC][LDS] (token-major, LDS = D_PAD + 8 so that
// ldmatrix rows are 16-byte aligned and conflict-free). K/V tiles are reloaded by all threads each iteration
// (single-buffered; latency hidden by several CTAs per SM).
//
// Limits: d % 8 == 0 and 8 <= d <= 256 (instantiated for padded head dims 64, 128, 256; padding channels are
// zero-filled), any T >= 1, sm_80 or newer (mma.sync.m16n8k16, ldmatrix). fp32 inputs use attention_fp32.cu.
#include "attention/attention_common.cuh"
#include "attention/attention_kernels.cuh"

namespace edm_fast {
namespace attn {
namespace {

template <int D_PAD>
struct FwdTile {
  static constexpr int kThreads = 128;
  static constexpr int BR = 64;                     // queries per CTA, 16 per warp
  static constexpr int BC = D_PAD > 128 ? 32 : 64;  // keys per iteration (smaller at d = 256: register budget)
  static constexpr int LDS = D_PAD + 8;             // shared row pitch in elements
  static constexpr int kSmemBytes = (BR + 2 * BC) * LDS * 2;
};

template <typename scalar_t, int D_PAD>
__global__ void __launch_bounds__(128) edm_attn_fwd_tc_kernel(const FwdParams p) {
  using Cfg = FwdTile<D_PAD>;
  constexpr int BR = Cfg::BR, BC = Cfg::BC, LDS = Cfg::LDS;
  constexpr int NT_S = BC / 8;     // 8-key n-tiles of S per warp
  constexpr int NT_O = D_PAD / 8;  // 8-channel n-tiles of O per warp
  using E = Elem<scalar_t>;

  unsigned char* smem_raw = dynamic_smem();
  uint16_t* sQ = reinterpret_cast<uint16_t*>(smem_raw);
  uint16_t* sK = sQ + BR * LDS;
  uint16_t* sV = sK + BC * LDS;

  const int qtile = blockIdx.x % p.n_qtiles;
  const int bh = blockIdx.x / p.n_qtiles;  // n * heads + h
  const int n = bh / p.heads, h = bh % p.heads;
  const int q0 = qtile * BR;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, tq = lane & 3;  // mma groupID / thread-in-group
  const int T = p.T, d = p.d;

  const HeadSrc<uint16_t> src{static_cast<const uint16_t*>(p.qkv) + n * p.qkv_s.n +
                                  static_cast<int64_t>(h) * 3 * d * p.qkv_s.c,
                              3 * p.qkv_s.c, p.qkv_s.c, p.qkv_s.t};
  load_tile<uint16_t, 3, BR, D_PAD, LDS, 128>(src, p.qkv_mode, q0, T, d, sQ, nullptr, nullptr);

  float o[NT_O][4];
#pragma unroll
  for (int i = 0; i < NT_O; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  // Per thread: rows g (r = 0) and g + 8 (r = 1) of the warp's 16 rows. l_run is this thread's partial row
  // sum (its 2 columns of every n-tile), reduced over the 4 threads of the row at the end.
  float m_run[2] = {-INFINITY, -INFINITY};
  float l_run[2] = {0.f, 0.f};

  for (int k0 = 0; k0 < T; k0 += BC) {
    __syncthreads();  // the previous iteration is done with sK / sV
    load_tile<uint16_t, 3, BC, D_PAD, LDS, 128>(src, p.qkv_mode, k0, T, d, nullptr, sK, sV);
    __syncthreads();  // tiles (and, on the first pass, sQ) visible to every warp

    // S = Q K^T for the warp's 16 rows x BC keys.
    float s[NT_S][4];
#pragma unroll
    for (int i = 0; i < NT_S; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D_PAD / 16; ++kk) {
      uint32_t a[4];
      ldsm_x4(a, a_rowmajor_addr(sQ, LDS, warp * 16, kk * 16, lane));
#pragma unroll
      for (int nb = 0; nb < BC / 16; ++nb) {
        uint32_t b[4];
        ldsm_x4(b, b_nk_addr(sK, LDS, nb * 16, kk * 16, lane));  // K tile is [key = n][channel = k]
        Mma<scalar_t>::run(s[2 * nb], a, b[0], b[1]);
        Mma<scalar_t>::run(s[2 * nb + 1], a, b[2], b[3]);
      }
    }

    // Keys beyond T get -inf (2^-inf = 0 below); only the last key tile can hold such keys.
    if (k0 + BC > T) {
#pragma unroll
      for (int nt = 0; nt < NT_S; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (k0 + nt * 8 + 2 * tq + (e & 1) >= T) s[nt][e] = -INFINITY;
        }
      }
    }

    // Online softmax update on the raw logits: m is the row max of q.k, and the scale goes into one FFMA per
    // element, P = 2^(s c - m c) with c = log2(e)/sqrt(d). Each key tile holds at least one valid key
    // (k0 < T), so m_new is finite.
    const float c = p.scale_log2;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < NT_S; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m_run[r], mx);
      const float alpha = fast_exp2((m_run[r] - m_new) * c);  // 0 on the first tile (m_run = -inf)
      m_run[r] = m_new;
      const float mc = m_new * c;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < NT_S; ++nt) {
        const float p0 = fast_exp2(fmaf(s[nt][2 * r], c, -mc));
        const float p1 = fast_exp2(fmaf(s[nt][2 * r + 1], c, -mc));
        s[nt][2 * r] = p0;
        s[nt][2 * r + 1] = p1;
        sum += p0 + p1;
      }
      l_run[r] = l_run[r] * alpha + sum;
#pragma unroll
      for (int nt = 0; nt < NT_O; ++nt) {
        o[nt][2 * r] *= alpha;
        o[nt][2 * r + 1] *= alpha;
      }
    }

    // O += P V: P (16 x BC) from registers as the A operand, V tile [key = k][channel = n] via .trans.
#pragma unroll
    for (int kk = 0; kk < BC / 16; ++kk) {
      uint32_t a[4];
      acc_to_a<scalar_t>(a, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
      for (int nb = 0; nb < D_PAD / 16; ++nb) {
        uint32_t b[4];
        ldsm_x4_trans(b, b_kn_addr(sV, LDS, nb * 16, kk * 16, lane));
        Mma<scalar_t>::run(o[2 * nb], a, b[0], b[1]);
        Mma<scalar_t>::run(o[2 * nb + 1], a, b[2], b[3]);
      }
    }
  }

  // Epilogue: full row sums, normalise, store out[n, h*d + c, t] and lse[bh, t].
  float inv_l[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_run[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    inv_l[r] = 1.f / l;  // l >= 1: the row maximum contributes 2^0
    const int t = q0 + warp * 16 + g + 8 * r;
    if (tq == 0 && t < T) p.lse[static_cast<int64_t>(bh) * T + t] = fmaf(m_run[r], p.scale_log2, log2f(l)) * kLn2;
  }
  uint16_t* out = static_cast<uint16_t*>(p.out) + n * p.out_s.n + static_cast<int64_t>(h) * d * p.out_s.c;
#pragma unroll
  for (int nt = 0; nt < NT_O; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int c = nt * 8 + 2 * tq + (e & 1);
      const int t = q0 + warp * 16 + g + 8 * (e >> 1);
      if (c < d && t < T) out[c * p.out_s.c + static_cast<int64_t>(t) * p.out_s.t] = E::from_f(o[nt][e] * inv_l[e >> 1]);
    }
  }
}

template <typename scalar_t, int D_PAD>
void launch_fwd_tc_impl(const FwdParams& p, int64_t n_heads_total, cudaStream_t stream) {
  using Cfg = FwdTile<D_PAD>;
  FwdParams q = p;
  q.n_qtiles = (p.T + Cfg::BR - 1) / Cfg::BR;
  const int64_t blocks = n_heads_total * q.n_qtiles;
  if (blocks == 0) return;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "attention_fwd: too many CTAs (", blocks, ") for a 1-D grid");
  auto kernel = edm_attn_fwd_tc_kernel<scalar_t, D_PAD>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes));
  EDM_ATTN_LAUNCH(kernel, static_cast<unsigned>(blocks), Cfg::kThreads, Cfg::kSmemBytes, stream, q);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_fwd_tc_dtype(const FwdParams& p, int64_t n_heads_total, cudaStream_t stream) {
  switch (padded_head_dim(p.d)) {
    case 64: return launch_fwd_tc_impl<scalar_t, 64>(p, n_heads_total, stream);
    case 128: return launch_fwd_tc_impl<scalar_t, 128>(p, n_heads_total, stream);
    default: return launch_fwd_tc_impl<scalar_t, 256>(p, n_heads_total, stream);
  }
}

}  // namespace

void launch_fwd_tc(const FwdParams& p, int64_t n_heads_total, DType dtype, cudaStream_t stream) {
  if (dtype == kF16) return launch_fwd_tc_dtype<__half>(p, n_heads_total, stream);
  return launch_fwd_tc_dtype<__nv_bfloat16>(p, n_heads_total, stream);
}

}  // namespace attn
}  // namespace edm_fast
