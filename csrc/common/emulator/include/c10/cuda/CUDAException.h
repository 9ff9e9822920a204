// Emulator stand-in for <c10/cuda/CUDAException.h>: resolves to the CPU CUDA emulator (csrc/common/emulator/cuda_emu.h).
#pragma once
#include "common/emulator/cuda_emu.h"
