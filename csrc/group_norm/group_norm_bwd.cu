// GroupNorm backward for y = act(shift + group_norm(x + pre_add) * (scale + 1)), then the parameter gradients.
//
// Algorithm (per tile, same mapping as the forward: group_norm_common.cuh):
//   pass 1  recompute v = x + pre_add, xhat = (v - mean)*rstd, u = (xhat*w + b)*s1 + shift and
//           du = dy * silu'(u) (or dy), with w, b, s1 = scale + 1 rounded to x.dtype as in the forward; each
//           thread sums per channel S1 = sum du and S2 = sum du*xhat over its positions.
//   group   the means of dxhat = du*w*s1 and dxhat*xhat over the group follow from the channel sums:
//           m1 = sum_c w*s1*S1 / count, m2 = sum_c w*s1*S2 / count (block, then cluster sums);
//   pass 2  dx = rstd * (w*s1*du - m1 - xhat*m2), stored in x's layout; S3 = sum dx per channel when the
//           pre-add needs a gradient.
//   S1, S2, S3 leave the tile as per-(n, c, split) partials in an fp32 workspace (each written exactly once,
//   no atomics). group_norm_param_grad_kernel then reduces them in a fixed order:
//     dweight = sum_n s1*S2, dbias = sum_n s1*S1, dscale = w*S2 + b*S1, dshift = S1, dpre_add = S3,
//   summing dscale/dshift/dpre_add over the batch when those inputs were broadcast ([1, C, 1, 1]).
// When a tile fits its blocks' registers (CHUNKS == 1) x and dy are read once; otherwise pass 2 reads them
// again. Grid: as the forward; the parameter kernel uses one 32-channel x 32-sample block per 32 channels.
// Accumulation: fp32; gradients of x, pre_add, scale, shift in x's dtype, of weight and bias in fp32.
// Deterministic: every sum has a fixed order. Limits: as the forward (<= 512 channels per group).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "group_norm/group_norm.h"
#include "group_norm/group_norm_common.cuh"

namespace edm_fast {
namespace gn {

struct BwdArgs {
  Tile t;
  const void* dy;
  const void* x;
  void* dx;
  const float* weight;
  const float* bias;
  const void* add;
  int64_t add_sn, add_sc;
  const void* scale;
  int64_t scale_sn, scale_sc;
  const void* shift;
  int64_t shift_sn, shift_sc;
  const float* mean;
  const float* rstd;
  float* ws1;  // [N, C, splits] partial sums of du, du*xhat and dx
  float* ws2;
  float* ws3;  // null when the pre-add needs no gradient
  int splits;
  bool silu;
};

// Per-channel partials of the tile to ws[(n*C + c)*splits + split].
template <int VEC, int NV, bool CL>
__device__ __forceinline__ void channel_partials(const float (&v)[CL ? VEC : 1], const Lane<VEC, NV, CL>& ln,
                                                 const Tile& t, int n, int c0, int k, int splits, float* colbuf,
                                                 float* ws) {
  if constexpr (CL) {
    // Threads sharing a vector column (one per row of a step) add up in shared memory, in row order.
    const int tid = threadIdx.x;
#pragma unroll
    for (int e = 0; e < VEC; ++e) colbuf[tid * VEC + e] = ln.lg >= 0 ? v[e] : 0.f;
    __syncthreads();
    const int cw = t.gpb * t.Cg;
    for (int col = tid; col < cw; col += blockDim.x) {
      const int cv = col / VEC, e = col % VEC;
      float s = 0.f;
      for (int r = 0; r < t.rt; ++r) s += colbuf[(r * t.cwv + cv) * VEC + e];
      ws[(static_cast<int64_t>(n) * t.C + c0 + col) * splits + k] = s;
    }
    __syncthreads();
  } else {
    // A (row, segment) unit is TPR aligned lanes of one warp: a shuffle tree over them.
    float s = v[0];
    for (int off = t.tpr >> 1; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (ln.lg >= 0 && (threadIdx.x % t.tpr) == 0) ws[(static_cast<int64_t>(n) * t.C + ln.c) * splits + ln.seg] = s;
  }
}

template <typename T, int VEC, int NV, bool CL>
__global__ void __launch_bounds__(kMaxThreads, 1) group_norm_bwd_kernel(const BwdArgs a) {
  constexpr int PC = CL ? VEC : 1;
  __shared__ GroupScratch scratch;
  __shared__ float colbuf[CL ? kMaxThreads * VEC : 1];
  const Tile& t = a.t;
  const int k = blockIdx.x % t.K, tile = blockIdx.x / t.K;
  const int n = tile / t.tiles, g0 = (tile % t.tiles) * t.gpb, c0 = g0 * t.Cg;
  const Lane<VEC, NV, CL> ln(t, n, c0, k, threadIdx.x);
  const T* x = static_cast<const T*>(a.x);
  const T* dy = static_cast<const T*>(a.dy);

  float add[PC], w[PC], b[PC], s1[PC], sh[PC];
#pragma unroll
  for (int e = 0; e < PC; ++e) {
    add[e] = 0.f;
    w[e] = 0.f;
    b[e] = 0.f;
    s1[e] = 1.f;
    sh[e] = 0.f;
    if (ln.lg < 0) continue;
    const int c = ln.c + e;
    w[e] = round_to<T>(a.weight[c]);
    b[e] = round_to<T>(a.bias[c]);
    if (a.add != nullptr) add[e] = to_float<T>(static_cast<const T*>(a.add)[n * a.add_sn + c * a.add_sc]);
    if (a.scale != nullptr) {
      s1[e] = round_to<T>(to_float<T>(static_cast<const T*>(a.scale)[n * a.scale_sn + c * a.scale_sc]) + 1.f);
      sh[e] = to_float<T>(static_cast<const T*>(a.shift)[n * a.shift_sn + c * a.shift_sc]);
    }
  }
  const int64_t gi = static_cast<int64_t>(n) * t.G + g0 + (ln.lg >= 0 ? ln.lg : 0);
  const float mu = a.mean[gi], rs = a.rstd[gi];

  float du[NV][VEC], xh[NV][VEC];
  auto compute_chunk = [&](int ch) {
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int p = ln.pos(ch, j);
      if (ln.valid(p)) {
        float xv[VEC];
        load_vec<T, VEC>(x + ln.offset(p), xv);
        load_vec<T, VEC>(dy + ln.offset(p), du[j]);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const int q = CL ? e : 0;
          const float v = a.add != nullptr ? round_to<T>(xv[e] + add[q]) : xv[e];
          xh[j][e] = (v - mu) * rs;
          if (a.silu) {
            const float u = (xh[j][e] * w[q] + b[q]) * s1[q] + sh[q];
            const float sg = sigmoid<T>(u);
            du[j][e] *= sg * (1.f + u * (1.f - sg));
          }
        }
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) du[j][e] = xh[j][e] = 0.f;
      }
    }
  };

  // Pass 1: channel sums of du and du*xhat.
  float cs1[PC], cs2[PC];
#pragma unroll
  for (int e = 0; e < PC; ++e) cs1[e] = cs2[e] = 0.f;
  for (int ch = 0; ch < t.chunks; ++ch) {
    compute_chunk(ch);
#pragma unroll
    for (int j = 0; j < NV; ++j) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        cs1[CL ? e : 0] += du[j][e];
        cs2[CL ? e : 0] += du[j][e] * xh[j][e];
      }
    }
  }
  float g1 = 0.f, g2 = 0.f;
#pragma unroll
  for (int e = 0; e < PC; ++e) {
    g1 += w[e] * s1[e] * cs1[e];
    g2 += w[e] * s1[e] * cs2[e];
  }
  group_sums(g1, g2, ln.lg, t.gpb, t.K, scratch);
  const float inv_count = 1.f / (static_cast<float>(t.Cg) * static_cast<float>(t.P));
  const int lg = ln.lg >= 0 ? ln.lg : 0;
  const float m1 = scratch.tot[0][lg] * inv_count, m2 = scratch.tot[1][lg] * inv_count;
  channel_partials<VEC, NV, CL>(cs1, ln, t, n, c0, k, a.splits, colbuf, a.ws1);
  channel_partials<VEC, NV, CL>(cs2, ln, t, n, c0, k, a.splits, colbuf, a.ws2);

  // Pass 2: dx (and its channel sums for the pre-add gradient).
  T* dx = static_cast<T*>(a.dx);
  float cs3[PC];
#pragma unroll
  for (int e = 0; e < PC; ++e) cs3[e] = 0.f;
  for (int ch = 0; ch < t.chunks; ++ch) {
    if (t.chunks > 1) compute_chunk(ch);
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int p = ln.pos(ch, j);
      if (!ln.valid(p)) continue;
      float out[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const int q = CL ? e : 0;
        out[e] = rs * (w[q] * s1[q] * du[j][e] - m1 - xh[j][e] * m2);
        cs3[q] += out[e];
      }
      store_vec<T, VEC>(dx + ln.offset(p), out);
    }
  }
  if (a.ws3 != nullptr) channel_partials<VEC, NV, CL>(cs3, ln, t, n, c0, k, a.splits, colbuf, a.ws3);
}

struct ParamArgs {
  int N, C, splits;
  const float* ws1;
  const float* ws2;
  const float* ws3;
  const float* weight;
  const float* bias;
  const void* scale;
  int64_t scale_sn, scale_sc;
  float* dweight;
  float* dbias;
  void* dscale;
  void* dshift;
  void* dadd;
  bool scale_bcast, shift_bcast, add_bcast;
};

constexpr int kParamChannels = 32, kParamSamples = 32;

template <typename T>
__global__ void __launch_bounds__(kParamChannels* kParamSamples) group_norm_param_grad_kernel(const ParamArgs a) {
  __shared__ float red[5][kParamSamples][kParamChannels];
  const int c = blockIdx.x * kParamChannels + threadIdx.x;
  const bool ok = c < a.C;
  float acc[5] = {0.f, 0.f, 0.f, 0.f, 0.f};  // dweight, dbias, dscale, dshift, dpre_add (broadcast sums)
  if (ok) {
    const float w = round_to<T>(a.weight[c]), b = round_to<T>(a.bias[c]);
#pragma unroll 4
    for (int n = threadIdx.y; n < a.N; n += kParamSamples) {  // unrolled: several samples' loads in flight
      const int64_t i = (static_cast<int64_t>(n) * a.C + c) * a.splits;
      float S1 = 0.f, S2 = 0.f;
      for (int s = 0; s < a.splits; ++s) {
        S1 += a.ws1[i + s];
        S2 += a.ws2[i + s];
      }
      float k1 = 1.f;
      if (a.scale != nullptr) {
        k1 = round_to<T>(to_float<T>(static_cast<const T*>(a.scale)[n * a.scale_sn + c * a.scale_sc]) + 1.f);
        const float ds = w * S2 + b * S1;
        if (a.scale_bcast) acc[2] += ds;
        else static_cast<T*>(a.dscale)[static_cast<int64_t>(n) * a.C + c] = from_float<T>(ds);
        if (a.shift_bcast) acc[3] += S1;
        else static_cast<T*>(a.dshift)[static_cast<int64_t>(n) * a.C + c] = from_float<T>(S1);
      }
      acc[0] += k1 * S2;
      acc[1] += k1 * S1;
      if (a.ws3 != nullptr) {
        float S3 = 0.f;
        for (int s = 0; s < a.splits; ++s) S3 += a.ws3[i + s];
        if (a.add_bcast) acc[4] += S3;
        else static_cast<T*>(a.dadd)[static_cast<int64_t>(n) * a.C + c] = from_float<T>(S3);
      }
    }
  }
#pragma unroll
  for (int q = 0; q < 5; ++q) red[q][threadIdx.y][threadIdx.x] = acc[q];
  __syncthreads();
  if (threadIdx.y != 0 || !ok) return;
#pragma unroll
  for (int q = 0; q < 5; ++q) {
    float s = 0.f;
    for (int r = 0; r < kParamSamples; ++r) s += red[q][r][threadIdx.x];
    acc[q] = s;
  }
  a.dweight[c] = acc[0];
  a.dbias[c] = acc[1];
  if (a.scale != nullptr && a.scale_bcast) static_cast<T*>(a.dscale)[c] = from_float<T>(acc[2]);
  if (a.scale != nullptr && a.shift_bcast) static_cast<T*>(a.dshift)[c] = from_float<T>(acc[3]);
  if (a.ws3 != nullptr && a.add_bcast) static_cast<T*>(a.dadd)[c] = from_float<T>(acc[4]);
}

template <typename T, int VEC>
void launch_bwd_vec(const Plan& p, const BwdArgs& args, bool cl, cudaStream_t stream) {
  constexpr int NV = bwd_items<T>() / VEC;
  if (cl)
    launch_tiles(group_norm_bwd_kernel<T, VEC, NV, true>, p, stream, args);
  else
    launch_tiles(group_norm_bwd_kernel<T, VEC, NV, false>, p, stream, args);
}

template <typename T>
void launch_bwd(const Plan& p, const BwdArgs& args, const ParamArgs& pargs, bool cl, cudaStream_t stream) {
  bool launched = true;
  switch (p.vec) {
    case 8:
      if constexpr (sizeof(T) == 2) launch_bwd_vec<T, 8>(p, args, cl, stream);
      else launched = false;
      break;
    case 4: launch_bwd_vec<T, 4>(p, args, cl, stream); break;
    case 2: launch_bwd_vec<T, 2>(p, args, cl, stream); break;
    case 1: launch_bwd_vec<T, 1>(p, args, cl, stream); break;
    default: launched = false;
  }
  TORCH_CHECK(launched, "group_norm_bwd: no kernel for vector width ", p.vec);
  const dim3 grid((pargs.C + kParamChannels - 1) / kParamChannels), block(kParamChannels, kParamSamples);
  group_norm_param_grad_kernel<T><<<grid, block, 0, stream>>>(pargs);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

inline Plan bwd_plan(const GroupNormShape& s, const void* dy, const void* x, const void* dx) {
  const int esize = static_cast<int>(c10::elementSize(s.dtype));
  const void* ptrs[3] = {dy, x, dx};
  return make_plan(s, esize, max_vec_for(esize, ptrs, 3),
                   esize == 4 ? bwd_items<float>() : bwd_items<__half>(), device_info(s.device));
}

}  // namespace gn

int64_t group_norm_bwd_workspace(const GroupNormShape& s, const void* dy, const void* x, const void* dx) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(s.device));
  return s.N * s.C * gn::bwd_plan(s, dy, x, dx).splits;
}

void group_norm_bwd_cuda(const GroupNormBwdParams& p) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(p.s.device));
  const gn::Plan plan = gn::bwd_plan(p.s, p.dy, p.x, p.dx);
  const int64_t ws_size = p.s.N * p.s.C * plan.splits;
  gn::BwdArgs args{};
  args.t = plan.t;
  args.dy = p.dy;
  args.x = p.x;
  args.dx = p.dx;
  args.weight = p.weight;
  args.bias = p.bias;
  args.add = p.pre_add.data;
  args.add_sn = p.pre_add.sn;
  args.add_sc = p.pre_add.sc;
  args.scale = p.scale.data;
  args.scale_sn = p.scale.sn;
  args.scale_sc = p.scale.sc;
  args.shift = p.shift.data;
  args.shift_sn = p.shift.sn;
  args.shift_sc = p.shift.sc;
  args.mean = p.mean;
  args.rstd = p.rstd;
  args.ws1 = p.workspace;
  args.ws2 = p.workspace + ws_size;
  args.ws3 = p.dpre_add != nullptr ? p.workspace + 2 * ws_size : nullptr;
  args.splits = plan.splits;
  args.silu = p.silu;

  gn::ParamArgs pargs{};
  pargs.N = static_cast<int>(p.s.N);
  pargs.C = static_cast<int>(p.s.C);
  pargs.splits = plan.splits;
  pargs.ws1 = args.ws1;
  pargs.ws2 = args.ws2;
  pargs.ws3 = args.ws3;
  pargs.weight = p.weight;
  pargs.bias = p.bias;
  pargs.scale = p.scale.data;
  pargs.scale_sn = p.scale.sn;
  pargs.scale_sc = p.scale.sc;
  pargs.dweight = p.dweight;
  pargs.dbias = p.dbias;
  pargs.dscale = p.dscale;
  pargs.dshift = p.dshift;
  pargs.dadd = p.dpre_add;
  pargs.scale_bcast = p.scale_bcast;
  pargs.shift_bcast = p.shift_bcast;
  pargs.add_bcast = p.pre_add_bcast;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(p.s.device));
  EDM_DISPATCH_FLOATING(p.s.dtype, "group_norm_bwd",
                        [&] { gn::launch_bwd<scalar_t>(plan, args, pargs, p.s.channels_last, stream); });
}

}  // namespace edm_fast
