// CUDA kernels of dcfast::fisher_accumulate_ (DESIGN 2.3), free of torch headers: the torch glue is
// cuda/fisher_cuda.cpp, which calls the extern "C" launcher below.
//
//   fisher[o, i] += sum_n ( sum_r grad_output[n, r, o] * input[n, r, i] )^2
//
// One block owns a TO x TI tile of fisher and a contiguous range of samples. Per sample it forms the
// tile of G_n^T X_n in registers from TILE_R-row slabs staged in shared memory, squares it into a
// register sum, and only after its last sample touches global memory: a plain add when it is the
// tile's only block, else atomicAdd. LoRA layers have few tiles (O or I is the rank), so samples are
// split across blocks until the grid covers the device; per-sample gradients never reach memory.
// Inputs are float32, float16 or bfloat16, contiguous (N, R, O) and (N, R, I); accumulation is float32.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstdint>

namespace {

constexpr int kThreadsX = 16, kThreadsY = 16, kTileR = 16;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Thread (ty, tx) owns outputs (o0 + ty + 16a, i0 + tx + 16b): shared reads of a row of the X slab
// are consecutive across tx, and of the G slab a broadcast.
template <typename T, int TO, int TI>
__global__ void __launch_bounds__(kThreadsX * kThreadsY)
    fisher_tile_kernel(float* __restrict__ fisher, const T* __restrict__ grad, const T* __restrict__ input,
                       int64_t N, int64_t R, int64_t O, int64_t I, bool atomic) {
  constexpr int MO = TO / kThreadsY, MI = TI / kThreadsX;
  __shared__ float s_g[kTileR][TO];
  __shared__ float s_x[kTileR][TI];
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * kThreadsX + tx;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * TI, o0 = static_cast<int64_t>(blockIdx.y) * TO;
  const int64_t splits = gridDim.z;
  const int64_t n_begin = blockIdx.z * N / splits, n_end = (blockIdx.z + 1) * N / splits;

  float total[MO][MI];
#pragma unroll
  for (int a = 0; a < MO; ++a)
#pragma unroll
    for (int b = 0; b < MI; ++b) total[a][b] = 0.f;

  for (int64_t n = n_begin; n < n_end; ++n) {
    const T* g_n = grad + n * R * O;
    const T* x_n = input + n * R * I;
    float tile[MO][MI];
#pragma unroll
    for (int a = 0; a < MO; ++a)
#pragma unroll
      for (int b = 0; b < MI; ++b) tile[a][b] = 0.f;

    for (int64_t r0 = 0; r0 < R; r0 += kTileR) {
      for (int idx = tid; idx < kTileR * TO; idx += kThreadsX * kThreadsY) {
        const int rr = idx / TO, oo = idx % TO;
        const int64_t r = r0 + rr, o = o0 + oo;
        s_g[rr][oo] = (r < R && o < O) ? to_float(g_n[r * O + o]) : 0.f;
      }
      for (int idx = tid; idx < kTileR * TI; idx += kThreadsX * kThreadsY) {
        const int rr = idx / TI, ii = idx % TI;
        const int64_t r = r0 + rr, i = i0 + ii;
        s_x[rr][ii] = (r < R && i < I) ? to_float(x_n[r * I + i]) : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int rr = 0; rr < kTileR; ++rr) {
        float xv[MI];
#pragma unroll
        for (int b = 0; b < MI; ++b) xv[b] = s_x[rr][tx + kThreadsX * b];
#pragma unroll
        for (int a = 0; a < MO; ++a) {
          const float gv = s_g[rr][ty + kThreadsY * a];
#pragma unroll
          for (int b = 0; b < MI; ++b) tile[a][b] = fmaf(gv, xv[b], tile[a][b]);
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int a = 0; a < MO; ++a)
#pragma unroll
      for (int b = 0; b < MI; ++b) total[a][b] = fmaf(tile[a][b], tile[a][b], total[a][b]);
  }

#pragma unroll
  for (int a = 0; a < MO; ++a) {
    const int64_t o = o0 + ty + kThreadsY * a;
    if (o >= O) continue;
#pragma unroll
    for (int b = 0; b < MI; ++b) {
      const int64_t i = i0 + tx + kThreadsX * b;
      if (i >= I) continue;
      if (atomic) {
        atomicAdd(fisher + o * I + i, total[a][b]);
      } else {
        fisher[o * I + i] += total[a][b];
      }
    }
  }
}

template <typename T, int TO, int TI>
cudaError_t launch(float* fisher, const void* grad, const void* input, int64_t N, int64_t R, int64_t O, int64_t I,
                   cudaStream_t stream) {
  const int64_t tiles_i = (I + TI - 1) / TI, tiles_o = (O + TO - 1) / TO;
  if (tiles_o > 65535 || tiles_i > 2147483647) return cudaErrorInvalidConfiguration;
  int device = 0, sms = 1;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  // Enough sample splits for about two blocks per SM; each split adds one atomic per element.
  int64_t splits = (2 * static_cast<int64_t>(sms) + tiles_i * tiles_o - 1) / (tiles_i * tiles_o);
  if (splits > N) splits = N;
  if (splits > 65535) splits = 65535;
  if (splits < 1) splits = 1;
  const dim3 grid(static_cast<unsigned>(tiles_i), static_cast<unsigned>(tiles_o), static_cast<unsigned>(splits));
  const dim3 block(kThreadsX, kThreadsY);
  fisher_tile_kernel<T, TO, TI><<<grid, block, 0, stream>>>(fisher, static_cast<const T*>(grad),
                                                           static_cast<const T*>(input), N, R, O, I, splits > 1);
  return cudaGetLastError();
}

// Tile shape by layer shape: LoRA's A (O = rank) and B (I = rank) get 16-wide strips, others squares.
template <typename T>
cudaError_t dispatch_shape(float* fisher, const void* grad, const void* input, int64_t N, int64_t R, int64_t O,
                           int64_t I, cudaStream_t stream) {
  if (O <= 16) return launch<T, 16, 256>(fisher, grad, input, N, R, O, I, stream);
  if (I <= 16) return launch<T, 256, 16>(fisher, grad, input, N, R, O, I, stream);
  return launch<T, 64, 64>(fisher, grad, input, N, R, O, I, stream);
}

}  // namespace

// dtype: 0 float32, 1 float16, 2 bfloat16 (grad_output and input share it). fisher: contiguous (O, I)
// float32; grad_output (N, R, O) and input (N, R, I) contiguous on the current device.
extern "C" cudaError_t dcfast_fisher_accumulate_cuda(float* fisher, const void* grad_output, const void* input,
                                                      int dtype, int64_t N, int64_t R, int64_t O, int64_t I,
                                                      cudaStream_t stream) {
  if (N == 0 || R == 0 || O == 0 || I == 0) return cudaSuccess;
  switch (dtype) {
    case 0: return dispatch_shape<float>(fisher, grad_output, input, N, R, O, I, stream);
    case 1: return dispatch_shape<__half>(fisher, grad_output, input, N, R, O, I, stream);
    case 2: return dispatch_shape<__nv_bfloat16>(fisher, grad_output, input, N, R, O, I, stream);
    default: return cudaErrorInvalidValue;
  }
}
