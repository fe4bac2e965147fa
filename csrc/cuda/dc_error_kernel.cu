// CUDA kernels of dcfast::dc_error, free of torch headers: the torch glue (dc_error_cuda.cpp) calls
// the extern "C" launchers below. Row r = (b*K + k)*T + t of pred (R = B*K*T rows of D values) pairs
// with noise row b*T + t, so one noise row serves all K concepts and is never copied.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstdint>

#include "loss_kind.h"

namespace dcfast {
namespace {

constexpr int kThreads = 256;  // one block per row; 8 warps stride over D
constexpr int kWarps = kThreads / 32;

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

__device__ __forceinline__ int64_t noise_row(int64_t row, int64_t KT, int64_t T) { return (row / KT) * T + row % T; }

// Sum of `value` over the block: shuffle within each warp, then the first warp sums the warp totals.
// The result is valid in thread 0.
__device__ __forceinline__ float block_sum(float value) {
  __shared__ float warp_sums[kWarps];
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  value = threadIdx.x < kWarps ? warp_sums[threadIdx.x] : 0.f;
  if (warp == 0) {
    for (int offset = kWarps / 2; offset > 0; offset >>= 1) value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  return value;
}

// err[r] = (1/D) sum_d loss(noise[row(r), d] - pred[r, d]), fp32 accumulation; one block per row.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    dc_error_fwd_kernel(const scalar_t* __restrict__ pred, const scalar_t* __restrict__ noise, float* __restrict__ err,
                        int64_t KT, int64_t T, int64_t D, LossKind kind, float delta) {
  const int64_t row = blockIdx.x;
  const scalar_t* p = pred + row * D;
  const scalar_t* n = noise + noise_row(row, KT, T) * D;
  float acc = 0.f;
  for (int64_t d = threadIdx.x; d < D; d += kThreads) {
    acc += loss_value(kind, to_float(n[d]) - to_float(p[d]), delta);
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) err[row] = acc / static_cast<float>(D);
}

// grad_pred[r, d] = grad_err[r] / D * dloss/dpred(noise[row(r), d] - pred[r, d]); one block per row.
// The broadcast difference lives in registers only.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    dc_error_bwd_kernel(const float* __restrict__ grad_err, const scalar_t* __restrict__ pred,
                        const scalar_t* __restrict__ noise, scalar_t* __restrict__ grad_pred, int64_t KT, int64_t T,
                        int64_t D, LossKind kind, float delta) {
  const int64_t row = blockIdx.x;
  const scalar_t* p = pred + row * D;
  const scalar_t* n = noise + noise_row(row, KT, T) * D;
  scalar_t* out = grad_pred + row * D;
  const float scale = grad_err[row] / static_cast<float>(D);
  for (int64_t d = threadIdx.x; d < D; d += kThreads) {
    out[d] = from_float<scalar_t>(scale * loss_grad_pred(kind, to_float(n[d]) - to_float(p[d]), delta));
  }
}

template <typename scalar_t>
void launch_fwd(const void* pred, const void* noise, float* err, int64_t B, int64_t K, int64_t T, int64_t D,
                int loss, float delta, cudaStream_t stream) {
  dc_error_fwd_kernel<scalar_t><<<static_cast<unsigned int>(B * K * T), kThreads, 0, stream>>>(
      static_cast<const scalar_t*>(pred), static_cast<const scalar_t*>(noise), err, K * T, T, D,
      static_cast<LossKind>(loss), delta);
}

template <typename scalar_t>
void launch_bwd(const float* grad_err, const void* pred, const void* noise, void* grad_pred, int64_t B, int64_t K,
                int64_t T, int64_t D, int loss, float delta, cudaStream_t stream) {
  dc_error_bwd_kernel<scalar_t><<<static_cast<unsigned int>(B * K * T), kThreads, 0, stream>>>(
      grad_err, static_cast<const scalar_t*>(pred), static_cast<const scalar_t*>(noise),
      static_cast<scalar_t*>(grad_pred), K * T, T, D, static_cast<LossKind>(loss), delta);
}

}  // namespace
}  // namespace dcfast

// dtype: 0 = float32, 1 = float16, 2 = bfloat16; loss: a dcfast::LossKind value. Contiguous inputs,
// 0 < B*K*T < 2^31 rows (the caller checks). Launch errors are left for cudaGetLastError.
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
