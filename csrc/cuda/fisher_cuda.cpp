// CUDA backend of dcfast::fisher_accumulate_: torch glue around the launchers in cuda/fisher_kernel.cu.
// The workspace of the split plans comes from torch's caching allocator on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include "../checks.h"

extern "C" int64_t dcfast_fisher_plan(int64_t N, int64_t R, int64_t O, int64_t I, int64_t* groups, int64_t* splits,
                                      cudaError_t* error);
extern "C" cudaError_t dcfast_fisher_accumulate_cuda(float* fisher, float* workspace, const void* grad_output,
                                                      const void* input, int dtype, int64_t N, int64_t R, int64_t O,
                                                      int64_t I, int64_t groups, int64_t splits, cudaStream_t stream);

namespace dcfast {
namespace {

int dtype_code(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default:
      TORCH_CHECK_TYPE(false, "dcfast.fisher_accumulate_: CUDA inputs must be float32, float16 or bfloat16, got ", type);
  }
}

void fisher_accumulate_cuda(const at::Tensor& fisher, const at::Tensor& grad_output, const at::Tensor& input) {
  check_fisher_inputs(fisher, grad_output, input);
  TORCH_CHECK_VALUE(fisher.is_cuda(), "dcfast.fisher_accumulate_: expected CUDA tensors, got ", fisher.device());
  const int code = dtype_code(input.scalar_type());
  const c10::cuda::CUDAGuard guard(fisher.device());
  const auto g = grad_output.contiguous();
  const auto x = input.contiguous();
  const int64_t N = g.size(0), R = g.size(1), O = g.size(2), I = x.size(2);
  int64_t groups = 1, splits = 1;
  cudaError_t err = cudaSuccess;
  const int64_t workspace_floats = dcfast_fisher_plan(N, R, O, I, &groups, &splits, &err);
  TORCH_CHECK(workspace_floats >= 0, "dcfast.fisher_accumulate_: CUDA device query failed: ", cudaGetErrorString(err));
  at::Tensor workspace;
  if (workspace_floats > 0) workspace = at::empty({workspace_floats}, fisher.options());
  err = dcfast_fisher_accumulate_cuda(fisher.mutable_data_ptr<float>(),
                                      workspace_floats > 0 ? workspace.mutable_data_ptr<float>() : nullptr,
                                      g.const_data_ptr(), x.const_data_ptr(), code, N, R, O, I, groups, splits,
                                      c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "dcfast.fisher_accumulate_: CUDA kernel failed for grad_output ", g.sizes(),
              ", input ", x.sizes(), " (plan: ", groups, " sample groups x ", splits, " row splits): ",
              cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(dcfast, CUDA, m) { m.impl("fisher_accumulate_", &fisher_accumulate_cuda); }

}  // namespace dcfast
