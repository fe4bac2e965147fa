// CPU backend of dcfast::dc_error: one pass over pred, noise read once per (b, t) row and reused for all K.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include "../checks.h"

namespace dcfast {
namespace {

// Rows per parallel task: about 32K elements each, so small problems stay on one thread instead of
// paying an OpenMP region per call.
int64_t grain_rows(int64_t D) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(D, 1)); }

at::Tensor dc_error_cpu(const at::Tensor& pred_in, const at::Tensor& noise_in, c10::string_view loss,
                        double huber_delta) {
  check_dc_error_inputs(pred_in, noise_in);
  const LossKind kind = parse_loss(loss);
  const auto pred = pred_in.contiguous();
  const auto noise = noise_in.contiguous();
  const int64_t B = pred.size(0), K = pred.size(1), T = pred.size(2), D = pred.size(3);
  auto err = at::empty({B, K, T}, pred.options().dtype(at::kFloat));
  const float delta = static_cast<float>(huber_delta);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "dc_error_cpu", [&] {
    const scalar_t* p = pred.data_ptr<scalar_t>();
    const scalar_t* n = noise.data_ptr<scalar_t>();
    float* e = err.data_ptr<float>();
    // Row r = (b*K + k)*T + t of pred pairs with row b*T + t of noise.
    at::parallel_for(0, B * K * T, grain_rows(D), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / (K * T), t = r % T;
        const scalar_t* pr = p + r * D;
        const scalar_t* nr = n + (b * T + t) * D;
        double acc = 0.0;
        for (int64_t d = 0; d < D; ++d) {
          acc += loss_value(kind, static_cast<float>(nr[d]) - static_cast<float>(pr[d]), delta);
        }
        e[r] = static_cast<float>(acc / static_cast<double>(D));
      }
    });
  });
  return err;
}

at::Tensor dc_error_backward_cpu(const at::Tensor& grad_err_in, const at::Tensor& pred_in,
                                 const at::Tensor& noise_in, c10::string_view loss, double huber_delta) {
  check_dc_error_inputs(pred_in, noise_in);
  check_dc_error_grad(grad_err_in, pred_in);
  const LossKind kind = parse_loss(loss);
  const auto pred = pred_in.contiguous();
  const auto noise = noise_in.contiguous();
  const auto grad_err = grad_err_in.to(at::kFloat).contiguous();
  const int64_t B = pred.size(0), K = pred.size(1), T = pred.size(2), D = pred.size(3);
  auto grad_pred = at::empty_like(pred);
  const float delta = static_cast<float>(huber_delta);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "dc_error_backward_cpu", [&] {
    const scalar_t* p = pred.data_ptr<scalar_t>();
    const scalar_t* n = noise.data_ptr<scalar_t>();
    const float* g = grad_err.data_ptr<float>();
    scalar_t* out = grad_pred.data_ptr<scalar_t>();
    at::parallel_for(0, B * K * T, grain_rows(D), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / (K * T), t = r % T;
        const scalar_t* pr = p + r * D;
        const scalar_t* nr = n + (b * T + t) * D;
        const float scale = g[r] / static_cast<float>(D);
        for (int64_t d = 0; d < D; ++d) {
          const float diff = static_cast<float>(nr[d]) - static_cast<float>(pr[d]);
          out[r * D + d] = static_cast<scalar_t>(scale * loss_grad_pred(kind, diff, delta));
        }
      }
    });
  });
  return grad_pred;
}

}  // namespace

TORCH_LIBRARY_IMPL(dcfast, CPU, m) {
  m.impl("dc_error", &dc_error_cpu);
  m.impl("dc_error_backward", &dc_error_backward_cpu);
}

}  // namespace dcfast
