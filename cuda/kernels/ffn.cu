// The FFN activation between the wi and wo GEMMs, with the (IA)3 feed-forward scale fused in.
// Gated (T5 v1.1 / T0): wi_0 and wi_1 run as one GEMM into [wi_0 x | wi_1 x]; here
// h = gelu_new(wi_0 x) * (wi_1 x) * l_ff. PEFT scales the input of wo by l_ff; T-Few scales the output of
// wi_1; the product is the same. relu (T5 v1.0): h = relu(wi x) * l_ff. Math in fp32, one rounding.
// Training adds dropout on h (the CPU's mask); the backward recomputes the activation from the saved wi
// outputs and emits l_ff's per-token gradient contribution alongside the gradient of the wi outputs.
#include <type_traits>

#include "kernels/device_common.cuh"
#include "kernels/activation.cuh"
#include "kernels/dropout.cuh"

namespace tfew {
namespace kernels {

namespace {

// One block row per token (grid.y, striding past 65535 tokens), threads over the d_ff columns: no
// per-element 64-bit index division, and the token's adapter is looked up once per thread.
template <typename T, bool kGated>
__global__ void ffn_activation_kernel(const T* __restrict__ in, int n_tokens, int d_ff, AdapterIndex index,
                                      bool scaled, int64_t ff_offset, DropoutSite dropout, T* __restrict__ out) {
  wait_for_previous_kernel();
  dropout = with_seed(dropout);
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= d_ff) return;
  for (int t = blockIdx.y; t < n_tokens; t += gridDim.y) {
    float h;
    if (kGated) {
      const T* row = in + static_cast<int64_t>(t) * (2 * static_cast<int64_t>(d_ff));
      h = gelu_new(to_f32(row[c])) * to_f32(row[d_ff + c]);
    } else {
      h = fmaxf(to_f32(in[static_cast<int64_t>(t) * d_ff + c]), 0.f);
    }
    if (scaled) {
      const int a = adapter_of_token(index, t);
      if (a >= 0) h *= index.adapters[a * index.adapter_stride + ff_offset + c];
    }
    const int64_t i = static_cast<int64_t>(t) * d_ff + c;
    out[i] = from_f32<T>(h * dropout_scale(dropout, static_cast<uint64_t>(i)));
  }
}

// ffn_activation_kernel with kVec consecutive columns per thread as one vector access (4, or 8 of bf16: 16 bytes;
// d_ff a multiple of kVec, rows aligned): on an H200 (session 12) the one-element form took 7.3 ms of RANK-3B-B32
// for ~1.3 ms of traffic, 4 columns per thread 2.8 ms. The same arithmetic per element, so the same results.
template <typename T, bool kGated, int kVec>
__global__ void ffn_activation_vec_kernel(const T* __restrict__ in, int n_tokens, int d_ff, AdapterIndex index,
                                          bool scaled, int64_t ff_offset, DropoutSite dropout, T* __restrict__ out) {
  wait_for_previous_kernel();
  dropout = with_seed(dropout);
  const int c = kVec * (blockIdx.x * blockDim.x + threadIdx.x);
  if (c >= d_ff) return;
  for (int t = blockIdx.y; t < n_tokens; t += gridDim.y) {
    float h[kVec];
    if (kGated) {
      const T* row = in + static_cast<int64_t>(t) * (2 * static_cast<int64_t>(d_ff));
      float gate[kVec], lin[kVec];
      load_vec<kVec>(row + c, gate);
      load_vec<kVec>(row + d_ff + c, lin);
      for (int u = 0; u < kVec; ++u) h[u] = gelu_new(gate[u]) * lin[u];
    } else {
      load_vec<kVec>(in + static_cast<int64_t>(t) * d_ff + c, h);
      for (int u = 0; u < kVec; ++u) h[u] = fmaxf(h[u], 0.f);
    }
    if (scaled) {
      const int a = adapter_of_token(index, t);
      if (a >= 0) {
        const float* l = index.adapters + a * index.adapter_stride + ff_offset + c;
        for (int u = 0; u < kVec; ++u) h[u] *= l[u];
      }
    }
    const int64_t i = static_cast<int64_t>(t) * d_ff + c;
    float keep[kVec];
    dropout_scales(dropout, static_cast<uint64_t>(i), keep);
    for (int u = 0; u < kVec; ++u) h[u] *= keep[u];
    store_vec<kVec>(out + i, h);
  }
}

template <typename T, int kVec>
void launch_ffn_activation_vec(const T* in, int n_tokens, int d_ff, bool gated, const AdapterIndex& index,
                               bool scaled, int64_t ff_offset, const DropoutSite& dropout, T* out,
                               cudaStream_t stream) {
  const int groups = d_ff / kVec;
  const dim3 block(groups >= 256 ? 256 : 128);
  const dim3 grid((groups + block.x - 1) / block.x, n_tokens < 65535 ? n_tokens : 65535);
  if (gated)
    TFEW_LAUNCH(grid, block, 0, stream, ffn_activation_vec_kernel<T, true, kVec>)(
        in, n_tokens, d_ff, index, scaled, ff_offset, dropout, out);
  else
    TFEW_LAUNCH(grid, block, 0, stream, ffn_activation_vec_kernel<T, false, kVec>)(
        in, n_tokens, d_ff, index, scaled, ff_offset, dropout, out);
  TFEW_CUDA_CHECK_LAUNCH("ffn_activation_vec_kernel");
}

// One block row per Ia3Sums row (a token, or a chunk of one example's tokens walked in order). Per token, g_ff
// may be dscaled itself (the decoder's plan does that): each element is read, then written, by one thread.
template <typename T, bool kGated>
__global__ void ffn_backward_kernel(const float* dscaled, const T* __restrict__ pre, int n_tokens, int d_ff,
                                    AdapterIndex index, bool scaled, int64_t ff_offset, DropoutSite dropout,
                                    T* __restrict__ d_pre, Ia3Sums sums, float* g_ff) {
  wait_for_previous_kernel();
  dropout = with_seed(dropout);
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= d_ff) return;
  for (int64_t r = blockIdx.y; r < sums.rows(n_tokens); r += gridDim.y) {
    int t0, t1;
    sums.tokens_of(r, t0, t1);
    float contribution = 0.f;
    for (int t = t0; t < t1; ++t) {
      const int64_t i = static_cast<int64_t>(t) * d_ff + c;
      const float g = dscaled[i] * dropout_scale(dropout, static_cast<uint64_t>(i));  // d loss / d (scaled hidden)
      float l = 1.f;
      if (scaled) {
        const int a = adapter_of_token(index, t);
        if (a >= 0) l = index.adapters[a * index.adapter_stride + ff_offset + c];
      }
      if (kGated) {
        const T* row = pre + static_cast<int64_t>(t) * 2 * d_ff;
        const float h0 = to_f32(row[c]), h1 = to_f32(row[d_ff + c]);
        float act, act_grad;
        gelu_new_and_grad(h0, act, act_grad);
        contribution += g * act * h1;
        const float dh = g * l;
        T* drow = d_pre + static_cast<int64_t>(t) * 2 * d_ff;
        drow[c] = from_f32<T>(dh * h1 * act_grad);
        drow[d_ff + c] = from_f32<T>(dh * act);
      } else {
        const float h0 = to_f32(pre[i]);
        contribution += g * fmaxf(h0, 0.f);
        d_pre[i] = from_f32<T>(h0 > 0.f ? g * l : 0.f);
      }
    }
    g_ff[r * d_ff + c] = contribution;
  }
}

// ffn_backward_kernel with kVec consecutive columns per thread (4, or 8 of bf16), as ffn_activation_vec_kernel
// (the one-element activation ran at a fifth of the bandwidth on the H200): 16-byte accesses to the wi outputs and
// their gradient, two or one to the fp32 gradient. The same arithmetic per element in the same token order, so
// the same results. g_ff may be dscaled: a thread reads its elements of a token before writing them.
template <typename T, bool kGated, int kVec>
__global__ void ffn_backward_vec_kernel(const float* dscaled, const T* __restrict__ pre, int n_tokens, int d_ff,
                                        AdapterIndex index, bool scaled, int64_t ff_offset, DropoutSite dropout,
                                        T* __restrict__ d_pre, Ia3Sums sums, float* g_ff) {
  wait_for_previous_kernel();
  dropout = with_seed(dropout);
  const int c = kVec * (blockIdx.x * blockDim.x + threadIdx.x);
  if (c >= d_ff) return;
  for (int64_t r = blockIdx.y; r < sums.rows(n_tokens); r += gridDim.y) {
    int t0, t1;
    sums.tokens_of(r, t0, t1);
    float contribution[kVec];
    for (int u = 0; u < kVec; ++u) contribution[u] = 0.f;
    // two tokens an iteration: the next token's loads are in flight while this one's are used (an encoder row of
    // partial sums walks 16 tokens; TRAIN-3B's 384 blocks are under one wave: latency-bound at ~53 us a layer and
    // 45% of DRAM bandwidth on an H200, session 19's ncu)
#pragma unroll 2
    for (int t = t0; t < t1; ++t) {
      const int64_t i = static_cast<int64_t>(t) * d_ff + c;
      float g[kVec], keep[kVec];  // d loss / d (scaled hidden)
      load_vec<kVec>(dscaled + i, g);
      dropout_scales(dropout, static_cast<uint64_t>(i), keep);
      for (int u = 0; u < kVec; ++u) g[u] *= keep[u];
      float l[kVec];
      for (int u = 0; u < kVec; ++u) l[u] = 1.f;
      if (scaled) {
        const int a = adapter_of_token(index, t);
        if (a >= 0)
          for (int u = 0; u < kVec; ++u) l[u] = index.adapters[a * index.adapter_stride + ff_offset + c + u];
      }
      if (kGated) {
        const T* row = pre + static_cast<int64_t>(t) * 2 * d_ff;
        float h0[kVec], h1[kVec], d0[kVec], d1[kVec];
        load_vec<kVec>(row + c, h0);
        load_vec<kVec>(row + d_ff + c, h1);
        for (int u = 0; u < kVec; ++u) {
          float act, act_grad;
          gelu_new_and_grad(h0[u], act, act_grad);
          contribution[u] += g[u] * act * h1[u];
          const float dh = g[u] * l[u];
          d0[u] = dh * h1[u] * act_grad;
          d1[u] = dh * act;
        }
        T* drow = d_pre + static_cast<int64_t>(t) * 2 * d_ff;
        store_vec<kVec>(drow + c, d0);
        store_vec<kVec>(drow + d_ff + c, d1);
      } else {
        float h0[kVec], d0[kVec];
        load_vec<kVec>(pre + i, h0);
        for (int u = 0; u < kVec; ++u) {
          contribution[u] += g[u] * fmaxf(h0[u], 0.f);
          d0[u] = h0[u] > 0.f ? g[u] * l[u] : 0.f;
        }
        store_vec<kVec>(d_pre + i, d0);
      }
    }
    store_vec<kVec>(g_ff + r * d_ff + c, contribution);
  }
}

}  // namespace

template <typename T>
void ffn_activation(const T* in, int n_tokens, int d_ff, bool gated, const AdapterIndex& index, int64_t ff_offset,
                    const DropoutSite& dropout, T* out, cudaStream_t stream) {
  if (n_tokens <= 0 || d_ff <= 0) return;
  const bool scaled = index.active();
  if (with_vector_width<T>(vector_width<T>({d_ff}, {in, out}, {}), [&](auto vec) {
        launch_ffn_activation_vec<T, decltype(vec)::value>(in, n_tokens, d_ff, gated, index, scaled, ff_offset, dropout,
                                                           out, stream);
      }))
    return;
  const dim3 block(256);
  const dim3 grid((d_ff + 255) / 256, n_tokens < 65535 ? n_tokens : 65535);
  if (gated)
    TFEW_LAUNCH(grid, block, 0, stream, ffn_activation_kernel<T, true>)(in, n_tokens, d_ff, index, scaled, ff_offset,
                                                                        dropout, out);
  else
    TFEW_LAUNCH(grid, block, 0, stream, ffn_activation_kernel<T, false>)(in, n_tokens, d_ff, index, scaled, ff_offset,
                                                                         dropout, out);
  TFEW_CUDA_CHECK_LAUNCH("ffn_activation_kernel");
}

template <typename T>
void ffn_backward(const float* dscaled, const T* pre, int n_tokens, int d_ff, bool gated, const AdapterIndex& index,
                  int64_t ff_offset, const DropoutSite& dropout, T* d_pre, const Ia3Sums& sums, float* g_ff,
                  cudaStream_t stream) {
  if (n_tokens <= 0 || d_ff <= 0) return;
  if (sums.tokens_per_example <= 0 || n_tokens % sums.tokens_per_example != 0 || sums.chunk <= 0)
    fail(ErrorCode::Internal, "ffn_backward: tokens are not whole examples");
  const bool scaled = index.active();
  const int64_t rows = sums.rows(n_tokens);
  const unsigned grid_rows = static_cast<unsigned>(rows < 65535 ? rows : 65535);
  auto vectorised = [&](auto vec) {
    constexpr int kVec = decltype(vec)::value;
    const int groups = d_ff / kVec;
    const dim3 block(groups >= 256 ? 256 : 128), grid((groups + block.x - 1) / block.x, grid_rows);
    if (gated)
      TFEW_LAUNCH(grid, block, 0, stream, ffn_backward_vec_kernel<T, true, kVec>)(
          dscaled, pre, n_tokens, d_ff, index, scaled, ff_offset, dropout, d_pre, sums, g_ff);
    else
      TFEW_LAUNCH(grid, block, 0, stream, ffn_backward_vec_kernel<T, false, kVec>)(
          dscaled, pre, n_tokens, d_ff, index, scaled, ff_offset, dropout, d_pre, sums, g_ff);
    TFEW_CUDA_CHECK_LAUNCH("ffn_backward_vec_kernel");
  };
  if (with_vector_width<T>(vector_width<T>({d_ff}, {pre, d_pre}, {dscaled, g_ff}), vectorised)) return;
  const dim3 block(256);
  const dim3 grid((d_ff + 255) / 256, grid_rows);
  if (gated)
    TFEW_LAUNCH(grid, block, 0, stream, ffn_backward_kernel<T, true>)(dscaled, pre, n_tokens, d_ff, index, scaled,
                                                                      ff_offset, dropout, d_pre, sums, g_ff);
  else
    TFEW_LAUNCH(grid, block, 0, stream, ffn_backward_kernel<T, false>)(dscaled, pre, n_tokens, d_ff, index, scaled,
                                                                       ff_offset, dropout, d_pre, sums, g_ff);
  TFEW_CUDA_CHECK_LAUNCH("ffn_backward_kernel");
}

#define TFEW_INSTANTIATE(T)                                                                                      \
  template void ffn_activation<T>(const T*, int, int, bool, const AdapterIndex&, int64_t, const DropoutSite&, T*, \
                                  cudaStream_t);                                                                 \
  template void ffn_backward<T>(const float*, const T*, int, int, bool, const AdapterIndex&, int64_t,             \
                                const DropoutSite&, T*, const Ia3Sums&, float*, cudaStream_t);
TFEW_INSTANTIATE(float)
TFEW_INSTANTIATE(__nv_bfloat16)
#undef TFEW_INSTANTIATE

}  // namespace kernels
}  // namespace tfew
