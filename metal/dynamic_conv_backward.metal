// Jet dynamic causal convolution, backward. One thread per (c, j, b) over padded positions
// j in [0, T + W - 1): it owns d padded[j] (which is d conv_state[j] or d x[j - (W-1)]) and, for
// j < T, the W kernel-tap gradients of output token j. No atomics: every output element has one
// writer. With SILU the pre-activation is recomputed (W multiply-adds) instead of stored.
//   g[t]            = dy[t] * act'(pre[t])
//   d kern[t, w]    = g[t] * padded[t + w]
//   d padded[j]     = sum_w g[j - w] * kern[j - w, w]  (+ d new_state[j - T] for j >= T)
// Inputs x, conv_state, kern, dy [B, T, C], dstate [B, W-1, C] (cotangent of the new state);
// outputs dx, dconv_state, dkern; template Tx, Ts, Tk (their types), W, SILU.
  const int T = x_shape[1];
  const int C = x_shape[2];
  const uint c = thread_position_in_grid.x;
  const int j = thread_position_in_grid.y;
  const uint b = thread_position_in_grid.z;

  float dp = 0.0f;
  if (j >= T) {
    dp = static_cast<float>(dstate[(size_t(b) * (W - 1) + (j - T)) * C + c]);
  }
  for (int w = 0; w < W; ++w) {
    int t = j - w;
    if (t >= 0 && t < T) {
      float k = static_cast<float>(kern[((size_t(b) * T + t) * C + c) * W + w]);
      dp += grad_pre<SILU>(x, conv_state, kern, dy, b, t, c, T, C, W) * k;
    }
  }
  if (j < W - 1) {
    dconv_state[(size_t(b) * (W - 1) + j) * C + c] = static_cast<Ts>(dp);
  } else {
    dx[(size_t(b) * T + (j - (W - 1))) * C + c] = static_cast<Tx>(dp);
  }

  if (j < T) {
    float g = grad_pre<SILU>(x, conv_state, kern, dy, b, j, c, T, C, W);
    device Tk* dk = dkern + ((size_t(b) * T + j) * C + c) * W;
    for (int w = 0; w < W; ++w) {
      dk[w] = static_cast<Tk>(g * padded_at(x, conv_state, b, j + w, c, T, C, W));
    }
  }
