// A kernel that only waits: enqueued before timed work, it lets the host queue that work up behind it, so that
// events around the work measure the GPU's time for it and not the host's rate of launching it (the GEMM tuner,
// gpu/gemm.cc, times calls of a few microseconds).
#include "kernels/device_common.cuh"

namespace tfew {
namespace kernels {

namespace {
__global__ void delay_kernel(unsigned long long nanoseconds) {
  wait_for_previous_kernel();
#if !defined(TFEW_CUDA_EMULATION)
  unsigned long long start, now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  do {
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  } while (now - start < nanoseconds);
#else
  (void)nanoseconds;  // (the emulator runs the queue as the host enqueues it: nothing to wait for)
#endif
}
}  // namespace

void device_delay(int microseconds, cudaStream_t stream) {
  if (microseconds <= 0) return;
  TFEW_LAUNCH(1, 1, 0, stream, delay_kernel)(static_cast<unsigned long long>(microseconds) * 1000ull);
  TFEW_CUDA_CHECK_LAUNCH("delay_kernel");
}

}  // namespace kernels
}  // namespace tfew
