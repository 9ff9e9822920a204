// Fused multi-head self-attention backward on tensor cores (fp16 / bf16), plus the two small kernels around it
// (used for every dtype): delta = rowsum(dO * O) before, and dq (fp32 accumulator) -> dqkv after.
//
// Algorithm: FlashAttention-2 recomputation. With S = Q K^T / sqrt(d), P = exp(S - lse) (lse saved by the
// forward), delta_i = sum_c dO[i][c] O[i][c]:
//   dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta),   dK = dS^T Q / sqrt(d),   dQ = dS K / sqrt(d).
// One CTA owns a tile of BC = 64 keys (K, V resident in shared memory) and a chunk of DC output channels, and
// loops over query tiles of BQ = 32: it recomputes S^T and dP^T for its keys (rows = keys, so the results are
// directly the A operands of dV and dK), accumulates dK and dV in registers, stages dS^T in shared memory and
// adds its share of dQ to an fp32 [N*heads, T, d] buffer with atomicAdd. The T x T matrices never reach global
// memory. Precision: all products accumulate in fp32; P and dS enter the second-level products in the I/O
// dtype (as NVlabs' weights do); softmax recomputation and dS are fp32.
//
// Grid mapping (tensor-core kernel): 1-D grid, block b -> chunk = b % n_chunks, key tile = (b / n_chunks) %
// n_ktiles, n*heads + h = b / (n_chunks * n_ktiles). 128 threads = 4 warps. Warp w owns keys 16w..16w+15 of the
// tile for S^T, dP^T, dK, dV; for dQ warp w computes query rows 16(w % 2).. x channel half w / 2 of the chunk.
// Shared memory: K, V [BC][LDS], Q, dO [BQ][LDS], dS^T [BC][BQ + 8], lse and delta [BQ] (fp32).
//
// Limits: d % 8 == 0 and 8 <= d <= 256 (padded head dims 64 / 128 / 256; d > 128 runs two channel chunks of
// 128, which recompute S and dP once more), any T >= 1, sm_80 or newer. dq is nondeterministic in its last
// bits (atomic fp32 accumulation order); out, dk and dv are deterministic.
#include "attention/attention_common.cuh"
#include "attention/attention_kernels.cuh"

namespace edm_fast {
namespace attn {
namespace {

template <int D_PAD>
struct BwdTile {
  static constexpr int kThreads = 128;
  static constexpr int BC = 64;                     // keys per CTA, 16 per warp
  static constexpr int BQ = 32;                     // queries per iteration
  static constexpr int DC = D_PAD > 64 ? 128 : 64;  // output channels per CTA
  static constexpr int LDS = D_PAD + 8;             // pitch of K, V, Q, dO tiles (elements)
  static constexpr int LDS_DS = BQ + 8;             // pitch of the dS^T tile (elements; 80 bytes: conflict-free)
  static constexpr int kSmemBytes = (2 * BC + 2 * BQ) * LDS * 2 + BC * LDS_DS * 2 + 2 * BQ * 4;
  static_assert(D_PAD % DC == 0 && DC % 32 == 0, "chunking");
};

// At d <= 64 ask for 3 resident CTAs (<= 168 registers, no spills with nvcc 13); larger head dims need up to 255.
template <typename scalar_t, int D_PAD>
__global__ void __launch_bounds__(128, D_PAD == 64 ? 3 : 1) edm_attn_bwd_tc_kernel(const BwdParams p) {
  using Cfg = BwdTile<D_PAD>;
  constexpr int BC = Cfg::BC, BQ = Cfg::BQ, DC = Cfg::DC, LDS = Cfg::LDS, LDS_DS = Cfg::LDS_DS;
  constexpr int NT_Q = BQ / 8;    // query n-tiles of S^T / dP^T per warp
  constexpr int NT_C = DC / 8;    // channel n-tiles of dK / dV per warp
  constexpr int NT_DQ = DC / 16;  // channel n-tiles of dQ per warp (half the chunk)
  using E = Elem<scalar_t>;

  unsigned char* smem_raw = dynamic_smem();
  uint16_t* sK = reinterpret_cast<uint16_t*>(smem_raw);
  uint16_t* sV = sK + BC * LDS;
  uint16_t* sQ = sV + BC * LDS;
  uint16_t* sdO = sQ + BQ * LDS;
  uint16_t* sdS = sdO + BQ * LDS;  // dS^T: [key][query]
  float* sLse = reinterpret_cast<float*>(sdS + BC * LDS_DS);  // base-2 lse of the tile's queries
  float* sDelta = sLse + BQ;

  const int chunk = blockIdx.x % p.n_chunks;
  const int rest = blockIdx.x / p.n_chunks;
  const int ktile = rest % p.n_ktiles;
  const int bh = rest / p.n_ktiles;
  const int n = bh / p.heads, h = bh % p.heads;
  const int k0 = ktile * BC;
  const int c_base = chunk * DC;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, tq = lane & 3;
  const int T = p.T, d = p.d;

  const HeadSrc<uint16_t> qkv{static_cast<const uint16_t*>(p.qkv) + n * p.qkv_s.n +
                                  static_cast<int64_t>(h) * 3 * d * p.qkv_s.c,
                              3 * p.qkv_s.c, p.qkv_s.c, p.qkv_s.t};
  const HeadSrc<uint16_t> dout{static_cast<const uint16_t*>(p.dout) + n * p.dout_s.n +
                                   static_cast<int64_t>(h) * d * p.dout_s.c,
                               p.dout_s.c, 0, p.dout_s.t};
  load_tile<uint16_t, 3, BC, D_PAD, LDS, 128>(qkv, p.qkv_mode, k0, T, d, nullptr, sK, sV);

  float dk[NT_C][4], dv[NT_C][4];
#pragma unroll
  for (int i = 0; i < NT_C; ++i) {
    dk[i][0] = dk[i][1] = dk[i][2] = dk[i][3] = 0.f;
    dv[i][0] = dv[i][1] = dv[i][2] = dv[i][3] = 0.f;
  }
  const int key0 = k0 + warp * 16 + g;  // this thread's key rows: key0 (e = 0, 1) and key0 + 8 (e = 2, 3)

  for (int q0 = 0; q0 < T; q0 += BQ) {
    __syncthreads();  // the previous iteration is done with sQ, sdO, sdS, sLse, sDelta
    load_tile<uint16_t, 3, BQ, D_PAD, LDS, 128>(qkv, p.qkv_mode, q0, T, d, sQ, nullptr, nullptr);
    load_tile<uint16_t, 1, BQ, D_PAD, LDS, 128>(dout, p.dout_mode, q0, T, d, sdO, nullptr, nullptr);
    for (int i = threadIdx.x; i < BQ; i += Cfg::kThreads) {
      const int t = q0 + i;
      sLse[i] = t < T ? p.lse[static_cast<int64_t>(bh) * T + t] * kLog2e : 0.f;
      sDelta[i] = t < T ? p.delta[static_cast<int64_t>(bh) * T + t] : 0.f;
    }
    __syncthreads();

    // S^T = K Q^T and dP^T = V dO^T for the warp's 16 keys x BQ queries.
    float st[NT_Q][4], dpt[NT_Q][4];
#pragma unroll
    for (int i = 0; i < NT_Q; ++i) {
      st[i][0] = st[i][1] = st[i][2] = st[i][3] = 0.f;
      dpt[i][0] = dpt[i][1] = dpt[i][2] = dpt[i][3] = 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < D_PAD / 16; ++kk) {
      uint32_t ak[4], av[4];
      ldsm_x4(ak, a_rowmajor_addr(sK, LDS, warp * 16, kk * 16, lane));
      ldsm_x4(av, a_rowmajor_addr(sV, LDS, warp * 16, kk * 16, lane));
#pragma unroll
      for (int nb = 0; nb < BQ / 16; ++nb) {
        uint32_t bq[4], bo[4];
        ldsm_x4(bq, b_nk_addr(sQ, LDS, nb * 16, kk * 16, lane));  // Q tile is [query = n][channel = k]
        ldsm_x4(bo, b_nk_addr(sdO, LDS, nb * 16, kk * 16, lane));
        Mma<scalar_t>::run(st[2 * nb], ak, bq[0], bq[1]);
        Mma<scalar_t>::run(st[2 * nb + 1], ak, bq[2], bq[3]);
        Mma<scalar_t>::run(dpt[2 * nb], av, bo[0], bo[1]);
        Mma<scalar_t>::run(dpt[2 * nb + 1], av, bo[2], bo[3]);
      }
    }

    // P^T = 2^(S^T log2(e)/sqrt(d) - lse log2(e)) and dS^T = P^T (dP^T - delta). Padded keys and queries are
    // forced to 0 (a padded key has S = 0, and exp(-lse) could overflow).
#pragma unroll
    for (int nt = 0; nt < NT_Q; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = key0 + 8 * (e >> 1);
        const int qc = nt * 8 + 2 * tq + (e & 1);
        const float pv = (key < T && q0 + qc < T) ? fast_exp2(st[nt][e] * p.scale_log2 - sLse[qc]) : 0.f;
        st[nt][e] = pv;
        dpt[nt][e] = pv * (dpt[nt][e] - sDelta[qc]);
      }
    }

    // dV += P^T dO and dK += dS^T Q over the chunk's channels (dO and Q tiles are [query = k][channel = n]).
#pragma unroll
    for (int kk = 0; kk < BQ / 16; ++kk) {
      uint32_t ap[4], ads[4];
      acc_to_a<scalar_t>(ap, st[2 * kk], st[2 * kk + 1]);
      acc_to_a<scalar_t>(ads, dpt[2 * kk], dpt[2 * kk + 1]);
#pragma unroll
      for (int nb = 0; nb < DC / 16; ++nb) {
        uint32_t bo[4], bq[4];
        ldsm_x4_trans(bo, b_kn_addr(sdO, LDS, c_base + nb * 16, kk * 16, lane));
        ldsm_x4_trans(bq, b_kn_addr(sQ, LDS, c_base + nb * 16, kk * 16, lane));
        Mma<scalar_t>::run(dv[2 * nb], ap, bo[0], bo[1]);
        Mma<scalar_t>::run(dv[2 * nb + 1], ap, bo[2], bo[3]);
        Mma<scalar_t>::run(dk[2 * nb], ads, bq[0], bq[1]);
        Mma<scalar_t>::run(dk[2 * nb + 1], ads, bq[2], bq[3]);
      }
    }

    // Stage dS^T (I/O dtype) for dQ = dS K: element (key row, query col) of this thread's fragments.
#pragma unroll
    for (int nt = 0; nt < NT_Q; ++nt) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = warp * 16 + g + 8 * r;
        const int col = nt * 8 + 2 * tq;
        *reinterpret_cast<uint32_t*>(sdS + row * LDS_DS + col) = E::pack2(dpt[nt][2 * r], dpt[nt][2 * r + 1]);
      }
    }
    __syncthreads();

    // dQ (BQ x DC) += dS (BQ x BC) K (BC x DC): A = dS from the [key][query] tile (.trans), B = K [key][channel].
    {
      const int mt = warp & 1;
      const int cw = c_base + (warp >> 1) * (DC / 2);
      float dq[NT_DQ][4];
#pragma unroll
      for (int i = 0; i < NT_DQ; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < BC / 16; ++kk) {
        uint32_t a[4];
        ldsm_x4_trans(a, a_colmajor_addr(sdS, LDS_DS, mt * 16, kk * 16, lane));
#pragma unroll
        for (int nb = 0; nb < DC / 32; ++nb) {
          uint32_t b[4];
          ldsm_x4_trans(b, b_kn_addr(sK, LDS, cw + nb * 16, kk * 16, lane));
          Mma<scalar_t>::run(dq[2 * nb], a, b[0], b[1]);
          Mma<scalar_t>::run(dq[2 * nb + 1], a, b[2], b[3]);
        }
      }
#pragma unroll
      for (int nt = 0; nt < NT_DQ; ++nt) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {  // rows g and g + 8; columns c, c + 1 (c even, d % 8 == 0: both < d or neither)
          const int q = q0 + mt * 16 + g + 8 * r;
          const int c = cw + nt * 8 + 2 * tq;
          if (q < T && c < d)
            atomic_add_pair(p.dq_acc + (static_cast<int64_t>(bh) * T + q) * d + c, dq[nt][2 * r] * p.scale,
                            dq[nt][2 * r + 1] * p.scale);
        }
      }
    }
  }

  // dk and dv of this CTA's keys and channels -> dqkv channels h*3d + 3c + 1 and + 2.
  uint16_t* dqkv = static_cast<uint16_t*>(p.dqkv) + n * p.dqkv_s.n + static_cast<int64_t>(h) * 3 * d * p.dqkv_s.c;
#pragma unroll
  for (int nt = 0; nt < NT_C; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int key = key0 + 8 * (e >> 1);
      const int c = c_base + nt * 8 + 2 * tq + (e & 1);
      if (key < T && c < d) {
        const int64_t off = 3 * c * p.dqkv_s.c + static_cast<int64_t>(key) * p.dqkv_s.t;
        dqkv[off + p.dqkv_s.c] = E::from_f(dk[nt][e] * p.scale);
        dqkv[off + 2 * p.dqkv_s.c] = E::from_f(dv[nt][e]);
      }
    }
  }
}

// delta[bh, t] = sum_c dout[n, h*d + c, t] * out[n, h*d + c, t] in fp32; one thread per (bh, t), t fastest.
template <typename scalar_t>
__global__ void __launch_bounds__(256) edm_attn_bwd_delta_kernel(const DeltaParams p) {
  using E = Elem<scalar_t>;
  using bits_t = typename E::bits;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= p.rows) return;
  const int t = static_cast<int>(row % p.T);
  const int64_t bh = row / p.T;
  const int64_t n = bh / p.heads, h = bh % p.heads;
  const bits_t* dout = static_cast<const bits_t*>(p.dout) + n * p.dout_s.n + h * p.d * p.dout_s.c + t * p.dout_s.t;
  const bits_t* out = static_cast<const bits_t*>(p.out) + n * p.out_s.n + h * p.d * p.out_s.c + t * p.out_s.t;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};  // interleaved partial sums (d % 8 == 0): shorter fp32 rounding chains
  for (int c = 0; c < p.d; c += 4) {
#pragma unroll
    for (int u = 0; u < 4; ++u)
      acc[u] = fmaf(E::to_f(dout[(c + u) * p.dout_s.c]), E::to_f(out[(c + u) * p.out_s.c]), acc[u]);
  }
  p.delta[row] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

// dqkv[n, h*3d + 3c, t] = dq_acc[bh, t, c] in the I/O dtype; one thread per element, ordered so that
// consecutive threads write consecutive addresses of dqkv (t fastest for NCHW, c fastest otherwise).
template <typename scalar_t>
__global__ void __launch_bounds__(256) edm_attn_bwd_dq_kernel(const DqParams p) {
  using E = Elem<scalar_t>;
  using bits_t = typename E::bits;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= p.total) return;
  int t, c;
  int64_t bh;
  if (p.dqkv_s.t == 1) {
    t = static_cast<int>(idx % p.T);
    const int64_t rest = idx / p.T;
    c = static_cast<int>(rest % p.d);
    bh = rest / p.d;
  } else {
    c = static_cast<int>(idx % p.d);
    const int64_t rest = idx / p.d;
    t = static_cast<int>(rest % p.T);
    bh = rest / p.T;
  }
  const int64_t n = bh / p.heads, h = bh % p.heads;
  bits_t* dqkv = static_cast<bits_t*>(p.dqkv);
  dqkv[n * p.dqkv_s.n + (h * 3 * p.d + 3 * c) * p.dqkv_s.c + static_cast<int64_t>(t) * p.dqkv_s.t] =
      E::from_f(p.dq_acc[(bh * p.T + t) * p.d + c]);
}

template <typename scalar_t, int D_PAD>
void launch_bwd_tc_impl(BwdParams p, int64_t n_heads_total, cudaStream_t stream) {
  using Cfg = BwdTile<D_PAD>;
  p.n_ktiles = (p.T + Cfg::BC - 1) / Cfg::BC;
  p.n_chunks = D_PAD / Cfg::DC;
  const int64_t blocks = n_heads_total * p.n_ktiles * p.n_chunks;
  if (blocks == 0) return;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "attention_bwd: too many CTAs (", blocks, ") for a 1-D grid");
  auto kernel = edm_attn_bwd_tc_kernel<scalar_t, D_PAD>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes));
  EDM_ATTN_LAUNCH(kernel, static_cast<unsigned>(blocks), Cfg::kThreads, Cfg::kSmemBytes, stream, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_bwd_tc_dtype(const BwdParams& p, int64_t n_heads_total, cudaStream_t stream) {
  switch (padded_head_dim(p.d)) {
    case 64: return launch_bwd_tc_impl<scalar_t, 64>(p, n_heads_total, stream);
    case 128: return launch_bwd_tc_impl<scalar_t, 128>(p, n_heads_total, stream);
    default: return launch_bwd_tc_impl<scalar_t, 256>(p, n_heads_total, stream);
  }
}

int64_t blocks_of(int64_t items, int threads) { return (items + threads - 1) / threads; }

}  // namespace

void launch_bwd_tc(BwdParams p, int64_t n_heads_total, DType dtype, cudaStream_t stream) {
  if (dtype == kF16) return launch_bwd_tc_dtype<__half>(p, n_heads_total, stream);
  return launch_bwd_tc_dtype<__nv_bfloat16>(p, n_heads_total, stream);
}

void launch_bwd_delta(const DeltaParams& p, DType dtype, cudaStream_t stream) {
  const int64_t blocks = blocks_of(p.rows, 256);
  if (blocks == 0) return;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "attention_bwd: too many rows for the delta kernel");
  if (dtype == kF32) {
    EDM_ATTN_LAUNCH(edm_attn_bwd_delta_kernel<float>, static_cast<unsigned>(blocks), 256, 0, stream, p);
  } else if (dtype == kF16) {
    EDM_ATTN_LAUNCH(edm_attn_bwd_delta_kernel<__half>, static_cast<unsigned>(blocks), 256, 0, stream, p);
  } else {
    EDM_ATTN_LAUNCH(edm_attn_bwd_delta_kernel<__nv_bfloat16>, static_cast<unsigned>(blocks), 256, 0, stream, p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_bwd_dq(const DqParams& p, DType dtype, cudaStream_t stream) {
  const int64_t blocks = blocks_of(p.total, 256);
  if (blocks == 0) return;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "attention_bwd: too many elements for the dq kernel");
  if (dtype == kF32) {
    EDM_ATTN_LAUNCH(edm_attn_bwd_dq_kernel<float>, static_cast<unsigned>(blocks), 256, 0, stream, p);
  } else if (dtype == kF16) {
    EDM_ATTN_LAUNCH(edm_attn_bwd_dq_kernel<__half>, static_cast<unsigned>(blocks), 256, 0, stream, p);
  } else {
    EDM_ATTN_LAUNCH(edm_attn_bwd_dq_kernel<__nv_bfloat16>, static_cast<unsigned>(blocks), 256, 0, stream, p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace attn
}  // namespace edm_fast
