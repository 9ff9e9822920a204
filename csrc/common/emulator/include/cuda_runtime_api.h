// Emulator stand-in for <cuda_runtime_api.h>: resolves to the CPU CUDA emulator (csrc/common/emulator/cuda_emu.h).
#pragma once
#include "common/emulator/cuda_emu.h"
