// The CUDA runtime, cooperative-groups and c10 API the host launchers call, for the CPU emulator (included by
// cuda_emu.h). Host memory stands in for device memory; there is one device, index 0 (device_props()).
// Launch errors the GPU would report (bad configuration, clusters on a pre-sm_90 device, too much shared
// memory) abort with a message instead, so cudaGetLastError() always returns cudaSuccess.
#pragma once

#include <ostream>
#include <stdexcept>

// ---- runtime API ---------------------------------------------------------------------------------------------
using cudaStream_t = void*;
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidDevice = 101,
};
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
  }
  return "unknown error";
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaPeekAtLastError() { return cudaSuccess; }

enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  const auto& d = ::edm_fast::emu::device_props();
  if (device != 0) return cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = static_cast<int>(d.max_threads_per_block); break;
    case cudaDevAttrMultiProcessorCount: *value = d.sms; break;
    case cudaDevAttrComputeCapabilityMajor: *value = d.cc_major; break;
    case cudaDevAttrComputeCapabilityMinor: *value = d.cc_minor; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = static_cast<int>(d.max_dynamic_smem); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
template <typename F>
cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  auto& d = ::edm_fast::emu::device_props();
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  if (value < 0 || static_cast<size_t>(value) > d.max_dynamic_smem)
    ::edm_fast::emu::fatal("kernel asks for ", value, " bytes of dynamic shared memory (> 227 KB)");
  d.dynamic_smem_attr[reinterpret_cast<const void*>(kernel)] = static_cast<size_t>(value);
  return cudaSuccess;
}

enum cudaLaunchAttributeID { cudaLaunchAttributeClusterDimension = 4 };
union cudaLaunchAttributeValue {
  struct {
    unsigned int x, y, z;
  } clusterDim;
  char pad[64];
};
struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  cudaLaunchAttributeValue val;
};
struct cudaLaunchConfig_t {
  dim3 gridDim;
  dim3 blockDim;
  size_t dynamicSmemBytes;
  cudaStream_t stream;
  cudaLaunchAttribute* attrs;
  unsigned int numAttrs;
};
template <typename... P, typename... A>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* config, void (*kernel)(P...), A&&... args) {
  dim3 cluster(1, 1, 1);
  for (unsigned i = 0; i < config->numAttrs; ++i) {
    const cudaLaunchAttribute& a = config->attrs[i];
    if (a.id != cudaLaunchAttributeClusterDimension) ::edm_fast::emu::fatal("unsupported launch attribute ", a.id);
    cluster = dim3(a.val.clusterDim.x, a.val.clusterDim.y, a.val.clusterDim.z);
  }
  ::edm_fast::emu::launch(kernel, config->gridDim, config->blockDim, config->dynamicSmemBytes, cluster,
                          std::forward<A>(args)...);
  return cudaSuccess;
}

// ---- cooperative groups ------------------------------------------------------------------------------------------
namespace cooperative_groups {
class thread_block {
 public:
  void sync() const { __syncthreads(); }
  unsigned thread_rank() const { return ::edm_fast::emu::this_thread().tid; }
  unsigned size() const { return ::edm_fast::emu::this_cta().threads; }
};
inline thread_block this_thread_block() { return {}; }

class cluster_group {
 public:
  void sync() const { ::edm_fast::emu::this_cta().cluster->bar.arrive_and_wait(); }
  unsigned block_rank() const { return ::edm_fast::emu::this_cta().rank; }
  unsigned num_blocks() const { return static_cast<unsigned>(::edm_fast::emu::this_cta().cluster->ctas.size()); }
  dim3 dim_blocks() const { return ::edm_fast::emu::this_cta().cluster->dims; }
  template <typename T>
  T* map_shared_rank(T* addr, int rank) const {
    return ::edm_fast::emu::map_shared_rank(addr, rank);
  }
};
inline cluster_group this_cluster() { return {}; }
}  // namespace cooperative_groups

// ---- c10 -----------------------------------------------------------------------------------------------------------
namespace c10 {
using DeviceIndex = int8_t;

// The enumerators the kernels dispatch on, with torch's values.
enum class ScalarType : int8_t {
  Byte = 0, Char = 1, Short = 2, Int = 3, Long = 4, Half = 5, Float = 6, Double = 7, Bool = 11, BFloat16 = 15
};
inline size_t elementSize(ScalarType t) {
  switch (t) {
    case ScalarType::Byte: case ScalarType::Char: case ScalarType::Bool: return 1;
    case ScalarType::Short: case ScalarType::Half: case ScalarType::BFloat16: return 2;
    case ScalarType::Int: case ScalarType::Float: return 4;
    case ScalarType::Long: case ScalarType::Double: return 8;
  }
  throw std::runtime_error("elementSize: unknown ScalarType");
}
inline std::ostream& operator<<(std::ostream& os, ScalarType t) {
  switch (t) {
    case ScalarType::Half: return os << "Half";
    case ScalarType::Float: return os << "Float";
    case ScalarType::BFloat16: return os << "BFloat16";
    case ScalarType::Double: return os << "Double";
    default: return os << "ScalarType(" << static_cast<int>(t) << ")";
  }
}

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};
namespace detail {
template <typename... A>
[[noreturn]] inline void check_fail(const char* file, int line, const char* cond, const A&... args) {
  std::ostringstream os;
  os << file << ":" << line << ": check failed: " << cond;
  if constexpr (sizeof...(A) > 0) {
    os << ": ";
    (os << ... << args);
  }
  throw Error(os.str());
}
}  // namespace detail

namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(DeviceIndex device) {
    if (device != 0) ::edm_fast::emu::fatal("CUDAGuard: the emulator has one device (0), asked for ", int(device));
  }
};
struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(DeviceIndex = -1) { return CUDAStream{}; }
}  // namespace cuda
}  // namespace c10

#define TORCH_CHECK(cond, ...)                                                                \
  do {                                                                                        \
    if (!(cond)) ::c10::detail::check_fail(__FILE__, __LINE__, #cond __VA_OPT__(, ) __VA_ARGS__); \
  } while (0)

#define C10_CUDA_CHECK(expr)                                                                        \
  do {                                                                                              \
    const cudaError_t edm_emu_err = (expr);                                                         \
    TORCH_CHECK(edm_emu_err == cudaSuccess, "CUDA error: ", cudaGetErrorString(edm_emu_err));     \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaGetLastError())
