// Input checks shared by the CPU and CUDA entry points, so each op validates in one place.
// TORCH_CHECK_VALUE / TORCH_CHECK_TYPE surface in Python as ValueError / TypeError.
#pragma once
#include <ATen/ATen.h>
#include <string>
#include "loss_kind.h"

namespace dcfast {

inline LossKind parse_loss(c10::string_view loss) {
  if (loss == "l2") return LossKind::L2;
  if (loss == "l1") return LossKind::L1;
  if (loss == "huber") return LossKind::Huber;
  TORCH_CHECK_VALUE(false, "dcfast: loss must be 'l2', 'l1' or 'huber', got '", std::string(loss), "'");
}

inline void check_dc_error_inputs(const at::Tensor& pred, const at::Tensor& noise) {
  TORCH_CHECK_VALUE(pred.dim() == 4, "dcfast.dc_error: pred must be (B, K, T, D), got ", pred.sizes());
  TORCH_CHECK_VALUE(noise.dim() == 3, "dcfast.dc_error: noise must be (B, T, D), got ", noise.sizes());
  TORCH_CHECK_VALUE(pred.size(0) == noise.size(0) && pred.size(2) == noise.size(1) && pred.size(3) == noise.size(2),
                    "dcfast.dc_error: pred ", pred.sizes(), " does not match noise ", noise.sizes(),
                    " (expected pred (B, K, T, D) with noise (B, T, D))");
  TORCH_CHECK_TYPE(pred.scalar_type() == noise.scalar_type(), "dcfast.dc_error: pred is ", pred.scalar_type(),
                   " but noise is ", noise.scalar_type());
  TORCH_CHECK_VALUE(pred.device() == noise.device(), "dcfast.dc_error: pred and noise are on different devices");
}

inline void check_dc_error_grad(const at::Tensor& grad_err, const at::Tensor& pred) {
  TORCH_CHECK_VALUE(grad_err.dim() == 3 && grad_err.size(0) == pred.size(0) && grad_err.size(1) == pred.size(1) &&
                        grad_err.size(2) == pred.size(2),
                    "dcfast.dc_error_backward: grad_err must be (B, K, T) = ", pred.sizes().slice(0, 3), ", got ",
                    grad_err.sizes());
}

inline void check_fisher_inputs(const at::Tensor& fisher, const at::Tensor& grad_output, const at::Tensor& input) {
  TORCH_CHECK_VALUE(grad_output.dim() == 3 && input.dim() == 3,
                    "dcfast.fisher_accumulate_: grad_output and input must be (N, R, O) and (N, R, I), got ",
                    grad_output.sizes(), " and ", input.sizes());
  TORCH_CHECK_VALUE(grad_output.size(0) == input.size(0) && grad_output.size(1) == input.size(1),
                    "dcfast.fisher_accumulate_: grad_output ", grad_output.sizes(), " and input ", input.sizes(),
                    " must share (N, R)");
  TORCH_CHECK_VALUE(fisher.dim() == 2 && fisher.size(0) == grad_output.size(2) && fisher.size(1) == input.size(2),
                    "dcfast.fisher_accumulate_: fisher must be (O, I) = (", grad_output.size(2), ", ", input.size(2),
                    "), got ", fisher.sizes());
  TORCH_CHECK_TYPE(fisher.scalar_type() == at::kFloat, "dcfast.fisher_accumulate_: fisher must be float32, got ",
                   fisher.scalar_type());
  TORCH_CHECK_VALUE(fisher.is_contiguous(), "dcfast.fisher_accumulate_: fisher must be contiguous");
  TORCH_CHECK_TYPE(grad_output.scalar_type() == input.scalar_type(), "dcfast.fisher_accumulate_: grad_output is ",
                   grad_output.scalar_type(), " but input is ", input.scalar_type());
  TORCH_CHECK_VALUE(fisher.device() == grad_output.device() && fisher.device() == input.device(),
                    "dcfast.fisher_accumulate_: fisher, grad_output and input must be on one device");
}

}  // namespace dcfast
