// Fused Gated DeltaNet decode step (T == 1), one threadgroup per (batch, value head):
//   a = exp(-exp(A_log) softplus(a_in + dt_bias)),  beta = sigmoid(b_in)
//   q = l2norm(q) Dk^-1/2,  k = l2norm(k)                  (key head h / (Hv / Hk): GVA)
//   S = a S (I - beta k k^T) + beta v k^T                   S [Dv, Dk] per head, kept in float
//   o = S q;  y = rmsnorm(o) * weight * silu(gate)
// Threadgroup (32, R): the 32 lanes of a simdgroup split Dk (lane + 32 i), the R simdgroups
// split the Dv rows (row ty + R r); the RMSNorm over Dv reduces across simdgroups once.
// Inputs q, k [B, Hk, Dk], v, gate [B, Hv, Dv], a_in, b_in [B, Hv], A_log, dt_bias [Hv],
// state_in [B, Hv, Dv, Dk], weight [Dv], eps. Outputs y [B, Hv, Dv] and state_out.
// Template: StT, OutT (output types), Hk, Hv, Dk, Dv, R.
  constexpr int NK = (Dk + 31) / 32;  // key entries per lane
  constexpr int NR = (Dv + R - 1) / R;  // value rows per simdgroup

  const uint n = threadgroup_position_in_grid.z;  // b * Hv + h
  const uint b = n / Hv;
  const uint h = n % Hv;
  const uint hk = h / (Hv / Hk);
  const uint lane = thread_position_in_threadgroup.x;
  const uint ty = thread_position_in_threadgroup.y;

  // L2-normalised q and k: every simdgroup reduces its own copy (no barrier needed)
  auto q_ = q + (size_t(b) * Hk + hk) * Dk;
  auto k_ = k + (size_t(b) * Hk + hk) * Dk;
  float qv[NK], kv[NK];
  float qq = 0.0f, kk = 0.0f;
  for (int i = 0; i < NK; ++i) {
    const uint d = lane + 32 * i;
    qv[i] = d < Dk ? static_cast<float>(q_[d]) : 0.0f;
    kv[i] = d < Dk ? static_cast<float>(k_[d]) : 0.0f;
    qq += qv[i] * qv[i];
    kk += kv[i] * kv[i];
  }
  const float q_scale = metal::rsqrt(simd_sum(qq) + 1e-6f) * metal::rsqrt(float(Dk));
  const float k_scale = metal::rsqrt(simd_sum(kk) + 1e-6f);
  for (int i = 0; i < NK; ++i) {
    qv[i] *= q_scale;
    kv[i] *= k_scale;
  }

  // gates
  const float decay = metal::exp(-metal::exp(static_cast<float>(A_log[h])) *
                                 softplus_f(static_cast<float>(a_in[n]) +
                                            static_cast<float>(dt_bias[h])));
  const float beta = sigmoid_f(static_cast<float>(b_in[n]));

  // delta rule on this simdgroup's rows: S <- a S; S += beta (v - S k) k^T; o = S q
  auto s_in = state_in + size_t(n) * Dv * Dk;
  auto s_out = state_out + size_t(n) * Dv * Dk;
  auto v_ = v + size_t(n) * Dv;
  float o[NR];
  float sumsq = 0.0f;
  for (int r = 0; r < NR; ++r) {
    const uint dv = ty + R * r;
    o[r] = 0.0f;
    if (dv >= Dv) continue;  // uniform across the simdgroup
    float s[NK];
    float kv_mem = 0.0f;
    for (int i = 0; i < NK; ++i) {
      const uint d = lane + 32 * i;
      s[i] = d < Dk ? decay * static_cast<float>(s_in[dv * Dk + d]) : 0.0f;
      kv_mem += s[i] * kv[i];
    }
    const float delta = beta * (static_cast<float>(v_[dv]) - simd_sum(kv_mem));
    float out = 0.0f;
    for (int i = 0; i < NK; ++i) {
      const uint d = lane + 32 * i;
      s[i] += kv[i] * delta;
      out += s[i] * qv[i];
      if (d < Dk) s_out[dv * Dk + d] = static_cast<StT>(s[i]);
    }
    o[r] = simd_sum(out);
    sumsq += o[r] * o[r];
  }

  // gated RMSNorm over the head's Dv outputs
  threadgroup float row_sumsq[R];
  if (lane == 0) row_sumsq[ty] = sumsq;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float total = 0.0f;
  for (int i = 0; i < R; ++i) total += row_sumsq[i];
  const float inv_rms = metal::rsqrt(total / Dv + eps);
  auto g_ = gate + size_t(n) * Dv;
  for (int r = 0; r < NR; ++r) {
    const uint dv = ty + R * r;
    if (lane == 0 && dv < Dv) {
      y[size_t(n) * Dv + dv] = static_cast<OutT>(
          o[r] * inv_rms * static_cast<float>(weight[dv]) * silu_f(static_cast<float>(g_[dv])));
    }
  }
