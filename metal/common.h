// Shared helpers for the mlx-sleep kernels (prepended as the `header` of every kernel).
// Everything accumulates in float whatever the storage type.
#include <metal_stdlib>
using namespace metal;

inline float sigmoid_f(float x) { return 1.0f / (1.0f + metal::exp(-x)); }

inline float silu_f(float x) { return x * sigmoid_f(x); }

// d silu(z) / dz = s (1 + z (1 - s)), s = sigmoid(z)
inline float silu_grad_f(float z) {
  float s = sigmoid_f(z);
  return s * (1.0f + z * (1.0f - s));
}

// log(1 + e^x) without overflow, as mx.logaddexp(x, 0) (nn.softplus)
inline float softplus_f(float x) {
  return metal::max(x, 0.0f) + metal::log(1.0f + metal::exp(-metal::abs(x)));
}
