// Owners of device and pinned host allocations. Allocation failures throw typed errors (OutOfMemory says how
// much was asked for and how much is free); destructors free without throwing.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

#include "gpu/cuda_check.h"

namespace tfew {
namespace gpu {

inline std::string mib_text(size_t bytes) {
  return std::to_string((bytes + (1u << 20) - 1) >> 20) + " MiB";
}

class DeviceMemory {
 public:
  DeviceMemory() = default;
  ~DeviceMemory() { reset(); }
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;

  void allocate(size_t bytes, const char* what) {
    reset();
    if (bytes == 0) return;
    void* p = nullptr;
    const cudaError_t e = cudaMalloc(&p, bytes);
    if (e != cudaSuccess) {
      cudaGetLastError();  // allocation failures are not sticky: clear them
      if (e == cudaErrorMemoryAllocation) {
        size_t free_bytes = 0, total_bytes = 0;
        cudaMemGetInfo(&free_bytes, &total_bytes);
        cudaGetLastError();
        fail(ErrorCode::OutOfMemory, std::string("out of GPU memory: ") + what + " needs " + mib_text(bytes) +
                                         ", " + mib_text(free_bytes) + " free of " + mib_text(total_bytes));
      }
      throw_cuda_error(e, "cudaMalloc", __FILE__, __LINE__);
    }
    ptr_ = static_cast<char*>(p);
    size_ = bytes;
  }
  void reset() {
    if (ptr_) cudaFree(ptr_);
    ptr_ = nullptr;
    size_ = 0;
  }
  char* get() const { return ptr_; }
  size_t size() const { return size_; }

 private:
  char* ptr_ = nullptr;
  size_t size_ = 0;
};

// Page-locked host memory: what asynchronous copies need to overlap with host work.
class PinnedMemory {
 public:
  PinnedMemory() = default;
  ~PinnedMemory() { reset(); }
  PinnedMemory(const PinnedMemory&) = delete;
  PinnedMemory& operator=(const PinnedMemory&) = delete;

  void allocate(size_t bytes) {
    reset();
    if (bytes == 0) return;
    void* p = nullptr;
    const cudaError_t e = cudaMallocHost(&p, bytes);
    if (e != cudaSuccess) {
      cudaGetLastError();
      fail(ErrorCode::OutOfMemory, "could not allocate " + mib_text(bytes) + " of pinned host memory: " +
                                       cudaGetErrorString(e));
    }
    ptr_ = static_cast<char*>(p);
    size_ = bytes;
  }
  // Grows (never shrinks) to at least `bytes`.
  void reserve(size_t bytes) {
    if (bytes > size_) allocate(bytes + bytes / 4);
  }
  void reset() {
    if (ptr_) cudaFreeHost(ptr_);
    ptr_ = nullptr;
    size_ = 0;
  }
  char* get() const { return ptr_; }
  size_t size() const { return size_; }

 private:
  char* ptr_ = nullptr;
  size_t size_ = 0;
};

inline size_t align_up(size_t v, size_t a) { return (v + a - 1) / a * a; }

// Hands out aligned sub-ranges of one allocation. With base 0 it only measures (pointers are then offsets).
class Placer {
 public:
  explicit Placer(uintptr_t base, size_t start = 0) : base_(base), cursor_(start) {}
  template <typename D>
  D* place(size_t count) {
    const size_t off = align_up(cursor_, 256);  // 256 B: cuBLAS and vector loads like aligned operands
    cursor_ = off + count * sizeof(D);
    return reinterpret_cast<D*>(base_ + off);
  }
  size_t cursor() const { return cursor_; }
  void set_cursor(size_t c) { cursor_ = c; }

 private:
  uintptr_t base_;
  size_t cursor_;
};

}  // namespace gpu
}  // namespace tfew
