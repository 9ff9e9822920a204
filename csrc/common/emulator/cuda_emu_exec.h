// Execution model of the CPU CUDA emulator (included by cuda_emu.h; see there for the overall picture).
//
//   thread   a fiber (ucontext, 128 KB stack with a guard page) on the host thread; a scheduler runs one fiber
//            at a time until it waits at a barrier or exits. threadIdx, blockIdx, blockDim, gridDim are globals
//            the scheduler sets on every switch. The order comes from EDM_EMU_SEED: 0 (default) first come,
//            first served; an even seed a uniformly random pick; an odd seed random priorities per CTA, per warp
//            and per lane, so that one CTA (warp) runs as far ahead of the others as the barriers let it, which
//            is what exposes a missing barrier (the reader runs before the writer and sees NaN or stale data).
//   CTA      its threads run together; __syncthreads is a barrier over them. Static __shared__ variables
//            (rewritten to shared_var<T>) and the dynamic shared memory are separate, exactly sized heap
//            blocks filled with 0xFF bytes (NaN), so reading shared memory nobody wrote shows up in the results
//            and AddressSanitizer reports any access outside a variable. Static shared memory over 48 KB and
//            dynamic over the kernel's cudaFuncAttributeMaxDynamicSharedMemorySize (227 KB max) are refused.
//   cluster  the CTAs of a thread-block cluster run together (their threads interleaved); cluster.sync() is a
//            barrier over all of them and map_shared_rank(p, r) returns the same variable in CTA r. A CTA's
//            shared memory is freed as soon as its last thread exits, so a sibling reading it afterwards is a
//            heap-use-after-free (on the GPU: undefined). Launches without clusters run CTAs one after another.
//   warp     32 consecutive threads; shuffles exchange values through a per-warp buffer between two barriers
//            over the warp's lanes (full-mask shuffles only).
//   barriers waiting at a barrier that a participating thread has left (exited), and a deadlock (every
//            unfinished thread waiting, not all at the same barrier), abort with a message.
// Not modelled: races between CTAs that are not in one cluster (they run one at a time); interleaving inside a
// stretch of code between two barriers (a thread runs it without interruption, so spin-waiting on another
// thread's flag never ends); memory ordering; timing. AddressSanitizer keeps no redzones for a thread's stack
// frames that stay live across a barrier (switching to a fiber clears its stack's shadow).
#pragma once

#include <ucontext.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cxxabi.h>
#include <dlfcn.h>
#include <functional>
#include <map>
#include <memory>
#include <new>
#include <queue>
#include <random>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define EDM_EMU_START_SWITCH(save, bottom, size) __sanitizer_start_switch_fiber(save, bottom, size)
#define EDM_EMU_FINISH_SWITCH(save, bottom, size) __sanitizer_finish_switch_fiber(save, bottom, size)
#else
#define EDM_EMU_START_SWITCH(save, bottom, size) ((void)0)
#define EDM_EMU_FINISH_SWITCH(save, bottom, size) ((void)0)
#endif

namespace edm_fast {
namespace emu {

template <typename... A>
[[noreturn]] inline void fatal(const A&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  std::fprintf(stderr, "emulator: %s\n", os.str().c_str());
  std::fflush(stderr);
  std::abort();
}

// The emulated GPU: an H100 (132 SMs, sm_90) unless EDM_EMU_CC_MAJOR / EDM_EMU_SMS say otherwise.
struct DeviceProps {
  int sms = 132;
  int cc_major = 9, cc_minor = 0;
  unsigned max_threads_per_block = 1024;
  size_t max_static_smem = 48 * 1024;
  size_t max_dynamic_smem = 232448;  // 227 KB, with the opt-in attribute
  unsigned max_cluster = 8;          // portable cluster size
  std::map<const void*, size_t> dynamic_smem_attr;  // cudaFuncAttributeMaxDynamicSharedMemorySize per kernel
};
inline DeviceProps& device_props() {
  static DeviceProps p = [] {
    DeviceProps d;
    if (const char* v = std::getenv("EDM_EMU_CC_MAJOR")) d.cc_major = std::atoi(v);
    if (const char* v = std::getenv("EDM_EMU_SMS")) d.sms = std::atoi(v);
    return d;
  }();
  return p;
}

// ---- fibers and their scheduler ----------------------------------------------------------------------------

struct Cta;
class Barrier;

struct Fiber {
  ucontext_t ctx{};
  unsigned char* stack = nullptr;  // usable part (above the guard page)
  void* fake_stack = nullptr;      // AddressSanitizer's bookkeeping across switches
  Cta* cta = nullptr;
  unsigned tid = 0;  // linear thread index in the block
  dim3 thread_idx;
  bool done = false;
  uint64_t priority = 0;  // odd seeds: fixed random priority (CTA, warp, lane)
};

class Scheduler {
 public:
  static constexpr size_t kStack = 128 * 1024, kGuard = 4096;

  static Scheduler& get() {
    static Scheduler s;
    return s;
  }
  Fiber* current() const { return current_; }

  // Runs fibers until all have finished.
  void run(std::vector<Fiber*>& fibers);
  // The current fiber waits (it was recorded as a waiter of some barrier) until wake() makes it runnable.
  void block() { switch_to_main(); }
  // The current fiber lets others run first.
  void yield() {
    wake(current_);
    switch_to_main();
  }
  void wake(Fiber* f) {
    const uint64_t key = seed_ == 0 ? ~uint64_t{0} - order_++ : (seed_ % 2 == 0 ? rng_() : f->priority);
    runnable_.emplace(key, f);
  }
  void set_priorities(std::vector<Fiber*>& fibers) {
    std::map<std::pair<const Cta*, unsigned>, uint64_t> group;  // (CTA, -1) and (CTA, warp) -> random key
    for (Fiber* f : fibers) {
      auto cta = group.try_emplace({f->cta, ~0u}, rng_() >> 48).first->second;
      auto warp = group.try_emplace({f->cta, f->tid / 32}, rng_() >> 48).first->second;
      f->priority = cta << 48 | warp << 32 | (rng_() >> 32);
    }
  }
  void attach_stack(Fiber& f) {
    if (free_stacks_.empty()) {
      void* p = mmap(nullptr, kStack + kGuard, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                     -1, 0);
      if (p == MAP_FAILED) fatal("cannot map a thread stack");
      mprotect(p, kGuard, PROT_NONE);  // overflow: a segmentation fault, not silent corruption
      free_stacks_.push_back(static_cast<unsigned char*>(p) + kGuard);
    }
    f.stack = free_stacks_.back();
    free_stacks_.pop_back();
  }
  void release_stack(Fiber& f) {
    free_stacks_.push_back(f.stack);
    f.stack = nullptr;
  }

 private:
  Scheduler() {
    const char* seed = std::getenv("EDM_EMU_SEED");
    seed_ = seed != nullptr ? std::strtoull(seed, nullptr, 10) : 0;
    rng_.seed(seed_);
  }
  static void entry();
  void switch_to_main() {
    Fiber* f = current_;
    EDM_EMU_START_SWITCH(f->done ? nullptr : &f->fake_stack, main_bottom_, main_size_);
    swapcontext(&f->ctx, &main_ctx_);
    EDM_EMU_FINISH_SWITCH(f->fake_stack, nullptr, nullptr);
  }
  void enter(Fiber* f);

  ucontext_t main_ctx_{};
  void* main_fake_ = nullptr;
  const void* main_bottom_ = nullptr;
  size_t main_size_ = 0;
  Fiber* current_ = nullptr;
  std::priority_queue<std::pair<uint64_t, Fiber*>> runnable_;  // the largest key runs next
  uint64_t order_ = 0;
  std::vector<unsigned char*> free_stacks_;
  uint64_t seed_ = 0;
  std::mt19937_64 rng_;
  std::function<void()>* body_ = nullptr;
  friend void run_fibers(std::vector<Fiber*>&, std::function<void()>&);
};

// A reusable barrier that detects the two ways a CUDA barrier goes wrong: a participant has exited (undefined
// on the GPU) and a deadlock (reported by the scheduler when nothing can run).
class Barrier {
 public:
  Barrier(unsigned count, const char* what) : expected_(count), what_(what) {}
  void arrive_and_wait() {
    Scheduler& s = Scheduler::get();
    if (exited_) fatal(what_, " barrier reached after a participating thread exited");
    if (++count_ == expected_) {
      count_ = 0;
      for (Fiber* f : waiters_) s.wake(f);
      waiters_.clear();
      s.yield();  // the others may go first (in random order with EDM_EMU_SEED)
      return;
    }
    waiters_.push_back(s.current());
    s.block();
  }
  void thread_exited() {
    exited_ = true;
    if (!waiters_.empty())
      fatal(what_, " barrier: a participating thread exited while ", waiters_.size(), " of ", expected_, " wait");
  }
  std::string state() const {
    return std::string(what_) + " barrier " + std::to_string(count_) + "/" + std::to_string(expected_);
  }
  bool waiting() const { return !waiters_.empty(); }

 private:
  unsigned expected_, count_ = 0;
  bool exited_ = false;
  const char* what_;
  std::vector<Fiber*> waiters_;
};

struct Warp {
  explicit Warp(unsigned n) : lanes(n), bar(n, "warp") {}
  unsigned lanes;
  Barrier bar;
  alignas(16) unsigned char slot[32][32];  // one exchange slot per lane
  void sync() { bar.arrive_and_wait(); }
};

struct SharedVar {
  const char* file;
  int line;
  size_t size;
  unsigned char* data;
};

struct Cluster;

struct Cta {
  Cta(dim3 index, dim3 block, dim3 grid, size_t dyn_bytes, Cluster* c, unsigned r)
      : idx(index), block_dim(block), grid_dim(grid), threads(block.x * block.y * block.z), cluster(c), rank(r),
        bar(threads, "__syncthreads"), live(threads), dyn_size(dyn_bytes) {
    for (unsigned w = 0; w < (threads + 31) / 32; ++w) warps.emplace_back(new Warp(std::min(32u, threads - 32 * w)));
    dyn = alloc(dyn_bytes);
  }
  ~Cta() { release(); }
  Cta(const Cta&) = delete;
  Cta& operator=(const Cta&) = delete;

  static unsigned char* alloc(size_t bytes) {
    auto* p = static_cast<unsigned char*>(::operator new(bytes > 0 ? bytes : 1, std::align_val_t(16)));
    std::memset(p, 0xFF, bytes);  // NaN in every float, half and bfloat16
    return p;
  }
  // The static shared variable declared at file:line (allocated when a thread first reaches it).
  unsigned char* variable(const char* file, int line, size_t size) {
    if (released) fatal("shared memory of CTA rank ", rank, " used after all its threads exited");
    for (auto& v : shared) {
      if (v.line == line && std::strcmp(v.file, file) == 0) {
        if (v.size != size) fatal(file, ":", line, ": shared variable declared with two sizes");
        return v.data;
      }
    }
    static_bytes += (size + 15) / 16 * 16;
    if (static_bytes > device_props().max_static_smem)
      fatal(file, ":", line, ": static shared memory of the block exceeds 48 KB (", static_bytes, " bytes)");
    shared.push_back(SharedVar{file, line, size, alloc(size)});
    return shared.back().data;
  }
  void release() {
    if (released) return;
    released = true;
    for (auto& v : shared) ::operator delete(v.data, std::align_val_t(16));
    ::operator delete(dyn, std::align_val_t(16));
  }

  dim3 idx, block_dim, grid_dim;
  unsigned threads;
  Cluster* cluster;
  unsigned rank;  // in the cluster
  Barrier bar;
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<SharedVar> shared;
  size_t static_bytes = 0;
  bool released = false;
  unsigned live;  // threads not yet exited
  unsigned char* dyn = nullptr;
  size_t dyn_size;
};

struct Cluster {
  Cluster(unsigned nthreads, dim3 d) : bar(nthreads, "cluster"), dims(d) {}
  Barrier bar;
  dim3 dims;
  std::vector<Cta*> ctas;  // by rank
};

}  // namespace emu
}  // namespace edm_fast

// The built-in variables: globals the scheduler sets for the running thread (not macros, so that members such
// as cudaLaunchConfig_t::gridDim keep their names).
inline dim3 threadIdx(0, 0, 0), blockIdx(0, 0, 0), blockDim, gridDim;

namespace edm_fast {
namespace emu {

inline Fiber& this_thread() {
  Fiber* f = Scheduler::get().current();
  if (f == nullptr) fatal("device code called outside of a kernel launch");
  return *f;
}
inline Cta& this_cta() { return *this_thread().cta; }
inline unsigned lane_id() { return this_thread().tid % 32; }
inline Warp& this_warp() { return *this_cta().warps[this_thread().tid / 32]; }
inline unsigned char* cta_smem() { return this_cta().dyn; }  // the dynamic shared memory

inline void Scheduler::enter(Fiber* f) {
  current_ = f;
  threadIdx = f->thread_idx;
  blockIdx = f->cta->idx;
  blockDim = f->cta->block_dim;
  gridDim = f->cta->grid_dim;
  EDM_EMU_START_SWITCH(&main_fake_, f->stack, kStack);
  swapcontext(&main_ctx_, &f->ctx);
  EDM_EMU_FINISH_SWITCH(main_fake_, nullptr, nullptr);
  current_ = nullptr;
}

inline void Scheduler::entry() {
  Scheduler& s = get();
  EDM_EMU_FINISH_SWITCH(nullptr, &s.main_bottom_, &s.main_size_);
  (*s.body_)();
  // This thread is gone: waiting for it at a barrier from now on is an error.
  Fiber& f = *s.current_;
  Cta& cta = *f.cta;
  cta.bar.thread_exited();
  cta.warps[f.tid / 32]->bar.thread_exited();
  cta.cluster->bar.thread_exited();
  if (--cta.live == 0) cta.release();
  f.done = true;
  s.switch_to_main();  // never resumed
  fatal("a finished thread was resumed");
}

inline void Scheduler::run(std::vector<Fiber*>& fibers) {
  set_priorities(fibers);
  for (Fiber* f : fibers) wake(f);
  while (!runnable_.empty()) {
    Fiber* f = runnable_.top().second;
    runnable_.pop();
    enter(f);
  }
  for (Fiber* f : fibers) {
    if (f->done) continue;
    std::ostringstream os;
    os << "deadlock: thread " << f->tid << " of CTA (" << f->cta->idx.x << "," << f->cta->idx.y << "," << f->cta->idx.z
       << ") and others wait forever; " << f->cta->bar.state() << ", " << f->cta->cluster->bar.state() << ", "
       << f->cta->warps[f->tid / 32]->bar.state();
    fatal(os.str());
  }
}

// Runs body() as every thread of the grid: clusters one after another, the CTAs of a cluster together.
inline void run_fibers(std::vector<Fiber*>& fibers, std::function<void()>& body) {
  Scheduler& s = Scheduler::get();
  if (s.current_ != nullptr) fatal("kernel launched from device code");
  s.body_ = &body;
  for (Fiber* f : fibers) {
    s.attach_stack(*f);
    getcontext(&f->ctx);
    f->ctx.uc_stack.ss_sp = f->stack;
    f->ctx.uc_stack.ss_size = Scheduler::kStack;
    f->ctx.uc_link = nullptr;
    makecontext(&f->ctx, &Scheduler::entry, 0);
  }
  s.run(fibers);
  for (Fiber* f : fibers) s.release_stack(*f);
  s.body_ = nullptr;
}

// `__shared__ T name;` becomes `auto& name = shared_var<T>(__FILE__, __LINE__);`: every thread of the CTA gets
// the same object (no constructor runs, as in CUDA).
template <typename T>
T& shared_var(const char* file, int line) {
  static_assert(std::is_trivially_default_constructible_v<T> && std::is_trivially_destructible_v<T>,
                "__shared__ variables must be trivial types");
  static_assert(alignof(T) <= 16, "over-aligned __shared__ variable");
  return *reinterpret_cast<T*>(this_cta().variable(file, line, sizeof(T)));
}

// The same shared-memory location in CTA `rank` of this thread's cluster (distributed shared memory).
template <typename T>
T* map_shared_rank(T* p, int rank) {
  Cta& self = this_cta();
  Cluster& cl = *self.cluster;
  if (rank < 0 || static_cast<size_t>(rank) >= cl.ctas.size())
    fatal("map_shared_rank: rank ", rank, " outside a cluster of ", cl.ctas.size());
  const auto* q = reinterpret_cast<const unsigned char*>(p);
  Cta& remote = *cl.ctas[rank];
  if (remote.released) fatal("map_shared_rank: CTA rank ", rank, " of the cluster has exited");
  for (const auto& v : self.shared)
    if (q >= v.data && q < v.data + v.size)
      return reinterpret_cast<T*>(remote.variable(v.file, v.line, v.size) + (q - v.data));
  if (q >= self.dyn && q < self.dyn + self.dyn_size) return reinterpret_cast<T*>(remote.dyn + (q - self.dyn));
  fatal("map_shared_rank: pointer is not in this block's shared memory");
}

// ---- launches -----------------------------------------------------------------------------------------------

struct LaunchRecord {
  std::string kernel;  // demangled symbol (kernels with internal linkage: "?")
  dim3 grid, block, cluster;
  size_t dynamic_smem = 0, static_smem = 0;
};
inline std::vector<LaunchRecord>& launch_log() {
  static std::vector<LaunchRecord> log;
  return log;
}

inline std::string symbol_name(const void* fn) {
  Dl_info info{};
  if (dladdr(fn, &info) == 0 || info.dli_sname == nullptr) return "?";  // link with -rdynamic for names
  int status = 0;
  char* name = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
  std::string out = status == 0 && name != nullptr ? name : info.dli_sname;
  std::free(name);
  return out;
}

inline void check_config(dim3 grid, dim3 block, size_t dyn, dim3 cluster, const void* fn) {
  const DeviceProps& d = device_props();
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (threads == 0 || threads > d.max_threads_per_block || block.z > 64)
    fatal("invalid block size ", block.x, "x", block.y, "x", block.z);
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535 || grid.x > 2147483647u)
    fatal("invalid grid size ", grid.x, "x", grid.y, "x", grid.z);
  const unsigned k = cluster.x * cluster.y * cluster.z;
  if (k > 1 && d.cc_major < 9) fatal("thread-block clusters need sm_90 (emulated device: sm_", d.cc_major, "0)");
  if (k == 0 || k > d.max_cluster) fatal("cluster of ", k, " blocks (portable maximum ", d.max_cluster, ")");
  if (grid.x % cluster.x || grid.y % cluster.y || grid.z % cluster.z)
    fatal("grid ", grid.x, "x", grid.y, "x", grid.z, " is not a multiple of the cluster dims");
  const auto attr = d.dynamic_smem_attr.find(fn);
  const size_t allowed = attr != d.dynamic_smem_attr.end() ? attr->second : 48 * 1024;
  if (dyn > allowed) fatal("kernel launched with ", dyn, " bytes of dynamic shared memory; its limit is ", allowed);
}

inline void run_grid(const void* fn, dim3 grid, dim3 block, size_t dyn, dim3 cluster, std::function<void()> body) {
  check_config(grid, block, dyn, cluster, fn);
  LaunchRecord rec{symbol_name(fn), grid, block, cluster, dyn, 0};
  const unsigned nthreads = block.x * block.y * block.z, k = cluster.x * cluster.y * cluster.z;
  for (unsigned cz = 0; cz < grid.z; cz += cluster.z)
    for (unsigned cy = 0; cy < grid.y; cy += cluster.y)
      for (unsigned cx = 0; cx < grid.x; cx += cluster.x) {
        Cluster cl(nthreads * k, cluster);
        std::vector<std::unique_ptr<Cta>> ctas;
        std::vector<Fiber> fibers(static_cast<size_t>(nthreads) * k);
        std::vector<Fiber*> order;
        for (unsigned r = 0; r < k; ++r) {
          const dim3 idx(cx + r % cluster.x, cy + (r / cluster.x) % cluster.y, cz + r / (cluster.x * cluster.y));
          ctas.emplace_back(new Cta(idx, block, grid, dyn, &cl, r));
          cl.ctas.push_back(ctas.back().get());
          for (unsigned t = 0; t < nthreads; ++t) {
            Fiber& f = fibers[static_cast<size_t>(r) * nthreads + t];
            f.cta = ctas.back().get();
            f.tid = t;
            f.thread_idx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            order.push_back(&f);
          }
        }
        run_fibers(order, body);
        for (auto& c : ctas) rec.static_smem = std::max(rec.static_smem, c->static_bytes);
      }
  launch_log().push_back(rec);
}

// A launch of kernel(args...): the arguments are converted to the kernel's parameter types once, on the host,
// and every thread gets its own copy (kernel parameters are per-thread values).
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t dyn, dim3 cluster, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
  const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  run_grid(reinterpret_cast<const void*>(kernel), grid, block, dyn, cluster, [&] {
    std::tuple<std::decay_t<P>...> mine = params;
    std::apply(kernel, mine);
  });
}

// kernel<<<grid, block, smem, stream>>>(args) is rewritten to launch_kernel(kernel, grid, block, smem, stream)(args).
template <typename K>
struct ChevronLaunch {
  K kernel;
  dim3 grid, block;
  size_t smem;
  template <typename... A>
  void operator()(A&&... args) const {
    launch(kernel, grid, block, smem, dim3(1, 1, 1), std::forward<A>(args)...);
  }
};
template <typename K>
ChevronLaunch<K> launch_kernel(K kernel, dim3 grid, dim3 block, size_t smem = 0, void* /*stream*/ = nullptr) {
  return ChevronLaunch<K>{kernel, grid, block, smem};
}

// ---- warp exchange --------------------------------------------------------------------------------------------

// Value of lane src(lane) of this warp; every lane of the warp must take part (full mask).
template <typename T, typename Src>
T warp_exchange(unsigned mask, T v, Src src) {
  static_assert(sizeof(T) <= 32 && std::is_trivially_copyable_v<T>, "unsupported shuffle type");
  Warp& w = this_warp();
  if (mask != 0xffffffffu || w.lanes != 32) fatal("only full-mask shuffles in full warps are emulated");
  const unsigned l = lane_id();
  std::memcpy(w.slot[l], &v, sizeof(T));
  w.sync();
  T r;
  std::memcpy(&r, w.slot[src(l)], sizeof(T));
  w.sync();
  return r;
}

}  // namespace emu
}  // namespace edm_fast

inline void __syncthreads() { ::edm_fast::emu::this_cta().bar.arrive_and_wait(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) ::edm_fast::emu::fatal("only full-mask __syncwarp is emulated");
  ::edm_fast::emu::this_warp().sync();
}
inline void __threadfence() {}
[[noreturn]] inline void __trap() { ::edm_fast::emu::fatal("__trap() in a kernel"); }
constexpr int warpSize = 32;

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return ::edm_fast::emu::warp_exchange(mask, v, [&](unsigned l) {
    const unsigned s = l ^ static_cast<unsigned>(lane_mask);
    return (s / width == l / width) ? s : l;  // outside the segment: the lane's own value
  });
}
template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return ::edm_fast::emu::warp_exchange(mask, v, [&](unsigned l) { return l / width * width + (src % width); });
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::edm_fast::emu::warp_exchange(mask, v, [&](unsigned l) {
    return (l % width) + delta < static_cast<unsigned>(width) ? l + delta : l;
  });
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::edm_fast::emu::warp_exchange(mask, v, [&](unsigned l) { return (l % width) >= delta ? l - delta : l; });
}

// Threads never run at the same time, so a plain read-modify-write is atomic.
template <typename T>
T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
