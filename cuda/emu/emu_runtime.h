// The CUDA emulator: runs the CUDA backend (cuda/gpu, cuda/kernels) on the CPU, so that machines without a
// GPU (this one, CI) execute every kernel, cuBLAS call, stream, event and graph of the real code path and
// check it against the CPU reference backend. Built only into the separate emulation addon
// (TFEW_CUDA=EMU, `npm run build:emu`); never part of the addon users install.
//
// What is emulated, and how faithfully:
// - The CUDA runtime API (cudaMalloc, cudaMemcpyAsync, streams, events, graphs, device properties) is
//   implemented on host memory (emu_runtime.cc). Streams run their work at once, in order; a stream that is
//   being captured records it into the graph instead, and replays it at cudaGraphLaunch. Calls that are
//   illegal during a capture (synchronous copies, cudaMalloc, copies from pageable memory) invalidate it, as
//   on a GPU.
// - Kernels: scripts/emu-translate.js rewrites `k<<<grid, block, smem, stream>>>(args)` into a call of
//   launch() below. Every CUDA thread is a fiber; one block's fibers run on one host thread and switch at
//   __syncthreads, __syncwarp and warp shuffles, so barriers, shared memory and warp reductions behave as
//   on the device. A barrier that can never complete (a divergent __syncthreads) is reported as an error.
// - Launch checks as on a device of compute capability 9.0: at most 1024 threads per block, grid limits,
//   48 KiB of dynamic shared memory unless cudaFuncSetAttribute raised it (up to 227 KiB).
// - Memory checks: new device allocations are filled with 0xFF bytes (NaN in fp32 and bf16, -1 in int32),
//   so reading memory that was never written shows up as NaN; each allocation has guard bytes after it,
//   checked at every synchronisation and free; copies and memsets must lie inside one allocation.
// - cuBLAS (emu_cublas.cc): the GEMMs we call, in fp32 on the CPU, with bf16 or fp32 inputs and outputs.
// - Tensor cores: nvcuda::wmma (cuda/emu/include/mma.h) multiplies bf16 tiles with fp32 accumulation.
// - Races: threads run from barrier to barrier one after another, first to last, or last to first with
//   TFEW_EMU_SCHEDULE=reverse; a result that depends on the order shows a missing barrier.
// - Several GPUs (TFEW_EMU_DEVICES=n): each thread has a current device; streams, events, graphs, memory and
//   cuBLAS handles belong to the device current at their creation. Kernel launches, event records and graph
//   launches on another device's stream fail (cudaErrorInvalidResourceHandle, as on a GPU), cuBLAS refuses
//   operands in another device's memory (a GPU would fault), and cudaFree with another device current is reported
//   on stderr (CUDA allows it, but it creates a context there): a missing cudaSetDevice shows. Kernels' own
//   pointers are not checked, and one device fault stops every emulated GPU (a GPU loses only its own context).
// Not emulated: timing (events measure host time), concurrency between streams, memory-model subtleties.
#pragma once
#include <cuda_runtime_api.h>
#include <vector_types.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

namespace tfew {
namespace emu {

// Runs `work` on `stream` now, or records it when the stream is being captured into a graph.
void enqueue(cudaStream_t stream, std::function<void()> work);

// TFEW_EMU_TRACE=<file>: each kernel and emulated cuBLAS call appends one line there when it runs (graph
// replays included): "kernel <name> <grid x,y,z> <block>" or "gemm <call> <m n k batch>". What a step launches,
// counted without a GPU (benchmarks/launch-count.ts tallies it). Callers build the line only when tracing().
bool tracing();
void trace(const std::string& line);

// Reports a failure inside emulated device code (a bad barrier, a guard overwritten): the error becomes
// sticky, as a device fault does, and later CUDA calls return it.
void device_fault(cudaError_t error, const std::string& what);

// Whether [p, p + bytes) lies inside one allocation of `device`'s memory (the emulated libraries check their
// operands: a GPU's kernels cannot read another GPU's memory unless peer access is enabled, which we never do).
bool device_range_ok(const void* p, size_t bytes, int device);
// The calling thread's current device (cudaSetDevice).
int current_device();

// The position of the calling emulated thread.
struct ThreadPosition {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
  unsigned char* dynamic_shared;
};
const ThreadPosition& position();

// Barriers of the calling emulated thread.
void sync_block();  // __syncthreads
void sync_warp();   // __syncwarp

// The warp-exchange slot of a lane: a shuffle writes its value, waits for the warp, reads the source lane's
// slot, and waits again before the slot can be reused.
uint64_t& shuffle_slot(int lane);

template <typename T>
T shuffle(T value, int source_lane) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable<T>::value, "shuffle of a large type");
  const int lane = static_cast<int>(position().thread_idx.x) & 31;  // blocks are 1-D in our kernels
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  shuffle_slot(lane) = bits;
  sync_warp();
  bits = shuffle_slot(source_lane & 31);
  sync_warp();
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

// Runs `thread_body` for every thread of the grid (after the launch checks), on `stream`.
// programmatic: launched to overlap the previous kernel (kernels/launch.cuh); then every thread must call
// programmatic_wait() before it ends, or the launch faults.
void launch_grid(const char* name, const void* kernel, dim3 grid, dim3 block, size_t dynamic_shared,
                 cudaStream_t stream, std::function<void()> thread_body, bool programmatic = false);

// kernel<<<grid, block, shared, stream>>>(args...) as scripts/emu-translate.js writes it (with
// the defaults 0 and the legacy stream filled in). The arguments are
// converted to the kernel's parameter types and copied, as a CUDA launch does.
// TFEW_LAUNCH's launch (kernels/launch.cuh), programmatic or not.
template <typename... Params, typename... Args>
void launch_kernel(const char* name, dim3 grid, dim3 block, size_t dynamic_shared, cudaStream_t stream,
                   bool programmatic, void (*kernel)(Params...), Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "kernel launched with the wrong number of arguments");
  std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  launch_grid(name, reinterpret_cast<const void*>(kernel), grid, block, dynamic_shared, stream,
              [kernel, params]() { std::apply(kernel, params); }, programmatic);
}

template <typename... Params, typename... Args>
void launch(const char* name, dim3 grid, dim3 block, size_t dynamic_shared, cudaStream_t stream,
            void (*kernel)(Params...), Args&&... args) {
  launch_kernel(name, grid, block, dynamic_shared, stream, false, kernel, std::forward<Args>(args)...);
}

// wait_for_previous_kernel() in a kernel thread: marks the thread as having waited.
void programmatic_wait();
}  // namespace emu
}  // namespace tfew
