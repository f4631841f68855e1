// How our kernels are launched: TFEW_LAUNCH(grid, block, shared, stream, kernel)(args...), and the rule every
// kernel keeps so that a launch may overlap the kernel before it (programmatic dependent launch, cc 9.0+).
//
// On a stream where the engine switched it on (set_programmatic_launch; cuda.programmaticLaunch), a launch carries
// cudaLaunchAttributeProgrammaticStreamSerialization: the GPU may schedule this kernel's blocks while the kernel
// before it in the stream is still finishing, instead of after it has ended. A CUDA graph captured from the stream
// keeps this as a programmatic edge. Between dependent kernels of a latency-bound call (RANK-3B-B1: ~500 launches,
// each a few microseconds of work) that is the launch gap and the ramp-up of each kernel.
//
// The rule (kept by every __global__ in cuda/kernels; test/kernel-launch-rule.test.ts checks the sources, the
// emulator checks every thread of a programmatic launch at run time): a kernel calls wait_for_previous_kernel()
// before it reads or writes global memory that earlier work writes or reads: as its first statement, but for the
// few-row linears, which request their first chunks of constant data (the weights) before it. (So no kernel that
// writes weights, such as the adapter merge's scale_rows, may run right before a few-row kernel: none does; the
// merge synchronises the stream.) The wait returns once the previous kernel has ended and its writes are visible;
// the same call then lets the next kernel be scheduled.
// Since every kernel waits, each ends after its predecessor ended: the order of a stream is kept transitively.
// Other work in the stream (cuBLAS, copies, event records) is ordered as always.
#pragma once
#include <cuda_runtime.h>

#include <utility>

#include "gpu/cuda_check.h"
#include "kernels/kernels.cuh"
#if defined(TFEW_CUDA_EMULATION)
#include "emu/emu_runtime.h"
#endif

namespace tfew {
namespace kernels {

__device__ __forceinline__ void wait_for_previous_kernel() {
#if defined(TFEW_CUDA_EMULATION)
  ::tfew::emu::programmatic_wait();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

template <typename... Params>
struct KernelLaunch {
  const char* name;
  const char* file;  // the launch site (TFEW_LAUNCH's), for errors
  int line;
  void (*kernel)(Params...);
  dim3 grid, block;
  size_t shared;
  cudaStream_t stream;

  template <typename... Args>
  void operator()(Args&&... args) const {
    static_assert(sizeof...(Params) == sizeof...(Args), "kernel launched with the wrong number of arguments");
    const bool overlap = programmatic_launch(stream);
#if defined(TFEW_CUDA_EMULATION)
    ::tfew::emu::launch_kernel(name, grid, block, shared, stream, overlap, kernel, std::forward<Args>(args)...);
#else
    if (!overlap) {
      kernel<<<grid, block, shared, stream>>>(std::forward<Args>(args)...);
      return;
    }
    cudaLaunchAttribute attribute[1];
    attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute[0].val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t config = {};
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = shared;
    config.stream = stream;
    config.attrs = attribute;
    config.numAttrs = 1;
    const cudaError_t error = cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
    if (error != cudaSuccess) {
      (void)cudaGetLastError();  // (taken here, not left for the next launch's check)
      ::tfew::gpu::throw_cuda_error(error, name, file, line);
    }
#endif
  }
};

template <typename... Params>
KernelLaunch<Params...> make_launch(const char* name, const char* file, int line, void (*kernel)(Params...), dim3 grid,
                                    dim3 block, size_t shared, cudaStream_t stream) {
  return KernelLaunch<Params...>{name, file, line, kernel, grid, block, shared, stream};
}

}  // namespace kernels
}  // namespace tfew

// The kernel comes last so that a template-id's commas need no parentheses; its text names it in the emulator's
// launch trace and errors.
#define TFEW_LAUNCH(grid, block, shared, stream, ...) \
  ::tfew::kernels::make_launch(#__VA_ARGS__, __FILE__, __LINE__, __VA_ARGS__, grid, block, shared, stream)
