// CUDA backend of dcfast::fisher_accumulate_: torch glue around the launcher in cuda/fisher_kernel.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include "../checks.h"

extern "C" cudaError_t dcfast_fisher_accumulate_cuda(float* fisher, const void* grad_output, const void* input,
                                                      int dtype, int64_t N, int64_t R, int64_t O, int64_t I,
                                                      cudaStream_t stream);

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
  const cudaError_t err = dcfast_fisher_accumulate_cuda(fisher.data_ptr<float>(), g.const_data_ptr(), x.const_data_ptr(),
                                                        code, g.size(0), g.size(1), g.size(2), x.size(2),
                                                        c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "dcfast.fisher_accumulate_: CUDA kernel failed: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(dcfast, CUDA, m) { m.impl("fisher_accumulate_", &fisher_accumulate_cuda); }

}  // namespace dcfast
