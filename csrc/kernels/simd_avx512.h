// SPDX-License-Identifier: Apache-2.0
// 16 x fp32 vectors on AVX-512F (compile only in a TU built with -mavx512f -mavx512bw
// -mavx512vl -mavx512dq -mfma -mf16c). With KVO_AVX512_BF16 defined to 1 (attn_avx512bf16.cpp,
// built with -mavx512bf16 as well) the same struct lands in namespace avx512bf16 and gains the
// bf16 dot product: no inline function is then shared by two TUs built with other flags.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "kernels/cpu_attn.h"

#ifndef KVO_AVX512_BF16
#define KVO_AVX512_BF16 0
#endif

namespace kv_offload {
namespace cpu_attn {
#if KVO_AVX512_BF16
namespace avx512bf16 {
#else
namespace avx512 {
#endif

struct Simd {
  using vf = __m512;
  static constexpr int W = 16;
  static inline vf zero() { return _mm512_setzero_ps(); }
  static inline vf set1(float x) { return _mm512_set1_ps(x); }
  static inline void keep_in_register(vf& v) { __asm__("" : "+v"(v)); }
  static inline vf load(const float* p) { return _mm512_loadu_ps(p); }
  static inline void store(float* p, vf v) { _mm512_storeu_ps(p, v); }
  static inline vf fma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
  static inline vf add(vf a, vf b) { return _mm512_add_ps(a, b); }
  static inline vf sub(vf a, vf b) { return _mm512_sub_ps(a, b); }
  static inline vf mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
  static inline vf max(vf a, vf b) { return _mm512_max_ps(a, b); }
  // Reductions by halves (GCC 12's _mm512_reduce_* warn about uninitialized temporaries).
  static inline float hsum(vf v) {
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static inline float hmax(vf v) {
    __m256 h = _mm256_max_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static inline void hsum8(vf v0, vf v1, vf v2, vf v3, vf v4, vf v5, vf v6, vf v7, float* out) {
    const vf v[8] = {v0, v1, v2, v3, v4, v5, v6, v7};
    for (int i = 0; i < 8; ++i) out[i] = hsum(v[i]);
  }
  static inline void transpose8_store(const vf*, float*, int64_t) {}  // only used when W == 8
  // 16 rows of 16 floats -> 16 columns, column c stored at dst + c * stride: unpack pairs of
  // rows, shuffle 4x4 blocks inside 128-bit lanes, then move the 128-bit lanes across.
  static inline void transpose16_store(const vf* r, float* dst, int64_t stride) {
    __m512 t[16], u[16];
    for (int i = 0; i < 16; i += 2) {
      t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
      t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {  // u[i + k]: rows i..i+3 of columns k, k+4, k+8, k+12
      u[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
      u[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
      u[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
      u[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int k = 0; k < 4; ++k) {
      const __m512 a = _mm512_shuffle_f32x4(u[k], u[4 + k], 0x88);   // cols k, k+8 of rows 0-7
      const __m512 b = _mm512_shuffle_f32x4(u[k], u[4 + k], 0xDD);   // cols k+4, k+12 of rows 0-7
      const __m512 c = _mm512_shuffle_f32x4(u[8 + k], u[12 + k], 0x88);  // cols k, k+8 of rows 8-15
      const __m512 e = _mm512_shuffle_f32x4(u[8 + k], u[12 + k], 0xDD);  // cols k+4, k+12 of rows 8-15
      _mm512_storeu_ps(dst + k * stride, _mm512_shuffle_f32x4(a, c, 0x88));
      _mm512_storeu_ps(dst + (k + 8) * stride, _mm512_shuffle_f32x4(a, c, 0xDD));
      _mm512_storeu_ps(dst + (k + 4) * stride, _mm512_shuffle_f32x4(b, e, 0x88));
      _mm512_storeu_ps(dst + (k + 12) * stride, _mm512_shuffle_f32x4(b, e, 0xDD));
    }
  }
  static inline vf exp2(vf x) {
    // 2^x; exactly 0 below -125 (so exp2(-inf) = 0). 2^x = 2^n * 2^f with n = round(x),
    // f in [-0.5, 0.5] and 2^f a degree-5 minimax polynomial in f (relative error 2.3e-7 in
    // fp32 Horner form; the degree-6 Taylor polynomial in f*ln2 it replaces: one FMA, one
    // multiply and a clamp more for 1.2e-7). Lanes below -125 (and -inf, NaN) are zeroed by
    // the mask, so only the upper clamp is needed (vscalefps does not wrap).
    const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-125.0f), _CMP_GE_OQ);
    x = _mm512_min_ps(x, _mm512_set1_ps(127.0f));
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(x, n);
    __m512 p = _mm512_set1_ps(kExp2C5);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2C4));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2C3));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2C2));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2C1));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2C0));
    return _mm512_maskz_scalef_ps(keep, p, n);
  }
  static inline vf load_cvt(const float* p) { return _mm512_loadu_ps(p); }
  static inline vf load_cvt(const bf16_t* p) {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static inline vf load_cvt(const fp16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  // To L2, not L1: the attention kernels prefetch a whole chunk ahead (see PrefetchCursor).
  static inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T2); }
  static constexpr bool kBf16Pairs = false;  // the even/odd bf16 path is AVX2-only (see simd_avx2.h)
  static inline void load_bf16_pair(const bf16_t*, vf&, vf&) {}

  // bf16 pairs (two bf16 in each 32-bit lane, the lower one first) for the staged bf16 Q.K
  // (see attn_bf16dot.h). Vectors of pairs travel as vf bit patterns (moves and shuffles only).
#if KVO_AVX512_BF16
  static constexpr bool kBf16Dot = true;
  // acc + a.lo * b.lo + a.hi * b.hi in each fp32 lane (vdpbf16ps: exact products, denormals
  // flushed, rounded once per pair).
  static inline vf dot_bf16(vf acc, vf a, vf b) {
    return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(a), reinterpret_cast<__m512bh>(b));
  }
  static inline vf set1_bits(uint32_t x) { return _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(x))); }
  // Lane j = (lo[j], hi[j]) for 16 consecutive bf16 values of each.
  static inline vf zip_bf16(const bf16_t* lo, const bf16_t* hi) {
    const __m512i a = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo)));
    const __m512i b = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(hi)));
    return _mm512_castsi512_ps(_mm512_or_si512(a, _mm512_slli_epi32(b, 16)));
  }
#else
  static constexpr bool kBf16Dot = false;
#endif
};

#if KVO_AVX512_BF16
}  // namespace avx512bf16
#else
}  // namespace avx512
#endif
}  // namespace cpu_attn
}  // namespace kv_offload
