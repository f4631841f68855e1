// The CPU backend's block cache (scratch.h says why).
#include "scratch.h"

#include <cstdlib>
#include <map>
#include <mutex>
#include <new>
#include <unordered_map>

namespace tfew {
namespace cpu {
namespace {

constexpr size_t kGranule = size_t{64} << 10;  // block sizes are multiples of this (and of the 64-byte alignment)

struct BlockCache {
  std::mutex mu;
  std::multimap<size_t, void*> free_blocks;  // size -> block, kept for reuse
  std::unordered_map<void*, size_t> sizes;   // block handed out -> its size (it may exceed the request)
  size_t cached = 0;
  int users = 0;  // live ScratchUsers
};

BlockCache& cache() {
  static BlockCache* c = new BlockCache;  // never destroyed: static buffers may be freed after it at exit
  return *c;
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
    auto it = c.free_blocks.lower_bound(size);
    if (it != c.free_blocks.end() && it->first <= size + size / 4) {
      void* p = it->second;
      c.sizes.emplace(p, it->first);
      c.cached -= it->first;
      c.free_blocks.erase(it);
      return p;
    }
  }
  void* p = std::aligned_alloc(64, size);
  if (!p) throw std::bad_alloc();
  std::lock_guard<std::mutex> lock(c.mu);
  c.sizes.emplace(p, size);
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
  if (size > kScratchCacheBytes) {
    std::free(block);
    return;
  }
  c.free_blocks.emplace(size, block);
  c.cached += size;
  while (c.cached > kScratchCacheBytes) {  // over the limit: the smallest blocks go first
    auto smallest = c.free_blocks.begin();
    c.cached -= smallest->first;
    std::free(smallest->second);
    c.free_blocks.erase(smallest);
  }
}

void scratch_trim() {
  BlockCache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  for (auto& [size, block] : c.free_blocks) std::free(block);
  c.free_blocks.clear();
  c.cached = 0;
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
