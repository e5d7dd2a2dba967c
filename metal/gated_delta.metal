// Gated DeltaNet recurrence, forward, a chunk of T tokens (layout: gated_delta.h):
//   S <- a S;  S += beta (v - S k) k^T;  y = S q          per token, S float32 in registers
// Also writes the state before tokens 0, CHUNK, 2 CHUNK, ... (chunk_states
// [B, Hv, ceil(T / CHUNK), Dv, Dk]): all the backward keeps.
// Inputs q, k, v, decay, beta, state_in; outputs y [B, T, Hv, Dv] (type Ty), state_out and
// chunk_states (float32). Template: Ty, Hk, Hv, Dk, Dv, R, CHUNK.
  constexpr int NK = (Dk + 31) / 32;
  constexpr int NR = (Dv + R - 1) / R;
  const int T = q_shape[1];
  const int n_chunks = (T + CHUNK - 1) / CHUNK;
  const GdnIndex<Hv, Hk> at(threadgroup_position_in_grid.z, T);
  const uint lane = thread_position_in_threadgroup.x;
  const uint ty = thread_position_in_threadgroup.y;

  float s[NR][NK];
  load_rows<NR, NK, R, Dv, Dk>(s, state_in + size_t(at.n) * Dv * Dk, lane, ty);
  for (int t = 0; t < T; ++t) {
    if (t % CHUNK == 0) {
      store_rows<NR, NK, R, Dv, Dk>(
          s, chunk_states + (size_t(at.n) * n_chunks + t / CHUNK) * Dv * Dk, lane, ty);
    }
    float qv[NK], kv[NK];
    load_key<NK, Dk>(qv, q + at.key(t) * Dk, lane);
    load_key<NK, Dk>(kv, k + at.key(t) * Dk, lane);
    const float a = static_cast<float>(decay[at.value(t)]);
    const float b = static_cast<float>(beta[at.value(t)]);
    for (int r = 0; r < NR; ++r) {
      const uint dv = ty + R * r;
      if (dv >= Dv) continue;  // uniform across the simdgroup
      float u = 0.0f;
      for (int i = 0; i < NK; ++i) {
        s[r][i] *= a;
        u += s[r][i] * kv[i];
      }
      const float delta = b * (static_cast<float>(v[at.value(t) * Dv + dv]) - simd_sum(u));
      float out = 0.0f;
      for (int i = 0; i < NK; ++i) {
        s[r][i] += kv[i] * delta;
        out += s[r][i] * qv[i];
      }
      out = simd_sum(out);
      if (lane == 0) y[at.value(t) * Dv + dv] = static_cast<Ty>(out);
    }
  }
  store_rows<NR, NK, R, Dv, Dk>(s, state_out + size_t(at.n) * Dv * Dk, lane, ty);
