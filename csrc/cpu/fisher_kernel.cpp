// CPU backend of dcfast::fisher_accumulate_ (docs/design.md: the per-sample Fisher kernel): fisher (O, I) += sum_n (G_n^T X_n)^2.
//
// Samples are split into at most one contiguous chunk per thread. A chunk computes per-sample
// gradients G_n^T X_n with BLAS into a small reused thread-local float32 scratch and squares them into
// a chunk-local float32 sum; the chunk sums are then added into `fisher` in chunk order, so the result
// does not depend on which thread ran which chunk. Per-sample gradients never exist beyond that
// scratch. Half and bfloat16 inputs are widened to float32 before the GEMM (CPU GEMMs on 16-bit
// types round their output to 16 bits).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <algorithm>
#include <vector>
#include "../checks.h"

namespace dcfast {
namespace {

// acc[j] += tile[j]^2 over one contiguous (O*I) block; a plain loop the compiler vectorises.
inline void square_add(float* __restrict acc, const float* __restrict tile, int64_t size) {
  for (int64_t j = 0; j < size; ++j) acc[j] += tile[j] * tile[j];
}

void fisher_accumulate_cpu(const at::Tensor& fisher, const at::Tensor& grad_output, const at::Tensor& input) {
  check_fisher_inputs(fisher, grad_output, input);
  TORCH_CHECK_TYPE(at::isFloatingType(input.scalar_type()), "dcfast.fisher_accumulate_: inputs must be floating point, got ",
                   input.scalar_type());
  const int64_t N = grad_output.size(0), R = grad_output.size(1);
  const int64_t O = fisher.size(0), I = fisher.size(1), size = O * I;
  if (N == 0 || R == 0 || size == 0) return;
  const bool widen = grad_output.scalar_type() != at::kFloat;
  // A chunk per thread, but none under ~1M multiply-adds: a parallel region costs more than small
  // LoRA layers take, and far more when the cores are shared.
  constexpr int64_t kMinChunkWork = 1 << 20;
  const int64_t chunks = std::max<int64_t>(
      1, std::min<int64_t>({N, static_cast<int64_t>(at::get_num_threads()), N * R * size / kMinChunkWork}));
  // Chunk c owns samples [c*N/chunks, (c+1)*N/chunks); one chunk accumulates straight into fisher.
  // Per-sample gradients go through a thread-local scratch of at most kGroup samples (<= 256 KiB), one
  // batched GEMM per group: small LoRA layers would otherwise pay a GEMM call per sample.
  constexpr int64_t kScratchFloats = 1 << 16, kGroup = 16;
  const int64_t group = std::max<int64_t>(1, std::min<int64_t>(kGroup, kScratchFloats / size));
  std::vector<float> partial(chunks > 1 ? chunks * size : 0, 0.f);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    auto scratch = at::empty({group, O, I}, fisher.options());
    for (int64_t c = begin; c < end; ++c) {
      float* acc = chunks > 1 ? partial.data() + c * size : fisher.data_ptr<float>();
      const int64_t n_end = (c + 1) * N / chunks;
      for (int64_t n = c * N / chunks; n < n_end; n += group) {
        const int64_t count = std::min(group, n_end - n);
        at::Tensor g = grad_output.narrow(0, n, count), x = input.narrow(0, n, count);
        if (widen) {
          g = g.to(at::kFloat);
          x = x.to(at::kFloat);
        }
        auto tiles = scratch.narrow(0, 0, count);
        at::bmm_out(tiles, g.transpose(1, 2), x);
        const float* t = tiles.data_ptr<float>();
        for (int64_t k = 0; k < count; ++k) square_add(acc, t + k * size, size);
      }
    }
  });
  float* out = fisher.data_ptr<float>();
  for (int64_t c = 0; c < (chunks > 1 ? chunks : 0); ++c) {
    const float* src = partial.data() + c * size;
    at::parallel_for(0, size, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) out[j] += src[j];
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(dcfast, CPU, m) { m.impl("fisher_accumulate_", &fisher_accumulate_cpu); }

}  // namespace dcfast
