// Memory for the CPU backend's float buffers. A call allocates and frees the same few hundred activation and
// gradient buffers every time; from the system, each large one is fresh pages that the kernel faults in and
// clears one by one (half of a training step's time at T5-small width: TRAIN-B8 3.9 s against 2.0 s with freed
// memory reused). So blocks of kMinCachedBytes and more are kept when freed and handed to a later request of at
// most their size and at least 4/5 of it. What is kept is bounded twice: blocks that the next two calls did not
// reuse go back to the system (so one large call does not leave its memory to a service of small ones), and at
// most TFEW_CPU_BUFFER_CACHE_MB (default kScratchCacheBytes; 0: no cache) wait, the oldest leaving first. The
// cache is process-wide (models share it), thread-safe, and emptied at dispose() and when the last CPU engine
// goes (scratch_trim), and before a fresh block is given up on for want of memory.
#pragma once
#include <cstddef>
#include <vector>

namespace tfew {
namespace cpu {

constexpr size_t kMinCachedBytes = size_t{256} << 10;  // smaller blocks: malloc's own free lists serve them
constexpr size_t kScratchCacheBytes = size_t{2} << 30;

void* scratch_allocate(size_t bytes);          // throws std::bad_alloc
void scratch_release(void* block, size_t bytes);  // bytes: as allocated
void scratch_new_call();                       // a model call starts: blocks idle for two calls go
void scratch_trim();                           // frees every cached block
size_t scratch_cached_bytes();                 // held for reuse now
// Tests only: the next n fresh blocks the system is asked for fail as if memory were out (the cache is then emptied
// and the request tried once more; a second failure is std::bad_alloc). 0 ends it. Returns how many were pending.
int scratch_fail_fresh_blocks(int n);

template <typename T>
struct ScratchAllocator {
  using value_type = T;
  ScratchAllocator() noexcept = default;
  template <typename U>
  ScratchAllocator(const ScratchAllocator<U>&) noexcept {}
  T* allocate(size_t n) { return static_cast<T*>(scratch_allocate(n * sizeof(T))); }
  void deallocate(T* p, size_t n) noexcept { scratch_release(p, n * sizeof(T)); }
  template <typename U>
  bool operator==(const ScratchAllocator<U>&) const noexcept { return true; }
  template <typename U>
  bool operator!=(const ScratchAllocator<U>&) const noexcept { return false; }
};

// Held by each CPU engine: the cache is emptied when the last one goes.
class ScratchUser {
 public:
  ScratchUser();
  ~ScratchUser();
  ScratchUser(const ScratchUser&) = delete;
  ScratchUser& operator=(const ScratchUser&) = delete;
};

// A float buffer of the CPU backend: a std::vector whose large blocks come from the cache above.
using FloatBuffer = std::vector<float, ScratchAllocator<float>>;

}  // namespace cpu
}  // namespace tfew
