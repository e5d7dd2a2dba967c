// metal_shim.h -- a small, CPU-only stand-in for the parts of the Metal
// Shading Language (and of MLX's Metal `utils.h`) that custom kernel bodies
// written for `mx.fast.metal_kernel` use.
//
// It is included (as a precompiled header) by every kernel unit that
// emulator.py generates; the fiber scheduler behind the mtl_rt:: functions
// declared here lives in metal_runtime.cpp.  The emulated execution model is:
//
//   * every threadgroup is run by one OS worker thread, each Metal thread of
//     the group is a ucontext fiber with its own stack;
//   * a fiber runs until it blocks on a synchronisation point
//     (threadgroup_barrier, simdgroup_barrier or any simd_* / quad_*
//     collective) and is resumed when every live thread of its scope has
//     arrived;  the order is one of several schedules (metal_runtime.cpp),
//     each deterministic, whose outputs emulator.py compares;
//   * threadgroup memory is a per-group arena filled with 0xFF bytes (NaN for
//     floats, -1 for ints) at the start of every group, so reading
//     threadgroup memory that no thread wrote in an earlier barrier phase
//     gives an obviously wrong value;
//   * deadlocks (divergent barriers / simd collectives) and lanes of a
//     simdgroup that call different collectives are reported as errors.
#pragma once

#include <algorithm>
#include <atomic>
#include <bit>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>
#include <sys/mman.h>
#include <ucontext.h>

namespace mtl_rt {
struct GroupCtx;
// `name`: the variable's name, for bounds messages
void* tg_slot(int slot, size_t bytes, size_t align, const char* name);
void tg_barrier(unsigned flags);
void sg_barrier(unsigned flags);
unsigned sg_lane();  // thread_index_in_simdgroup of the running thread
[[noreturn]] void kernel_error(const char* msg);  // fail the launch with this message
// Publish `bytes` of `src` for this lane and return a pointer to the 32 lane
// slots of the current simd collective (`kind` identifies the collective for
// divergence checks).
const unsigned char* sg_exchange(int kind, const void* src, size_t bytes,
                                 unsigned* lane, unsigned* active_mask);

// ------------------------------------------------------------ bounds-checked memory
// emulator.py rewrites every `device` / `constant` / `threadgroup` pointer of a kernel into
// cptr<T> (read-only) or mptr<T>, and every threadgroup array declaration into a tg_view of
// its declared size. Each carries the region it points into (a buffer of the launch or a
// threadgroup array) and checks every element it touches against it when it is indexed or
// dereferenced: an out-of-bounds read is reported even if its value is then discarded
// (`x = p[d]; y = d < n ? x : 0`). Pointer arithmetic itself is not checked, only accesses.
enum RegionKind { kInput = 0, kOutput = 1, kThreadgroup = 2, kArgument = 3, kUnknown = 4,
                  kNull = 5 };
struct Region {
  const unsigned char* lo;  // [lo, hi): the bytes that may be accessed
  const unsigned char* hi;
  const char* name;
  int kind;
};
Region find_region(const void* p);  // the region holding a raw address (metal_runtime.cpp)
[[noreturn]] void out_of_bounds(const Region& r, const void* addr, size_t size);

inline Region null_region() { return Region{nullptr, nullptr, nullptr, kNull}; }

template <class T>
struct cptr {  // `const device T*`, `constant T*`, `const threadgroup T*`
  const T* p_ = nullptr;
  Region r_ = null_region();

  cptr() = default;
  cptr(std::nullptr_t) {}
  cptr(const T* p) : p_(p), r_(p ? find_region(p) : null_region()) {}
  cptr(const T* p, const Region& r) : p_(p), r_(r) {}
  // casts between element types keep the region (C-style casts, ptr_cast)
  template <class U>
    requires(!std::is_same_v<std::remove_cv_t<U>, std::remove_cv_t<T>>)
  explicit cptr(const cptr<U>& o) : p_(reinterpret_cast<const T*>(o.p_)), r_(o.r_) {}
  template <class U>
    requires(!std::is_same_v<std::remove_cv_t<U>, std::remove_cv_t<T>> && !std::is_void_v<U>)
  explicit cptr(const U* p) : cptr(reinterpret_cast<const T*>(p)) {}

  const T* check(const T* a) const {
    const unsigned char* b = reinterpret_cast<const unsigned char*>(a);
    if (__builtin_expect(b < r_.lo || b + sizeof(T) > r_.hi, 0)) out_of_bounds(r_, a, sizeof(T));
    return a;
  }
  template <class I>
    requires std::is_integral_v<I>
  const T& operator[](I i) const { return *check(p_ + i); }
  const T& operator*() const { return *check(p_); }
  const T* operator->() const { return check(p_); }
  operator const T*() const { return p_; }  // to raw (not checked from then on)
  explicit operator bool() const { return p_ != nullptr; }

  template <class I>
    requires std::is_integral_v<I>
  cptr operator+(I i) const { return cptr(p_ + i, r_); }
  template <class I>
    requires std::is_integral_v<I>
  friend cptr operator+(I i, const cptr& c) { return cptr(c.p_ + i, c.r_); }
  template <class I>
    requires std::is_integral_v<I>
  cptr operator-(I i) const { return cptr(p_ - i, r_); }
  std::ptrdiff_t operator-(const cptr& o) const { return p_ - o.p_; }
  template <class I>
    requires std::is_integral_v<I>
  cptr& operator+=(I i) { p_ += i; return *this; }
  template <class I>
    requires std::is_integral_v<I>
  cptr& operator-=(I i) { p_ -= i; return *this; }
  cptr& operator++() { ++p_; return *this; }
  cptr& operator--() { --p_; return *this; }
  cptr operator++(int) { cptr o = *this; ++p_; return o; }
  cptr operator--(int) { cptr o = *this; --p_; return o; }
};

template <class T>
struct mptr : cptr<T> {  // `device T*`, `threadgroup T*`
  mptr() = default;
  mptr(std::nullptr_t) {}
  mptr(T* p) : cptr<T>(p) {}
  mptr(T* p, const Region& r) : cptr<T>(p, r) {}
  template <class U>
    requires(!std::is_same_v<std::remove_cv_t<U>, std::remove_cv_t<T>>)
  explicit mptr(const cptr<U>& o) : cptr<T>(o) {}
  explicit mptr(const cptr<T>& o) : cptr<T>(o) {}  // const_cast
  template <class U>
    requires(!std::is_same_v<std::remove_cv_t<U>, std::remove_cv_t<T>> && !std::is_void_v<U>)
  explicit mptr(U* p) : cptr<T>(reinterpret_cast<const T*>(p)) {}

  T* raw() const { return const_cast<T*>(this->p_); }
  template <class I>
    requires std::is_integral_v<I>
  T& operator[](I i) const { return *const_cast<T*>(this->check(this->p_ + i)); }
  T& operator*() const { return *const_cast<T*>(this->check(this->p_)); }
  T* operator->() const { return const_cast<T*>(this->check(this->p_)); }

  template <class I>
    requires std::is_integral_v<I>
  mptr operator+(I i) const { return mptr(raw() + i, this->r_); }
  template <class I>
    requires std::is_integral_v<I>
  friend mptr operator+(I i, const mptr& c) { return mptr(c.raw() + i, c.r_); }
  template <class I>
    requires std::is_integral_v<I>
  mptr operator-(I i) const { return mptr(raw() - i, this->r_); }
  std::ptrdiff_t operator-(const cptr<T>& o) const { return this->p_ - o.p_; }
  template <class I>
    requires std::is_integral_v<I>
  mptr& operator+=(I i) { this->p_ += i; return *this; }
  template <class I>
    requires std::is_integral_v<I>
  mptr& operator-=(I i) { this->p_ -= i; return *this; }
  mptr& operator++() { ++this->p_; return *this; }
  mptr& operator--() { --this->p_; return *this; }
  mptr operator++(int) { mptr o = *this; ++this->p_; return o; }
  mptr operator--(int) { mptr o = *this; --this->p_; return o; }
};

// reinterpret_cast / static_cast / const_cast to a checked pointer type (emulator.py's rewrite)
template <class P, class X>
inline P ptr_cast(const X& x) { return P(x); }

// `threadgroup T name[N0][N1]...;` -- a view of the variable's slot in threadgroup memory. One
// dimension: a pointer to the array (it decays like the array). More: indexing checks the
// first index and gives the view of that row.
template <class T, long... Dims>
struct tg_view;

template <class T, long N>
struct tg_view<T, N> : mptr<T> {
  tg_view(void* raw, const char* name)
      : mptr<T>(static_cast<T*>(raw),
                Region{static_cast<unsigned char*>(raw),
                       static_cast<unsigned char*>(raw) + N * sizeof(T), name, kThreadgroup}) {}
  tg_view(T* p, const Region& r) : mptr<T>(p, r) {}
};

template <class T, long N0, long N1, long... Ns>
struct tg_view<T, N0, N1, Ns...> {
  static constexpr long kRow = (N1 * ... * Ns);  // elements per first index
  T* p_;
  Region r_;
  tg_view(void* raw, const char* name)
      : p_(static_cast<T*>(raw)),
        r_{static_cast<unsigned char*>(raw), static_cast<unsigned char*>(raw) + N0 * kRow * sizeof(T),
           name, kThreadgroup} {}
  template <class I>
    requires std::is_integral_v<I>
  tg_view<T, N1, Ns...> operator[](I i) const {
    T* row = p_ + i * kRow;
    if (long(i) < 0 || long(i) >= N0) out_of_bounds(r_, row, sizeof(T) * kRow);
    return tg_view<T, N1, Ns...>(
        row, Region{reinterpret_cast<unsigned char*>(row),
                    reinterpret_cast<unsigned char*>(row + kRow), r_.name, kThreadgroup});
  }
};

} // namespace mtl_rt

namespace metal {

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef unsigned long ulong;
typedef _Float16 half;
typedef _Float16 float16_t;

// ---------------------------------------------------------------- bfloat16
struct bfloat16_t;
template <class T>
struct is_fp_like
    : std::bool_constant<std::is_same_v<std::remove_cv_t<T>, float> ||
                         std::is_same_v<std::remove_cv_t<T>, double> ||
                         std::is_same_v<std::remove_cv_t<T>, _Float16>> {};
template <class T>
inline constexpr bool is_fp_like_v = is_fp_like<T>::value;
template <class T>
inline constexpr bool is_int_like_v =
    std::is_integral_v<T> && !std::is_same_v<T, bool>;

struct bfloat16_t {
  uint16_t bits_;
  bfloat16_t() = default;
  static inline uint16_t from_float(float f) {
    uint32_t u = std::bit_cast<uint32_t>(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      return uint16_t((u >> 16) | 0x40u); // quiet NaN
    }
    // round to nearest even (same as MLX)
    u += 0x7fffu + ((u >> 16) & 1u);
    return uint16_t(u >> 16);
  }
  template <class T>
    requires(std::is_arithmetic_v<T> || std::is_same_v<T, _Float16>)
  constexpr bfloat16_t(T v) : bits_(from_float(static_cast<float>(v))) {}
  operator float() const {
    return std::bit_cast<float>(uint32_t(bits_) << 16);
  }
  static bfloat16_t from_bits(uint16_t b) {
    bfloat16_t r;
    r.bits_ = b;
    return r;
  }
  bfloat16_t operator-() const { return from_bits(bits_ ^ 0x8000u); }
  bfloat16_t operator+() const { return *this; }
};

#define MTL_BF16_BINOP(OP)                                                  \
  inline bfloat16_t operator OP(bfloat16_t a, bfloat16_t b) {              \
    return bfloat16_t(float(a) OP float(b));                               \
  }                                                                        \
  template <class U>                                                       \
    requires is_fp_like_v<U>                                               \
  inline float operator OP(bfloat16_t a, U b) {                            \
    return float(a) OP float(b);                                           \
  }                                                                        \
  template <class U>                                                       \
    requires is_fp_like_v<U>                                               \
  inline float operator OP(U a, bfloat16_t b) {                            \
    return float(a) OP float(b);                                           \
  }                                                                        \
  template <class U>                                                       \
    requires is_int_like_v<U>                                              \
  inline bfloat16_t operator OP(bfloat16_t a, U b) {                       \
    return bfloat16_t(float(a) OP float(b));                               \
  }                                                                        \
  template <class U>                                                       \
    requires is_int_like_v<U>                                              \
  inline bfloat16_t operator OP(U a, bfloat16_t b) {                       \
    return bfloat16_t(float(a) OP float(b));                               \
  }                                                                        \
  template <class U>                                                       \
  inline bfloat16_t& operator OP##=(bfloat16_t & a, U b) {                 \
    a = bfloat16_t(float(a) OP float(b));                                  \
    return a;                                                              \
  }                                                                        \
  template <class U>                                                       \
    requires(is_fp_like_v<U> || is_int_like_v<U>)                          \
  inline U& operator OP##=(U & a, bfloat16_t b) {                          \
    a = static_cast<U>(a OP float(b));                                     \
    return a;                                                              \
  }
MTL_BF16_BINOP(+)
MTL_BF16_BINOP(-)
MTL_BF16_BINOP(*)
MTL_BF16_BINOP(/)
#undef MTL_BF16_BINOP

#define MTL_BF16_CMP(OP)                                                    \
  inline bool operator OP(bfloat16_t a, bfloat16_t b) {                    \
    return float(a) OP float(b);                                           \
  }                                                                        \
  template <class U>                                                       \
    requires(is_fp_like_v<U> || is_int_like_v<U>)                          \
  inline bool operator OP(bfloat16_t a, U b) {                             \
    return float(a) OP float(b);                                           \
  }                                                                        \
  template <class U>                                                       \
    requires(is_fp_like_v<U> || is_int_like_v<U>)                          \
  inline bool operator OP(U a, bfloat16_t b) {                             \
    return float(a) OP float(b);                                           \
  }
MTL_BF16_CMP(==)
MTL_BF16_CMP(!=)
MTL_BF16_CMP(<)
MTL_BF16_CMP(<=)
MTL_BF16_CMP(>)
MTL_BF16_CMP(>=)
#undef MTL_BF16_CMP
inline bfloat16_t& operator++(bfloat16_t& a) { return a += 1; }
inline bfloat16_t& operator--(bfloat16_t& a) { return a -= 1; }

typedef bfloat16_t bfloat;

// ----------------------------------------------------------------- vectors
template <class T, int N>
struct vstore;
template <class T>
struct vstore<T, 2> {
  union {
    T v[2];
    struct { T x, y; };
    struct { T r, g; };
  };
};
template <class T>
struct vstore<T, 3> {
  union {
    T v[4]; // Metal's 3-vectors have the size and alignment of 4-vectors
    struct { T x, y, z; };
    struct { T r, g, b; };
  };
};
template <class T>
struct vstore<T, 4> {
  union {
    T v[4];
    struct { T x, y, z, w; };
    struct { T r, g, b, a; };
  };
};

template <class T, int N>
struct alignas(sizeof(T) * (N == 3 ? 4 : N)) vec : vstore<T, N> {
  using value_type = T;
  static constexpr int size = N;
  vec() = default;
  // scalar broadcast, e.g. float4(0) or `float4 x = 1.0f;`
  template <class S>
    requires(std::is_arithmetic_v<S> || is_fp_like_v<S> ||
             std::is_same_v<S, bfloat16_t>)
  vec(S s) {
    for (int i = 0; i < N; ++i) this->v[i] = static_cast<T>(s);
  }
  // elementwise conversion, e.g. float4(half4)
  template <class U>
  explicit vec(const vec<U, N>& o) {
    for (int i = 0; i < N; ++i) this->v[i] = static_cast<T>(o.v[i]);
  }
  // component-wise construction from scalars / smaller vectors
  template <class A0, class A1, class... As>
  vec(const A0& a0, const A1& a1, const As&... as) {
    int i = 0;
    put(i, a0);
    put(i, a1);
    (put(i, as), ...);
  }
  T& operator[](int i) { return this->v[i]; }
  const T& operator[](int i) const { return this->v[i]; }
  template <int... I>
  vec<T, sizeof...(I)> swz() const {
    vec<T, sizeof...(I)> r;
    int k = 0;
    ((r.v[k++] = this->v[I]), ...);
    return r;
  }

 private:
  template <class U, int M>
  void put(int& i, const vec<U, M>& o) {
    for (int j = 0; j < M; ++j) this->v[i++] = static_cast<T>(o.v[j]);
  }
  template <class S>
  void put(int& i, const S& s) {
    this->v[i++] = static_cast<T>(s);
  }
};

template <class T>
struct is_vec : std::false_type {};
template <class T, int N>
struct is_vec<vec<T, N>> : std::true_type {};
template <class T>
inline constexpr bool is_vec_v = is_vec<std::remove_cvref_t<T>>::value;
template <class T>
struct scalar_of { using type = T; };
template <class T, int N>
struct scalar_of<vec<T, N>> { using type = T; };

#define MTL_VEC_BINOP(OP)                                                   \
  template <class T, class U, int N>                                        \
  inline auto operator OP(const vec<T, N>& a, const vec<U, N>& b) {        \
    vec<decltype(a.v[0] OP b.v[0]), N> r;                                  \
    for (int i = 0; i < N; ++i) r.v[i] = a.v[i] OP b.v[i];                 \
    return r;                                                              \
  }                                                                        \
  template <class T, int N, class S>                                       \
    requires(!is_vec_v<S>)                                                 \
  inline vec<T, N> operator OP(const vec<T, N>& a, const S& s) {           \
    vec<T, N> r;                                                           \
    for (int i = 0; i < N; ++i) r.v[i] = static_cast<T>(a.v[i] OP s);      \
    return r;                                                              \
  }                                                                        \
  template <class T, int N, class S>                                       \
    requires(!is_vec_v<S>)                                                 \
  inline vec<T, N> operator OP(const S& s, const vec<T, N>& a) {           \
    vec<T, N> r;                                                           \
    for (int i = 0; i < N; ++i) r.v[i] = static_cast<T>(s OP a.v[i]);      \
    return r;                                                              \
  }                                                                        \
  template <class T, int N, class S>                                       \
  inline vec<T, N>& operator OP##=(vec<T, N>& a, const S& s) {             \
    a = a OP s;                                                            \
    return a;                                                              \
  }
MTL_VEC_BINOP(+)
MTL_VEC_BINOP(-)
MTL_VEC_BINOP(*)
MTL_VEC_BINOP(/)
MTL_VEC_BINOP(%)
MTL_VEC_BINOP(&)
MTL_VEC_BINOP(|)
MTL_VEC_BINOP(^)
MTL_VEC_BINOP(<<)
MTL_VEC_BINOP(>>)
#undef MTL_VEC_BINOP

#define MTL_VEC_CMP(OP)                                                     \
  template <class T, class U, int N>                                        \
  inline vec<bool, N> operator OP(const vec<T, N>& a, const vec<U, N>& b) { \
    vec<bool, N> r;                                                        \
    for (int i = 0; i < N; ++i) r.v[i] = a.v[i] OP b.v[i];                 \
    return r;                                                              \
  }                                                                        \
  template <class T, int N, class S>                                       \
    requires(!is_vec_v<S>)                                                 \
  inline vec<bool, N> operator OP(const vec<T, N>& a, const S& s) {        \
    vec<bool, N> r;                                                        \
    for (int i = 0; i < N; ++i) r.v[i] = a.v[i] OP s;                      \
    return r;                                                              \
  }
MTL_VEC_CMP(==)
MTL_VEC_CMP(!=)
MTL_VEC_CMP(<)
MTL_VEC_CMP(<=)
MTL_VEC_CMP(>)
MTL_VEC_CMP(>=)
#undef MTL_VEC_CMP
template <class T, int N>
inline vec<T, N> operator-(const vec<T, N>& a) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r.v[i] = -a.v[i];
  return r;
}
template <class T, int N>
inline vec<T, N> operator!(const vec<T, N>& a) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r.v[i] = !a.v[i];
  return r;
}

#define MTL_VEC_TYPES(T, NAME) \
  typedef vec<T, 2> NAME##2;   \
  typedef vec<T, 3> NAME##3;   \
  typedef vec<T, 4> NAME##4;
MTL_VEC_TYPES(float, float)
MTL_VEC_TYPES(_Float16, half)
MTL_VEC_TYPES(bfloat16_t, bfloat)
MTL_VEC_TYPES(int, int)
MTL_VEC_TYPES(unsigned int, uint)
MTL_VEC_TYPES(short, short)
MTL_VEC_TYPES(unsigned short, ushort)
MTL_VEC_TYPES(signed char, char)
MTL_VEC_TYPES(unsigned char, uchar)
MTL_VEC_TYPES(long, long)
MTL_VEC_TYPES(unsigned long, ulong)
MTL_VEC_TYPES(bool, bool)
#undef MTL_VEC_TYPES

// ------------------------------------------------------------- type utils
template <class T>
using compute_t =
    std::conditional_t<std::is_same_v<T, bfloat16_t> ||
                           std::is_same_v<T, _Float16>,
                       float, T>;

template <class To, class From>
inline To as_type(const From& f) {
  static_assert(sizeof(To) == sizeof(From), "as_type: size mismatch");
  To t;
  std::memcpy(&t, &f, sizeof(To));
  return t;
}

template <class T>
struct numeric_limits : std::numeric_limits<T> {};
template <>
struct numeric_limits<_Float16> {
  static constexpr bool is_signed = true;
  static _Float16 max() { return _Float16(65504.0f); }
  static _Float16 min() { return _Float16(6.103515625e-05f); }
  static _Float16 lowest() { return _Float16(-65504.0f); }
  static _Float16 epsilon() { return _Float16(0.0009765625f); }
  static _Float16 infinity() { return _Float16(INFINITY); }
  static _Float16 quiet_NaN() { return _Float16(NAN); }
};
template <>
struct numeric_limits<bfloat16_t> {
  static constexpr bool is_signed = true;
  static bfloat16_t max() { return bfloat16_t::from_bits(0x7f7f); }
  static bfloat16_t min() { return bfloat16_t::from_bits(0x0080); }
  static bfloat16_t lowest() { return bfloat16_t::from_bits(0xff7f); }
  static bfloat16_t epsilon() { return bfloat16_t::from_bits(0x3c00); }
  static bfloat16_t infinity() { return bfloat16_t::from_bits(0x7f80); }
  static bfloat16_t quiet_NaN() { return bfloat16_t::from_bits(0x7fc0); }
};

// ------------------------------------------------------------------- math
#define MTL_UNARY(NAME, EXPR)                                               \
  template <class T>                                                        \
    requires(!is_vec_v<T>)                                                  \
  inline T NAME(T x_) {                                                     \
    using C = compute_t<T>;                                                 \
    C x = static_cast<C>(x_);                                               \
    return static_cast<T>(EXPR);                                            \
  }                                                                         \
  template <class T, int N>                                                 \
  inline vec<T, N> NAME(const vec<T, N>& a) {                               \
    vec<T, N> r;                                                            \
    for (int i = 0; i < N; ++i) r.v[i] = NAME(a.v[i]);                      \
    return r;                                                               \
  }
MTL_UNARY(exp, std::exp(x))
MTL_UNARY(exp2, std::exp2(x))
MTL_UNARY(exp10, std::pow(C(10), x))
MTL_UNARY(log, std::log(x))
MTL_UNARY(log2, std::log2(x))
MTL_UNARY(log10, std::log10(x))
MTL_UNARY(log1p, std::log1p(x))
MTL_UNARY(expm1, std::expm1(x))
MTL_UNARY(sqrt, std::sqrt(x))
MTL_UNARY(rsqrt, C(1) / std::sqrt(x))
MTL_UNARY(cbrt, std::cbrt(x))
MTL_UNARY(sin, std::sin(x))
MTL_UNARY(cos, std::cos(x))
MTL_UNARY(tan, std::tan(x))
MTL_UNARY(asin, std::asin(x))
MTL_UNARY(acos, std::acos(x))
MTL_UNARY(atan, std::atan(x))
MTL_UNARY(sinh, std::sinh(x))
MTL_UNARY(cosh, std::cosh(x))
MTL_UNARY(tanh, std::tanh(x))
MTL_UNARY(asinh, std::asinh(x))
MTL_UNARY(acosh, std::acosh(x))
MTL_UNARY(atanh, std::atanh(x))
MTL_UNARY(erf, std::erf(x))
MTL_UNARY(erfc, std::erfc(x))
MTL_UNARY(floor, std::floor(x))
MTL_UNARY(ceil, std::ceil(x))
MTL_UNARY(trunc, std::trunc(x))
MTL_UNARY(round, std::round(x))
MTL_UNARY(rint, std::nearbyint(x))
MTL_UNARY(fract, x - std::floor(x))
MTL_UNARY(saturate, std::min(std::max(x, C(0)), C(1)))
MTL_UNARY(sign, (x > C(0) ? C(1) : (x < C(0) ? C(-1) : C(0))))
MTL_UNARY(recip, C(1) / x)
#undef MTL_UNARY

template <class T>
  requires(!is_vec_v<T>)
inline T abs(T x) {
  if constexpr (std::is_unsigned_v<T>) {
    return x;
  } else {
    return x < T(0) ? T(-x) : x;
  }
}
template <class T, int N>
inline vec<T, N> abs(const vec<T, N>& a) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r.v[i] = abs(a.v[i]);
  return r;
}
template <class T>
inline T fabs(T x) { return abs(x); }

template <class T>
inline bool isnan(T x) {
  if constexpr (std::is_integral_v<T>) return false;
  else return std::isnan(static_cast<float>(x));
}
template <class T>
inline bool isinf(T x) {
  if constexpr (std::is_integral_v<T>) return false;
  else return std::isinf(static_cast<float>(x));
}
template <class T>
inline bool isfinite(T x) {
  if constexpr (std::is_integral_v<T>) return true;
  else return std::isfinite(static_cast<float>(x));
}
template <class T>
inline bool signbit(T x) { return std::signbit(static_cast<float>(x)); }

// Binary functions: Metal requires matching argument types; be lenient and
// use the C++ common type (so max(x, 0.0f) with half x works as in Metal).
template <class A, class B>
using common2_t = std::conditional_t<
    std::is_same_v<A, B>, A,
    std::conditional_t<is_vec_v<A>, A,
                       std::conditional_t<is_vec_v<B>, B,
                                          decltype(std::declval<A>() +
                                                   std::declval<B>())>>>;

template <class A, class B>
inline auto max(A a, B b) {
  using R = common2_t<A, B>;
  if constexpr (is_vec_v<R>) {
    R ra(a), rb(b), r;
    for (int i = 0; i < R::size; ++i) r.v[i] = max(ra.v[i], rb.v[i]);
    return r;
  } else {
    R x = static_cast<R>(a), y = static_cast<R>(b);
    if constexpr (std::is_integral_v<R>) return x < y ? y : x;
    else {
      // Metal's fmax semantics: a NaN argument is ignored
      if (isnan(x)) return y;
      if (isnan(y)) return x;
      return x < y ? y : x;
    }
  }
}
template <class A, class B>
inline auto min(A a, B b) {
  using R = common2_t<A, B>;
  if constexpr (is_vec_v<R>) {
    R ra(a), rb(b), r;
    for (int i = 0; i < R::size; ++i) r.v[i] = min(ra.v[i], rb.v[i]);
    return r;
  } else {
    R x = static_cast<R>(a), y = static_cast<R>(b);
    if constexpr (std::is_integral_v<R>) return y < x ? y : x;
    else {
      if (isnan(x)) return y;
      if (isnan(y)) return x;
      return y < x ? y : x;
    }
  }
}
template <class A, class B>
inline auto fmax(A a, B b) { return max(a, b); }
template <class A, class B>
inline auto fmin(A a, B b) { return min(a, b); }
template <class A, class B, class C>
inline auto max3(A a, B b, C c) { return max(max(a, b), c); }
template <class A, class B, class C>
inline auto min3(A a, B b, C c) { return min(min(a, b), c); }

template <class X, class L, class H>
inline X clamp(X x, L lo, H hi) {
  return static_cast<X>(min(max(x, static_cast<X>(lo)), static_cast<X>(hi)));
}

#define MTL_BINARY(NAME, EXPR)                                              \
  template <class A, class B>                                               \
  inline auto NAME(A a_, B b_) {                                            \
    using R = common2_t<A, B>;                                              \
    if constexpr (is_vec_v<R>) {                                            \
      R ra(a_), rb(b_), r;                                                  \
      for (int i = 0; i < R::size; ++i) r.v[i] = NAME(ra.v[i], rb.v[i]);    \
      return r;                                                             \
    } else {                                                                \
      using C = compute_t<R>;                                               \
      C a = static_cast<C>(static_cast<R>(a_));                             \
      C b = static_cast<C>(static_cast<R>(b_));                             \
      return static_cast<R>(EXPR);                                          \
    }                                                                       \
  }
MTL_BINARY(pow, std::pow(a, b))
MTL_BINARY(powr, std::pow(a, b))
MTL_BINARY(atan2, std::atan2(a, b))
MTL_BINARY(fmod, std::fmod(a, b))
MTL_BINARY(copysign, std::copysign(a, b))
MTL_BINARY(step, (b < a ? C(0) : C(1)))
MTL_BINARY(divide, a / b)
MTL_BINARY(fdim, std::fdim(a, b))
#undef MTL_BINARY

template <class A, class B, class C>
inline auto fma(A a, B b, C c) {
  using R = common2_t<common2_t<A, B>, C>;
  if constexpr (is_vec_v<R>) {
    R ra(a), rb(b), rc(c), r;
    for (int i = 0; i < R::size; ++i) r.v[i] = fma(ra.v[i], rb.v[i], rc.v[i]);
    return r;
  } else {
    using K = compute_t<R>;
    return static_cast<R>(std::fma(static_cast<K>(static_cast<R>(a)),
                                   static_cast<K>(static_cast<R>(b)),
                                   static_cast<K>(static_cast<R>(c))));
  }
}
template <class A, class B, class C>
inline auto mix(A x, B y, C a) {
  return x + (y - x) * a;
}
template <class A, class B>
inline A select(A a, B b, bool c) { return c ? static_cast<A>(b) : a; }
template <class T, int N>
inline vec<T, N> select(const vec<T, N>& a, const vec<T, N>& b,
                        const vec<bool, N>& c) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r.v[i] = c.v[i] ? b.v[i] : a.v[i];
  return r;
}
template <class T, int N>
inline auto dot(const vec<T, N>& a, const vec<T, N>& b) {
  compute_t<T> s = 0;
  for (int i = 0; i < N; ++i) s += compute_t<T>(a.v[i]) * compute_t<T>(b.v[i]);
  return static_cast<T>(s);
}
template <class T, int N>
inline T length(const vec<T, N>& a) { return sqrt(dot(a, a)); }
template <class T, int N>
inline vec<T, N> normalize(const vec<T, N>& a) { return a * rsqrt(dot(a, a)); }
template <int N>
inline bool all(const vec<bool, N>& a) {
  for (int i = 0; i < N; ++i) if (!a.v[i]) return false;
  return true;
}
template <int N>
inline bool any(const vec<bool, N>& a) {
  for (int i = 0; i < N; ++i) if (a.v[i]) return true;
  return false;
}
inline bool all(bool b) { return b; }
inline bool any(bool b) { return b; }

template <class T>
inline T popcount(T x) { return static_cast<T>(std::popcount(std::make_unsigned_t<T>(x))); }
template <class T>
inline T clz(T x) { return static_cast<T>(std::countl_zero(std::make_unsigned_t<T>(x))); }
template <class T>
inline T ctz(T x) { return static_cast<T>(std::countr_zero(std::make_unsigned_t<T>(x))); }
template <class T>
inline T mulhi(T a, T b) {
  using W = std::conditional_t<std::is_signed_v<T>, int64_t, uint64_t>;
  return static_cast<T>((W(a) * W(b)) >> (8 * sizeof(T)));
}

// precise:: and fast:: variants are the same functions on the CPU.
namespace precise {
using metal::abs; using metal::cos; using metal::divide; using metal::exp;
using metal::exp2; using metal::fma; using metal::log; using metal::log2;
using metal::max; using metal::min; using metal::pow; using metal::rsqrt;
using metal::sin; using metal::sqrt; using metal::tanh; using metal::tan;
using metal::log1p; using metal::expm1; using metal::powr; using metal::erf;
using metal::sinh; using metal::cosh; using metal::atan; using metal::atan2;
using metal::fmax; using metal::fmin; using metal::floor; using metal::ceil;
using metal::recip;
}
namespace fast {
using namespace precise;
}

// --------------------------------------------------------------- atomics
enum memory_order {
  memory_order_relaxed = __ATOMIC_RELAXED,
  memory_order_acquire = __ATOMIC_ACQUIRE,
  memory_order_release = __ATOMIC_RELEASE,
  memory_order_acq_rel = __ATOMIC_ACQ_REL,
  memory_order_seq_cst = __ATOMIC_SEQ_CST,
};
enum class thread_scope { thread_scope_thread, thread_scope_simdgroup, thread_scope_threadgroup, thread_scope_device };

template <class T>
struct atomic {
  T value_;
};
typedef atomic<int> atomic_int;
typedef atomic<unsigned int> atomic_uint;
typedef atomic<float> atomic_float;
typedef atomic<bool> atomic_bool;
typedef atomic<unsigned long> atomic_ulong;
typedef atomic<long> atomic_long;

template <class T, class U>
inline void atomic_store_explicit(atomic<T>* a, U v, memory_order = memory_order_relaxed) {
  T t = static_cast<T>(v);
  __atomic_store(&a->value_, &t, __ATOMIC_SEQ_CST);
}
template <class T>
inline T atomic_load_explicit(const atomic<T>* a, memory_order = memory_order_relaxed) {
  T t;
  __atomic_load(const_cast<T*>(&a->value_), &t, __ATOMIC_SEQ_CST);
  return t;
}
template <class T, class U>
inline T atomic_exchange_explicit(atomic<T>* a, U v, memory_order = memory_order_relaxed) {
  T t = static_cast<T>(v), old;
  __atomic_exchange(&a->value_, &t, &old, __ATOMIC_SEQ_CST);
  return old;
}
template <class T, class U>
inline bool atomic_compare_exchange_weak_explicit(atomic<T>* a, T* expected, U desired,
                                                  memory_order = memory_order_relaxed,
                                                  memory_order = memory_order_relaxed) {
  T d = static_cast<T>(desired);
  return __atomic_compare_exchange(&a->value_, expected, &d, false, __ATOMIC_SEQ_CST,
                                   __ATOMIC_SEQ_CST);
}
template <class T, class U>
inline bool atomic_compare_exchange_strong_explicit(atomic<T>* a, T* expected, U desired,
                                                    memory_order m1 = memory_order_relaxed,
                                                    memory_order m2 = memory_order_relaxed) {
  return atomic_compare_exchange_weak_explicit(a, expected, desired, m1, m2);
}
template <class T, class F>
inline T atomic_rmw_(atomic<T>* a, F f) {
  T old = atomic_load_explicit(a);
  while (true) {
    T nv = f(old);
    if (__atomic_compare_exchange(&a->value_, &old, &nv, false, __ATOMIC_SEQ_CST,
                                  __ATOMIC_SEQ_CST))
      return old;
  }
}
#define MTL_ATOMIC_RMW(NAME, EXPR)                                          \
  template <class T, class U>                                              \
  inline T atomic_fetch_##NAME##_explicit(atomic<T>* a, U v_,              \
                                          memory_order = memory_order_relaxed) { \
    T v = static_cast<T>(v_);                                              \
    return atomic_rmw_(a, [&](T o) { return static_cast<T>(EXPR); });      \
  }
MTL_ATOMIC_RMW(add, o + v)
MTL_ATOMIC_RMW(sub, o - v)
MTL_ATOMIC_RMW(max, (o < v ? v : o))
MTL_ATOMIC_RMW(min, (v < o ? v : o))
MTL_ATOMIC_RMW(and, o & v)
MTL_ATOMIC_RMW(or, o | v)
MTL_ATOMIC_RMW(xor, o ^ v)
#undef MTL_ATOMIC_RMW

// the same through a checked pointer (`out + i` rather than `&out[i]`): element 0 is checked
template <class T>
inline atomic<T>* atomic_raw_(const mtl_rt::cptr<atomic<T>>& a) {
  return const_cast<atomic<T>*>(&a[0]);
}
template <class T, class U>
inline void atomic_store_explicit(const mtl_rt::cptr<atomic<T>>& a, U v,
                                  memory_order m = memory_order_relaxed) {
  atomic_store_explicit(atomic_raw_(a), v, m);
}
template <class T>
inline T atomic_load_explicit(const mtl_rt::cptr<atomic<T>>& a,
                              memory_order m = memory_order_relaxed) {
  return atomic_load_explicit(atomic_raw_(a), m);
}
template <class T, class U>
inline T atomic_exchange_explicit(const mtl_rt::cptr<atomic<T>>& a, U v,
                                  memory_order m = memory_order_relaxed) {
  return atomic_exchange_explicit(atomic_raw_(a), v, m);
}
template <class T, class U>
inline bool atomic_compare_exchange_weak_explicit(const mtl_rt::cptr<atomic<T>>& a, T* expected,
                                                  U desired, memory_order m1 = memory_order_relaxed,
                                                  memory_order m2 = memory_order_relaxed) {
  return atomic_compare_exchange_weak_explicit(atomic_raw_(a), expected, desired, m1, m2);
}
template <class T, class U>
inline bool atomic_compare_exchange_strong_explicit(const mtl_rt::cptr<atomic<T>>& a,
                                                    T* expected, U desired,
                                                    memory_order m1 = memory_order_relaxed,
                                                    memory_order m2 = memory_order_relaxed) {
  return atomic_compare_exchange_weak_explicit(atomic_raw_(a), expected, desired, m1, m2);
}
#define MTL_ATOMIC_RMW_CHECKED(NAME)                                                    \
  template <class T, class U>                                                          \
  inline T atomic_fetch_##NAME##_explicit(const mtl_rt::cptr<atomic<T>>& a, U v,       \
                                          memory_order m = memory_order_relaxed) {     \
    return atomic_fetch_##NAME##_explicit(atomic_raw_(a), v, m);                       \
  }
MTL_ATOMIC_RMW_CHECKED(add)
MTL_ATOMIC_RMW_CHECKED(sub)
MTL_ATOMIC_RMW_CHECKED(max)
MTL_ATOMIC_RMW_CHECKED(min)
MTL_ATOMIC_RMW_CHECKED(and)
MTL_ATOMIC_RMW_CHECKED(or)
MTL_ATOMIC_RMW_CHECKED(xor)
#undef MTL_ATOMIC_RMW_CHECKED

// ---------------------------------------------------------- barriers, simd
enum class mem_flags : unsigned {
  mem_none = 0,
  mem_device = 1,
  mem_threadgroup = 2,
  mem_texture = 4,
  mem_threadgroup_imageblock = 8,
  mem_object_data = 16,
};
inline mem_flags operator|(mem_flags a, mem_flags b) {
  return mem_flags(unsigned(a) | unsigned(b));
}
inline void threadgroup_barrier(mem_flags flags = mem_flags::mem_none) {
  std::atomic_thread_fence(std::memory_order_seq_cst);
  mtl_rt::tg_barrier(unsigned(flags));
}
inline void simdgroup_barrier(mem_flags flags = mem_flags::mem_none) {
  mtl_rt::sg_barrier(unsigned(flags));
}
inline void atomic_thread_fence(mem_flags = mem_flags::mem_none, memory_order = memory_order_seq_cst,
                                thread_scope = thread_scope::thread_scope_device) {
  std::atomic_thread_fence(std::memory_order_seq_cst);
}

namespace simd_detail {
enum Kind {
  k_sum = 1, k_prod, k_max, k_min, k_and, k_or, k_xor, k_pincl_sum, k_pexcl_sum,
  k_pincl_prod, k_pexcl_prod, k_shuffle, k_shuffle_down, k_shuffle_up,
  k_shuffle_xor, k_rot_down, k_rot_up, k_broadcast, k_broadcast_first, k_all,
  k_any, k_is_first,
  k_quad = 64,
};

template <class T>
inline T lane_val(const unsigned char* slots, unsigned l) {
  T t;
  std::memcpy(&t, slots + 32 * l, sizeof(T));
  return t;
}

// width 32 (simd_*) or 4 (quad_*): lanes [base, base+width) take part.
template <class T, class F>
inline T reduce(int kind, T x, int width, F f, bool inclusive_prefix,
                bool exclusive_prefix, T identity) {
  static_assert(sizeof(T) <= 32, "simd value too large");
  unsigned lane, mask;
  const unsigned char* s = mtl_rt::sg_exchange(kind, &x, sizeof(T), &lane, &mask);
  unsigned base = lane / width * width;
  T acc = identity;
  bool first = true;
  unsigned end = (inclusive_prefix || exclusive_prefix) ? lane + 1 : base + width;
  for (unsigned l = base; l < end; ++l) {
    if (!(mask >> l & 1u)) continue;
    if (exclusive_prefix && l == lane) break;
    T v = lane_val<T>(s, l);
    acc = first ? v : static_cast<T>(f(acc, v));
    first = false;
  }
  return first ? identity : acc;
}

template <class T>
inline T from_lane(int kind, T x, int width, unsigned (*src)(unsigned, unsigned, int), unsigned arg) {
  unsigned lane, mask;
  const unsigned char* s = mtl_rt::sg_exchange(kind, &x, sizeof(T), &lane, &mask);
  unsigned base = lane / width * width;
  long l = src(lane - base, arg, width);
  if (l < 0 || l >= width) return x; // out of range: own value (Metal)
  unsigned sl = base + unsigned(l);
  if (!(mask >> sl & 1u)) return x;   // inactive source lane: undefined
  return lane_val<T>(s, sl);
}
inline unsigned src_idx(unsigned, unsigned a, int) { return a; }
inline unsigned src_down(unsigned l, unsigned a, int) { return l + a; }
inline unsigned src_up(unsigned l, unsigned a, int) { return l < a ? unsigned(-1) : l - a; }
inline unsigned src_xor(unsigned l, unsigned a, int) { return l ^ a; }
inline unsigned src_rdown(unsigned l, unsigned a, int w) { return (l + a) % w; }
inline unsigned src_rup(unsigned l, unsigned a, int w) { return (l + w - a % w) % w; }
} // namespace simd_detail

#define MTL_SIMD_FAMILY(PFX, W, KQ)                                            \
  template <class T> inline T PFX##_sum(T x) {                                 \
    return simd_detail::reduce(simd_detail::k_sum + KQ, x, W,                  \
                               [](T a, T b) { return a + b; }, false, false, T(0)); } \
  template <class T> inline T PFX##_product(T x) {                             \
    return simd_detail::reduce(simd_detail::k_prod + KQ, x, W,                 \
                               [](T a, T b) { return a * b; }, false, false, T(1)); } \
  template <class T> inline T PFX##_max(T x) {                                 \
    return simd_detail::reduce(simd_detail::k_max + KQ, x, W,                  \
                               [](T a, T b) { return metal::max(a, b); }, false, false, x); } \
  template <class T> inline T PFX##_min(T x) {                                 \
    return simd_detail::reduce(simd_detail::k_min + KQ, x, W,                  \
                               [](T a, T b) { return metal::min(a, b); }, false, false, x); } \
  template <class T> inline T PFX##_and(T x) {                                 \
    return simd_detail::reduce(simd_detail::k_and + KQ, x, W,                  \
                               [](T a, T b) { return a & b; }, false, false, x); } \
  template <class T> inline T PFX##_or(T x) {                                  \
    return simd_detail::reduce(simd_detail::k_or + KQ, x, W,                   \
                               [](T a, T b) { return a | b; }, false, false, x); } \
  template <class T> inline T PFX##_xor(T x) {                                 \
    return simd_detail::reduce(simd_detail::k_xor + KQ, x, W,                  \
                               [](T a, T b) { return a ^ b; }, false, false, x); } \
  template <class T> inline T PFX##_prefix_inclusive_sum(T x) {                \
    return simd_detail::reduce(simd_detail::k_pincl_sum + KQ, x, W,            \
                               [](T a, T b) { return a + b; }, true, false, T(0)); } \
  template <class T> inline T PFX##_prefix_exclusive_sum(T x) {                \
    return simd_detail::reduce(simd_detail::k_pexcl_sum + KQ, x, W,            \
                               [](T a, T b) { return a + b; }, false, true, T(0)); } \
  template <class T> inline T PFX##_prefix_inclusive_product(T x) {            \
    return simd_detail::reduce(simd_detail::k_pincl_prod + KQ, x, W,           \
                               [](T a, T b) { return a * b; }, true, false, T(1)); } \
  template <class T> inline T PFX##_prefix_exclusive_product(T x) {            \
    return simd_detail::reduce(simd_detail::k_pexcl_prod + KQ, x, W,           \
                               [](T a, T b) { return a * b; }, false, true, T(1)); } \
  template <class T, class I> inline T PFX##_shuffle(T x, I l) {               \
    return simd_detail::from_lane(simd_detail::k_shuffle + KQ, x, W,           \
                                  simd_detail::src_idx, unsigned(l)); }        \
  template <class T, class I> inline T PFX##_broadcast(T x, I l) {             \
    return simd_detail::from_lane(simd_detail::k_broadcast + KQ, x, W,         \
                                  simd_detail::src_idx, unsigned(l)); }        \
  template <class T, class I> inline T PFX##_shuffle_down(T x, I d) {          \
    return simd_detail::from_lane(simd_detail::k_shuffle_down + KQ, x, W,      \
                                  simd_detail::src_down, unsigned(d)); }       \
  template <class T, class I> inline T PFX##_shuffle_up(T x, I d) {            \
    return simd_detail::from_lane(simd_detail::k_shuffle_up + KQ, x, W,        \
                                  simd_detail::src_up, unsigned(d)); }         \
  template <class T, class I> inline T PFX##_shuffle_xor(T x, I m) {           \
    return simd_detail::from_lane(simd_detail::k_shuffle_xor + KQ, x, W,       \
                                  simd_detail::src_xor, unsigned(m)); }        \
  template <class T, class I> inline T PFX##_shuffle_rotate_down(T x, I d) {   \
    return simd_detail::from_lane(simd_detail::k_rot_down + KQ, x, W,          \
                                  simd_detail::src_rdown, unsigned(d)); }      \
  template <class T, class I> inline T PFX##_shuffle_rotate_up(T x, I d) {     \
    return simd_detail::from_lane(simd_detail::k_rot_up + KQ, x, W,            \
                                  simd_detail::src_rup, unsigned(d)); }        \
  template <class T> inline T PFX##_broadcast_first(T x) {                     \
    unsigned lane, mask;                                                       \
    const unsigned char* s = mtl_rt::sg_exchange(simd_detail::k_broadcast_first + KQ, \
                                                 &x, sizeof(T), &lane, &mask); \
    unsigned base = lane / W * W;                                              \
    for (unsigned l = base; l < base + W; ++l)                                 \
      if (mask >> l & 1u) return simd_detail::lane_val<T>(s, l);               \
    return x; }                                                                \
  inline bool PFX##_all(bool b) {                                              \
    return simd_detail::reduce<bool>(simd_detail::k_all + KQ, b, W,            \
                                     [](bool a, bool c) { return a && c; }, false, false, b); } \
  inline bool PFX##_any(bool b) {                                              \
    return simd_detail::reduce<bool>(simd_detail::k_any + KQ, b, W,            \
                                     [](bool a, bool c) { return a || c; }, false, false, b); } \
  inline bool PFX##_is_first() {                                               \
    bool t = true;                                                             \
    unsigned lane, mask;                                                       \
    mtl_rt::sg_exchange(simd_detail::k_is_first + KQ, &t, 1, &lane, &mask);    \
    unsigned base = lane / W * W;                                              \
    for (unsigned l = base; l < base + W; ++l)                                 \
      if (mask >> l & 1u) return l == lane;                                    \
    return false; }

MTL_SIMD_FAMILY(simd, 32, 0)
MTL_SIMD_FAMILY(quad, 4, simd_detail::k_quad)
#undef MTL_SIMD_FAMILY

inline bool simd_is_helper_thread() { return false; }

// ------------------------------------------------------------ simdgroup matrices
// simdgroup_matrix<T, 8, 8>: the 32 lanes hold 2 elements each, in Apple's layout (the one
// MLX's steel MMA fragments assume): lane l, q = l / 4, holds row (q & 4) + (l / 2) % 4 and
// columns c, c + 1 with c = (q & 2) * 2 + (l % 2) * 2. Loads and stores touch only the lane's
// own elements; a multiply is a simdgroup collective (every lane must reach it) that
// accumulates in float and rounds once to the destination type.
namespace simd_detail {
constexpr int k_mma = 40;
inline void mma_coord(unsigned lane, int& row, int& col) {
  const unsigned q = lane / 4;
  row = int((q & 4) + (lane / 2) % 4);
  col = int((q & 2) * 2 + (lane % 2) * 2);
}
} // namespace simd_detail

template <class T, int Rows, int Cols>
struct simdgroup_matrix {
  static_assert(Rows == 8 && Cols == 8, "the emulator has 8x8 simdgroup matrices only");
  vec<T, 2> e;
  simdgroup_matrix() = default;
  explicit simdgroup_matrix(T diagonal) {  // Metal: a diagonal matrix
    int row, col;
    simd_detail::mma_coord(mtl_rt::sg_lane(), row, col);
    for (int j = 0; j < 2; ++j) e.v[j] = row == col + j ? diagonal : T(0);
  }
  vec<T, 2>& thread_elements() { return e; }
  const vec<T, 2>& thread_elements() const { return e; }
};

template <class T, int Rows, int Cols>
inline simdgroup_matrix<T, Rows, Cols> make_filled_simdgroup_matrix(T value) {
  simdgroup_matrix<T, Rows, Cols> m;
  m.e.v[0] = m.e.v[1] = value;
  return m;
}

typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef simdgroup_matrix<_Float16, 8, 8> simdgroup_half8x8;
typedef simdgroup_matrix<bfloat16_t, 8, 8> simdgroup_bfloat8x8;

// element (row, col) of the 8x8 block at matrix_origin (x: column, y: row) of a row-major
// matrix with elements_per_row; transposed: the block's (col, row)
inline size_t mma_offset(int row, int col, size_t elements_per_row, vec<unsigned long, 2> origin,
                         bool transpose) {
  if (transpose) std::swap(row, col);
  return (origin.v[1] + size_t(row)) * elements_per_row + origin.v[0] + size_t(col);
}

template <class T, class P>
inline void simdgroup_load(simdgroup_matrix<T, 8, 8>& d, const P& src,
                           size_t elements_per_row = 8,
                           vec<unsigned long, 2> matrix_origin = vec<unsigned long, 2>(0ul),
                           bool transpose_matrix = false) {
  int row, col;
  simd_detail::mma_coord(mtl_rt::sg_lane(), row, col);
  for (int j = 0; j < 2; ++j)
    d.e.v[j] = static_cast<T>(
        src[mma_offset(row, col + j, elements_per_row, matrix_origin, transpose_matrix)]);
}

template <class T, class P>
inline void simdgroup_store(const simdgroup_matrix<T, 8, 8>& a, const P& dst,
                            size_t elements_per_row = 8,
                            vec<unsigned long, 2> matrix_origin = vec<unsigned long, 2>(0ul),
                            bool transpose_matrix = false) {
  int row, col;
  simd_detail::mma_coord(mtl_rt::sg_lane(), row, col);
  for (int j = 0; j < 2; ++j)
    dst[mma_offset(row, col + j, elements_per_row, matrix_origin, transpose_matrix)] =
        static_cast<std::remove_cvref_t<decltype(dst[0])>>(a.e.v[j]);
}

template <class TD, class TA, class TB, class TC>
inline void simdgroup_multiply_accumulate(simdgroup_matrix<TD, 8, 8>& d,
                                          const simdgroup_matrix<TA, 8, 8>& a,
                                          const simdgroup_matrix<TB, 8, 8>& b,
                                          const simdgroup_matrix<TC, 8, 8>& c) {
  struct Lane { float a[2], b[2], c[2]; } mine;  // 24 bytes: fits a lane's slot
  for (int j = 0; j < 2; ++j) {
    mine.a[j] = static_cast<float>(a.e.v[j]);
    mine.b[j] = static_cast<float>(b.e.v[j]);
    mine.c[j] = static_cast<float>(c.e.v[j]);
  }
  unsigned lane, mask;
  const unsigned char* slots =
      mtl_rt::sg_exchange(simd_detail::k_mma, &mine, sizeof(mine), &lane, &mask);
  if (mask != 0xFFFFFFFFu)
    mtl_rt::kernel_error("simdgroup_multiply(_accumulate) reached by only some lanes of a "
                         "simdgroup: every one of the 32 lanes must take part");
  float A[8][8], B[8][8], C[8][8];
  for (unsigned l = 0; l < 32; ++l) {
    Lane o = simd_detail::lane_val<Lane>(slots, l);  // an inactive lane's slot is garbage
    int row, col;
    simd_detail::mma_coord(l, row, col);
    for (int j = 0; j < 2; ++j) {
      A[row][col + j] = o.a[j];
      B[row][col + j] = o.b[j];
      C[row][col + j] = o.c[j];
    }
  }
  int row, col;
  simd_detail::mma_coord(lane, row, col);
  for (int j = 0; j < 2; ++j) {
    float acc = C[row][col + j];
    for (int k = 0; k < 8; ++k) acc += A[row][k] * B[k][col + j];
    d.e.v[j] = static_cast<TD>(acc);
  }
}

template <class TD, class TA, class TB>
inline void simdgroup_multiply(simdgroup_matrix<TD, 8, 8>& d, const simdgroup_matrix<TA, 8, 8>& a,
                               const simdgroup_matrix<TB, 8, 8>& b) {
  simdgroup_multiply_accumulate(d, a, b, make_filled_simdgroup_matrix<TD, 8, 8>(TD(0)));
}

} // namespace metal

// Names Metal code uses unqualified.
using namespace metal;
typedef metal::uint uint;
typedef metal::half half;
typedef metal::bfloat16_t bfloat16_t;
typedef metal::bfloat16_t bfloat;
typedef metal::half float16_t;
typedef float float32_t;

// Per-thread values of the Metal thread attributes (filled by the runtime).
namespace mtl_rt {
using metal::uint;
using metal::uint3;
struct Attrs {
  uint3 thread_position_in_grid, thread_position_in_threadgroup,
      threadgroup_position_in_grid, threads_per_threadgroup,
      threadgroups_per_grid, threads_per_grid,
      dispatch_threads_per_threadgroup, grid_origin, grid_size;
  uint thread_index_in_threadgroup, thread_index_in_simdgroup,
      simdgroup_index_in_threadgroup, simdgroups_per_threadgroup,
      threads_per_simdgroup, thread_execution_width,
      quadgroup_index_in_threadgroup, quadgroups_per_threadgroup,
      thread_index_in_quadgroup, dispatch_simdgroups_per_threadgroup,
      dispatch_quadgroups_per_threadgroup;
};

typedef void (*BodyFn)(void** args, const Attrs& a);
} // namespace mtl_rt

// ------------------------------------------------- a little of MLX utils.h
template <class T>
struct Limits {
  static T max() { return metal::numeric_limits<T>::max(); }
  static T min() { return metal::numeric_limits<T>::lowest(); }
  static T finite_max() { return metal::numeric_limits<T>::max(); }
  static T finite_min() { return metal::numeric_limits<T>::lowest(); }
};
#define MTL_FLOAT_LIMITS(T)                                                 \
  template <>                                                               \
  struct Limits<T> {                                                        \
    static T max() { return metal::numeric_limits<T>::infinity(); }         \
    static T min() { return -metal::numeric_limits<T>::infinity(); }        \
    static T finite_max() { return metal::numeric_limits<T>::max(); }       \
    static T finite_min() { return metal::numeric_limits<T>::lowest(); }    \
  };
MTL_FLOAT_LIMITS(float)
MTL_FLOAT_LIMITS(_Float16)
MTL_FLOAT_LIMITS(metal::bfloat16_t)
#undef MTL_FLOAT_LIMITS

template <typename IdxT = int64_t>
inline IdxT elem_to_loc(IdxT elem, const int* shape, const int64_t* strides, int ndim) {
  IdxT loc = 0;
  for (int i = ndim - 1; i >= 0 && elem > 0; --i) {
    loc += (elem % shape[i]) * IdxT(strides[i]);
    elem /= shape[i];
  }
  return loc;
}
template <typename IdxT = int64_t>
inline IdxT elem_to_loc(metal::uint3 elem, const int* shape, const int64_t* strides, int ndim) {
  IdxT loc = elem.x * IdxT(strides[ndim - 1]) + elem.y * IdxT(strides[ndim - 2]);
  for (int d = ndim - 3; d >= 0; --d) {
    loc += (elem.z % shape[d]) * IdxT(strides[d]);
    elem.z /= shape[d];
  }
  return loc;
}
inline int64_t elem_to_loc(uint32_t elem, const int* shape, const int64_t* strides, int ndim) {
  return elem_to_loc<int64_t>(int64_t(elem), shape, strides, ndim);
}
inline int64_t elem_to_loc(int elem, const int* shape, const int64_t* strides, int ndim) {
  return elem_to_loc<int64_t>(int64_t(elem), shape, strides, ndim);
}

#define METAL_FUNC inline
#define METAL_CONST constexpr
