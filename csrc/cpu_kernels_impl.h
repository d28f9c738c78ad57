// Elementwise CPU kernels of the fused ops: the math and its order are those of lsfused/reference.py.
//
// Included once per ISA by cpu_kernels_{base,avx2}.cpp, after LSFUSED_TABLE (the table's name) and, for AVX2,
// LSFUSED_AVX2 are defined. Everything but the table has internal linkage (anonymous namespace), so the two copies
// never mix. The including file pulls in every header first, so that nothing outside this file is compiled for
// AVX2 (intrinsics are always_inline; memcpy and bit casts are builtins).
//
// Vectorization is explicit, with GCC vector extensions over 8 logical lanes: each vector operator is one IEEE
// operation per lane, rounded on its own (the build uses -ffp-contract=off, and neither ISA enables FMA), and the
// square root is the correctly rounded sqrtps/sqrtpd. So every lane computes exactly what the reference computes per
// element, independent of ISA and of where a vector starts; tails go through the same code on a zero-padded block
// with the padding masked out of the sums. (Checked: the arithmetic is plain division and sqrt on purpose. Replacing
// the division by the per-range constant with an exact double-precision reciprocal multiply, or the float64
// division of the s term with a compensated float one, measured slower on the Zen 3 used here, where this Pass A is
// bound by the divider in the caches: benchmarks/pass_a_ablation.py.)
//
// Float64 sums: 8 lane accumulators per chunk, added in a fixed order at the end, so a chunk's sums depend only on
// its elements. The launcher splits ranges into fixed-size chunks and adds chunk sums in chunk order, which makes
// the result independent of the number of threads.
#pragma once

#if (defined(__x86_64__) || defined(__i386__)) && !defined(LSFUSED_GENERIC)  // LSFUSED_GENERIC: test the portable path
#include <immintrin.h>
#define LSFUSED_X86
#endif

#include <cstdint>

#include "cpu_kernels.h"

namespace lsfused {
namespace {

#define LSF_INLINE inline __attribute__((always_inline))

// Native vector width of this copy: 32 bytes with AVX2, else 16 (SSE2 on x86-64). The kernels work on 8 logical
// lanes in every copy (one or more native vectors), so lane j always accumulates elements j, j+8, ... and the
// float64 sums are the same whichever copy runs.
#ifdef LSFUSED_AVX2
constexpr int kBytes = 32;
#else
constexpr int kBytes = 16;
#endif
constexpr int kLanes = 8;
constexpr int kFW = kBytes / 4;  // floats per native vector
constexpr int kDW = kBytes / 8;  // doubles per native vector

typedef float vf __attribute__((vector_size(kBytes)));
typedef double vd __attribute__((vector_size(kBytes)));
typedef uint32_t vu __attribute__((vector_size(kBytes)));
typedef int64_t vl __attribute__((vector_size(kBytes)));
typedef uint16_t vh __attribute__((vector_size(kBytes / 2)));  // kFW fp16/bf16 values

// 8 lanes of float (F) or double (D), as native vectors.
struct F {
  vf v[kLanes / kFW];
};
struct D {
  vd v[kLanes / kDW];
};

// Lane-wise operators: one IEEE operation per lane, rounded on its own.
#define LSF_PACK_OPS(T, E)                                                       \
  constexpr int T##_parts = kLanes * sizeof(E) / kBytes;                         \
  LSF_INLINE T operator+(T a, T b) {                                             \
    for (int k = 0; k < T##_parts; ++k) a.v[k] = a.v[k] + b.v[k];                \
    return a;                                                                    \
  }                                                                              \
  LSF_INLINE T operator-(T a, T b) {                                             \
    for (int k = 0; k < T##_parts; ++k) a.v[k] = a.v[k] - b.v[k];                \
    return a;                                                                    \
  }                                                                              \
  LSF_INLINE T operator*(T a, T b) {                                             \
    for (int k = 0; k < T##_parts; ++k) a.v[k] = a.v[k] * b.v[k];                \
    return a;                                                                    \
  }                                                                              \
  LSF_INLINE T operator/(T a, T b) {                                             \
    for (int k = 0; k < T##_parts; ++k) a.v[k] = a.v[k] / b.v[k];                \
    return a;                                                                    \
  }                                                                              \
  LSF_INLINE T operator+(T a, E b) {                                             \
    for (int k = 0; k < T##_parts; ++k) a.v[k] = a.v[k] + b;                     \
    return a;                                                                    \
  }                                                                              \
  LSF_INLINE T operator*(T a, E b) {                                             \
    for (int k = 0; k < T##_parts; ++k) a.v[k] = a.v[k] * b;                     \
    return a;                                                                    \
  }                                                                              \
  LSF_INLINE T operator*(E a, T b) { return b * a; /* IEEE multiply commutes */ } \
  LSF_INLINE T operator/(T a, E b) {                                             \
    for (int k = 0; k < T##_parts; ++k) a.v[k] = a.v[k] / b;                     \
    return a;                                                                    \
  }                                                                              \
  LSF_INLINE T operator-(T a) {                                                  \
    for (int k = 0; k < T##_parts; ++k) a.v[k] = -a.v[k];                        \
    return a;                                                                    \
  }
LSF_PACK_OPS(F, float)
LSF_PACK_OPS(D, double)

// ---------------------------------------------------------------- correctly rounded square root
#if defined(LSFUSED_AVX2)
LSF_INLINE vf native_sqrt(vf x) { return (vf)_mm256_sqrt_ps((__m256)x); }
LSF_INLINE vd native_sqrt(vd x) { return (vd)_mm256_sqrt_pd((__m256d)x); }
#elif defined(LSFUSED_X86)
LSF_INLINE vf native_sqrt(vf x) { return (vf)_mm_sqrt_ps((__m128)x); }
LSF_INLINE vd native_sqrt(vd x) { return (vd)_mm_sqrt_pd((__m128d)x); }
#else  // other ISAs: the sqrt instruction per lane (IEEE; -fno-math-errno lets the compiler skip errno)
LSF_INLINE vf native_sqrt(vf x) {
  for (int i = 0; i < kFW; ++i) x[i] = __builtin_sqrtf(x[i]);
  return x;
}
LSF_INLINE vd native_sqrt(vd x) {
  for (int i = 0; i < kDW; ++i) x[i] = __builtin_sqrt(x[i]);
  return x;
}
#endif
LSF_INLINE F vsqrt(F x) {
  for (auto& part : x.v) part = native_sqrt(part);
  return x;
}
LSF_INLINE D vsqrt(D x) {
  for (auto& part : x.v) part = native_sqrt(part);
  return x;
}

// float -> double, exact: each native float vector gives two native double vectors.
LSF_INLINE D to_f64(F x) {
  D out;
  for (int k = 0; k < F_parts; ++k) {
#if defined(LSFUSED_AVX2)
    out.v[2 * k] = (vd)_mm256_cvtps_pd(_mm256_castps256_ps128((__m256)x.v[k]));
    out.v[2 * k + 1] = (vd)_mm256_cvtps_pd(_mm256_extractf128_ps((__m256)x.v[k], 1));
#elif defined(LSFUSED_X86)
    out.v[2 * k] = (vd)_mm_cvtps_pd((__m128)x.v[k]);
    out.v[2 * k + 1] = (vd)_mm_cvtps_pd(_mm_movehl_ps((__m128)x.v[k], (__m128)x.v[k]));
#else
    for (int i = 0; i < kDW; ++i) {
      out.v[2 * k][i] = x.v[k][i];
      out.v[2 * k + 1][i] = x.v[k][kDW + i];
    }
#endif
  }
  return out;
}
LSF_INLINE D to_f64(D x) { return x; }

// Lanes >= cnt set to 0 (tails: padding lanes may hold 0/0).
LSF_INLINE D keep_first(D x, int cnt) {
  vl idx;
  for (int i = 0; i < kDW; ++i) idx[i] = i;
  for (int k = 0; k < D_parts; ++k) x.v[k] = (idx + k * kDW) < cnt ? x.v[k] : vd{};
  return x;
}

LSF_INLINE double lane_sum(D a) {  // fixed order
  double l[kLanes];
  __builtin_memcpy(l, &a, sizeof(l));
  return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

// ---------------------------------------------------------------- fp16 / bf16 <-> fp32, round to nearest even
// fp16: the branch-free conversions of the FP16 library (also c10's scalar ones), written for vectors. Checked
// against torch's conversions on all 2^32 float inputs (NaN payloads aside) and all 2^16 fp16/bf16 values.
LSF_INLINE vf half_to_float(vh h) {
  const vu w = __builtin_convertvector(h, vu) << 16;
  const vu sign = w & 0x80000000u;
  const vu two_w = w + w;
  const vf normalized = __builtin_bit_cast(vf, (two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const vf denormalized = __builtin_bit_cast(vf, (two_w >> 17) | (126u << 23)) - 0.5f;
  const vu bits =
      sign | (two_w < (1u << 27) ? __builtin_bit_cast(vu, denormalized) : __builtin_bit_cast(vu, normalized));
  return __builtin_bit_cast(vf, bits);
}

LSF_INLINE vh float_to_half(vf f) {
  const vu w = __builtin_bit_cast(vu, f);
  const vf absf = __builtin_bit_cast(vf, w & 0x7FFFFFFFu);
  vf base = (absf * 0x1.0p+112f) * 0x1.0p-110f;
  const vu shl1_w = w + w;
  const vu sign = w & 0x80000000u;
  vu bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? vu{} + 0x71000000u : bias;
  base = __builtin_bit_cast(vf, (bias >> 1) + 0x07800000u) + base;
  const vu bits = __builtin_bit_cast(vu, base);
  const vu nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  const vu out = (sign >> 16) | (shl1_w > 0xFF000000u ? vu{} + 0x7E00u : nonsign);
  return __builtin_convertvector(out, vh);
}

LSF_INLINE vf bf16_to_float(vh h) { return __builtin_bit_cast(vf, __builtin_convertvector(h, vu) << 16); }

LSF_INLINE vh float_to_bf16(vf f) {  // c10::BFloat16's rounding; NaN -> 0x7FC0
  const vu u = __builtin_bit_cast(vu, f);
  const vu rounded = (u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16;
  const vu out = (u & 0x7FFFFFFFu) > 0x7F800000u ? vu{} + 0x7FC0u : rounded;
  return __builtin_convertvector(out, vh);
}

// ---------------------------------------------------------------- loads and stores of 8 lanes
struct F16 {
  uint16_t bits;
};
struct BF16 {
  uint16_t bits;
};

// Param<P>: S is the state/math dtype, V its 8-lane pack; load/store convert between P in memory and V.
template <class P>
struct Param;
template <class P, class Pack>
struct Plain {  // float, double: the pack's bytes are the values
  using V = Pack;
  static constexpr bool kCanStream = true;
  static LSF_INLINE V load(const P* p) {
    V x;
    __builtin_memcpy(&x, p, sizeof(V));
    return x;
  }
  static LSF_INLINE void store(P* p, V x) { __builtin_memcpy(p, &x, sizeof(V)); }
  static LSF_INLINE V round(V x) { return x; }  // state value -> nearest P value, as S
  // Non-temporal store (p aligned to kAlign): bypasses the caches and skips reading the line first.
  static LSF_INLINE void store_nt(P* p, V x) {
    for (unsigned k = 0; k < sizeof(x.v) / sizeof(x.v[0]); ++k) {
#if defined(LSFUSED_AVX2)
      if constexpr (sizeof(P) == 4) _mm256_stream_ps((float*)p + k * kFW, (__m256)x.v[k]);
      else _mm256_stream_pd((double*)p + k * kDW, (__m256d)x.v[k]);
#elif defined(LSFUSED_X86)
      if constexpr (sizeof(P) == 4) _mm_stream_ps((float*)p + k * kFW, (__m128)x.v[k]);
      else _mm_stream_pd((double*)p + k * kDW, (__m128d)x.v[k]);
#else
      __builtin_memcpy(p + k * (kBytes / sizeof(P)), &x.v[k], kBytes);
#endif
    }
  }
};
template <>
struct Param<float> : Plain<float, F> {
  using S = float;
};
template <>
struct Param<double> : Plain<double, D> {
  using S = double;
};
template <class P, vf (*TO)(vh), vh (*FROM)(vf)>
struct Half16 {  // fp16, bf16: converted per native vector
  using S = float;
  using V = F;
  static constexpr bool kCanStream = false;
  static LSF_INLINE V load(const P* p) {
    V x;
    for (int k = 0; k < F_parts; ++k) {
      vh h;
      __builtin_memcpy(&h, p + k * kFW, sizeof(h));
      x.v[k] = TO(h);
    }
    return x;
  }
  static LSF_INLINE void store(P* p, V x) {
    for (int k = 0; k < F_parts; ++k) {
      const vh h = FROM(x.v[k]);
      __builtin_memcpy(p + k * kFW, &h, sizeof(h));
    }
  }
  static LSF_INLINE V round(V x) {
    for (auto& part : x.v) part = TO(FROM(part));
    return x;
  }
};
template <>
struct Param<F16> : Half16<F16, half_to_float, float_to_half> {};
template <>
struct Param<BF16> : Half16<BF16, bf16_to_float, float_to_bf16> {};

// cnt < kLanes only in a tail: go through a zero-padded block.
template <class P>
LSF_INLINE typename Param<P>::V load_n(const P* p, int cnt) {
  if (cnt == kLanes) return Param<P>::load(p);
  P buf[kLanes] = {};
  __builtin_memcpy(buf, p, cnt * sizeof(P));
  return Param<P>::load(buf);
}

// NT: stream full blocks (the caller checked alignment; see streamable()).
template <bool NT = false, class P>
LSF_INLINE void store_n(P* p, typename Param<P>::V x, int cnt) {
  if constexpr (NT && Param<P>::kCanStream) {
    if (cnt == kLanes) return Param<P>::store_nt(p, x);
  }
  if (cnt == kLanes) return Param<P>::store(p, x);
  P buf[kLanes];
  Param<P>::store(buf, x);
  __builtin_memcpy(p, buf, cnt * sizeof(P));
}

// Streaming (non-temporal) stores need every 8-lane block aligned: the chunk must start on a kAlign boundary.
constexpr uintptr_t kAlign = 32;
LSF_INLINE bool streamable(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % kAlign == 0; }
LSF_INLINE void stream_fence() {
#ifdef LSFUSED_X86
  _mm_sfence();  // streamed stores become visible before the threads join
#endif
}

// ---------------------------------------------------------------- the search direction
// The only place d and dm are computed (reference.direction): Pass A, the trials and the absorbed count all go
// through these, so a direction recomputed from the stored g, v, m is bit for bit the one Pass A summed and tried.
template <class S>
struct DirHp {  // the direction's hyperparameters, rounded to the state dtype as the reference's scalar operands
  S eps, bc1, sqrt_bc2;
  explicit DirHp(const Hp& hp) : eps(S(hp.eps)), bc1(S(hp.bc1)), sqrt_bc2(S(hp.sqrt_bc2)) {}
};
template <class V, class S>
LSF_INLINE V adam_denom(V v, const DirHp<S>& h) {
  return vsqrt(v) / h.sqrt_bc2 + h.eps;
}
// d = -(g/denom) (x = g); with DM, dm = -((x/bc1)/denom), x = m, or g without momentum.
template <bool DM, class V, class S>
LSF_INLINE V adam_dir(V x, V denom, const DirHp<S>& h) {
  if constexpr (DM) {
    return -((x / h.bc1) / denom);
  } else {
    return -(x / denom);
  }
}
template <class V>
LSF_INLINE V sgd_dir(V g) {
  return -g;
}

// Which direction a trial or the absorbed count recomputes.
enum DirKind : int { kDirSgd, kDirD, kDirDmOfG, kDirDmOfM };
template <int K>
struct DirTag {
  static constexpr int value = K;
};
template <class F>
LSF_INLINE void with_dir(int mode, bool along_dm, bool has_m, F&& f) {
  if (mode == 0) return f(DirTag<kDirSgd>{});  // the launcher refused along_dm for SGD
  if (!along_dm) return f(DirTag<kDirD>{});
  if (has_m) return f(DirTag<kDirDmOfM>{});
  f(DirTag<kDirDmOfG>{});
}

// The direction of the block at i (cnt < kLanes: a zero-padded tail, whose padding lanes may hold 0/0 or -0).
template <int DIR, class P, class S = typename Param<P>::S>
LSF_INLINE typename Param<P>::V direction_at(const P* g, const S* v, const S* m, int64_t i, int cnt,
                                             const DirHp<S>& h) {
  const auto gs = load_n(g + i, cnt);
  if constexpr (DIR == kDirSgd) {
    return sgd_dir(gs);
  } else {
    const auto denom = adam_denom(load_n(v + i, cnt), h);
    if constexpr (DIR == kDirDmOfM) return adam_dir<true>(load_n(m + i, cnt), denom, h);
    return adam_dir<DIR == kDirDmOfG>(gs, denom, h);
  }
}

// ---------------------------------------------------------------- Pass A
// NT: stream the write-only output w0 (and w with a trial; large buffers: nothing to gain from caching them).
// TRIAL: the fused first trial, 0 none, 1 w = w0 + eta*d, 2 w = w0 + eta*dm, from the values just computed (the op
// order of trial_step_t, so bit-identical to Pass A followed by Pass B).
// GDM: the optimizer has a momentum direction (hp.with_dm): the sum gdm, and a trial along dm.
// ALL: also the sums gg and dd (hp.all_sums), which no decision uses.
template <class P, bool ADAM, bool HAS_M, bool GDM, bool NT, int TRIAL, bool ALL>
void pass_a(const PassAPtrs& ptr, int64_t begin, int64_t n, const Hp& hp, double* out) {
  using S = typename Param<P>::S;
  using V = typename Param<P>::V;
  static_assert(TRIAL != 2 || GDM, "a trial along dm needs a momentum direction");
  static_assert(ADAM || !GDM, "SGD has no momentum direction");
  const P* g = static_cast<const P*>(ptr.g) + begin;
  P* w = static_cast<P*>(ptr.w) + begin;
  S* w0 = static_cast<S*>(ptr.w0) + begin;
  S* v = ADAM ? static_cast<S*>(ptr.v) + begin : nullptr;
  S* m = HAS_M ? static_cast<S*>(ptr.m) + begin : nullptr;
  // Hyperparameters rounded to the state dtype, as the reference's scalar operands are (1-b computed in float64).
  const S b1 = S(hp.b1), omb1 = S(1.0 - hp.b1), b2 = S(hp.b2), omb2 = S(1.0 - hp.b2);
  const S wd = S(hp.wd_scale), eta = S(hp.eta);
  const DirHp<S> dh(hp);
  D acc_s = {}, acc_gg = {}, acc_gd = {}, acc_dd = {}, acc_gdm = {};

  auto block = [&](int64_t i, int cnt) __attribute__((always_inline)) {
    const V gs = load_n(g + i, cnt);
    // w*1 == w bit for bit, so wd_scale == 1 needs no separate path.
    const V w0v = load_n(w + i, cnt) * wd;
    store_n<NT>(w0 + i, w0v, cnt);
    const D g64 = to_f64(gs);
    D s, gdm = {};
    V dv, dmv = {};
    if constexpr (ADAM) {
      V vv = load_n(v + i, cnt);
      vv = vv * b2 + (gs * omb2) * gs;
      store_n(v + i, vv, cnt);
      const V denom = adam_denom(vv, dh);
      dv = adam_dir<false>(gs, denom, dh);
      s = g64 * g64 / to_f64(denom);
      V src = gs;
      if constexpr (HAS_M) {
        src = load_n(m + i, cnt) * b1 + gs * omb1;
        store_n(m + i, src, cnt);
      }
      if constexpr (GDM) {
        dmv = adam_dir<true>(src, denom, dh);
        gdm = g64 * to_f64(dmv);
      }
    } else {
      dv = sgd_dir(gs);
      s = g64 * g64;
    }
    if constexpr (TRIAL == 1) store_n<NT>(w + i, w0v + eta * dv, cnt);
    if constexpr (TRIAL == 2) store_n<NT>(w + i, w0v + eta * dmv, cnt);
    const D d64 = to_f64(dv);
    D gg = g64 * g64, gd = g64 * d64, dd = d64 * d64;
    if (cnt < kLanes) {  // padding lanes may hold 0/0: keep them out of the sums
      s = keep_first(s, cnt);
      gd = keep_first(gd, cnt);
      if constexpr (ALL) {
        gg = keep_first(gg, cnt);
        dd = keep_first(dd, cnt);
      }
      if constexpr (GDM) gdm = keep_first(gdm, cnt);
    }
    acc_s = acc_s + s;
    acc_gd = acc_gd + gd;
    if constexpr (GDM) acc_gdm = acc_gdm + gdm;
    if constexpr (ALL) {
      acc_gg = acc_gg + gg;
      acc_dd = acc_dd + dd;
    }
  };

  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) block(i, kLanes);
  if (i < n) block(i, static_cast<int>(n - i));
  out[0] = lane_sum(acc_s);
  out[1] = lane_sum(acc_gg);
  out[2] = lane_sum(acc_gd);
  out[3] = lane_sum(acc_dd);
  out[4] = lane_sum(acc_gdm);
  if (NT) stream_fence();
}

// Only SGD's Pass A streams (streaming measured slower for Adam's, see ops.cpp), so Adam is instantiated without NT.
template <class P, int TRIAL, bool ALL>
void pass_a_adam(const PassAPtrs& ptr, int64_t begin, int64_t n, const Hp& hp, double* out) {
  const int key = (ptr.m != nullptr) * 2 + hp.with_dm;
  switch (key) {
    case 0:
      if constexpr (TRIAL != 2) return pass_a<P, true, false, false, false, TRIAL, ALL>(ptr, begin, n, hp, out);
      break;
    case 1:
      return pass_a<P, true, false, true, false, TRIAL, ALL>(ptr, begin, n, hp, out);
    case 2:
      if constexpr (TRIAL != 2) return pass_a<P, true, true, false, false, TRIAL, ALL>(ptr, begin, n, hp, out);
      break;
    default:
      return pass_a<P, true, true, true, false, TRIAL, ALL>(ptr, begin, n, hp, out);
  }
}

template <class P, bool ALL>
void pass_a_nt(int mode, const PassAPtrs& ptr, int64_t begin, int64_t n, const Hp& hp, double* out, bool nt) {
  using S = typename Param<P>::S;
  if (mode == 0) {  // SGD: no momentum direction (the launcher refused with_dm)
    const bool trial = hp.trial == 1;
    if (nt && streamable(static_cast<S*>(ptr.w0) + begin) && (!trial || streamable(static_cast<P*>(ptr.w) + begin))) {
      if (trial) return pass_a<P, false, false, false, true, 1, ALL>(ptr, begin, n, hp, out);
      return pass_a<P, false, false, false, true, 0, ALL>(ptr, begin, n, hp, out);
    }
    if (trial) return pass_a<P, false, false, false, false, 1, ALL>(ptr, begin, n, hp, out);
    return pass_a<P, false, false, false, false, 0, ALL>(ptr, begin, n, hp, out);
  }
  // The launcher checked that a trial along dm has with_dm.
  if (hp.trial == 1) return pass_a_adam<P, 1, ALL>(ptr, begin, n, hp, out);
  if (hp.trial == 2) return pass_a_adam<P, 2, ALL>(ptr, begin, n, hp, out);
  pass_a_adam<P, 0, ALL>(ptr, begin, n, hp, out);
}

// ---------------------------------------------------------------- Pass B and restore
// w = w0 + eta*dir, dir recomputed from g, v (m) (reads w0, g, v [m]; writes w): one fused pass, no direction
// buffer. NT: stream the stores of full blocks (the caller checked that w is aligned).
template <class P, int DIR, bool NT>
void trial_step_t(const TrialPtrs& ptr, int64_t begin, int64_t n, const Hp& hp) {
  using S = typename Param<P>::S;
  P* w = static_cast<P*>(ptr.w) + begin;
  const S* w0 = static_cast<const S*>(ptr.w0) + begin;
  const P* g = static_cast<const P*>(ptr.g) + begin;
  const S* v = DIR != kDirSgd ? static_cast<const S*>(ptr.v) + begin : nullptr;
  const S* m = DIR == kDirDmOfM ? static_cast<const S*>(ptr.m) + begin : nullptr;
  const DirHp<S> dh(hp);
  const S eta = S(hp.eta);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    store_n<NT>(w + i, load_n(w0 + i, kLanes) + eta * direction_at<DIR>(g, v, m, i, kLanes, dh), kLanes);
  }
  if (i < n) {
    const int cnt = static_cast<int>(n - i);
    store_n(w + i, load_n(w0 + i, cnt) + eta * direction_at<DIR>(g, v, m, i, cnt, dh), cnt);
  }
  if (NT) stream_fence();
}

template <class P, bool NT>
void restore_t(P* w, const void* w0_, int64_t begin, int64_t n) {  // exact: w0 holds values of P
  using S = typename Param<P>::S;
  const S* w0 = static_cast<const S*>(w0_) + begin;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) store_n<NT>(w + i, load_n(w0 + i, kLanes), kLanes);
  if (i < n) store_n(w + i, load_n(w0 + i, static_cast<int>(n - i)), static_cast<int>(n - i));
  if (NT) stream_fence();
}

template <class P>
void restore_nt(void* w_, const void* w0, int64_t begin, int64_t n, bool nt) {
  P* w = static_cast<P*>(w_) + begin;
  if (nt && streamable(w)) return restore_t<P, true>(w, w0, begin, n);
  restore_t<P, false>(w, w0, begin, n);
}

// Per range [moving, absorbed]: elements with dir != 0 (dir recomputed as the trial did; not g != 0, which differs
// where g/denom underflows), and those of them where w equals w0 rounded to the param dtype
// (reference.absorbed_counts).
template <class P, int DIR>
void absorbed_t(const TrialPtrs& ptr, int64_t begin, int64_t n, const Hp& hp, int64_t* out) {
  using S = typename Param<P>::S;
  using V = typename Param<P>::V;
  using M = decltype(V{}.v[0] != 0);  // lane mask: 0 or -1, as int32 (float) or int64 (double) lanes
  constexpr int kParts = sizeof(V{}.v) / sizeof(V{}.v[0]);
  constexpr int kPer = kLanes / kParts;  // lanes per native vector
  const P* w = static_cast<const P*>(ptr.w) + begin;
  const S* w0 = static_cast<const S*>(ptr.w0) + begin;
  const P* g = static_cast<const P*>(ptr.g) + begin;
  const S* v = DIR != kDirSgd ? static_cast<const S*>(ptr.v) + begin : nullptr;
  const S* m = DIR == kDirDmOfM ? static_cast<const S*>(ptr.m) + begin : nullptr;
  const DirHp<S> dh(hp);
  M moving[kParts] = {}, absorbed[kParts] = {};
  auto block = [&](int64_t i, int cnt) __attribute__((always_inline)) {
    const V wv = load_n(w + i, cnt), w0v = Param<P>::round(load_n(w0 + i, cnt));
    const V dv = direction_at<DIR>(g, v, m, i, cnt, dh);
    for (int k = 0; k < kParts; ++k) {
      M mv = dv.v[k] != 0;  // true for NaN, as in torch
      if (cnt < kLanes) {   // padding lanes: v = 0 gives denom = eps, 0/0 = NaN if eps == 0
        M idx;
        for (int j = 0; j < kPer; ++j) idx[j] = k * kPer + j;
        mv &= idx < cnt;
      }
      moving[k] -= mv;
      absorbed[k] -= mv & (wv.v[k] == w0v.v[k]);
    }
  };
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) block(i, kLanes);
  if (i < n) block(i, static_cast<int>(n - i));
  out[0] = out[1] = 0;
  for (int k = 0; k < kParts; ++k) {
    for (int j = 0; j < kPer; ++j) {
      out[0] += moving[k][j];
      out[1] += absorbed[k][j];
    }
  }
}

// One read of g: the float64 sum of g*g, with 8 lane accumulators added in a fixed order (so the sum depends only on
// the chunk's elements; zero-padded tail lanes add 0), and the number of non-finite entries (exponent all ones <=>
// inf or NaN). The sum is finite when every entry is (an fp32/fp16/bf16 square is below 2^256; an fp64 one may
// overflow, which only costs the count below), so the entries are counted only when it is not: the count loop
// alone made this check cost more than a read of g.
template <class P, class U, U EXP>
int64_t grad_check_t(const void* g_, int64_t begin, int64_t n, double* sumsq) {
  const P* g = static_cast<const P*>(g_) + begin;
  constexpr int64_t kLine = 64 / sizeof(P), kAhead = 4096 / sizeof(P);  // a cache line; 4 KB ahead
  D acc = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    // A read-only stream runs below this CPU's read bandwidth on the hardware prefetcher alone (benchmarks/README.md)
    if (i % kLine == 0 && i + kAhead < n) __builtin_prefetch(g + i + kAhead, 0, 0);
    const D x = to_f64(Param<P>::load(g + i));
    acc = acc + x * x;
  }
  if (i < n) {
    const D x = to_f64(load_n(g + i, static_cast<int>(n - i)));
    acc = acc + x * x;
  }
  *sumsq = lane_sum(acc);
  if (__builtin_isfinite(*sumsq)) return 0;
  const U* bits = static_cast<const U*>(g_) + begin;
  int64_t count = 0;
  for (int64_t j = 0; j < n; ++j) count += (bits[j] & EXP) == EXP;
  return count;
}

// ---------------------------------------------------------------- dtype dispatch
template <class T>
struct Type {
  using type = T;
};

// Calls f(Type<T>{}) for the element type t names: one switch serves every kernel.
template <class F>
void with_dtype(DType t, F&& f) {
  switch (t) {
    case DType::kF32:
      return f(Type<float>{});
    case DType::kF64:
      return f(Type<double>{});
    case DType::kF16:
      return f(Type<F16>{});
    case DType::kBF16:
      return f(Type<BF16>{});
  }
}

void pass_a_any(DType t, int mode, const PassAPtrs& ptr, int64_t begin, int64_t n, const Hp& hp, double* out,
                bool nt) {
  with_dtype(t, [&](auto T) {
    using P = typename decltype(T)::type;
    if (hp.all_sums) return pass_a_nt<P, true>(mode, ptr, begin, n, hp, out, nt);
    pass_a_nt<P, false>(mode, ptr, begin, n, hp, out, nt);
  });
}

void trial_step_any(DType t, int mode, const TrialPtrs& ptr, int64_t begin, int64_t n, const Hp& hp, bool along_dm,
                    bool nt) {
  with_dtype(t, [&](auto T) {
    using P = typename decltype(T)::type;
    with_dir(mode, along_dm, ptr.m != nullptr, [&](auto K) {
      constexpr int DIR = decltype(K)::value;
      if (nt && streamable(static_cast<P*>(ptr.w) + begin)) return trial_step_t<P, DIR, true>(ptr, begin, n, hp);
      trial_step_t<P, DIR, false>(ptr, begin, n, hp);
    });
  });
}

void restore_any(DType t, void* w, const void* w0, int64_t begin, int64_t n, bool nt) {
  with_dtype(t, [&](auto T) { restore_nt<typename decltype(T)::type>(w, w0, begin, n, nt); });
}

void absorbed_any(DType t, int mode, const TrialPtrs& ptr, int64_t begin, int64_t n, const Hp& hp, bool along_dm,
                  int64_t* out) {
  with_dtype(t, [&](auto T) {
    with_dir(mode, along_dm, ptr.m != nullptr, [&](auto K) {
      absorbed_t<typename decltype(T)::type, decltype(K)::value>(ptr, begin, n, hp, out);
    });
  });
}

int64_t grad_check_any(DType t, const void* g, int64_t begin, int64_t n, double* sumsq) {
  switch (t) {
    case DType::kF32:
      return grad_check_t<float, uint32_t, 0x7F800000u>(g, begin, n, sumsq);
    case DType::kF64:
      return grad_check_t<double, uint64_t, 0x7FF0000000000000ull>(g, begin, n, sumsq);
    case DType::kF16:
      return grad_check_t<F16, uint16_t, 0x7C00u>(g, begin, n, sumsq);
    case DType::kBF16:
      return grad_check_t<BF16, uint16_t, 0x7F80u>(g, begin, n, sumsq);
  }
  return 0;
}

}  // namespace

extern const KernelTable LSFUSED_TABLE;
const KernelTable LSFUSED_TABLE = {LSFUSED_ISA_NAME, pass_a_any,    trial_step_any,
                                   restore_any,      absorbed_any, grad_check_any};

}  // namespace lsfused
