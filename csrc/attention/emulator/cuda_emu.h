// Attention-specific part of the CPU CUDA emulator: the warp-collective tensor-core operations (ldmatrix,
// mma.sync) and the launch/shared-memory hooks that csrc/attention/*.cu call under EDM_ATTN_EMULATE (see
// attention_common.cuh). Everything generic -- threads, CTAs, warps, shuffles, 16-bit floats, the runtime and
// c10 API -- is the common emulator, csrc/common/emulator/cuda_emu.h. Built by g++ with -DEDM_ATTN_EMULATE
// (attention_emulator.cc, tests/ops/test_attention.py); not part of any real build.
//
// Warp-collective operations exchange their operands through the warp's per-lane slots between two barriers
// over the warp and then evaluate the PTX semantics (fragment layouts from the PTX ISA, as documented in
// attention_common.cuh):
//   ldmatrix.x4: lanes 8i..8i+7 give the row addresses of matrix i; plain: lane l gets row l/4, elements
//                2(l%4), 2(l%4)+1; .trans: rows 2(l%4), 2(l%4)+1 of element l/4. Addresses must be 16-byte
//                aligned rows inside the CTA's dynamic shared memory (checked).
//   mma.m16n8k16: A/B/C rebuilt from all 32 lanes' registers, D = A B + C with exact products (fp64 sum).
#pragma once
#ifndef EDM_ATTN_EMULATE
#error "attention/emulator/cuda_emu.h is only for the CPU emulation build (-DEDM_ATTN_EMULATE)"
#endif
#ifndef EDM_CUDA_EMULATE
#define EDM_CUDA_EMULATE 1
#endif

#include "common/emulator/cuda_emu.h"

namespace edm_fast {
namespace attn {
namespace emu {

using ::edm_fast::emu::cta_smem;
using ::edm_fast::emu::fatal;
using ::edm_fast::emu::lane_id;
using ::edm_fast::emu::this_cta;
using ::edm_fast::emu::this_warp;
using ::edm_fast::emu::Warp;

// One-dimensional launch with dynamic shared memory, CTAs one after another.
template <typename Params>
void launch(void (*kernel)(Params), unsigned blocks, unsigned threads, size_t smem_bytes, const Params& params) {
  ::edm_fast::emu::launch(kernel, dim3(blocks), dim3(threads), smem_bytes, dim3(1, 1, 1), params);
}

inline void check_aligned16(const void* p, const char* file, int line) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) fatal(file, ":", line, ": 16-byte access at misaligned address ", p);
}

inline float exp2_approx(float x) { return std::exp2(x); }

inline void check_smem_row(const uint16_t* p) {
  const unsigned char* base = cta_smem();
  const unsigned char* q = reinterpret_cast<const unsigned char*>(p);
  if (q < base || q + 16 > base + this_cta().dyn_size) fatal("ldmatrix row address outside the CTA's shared memory");
  if ((q - base) % 16 != 0) fatal("ldmatrix row address not 16-byte aligned");
}

inline const uint16_t* slot_ptr(const Warp& w, int lane) {
  const uint16_t* p;
  std::memcpy(&p, w.slot[lane], sizeof(p));
  return p;
}

inline void ldmatrix_x4(uint32_t (&r)[4], const uint16_t* p, bool trans) {
  Warp& w = this_warp();
  const int l = static_cast<int>(lane_id());
  check_smem_row(p);
  std::memcpy(w.slot[l], &p, sizeof(p));
  w.sync();
  for (int i = 0; i < 4; ++i) {
    uint32_t lo, hi;
    if (!trans) {
      const uint16_t* row = slot_ptr(w, 8 * i + l / 4);
      lo = row[2 * (l % 4)];
      hi = row[2 * (l % 4) + 1];
    } else {
      lo = slot_ptr(w, 8 * i + 2 * (l % 4))[l / 4];
      hi = slot_ptr(w, 8 * i + 2 * (l % 4) + 1)[l / 4];
    }
    r[i] = lo | (hi << 16);
  }
  w.sync();
}

inline float half_bits_to_float(uint32_t bits, bool bf16) {
  return bf16 ? __bfloat162float(__nv_bfloat16{static_cast<uint16_t>(bits)})
              : __half2float(__half{static_cast<uint16_t>(bits)});
}

inline void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16) {
  Warp& w = this_warp();
  const int l = static_cast<int>(lane_id());
  const uint32_t regs[6] = {a[0], a[1], a[2], a[3], b0, b1};  // a[0..3], b[0..1] in the lane's slot
  std::memcpy(w.slot[l], regs, sizeof(regs));
  w.sync();
  float A[16][16], B[16][8];
  for (int s = 0; s < 32; ++s) {
    uint32_t ra[6];
    std::memcpy(ra, w.slot[s], sizeof(ra));
    const int g = s / 4, q = s % 4;
    auto lo = [&](uint32_t v) { return half_bits_to_float(v & 0xFFFFu, bf16); };
    auto hi = [&](uint32_t v) { return half_bits_to_float(v >> 16, bf16); };
    A[g][2 * q] = lo(ra[0]);
    A[g][2 * q + 1] = hi(ra[0]);
    A[g + 8][2 * q] = lo(ra[1]);
    A[g + 8][2 * q + 1] = hi(ra[1]);
    A[g][2 * q + 8] = lo(ra[2]);
    A[g][2 * q + 9] = hi(ra[2]);
    A[g + 8][2 * q + 8] = lo(ra[3]);
    A[g + 8][2 * q + 9] = hi(ra[3]);
    B[2 * q][g] = lo(ra[4]);
    B[2 * q + 1][g] = hi(ra[4]);
    B[2 * q + 8][g] = lo(ra[5]);
    B[2 * q + 9][g] = hi(ra[5]);
  }
  w.sync();
  const int g = l / 4, q = l % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e >> 1), col = 2 * q + (e & 1);
    double acc = c[e];
    for (int k = 0; k < 16; ++k) acc += static_cast<double>(A[row][k]) * B[k][col];
    c[e] = static_cast<float>(acc);
  }
}

}  // namespace emu
}  // namespace attn
}  // namespace edm_fast
