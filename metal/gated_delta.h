// Gated DeltaNet recurrence: layout shared by the forward and backward kernels.
//
// One threadgroup (32, R) per (batch, value head) n = b * Hv + h; key head h / (Hv / Hk) (GVA).
// The 32 lanes of a simdgroup split Dk (entry lane + 32 i, i < NK), the R simdgroups split the
// Dv rows of S (row ty + R r, r < NR). Each thread keeps its NR x NK entries of S in registers,
// in float32 whatever the input types; entries past Dk / Dv stay 0.
// q, k [B, T, Hk, Dk]; v [B, T, Hv, Dv]; decay, beta [B, T, Hv]; S [B, Hv, Dv, Dk].

template <int Hv, int Hk>
struct GdnIndex {
  uint b, h, hk, n;
  int T;
  GdnIndex(uint n_, int T_) : b(n_ / Hv), h(n_ % Hv), hk((n_ % Hv) / (Hv / Hk)), n(n_), T(T_) {}
  size_t key(int t) const { return (size_t(b) * T + t) * Hk + hk; }    // times Dk
  size_t value(int t) const { return (size_t(b) * T + t) * Hv + h; }   // times Dv; gates
};

// this thread's entries of a [Dv, Dk] matrix (S, dS) from / to memory
template <int NR, int NK, int R, int Dv, int Dk, typename T>
inline void load_rows(thread float (&s)[NR][NK], const device T* src, uint lane, uint ty) {
  for (int r = 0; r < NR; ++r) {
    const uint dv = ty + R * r;
    for (int i = 0; i < NK; ++i) {
      const uint d = lane + 32 * i;
      s[r][i] = (dv < Dv && d < Dk) ? static_cast<float>(src[dv * Dk + d]) : 0.0f;
    }
  }
}

template <int NR, int NK, int R, int Dv, int Dk, typename T>
inline void store_rows(const thread float (&s)[NR][NK], device T* dst, uint lane, uint ty) {
  for (int r = 0; r < NR; ++r) {
    const uint dv = ty + R * r;
    for (int i = 0; i < NK; ++i) {
      const uint d = lane + 32 * i;
      if (dv < Dv && d < Dk) dst[dv * Dk + d] = static_cast<T>(s[r][i]);
    }
  }
}

// a Dk vector (q or k of one token), this lane's entries, 0 past Dk
template <int NK, int Dk, typename T>
inline void load_key(thread float (&x)[NK], const device T* src, uint lane) {
  for (int i = 0; i < NK; ++i) {
    const uint d = lane + 32 * i;
    x[i] = d < Dk ? static_cast<float>(src[d]) : 0.0f;
  }
}
