// Every dcfast op schema, in one place. Backends register kernels in their own files
// (cpu/<op>_kernel.cpp, cuda/<op>_cuda.cpp); autograd and fake impls live in dcfast/ops/<op>.py.
#include <torch/library.h>

TORCH_LIBRARY(dcfast, m) {
  // DC errors (docs/design.md: the DC error kernel): pred (B, K, T, D), noise (B, T, D) -> err (B, K, T) float32,
  // err[b,k,t] = mean_d loss(noise[b,t,d] - pred[b,k,t,d]); noise is broadcast over K, never copied.
  m.def("dc_error(Tensor pred, Tensor noise, str loss, float huber_delta) -> Tensor");
  // d err / d pred scaled by grad_err (B, K, T), written straight from pred and noise.
  m.def("dc_error_backward(Tensor grad_err, Tensor pred, Tensor noise, str loss, float huber_delta) -> Tensor");
  // Per-sample Fisher (docs/design.md: the per-sample Fisher kernel): fisher (O, I) += sum_n (grad_output[n]^T input[n])^2,
  // grad_output (N, R, O), input (N, R, I); per-sample gradients are never written to memory.
  m.def("fisher_accumulate_(Tensor(a!) fisher, Tensor grad_output, Tensor input) -> ()");
}
