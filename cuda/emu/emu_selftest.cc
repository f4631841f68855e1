// Self-test of the CUDA emulator's checks (emulation build only; test/gpu/cuda-emulator-selftest.test.ts):
// each scenario makes one mistake a real GPU would fault or misbehave on, and reports what the emulator said.
// Without these, a check that silently stopped working would let wrong kernels pass the emulated GPU tests.
#include "emu/emu_device.h"

#include <mma.h>

#include <string>
#include <vector>

#include "core/errors.h"
#include "emu/emu_selftest.h"
#include "kernels/device_common.cuh"

namespace tfew {
namespace emu {

namespace {

// Lane 0 waits for the block, its warp's other lanes wait for lane 0: neither barrier can complete.
__global__ void only_thread_zero_waits(int* out) {
  if (threadIdx.x == 0) __syncthreads();
  else __syncwarp();
  out[threadIdx.x] = 1;
}

__global__ void write_one_past_the_end(int* out, int n) { out[n + threadIdx.x] = 7; }

__global__ void needs_shared(float* out) {
  float* s = reinterpret_cast<float*>(position().dynamic_shared);
  s[threadIdx.x] = 1.f;
  out[threadIdx.x] = s[threadIdx.x];
}

__global__ void misaligned_wmma(const __nv_bfloat16* a, float* out) {
  namespace wmma = nvcuda::wmma;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> f;
  wmma::load_matrix_sync(f, a + 1, 16);  // 2 bytes off a 32-byte boundary
  out[threadIdx.x] = 0.f;
}

// 16-byte accesses 2 bytes off their alignment, one kind per scenario (kernels/device_common.cuh: check_aligned)
__global__ void misaligned_vector_load(const __nv_bfloat16* a, float* out) {
  const uint4 q = *kernels::as_vector<uint4>(a + 1);
  out[threadIdx.x] = static_cast<float>(q.x);
}
__global__ void misaligned_cp_async(const __nv_bfloat16* a, float* out) {
  __shared__ __align__(16) __nv_bfloat16 tile[8 * 32];
  kernels::cp_async_16(tile + 8 * threadIdx.x, a + 8 * threadIdx.x + 1, true);
  kernels::cp_async_commit();
  kernels::cp_async_wait<0>();
  out[threadIdx.x] = __bfloat162float(tile[8 * threadIdx.x]);
}
__global__ void misaligned_ldmatrix(float* out) {
  __shared__ __align__(16) __nv_bfloat16 tile[32 * 16];
  for (int i = threadIdx.x; i < 32 * 16; i += 32) tile[i] = __float2bfloat16(1.f);
  __syncwarp();
  uint32_t r[4];
  kernels::ldmatrix_x4(r, tile + 16 * threadIdx.x + 1);
  out[threadIdx.x] = static_cast<float>(r[0]);
}

// Shared memory read before the barrier that would make it valid: lane i reads what lane i + 1 writes.
__global__ void missing_barrier(float* out) {
  __shared__ float s[64];
  s[threadIdx.x] = static_cast<float>(threadIdx.x);
  out[threadIdx.x] = s[(threadIdx.x + 1) % 64];  // needs __syncthreads() between the two lines
}

// Launched to overlap the kernel before it (kernels/launch.cuh): the first writes without waiting for that kernel,
// the second keeps the rule.
__global__ void writes_without_waiting(int* out) { out[threadIdx.x] = 1; }
__global__ void waits_then_writes(int* out) {
  kernels::wait_for_previous_kernel();
  out[threadIdx.x] = 1;
}

// Two bf16 as one 32-bit register (the lower-numbered element in the low 16 bits).
uint32_t pair(__nv_bfloat16 lo, __nv_bfloat16 hi) {
  return static_cast<uint32_t>(__bfloat16_as_ushort(lo)) | static_cast<uint32_t>(__bfloat16_as_ushort(hi)) << 16;
}
// Lane's A fragment of a row-major 16 x 16 A as the PTX ISA lays it out (written independently of the emulator's
// inverse mapping): a0 = A[g][2t, 2t+1], a1 = A[g+8][2t, 2t+1], a2 = A[g][2t+8, 2t+9], a3 = A[g+8][2t+8, 2t+9].
void a_fragment_from_ptx(const __nv_bfloat16* A, int lane, uint32_t (&a)[4]) {
  const int g = lane >> 2, t = lane & 3;
  a[0] = pair(A[g * 16 + 2 * t], A[g * 16 + 2 * t + 1]);
  a[1] = pair(A[(g + 8) * 16 + 2 * t], A[(g + 8) * 16 + 2 * t + 1]);
  a[2] = pair(A[g * 16 + 2 * t + 8], A[g * 16 + 2 * t + 9]);
  a[3] = pair(A[(g + 8) * 16 + 2 * t + 8], A[(g + 8) * 16 + 2 * t + 9]);
}

// One m16n8k16 tile through kernels::mma_bf16_16816, its fragments built from row-major A (16 x 16) and B (16 x 8)
// as the PTX ISA lays them out (written here independently of the emulator's inverse mapping), D stored likewise.
__global__ void mma_one_tile(const __nv_bfloat16* A, const __nv_bfloat16* B, float* D) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  uint32_t a[4];
  a_fragment_from_ptx(A, lane, a);
  const uint32_t b[2] = {pair(B[(2 * t) * 8 + g], B[(2 * t + 1) * 8 + g]),
                         pair(B[(2 * t + 8) * 8 + g], B[(2 * t + 9) * 8 + g])};
  float d[4] = {0.f, 0.f, 0.f, 0.f};
  kernels::mma_bf16_16816(d, a, b);
  D[g * 8 + 2 * t] = d[0];
  D[g * 8 + 2 * t + 1] = d[1];
  D[(g + 8) * 8 + 2 * t] = d[2];
  D[(g + 8) * 8 + 2 * t + 1] = d[3];
}

// cp.async: each of 32 threads copies 16 bytes into shared memory pre-set to -1 (odd threads ask for zero fill);
// what a thread reads of its own slot before the wait is stale (-1) in the emulator, after the wait the copy.
__global__ void cp_async_before_and_after_wait(const float* src, float* before, float* after) {
  __shared__ __align__(16) float s[32 * 4];
  const int i = threadIdx.x;
  for (int u = 0; u < 4; ++u) s[4 * i + u] = -1.f;
  kernels::cp_async_16(&s[4 * i], &src[4 * i], i % 2 == 0);
  kernels::cp_async_commit();
  for (int u = 0; u < 4; ++u) before[4 * i + u] = s[4 * i + u];
  kernels::cp_async_wait<0>();
  for (int u = 0; u < 4; ++u) after[4 * i + u] = s[4 * i + u];
}

// D = A B for A (16 x 16) and B (16 x 16) with B's fragments from ldmatrix two ways: from B stored [n][k] (plain,
// as the attention kernel reads K) into D1, and from B stored [k][n] (.trans, as it reads V) into D2. A's fragments
// are built from the PTX layout as in mma_one_tile; both products must be exact.
__global__ void ldmatrix_tiles(const __nv_bfloat16* A, const __nv_bfloat16* B, float* D1, float* D2) {
  __shared__ __align__(16) __nv_bfloat16 b_nk[16 * 16], b_kn[16 * 16];
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  for (int e = lane; e < 256; e += 32) {
    const int k = e / 16, n = e % 16;
    b_kn[k * 16 + n] = B[k * 16 + n];
    b_nk[n * 16 + k] = B[k * 16 + n];
  }
  __syncwarp();
  uint32_t a[4];
  a_fragment_from_ptx(A, lane, a);
  const int m = lane >> 3, r = lane & 7;
  uint32_t plain[4], trans[4];
  // matrix m: n block m >> 1, k half m & 1; plain rows are n, .trans rows are k
  kernels::ldmatrix_x4(plain, b_nk + (8 * (m >> 1) + r) * 16 + 8 * (m & 1));
  kernels::ldmatrix_x4_trans(trans, b_kn + (8 * (m & 1) + r) * 16 + 8 * (m >> 1));
  for (int nb = 0; nb < 2; ++nb) {
    const uint32_t bp[2] = {plain[2 * nb], plain[2 * nb + 1]}, bt[2] = {trans[2 * nb], trans[2 * nb + 1]};
    float d1[4] = {0.f, 0.f, 0.f, 0.f}, d2[4] = {0.f, 0.f, 0.f, 0.f};
    kernels::mma_bf16_16816(d1, a, bp);
    kernels::mma_bf16_16816(d2, a, bt);
    for (int e = 0; e < 4; ++e) {
      const int row = g + 8 * (e >> 1), col = 8 * nb + 2 * t + (e & 1);
      D1[row * 16 + col] = d1[e];
      D2[row * 16 + col] = d2[e];
    }
  }
}

SelfTestResult finish(cudaError_t call_result, const std::string& note = "") {
  SelfTestResult r;
  const cudaError_t synced = cudaDeviceSynchronize();
  const cudaError_t e = call_result != cudaSuccess ? call_result : synced;
  r.error = cudaGetErrorName(e);
  r.message = std::string(cudaGetErrorString(e)) + (note.empty() ? "" : " | " + note);
  return r;
}

// Device memory of one scenario, freed when it ends.
struct Buffers {
  std::vector<void*> all;
  template <typename D>
  D* get(size_t count) {
    void* p = nullptr;
    cudaMalloc(&p, count * sizeof(D));
    all.push_back(p);
    return static_cast<D*>(p);
  }
  ~Buffers() {
    for (void* p : all) cudaFree(p);
  }
};

SelfTestResult run_scenario(const std::string& name) {
  Buffers mem;
  SelfTestResult r;
  if (name == "barrier-deadlock") {
    int* out = mem.get<int>(64);
    launch("only_thread_zero_waits", dim3(1), dim3(64), 0, cudaStream_t{nullptr}, only_thread_zero_waits, out);
    r = finish(cudaGetLastError());
  } else if (name == "write-past-allocation") {
    int* out = mem.get<int>(100);
    launch("write_one_past_the_end", dim3(1), dim3(4), 0, cudaStream_t{nullptr}, write_one_past_the_end, out, 100);
    r = finish(cudaGetLastError());
  } else if (name == "shared-memory-limit") {
    float* out = mem.get<float>(64);
    // 64 KiB is above the default 48 KiB: a launch error unless cudaFuncSetAttribute raised the limit
    launch("needs_shared", dim3(1), dim3(64), 64 * 1024, cudaStream_t{nullptr}, needs_shared, out);
    r = finish(cudaGetLastError());
  } else if (name == "pageable-copy-in-capture") {
    cudaStream_t s = nullptr;
    cudaStreamCreate(&s);
    float* dev = mem.get<float>(16);
    std::vector<float> pageable(16, 1.f);
    cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal);
    const cudaError_t copy = cudaMemcpyAsync(dev, pageable.data(), 16 * sizeof(float), cudaMemcpyHostToDevice, s);
    cudaGraph_t graph = nullptr;
    const cudaError_t end = cudaStreamEndCapture(s, &graph);
    cudaStreamDestroy(s);
    cudaGetLastError();
    r = finish(copy, std::string("end capture: ") + cudaGetErrorName(end));
  } else if (name == "fresh-memory-is-nan") {
    float* dev = mem.get<float>(4);
    float host[4] = {0, 0, 0, 0};
    cudaMemcpy(host, dev, sizeof(host), cudaMemcpyDeviceToHost);
    r = finish(cudaSuccess, std::isnan(host[0]) ? "read NaN" : "read a number");
  } else if (name == "misaligned-wmma") {
    __nv_bfloat16* a = mem.get<__nv_bfloat16>(512);
    float* out = mem.get<float>(32);
    launch("misaligned_wmma", dim3(1), dim3(32), 0, cudaStream_t{nullptr}, misaligned_wmma, a, out);
    r = finish(cudaGetLastError());
  } else if (name == "misaligned-vector-load" || name == "misaligned-cp-async" || name == "misaligned-ldmatrix") {
    __nv_bfloat16* a = mem.get<__nv_bfloat16>(512);
    float* out = mem.get<float>(32);
    cudaMemset(a, 0, 512 * sizeof(__nv_bfloat16));
    if (name == "misaligned-vector-load")
      launch("misaligned_vector_load", dim3(1), dim3(32), 0, cudaStream_t{nullptr}, misaligned_vector_load, a, out);
    else if (name == "misaligned-cp-async")
      launch("misaligned_cp_async", dim3(1), dim3(32), 0, cudaStream_t{nullptr}, misaligned_cp_async, a, out);
    else
      launch("misaligned_ldmatrix", dim3(1), dim3(32), 0, cudaStream_t{nullptr}, misaligned_ldmatrix, out);
    r = finish(cudaGetLastError());
  } else if (name == "programmatic-launch-without-wait" || name == "programmatic-launch-with-wait") {
    cudaStream_t s = nullptr;
    cudaStreamCreate(&s);
    kernels::set_programmatic_launch(s, true);
    int* out = mem.get<int>(64);
    std::string what = "accepted";
    try {
      if (name == "programmatic-launch-with-wait")
        TFEW_LAUNCH(dim3(2), dim3(32), 0, s, waits_then_writes)(out);
      else
        TFEW_LAUNCH(dim3(2), dim3(32), 0, s, writes_without_waiting)(out);
      cudaStreamSynchronize(s);
    } catch (const TfewError& e) {
      what = e.what();
    }
    kernels::set_programmatic_launch(s, false);
    cudaStreamDestroy(s);
    r = finish(cudaGetLastError(), what);
  } else if (name == "missing-barrier") {
    float* out = mem.get<float>(64);
    launch("missing_barrier", dim3(1), dim3(64), 0, cudaStream_t{nullptr}, missing_barrier, out);
    float host[64];
    cudaMemcpy(host, out, sizeof(host), cudaMemcpyDeviceToHost);
    // in order, lane i reads lane i + 1's slot before it is written (stale); reversed, every read looks right
    int right = 0;
    for (int i = 0; i < 64; ++i) right += host[i] == static_cast<float>((i + 1) % 64);
    r = finish(cudaSuccess, std::to_string(right) + " of 64 reads saw the value written");
  } else if (name == "mma-layout") {
    // small integers: exact in bf16 and in the fp32 sums, so the product must match to the bit
    std::vector<__nv_bfloat16> a(16 * 16), b(16 * 8);
    for (int i = 0; i < 16 * 16; ++i) a[i] = __float2bfloat16(static_cast<float>((i * 7) % 11 - 5));
    for (int i = 0; i < 16 * 8; ++i) b[i] = __float2bfloat16(static_cast<float>((i * 5) % 13 - 6));
    __nv_bfloat16* da = mem.get<__nv_bfloat16>(a.size());
    __nv_bfloat16* db = mem.get<__nv_bfloat16>(b.size());
    float* dd = mem.get<float>(16 * 8);
    cudaMemcpy(da, a.data(), a.size() * sizeof(a[0]), cudaMemcpyHostToDevice);
    cudaMemcpy(db, b.data(), b.size() * sizeof(b[0]), cudaMemcpyHostToDevice);
    launch("mma_one_tile", dim3(1), dim3(32), 0, cudaStream_t{nullptr}, mma_one_tile, da, db, dd);
    const cudaError_t launched = cudaGetLastError();
    float d[16 * 8];
    cudaMemcpy(d, dd, sizeof(d), cudaMemcpyDeviceToHost);
    int wrong = 0;
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 8; ++j) {
        float want = 0.f;
        for (int k = 0; k < 16; ++k) want += __bfloat162float(a[i * 16 + k]) * __bfloat162float(b[k * 8 + j]);
        wrong += d[i * 8 + j] != want;
      }
    r = finish(launched, std::to_string(wrong) + " of 128 products wrong");
  } else if (name == "cp-async") {
    std::vector<float> src(128);
    for (int i = 0; i < 128; ++i) src[i] = static_cast<float>(i + 1);
    float* dsrc = mem.get<float>(128);
    float* dbefore = mem.get<float>(128);
    float* dafter = mem.get<float>(128);
    cudaMemcpy(dsrc, src.data(), src.size() * sizeof(float), cudaMemcpyHostToDevice);
    launch("cp_async_before_and_after_wait", dim3(1), dim3(32), 0, cudaStream_t{nullptr},
           cp_async_before_and_after_wait, dsrc, dbefore, dafter);
    const cudaError_t launched = cudaGetLastError();
    float before[128], after[128];
    cudaMemcpy(before, dbefore, sizeof(before), cudaMemcpyDeviceToHost);
    cudaMemcpy(after, dafter, sizeof(after), cudaMemcpyDeviceToHost);
    int stale = 0, right = 0;
    for (int i = 0; i < 128; ++i) {
      stale += before[i] == -1.f;
      right += after[i] == ((i / 4) % 2 == 0 ? src[i] : 0.f);
    }
    r = finish(launched, std::to_string(stale) + " of 128 stale before the wait, " + std::to_string(right) +
                             " of 128 right after it");
  } else if (name == "ldmatrix-layout") {
    std::vector<__nv_bfloat16> a(16 * 16), b(16 * 16);
    for (int i = 0; i < 256; ++i) a[i] = __float2bfloat16(static_cast<float>((i * 7) % 11 - 5));
    for (int i = 0; i < 256; ++i) b[i] = __float2bfloat16(static_cast<float>((i * 5) % 13 - 6));
    __nv_bfloat16* da = mem.get<__nv_bfloat16>(a.size());
    __nv_bfloat16* db = mem.get<__nv_bfloat16>(b.size());
    float* d1 = mem.get<float>(256);
    float* d2 = mem.get<float>(256);
    cudaMemcpy(da, a.data(), a.size() * sizeof(a[0]), cudaMemcpyHostToDevice);
    cudaMemcpy(db, b.data(), b.size() * sizeof(b[0]), cudaMemcpyHostToDevice);
    launch("ldmatrix_tiles", dim3(1), dim3(32), 0, cudaStream_t{nullptr}, ldmatrix_tiles, da, db, d1, d2);
    const cudaError_t launched = cudaGetLastError();
    float h1[256], h2[256];
    cudaMemcpy(h1, d1, sizeof(h1), cudaMemcpyDeviceToHost);
    cudaMemcpy(h2, d2, sizeof(h2), cudaMemcpyDeviceToHost);
    int wrong_plain = 0, wrong_trans = 0;
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 16; ++j) {
        float want = 0.f;
        for (int k = 0; k < 16; ++k) want += __bfloat162float(a[i * 16 + k]) * __bfloat162float(b[k * 16 + j]);
        wrong_plain += h1[i * 16 + j] != want;
        wrong_trans += h2[i * 16 + j] != want;
      }
    r = finish(launched, std::to_string(wrong_plain) + " of 256 wrong from [n][k], " + std::to_string(wrong_trans) +
                             " of 256 wrong from [k][n] (.trans)");
  } else if (name == "misaligned-residual-stream") {
    // The training forward's fused residual add + norm (kernels/rmsnorm.cu) takes vector loads of the fp32 stream
    // when the norm's own operands are aligned: a stream pointer off by one float is refused, not read misaligned.
    // (Arena buffers are always aligned: the API cannot reach this; the check guards the next kernel author.)
    const int rows = 2, d = 512;
    float* x = mem.get<float>(rows * d + 1);
    float* y = mem.get<float>(rows * d);
    float* weight = mem.get<float>(d);
    float* saved = mem.get<float>(rows * d);
    float* out = mem.get<float>(rows * d);
    std::string what = "accepted";
    try {
      kernels::residual_add_norm<float>(x + 1, y, rows, d, kernels::DropoutSite{}, saved, weight, 1e-6f, 1.f, out,
                                        cudaStream_t{nullptr});
    } catch (const TfewError& e) {
      what = std::string(error_code_name(e.code())) + ": " + e.what();
    }
    r = finish(cudaGetLastError(), what);
  } else if (name == "misaligned-attention-view") {
    // The fused encoder attention copies q|k|v 16 bytes at a time (cp.async): a view one element off is refused
    // (a GPU would fault on it; x86 would not).
    const int batch = 1, heads = 2, len = 16, d_kv = 64, inner = heads * d_kv;
    __nv_bfloat16* qkv = mem.get<__nv_bfloat16>(batch * len * 3 * inner + 8);
    __nv_bfloat16* out = mem.get<__nv_bfloat16>(batch * len * inner);
    float* bias = mem.get<float>((2 * len - 1) * heads);
    int32_t* lengths = mem.get<int32_t>(batch);
    std::string what = "accepted";
    try {
      kernels::fused_encoder_attention(qkv + 1, inner, d_kv, batch, heads, len, bias, lengths, kernels::AdapterIndex{},
                                       -1, -1, kernels::DropoutSite{}, out, cudaStream_t{nullptr});
    } catch (const TfewError& e) {
      what = std::string(error_code_name(e.code())) + ": " + e.what();
    }
    r = finish(cudaGetLastError(), what);
  } else {
    r.error = "unknown";
    r.message = "no self-test named " + name;
  }
  return r;
}

}  // namespace

SelfTestResult run_self_test(const std::string& name) {
  reset_device_faults();
  const SelfTestResult r = run_scenario(name);
  reset_device_faults();  // the faults were deliberate: later tests start from a clean context
  return r;
}

}  // namespace emu
}  // namespace tfew
