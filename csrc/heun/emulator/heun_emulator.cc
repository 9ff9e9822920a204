// Runs the real Heun/Euler launchers and kernels (csrc/heun/heun_kernels.cu, compiled as C++ on the CPU CUDA
// emulator, csrc/common/emulator/) for tests/ops/test_heun.py: heun_euler_launch and heun_correct_launch on host
// buffers of exactly the tensors' sizes (AddressSanitizer reports any access outside), outputs starting as NaN.
// Built by tests/cuda_emulator.py.
//
// Usage: heun_emulator IN OUT. Little-endian 8-byte fields, then raw buffers:
// IN:  magic 0x4E01, dtype of D (0 f32, 1 f16, 2 bf16), n, t_hat (float64), t_next (float64);
//      x_hat [n] f64, D [n], x_next [n] f64, D' [n].
// OUT: heun_euler(x_hat, D) [n] f64, heun_correct(x_hat, x_next, D, D') [n] f64.
// stdout: one line per launch (grid, block).
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <stdexcept>
#include <vector>

#include <cuda_runtime.h>

#include "common/emulator/driver_io.h"

namespace edm_fast {  // defined in heun_kernels.cu (declared the same way in heun_op.cpp)
void heun_euler_launch(const double* x_hat, const void* denoised, int dtype, double* x_next, double t_hat,
                       double t_next, int64_t n, cudaStream_t stream);
void heun_correct_launch(const double* x_hat, const double* x_next, const void* denoised, const void* denoised_next,
                         int dtype, double* out, double t_hat, double t_next, int64_t n, cudaStream_t stream);
}  // namespace edm_fast

using edm_fast::emu::read_bytes;
using edm_fast::emu::read_value;

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: heun_emulator IN OUT\n";
    return 2;
  }
  try {
    std::ifstream in(argv[1], std::ios::binary);
    if (read_value<int64_t>(in) != 0x4E01) throw std::runtime_error("bad magic");
    const int dtype = static_cast<int>(read_value<int64_t>(in));
    const int64_t n = read_value<int64_t>(in);
    const double t_hat = read_value<double>(in), t_next = read_value<double>(in);
    const size_t es = dtype == 0 ? 4 : 2;
    std::vector<double> x_hat(n), x_next(n), euler(n), correct(n);
    std::vector<unsigned char> d(n * es), d2(n * es);
    read_bytes(in, x_hat.data(), n * 8);
    read_bytes(in, d.data(), d.size());
    read_bytes(in, x_next.data(), n * 8);
    read_bytes(in, d2.data(), d2.size());
    std::memset(euler.data(), 0xFF, n * 8);
    std::memset(correct.data(), 0xFF, n * 8);
    edm_fast::heun_euler_launch(x_hat.data(), d.data(), dtype, euler.data(), t_hat, t_next, n, nullptr);
    edm_fast::heun_correct_launch(x_hat.data(), x_next.data(), d.data(), d2.data(), dtype, correct.data(), t_hat,
                                  t_next, n, nullptr);
    for (const auto& r : edm_fast::emu::launch_log()) std::printf("launch grid=%u block=%u\n", r.grid.x, r.block.x);
    std::ofstream out(argv[2], std::ios::binary);
    out.write(reinterpret_cast<const char*>(euler.data()), static_cast<std::streamsize>(n * 8));
    out.write(reinterpret_cast<const char*>(correct.data()), static_cast<std::streamsize>(n * 8));
    if (!out) throw std::runtime_error("could not write the output file");
  } catch (const std::exception& e) {
    std::cerr << "heun_emulator: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
