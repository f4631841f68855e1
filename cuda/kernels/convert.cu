// Weight preparation on the device: checkpoint dtypes (raw bytes copied from the memory-mapped file) to the
// engine's storage type, and the (IA)3 merge (scaling rows or columns of frozen weights in place).
#include "kernels/device_common.cuh"

namespace tfew {
namespace kernels {

namespace {

__device__ __forceinline__ float load_as_f32(const void* src, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::F64: return static_cast<float>(static_cast<const double*>(src)[i]);
    case DType::F32: return static_cast<const float*>(src)[i];
    case DType::F16: return __half2float(static_cast<const __half*>(src)[i]);
    case DType::BF16:
    default: {
      const uint32_t bits = static_cast<uint32_t>(static_cast<const uint16_t*>(src)[i]) << 16;
      return __uint_as_float(bits);
    }
  }
}

template <typename T>
__global__ void convert_weights_kernel(const void* __restrict__ src, DType dtype, int64_t n, T* __restrict__ dst) {
  wait_for_previous_kernel();
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dst[i] = from_f32<T>(load_as_f32(src, dtype, i));
}

template <typename T, bool kRows>
__global__ void scale_matrix_kernel(T* __restrict__ w, int64_t rows, int64_t cols, const float* __restrict__ l) {
  wait_for_previous_kernel();
  const int64_t n = rows * cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float s = kRows ? l[i / cols] : l[i % cols];
    w[i] = from_f32<T>(to_f32(w[i]) * s);
  }
}

}  // namespace

template <typename T>
void convert_weights(const void* src, DType dtype, int64_t n, T* dst, cudaStream_t stream) {
  if (n <= 0) return;
  TFEW_LAUNCH(grid_for(n, 256), 256, 0, stream, convert_weights_kernel<T>)(src, dtype, n, dst);
  TFEW_CUDA_CHECK_LAUNCH("convert_weights_kernel");
}

template <typename T>
void scale_rows(T* w, int64_t rows, int64_t cols, const float* l, cudaStream_t stream) {
  if (rows * cols <= 0) return;
  TFEW_LAUNCH(grid_for(rows * cols, 256), 256, 0, stream, scale_matrix_kernel<T, true>)(w, rows, cols, l);
  TFEW_CUDA_CHECK_LAUNCH("scale_matrix_kernel");
}

template <typename T>
void scale_cols(T* w, int64_t rows, int64_t cols, const float* l, cudaStream_t stream) {
  if (rows * cols <= 0) return;
  TFEW_LAUNCH(grid_for(rows * cols, 256), 256, 0, stream, scale_matrix_kernel<T, false>)(w, rows, cols, l);
  TFEW_CUDA_CHECK_LAUNCH("scale_matrix_kernel");
}

#define TFEW_INSTANTIATE(T)                                                             \
  template void convert_weights<T>(const void*, DType, int64_t, T*, cudaStream_t);      \
  template void scale_rows<T>(T*, int64_t, int64_t, const float*, cudaStream_t);        \
  template void scale_cols<T>(T*, int64_t, int64_t, const float*, cudaStream_t);
TFEW_INSTANTIATE(float)
TFEW_INSTANTIATE(__nv_bfloat16)
#undef TFEW_INSTANTIATE

}  // namespace kernels
}  // namespace tfew
