// The prelude of every kernel file in the emulation build (scripts/emu-translate.js puts it first): the real
// CUDA headers for the types (dim3, uint4, __nv_bfloat16 with its host conversions), then the device-side
// names a kernel uses, mapped onto the emulator (cuda/emu/emu_runtime.h).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "emu/emu_runtime.h"

// Execution-space qualifiers mean nothing on the host compiler.
#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __host__
#define __host__
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __forceinline__
#define __forceinline__ inline
// Static shared memory: one copy per host thread; blocks of a launch run one after another on that thread.
#undef __shared__
#define __shared__ static thread_local

#define threadIdx (::tfew::emu::position().thread_idx)
#define blockIdx (::tfew::emu::position().block_idx)
#define blockDim (::tfew::emu::position().block_dim)
#define gridDim (::tfew::emu::position().grid_dim)

inline void __syncthreads() { ::tfew::emu::sync_block(); }
inline void __syncwarp(unsigned = 0xffffffffu) { ::tfew::emu::sync_warp(); }

template <typename T>
inline T __shfl_sync(unsigned, T v, int source, int width = 32) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  return ::tfew::emu::shuffle(v, (lane & ~(width - 1)) + (source & (width - 1)));
}
template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask, int width = 32) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int source = lane ^ lane_mask;
  return ::tfew::emu::shuffle(v, (source & ~(width - 1)) == (lane & ~(width - 1)) ? source : lane);
}
template <typename T>
inline T __shfl_down_sync(unsigned, T v, unsigned delta, int width = 32) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int source = lane + static_cast<int>(delta);
  return ::tfew::emu::shuffle(v, (source & ~(width - 1)) == (lane & ~(width - 1)) ? source : lane);
}
template <typename T>
inline T __shfl_up_sync(unsigned, T v, unsigned delta, int width = 32) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int source = lane - static_cast<int>(delta);
  return ::tfew::emu::shuffle(v, source >= (lane & ~(width - 1)) ? source : lane);
}

// Bit l set iff lane l's predicate holds (a full warp: the kernels ballot with every lane): an OR over lanes.
inline unsigned __ballot_sync(unsigned, int predicate) {
  unsigned bits = predicate ? 1u << (static_cast<int>(threadIdx.x) & 31) : 0u;
  for (int o = 16; o > 0; o >>= 1) bits |= __shfl_xor_sync(0xffffffffu, bits, o);
  return bits;
}

template <typename T>
inline T __ldg(const T* p) { return *p; }

// Device math on the host: the accurate versions (the device's fast intrinsics differ in the last bits).
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
// CUDA's integer and float min/max overloads (device code calls them unqualified).
template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) { return b < a ? b : a; }
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) { return a < b ? b : a; }

// cuda_runtime.h declares this typed overload for nvcc only.
template <typename T>
inline cudaError_t cudaFuncSetAttribute(T* entry, cudaFuncAttribute attr, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(entry), attr, value);
}
