// Runs the real GroupNorm host entry points and kernels (csrc/group_norm/*.cu, compiled as C++ on the CPU CUDA
// emulator, csrc/common/emulator/) for tests/ops/test_group_norm_emulated.py: group_norm_fwd_cuda, then
// group_norm_bwd_workspace + group_norm_bwd_cuda on the forward's own mean/rstd, as autograd would call them.
// Built by tests/cuda_emulator.py with AddressSanitizer, -DEDM_CUDA_EMULATE and -DEDM_GN_HAS_CLUSTERS (the
// sm_90 device pass; EDM_EMU_CC_MAJOR=8 makes the emulated device pre-sm_90, so the planner uses kmax = 1).
// Every buffer is allocated with exactly its size (ASan reports any access outside); outputs and the workspace
// start as NaN bit patterns, so an element the kernels forget to write stays NaN.
//
// Usage: group_norm_emulator IN OUT [--plan-only]. Little-endian 8-byte fields, then raw buffers:
// IN:  magic 0x6E01, dtype (0 f32, 1 f16, 2 bf16), N, C, P (= H*W), G, channels_last, silu, need_pre_add_grad,
//      eps (float64), storage offsets (elements) of x, y, dy, dx; for each of pre_add, scale, shift: present,
//      sample stride (0 when broadcast), channel stride, storage elements, broadcast ([1, C]);
//      then x storage, weight [C] f32, bias [C] f32, pre_add/scale/shift storage (when present), dy storage.
// OUT: y [N*C*P], mean [N*G] f32, rstd [N*G] f32, dx [N*C*P], dweight [C] f32, dbias [C] f32, then, in x's dtype,
//      dpre_add [(1 or N)*C] (when wanted), dscale and dshift [(1 or N)*C] (when present).
// stdout: the plans of both directions and every launch (kernel, grid, block, cluster), for the test to check
// which planner branches ran; the driver itself checks that each launch matches its plan. --plan-only prints
// the plans of both directions and runs nothing.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "common/emulator/driver_io.h"
#include "group_norm/group_norm.h"
#include "group_norm/group_norm_common.cuh"

namespace {

using namespace edm_fast;

struct Reader {
  std::ifstream in;
  int64_t i64() { return emu::read_value<int64_t>(in); }
  double f64() { return emu::read_value<double>(in); }
  void bytes(std::vector<unsigned char>& dst) { emu::read_bytes(in, dst.data(), dst.size()); }
};

std::vector<unsigned char> poisoned(size_t bytes) { return std::vector<unsigned char>(bytes, 0xFF); }

struct Channel {
  bool present = false, bcast = false;
  int64_t sn = 0, sc = 0;
  std::vector<unsigned char> storage;
  ChannelInput input() const {
    ChannelInput c;
    if (present) {
      c.data = storage.data();
      c.sn = sn;
      c.sc = sc;
    }
    return c;
  }
};

void print_plan(const char* dir, const gn::Plan& p, bool cl) {
  const gn::Tile& t = p.t;
  std::printf("plan %s cl=%d vec=%d gpb=%d K=%d chunks=%d threads=%d blocks=%lld splits=%d cwv=%d rt=%d rb=%d "
              "pv=%d tpr=%d segs=%d sl=%d ub=%d\n",
              dir, cl ? 1 : 0, p.vec, t.gpb, t.K, t.chunks, p.threads, static_cast<long long>(p.blocks), p.splits,
              t.cwv, t.rt, t.rb, t.pv, t.tpr, t.segs, t.sl, t.ub);
}

// The launches since `first`: print them; the first must be the plan's tile kernel.
void check_launches(size_t first, size_t count, const gn::Plan& p) {
  const auto& log = emu::launch_log();
  if (log.size() != first + count) throw std::runtime_error("unexpected number of kernel launches");
  for (size_t i = first; i < log.size(); ++i) {
    const auto& r = log[i];
    std::printf("launch grid=%u block=%ux%u cluster=%u static_smem=%zu kernel=%s\n", r.grid.x, r.block.x, r.block.y,
                r.cluster.x, r.static_smem, r.kernel.c_str());
  }
  const auto& r = log[first];
  if (r.grid.x != p.blocks || r.block.x != static_cast<unsigned>(p.threads) ||
      r.cluster.x != static_cast<unsigned>(p.t.K))
    throw std::runtime_error("the tile kernel's launch does not match its plan");
}

void write(std::ofstream& out, const void* p, size_t bytes) {
  out.write(static_cast<const char*>(p), static_cast<std::streamsize>(bytes));
}

}  // namespace

int main(int argc, char** argv) {
  const bool plan_only = argc == 4 && std::string(argv[3]) == "--plan-only";
  if (argc != 3 && !plan_only) {
    std::cerr << "usage: group_norm_emulator IN OUT [--plan-only]\n";
    return 2;
  }
  try {
    Reader rd{std::ifstream(argv[1], std::ios::binary)};
    if (rd.i64() != 0x6E01) throw std::runtime_error("bad magic");
    const int64_t dtype = rd.i64(), N = rd.i64(), C = rd.i64(), P = rd.i64(), G = rd.i64();
    const bool cl = rd.i64() != 0, silu = rd.i64() != 0, need_dadd = rd.i64() != 0;
    const double eps = rd.f64();
    const int64_t x_off = rd.i64(), y_off = rd.i64(), dy_off = rd.i64(), dx_off = rd.i64();
    Channel ch[3];  // pre_add, scale, shift
    for (auto& c : ch) {
      c.present = rd.i64() != 0;
      c.sn = rd.i64();
      c.sc = rd.i64();
      c.storage.resize(static_cast<size_t>(rd.i64()) * (dtype == 0 ? 4 : 2));
      c.bcast = rd.i64() != 0;
    }
    const c10::ScalarType st = dtype == 0 ? c10::ScalarType::Float
                               : dtype == 1 ? c10::ScalarType::Half : c10::ScalarType::BFloat16;
    const size_t es = c10::elementSize(st), numel = static_cast<size_t>(N * C * P);
    std::vector<unsigned char> x((x_off + numel) * es), weight(C * 4), bias(C * 4), dy((dy_off + numel) * es);
    rd.bytes(x);
    rd.bytes(weight);
    rd.bytes(bias);
    for (auto& c : ch) rd.bytes(c.storage);
    rd.bytes(dy);

    const GroupNormShape s{N, C, P, G, cl, st, 0};
    auto y = poisoned((y_off + numel) * es), mean = poisoned(N * G * 4), rstd = poisoned(N * G * 4);
    GroupNormFwdParams fp{};
    fp.s = s;
    fp.x = x.data() + x_off * es;
    fp.y = y.data() + y_off * es;
    fp.weight = reinterpret_cast<const float*>(weight.data());
    fp.bias = reinterpret_cast<const float*>(bias.data());
    fp.pre_add = ch[0].input();
    fp.scale = ch[1].input();
    fp.shift = ch[2].input();
    fp.mean = reinterpret_cast<float*>(mean.data());
    fp.rstd = reinterpret_cast<float*>(rstd.data());
    fp.eps = eps;
    fp.silu = silu;
    // The plan group_norm_fwd_cuda makes (the same calls), printed and checked against the launch.
    const gn::DeviceInfo dev = gn::device_info(0);
    const void* fptrs[2] = {fp.x, fp.y};
    const gn::Plan fplan = gn::make_plan(s, static_cast<int>(es), gn::max_vec_for(static_cast<int>(es), fptrs, 2),
                                         es == 4 ? gn::fwd_items<float>() : gn::fwd_items<__half>(), dev);
    std::printf("device sms=%d kmax=%d\n", dev.sms, dev.kmax);
    print_plan("fwd", fplan, cl);
    if (plan_only) {  // dx's buffer would be allocated like y's (16-byte aligned)
      const void* ptrs[3] = {dy.data() + dy_off * es, fp.x, y.data() + dx_off * es};
      print_plan("bwd", gn::make_plan(s, static_cast<int>(es), gn::max_vec_for(static_cast<int>(es), ptrs, 3),
                                      es == 4 ? gn::bwd_items<float>() : gn::bwd_items<__half>(), dev), cl);
      return 0;
    }
    size_t first = emu::launch_log().size();
    group_norm_fwd_cuda(fp);
    check_launches(first, 1, fplan);

    auto dx = poisoned((dx_off + numel) * es);
    const int64_t ws = group_norm_bwd_workspace(s, dy.data() + dy_off * es, x.data() + x_off * es,
                                                dx.data() + dx_off * es);
    std::vector<float> workspace(static_cast<size_t>((need_dadd && ch[0].present ? 3 : 2) * ws));
    std::memset(workspace.data(), 0xFF, workspace.size() * 4);
    auto dweight = poisoned(C * 4), dbias = poisoned(C * 4);
    const bool want_dadd = need_dadd && ch[0].present;
    auto dadd = poisoned(want_dadd ? (ch[0].bcast ? 1 : N) * C * es : 0);
    auto dscale = poisoned(ch[1].present ? (ch[1].bcast ? 1 : N) * C * es : 0);
    auto dshift = poisoned(ch[2].present ? (ch[2].bcast ? 1 : N) * C * es : 0);
    GroupNormBwdParams bp{};
    bp.s = s;
    bp.dy = dy.data() + dy_off * es;
    bp.x = fp.x;
    bp.dx = dx.data() + dx_off * es;
    bp.weight = fp.weight;
    bp.bias = fp.bias;
    bp.pre_add = fp.pre_add;
    bp.scale = fp.scale;
    bp.shift = fp.shift;
    bp.mean = fp.mean;
    bp.rstd = fp.rstd;
    bp.silu = silu;
    bp.workspace = workspace.data();
    bp.dweight = reinterpret_cast<float*>(dweight.data());
    bp.dbias = reinterpret_cast<float*>(dbias.data());
    bp.dpre_add = want_dadd ? dadd.data() : nullptr;
    bp.pre_add_bcast = want_dadd && ch[0].bcast;
    bp.dscale = ch[1].present ? dscale.data() : nullptr;
    bp.scale_bcast = ch[1].present && ch[1].bcast;
    bp.dshift = ch[2].present ? dshift.data() : nullptr;
    bp.shift_bcast = ch[2].present && ch[2].bcast;
    const void* bptrs[3] = {bp.dy, bp.x, bp.dx};
    const gn::Plan bplan = gn::make_plan(s, static_cast<int>(es), gn::max_vec_for(static_cast<int>(es), bptrs, 3),
                                         es == 4 ? gn::bwd_items<float>() : gn::bwd_items<__half>(), dev);
    print_plan("bwd", bplan, cl);
    if (ws != N * C * bplan.splits) throw std::runtime_error("workspace size does not match the backward plan");
    first = emu::launch_log().size();
    group_norm_bwd_cuda(bp);
    check_launches(first, 2, bplan);

    std::ofstream out(argv[2], std::ios::binary);
    write(out, y.data() + y_off * es, numel * es);
    write(out, mean.data(), mean.size());
    write(out, rstd.data(), rstd.size());
    write(out, dx.data() + dx_off * es, numel * es);
    write(out, dweight.data(), dweight.size());
    write(out, dbias.data(), dbias.size());
    write(out, dadd.data(), dadd.size());
    write(out, dscale.data(), dscale.size());
    write(out, dshift.data(), dshift.size());
    if (!out) throw std::runtime_error("could not write the output file");
  } catch (const std::exception& e) {
    std::cerr << "group_norm_emulator: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
