// Shared by group_norm_fwd.cu and group_norm_bwd.cu: the tile mapping (host plan + per-thread view),
// vector loads, and the per-group block/cluster sum. See group_norm_fwd.cu for the algorithm.
//
// Work unit: a "tile" = GPB whole groups of one sample, i.e. CW = GPB*Cg channels over all P = H*W pixels,
// handled by K thread blocks (a thread-block cluster on sm_90 when K > 1). Every thread keeps a fixed set of
// channels, so per-channel parameters are loaded once and per-channel sums need no segmented search:
//   channels-last: the tile is a [P rows x CW columns] matrix (row stride C). Thread t owns the vector
//     column cv = t % CWV (VEC channels, CWV = CW/VEC) and walks rows r0 = t / CWV, r0 + RT, ... of its
//     block's row range (RT = threads / CWV); block k of the tile owns rows [k*RB, (k+1)*RB).
//   NCHW: the tile is CW contiguous channel rows of P pixels (PV = P/VEC vectors). Each row is cut into
//     SEGS segments of SL vectors; a "unit" (row, segment) is walked by TPR consecutive lanes (TPR a power of
//     two <= 32, so a unit never straddles a warp); a block holds UB = threads/TPR units.
// A thread's positions come in chunks of NV vectors; with CHUNKS == 1 the whole tile sits in registers
// (x is read once), otherwise it is read again per pass (from L2 for the sizes of the U-Nets).
#pragma once

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include <c10/cuda/CUDAException.h>

#include "common/dispatch.h"
#include "common/reduce.cuh"
#include "group_norm/group_norm.h"

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
#define EDM_GN_HAS_CLUSTERS 1
#endif

namespace edm_fast {
namespace gn {

constexpr int kMaxThreads = 512;    // block size limit; registers: <= 64 in the forward (two blocks per SM), <= 128 in the backward
constexpr int kMaxTileGroups = 32;  // groups per tile (shared-memory arrays are sized by it)
constexpr int kMaxCluster = 8;      // portable thread-block cluster size on sm_90

// Elements held per thread per chunk: two 16-byte loads in the forward (~64 registers, two 512-thread blocks
// per SM so one block's loads overlap another's reduction); the backward keeps du and xhat.
template <typename T> constexpr int fwd_items() { return sizeof(T) == 4 ? 8 : 16; }
template <typename T> constexpr int bwd_items() { return sizeof(T) == 4 ? 8 : 16; }

struct Tile {
  int N, C, G, P, Cg;
  int gpb;     // groups per tile
  int tiles;   // tiles per sample (G / gpb)
  int K;       // blocks per tile (cluster size when > 1)
  int chunks;  // chunks per thread (1: register resident)
  // channels-last
  int cwv;  // vector columns per tile
  int rt;   // rows per step (threads / cwv)
  int rb;   // rows per block (ceil(P / K))
  // NCHW
  int pv;    // vectors per channel row
  int tpr;   // lanes per (row, segment) unit
  int segs;  // segments per row
  int sl;    // vectors per segment
  int ub;    // units per block
};

struct Plan {
  Tile t;
  int vec;
  int threads;
  int64_t blocks;
  int splits;  // partial sums per (n, c) written by the backward (K for channels-last, SEGS for NCHW)
};

inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }
inline int round_up32(int v) { return (v + 31) / 32 * 32; }
__host__ __device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
inline int pow2_ceil(int v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

// Largest vector width (elements, <= 16 bytes) that every pointer's alignment allows.
inline int max_vec_for(int esize, const void* const* ptrs, int count) {
  int bytes = 16;
  for (int i = 0; i < count; ++i) {
    const auto a = reinterpret_cast<uintptr_t>(ptrs[i]);
    while (bytes > esize && (a % bytes) != 0) bytes >>= 1;
  }
  return std::max(1, bytes / esize);
}

inline void plan_channels_last(Plan& p, int nv, int esize, int sms, int kmax) {
  Tile& t = p.t;
  const int vec = p.vec;
  auto k_needed = [&](int cwv) { return ceil_div(t.P, static_cast<int64_t>(kMaxThreads / cwv) * nv); };
  const bool one_resident = k_needed(t.Cg / vec) <= kmax;
  // Neighbouring groups share the 32-byte sectors of a pixel row: widen the tile to rows of 32-64 bytes,
  // as long as a register-resident group stays resident and there are enough blocks for every SM; once
  // rows reach a sector, do not pay for wider ones with more blocks per tile.
  int gpb = 1, k_cur = k_needed(t.Cg / vec);
  for (int d = 2; d <= std::min(t.G, kMaxTileGroups); ++d) {
    if (t.G % d) continue;
    const int cw = d * t.Cg;
    if (cw * esize > 64 || cw / vec > kMaxThreads) break;
    const int k = k_needed(cw / vec);
    if (one_resident && k > kmax) break;
    if (gpb * t.Cg * esize >= 32 && k > k_cur) break;
    if (static_cast<int64_t>(t.N) * (t.G / d) * std::min(k, kmax) < 2 * sms) break;
    gpb = d;
    k_cur = k;
  }
  t.gpb = gpb;
  const int cw = gpb * t.Cg;
  t.cwv = cw / vec;
  int K = std::max(1, std::min(kmax, k_needed(t.cwv)));
  // Few samples: spread a tile over more blocks (the cluster) while each keeps >= 2048 elements.
  while (K < kmax && static_cast<int64_t>(t.N) * (t.G / gpb) * K < 2 * sms &&
         static_cast<int64_t>(ceil_div(t.P, K + 1)) * cw >= 2048)
    ++K;
  t.K = K;
  t.rb = ceil_div(t.P, K);
  const int threads = std::min(kMaxThreads, round_up32(ceil_div(t.rb, nv) * t.cwv));
  t.rt = threads / t.cwv;
  t.chunks = ceil_div(t.rb, static_cast<int64_t>(t.rt) * nv);
  p.threads = threads;
  p.splits = K;
}

inline void plan_nchw(Plan& p, int nv, int sms, int kmax) {
  Tile& t = p.t;
  // Tiny groups (1x1 and 2x2 maps) share a tile; otherwise one group per tile.
  int gpb = 1;
  for (int d = 2; d <= std::min(t.G, kMaxTileGroups); ++d) {
    if (t.G % d) continue;
    if (static_cast<int64_t>(d) * t.Cg * t.P > 2048 || d * t.Cg > kMaxThreads) break;
    if (static_cast<int64_t>(t.N) * (t.G / d) < 2 * sms) break;
    gpb = d;
  }
  t.gpb = gpb;
  const int cw = gpb * t.Cg;
  t.pv = t.P / p.vec;
  int tpr = std::min(32, pow2_ceil(t.pv));
  while (tpr > 1 && static_cast<int64_t>(cw) * tpr > static_cast<int64_t>(kmax) * kMaxThreads) tpr >>= 1;
  t.tpr = tpr;
  const int64_t tiles = static_cast<int64_t>(t.N) * (t.G / gpb);
  int threads = kMaxThreads, K = kmax, segs = 1;
  bool resident = false;
  // Register-resident if possible; with few tiles, fewer vectors per thread (more segments, more blocks).
  for (int nve = nv;; nve /= 2) {
    const int s = ceil_div(t.pv, static_cast<int64_t>(tpr) * nve);
    const int64_t units = static_cast<int64_t>(cw) * s;
    const int k = ceil_div(units * tpr, kMaxThreads);
    if (k > kmax) break;
    resident = true;
    segs = s;
    K = k;
    threads = std::min(kMaxThreads, round_up32(ceil_div(units, k) * tpr));
    if (tiles * k >= 2 * sms || nve == 1 || k == kmax) break;
  }
  if (!resident) {  // loop over chunks with every block of the cluster full
    threads = kMaxThreads;
    segs = std::max(1, K * (threads / tpr) / cw);
  }
  t.ub = threads / tpr;
  t.segs = segs;
  t.K = ceil_div(static_cast<int64_t>(cw) * segs, t.ub);
  t.sl = ceil_div(t.pv, segs);
  t.chunks = ceil_div(t.sl, static_cast<int64_t>(tpr) * nv);
  p.threads = threads;
  p.splits = segs;
}

struct DeviceInfo {
  int sms = 0;   // streaming multiprocessors
  int kmax = 1;  // largest number of blocks per tile: the portable cluster size on sm_90+, else 1
};

inline DeviceInfo device_info(int device) {
  static DeviceInfo cache[64];  // filled once per device; a racing second fill writes the same values
  TORCH_CHECK(device >= 0 && device < 64, "group_norm: unexpected CUDA device index ", device);
  DeviceInfo& d = cache[device];
  if (d.sms == 0) {
    int sms = 0, major = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    d.kmax = major >= 9 ? kMaxCluster : 1;
    d.sms = sms;
  }
  return d;
}

// max_vec: from the pointers' alignment; items: elements per thread per chunk.
inline Plan make_plan(const GroupNormShape& s, int esize, int max_vec, int items, const DeviceInfo& dev) {
  Plan p{};
  Tile& t = p.t;
  t.N = static_cast<int>(s.N);
  t.C = static_cast<int>(s.C);
  t.G = static_cast<int>(s.G);
  t.P = static_cast<int>(s.P);
  t.Cg = t.C / t.G;
  int vec = max_vec;
  while (vec > 1 && ((s.channels_last ? t.Cg : t.P) % vec) != 0) vec >>= 1;
  p.vec = vec;
  if (s.channels_last)
    plan_channels_last(p, items / vec, esize, dev.sms, dev.kmax);
  else
    plan_nchw(p, items / vec, dev.sms, dev.kmax);
  t.tiles = t.G / t.gpb;
  p.blocks = static_cast<int64_t>(t.N) * t.tiles * t.K;
  return p;
}

// ---- device side ------------------------------------------------------------------------------------------

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[VEC]) {
  const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int e = 0; e < VEC; ++e) out[e] = to_float<T>(pk.v[e]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[VEC]) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int e = 0; e < VEC; ++e) pk.v[e] = from_float<T>(in[e]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
}

// The reference casts parameters to x.dtype and adds in x.dtype: round an fp32 value the same way.
template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return to_float<T>(from_float<T>(v));
}

template <typename T>
__device__ __forceinline__ float sigmoid(float u) {
  if constexpr (sizeof(T) == 4) return 1.f / (1.f + expf(-u));
  else return __fdividef(1.f, 1.f + __expf(-u));  // outputs are rounded to 8-11 bits anyway
}

// One thread's positions in its tile (see the top of the file). Host-callable so the mapping can be
// checked exhaustively on a machine without a GPU.
template <int VEC, int NV, bool CL>
struct Lane {
  int lg = -1;  // local group in the tile; -1 for an idle thread
  int c = 0;    // first channel of the thread
  int seg = 0;  // NCHW: segment of the unit
  int first = 0, end = 0, stride = 0, chunk_step = 0;
  int64_t base = 0, pos_scale = 0;

  __host__ __device__ Lane(const Tile& t, int n, int c0, int k, int tid) {
    if constexpr (CL) {
      if (tid < t.rt * t.cwv) {
        const int cv = tid % t.cwv, r0 = tid / t.cwv;
        lg = cv * VEC / t.Cg;
        c = c0 + cv * VEC;
        first = k * t.rb + r0;
        end = imin(t.P, (k + 1) * t.rb);
        stride = t.rt;
        chunk_step = t.rt * NV;
        base = static_cast<int64_t>(n) * t.P * t.C + c;
        pos_scale = t.C;
      }
    } else {
      const int u = k * t.ub + tid / t.tpr;
      if (u < t.gpb * t.Cg * t.segs) {
        const int row = u / t.segs;
        seg = u % t.segs;
        lg = row / t.Cg;
        c = c0 + row;
        first = seg * t.sl + tid % t.tpr;
        end = imin(t.pv, (seg + 1) * t.sl);
        stride = t.tpr;
        chunk_step = t.tpr * NV;
        base = (static_cast<int64_t>(n) * t.C + c) * t.P;
        pos_scale = VEC;
      }
    }
  }
  __host__ __device__ __forceinline__ int pos(int ch, int j) const { return first + ch * chunk_step + j * stride; }
  __host__ __device__ __forceinline__ bool valid(int p) const { return lg >= 0 && p < end; }
  __host__ __device__ __forceinline__ int64_t offset(int p) const { return base + p * pos_scale; }
};

struct GroupScratch {
  float red[2][kMaxThreads];
  int lgs[kMaxThreads];
  float part[2][kMaxTileGroups];
  float tot[2][kMaxTileGroups];
};

// Per-group sums of (a, b) over every thread of the tile (all K blocks); results in s.tot[0|1][lg], the same
// in every block. Fixed summation order (lane-strided, shuffle tree, cluster ranks 0..K-1): deterministic.
__device__ __forceinline__ void group_sums(float a, float b, int lg, int gpb, int K, GroupScratch& s) {
  const int tid = threadIdx.x, nthreads = blockDim.x;
  s.red[0][tid] = lg >= 0 ? a : 0.f;
  s.red[1][tid] = lg >= 0 ? b : 0.f;
  s.lgs[tid] = lg;
  __syncthreads();
  const int warp = tid >> 5, lane = tid & 31, warps = nthreads >> 5;
  for (int g = warp; g < gpb; g += warps) {
    float sa = 0.f, sb = 0.f;
    for (int i = lane; i < nthreads; i += 32) {
      if (s.lgs[i] == g) {
        sa += s.red[0][i];
        sb += s.red[1][i];
      }
    }
    sa = warp_sum(sa);
    sb = warp_sum(sb);
    if (lane == 0) {
      s.part[0][g] = sa;
      s.part[1][g] = sb;
    }
  }
  if (K > 1) {
#ifdef EDM_GN_HAS_CLUSTERS
    namespace cg = cooperative_groups;
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();  // every block's partials are written and visible cluster-wide
    if (tid < gpb) {
      float sa = 0.f, sb = 0.f;
      for (int r = 0; r < K; ++r) {
        const GroupScratch* remote = cluster.map_shared_rank(&s, r);
        sa += remote->part[0][tid];
        sb += remote->part[1][tid];
      }
      s.tot[0][tid] = sa;
      s.tot[1][tid] = sb;
    }
    cluster.sync();  // no block reuses (or exits with) its partials while another still reads them
#else
    __trap();  // the host plans K > 1 only on devices with thread-block clusters
#endif
  } else {
    __syncthreads();
    if (tid < gpb) {
      s.tot[0][tid] = s.part[0][tid];
      s.tot[1][tid] = s.part[1][tid];
    }
  }
  __syncthreads();
}

// Launch with cluster dims (K, 1, 1) when a tile spans several blocks.
template <typename Kernel, typename Args>
void launch_tiles(Kernel kernel, const Plan& p, cudaStream_t stream, const Args& args) {
  const dim3 grid(static_cast<unsigned>(p.blocks)), block(p.threads);
  if (p.t.K > 1) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = 0;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = p.t.K;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, args));
  } else {
    kernel<<<grid, block, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace gn
}  // namespace edm_fast
