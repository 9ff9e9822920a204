// Input helpers shared by the emulator drivers (csrc/*/emulator/*_emulator.cc): little-endian fixed-size fields
// and raw buffers written by the Python tests, with an error on a truncated file. Emulation builds only.
#pragma once

#include <cstddef>
#include <istream>
#include <stdexcept>

namespace edm_fast {
namespace emu {

template <typename T>
T read_value(std::istream& in) {
  T v{};
  in.read(reinterpret_cast<char*>(&v), sizeof(v));
  if (!in) throw std::runtime_error("truncated input header");
  return v;
}

inline void read_bytes(std::istream& in, void* dst, size_t n) {
  in.read(static_cast<char*>(dst), static_cast<std::streamsize>(n));
  if (!in) throw std::runtime_error("truncated input data");
}

}  // namespace emu
}  // namespace edm_fast
