// The CPU backend's block cache (scratch.h says why). Freed blocks wait in two indexes: by size (a request takes
// the smallest that fits) and by age (the oldest go first when the cache is over its limit, and blocks that no
// call has reused for kKeepCalls calls go at the start of the next one).
#include "scratch.h"

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <new>
#include <unordered_map>

namespace tfew {
namespace cpu {
namespace {

constexpr size_t kGranule = size_t{64} << 10;  // block sizes are multiples of this (and of the 64-byte alignment)
constexpr uint64_t kKeepCalls = 2;              // a block unused for this many calls goes back to the system

struct FreeBlock {
  void* block;
  size_t size;
  uint64_t call;  // the call count when it was freed
};

struct BlockCache {
  std::mutex mu;
  std::map<uint64_t, FreeBlock> by_age;          // free order -> block
  std::multimap<size_t, uint64_t> by_size;       // size -> free order
  std::unordered_map<void*, size_t> sizes;       // block handed out -> its size (it may exceed the request)
  size_t cached = 0;
  uint64_t freed = 0, calls = 0;
  int users = 0;                                 // live ScratchUsers
  size_t limit = scratch_limit_from_env();

  static size_t scratch_limit_from_env() {
    const char* mb = std::getenv("TFEW_CPU_BUFFER_CACHE_MB");
    if (!mb || !*mb) return kScratchCacheBytes;
    char* end = nullptr;
    const unsigned long long v = std::strtoull(mb, &end, 10);
    return *end == '\0' ? static_cast<size_t>(v) << 20 : kScratchCacheBytes;
  }

  void drop(std::map<uint64_t, FreeBlock>::iterator it) {  // (lock held)
    auto [first, last] = by_size.equal_range(it->second.size);
    for (auto s = first; s != last; ++s)
      if (s->second == it->first) {
        by_size.erase(s);
        break;
      }
    cached -= it->second.size;
    std::free(it->second.block);
    by_age.erase(it);
  }

  void drop_all() {  // (lock held)
    for (auto& [order, f] : by_age) std::free(f.block);
    by_age.clear();
    by_size.clear();
    cached = 0;
  }
};

BlockCache& cache() {
  static BlockCache* c = new BlockCache;  // never destroyed: static buffers may be freed after it at exit
  return *c;
}

// Tests only (scratch_fail_fresh_blocks): how many of the next fresh-block allocations fail as if out of memory.
std::atomic<int> g_failing_allocations{0};

void* system_block(size_t size) {
  for (int n = g_failing_allocations.load(); n > 0;)
    if (g_failing_allocations.compare_exchange_weak(n, n - 1)) return nullptr;
  return std::aligned_alloc(64, size);
}

void* fresh_block(BlockCache& c, size_t size) {
  void* p = system_block(size);
  if (!p) {  // the cache's idle blocks first, then once more
    {
      std::lock_guard<std::mutex> lock(c.mu);
      c.drop_all();
    }
    p = system_block(size);
    if (!p) throw std::bad_alloc();
  }
  return p;
}

}  // namespace

void* scratch_allocate(size_t bytes) {
  if (bytes < kMinCachedBytes) {
    void* p = std::malloc(bytes == 0 ? 1 : bytes);
    if (!p) throw std::bad_alloc();
    return p;
  }
  const size_t size = (bytes + kGranule - 1) / kGranule * kGranule;
  BlockCache& c = cache();
  {
    std::lock_guard<std::mutex> lock(c.mu);
    auto s = c.by_size.lower_bound(size);
    if (s != c.by_size.end() && s->first <= size + size / 4) {
      auto it = c.by_age.find(s->second);
      void* p = it->second.block;
      c.sizes.emplace(p, s->first);  // (may throw bad_alloc: the block stays cached, nothing is lost)
      c.cached -= s->first;
      c.by_age.erase(it);
      c.by_size.erase(s);
      return p;
    }
  }
  void* p = fresh_block(c, size);
  try {
    std::lock_guard<std::mutex> lock(c.mu);
    c.sizes.emplace(p, size);
  } catch (...) {
    std::free(p);
    throw;
  }
  return p;
}

void scratch_release(void* block, size_t bytes) {
  if (!block) return;
  if (bytes < kMinCachedBytes) {
    std::free(block);
    return;
  }
  BlockCache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  auto it = c.sizes.find(block);
  const size_t size = it->second;
  c.sizes.erase(it);
  if (size > c.limit) {
    std::free(block);
    return;
  }
  const uint64_t order = c.freed++;
  try {
    c.by_age.emplace(order, FreeBlock{block, size, c.calls});
    try {
      c.by_size.emplace(size, order);
    } catch (...) {
      c.by_age.erase(order);
      throw;
    }
  } catch (...) {  // (no memory for the index: the block goes back instead)
    std::free(block);
    return;
  }
  c.cached += size;
  while (c.cached > c.limit) c.drop(c.by_age.begin());  // the oldest first
}

int scratch_fail_fresh_blocks(int n) { return g_failing_allocations.exchange(n > 0 ? n : 0); }

void scratch_new_call() {
  BlockCache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  ++c.calls;
  while (!c.by_age.empty() && c.by_age.begin()->second.call + kKeepCalls < c.calls) c.drop(c.by_age.begin());
}

void scratch_trim() {
  BlockCache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  c.drop_all();
}

ScratchUser::ScratchUser() {
  std::lock_guard<std::mutex> lock(cache().mu);
  ++cache().users;
}

ScratchUser::~ScratchUser() {
  bool last;
  {
    std::lock_guard<std::mutex> lock(cache().mu);
    last = --cache().users == 0;
  }
  if (last) scratch_trim();
}

size_t scratch_cached_bytes() {
  BlockCache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  return c.cached;
}

}  // namespace cpu
}  // namespace tfew
