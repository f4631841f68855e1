// Device helpers shared by the kernel files: conversions between the storage type and fp32, warp and block
// reductions, and the launch check. Only included by .cu files.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <map>
#include <mutex>
#include <utility>
#include <type_traits>
#if defined(TFEW_CUDA_EMULATION)
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "emu/emu_runtime.h"
#endif

#include "gpu/cuda_check.h"
#include "kernels/kernels.cuh"
#include "kernels/launch.cuh"

namespace tfew {
namespace kernels {

// ---- alignment: a GPU faults (cudaErrorMisalignedAddress) on a vector access, ldmatrix row or cp.async whose
// address is not a multiple of its size. The emulator checks every one, so such a fault shows up without a GPU.
__device__ __forceinline__ void check_aligned(const void* p, unsigned bytes, const char* what) {
#if defined(TFEW_CUDA_EMULATION)
  const uintptr_t address = reinterpret_cast<uintptr_t>(p);
  if (address % bytes != 0)
    ::tfew::emu::device_fault(cudaErrorMisalignedAddress, std::string(what) + " of " + std::to_string(bytes) +
                                                              " bytes at address " + std::to_string(address) +
                                                              ", not a multiple of " + std::to_string(bytes));
#else
  (void)p, (void)bytes, (void)what;
#endif
}
// p as a pointer to the vector type V (uint2, uint4, float2, float4: one access of sizeof(V) bytes); every
// vector access in the kernels goes through here (test/kernel-launch-rule checks the sources).
template <typename V>
__device__ __forceinline__ const V* as_vector(const void* p) {
  check_aligned(p, sizeof(V), "vector access");
  return reinterpret_cast<const V*>(p);
}
template <typename V>
__device__ __forceinline__ V* as_vector(void* p) {
  check_aligned(p, sizeof(V), "vector access");
  return reinterpret_cast<V*>(p);
}

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

constexpr unsigned kFullMask = 0xffffffffu;

// Four consecutive elements as one vector access (16 bytes of fp32, 8 of bf16): memory-bound kernels move
// more bytes per instruction this way. The pointer must be aligned to the access (aligned_x4).
__device__ __forceinline__ void load_x4(const float* p, float (&v)[4]) {
  const float4 q = *as_vector<float4>(p);
  v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
}
__device__ __forceinline__ void load_x4(const __nv_bfloat16* p, float (&v)[4]) {
  const uint2 q = *as_vector<uint2>(p);
  const __nv_bfloat16* e = reinterpret_cast<const __nv_bfloat16*>(&q);
  for (int u = 0; u < 4; ++u) v[u] = __bfloat162float(e[u]);
}
__device__ __forceinline__ void store_x4(float* p, const float (&v)[4]) {
  *as_vector<float4>(p) = make_float4(v[0], v[1], v[2], v[3]);
}
__device__ __forceinline__ void store_x4(__nv_bfloat16* p, const float (&v)[4]) {
  uint2 q;
  __nv_bfloat16* e = reinterpret_cast<__nv_bfloat16*>(&q);
  for (int u = 0; u < 4; ++u) e[u] = __float2bfloat16_rn(v[u]);
  *as_vector<uint2>(p) = q;
}
// ---- mma.sync m16n8k16 (bf16 in, fp32 accumulate) in its register fragment layout (PTX ISA, "Matrix fragments
// for mma.m16n8k16 with floating point type"). With lane = 4 g + t:
//   A (16 x 16, row-major), 4 registers of two bf16: a0 = A[g][2t, 2t+1], a1 = A[g+8][2t, 2t+1],
//                                                    a2 = A[g][2t+8, 2t+9], a3 = A[g+8][2t+8, 2t+9];
//   B (16 x 8, k x n), 2 registers: b0 = B[2t, 2t+1][g], b1 = B[2t+8, 2t+9][g];
//   C, D (16 x 8, fp32), 4 floats: c0, c1 = C[g][2t, 2t+1], c2, c3 = C[g+8][2t, 2t+1].
// The lower-numbered element of a pair sits in the low 16 bits. Unlike WMMA's opaque fragments, this layout lets a
// kernel work on its accumulators (a softmax over score rows) in registers.
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(lo))) |
         static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(hi))) << 16;
}

#if defined(TFEW_CUDA_EMULATION)
// The emulator: the warp's fragments meet in a per-warp exchange area (blocks run one at a time per host thread)
// and each lane computes its four outputs exactly as the tensor core does (exact products, fp32 sums).
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  static thread_local uint32_t exchange[32][32][6];  // [warp][lane][a0..a3, b0, b1]
  const int warp = static_cast<int>(threadIdx.x) >> 5, lane = static_cast<int>(threadIdx.x) & 31;
  for (int r = 0; r < 4; ++r) exchange[warp][lane][r] = a[r];
  exchange[warp][lane][4] = b[0];
  exchange[warp][lane][5] = b[1];
  __syncwarp();
  auto element = [&](int src_lane, int reg, int half) {
    const uint32_t bits = exchange[warp][src_lane][reg];
    return __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(half ? bits >> 16 : bits & 0xffffu)));
  };
  // A[row][k]: lane 4 (row % 8) + (k % 8) / 2, register (row >= 8) + 2 (k >= 8), half k % 2
  auto A = [&](int row, int k) { return element(4 * (row % 8) + (k % 8) / 2, (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0), k % 2); };
  // B[k][n]: lane 4 n + (k % 8) / 2, register 4 + (k >= 8), half k % 2
  auto B = [&](int k, int n) { return element(4 * n + (k % 8) / 2, 4 + (k >= 8 ? 1 : 0), k % 2); };
  const int g = lane >> 2, t = lane & 3;
  for (int e = 0; e < 4; ++e) {
    const int row = g + (e >= 2 ? 8 : 0), col = 2 * t + (e & 1);
    float acc = d[e];
    for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
    d[e] = acc;
  }
  __syncwarp();  // the exchange area is free for the next call
}
#else
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();  // bf16 tensor cores need compute capability 8.0 (the engine refuses older GPUs at load)
#endif
}
#endif

// ---- ldmatrix, cp.async and ex2 (the attention forward's pipeline)
// ldmatrix.x4: lane 8 m + r gives the shared-memory address of row r of 8 x 8 bf16 matrix m (16 contiguous bytes,
// 16-byte aligned); register m of lane 4 i + j then holds row i's elements 2j, 2j + 1 of matrix m, or with .trans
// column i's elements in rows 2j, 2j + 1 (lower-numbered element in the low 16 bits): exactly the B fragment of
// mma.m16n8k16 for a matrix stored [n][k] (plain) or [k][n] (.trans).
// cp.async.cg: a 16-byte copy from global to shared memory that bypasses the registers and completes only at
// cp_async_wait<N>() (every committed group but the newest N); fill = false writes 16 zero bytes instead.
// ex2_approx: 2^x in one instruction (MUFU.EX2), relative error ~2^-22: the softmax's exponentials.
#if defined(TFEW_CUDA_EMULATION)
// The emulator: ldmatrix meets in a per-warp exchange area of row addresses; cp.async reads the source at once but
// writes shared memory only at the wait that completes its group, so a kernel that reads a tile before waiting
// for it computes with stale data (and fails its tests) as it would on a GPU.
namespace emu_pipeline {
struct PendingCopy {
  void* dst;
  uint4 bytes;
  int group;  // 0 = issued, not yet committed
};
struct ThreadCopies {
  std::vector<PendingCopy> copies;
  int committed = 0;
};
inline ThreadCopies& copies_of_thread() {
  static thread_local ThreadCopies threads[1024];  // one block at a time per host thread
  return threads[threadIdx.x];
}
}  // namespace emu_pipeline

template <bool kTrans>
__device__ __forceinline__ void ldmatrix_x4_impl(uint32_t (&r)[4], const __nv_bfloat16* row) {
  static thread_local const __nv_bfloat16* rows[32][32];  // [warp][lane]
  const int warp = static_cast<int>(threadIdx.x) >> 5, lane = static_cast<int>(threadIdx.x) & 31;
  check_aligned(row, 16, "ldmatrix row");
  rows[warp][lane] = row;
  __syncwarp();
  const int i = lane >> 2, j = lane & 3;
  for (int m = 0; m < 4; ++m) {
    const __nv_bfloat16 lo = kTrans ? rows[warp][8 * m + 2 * j][i] : rows[warp][8 * m + i][2 * j];
    const __nv_bfloat16 hi = kTrans ? rows[warp][8 * m + 2 * j + 1][i] : rows[warp][8 * m + i][2 * j + 1];
    r[m] = static_cast<uint32_t>(__bfloat16_as_ushort(lo)) | static_cast<uint32_t>(__bfloat16_as_ushort(hi)) << 16;
  }
  __syncwarp();
}
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool fill) {
  check_aligned(dst, 16, "cp.async destination");
  check_aligned(src, 16, "cp.async source");  // (also where fill is false: the address is still an operand)
  emu_pipeline::PendingCopy copy{dst, make_uint4(0, 0, 0, 0), 0};
  if (fill) std::memcpy(&copy.bytes, src, sizeof(uint4));
  emu_pipeline::copies_of_thread().copies.push_back(copy);
}
__device__ __forceinline__ void cp_async_commit() {
  auto& mine = emu_pipeline::copies_of_thread();
  ++mine.committed;
  for (auto& copy : mine.copies)
    if (copy.group == 0) copy.group = mine.committed;
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  auto& mine = emu_pipeline::copies_of_thread();
  std::vector<emu_pipeline::PendingCopy> still;
  for (const auto& copy : mine.copies) {
    if (copy.group != 0 && copy.group <= mine.committed - N) std::memcpy(copy.dst, &copy.bytes, sizeof(uint4));
    else still.push_back(copy);
  }
  mine.copies.swap(still);
}
__device__ __forceinline__ float ex2_approx(float x) { return std::exp2(x); }
#else
template <bool kTrans>
__device__ __forceinline__ void ldmatrix_x4_impl(uint32_t (&r)[4], const __nv_bfloat16* row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  if constexpr (kTrans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address) : "memory");
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address) : "memory");
#else
  __trap();
#endif
}
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool fill) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(
                   static_cast<uint32_t>(__cvta_generic_to_shared(dst))),
               "l"(src), "r"(fill ? 16 : 0)
               : "memory");
#else
  __trap();
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}
__device__ __forceinline__ float ex2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
#endif
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const __nv_bfloat16* row) { ldmatrix_x4_impl<false>(r, row); }
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const __nv_bfloat16* row) {
  ldmatrix_x4_impl<true>(r, row);
}

// Eight bf16 (16 bytes) as one access; p 16-byte aligned.
__device__ __forceinline__ void load_x8(const __nv_bfloat16* p, float (&v)[8]) {
  const uint4 q = *as_vector<uint4>(p);
  const __nv_bfloat16* e = reinterpret_cast<const __nv_bfloat16*>(&q);
  for (int u = 0; u < 8; ++u) v[u] = __bfloat162float(e[u]);
}
__device__ __forceinline__ void store_x8(__nv_bfloat16* p, const float (&v)[8]) {
  uint4 q;
  __nv_bfloat16* e = reinterpret_cast<__nv_bfloat16*>(&q);
  for (int u = 0; u < 8; ++u) e[u] = __float2bfloat16_rn(v[u]);
  *as_vector<uint4>(p) = q;
}
// n consecutive elements as 16-byte accesses where they fill them: 8 bf16 as one access, 8 fp32 as two, 4 of either
// as one (p aligned to the access).
template <int n, typename T>
__device__ __forceinline__ void load_vec(const T* p, float (&v)[n]) {
  static_assert(n == 4 || n == 8, "load_vec: 4 or 8 elements");
  if constexpr (n == 4) {
    load_x4(p, v);
  } else if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    load_x8(p, v);
  } else {
    float half[4];
    for (int w = 0; w < n; w += 4) {
      load_x4(p + w, half);
      for (int u = 0; u < 4; ++u) v[w + u] = half[u];
    }
  }
}
template <int n, typename T>
__device__ __forceinline__ void store_vec(T* p, const float (&v)[n]) {
  static_assert(n == 4 || n == 8, "store_vec: 4 or 8 elements");
  if constexpr (n == 4) {
    store_x4(p, v);
  } else if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    store_x8(p, v);
  } else {
    for (int w = 0; w < n; w += 4) store_x4(p + w, {v[w], v[w + 1], v[w + 2], v[w + 3]});
  }
}

// Whether p is aligned for n-element vector accesses (load_vec / store_vec; n = 4: load_x4 / store_x4).
template <int n = 4, typename T>
inline bool aligned_x4(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % (n * sizeof(T)) == 0;
}

// The widest n (8 for bf16, else 4; 1: neither) for which a kernel may use load_vec / store_vec<n> at every element
// index built from `multiples` (offsets, strides, widths: each a multiple of n) on the storage-type pointers
// `t_ptrs` (aligned to n elements) and the fp32 pointers `f32_ptrs` (non-null and 16-byte aligned: fp32 vectors go
// as float4s).
template <typename T>
inline int vector_width(std::initializer_list<int64_t> multiples, std::initializer_list<const T*> t_ptrs,
                        std::initializer_list<const float*> f32_ptrs) {
  for (int n : {std::is_same<T, __nv_bfloat16>::value ? 8 : 4, 4}) {
    bool ok = true;
    for (int64_t m : multiples) ok = ok && m % n == 0;
    for (const T* p : t_ptrs) ok = ok && reinterpret_cast<uintptr_t>(p) % (n * sizeof(T)) == 0;
    for (const float* p : f32_ptrs) ok = ok && p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 == 0;
    if (ok) return n;
  }
  return 1;
}

// launch(std::integral_constant<int, n>()) for a vector_width n of 8 (bf16 only) or 4; false for 1 (nothing
// launched: the caller's one-element kernel).
template <typename T, typename Launch>
bool with_vector_width(int n, Launch&& launch) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    if (n == 8) {
      launch(std::integral_constant<int, 8>());
      return true;
    }
  }
  if (n < 4) return false;
  launch(std::integral_constant<int, 4>());
  return true;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// `scratch` holds 32 floats of shared memory; the call synchronises the block twice.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < n_warps ? scratch[lane] : 0.f;
  return warp_sum(v);
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < n_warps ? scratch[lane] : -INFINITY;
  return warp_max(v);
}

// The adapter index of token t (-1 = none); see AdapterIndex.
// 32-bit on purpose: token counts stay far below 2^31 and 64-bit division is slow on the GPU.
__device__ __forceinline__ int adapter_of_token(const AdapterIndex& ix, int t) {
  const int row = t / ix.tokens_per_row;
  const int example = ix.row_example ? ix.row_example[row] : row;
  return ix.adapter_of_example[example];
}

// More than the default 48 KiB of dynamic shared memory must be opted into, per kernel and device (the attribute
// belongs to the current device; engines on several GPUs, or threads, may launch it), and again when a later launch
// of the kernel needs more than was opted into (a model of another width).
inline void opt_in_shared_memory(const void* kernel, size_t bytes) {
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, size_t> configured;
  int device = 0;
  TFEW_CUDA_CHECK(cudaGetDevice(&device));
  std::lock_guard<std::mutex> lock(mu);
  size_t& have = configured[{kernel, device}];
  if (have >= bytes) return;
  TFEW_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  have = bytes;
}

// The most dynamic shared memory a block may opt into on the current device (cached per device; 0 when it cannot be
// asked: then no kernel that needs an opt-in is chosen).
inline size_t shared_memory_optin_limit() {
  static std::mutex mu;
  static std::map<int, size_t> limits;
  int device = 0, bytes = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  std::lock_guard<std::mutex> lock(mu);
  auto it = limits.find(device);
  if (it != limits.end()) return it->second;
  if (cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return limits[device] = static_cast<size_t>(bytes);
}

// Grid size for a grid-stride loop over n elements.
inline unsigned grid_for(int64_t n, int block) {
  int64_t g = (n + block - 1) / block;
  if (g < 1) g = 1;
  if (g > 65535LL * 16) g = 65535LL * 16;  // grid-stride loops cover the rest
  return static_cast<unsigned>(g);
}

// The grid of a grid-stride loop whose threads take about `per_thread` elements each: for kernels with a per-thread
// setup worth sharing (a dropout site's key: two SplitMix64 mixes, a division; at one element per thread
// TRAIN-3B's 4M-element dropouts took 38 us, compute-bound, on an H200 in session 19).
inline unsigned grid_for_per_thread(int64_t n, int block, int per_thread) {
  return grid_for((n + per_thread - 1) / per_thread, block);
}

}  // namespace kernels
}  // namespace tfew
