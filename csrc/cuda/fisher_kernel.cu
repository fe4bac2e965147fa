// CUDA kernels of dcfast::fisher_accumulate_ (docs/design.md: the per-sample Fisher kernel), free of torch headers: the torch glue is
// cuda/fisher_cuda.cpp, which calls the extern "C" functions below.
//
//   fisher[o, i] += sum_n ( sum_r grad_output[n, r, o] * input[n, r, i] )^2
//
// A block owns a TO x TI tile of the output, a group of samples and a range of rows. Per sample it
// forms the tile of G_n^T X_n over its rows in registers, from TILE_R-row slabs staged in shared
// memory. Three plans, chosen by dcfast_fisher_plan from the tile count and the device:
//   direct       tiles alone fill the GPU: each block walks every sample and every row, squares each
//                sample's tile in registers and adds the sum into fisher (per-sample gradients never
//                reach memory; the design's case for large layers);
//   sample split too few tiles, so G sample groups run in parallel: block z squares its samples' tiles
//                and stores their sum into workspace[z] (G, O, I);
//   row split    LoRA layers (O or I is the rank: a handful of tiles) with few samples: every sample's
//                R rows are split S ways; block (n, s) stores its raw partial of G_n^T X_n into
//                workspace[n, s] (N, S, O, I), a few MB for LoRA shapes.
// A second kernel then adds sum_g workspace[g] (sample split) or sum_n (sum_s workspace[n, s])^2
// (row split) into fisher, summing in a fixed order: the result is the same bit for bit on every run
// (no atomics), as torch.use_deterministic_algorithms expects.
// Inputs are float32, float16 or bfloat16, contiguous (N, R, O) and (N, R, I); accumulation is float32.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstdint>

namespace {

constexpr int kThreadsX = 16, kThreadsY = 16, kTileR = 16;
// Workspace cap (floats): 64 MiB. Row splits shrink, then sample groups, to stay under it.
constexpr int64_t kMaxWorkspace = int64_t(1) << 24;
constexpr int kReduceThreads = 256;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Tile shape by layer shape: LoRA's A (O = rank) and B (I = rank) get 16-wide strips, others squares.
struct TileShape {
  int to, ti;
};
inline TileShape tile_shape(int64_t O, int64_t I) {
  if (O <= 16) return {16, 256};
  if (I <= 16) return {256, 16};
  return {64, 64};
}

// Thread (ty, tx) owns outputs (o0 + ty + 16a, i0 + tx + 16b): shared reads of a row of the X slab
// are consecutive across tx, and of the G slab a broadcast. Block z = g * splits + s handles samples
// [g*N/groups, (g+1)*N/groups) (groups = gridDim.z / splits) over rows [s*R/splits, (s+1)*R/splits);
// with splits == 1 it sums squared per-sample tiles, else (one sample per group) the raw tile.
template <typename T, int TO, int TI>
__global__ void __launch_bounds__(kThreadsX * kThreadsY)
    fisher_tile_kernel(float* __restrict__ out, const T* __restrict__ grad, const T* __restrict__ input, int64_t N,
                       int64_t R, int64_t O, int64_t I, int64_t splits, bool accumulate) {
  constexpr int MO = TO / kThreadsY, MI = TI / kThreadsX;
  __shared__ float s_g[kTileR][TO];
  __shared__ float s_x[kTileR][TI];
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * kThreadsX + tx;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * TI, o0 = static_cast<int64_t>(blockIdx.y) * TO;
  const int64_t z = blockIdx.z, groups = gridDim.z / splits, g = z / splits, s = z % splits;
  const int64_t n_begin = g * N / groups, n_end = (g + 1) * N / groups;
  const int64_t r_begin = s * R / splits, r_end = (s + 1) * R / splits;
  const bool square = splits == 1;

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

    for (int64_t r0 = r_begin; r0 < r_end; r0 += kTileR) {
      for (int idx = tid; idx < kTileR * TO; idx += kThreadsX * kThreadsY) {
        const int rr = idx / TO, oo = idx % TO;
        const int64_t r = r0 + rr, o = o0 + oo;
        s_g[rr][oo] = (r < r_end && o < O) ? to_float(g_n[r * O + o]) : 0.f;
      }
      for (int idx = tid; idx < kTileR * TI; idx += kThreadsX * kThreadsY) {
        const int rr = idx / TI, ii = idx % TI;
        const int64_t r = r0 + rr, i = i0 + ii;
        s_x[rr][ii] = (r < r_end && i < I) ? to_float(x_n[r * I + i]) : 0.f;
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
      for (int b = 0; b < MI; ++b) total[a][b] = square ? fmaf(tile[a][b], tile[a][b], total[a][b]) : tile[a][b];
  }

  float* dst = out + z * O * I;
#pragma unroll
  for (int a = 0; a < MO; ++a) {
    const int64_t o = o0 + ty + kThreadsY * a;
    if (o >= O) continue;
#pragma unroll
    for (int b = 0; b < MI; ++b) {
      const int64_t i = i0 + tx + kThreadsX * b;
      if (i >= I) continue;
      if (accumulate) {
        dst[o * I + i] += total[a][b];  // the direct plan: this block is the element's only writer
      } else {
        dst[o * I + i] = total[a][b];
      }
    }
  }
}

// fisher[e] += sum_g f(sum_s workspace[g, s, e]), f = square when splits > 1 (raw per-sample partials)
// else identity (already squared); g and s ascend, so the sum's order is fixed.
__global__ void __launch_bounds__(kReduceThreads)
    fisher_reduce_kernel(float* __restrict__ fisher, const float* __restrict__ workspace, int64_t groups,
                         int64_t splits, int64_t size) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kReduceThreads + threadIdx.x;
  if (e >= size) return;
  float total = 0.f;
  for (int64_t g = 0; g < groups; ++g) {
    float part = 0.f;
    for (int64_t s = 0; s < splits; ++s) part += workspace[(g * splits + s) * size + e];
    total = splits > 1 ? fmaf(part, part, total) : total + part;
  }
  fisher[e] += total;
}

template <typename T, int TO, int TI>
cudaError_t launch_tiles(float* fisher, float* workspace, const void* grad, const void* input, int64_t N, int64_t R,
                         int64_t O, int64_t I, int64_t groups, int64_t splits, cudaStream_t stream) {
  const int64_t tiles_i = (I + TI - 1) / TI, tiles_o = (O + TO - 1) / TO;
  const bool direct = groups == 1 && splits == 1;
  const dim3 grid(static_cast<unsigned>(tiles_i), static_cast<unsigned>(tiles_o),
                  static_cast<unsigned>(groups * splits));
  const dim3 block(kThreadsX, kThreadsY);
  fisher_tile_kernel<T, TO, TI><<<grid, block, 0, stream>>>(direct ? fisher : workspace, static_cast<const T*>(grad),
                                                           static_cast<const T*>(input), N, R, O, I, splits, direct);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || direct) return err;
  const int64_t size = O * I;
  fisher_reduce_kernel<<<static_cast<unsigned>((size + kReduceThreads - 1) / kReduceThreads), kReduceThreads, 0,
                         stream>>>(fisher, workspace, groups, splits, size);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_shape(float* fisher, float* workspace, const void* grad, const void* input, int64_t N, int64_t R,
                           int64_t O, int64_t I, int64_t groups, int64_t splits, cudaStream_t stream) {
  const TileShape shape = tile_shape(O, I);
  if (shape.to == 16) return launch_tiles<T, 16, 256>(fisher, workspace, grad, input, N, R, O, I, groups, splits, stream);
  if (shape.ti == 16) return launch_tiles<T, 256, 16>(fisher, workspace, grad, input, N, R, O, I, groups, splits, stream);
  return launch_tiles<T, 64, 64>(fisher, workspace, grad, input, N, R, O, I, groups, splits, stream);
}

}  // namespace

// The plan for an (N, R, O, I) problem on the current device: *groups sample groups times *splits row
// splits of blocks per tile; returns the workspace it needs in floats (0 for the direct plan), or -1
// with the CUDA error in *error. About four blocks per SM: LoRA layers are memory-bound (about r
// flops per byte), so the grid must keep every SM's loads in flight.
extern "C" int64_t dcfast_fisher_plan(int64_t N, int64_t R, int64_t O, int64_t I, int64_t* groups, int64_t* splits,
                                      cudaError_t* error) {
  *groups = *splits = 1;
  *error = cudaSuccess;
  if (N == 0 || R == 0 || O == 0 || I == 0) return 0;
  int device = 0, sms = 1;
  *error = cudaGetDevice(&device);
  if (*error == cudaSuccess) *error = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (*error != cudaSuccess) return -1;
  const TileShape shape = tile_shape(O, I);
  const int64_t tiles = ((O + shape.to - 1) / shape.to) * ((I + shape.ti - 1) / shape.ti);
  const int64_t target = 4 * static_cast<int64_t>(sms), size = O * I;
  if (tiles >= target) return 0;
  if (N * tiles >= target) {
    *groups = (target + tiles - 1) / tiles;  // <= N
  } else {
    const int64_t max_splits = (R + kTileR - 1) / kTileR;  // a split gets at least one slab of rows
    const int64_t want = (target + N * tiles - 1) / (N * tiles);
    *groups = N;
    *splits = want < max_splits ? want : max_splits;
  }
  if (*groups * *splits * size > kMaxWorkspace && *splits > 1) {
    *splits = kMaxWorkspace / (N * size) > 1 ? kMaxWorkspace / (N * size) : 1;
  }
  if (*groups * *splits * size > kMaxWorkspace) {  // splits == 1 here
    *groups = kMaxWorkspace / size > 1 ? kMaxWorkspace / size : 1;
  }
  if (*groups * *splits > 65535) *groups = *splits = 1;  // the grid's z limit; never reached for target < 65535
  return (*groups == 1 && *splits == 1) ? 0 : *groups * *splits * size;
}

// dtype: 0 float32, 1 float16, 2 bfloat16 (grad_output and input share it). fisher: contiguous (O, I)
// float32; grad_output (N, R, O) and input (N, R, I) contiguous on the current device; groups, splits
// and workspace (groups * splits * O * I floats; unused by the direct plan) as dcfast_fisher_plan gave.
extern "C" cudaError_t dcfast_fisher_accumulate_cuda(float* fisher, float* workspace, const void* grad_output,
                                                      const void* input, int dtype, int64_t N, int64_t R, int64_t O,
                                                      int64_t I, int64_t groups, int64_t splits, cudaStream_t stream) {
  if (N == 0 || R == 0 || O == 0 || I == 0) return cudaSuccess;
  const TileShape shape = tile_shape(O, I);
  if ((O + shape.to - 1) / shape.to > 65535 || groups < 1 || splits < 1 || groups * splits > 65535 ||
      (splits > 1 && groups != N) || groups > N || ((groups > 1 || splits > 1) && workspace == nullptr)) {
    return cudaErrorInvalidConfiguration;
  }
  switch (dtype) {
    case 0: return dispatch_shape<float>(fisher, workspace, grad_output, input, N, R, O, I, groups, splits, stream);
    case 1: return dispatch_shape<__half>(fisher, workspace, grad_output, input, N, R, O, I, groups, splits, stream);
    case 2: return dispatch_shape<__nv_bfloat16>(fisher, workspace, grad_output, input, N, R, O, I, groups, splits, stream);
    default: return cudaErrorInvalidValue;
  }
}
