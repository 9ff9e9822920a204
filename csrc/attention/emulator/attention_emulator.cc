// Runs the real attention kernels and launchers (csrc/attention/*.cu, compiled as C++ on top of cuda_emu.h) on
// the CPU, for tests/ops/test_attention.py on machines without a GPU. Build (the test does this):
//   g++ -std=c++20 -O0 -pthread -fsanitize=address -DEDM_ATTN_EMULATE -Icsrc \
//       csrc/attention/emulator/attention_emulator.cc -o attention_emulator
// Usage: attention_emulator IN OUT. IN holds a header of int64 values and the raw input buffers; OUT receives the
// raw output buffers (layout below; written by the test). Every buffer is allocated with exactly its size, so
// AddressSanitizer reports any out-of-bounds global or shared-memory access; outputs start as NaN bit patterns,
// so an element the kernels forget to write stays NaN.
//
// IN:  magic 0xA77E, op (0 forward, 1 backward), dtype (0 f32, 1 f16, 2 bf16), N, heads, d, T, qkv_mode, dout_mode,
//      then for each of qkv, out, dout, dqkv: strides n, c, t, storage elements, storage offset (elements);
//      then the qkv storage; backward only: out storage, dout storage, lse [N*heads*T] float32.
// OUT: forward: out storage, lse; backward: dqkv storage.
#ifndef EDM_ATTN_EMULATE
#define EDM_ATTN_EMULATE 1
#endif

#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>

#include "common/emulator/driver_io.h"
#include "attention/attention_bwd.cu"
#include "attention/attention_fp32.cu"
#include "attention/attention_fwd.cu"
#include "attention/attention_launch.cu"

namespace {

using namespace edm_fast::attn;

struct Buffer {
  Strides s{};
  int64_t elems = 0, offset = 0;
  std::vector<unsigned char> bytes;
  void* data(size_t elem_size) { return bytes.data() + offset * elem_size; }
};

int64_t read_i64(std::istream& in) { return edm_fast::emu::read_value<int64_t>(in); }

void read_layout(std::istream& in, Buffer& b) {
  b.s.n = read_i64(in);
  b.s.c = read_i64(in);
  b.s.t = read_i64(in);
  b.elems = read_i64(in);
  b.offset = read_i64(in);
}

void alloc(Buffer& b, size_t elem_size) { b.bytes.assign(static_cast<size_t>(b.elems) * elem_size, 0xFF); }

using edm_fast::emu::read_bytes;

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: attention_emulator IN OUT\n";
    return 2;
  }
  try {
    std::ifstream in(argv[1], std::ios::binary);
    if (read_i64(in) != 0xA77E) throw std::runtime_error("bad magic");
    const int64_t op = read_i64(in), dtype = read_i64(in);
    const int64_t N = read_i64(in), heads = read_i64(in), d = read_i64(in), T = read_i64(in);
    const int qkv_mode = static_cast<int>(read_i64(in)), dout_mode = static_cast<int>(read_i64(in));
    Buffer qkv, out, dout, dqkv;
    read_layout(in, qkv);
    read_layout(in, out);
    read_layout(in, dout);
    read_layout(in, dqkv);
    const size_t es = dtype == kF32 ? 4 : 2;
    alloc(qkv, es);
    read_bytes(in, qkv.bytes.data(), qkv.bytes.size());
    std::ofstream out_file(argv[2], std::ios::binary);
    if (op == 0) {
      alloc(out, es);
      std::vector<float> lse(static_cast<size_t>(N * heads * T));
      std::memset(lse.data(), 0xFF, lse.size() * 4);
      FwdParams p{};
      p.qkv = qkv.data(es);
      p.qkv_s = qkv.s;
      p.qkv_mode = qkv_mode;
      p.out = out.data(es);
      p.out_s = out.s;
      p.lse = lse.data();
      p.heads = static_cast<int>(heads);
      p.d = static_cast<int>(d);
      p.T = static_cast<int>(T);
      p.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
      p.scale_log2 = static_cast<float>(1.4426950408889634 / std::sqrt(static_cast<double>(d)));
      run_forward(p, N * heads, static_cast<DType>(dtype), 0);
      out_file.write(reinterpret_cast<const char*>(out.bytes.data()), static_cast<std::streamsize>(out.bytes.size()));
      out_file.write(reinterpret_cast<const char*>(lse.data()), static_cast<std::streamsize>(lse.size() * 4));
    } else {
      alloc(out, es);
      alloc(dout, es);
      alloc(dqkv, es);
      read_bytes(in, out.bytes.data(), out.bytes.size());
      read_bytes(in, dout.bytes.data(), dout.bytes.size());
      std::vector<float> lse(static_cast<size_t>(N * heads * T));
      read_bytes(in, lse.data(), lse.size() * 4);
      std::vector<float> delta(lse.size());
      std::memset(delta.data(), 0xFF, delta.size() * 4);
      std::vector<float> dq_acc(static_cast<size_t>(N * heads * T * d), 0.f);

      DeltaParams dp{};
      dp.dout = dout.data(es);
      dp.dout_s = dout.s;
      dp.out = out.data(es);
      dp.out_s = out.s;
      dp.delta = delta.data();
      dp.heads = static_cast<int>(heads);
      dp.d = static_cast<int>(d);
      dp.T = static_cast<int>(T);
      dp.rows = N * heads * T;
      BwdParams p{};
      p.qkv = qkv.data(es);
      p.qkv_s = qkv.s;
      p.qkv_mode = qkv_mode;
      p.dout = dout.data(es);
      p.dout_s = dout.s;
      p.dout_mode = dout_mode;
      p.lse = lse.data();
      p.delta = delta.data();
      p.dqkv = dqkv.data(es);
      p.dqkv_s = dqkv.s;
      p.dq_acc = dq_acc.data();
      p.heads = dp.heads;
      p.d = dp.d;
      p.T = dp.T;
      p.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
      p.scale_log2 = static_cast<float>(1.4426950408889634 / std::sqrt(static_cast<double>(d)));
      DqParams qp{};
      qp.dq_acc = dq_acc.data();
      qp.dqkv = p.dqkv;
      qp.dqkv_s = dqkv.s;
      qp.heads = p.heads;
      qp.d = p.d;
      qp.T = p.T;
      qp.total = N * heads * T * d;
      run_backward(dp, p, qp, N * heads, static_cast<DType>(dtype), 0);
      out_file.write(reinterpret_cast<const char*>(dqkv.bytes.data()), static_cast<std::streamsize>(dqkv.bytes.size()));
    }
    if (!out_file) throw std::runtime_error("could not write the output file");
  } catch (const std::exception& e) {
    std::cerr << "attention_emulator: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
