// GroupNorm forward fused with the U-Net neighbours: y = act(shift + group_norm(x + pre_add) * (scale + 1)).
//
// Algorithm: one pass over the tile loads each thread's chunk (v = x + pre_add, rounded to x.dtype as the
// reference adds in x.dtype) and forms the exact two-pass mean/M2 of the chunk in registers; chunks merge
// with Chan's formula (on offsets from one element of the group: group_ref). Group statistics then come from two
// rounds of per-group sums over all threads of the tile (block shared memory, then the cluster's distributed
// shared memory when the tile spans K > 1 blocks):
//   mean0 = sum(v) / count;  corr = sum(v - mean0) / count;  M2 = sum((v - mean0)^2) - count*corr^2
// (the corrected two-pass algorithm: never E[x^2] - E[x]^2, and exact to fp32 rounding even when
// |mean| >> std). The output folds the affine, scale and shift per channel:
//   y = act((v - mean0) * A + B),  A = rstd*w*s1,  B = b*s1 + shift - corr*A,  s1 = scale + 1,
// with w, b and s1 rounded to x.dtype first (the reference casts weight/bias and adds scale + 1 in x.dtype).
// v is centred before scaling: folding mean*A into B would cancel catastrophically when |mean| >> std.
// When the tile fits the registers of its blocks (CHUNKS == 1) x is read from memory once: bytes moved are
// the minimum (x read, y written, plus the [N, G] mean/rstd for the backward).
//
// Grid: N * (G / GPB) tiles x K blocks (cluster dims (K, 1, 1)); mapping in group_norm_common.cuh.
// Small maps with big batches get small blocks (down to one warp) and many of them; few samples with big
// groups get K up to 8 blocks per tile so every SM has work.
// Accumulation: fp32 throughout; inputs fp32/fp16/bf16, parameters fp32, output in x's dtype and layout.
// Limits: at most 512 channels per group (the host wrapper checks), C % G == 0; clusters need sm_90, other
// GPUs use K = 1 and loop over chunks for groups that do not fit one block's registers.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "group_norm/group_norm.h"
#include "group_norm/group_norm_common.cuh"

namespace edm_fast {
namespace gn {

struct FwdArgs {
  Tile t;
  const void* x;
  void* y;
  const float* weight;
  const float* bias;
  const void* add;
  int64_t add_sn, add_sc;
  const void* scale;
  int64_t scale_sn, scale_sc;
  const void* shift;
  int64_t shift_sn, shift_sc;
  float* mean;
  float* rstd;
  float eps;
  bool silu;
};

template <typename T, int VEC, int NV, bool CL>
__global__ void __launch_bounds__(kMaxThreads, 2) group_norm_fwd_kernel(const FwdArgs a) {
  constexpr int PC = CL ? VEC : 1;  // channels per thread
  __shared__ GroupScratch scratch;
  const Tile& t = a.t;
  const int k = blockIdx.x % t.K, tile = blockIdx.x / t.K;
  const int n = tile / t.tiles, g0 = (tile % t.tiles) * t.gpb, c0 = g0 * t.Cg;
  const Lane<VEC, NV, CL> ln(t, n, c0, k, threadIdx.x);
  const T* x = static_cast<const T*>(a.x);

  float add[PC];
#pragma unroll
  for (int e = 0; e < PC; ++e)
    add[e] = (a.add != nullptr && ln.lg >= 0)
                 ? to_float<T>(static_cast<const T*>(a.add)[n * a.add_sn + (ln.c + e) * a.add_sc])
                 : 0.f;

  // Looping tiles (chunks > 1) take their pass-1 statistics on offsets v - ref from one element of their group,
  // its first (x + pre_add at its first channel and pixel). Chan's merge combines per-chunk means, and near a large
  // mean each is rounded to ulp(mean): at mean 1000 and std 1e-2 that error (6e-5) is a few percent of the
  // differences between chunk means, and it made M2, rstd and y wrong by ~5e-5 relative (PyTorch on centred
  // data: 1e-7). Offsets from an element of the group are exact (Sterbenz) and small. Register-resident tiles need
  // no reference (group_ref = 0): their corrected two-pass sums see every value at once. ref is reloaded where it
  // is needed (a cached load) rather than held in a register: the 16-bit vec-8 channels-last kernels are at the
  // 64-register cap (ptxas, sm_90: 16 bytes of spill stores, 12 without the reference, 24 holding it).
  auto group_ref = [&](int lg) {
    if (t.chunks == 1 || lg < 0) return 0.f;
    const int cf = c0 + lg * t.Cg;
    const int64_t first = CL ? static_cast<int64_t>(n) * t.P * t.C + cf : (static_cast<int64_t>(n) * t.C + cf) * t.P;
    float r = to_float<T>(x[first]);
    if (a.add != nullptr)
      r = round_to<T>(r + to_float<T>(static_cast<const T*>(a.add)[n * a.add_sn + cf * a.add_sc]));
    return r;
  };
  float v[NV][VEC];  // x + pre_add (pass 1 of a looping tile: minus ref)
  auto load_chunk = [&](int ch) {
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int p = ln.pos(ch, j);
      if (ln.valid(p)) {
        load_vec<T, VEC>(x + ln.offset(p), v[j]);
        if (a.add != nullptr) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) v[j][e] = round_to<T>(v[j][e] + add[CL ? e : 0]);
        }
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) v[j][e] = 0.f;
      }
    }
  };

  // Pass 1: per-thread count, mean - ref and M2 (exact within a chunk, Chan's merge across chunks).
  float cnt = 0.f, mean = 0.f, m2 = 0.f;
  for (int ch = 0; ch < t.chunks; ++ch) {
    load_chunk(ch);
    if (t.chunks > 1) {  // reloaded per chunk (cached) rather than kept live: registers are what limits occupancy
      const float ref = group_ref(ln.lg);
#pragma unroll
      for (int j = 0; j < NV; ++j) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) v[j][e] -= ref;
      }
    }
    int nvalid = 0;
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      if (ln.valid(ln.pos(ch, j))) {
        ++nvalid;
#pragma unroll
        for (int e = 0; e < VEC; ++e) s += v[j][e];
      }
    }
    if (nvalid == 0) continue;
    const float cb = static_cast<float>(nvalid * VEC), mb = s / cb;
    float m2b = 0.f;
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      if (ln.valid(ln.pos(ch, j))) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) m2b += (v[j][e] - mb) * (v[j][e] - mb);
      }
    }
    const float total = cnt + cb, delta = mb - mean;
    mean += delta * (cb / total);
    m2 += m2b + delta * delta * (cnt * cb / total);
    cnt = total;
  }

  // Group statistics over the tile's blocks, corrected two-pass: mean0 = sum / count first, then
  // corr = sum(v - mean0) / count recovers the rounding error of that sum (it matters in fp32 when
  // |mean| >> std) and M2 = sum (v - mean0)^2 - count * corr^2. Register-resident tiles form both sums from
  // the values themselves; looping ones from each thread's (count, mean, M2). Means are offsets from ref.
  group_sums(cnt, cnt * mean, ln.lg, t.gpb, t.K, scratch);
  const int lg = ln.lg >= 0 ? ln.lg : 0;
  const float g_count = scratch.tot[0][lg];
  const float g_mean0 = scratch.tot[1][lg] / g_count;
  float own_count = 1.f, own_mean0 = 0.f;  // threads tid < gpb report group tid
  if (threadIdx.x < static_cast<unsigned>(t.gpb)) {
    own_count = scratch.tot[0][threadIdx.x];
    own_mean0 = scratch.tot[1][threadIdx.x] / own_count;
  }
  float sq = 0.f, lin = 0.f;
  if (t.chunks == 1) {
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      if (ln.valid(ln.pos(0, j))) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float d = v[j][e] - g_mean0;
          sq += d * d;
          lin += d;
        }
      }
    }
  } else {
    const float dm = mean - g_mean0;
    sq = m2 + cnt * dm * dm;
    lin = cnt * dm;
  }
  group_sums(sq, lin, ln.lg, t.gpb, t.K, scratch);
  const float g_corr = scratch.tot[1][lg] / g_count;
  const float g_rstd = rsqrtf(fmaxf(scratch.tot[0][lg] - g_count * g_corr * g_corr, 0.f) / g_count + a.eps);
  if (k == 0 && threadIdx.x < static_cast<unsigned>(t.gpb)) {
    const float corr = scratch.tot[1][threadIdx.x] / own_count;
    const float m2_own = fmaxf(scratch.tot[0][threadIdx.x] - own_count * corr * corr, 0.f);
    const int64_t i = static_cast<int64_t>(n) * t.G + g0 + threadIdx.x;
    a.mean[i] = group_ref(threadIdx.x) + (own_mean0 + corr);
    a.rstd[i] = rsqrtf(m2_own / own_count + a.eps);
  }
  if (ln.lg < 0) return;  // no barrier follows

  // gm = ref + g_mean0 as one fp32 number and gm_lo, what that rounding dropped (TwoSum, exact): pass 2 centres on
  // gm (v - gm is exact near the mean) and adds gm_lo to the correction. Resident (ref = 0): gm = g_mean0, gm_lo = 0.
  const float ref = group_ref(ln.lg);
  const float gm = ref + g_mean0, gm_b = gm - ref, gm_lo = (ref - (gm - gm_b)) + (g_mean0 - gm_b);

  // Pass 2: y = act((v - gm) * A + B) per channel.
  float A[PC], B[PC];
#pragma unroll
  for (int e = 0; e < PC; ++e) {
    const int c = ln.c + e;
    const float w = round_to<T>(a.weight[c]), b = round_to<T>(a.bias[c]);
    float s1 = 1.f, sh = 0.f;
    if (a.scale != nullptr) {
      s1 = round_to<T>(to_float<T>(static_cast<const T*>(a.scale)[n * a.scale_sn + c * a.scale_sc]) + 1.f);
      sh = to_float<T>(static_cast<const T*>(a.shift)[n * a.shift_sn + c * a.shift_sc]);
    }
    A[e] = g_rstd * w * s1;
    B[e] = b * s1 + sh - (g_corr + gm_lo) * A[e];  // the mean is gm + g_corr + gm_lo
  }
  T* y = static_cast<T*>(a.y);
  for (int ch = 0; ch < t.chunks; ++ch) {
    if (t.chunks > 1) load_chunk(ch);
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int p = ln.pos(ch, j);
      if (!ln.valid(p)) continue;
      float out[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float u = (v[j][e] - gm) * A[CL ? e : 0] + B[CL ? e : 0];
        out[e] = a.silu ? u * sigmoid<T>(u) : u;
      }
      store_vec<T, VEC>(y + ln.offset(p), out);
    }
  }
}

template <typename T, int VEC>
void launch_fwd_vec(const Plan& p, const FwdArgs& args, bool cl, cudaStream_t stream) {
  constexpr int NV = fwd_items<T>() / VEC;
  if (cl)
    launch_tiles(group_norm_fwd_kernel<T, VEC, NV, true>, p, stream, args);
  else
    launch_tiles(group_norm_fwd_kernel<T, VEC, NV, false>, p, stream, args);
}

template <typename T>
void launch_fwd(const Plan& p, const FwdArgs& args, bool cl, cudaStream_t stream) {
  bool launched = true;
  switch (p.vec) {
    case 8:
      if constexpr (sizeof(T) == 2) launch_fwd_vec<T, 8>(p, args, cl, stream);
      else launched = false;
      break;
    case 4: launch_fwd_vec<T, 4>(p, args, cl, stream); break;
    case 2: launch_fwd_vec<T, 2>(p, args, cl, stream); break;
    case 1: launch_fwd_vec<T, 1>(p, args, cl, stream); break;
    default: launched = false;
  }
  TORCH_CHECK(launched, "group_norm_fwd: no kernel for vector width ", p.vec);
}

}  // namespace gn

void group_norm_fwd_cuda(const GroupNormFwdParams& p) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(p.s.device));
  const gn::DeviceInfo dev = gn::device_info(p.s.device);
  const int esize = static_cast<int>(c10::elementSize(p.s.dtype));
  const void* ptrs[2] = {p.x, p.y};
  const gn::Plan plan = gn::make_plan(p.s, esize, gn::max_vec_for(esize, ptrs, 2),
                                      esize == 4 ? gn::fwd_items<float>() : gn::fwd_items<__half>(), dev);
  gn::FwdArgs args{};
  args.t = plan.t;
  args.x = p.x;
  args.y = p.y;
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
  args.eps = static_cast<float>(p.eps);
  args.silu = p.silu;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(p.s.device));
  EDM_DISPATCH_FLOATING(p.s.dtype, "group_norm_fwd",
                        [&] { gn::launch_fwd<scalar_t>(plan, args, p.s.channels_last, stream); });
}

}  // namespace edm_fast
