// Jet dynamic causal convolution, forward (a chunk, or the single decode token when T == 1).
//   y[b, t, c] = act(sum_w kern[b, t, c, w] * padded[b, t + w, c])     act = SiLU or identity
//   new_state[b, i, c] = padded[b, T + i, c]                             i < W - 1
// One thread per (c, t, b); the grid's y extent is max(T, W - 1) so that the new conv state is
// written even when the chunk is shorter than the window.
// Inputs x [B, T, C], conv_state [B, W-1, C], kern [B, T, C, W]; template Ty, Tn (types of
// y and new_state), W, SILU.
  const int T = x_shape[1];
  const int C = x_shape[2];
  const uint c = thread_position_in_grid.x;
  const int t = thread_position_in_grid.y;
  const uint b = thread_position_in_grid.z;

  if (t < T) {
    float acc = conv_at(x, conv_state, kern, b, t, c, T, C, W);
    y[(size_t(b) * T + t) * C + c] = static_cast<Ty>(SILU ? silu_f(acc) : acc);
  }
  if (t < W - 1) {
    new_state[(size_t(b) * (W - 1) + t) * C + c] =
        static_cast<Tn>(padded_at(x, conv_state, b, T + t, c, T, C, W));
  }
