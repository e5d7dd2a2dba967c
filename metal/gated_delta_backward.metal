// Gated DeltaNet recurrence, backward (layout: gated_delta.h). Chunks from the last: recompute
// the chunk's states forward from its saved start (chunk_states) into this thread's slots of
// `scratch` (each thread reads back only what it wrote), then walk the chunk in reverse:
//   S~ = a S_prev,  r = v - S~ k,  delta = beta r,  S_t = S~ + delta k^T,  y = S_t q
//   dS += dy q^T;  dq = S_t^T dy;  d delta = dS k;  dv = beta d delta;  dbeta = <d delta, r>
//   du = -beta d delta;  dk = dS^T delta + S~^T du;  dS~ = dS + du k^T
//   da = <dS~, S_prev>;  dS = a dS~
// No atomics: the threadgroup owns its (batch, value head); sums over the rows of S go through
// threadgroup memory, and a GVA key head's dq, dk are summed over its value heads afterwards.
// Inputs q, k, v, decay, beta, chunk_states, dy [B, T, Hv, Dv], dstate [B, Hv, Dv, Dk] (the
// final state's cotangent). Outputs (float32) dq, dk [B, T, Hv, Dk], dv, ddecay, dbeta,
// dstate_in, scratch [B * Hv, CHUNK, Dv, Dk]. Template: Hk, Hv, Dk, Dv, R, CHUNK.
  constexpr int NK = (Dk + 31) / 32;
  constexpr int NR = (Dv + R - 1) / R;
  const int T = q_shape[1];
  const int n_chunks = (T + CHUNK - 1) / CHUNK;
  const GdnIndex<Hv, Hk> at(threadgroup_position_in_grid.z, T);
  const uint lane = thread_position_in_threadgroup.x;
  const uint ty = thread_position_in_threadgroup.y;
  device float* slots = scratch + size_t(at.n) * CHUNK * Dv * Dk;

  threadgroup float part_q[R * NK * 32];  // per simdgroup: its rows' share of dq, dk
  threadgroup float part_k[R * NK * 32];
  threadgroup float part_a[R];
  threadgroup float part_b[R];

  float ds[NR][NK];
  load_rows<NR, NK, R, Dv, Dk>(ds, dstate + size_t(at.n) * Dv * Dk, lane, ty);
  for (int c = n_chunks - 1; c >= 0; --c) {
    const int t0 = c * CHUNK;
    const int t1 = metal::min(T, t0 + CHUNK);
    float s[NR][NK];
    load_rows<NR, NK, R, Dv, Dk>(s, chunk_states + (size_t(at.n) * n_chunks + c) * Dv * Dk,
                                 lane, ty);
    for (int t = t0; t < t1; ++t) {  // recompute: slot t - t0 holds S_{t-1}
      store_rows<NR, NK, R, Dv, Dk>(s, slots + size_t(t - t0) * Dv * Dk, lane, ty);
      float kv[NK];
      load_key<NK, Dk>(kv, k + at.key(t) * Dk, lane);
      const float a = static_cast<float>(decay[at.value(t)]);
      const float b = static_cast<float>(beta[at.value(t)]);
      for (int r = 0; r < NR; ++r) {
        const uint dv = ty + R * r;
        if (dv >= Dv) continue;
        float u = 0.0f;
        for (int i = 0; i < NK; ++i) {
          s[r][i] *= a;
          u += s[r][i] * kv[i];
        }
        const float delta = b * (static_cast<float>(v[at.value(t) * Dv + dv]) - simd_sum(u));
        for (int i = 0; i < NK; ++i) s[r][i] += kv[i] * delta;
      }
    }
    for (int t = t1 - 1; t >= t0; --t) {
      float qv[NK], kv[NK];
      load_key<NK, Dk>(qv, q + at.key(t) * Dk, lane);
      load_key<NK, Dk>(kv, k + at.key(t) * Dk, lane);
      const float a = static_cast<float>(decay[at.value(t)]);
      const float b = static_cast<float>(beta[at.value(t)]);
      load_rows<NR, NK, R, Dv, Dk>(s, slots + size_t(t - t0) * Dv * Dk, lane, ty);  // S_prev
      float dq[NK] = {0.0f}, dk[NK] = {0.0f};
      float da = 0.0f, db = 0.0f;
      for (int r = 0; r < NR; ++r) {
        const uint dv = ty + R * r;
        if (dv >= Dv) continue;
        float u = 0.0f;
        for (int i = 0; i < NK; ++i) u += a * s[r][i] * kv[i];
        const float res = static_cast<float>(v[at.value(t) * Dv + dv]) - simd_sum(u);
        const float delta = b * res;
        const float dy_r = static_cast<float>(dy[at.value(t) * Dv + dv]);
        float dd = 0.0f;
        for (int i = 0; i < NK; ++i) {
          dq[i] += (a * s[r][i] + delta * kv[i]) * dy_r;  // S_t^T dy
          ds[r][i] += dy_r * qv[i];
          dd += ds[r][i] * kv[i];
        }
        dd = simd_sum(dd);
        if (lane == 0) dv_out[at.value(t) * Dv + dv] = b * dd;
        db += dd * res;  // the same on every lane
        const float du = -b * dd;
        for (int i = 0; i < NK; ++i) {
          dk[i] += ds[r][i] * delta + a * s[r][i] * du;
          const float dsd = ds[r][i] + du * kv[i];
          da += dsd * s[r][i];
          ds[r][i] = a * dsd;
        }
      }
      da = simd_sum(da);
      for (int i = 0; i < NK; ++i) {
        part_q[ty * NK * 32 + lane + 32 * i] = dq[i];
        part_k[ty * NK * 32 + lane + 32 * i] = dk[i];
      }
      if (lane == 0) {
        part_a[ty] = da;
        part_b[ty] = db;
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
      if (ty == 0) {  // simdgroup 0 sums over the R simdgroups' rows
        for (int i = 0; i < NK; ++i) {
          const uint d = lane + 32 * i;
          float sq = 0.0f, sk = 0.0f;
          for (int j = 0; j < R; ++j) {
            sq += part_q[j * NK * 32 + d];
            sk += part_k[j * NK * 32 + d];
          }
          if (d < Dk) {
            dq_out[at.value(t) * Dk + d] = sq;
            dk_out[at.value(t) * Dk + d] = sk;
          }
        }
        if (lane == 0) {
          float sa = 0.0f, sb = 0.0f;
          for (int j = 0; j < R; ++j) {
            sa += part_a[j];
            sb += part_b[j];
          }
          ddecay[at.value(t)] = sa;
          dbeta[at.value(t)] = sb;
        }
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);  // before the next token's partials
    }
  }
  store_rows<NR, NK, R, Dv, Dk>(ds, dstate_in + size_t(at.n) * Dv * Dk, lane, ty);
