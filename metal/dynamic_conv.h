// Jet dynamic causal convolution: indexing shared by the forward and backward kernels.
//
// padded = concat(conv_state [B, W-1, C], x [B, T, C]) along time, never materialised:
// padded[j] is conv_state[j] for j < W-1 and x[j - (W-1)] after. Output token t reads
// padded[t .. t+W-1]; tap W-1 is the token itself.

template <typename Tx, typename Ts>
inline float padded_at(const device Tx* x, const device Ts* conv_state,
                       uint b, int j, uint c, int T, int C, int W) {
  return j < W - 1 ? static_cast<float>(conv_state[(size_t(b) * (W - 1) + j) * C + c])
                   : static_cast<float>(x[(size_t(b) * T + (j - (W - 1))) * C + c]);
}

// pre-activation of output token t: sum_w kern[t, c, w] * padded[t + w]
template <typename Tx, typename Ts, typename Tk>
inline float conv_at(const device Tx* x, const device Ts* conv_state, const device Tk* kern,
                     uint b, int t, uint c, int T, int C, int W) {
  const device Tk* k = kern + ((size_t(b) * T + t) * C + c) * W;
  float acc = 0.0f;
  for (int w = 0; w < W; ++w) {
    acc += static_cast<float>(k[w]) * padded_at(x, conv_state, b, t + w, c, T, C, W);
  }
  return acc;
}

// dL/d pre[t]: dy[t], times SiLU'(pre[t]) when the SiLU is fused (pre recomputed, not stored)
template <bool SILU, typename Tx, typename Ts, typename Tk, typename Tg>
inline float grad_pre(const device Tx* x, const device Ts* conv_state, const device Tk* kern,
                      const device Tg* dy, uint b, int t, uint c, int T, int C, int W) {
  float g = static_cast<float>(dy[(size_t(b) * T + t) * C + c]);
  if (SILU) {
    g *= silu_grad_f(conv_at(x, conv_state, kern, b, t, c, T, C, W));
  }
  return g;
}
