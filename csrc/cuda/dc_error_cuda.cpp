// CUDA backend of dcfast::dc_error: torch glue around the torch-free launchers in dc_error_kernel.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // at::cuda::getCurrentCUDAStream, without CUDAContext.h's cuBLAS/cuSPARSE headers
#include <torch/library.h>

#include <limits>

#include "../checks.h"

extern "C" void dcfast_dc_error_fwd_cuda(int dtype, const void* pred, const void* noise, float* err, int64_t B,
                                         int64_t K, int64_t T, int64_t D, int loss, float delta,
                                         cudaStream_t stream);
extern "C" void dcfast_dc_error_bwd_cuda(int dtype, const float* grad_err, const void* pred, const void* noise,
                                         void* grad_pred, int64_t B, int64_t K, int64_t T, int64_t D, int loss,
                                         float delta, cudaStream_t stream);

namespace dcfast {
namespace {

// The launchers' dtype code (see dc_error_kernel.cu).
int dtype_code(const at::Tensor& pred) {
  switch (pred.scalar_type()) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default: TORCH_CHECK_TYPE(false, "dcfast.dc_error (CUDA): pred must be float32, float16 or bfloat16, got ",
                              pred.scalar_type());
  }
}

// One CUDA block per row: the grid's x dimension holds at most 2^31 - 1 rows.
void check_cuda(const at::Tensor& pred) {
  TORCH_CHECK_VALUE(pred.is_cuda(), "dcfast.dc_error (CUDA): pred must be a CUDA tensor, got ", pred.device());
  TORCH_CHECK_VALUE(pred.size(0) * pred.size(1) * pred.size(2) <= std::numeric_limits<int32_t>::max(),
                    "dcfast.dc_error (CUDA): B*K*T must be < 2^31, got pred ", pred.sizes());
}

at::Tensor dc_error_cuda(const at::Tensor& pred_in, const at::Tensor& noise_in, c10::string_view loss,
                         double huber_delta) {
  check_dc_error_inputs(pred_in, noise_in);
  check_cuda(pred_in);
  const LossKind kind = parse_loss(loss);
  const int code = dtype_code(pred_in);
  const c10::cuda::CUDAGuard guard(pred_in.device());
  const auto pred = pred_in.contiguous();
  const auto noise = noise_in.contiguous();
  const int64_t B = pred.size(0), K = pred.size(1), T = pred.size(2), D = pred.size(3);
  auto err = at::empty({B, K, T}, pred.options().dtype(at::kFloat));
  if (err.numel() == 0) return err;
  dcfast_dc_error_fwd_cuda(code, pred.const_data_ptr(), noise.const_data_ptr(), err.mutable_data_ptr<float>(), B, K,
                           T, D, static_cast<int>(kind), static_cast<float>(huber_delta),
                           at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return err;
}

at::Tensor dc_error_backward_cuda(const at::Tensor& grad_err_in, const at::Tensor& pred_in,
                                  const at::Tensor& noise_in, c10::string_view loss, double huber_delta) {
  check_dc_error_inputs(pred_in, noise_in);
  check_dc_error_grad(grad_err_in, pred_in);
  check_cuda(pred_in);
  TORCH_CHECK_VALUE(grad_err_in.device() == pred_in.device(),
                    "dcfast.dc_error_backward: grad_err and pred are on different devices");
  const LossKind kind = parse_loss(loss);
  const int code = dtype_code(pred_in);
  const c10::cuda::CUDAGuard guard(pred_in.device());
  const auto pred = pred_in.contiguous();
  const auto noise = noise_in.contiguous();
  const auto grad_err = grad_err_in.to(at::kFloat).contiguous();
  const int64_t B = pred.size(0), K = pred.size(1), T = pred.size(2), D = pred.size(3);
  auto grad_pred = at::empty_like(pred);
  if (grad_pred.numel() == 0) return grad_pred;
  dcfast_dc_error_bwd_cuda(code, grad_err.const_data_ptr<float>(), pred.const_data_ptr(), noise.const_data_ptr(),
                           grad_pred.mutable_data_ptr(), B, K, T, D, static_cast<int>(kind),
                           static_cast<float>(huber_delta), at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad_pred;
}

}  // namespace

TORCH_LIBRARY_IMPL(dcfast, CUDA, m) {
  m.impl("dc_error", &dc_error_cuda);
  m.impl("dc_error_backward", &dc_error_backward_cuda);
}

}  // namespace dcfast
