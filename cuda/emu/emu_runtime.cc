// The CUDA runtime API on the host, for the emulation build (see emu_runtime.h for what is emulated).
// These definitions take the place of libcudart: the emulation addon does not link it.
#include "emu/emu_runtime.h"

#include <cuda_runtime_api.h>

#include "emu/emu_selftest.h"
#include <sys/mman.h>
#include <vector_functions.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

// The runtime's opaque handle types, defined here.
struct CUstream_st {
  int device = 0;                 // the device current when it was created (its work runs there)
  cudaGraph_t capture = nullptr;  // the graph being captured, or null
  bool capture_invalidated = false;
  std::thread::id capture_thread;
};
struct CUevent_st {
  int device = 0;  // the device current when it was created
  double time_ms = 0;
  bool recorded = false;
};
struct CUgraph_st {
  std::vector<std::function<void()>> nodes;
};
struct CUgraphExec_st {
  std::vector<std::function<void()>> nodes;
  size_t device_bytes = 0;  // the device memory it holds (counted against TFEW_EMU_MEMORY_MB until destroyed)
  int device = 0;           // on which device
};

namespace tfew {
namespace emu {

namespace {

// ---------------------------------------------------------------------------------------------------------
// Device properties of the emulated GPU: an H100-like card with compute capability 9.0.
constexpr int kMaxThreadsPerBlock = 1024;
constexpr size_t kDefaultDynamicShared = 48 * 1024;
constexpr size_t kMaxDynamicSharedOptin = 227 * 1024;
constexpr size_t kGuardBytes = 64;
constexpr unsigned char kGuardByte = 0xA5;
constexpr unsigned char kFreshByte = 0xFF;  // fresh device memory: NaN as fp32 and bf16, -1 as int32

// TFEW_EMU_DEVICES: how many GPUs are visible (1 to 8; default 1), each with TFEW_EMU_MEMORY_MB of memory.
constexpr int kMaxDevices = 8;
int device_count() {
  static const int count = [] {
    const char* v = std::getenv("TFEW_EMU_DEVICES");
    const int n = v && v[0] ? std::atoi(v) : 1;
    return std::min(std::max(n, 1), kMaxDevices);
  }();
  return count;
}
// The calling thread's current device (cudaSetDevice), 0 until set, as on a GPU.
thread_local int tl_device = 0;

// TFEW_EMU_PROBE: a machine the CUDA backend cannot use, for the tests of the probe's refusals (gpu/probe.cc):
// "no-driver" (no NVIDIA driver: the runtime reports an insufficient driver, version 0), "old-driver" (a driver
// for CUDA 11.8), "no-device" (a driver, no GPU), "old-gpu" (compute capability 7.5), "no-cublas" (a GPU and a
// driver, no cuBLAS: the loader's own search runs, gpu/cublas_loader.cc). Unset: a usable machine.
enum class ProbeFault { None, NoDriver, OldDriver, NoDevice, OldGpu, NoCublas };
ProbeFault probe_fault() {
  static const ProbeFault fault = [] {
    const char* v = std::getenv("TFEW_EMU_PROBE");
    const std::string s = v ? v : "";
    if (s == "no-driver") return ProbeFault::NoDriver;
    if (s == "old-driver") return ProbeFault::OldDriver;
    if (s == "no-device") return ProbeFault::NoDevice;
    if (s == "old-gpu") return ProbeFault::OldGpu;
    if (s == "no-cublas") return ProbeFault::NoCublas;
    // a misspelt fault would test a usable machine without a word: said once, on stderr
    if (!s.empty())
      std::fprintf(stderr, "tfew emulator: TFEW_EMU_PROBE='%s' is not one of no-driver, old-driver, no-device, old-gpu, no-cublas; "
                   "the emulated machine is usable\n", s.c_str());
    return ProbeFault::None;
  }();
  return fault;
}

size_t total_memory() {
  static const size_t total = [] {
    const char* v = std::getenv("TFEW_EMU_MEMORY_MB");
    const long long mb = v && v[0] ? std::atoll(v) : 80LL * 1024;
    return static_cast<size_t>(mb > 0 ? mb : 80LL * 1024) << 20;
  }();
  return total;
}

double now_ms() {
  using clock = std::chrono::steady_clock;
  static const clock::time_point start = clock::now();
  return std::chrono::duration<double, std::milli>(clock::now() - start).count();
}

// ---------------------------------------------------------------------------------------------------------
// Errors: the last error of each host thread, and the sticky error of the "context" (a device fault).
thread_local cudaError_t tl_last_error = cudaSuccess;
std::atomic<int> g_sticky_error{cudaSuccess};
std::mutex g_fault_mutex;
std::string g_fault_text;

cudaError_t sticky() { return static_cast<cudaError_t>(g_sticky_error.load()); }

cudaError_t record(cudaError_t e) {
  if (e != cudaSuccess) tl_last_error = e;
  return e;
}

// ---------------------------------------------------------------------------------------------------------
// Memory: every device and pinned allocation, by start address.
struct Allocation {
  size_t size = 0;
  bool device = true;  // false: pinned host memory (cudaMallocHost)
  int device_index = 0;  // the GPU whose memory it is (device memory)
};
std::mutex g_memory_mutex;
std::map<uintptr_t, Allocation> g_allocations;
size_t g_device_bytes[kMaxDevices] = {};  // in use, per device

// The allocation that holds [p, p + bytes), or null.
const Allocation* find_range(const void* p, size_t bytes, uintptr_t* base_out = nullptr) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  auto it = g_allocations.upper_bound(a);
  if (it == g_allocations.begin()) return nullptr;
  --it;
  if (a + bytes > it->first + it->second.size) return nullptr;
  if (base_out) *base_out = it->first;
  return &it->second;
}

std::string pointer_text(const void* p) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%p", p);
  return buf;
}

// Checks the guard bytes after every device allocation; a damaged guard is a device fault.
void check_guards(const char* when) {
  std::lock_guard<std::mutex> lock(g_memory_mutex);
  for (const auto& kv : g_allocations) {
    if (!kv.second.device) continue;
    const unsigned char* guard = reinterpret_cast<const unsigned char*>(kv.first) + kv.second.size;
    for (size_t i = 0; i < kGuardBytes; ++i) {
      if (guard[i] != kGuardByte) {
        device_fault(cudaErrorIllegalAddress, std::string("memory written past the end of the device allocation of ") +
                                                  std::to_string(kv.second.size) + " bytes at " +
                                                  pointer_text(reinterpret_cast<const void*>(kv.first)) + " (found " +
                                                  when + ")");
        return;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Streams and capture.
CUstream_st g_legacy_stream;
thread_local int tl_captures = 0;  // captures begun by this thread (ThreadLocal mode: its unsafe calls fail)

CUstream_st* stream_of(cudaStream_t s) { return s ? s : &g_legacy_stream; }

// Work for a stream of another device than the calling thread's current one: a GPU refuses a kernel launch, an
// event record or a graph launch there (cudaErrorInvalidResourceHandle). An engine that forgot cudaSetDevice
// before its work shows up here. (The legacy stream is the current device's.)
bool foreign_stream(cudaStream_t stream, const char* what) {
  if (stream == nullptr || stream->device == tl_device) return false;
  std::fprintf(stderr, "[tfew cuda emulator] %s on a stream of device %d while device %d is current\n", what,
               stream->device, tl_device);
  return true;
}

// A call that is not allowed while this thread captures: the capture is invalidated, as on the device.
bool capture_forbids(const char* what) {
  if (tl_captures == 0) return false;
  std::fprintf(stderr, "[tfew cuda emulator] %s while this thread captures a CUDA graph\n", what);
  return true;
}

std::mutex g_capture_mutex;
std::vector<CUstream_st*> g_capturing;

void invalidate_thread_captures() {
  std::lock_guard<std::mutex> lock(g_capture_mutex);
  for (CUstream_st* s : g_capturing)
    if (s->capture_thread == std::this_thread::get_id()) s->capture_invalidated = true;
}

// ---------------------------------------------------------------------------------------------------------
// Kernel functions' attributes (the dynamic shared memory limit each kernel was opened up to).
std::mutex g_function_mutex;
std::unordered_map<const void*, size_t> g_shared_limit;

size_t shared_limit(const void* kernel) {
  std::lock_guard<std::mutex> lock(g_function_mutex);
  auto it = g_shared_limit.find(kernel);
  return it == g_shared_limit.end() ? kDefaultDynamicShared : it->second;
}

// ---------------------------------------------------------------------------------------------------------
// Fibers: one per emulated thread of a block, switched by a few instructions of x86-64 code (ucontext would
// save the signal mask with a system call at every switch).
constexpr size_t kStackBytes = 256 * 1024;

enum class FiberState { Ready, AtBlockBarrier, AtWarpBarrier, Done };

struct Fiber {
  void* sp = nullptr;
  unsigned char* stack = nullptr;  // lowest usable address (a guard page lies below)
  FiberState state = FiberState::Done;
  ThreadPosition position{};
  bool waited = false;  // programmatic_wait() called (checked at the end of a programmatic launch's threads)
};

struct BlockRun {
  const char* kernel = "";
  const std::function<void()>* body = nullptr;
  int threads = 0;
  bool programmatic = false;
  bool aborted = false;
  uint64_t shuffle_slots[kMaxThreadsPerBlock] = {};
};

thread_local std::vector<std::unique_ptr<Fiber>> tl_fibers;
thread_local Fiber* tl_current = nullptr;
thread_local BlockRun* tl_block = nullptr;
thread_local void* tl_scheduler_sp = nullptr;

}  // namespace
}  // namespace emu
}  // namespace tfew

#if defined(__x86_64__)
// tfew_emu_switch(save, load): saves the callee-saved registers and the FPU/SSE control words on the current
// stack, stores its pointer in *save, and resumes the stack `load` (built by the same routine or by
// new_fiber_frame).
extern "C" void tfew_emu_switch(void** save, void* load);
asm(R"(
  .text
  .globl tfew_emu_switch
  .hidden tfew_emu_switch
  .type tfew_emu_switch, @function
tfew_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  stmxcsr 8(%rsp)
  fnstcw (%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr 8(%rsp)
  fldcw (%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size tfew_emu_switch, .-tfew_emu_switch
)");
#else
#error "the CUDA emulator switches fibers with x86-64 code; port tfew_emu_switch to this machine"
#endif

namespace tfew {
namespace emu {

namespace {

[[noreturn]] void fiber_main();

void switch_to(void** save, void* load) { tfew_emu_switch(save, load); }

// A fresh frame that tfew_emu_switch "returns" into fiber_main with a correctly aligned stack.
void* new_fiber_frame(Fiber& f) {
  uintptr_t top = reinterpret_cast<uintptr_t>(f.stack + kStackBytes) & ~uintptr_t(15);
  uint64_t* sp = reinterpret_cast<uint64_t*>(top);
  *--sp = 0;                                                  // fiber_main's (never used) return address
  *--sp = reinterpret_cast<uint64_t>(&fiber_main);            // where the switch returns to
  for (int i = 0; i < 6; ++i) *--sp = 0;                      // rbp rbx r12 r13 r14 r15
  *--sp = 0x1F80;                                             // MXCSR (8(%rsp)): the default
  *--sp = 0x037F;                                             // x87 control word ((%rsp)): the default
  return sp;
}


// Leaves the current fiber for the scheduler; returns when the scheduler resumes it.
void yield_to_scheduler() { switch_to(&tl_current->sp, tl_scheduler_sp); }

[[noreturn]] void fiber_main() {
  (*tl_block->body)();
  if (tl_block->programmatic && !tl_current->waited) {
    const ThreadPosition& p = tl_current->position;
    device_fault(cudaErrorLaunchFailure,
                 std::string("kernel ") + tl_block->kernel +
                     " was launched to overlap the kernel before it (programmatic dependent launch) but thread " +
                     std::to_string(p.thread_idx.x) + " of block (" + std::to_string(p.block_idx.x) + "," +
                     std::to_string(p.block_idx.y) + "," + std::to_string(p.block_idx.z) +
                     ") ended without wait_for_previous_kernel()");
  }
  tl_current->state = FiberState::Done;
  yield_to_scheduler();
  std::abort();  // a finished fiber is never resumed
}

Fiber& fiber(int i) {
  while (static_cast<int>(tl_fibers.size()) <= i) {
    auto f = std::make_unique<Fiber>();
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    void* mem = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED) throw std::bad_alloc();
    mprotect(mem, page, PROT_NONE);  // a stack overflow faults instead of corrupting the next stack
    f->stack = static_cast<unsigned char*>(mem) + page;
    tl_fibers.push_back(std::move(f));
  }
  return *tl_fibers[i];
}

thread_local std::vector<unsigned char> tl_dynamic_shared_storage;

unsigned char* dynamic_shared_memory(size_t bytes) {
  if (tl_dynamic_shared_storage.size() < kMaxDynamicSharedOptin + 128) tl_dynamic_shared_storage.resize(kMaxDynamicSharedOptin + 128);
  unsigned char* p = tl_dynamic_shared_storage.data();
  p += (128 - reinterpret_cast<uintptr_t>(p) % 128) % 128;
  std::memset(p, kFreshByte, bytes);  // its content is undefined on the device: make stale reads show up
  return p;
}

// TFEW_EMU_SCHEDULE=reverse runs the threads between two barriers from the last to the first (default: first to
// last). Code that is only right in one order has a race (a missing __syncthreads or __syncwarp): running the
// tests both ways shows it.
bool reverse_schedule() {
  static const bool reverse = [] {
    const char* v = std::getenv("TFEW_EMU_SCHEDULE");
    return v && std::strcmp(v, "reverse") == 0;
  }();
  return reverse;
}

// Runs one block: its threads as fibers, released at barriers when every live thread (block barrier) or every
// live lane of a warp (warp barrier) has arrived. Returns false when the block cannot finish.
bool run_block(BlockRun& run, const uint3& block_idx, const dim3& grid, const dim3& block, unsigned char* shared) {
  const int n = run.threads;
  for (int t = 0; t < n; ++t) {
    Fiber& f = fiber(t);
    f.state = FiberState::Ready;
    f.position.thread_idx = make_uint3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
    f.position.block_idx = block_idx;
    f.position.block_dim = block;
    f.position.grid_dim = grid;
    f.position.dynamic_shared = shared;
    f.waited = false;
    f.sp = new_fiber_frame(f);
  }
  tl_block = &run;
  int live = n;
  while (live > 0) {
    bool ran = false;
    for (int i = 0; i < n; ++i) {
      Fiber& f = *tl_fibers[reverse_schedule() ? n - 1 - i : i];
      if (f.state != FiberState::Ready) continue;
      tl_current = &f;
      switch_to(&tl_scheduler_sp, f.sp);
      tl_current = nullptr;
      ran = true;
      if (f.state == FiberState::Done) --live;
      if (run.aborted) return false;
    }
    if (live == 0) break;
    // Release the barriers that are complete.
    bool released = false;
    bool all_at_block = true;
    for (int t = 0; t < n; ++t) {
      const FiberState s = tl_fibers[t]->state;
      if (s != FiberState::Done && s != FiberState::AtBlockBarrier) all_at_block = false;
    }
    if (all_at_block) {
      for (int t = 0; t < n; ++t)
        if (tl_fibers[t]->state == FiberState::AtBlockBarrier) tl_fibers[t]->state = FiberState::Ready;
      released = true;
    } else {
      for (int w = 0; w * 32 < n; ++w) {
        bool complete = true, any = false;
        for (int t = w * 32; t < std::min(n, w * 32 + 32); ++t) {
          const FiberState s = tl_fibers[t]->state;
          if (s == FiberState::Done) continue;
          any = true;
          if (s != FiberState::AtWarpBarrier) complete = false;
        }
        if (any && complete) {
          for (int t = w * 32; t < std::min(n, w * 32 + 32); ++t)
            if (tl_fibers[t]->state == FiberState::AtWarpBarrier) tl_fibers[t]->state = FiberState::Ready;
          released = true;
        }
      }
    }
    if (!released && !ran) {
      int at_block = 0, at_warp = 0;
      for (int t = 0; t < n; ++t) {
        at_block += tl_fibers[t]->state == FiberState::AtBlockBarrier;
        at_warp += tl_fibers[t]->state == FiberState::AtWarpBarrier;
      }
      device_fault(cudaErrorLaunchFailure,
                   std::string("kernel ") + run.kernel + ": barrier deadlock in block (" + std::to_string(block_idx.x) +
                       "," + std::to_string(block_idx.y) + "," + std::to_string(block_idx.z) + "): " +
                       std::to_string(at_block) + " threads wait at __syncthreads, " + std::to_string(at_warp) +
                       " at a warp barrier (__syncwarp or a shuffle), " + std::to_string(live - at_block - at_warp) +
                       " other live threads");
      return false;
    }
  }
  return true;
}

void run_grid(const char* name, dim3 grid, dim3 block, size_t dynamic_shared, const std::function<void()>& body,
              bool programmatic) {
  if (tl_block != nullptr) {
    device_fault(cudaErrorLaunchFailure, std::string("kernel ") + name + " launched from device code");
    return;
  }
  BlockRun run;
  run.kernel = name;
  run.body = &body;
  run.programmatic = programmatic;
  run.threads = static_cast<int>(block.x * block.y * block.z);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        unsigned char* shared = dynamic_shared_memory(dynamic_shared);
        const bool ok = run_block(run, make_uint3(x, y, z), grid, block, shared);
        if (!ok) {
          tl_block = nullptr;
          return;
        }
      }
  tl_block = nullptr;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------
// The interface for emulated device code and the emulated libraries.

void device_fault(cudaError_t error, const std::string& what) {
  {
    std::lock_guard<std::mutex> lock(g_fault_mutex);
    if (g_sticky_error.load() == cudaSuccess) {
      g_fault_text = what;
      g_sticky_error.store(error);
      std::fprintf(stderr, "[tfew cuda emulator] device fault: %s\n", what.c_str());
    }
  }
  if (tl_block != nullptr) {
    tl_block->aborted = true;
    if (tl_current != nullptr) {
      // Inside a kernel thread: stop it here (the scheduler abandons the block and the launch).
      tl_current->state = FiberState::Done;
      yield_to_scheduler();
      std::abort();
    }
  }
}

void programmatic_wait() {
  if (tl_current != nullptr) tl_current->waited = true;
}

std::atomic<long long> g_kernel_launches[2] = {{0}, {0}};  // [ordinary, programmatic], at launch (not in replays)

LaunchCounts launch_counts(bool reset) {
  LaunchCounts c{g_kernel_launches[0].load(), g_kernel_launches[1].load()};
  if (reset) g_kernel_launches[0] = 0, g_kernel_launches[1] = 0;
  return c;
}

// The SM count the emulated device reports (an H100's 132; set_multiprocessors).
std::atomic<int> g_multiprocessors{132};

void set_multiprocessors(int count) { g_multiprocessors.store(count > 0 ? count : 132); }

std::atomic<long long> g_graph_exec_bytes{-1};

void set_graph_exec_bytes(long long bytes) { g_graph_exec_bytes.store(bytes); }

std::atomic<int> g_failing_graph_launches{0};

void fail_graph_launches(int count) { g_failing_graph_launches.store(count); }

size_t g_held_bytes[kMaxDevices] = {};  // another process's share of each device (hold_device_memory)

bool hold_device_memory(size_t bytes) {
  std::lock_guard<std::mutex> lock(g_memory_mutex);
  const size_t others = g_device_bytes[tl_device] - g_held_bytes[tl_device];
  if (others + bytes > total_memory()) return false;
  g_device_bytes[tl_device] = others + bytes;
  g_held_bytes[tl_device] = bytes;
  return true;
}

void reset_device_faults() {
  {
    std::lock_guard<std::mutex> lock(g_memory_mutex);  // damaged guards would fault again at the next check
    for (const auto& kv : g_allocations)
      if (kv.second.device) std::memset(reinterpret_cast<unsigned char*>(kv.first) + kv.second.size, kGuardByte, kGuardBytes);
  }
  std::lock_guard<std::mutex> lock(g_fault_mutex);
  g_sticky_error.store(cudaSuccess);
  g_fault_text.clear();
  tl_last_error = cudaSuccess;
}

const ThreadPosition& position() {
  if (tl_current == nullptr) {
    std::fprintf(stderr, "[tfew cuda emulator] threadIdx/blockIdx read outside a kernel\n");
    std::abort();
  }
  return tl_current->position;
}

void sync_block() {
  tl_current->state = FiberState::AtBlockBarrier;
  yield_to_scheduler();
}

void sync_warp() {
  tl_current->state = FiberState::AtWarpBarrier;
  yield_to_scheduler();
}

uint64_t& shuffle_slot(int lane) {
  const int t = static_cast<int>(position().thread_idx.x);
  return tl_block->shuffle_slots[(t & ~31) + lane];
}

void enqueue(cudaStream_t stream, std::function<void()> work) {
  CUstream_st* s = stream_of(stream);
  if (s->capture != nullptr) {
    s->capture->nodes.push_back(std::move(work));
    return;
  }
  work();
}

namespace {
const char* trace_path() {
  static const char* path = std::getenv("TFEW_EMU_TRACE");  // read once, at the first launch
  return path != nullptr && *path != '\0' ? path : nullptr;
}
}  // namespace

bool tracing() { return trace_path() != nullptr; }

void trace(const std::string& line) {
  const char* path = trace_path();
  if (path == nullptr) return;
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  static FILE* file = std::fopen(path, "a");
  if (file == nullptr) return;
  std::fprintf(file, "%s\n", line.c_str());
  std::fflush(file);
}

void launch_grid(const char* name, const void* kernel, dim3 grid, dim3 block, size_t dynamic_shared,
                 cudaStream_t stream, std::function<void()> thread_body, bool programmatic) {
  if (sticky() != cudaSuccess) {
    record(sticky());
    return;
  }
  const unsigned long long threads = 1ULL * block.x * block.y * block.z;
  if (threads == 0 || threads > kMaxThreadsPerBlock || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) {
    std::fprintf(stderr, "[tfew cuda emulator] %s: invalid launch configuration grid (%u,%u,%u) block (%u,%u,%u)\n",
                 name, grid.x, grid.y, grid.z, block.x, block.y, block.z);
    record(cudaErrorInvalidConfiguration);
    return;
  }
  if (foreign_stream(stream, name)) {
    record(cudaErrorInvalidResourceHandle);
    return;
  }
  if (dynamic_shared > shared_limit(kernel)) {
    std::fprintf(stderr, "[tfew cuda emulator] %s: %zu bytes of dynamic shared memory, above the kernel's limit %zu\n",
                 name, dynamic_shared, shared_limit(kernel));
    record(cudaErrorInvalidValue);
    return;
  }
  g_kernel_launches[programmatic ? 1 : 0]++;
  std::string kernel_name;  // (TFEW_LAUNCH's kernel text without its spaces, as scripts/emu-translate.js writes names)
  for (const char* c = name; *c; ++c)
    if (!std::isspace(static_cast<unsigned char>(*c))) kernel_name += *c;
  enqueue(stream, [kernel_name, grid, block, dynamic_shared, programmatic, body = std::move(thread_body)]() {
    if (sticky() != cudaSuccess) return;
    if (tracing())
      trace("kernel " + kernel_name + " " + std::to_string(grid.x) + "," + std::to_string(grid.y) + "," +
            std::to_string(grid.z) + " " + std::to_string(block.x * block.y * block.z));
    run_grid(kernel_name.c_str(), grid, block, dynamic_shared, body, programmatic);
    check_guards(("after kernel " + kernel_name).c_str());
  });
}

// Shared with emu_cublas.cc: is [p, p + bytes) inside one device allocation?
bool device_range_ok(const void* p, size_t bytes, int device) {
  std::lock_guard<std::mutex> lock(g_memory_mutex);
  const Allocation* a = find_range(p, bytes);
  return a != nullptr && a->device && a->device_index == device;
}

int current_device() { return tl_device; }

// TFEW_EMU_PROBE=no-cublas (gpu/cublas_loader.cc then searches as on a GPU machine, over TFEW_CUBLAS_PATH alone).
bool machine_lacks_cublas() { return probe_fault() == ProbeFault::NoCublas; }

void wmma_alignment_fault(const void* p, unsigned ldm, size_t element_bytes) {
  device_fault(cudaErrorMisalignedAddress, "wmma load/store at " + pointer_text(p) + " with ldm " + std::to_string(ldm) +
                                               " (elements of " + std::to_string(element_bytes) +
                                               " bytes): needs a 32-byte aligned pointer and ldm a multiple of 16 bytes");
}

}  // namespace emu
}  // namespace tfew

// =========================================================================================================
// The runtime API. Every call returns the sticky error once a device fault happened, as a real context does.
using namespace tfew::emu;

#define EMU_STICKY_GUARD()                  \
  do {                                      \
    if (sticky() != cudaSuccess) return record(sticky()); \
  } while (0)

extern "C" {

cudaError_t cudaGetLastError(void) {
  if (sticky() != cudaSuccess) return sticky();
  const cudaError_t e = tl_last_error;
  tl_last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError(void) { return sticky() != cudaSuccess ? sticky() : tl_last_error; }

const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
    case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
    case cudaErrorMisalignedAddress: return "cudaErrorMisalignedAddress";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorStreamCaptureUnsupported: return "cudaErrorStreamCaptureUnsupported";
    case cudaErrorStreamCaptureInvalidated: return "cudaErrorStreamCaptureInvalidated";
    case cudaErrorStreamCaptureWrongThread: return "cudaErrorStreamCaptureWrongThread";
    case cudaErrorIllegalState: return "cudaErrorIllegalState";
    case cudaErrorNotReady: return "cudaErrorNotReady";
    default: return "cudaErrorUnknown";
  }
}

const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorIllegalAddress:
    case cudaErrorMisalignedAddress:
    case cudaErrorLaunchFailure: {
      static thread_local std::string text;
      std::lock_guard<std::mutex> lock(g_fault_mutex);
      text = "emulated device fault: " + g_fault_text;
      return text.c_str();
    }
    case cudaErrorStreamCaptureUnsupported: return "operation not permitted when stream is capturing";
    case cudaErrorStreamCaptureInvalidated: return "operation failed due to a previous error during capture";
    default: return cudaGetErrorName(e);
  }
}

cudaError_t cudaGetDeviceCount(int* count) {
  if (!count) return record(cudaErrorInvalidValue);
  const ProbeFault fault = probe_fault();
  if (fault == ProbeFault::NoDriver || fault == ProbeFault::OldDriver) return record(cudaErrorInsufficientDriver);
  if (fault == ProbeFault::NoDevice) return record(cudaErrorNoDevice);
  *count = device_count();
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  if (device < 0 || device >= device_count()) return record(cudaErrorInvalidDevice);
  tl_device = device;
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
  if (!device) return record(cudaErrorInvalidValue);
  *device = tl_device;
  return cudaSuccess;
}

cudaError_t cudaDriverGetVersion(int* version) {
  const ProbeFault fault = probe_fault();
  *version = fault == ProbeFault::NoDriver ? 0 : fault == ProbeFault::OldDriver ? 11080 : CUDART_VERSION;
  return cudaSuccess;
}

cudaError_t cudaRuntimeGetVersion(int* version) {
  *version = CUDART_VERSION;
  return cudaSuccess;
}

cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
  if (!prop) return record(cudaErrorInvalidValue);
  if (device < 0 || device >= device_count()) return record(cudaErrorInvalidDevice);
  std::memset(prop, 0, sizeof(*prop));
  std::snprintf(prop->name, sizeof prop->name, "tfew CUDA emulator (CPU)");
  const bool old_gpu = probe_fault() == ProbeFault::OldGpu;
  prop->major = old_gpu ? 7 : 9;
  prop->minor = old_gpu ? 5 : 0;
  prop->totalGlobalMem = total_memory();
  prop->multiProcessorCount = 132;
  prop->warpSize = 32;
  prop->maxThreadsPerBlock = kMaxThreadsPerBlock;
  prop->sharedMemPerBlock = kDefaultDynamicShared;
  prop->sharedMemPerBlockOptin = kMaxDynamicSharedOptin;
  prop->maxThreadsDim[0] = 1024;
  prop->maxThreadsDim[1] = 1024;
  prop->maxThreadsDim[2] = 64;
  prop->maxGridSize[0] = 2147483647;
  prop->maxGridSize[1] = 65535;
  prop->maxGridSize[2] = 65535;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (!value || device != 0) return record(cudaErrorInvalidValue);
  switch (attr) {
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = static_cast<int>(kMaxDynamicSharedOptin); break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = static_cast<int>(kDefaultDynamicShared); break;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; break;
    case cudaDevAttrMultiProcessorCount: *value = tfew::emu::g_multiprocessors.load(); break;
    case cudaDevAttrWarpSize: *value = 32; break;
    case cudaDevAttrMaxThreadsPerBlock: *value = kMaxThreadsPerBlock; break;
    default: return record(cudaErrorInvalidValue);
  }
  return cudaSuccess;
}

// What an H100's SM holds of a block of `block_size` threads with `smem` bytes of dynamic shared memory: the
// emulator counts threads and shared memory (228 KiB an SM, 1 KiB reserved per block), not registers.
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void* func, int block_size, size_t smem) {
  if (!blocks || !func || block_size <= 0 || block_size > kMaxThreadsPerBlock) return record(cudaErrorInvalidValue);
  const int by_threads = 2048 / block_size;
  const int by_smem = static_cast<int>((228 * 1024) / (smem + 1024));
  *blocks = std::max(0, std::min({by_threads, by_smem, 32}));
  return cudaSuccess;
}

cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  EMU_STICKY_GUARD();
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;
  if (value < 0 || static_cast<size_t>(value) > kMaxDynamicSharedOptin) return record(cudaErrorInvalidValue);
  std::lock_guard<std::mutex> lock(g_function_mutex);
  g_shared_limit[func] = static_cast<size_t>(value);
  return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize(void) {
  EMU_STICKY_GUARD();
  if (capture_forbids("cudaDeviceSynchronize")) {
    invalidate_thread_captures();
    return record(cudaErrorStreamCaptureUnsupported);
  }
  check_guards("at cudaDeviceSynchronize");
  return sticky() != cudaSuccess ? record(sticky()) : cudaSuccess;
}

cudaError_t cudaMalloc(void** p, size_t size) {
  EMU_STICKY_GUARD();
  if (!p) return record(cudaErrorInvalidValue);
  if (capture_forbids("cudaMalloc")) {
    invalidate_thread_captures();
    return record(cudaErrorStreamCaptureUnsupported);
  }
  std::lock_guard<std::mutex> lock(g_memory_mutex);
  const size_t rounded = (std::max<size_t>(size, 1) + 255) / 256 * 256;
  if (g_device_bytes[tl_device] + rounded > total_memory()) {
    *p = nullptr;
    return record(cudaErrorMemoryAllocation);
  }
  void* mem = std::aligned_alloc(256, rounded + ((kGuardBytes + 255) / 256) * 256);
  if (!mem) {
    *p = nullptr;
    return record(cudaErrorMemoryAllocation);
  }
  std::memset(mem, kFreshByte, size);
  std::memset(static_cast<unsigned char*>(mem) + size, kGuardByte, kGuardBytes);
  g_allocations[reinterpret_cast<uintptr_t>(mem)] = Allocation{size, true, tl_device};
  g_device_bytes[tl_device] += rounded;
  *p = mem;
  return cudaSuccess;
}

cudaError_t cudaFree(void* p) {
  if (!p) return sticky() != cudaSuccess ? record(sticky()) : cudaSuccess;  // initialises the context
  check_guards("at cudaFree");
  std::lock_guard<std::mutex> lock(g_memory_mutex);
  auto it = g_allocations.find(reinterpret_cast<uintptr_t>(p));
  if (it == g_allocations.end() || !it->second.device) return record(cudaErrorInvalidValue);
  // (CUDA frees it, but with another GPU current, one that had no context yet gets one: a few hundred MiB there)
  if (it->second.device_index != tl_device)
    std::fprintf(stderr, "[tfew cuda emulator] cudaFree of memory of device %d while device %d is current\n",
                 it->second.device_index, tl_device);
  g_device_bytes[it->second.device_index] -= (std::max<size_t>(it->second.size, 1) + 255) / 256 * 256;
  g_allocations.erase(it);
  std::free(p);
  return cudaSuccess;
}

cudaError_t cudaMallocHost(void** p, size_t size) {
  EMU_STICKY_GUARD();
  if (!p) return record(cudaErrorInvalidValue);
  void* mem = std::aligned_alloc(256, (std::max<size_t>(size, 1) + 255) / 256 * 256);
  if (!mem) return record(cudaErrorMemoryAllocation);
  std::lock_guard<std::mutex> lock(g_memory_mutex);
  g_allocations[reinterpret_cast<uintptr_t>(mem)] = Allocation{size, false};
  *p = mem;
  return cudaSuccess;
}

cudaError_t cudaFreeHost(void* p) {
  if (!p) return cudaSuccess;
  std::lock_guard<std::mutex> lock(g_memory_mutex);
  auto it = g_allocations.find(reinterpret_cast<uintptr_t>(p));
  if (it == g_allocations.end() || it->second.device) return record(cudaErrorInvalidValue);
  g_allocations.erase(it);
  std::free(p);
  return cudaSuccess;
}

cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes) {
  EMU_STICKY_GUARD();
  std::lock_guard<std::mutex> lock(g_memory_mutex);
  if (free_bytes) *free_bytes = total_memory() - g_device_bytes[tl_device];
  if (total_bytes) *total_bytes = total_memory();
  return cudaSuccess;
}

}  // extern "C"

namespace {

// Checks one side of a copy: device pointers must lie inside one device allocation; during a capture a host
// pointer must be pinned (the device cannot copy from pageable memory asynchronously inside a graph).
cudaError_t check_copy_side(const void* p, size_t bytes, bool device_side, bool capturing, const char* what) {
  if (bytes == 0) return cudaSuccess;
  std::lock_guard<std::mutex> lock(g_memory_mutex);
  const Allocation* a = find_range(p, bytes);
  if (device_side) {
    if (a == nullptr || !a->device) {
      std::fprintf(stderr, "[tfew cuda emulator] %s: %zu bytes at %s are not inside one device allocation\n", what, bytes,
                   pointer_text(p).c_str());
      return cudaErrorInvalidValue;
    }
  } else if (a != nullptr && a->device) {
    std::fprintf(stderr, "[tfew cuda emulator] %s: host side %s is device memory\n", what, pointer_text(p).c_str());
    return cudaErrorInvalidValue;
  } else if (capturing && a == nullptr) {
    std::fprintf(stderr, "[tfew cuda emulator] %s from pageable host memory inside a graph capture\n", what);
    return cudaErrorStreamCaptureUnsupported;
  }
  return cudaSuccess;
}

cudaError_t copy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t stream, bool async) {
  EMU_STICKY_GUARD();
  const bool capturing = stream_of(stream)->capture != nullptr && async;
  if (!async && capture_forbids("cudaMemcpy")) {
    invalidate_thread_captures();
    return record(cudaErrorStreamCaptureUnsupported);
  }
  const bool dst_device = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
  const bool src_device = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
  if (kind == cudaMemcpyHostToHost || kind == cudaMemcpyDefault) {  // unchecked, but ordered like the others
    enqueue(async ? stream : nullptr, [dst, src, bytes]() { std::memmove(dst, src, bytes); });
    return cudaSuccess;
  }
  cudaError_t e = check_copy_side(dst, bytes, dst_device, capturing, "cudaMemcpy destination");
  if (e == cudaSuccess) e = check_copy_side(src, bytes, src_device, capturing, "cudaMemcpy source");
  if (e != cudaSuccess) {
    if (capturing) stream_of(stream)->capture_invalidated = true;
    return record(e);
  }
  enqueue(async ? stream : nullptr, [dst, src, bytes]() { std::memmove(dst, src, bytes); });
  return cudaSuccess;
}

}  // namespace

extern "C" {

cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
  const cudaError_t e = copy(dst, src, bytes, kind, nullptr, false);
  if (e == cudaSuccess) check_guards("at cudaMemcpy");
  return e;
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t stream) {
  return copy(dst, src, bytes, kind, stream, true);
}

cudaError_t cudaMemset(void* p, int value, size_t bytes) {
  EMU_STICKY_GUARD();
  if (capture_forbids("cudaMemset")) {
    invalidate_thread_captures();
    return record(cudaErrorStreamCaptureUnsupported);
  }
  const cudaError_t e = check_copy_side(p, bytes, true, false, "cudaMemset");
  if (e != cudaSuccess) return record(e);
  std::memset(p, value, bytes);
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t stream) {
  EMU_STICKY_GUARD();
  const cudaError_t e = check_copy_side(p, bytes, true, false, "cudaMemsetAsync");
  if (e != cudaSuccess) return record(e);
  enqueue(stream, [p, value, bytes]() { std::memset(p, value, bytes); });
  return cudaSuccess;
}

cudaError_t cudaStreamCreate(cudaStream_t* stream) {
  EMU_STICKY_GUARD();
  *stream = new CUstream_st();
  (*stream)->device = tl_device;
  return cudaSuccess;
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned int) { return cudaStreamCreate(stream); }

cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  if (!stream) return record(cudaErrorInvalidResourceHandle);
  delete stream;
  return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
  EMU_STICKY_GUARD();
  if (stream_of(stream)->capture != nullptr || capture_forbids("cudaStreamSynchronize")) {
    invalidate_thread_captures();
    stream_of(stream)->capture_invalidated = true;
    return record(cudaErrorStreamCaptureUnsupported);
  }
  check_guards("at cudaStreamSynchronize");
  return sticky() != cudaSuccess ? record(sticky()) : cudaSuccess;
}

cudaError_t cudaStreamQuery(cudaStream_t) {
  EMU_STICKY_GUARD();
  return cudaSuccess;
}

cudaError_t cudaStreamWaitEvent(cudaStream_t, cudaEvent_t, unsigned int) {
  EMU_STICKY_GUARD();
  return cudaSuccess;  // streams run their work at once, so every recorded event has happened
}

cudaError_t cudaStreamBeginCapture(cudaStream_t stream, cudaStreamCaptureMode) {
  EMU_STICKY_GUARD();
  if (!stream) return record(cudaErrorStreamCaptureUnsupported);  // the legacy stream cannot be captured
  if (stream->capture) return record(cudaErrorIllegalState);
  stream->capture = new CUgraph_st();
  stream->capture_invalidated = false;
  stream->capture_thread = std::this_thread::get_id();
  ++tl_captures;
  std::lock_guard<std::mutex> lock(g_capture_mutex);
  g_capturing.push_back(stream);
  return cudaSuccess;
}

cudaError_t cudaStreamEndCapture(cudaStream_t stream, cudaGraph_t* graph) {
  if (!stream || !stream->capture) return record(cudaErrorIllegalState);
  if (stream->capture_thread != std::this_thread::get_id()) return record(cudaErrorStreamCaptureWrongThread);
  cudaGraph_t g = stream->capture;
  stream->capture = nullptr;
  --tl_captures;
  {
    std::lock_guard<std::mutex> lock(g_capture_mutex);
    for (auto it = g_capturing.begin(); it != g_capturing.end(); ++it)
      if (*it == stream) {
        g_capturing.erase(it);
        break;
      }
  }
  if (stream->capture_invalidated) {
    delete g;
    *graph = nullptr;
    return record(cudaErrorStreamCaptureInvalidated);
  }
  *graph = g;
  return cudaSuccess;
}

cudaError_t cudaStreamIsCapturing(cudaStream_t stream, cudaStreamCaptureStatus* status) {
  *status = stream_of(stream)->capture ? cudaStreamCaptureStatusActive : cudaStreamCaptureStatusNone;
  return cudaSuccess;
}

// An executable graph holds device memory on a GPU (its nodes' parameters and launch descriptors), so
// instantiating one fails with cudaErrorMemoryAllocation when the device is full, as it can after a reservation
// took the device to its last MiB. Modelled as 1 KiB per node (a guess: the real size is undocumented);
// set_graph_exec_bytes (a test hook) sets a fixed size per graph instead, to fill the device.
static size_t graph_exec_bytes(size_t nodes) {
  const long long fixed = tfew::emu::g_graph_exec_bytes.load();
  return fixed >= 0 ? static_cast<size_t>(fixed) : nodes * 1024;
}

cudaError_t cudaGraphInstantiate(cudaGraphExec_t* exec, cudaGraph_t graph, unsigned long long) {
  EMU_STICKY_GUARD();
  if (!exec || !graph) return record(cudaErrorInvalidValue);
  const size_t bytes = graph_exec_bytes(graph->nodes.size());
  {
    std::lock_guard<std::mutex> lock(g_memory_mutex);
    if (g_device_bytes[tl_device] + bytes > total_memory()) {
      *exec = nullptr;
      return record(cudaErrorMemoryAllocation);
    }
    g_device_bytes[tl_device] += bytes;
  }
  *exec = new CUgraphExec_st{graph->nodes, bytes, tl_device};
  return cudaSuccess;
}

cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t stream) {
  EMU_STICKY_GUARD();
  if (!exec) return record(cudaErrorInvalidValue);
  if (foreign_stream(stream, "cudaGraphLaunch")) return record(cudaErrorInvalidResourceHandle);
  // (fail_graph_launches: a launch that finds no device memory for the graph's upload; not sticky)
  for (int left = tfew::emu::g_failing_graph_launches.load(); left > 0;)
    if (tfew::emu::g_failing_graph_launches.compare_exchange_weak(left, left - 1)) return record(cudaErrorMemoryAllocation);
  enqueue(stream, [exec]() {
    for (const auto& node : exec->nodes) {
      if (sticky() != cudaSuccess) return;
      node();
    }
  });
  return cudaSuccess;
}

cudaError_t cudaGraphDestroy(cudaGraph_t graph) {
  delete graph;
  return cudaSuccess;
}

cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec) {
  if (exec) {
    std::lock_guard<std::mutex> lock(g_memory_mutex);
    g_device_bytes[exec->device] -= exec->device_bytes;
  }
  delete exec;
  return cudaSuccess;
}

cudaError_t cudaEventCreate(cudaEvent_t* event) {
  EMU_STICKY_GUARD();
  *event = new CUevent_st();
  (*event)->device = tl_device;
  return cudaSuccess;
}

cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned int) { return cudaEventCreate(event); }

cudaError_t cudaEventDestroy(cudaEvent_t event) {
  delete event;
  return cudaSuccess;
}

cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
  EMU_STICKY_GUARD();
  if (!event) return record(cudaErrorInvalidResourceHandle);
  if (foreign_stream(stream, "cudaEventRecord")) return record(cudaErrorInvalidResourceHandle);
  if (event->device != stream_of(stream)->device && stream != nullptr) {
    std::fprintf(stderr, "[tfew cuda emulator] cudaEventRecord: an event of device %d on a stream of device %d\n",
                 event->device, stream->device);
    return record(cudaErrorInvalidResourceHandle);
  }
  enqueue(stream, [event]() {
    event->time_ms = now_ms();
    event->recorded = true;
  });
  return cudaSuccess;
}

cudaError_t cudaEventSynchronize(cudaEvent_t event) {
  EMU_STICKY_GUARD();
  if (!event) return record(cudaErrorInvalidResourceHandle);
  return cudaSuccess;
}

cudaError_t cudaEventQuery(cudaEvent_t event) {
  EMU_STICKY_GUARD();
  return event && event->recorded ? cudaSuccess : cudaErrorNotReady;
}

cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) {
  EMU_STICKY_GUARD();
  if (!ms || !start || !end) return record(cudaErrorInvalidResourceHandle);
  if (!start->recorded || !end->recorded) return record(cudaErrorNotReady);
  *ms = static_cast<float>(end->time_ms - start->time_ms);
  return cudaSuccess;
}

}  // extern "C"
