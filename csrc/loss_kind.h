// The elementwise DC losses shared by every C++/CUDA backend, on d = noise - pred.
#pragma once
#include <cmath>

#ifdef __CUDACC__
#define DCFAST_HD __host__ __device__ __forceinline__
#else
#define DCFAST_HD inline
#endif

namespace dcfast {

enum class LossKind : int { L2 = 0, L1 = 1, Huber = 2 };

DCFAST_HD float loss_value(LossKind kind, float d, float delta) {
  if (kind == LossKind::L2) return d * d;
  float a = fabsf(d);
  if (kind == LossKind::L1) return a;
  return a < delta ? 0.5f * d * d : delta * (a - 0.5f * delta);
}

// d loss / d pred (note the minus: d = noise - pred).
DCFAST_HD float loss_grad_pred(LossKind kind, float d, float delta) {
  if (kind == LossKind::L2) return -2.f * d;
  if (kind == LossKind::L1) return d > 0.f ? -1.f : (d < 0.f ? 1.f : 0.f);
  return -fminf(fmaxf(d, -delta), delta);
}

}  // namespace dcfast
