// CUDA kernels of dcfast::dc_error, free of torch headers: the torch glue (dc_error_cuda.cpp) calls
// the extern "C" launchers below. Row r = (b*K + k)*T + t of pred (R = B*K*T rows of D values) pairs
// with noise row b*T + t, so one noise row serves all K concepts and is never copied.
//
// Memory-bound: each element of pred is read once, so the launch shape is about bandwidth.
//  - 128-bit loads: when D is a multiple of VEC = 16 bytes / element size (8 halves, 4 floats) and
//    both base pointers are 16-byte aligned, every thread moves 16 bytes per load.
//  - Rows per block: a row of D <= kWarpRowMax elements gets one warp (8 rows per 256-thread
//    block, warp-shuffle reduction only); longer rows (SD latents: D = 4*64*64) get the whole block.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstdint>

#include "loss_kind.h"

namespace dcfast {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kWarpRowMax = 4096;  // up to 16 (fp32) or 32 (16-bit) elements per lane with 128-bit loads

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename scalar_t>
__device__ __forceinline__ scalar_t from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// VEC elements moved as one aligned load/store (16 bytes when VEC * sizeof(scalar_t) == 16).
template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

__device__ __forceinline__ int64_t noise_row(int64_t row, int64_t KT, int64_t T) { return (row / KT) * T + row % T; }

__device__ __forceinline__ float warp_sum(float value) {
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_down_sync(0xffffffffu, value, offset);
  return value;
}

// Sum of `value` over the block: shuffle within each warp, then the first warp sums the warp totals.
// The result is valid in thread 0.
__device__ __forceinline__ float block_sum(float value) {
  __shared__ float warp_sums[kWarps];
  value = warp_sum(value);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  value = threadIdx.x < kWarps ? warp_sums[threadIdx.x] : 0.f;
  if (warp == 0) {
    for (int offset = kWarps / 2; offset > 0; offset >>= 1) value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  return value;
}

// err[r] = (1/D) sum_d loss(noise[row(r), d] - pred[r, d]), fp32 accumulation. LANES threads per row
// (32: a warp, 256: the block), kThreads / LANES rows per block; each lane strides over packs of VEC.
template <typename scalar_t, int VEC, int LANES>
__global__ void __launch_bounds__(kThreads)
    dc_error_fwd_kernel(const scalar_t* __restrict__ pred, const scalar_t* __restrict__ noise, float* __restrict__ err,
                        int64_t n_rows, int64_t KT, int64_t T, int64_t D, LossKind kind, float delta) {
  using P = Pack<scalar_t, VEC>;
  constexpr int kRows = kThreads / LANES;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRows + threadIdx.x / LANES;
  const int lane = threadIdx.x % LANES;
  float acc = 0.f;
  if (row < n_rows) {  // a whole warp shares one row, so warps past the end skip together
    const P* p = reinterpret_cast<const P*>(pred + row * D);
    const P* n = reinterpret_cast<const P*>(noise + noise_row(row, KT, T) * D);
    for (int64_t k = lane; k < D / VEC; k += LANES) {
      const P a = p[k], b = n[k];
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc += loss_value(kind, to_float(b.v[j]) - to_float(a.v[j]), delta);
    }
  }
  if (LANES == 32) {
    acc = warp_sum(acc);
    if (lane == 0 && row < n_rows) err[row] = acc / static_cast<float>(D);
  } else {
    acc = block_sum(acc);
    if (threadIdx.x == 0) err[row] = acc / static_cast<float>(D);
  }
}

// grad_pred[r, d] = grad_err[r] / D * dloss/dpred(noise[row(r), d] - pred[r, d]); same layout as the
// forward. The broadcast difference lives in registers only.
template <typename scalar_t, int VEC, int LANES>
__global__ void __launch_bounds__(kThreads)
    dc_error_bwd_kernel(const float* __restrict__ grad_err, const scalar_t* __restrict__ pred,
                        const scalar_t* __restrict__ noise, scalar_t* __restrict__ grad_pred, int64_t n_rows,
                        int64_t KT, int64_t T, int64_t D, LossKind kind, float delta) {
  using P = Pack<scalar_t, VEC>;
  constexpr int kRows = kThreads / LANES;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRows + threadIdx.x / LANES;
  if (row >= n_rows) return;
  const int lane = threadIdx.x % LANES;
  const P* p = reinterpret_cast<const P*>(pred + row * D);
  const P* n = reinterpret_cast<const P*>(noise + noise_row(row, KT, T) * D);
  P* out = reinterpret_cast<P*>(grad_pred + row * D);
  const float scale = grad_err[row] / static_cast<float>(D);
  for (int64_t k = lane; k < D / VEC; k += LANES) {
    const P a = p[k], b = n[k];
    P g;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      g.v[j] = from_float<scalar_t>(scale * loss_grad_pred(kind, to_float(b.v[j]) - to_float(a.v[j]), delta));
    }
    out[k] = g;
  }
}

inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <int VEC, int LANES>
unsigned blocks(int64_t n_rows) {
  constexpr int kRows = kThreads / LANES;
  return static_cast<unsigned>((n_rows + kRows - 1) / kRows);
}

// Packs of 16 bytes when D and both pointers allow, else single elements; a warp per row for short rows.
template <typename scalar_t>
void launch_fwd(const void* pred_v, const void* noise_v, float* err, int64_t B, int64_t K, int64_t T, int64_t D,
                int loss, float delta, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  const auto* pred = static_cast<const scalar_t*>(pred_v);
  const auto* noise = static_cast<const scalar_t*>(noise_v);
  const int64_t n_rows = B * K * T;
  const LossKind kind = static_cast<LossKind>(loss);
  const bool vec = D % VEC == 0 && aligned16(pred) && aligned16(noise);
  const bool warp = D <= kWarpRowMax;
  if (vec && warp) {
    dc_error_fwd_kernel<scalar_t, VEC, 32><<<blocks<VEC, 32>(n_rows), kThreads, 0, stream>>>(
        pred, noise, err, n_rows, K * T, T, D, kind, delta);
  } else if (vec) {
    dc_error_fwd_kernel<scalar_t, VEC, kThreads><<<blocks<VEC, kThreads>(n_rows), kThreads, 0, stream>>>(
        pred, noise, err, n_rows, K * T, T, D, kind, delta);
  } else if (warp) {
    dc_error_fwd_kernel<scalar_t, 1, 32><<<blocks<1, 32>(n_rows), kThreads, 0, stream>>>(
        pred, noise, err, n_rows, K * T, T, D, kind, delta);
  } else {
    dc_error_fwd_kernel<scalar_t, 1, kThreads><<<blocks<1, kThreads>(n_rows), kThreads, 0, stream>>>(
        pred, noise, err, n_rows, K * T, T, D, kind, delta);
  }
}

template <typename scalar_t>
void launch_bwd(const float* grad_err, const void* pred_v, const void* noise_v, void* grad_pred_v, int64_t B,
                int64_t K, int64_t T, int64_t D, int loss, float delta, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  const auto* pred = static_cast<const scalar_t*>(pred_v);
  const auto* noise = static_cast<const scalar_t*>(noise_v);
  auto* grad_pred = static_cast<scalar_t*>(grad_pred_v);
  const int64_t n_rows = B * K * T;
  const LossKind kind = static_cast<LossKind>(loss);
  const bool vec = D % VEC == 0 && aligned16(pred) && aligned16(noise) && aligned16(grad_pred);
  const bool warp = D <= kWarpRowMax;
  if (vec && warp) {
    dc_error_bwd_kernel<scalar_t, VEC, 32><<<blocks<VEC, 32>(n_rows), kThreads, 0, stream>>>(
        grad_err, pred, noise, grad_pred, n_rows, K * T, T, D, kind, delta);
  } else if (vec) {
    dc_error_bwd_kernel<scalar_t, VEC, kThreads><<<blocks<VEC, kThreads>(n_rows), kThreads, 0, stream>>>(
        grad_err, pred, noise, grad_pred, n_rows, K * T, T, D, kind, delta);
  } else if (warp) {
    dc_error_bwd_kernel<scalar_t, 1, 32><<<blocks<1, 32>(n_rows), kThreads, 0, stream>>>(
        grad_err, pred, noise, grad_pred, n_rows, K * T, T, D, kind, delta);
  } else {
    dc_error_bwd_kernel<scalar_t, 1, kThreads><<<blocks<1, kThreads>(n_rows), kThreads, 0, stream>>>(
        grad_err, pred, noise, grad_pred, n_rows, K * T, T, D, kind, delta);
  }
}

}  // namespace
}  // namespace dcfast

// dtype: 0 = float32, 1 = float16, 2 = bfloat16; loss: a dcfast::LossKind value. Contiguous inputs,
// 0 < B*K*T and B*K*T / (rows per block) < 2^31 blocks (the caller checks). Launch errors are left
// for cudaGetLastError.
extern "C" void dcfast_dc_error_fwd_cuda(int dtype, const void* pred, const void* noise, float* err, int64_t B,
                                         int64_t K, int64_t T, int64_t D, int loss, float delta,
                                         cudaStream_t stream) {
  using namespace dcfast;
  if (dtype == 0) launch_fwd<float>(pred, noise, err, B, K, T, D, loss, delta, stream);
  if (dtype == 1) launch_fwd<__half>(pred, noise, err, B, K, T, D, loss, delta, stream);
  if (dtype == 2) launch_fwd<__nv_bfloat16>(pred, noise, err, B, K, T, D, loss, delta, stream);
}

extern "C" void dcfast_dc_error_bwd_cuda(int dtype, const float* grad_err, const void* pred, const void* noise,
                                         void* grad_pred, int64_t B, int64_t K, int64_t T, int64_t D, int loss,
                                         float delta, cudaStream_t stream) {
  using namespace dcfast;
  if (dtype == 0) launch_bwd<float>(grad_err, pred, noise, grad_pred, B, K, T, D, loss, delta, stream);
  if (dtype == 1) launch_bwd<__half>(grad_err, pred, noise, grad_pred, B, K, T, D, loss, delta, stream);
  if (dtype == 2) launch_bwd<__nv_bfloat16>(grad_err, pred, noise, grad_pred, B, K, T, D, loss, delta, stream);
}
