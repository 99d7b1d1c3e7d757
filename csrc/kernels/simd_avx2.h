// SPDX-License-Identifier: Apache-2.0
// 8 x fp32 vectors on AVX2 + FMA + F16C (compile this header only in a TU built with
// -mavx2 -mfma -mf16c).
#pragma once

#include <immintrin.h>

#include "kernels/cpu_attn.h"

namespace kv_offload {
namespace cpu_attn {
namespace avx2 {

struct Simd {
  using vf = __m256;
  static constexpr int W = 8;
  static inline vf zero() { return _mm256_setzero_ps(); }
  static inline vf set1(float x) { return _mm256_set1_ps(x); }
  static inline void keep_in_register(vf& v) { __asm__("" : "+x"(v)); }
  static inline vf load(const float* p) { return _mm256_loadu_ps(p); }
  static inline void store(float* p, vf v) { _mm256_storeu_ps(p, v); }
  static inline vf fma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
  static inline vf add(vf a, vf b) { return _mm256_add_ps(a, b); }
  static inline vf sub(vf a, vf b) { return _mm256_sub_ps(a, b); }
  static inline vf mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
  static inline vf max(vf a, vf b) { return _mm256_max_ps(a, b); }
  static inline float hsum(vf v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static inline float hmax(vf v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // out[i] = hsum(v[i]) for i < 8.
  static inline void hsum8(vf v0, vf v1, vf v2, vf v3, vf v4, vf v5, vf v6, vf v7, float* out) {
    const vf v[8] = {v0, v1, v2, v3, v4, v5, v6, v7};
    __m256 a = _mm256_hadd_ps(v[0], v[1]);
    __m256 b = _mm256_hadd_ps(v[2], v[3]);
    __m256 c = _mm256_hadd_ps(v[4], v[5]);
    __m256 d = _mm256_hadd_ps(v[6], v[7]);
    __m256 ab = _mm256_hadd_ps(a, b);  // [0 1 2 3 | 0 1 2 3] halves
    __m256 cd = _mm256_hadd_ps(c, d);
    __m256 lo = _mm256_permute2f128_ps(ab, cd, 0x20);
    __m256 hi = _mm256_permute2f128_ps(ab, cd, 0x31);
    _mm256_storeu_ps(out, _mm256_add_ps(lo, hi));
  }
  // Transposes an 8x8 tile: column i of `in` goes to dst + i * stride.
  static inline void transpose16_store(const vf*, float*, int64_t) {}  // only used when W == 16
  static inline void transpose8_store(const vf* in, float* dst, int64_t stride) {
    __m256 t0 = _mm256_unpacklo_ps(in[0], in[1]), t1 = _mm256_unpackhi_ps(in[0], in[1]);
    __m256 t2 = _mm256_unpacklo_ps(in[2], in[3]), t3 = _mm256_unpackhi_ps(in[2], in[3]);
    __m256 t4 = _mm256_unpacklo_ps(in[4], in[5]), t5 = _mm256_unpackhi_ps(in[4], in[5]);
    __m256 t6 = _mm256_unpacklo_ps(in[6], in[7]), t7 = _mm256_unpackhi_ps(in[6], in[7]);
    __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    _mm256_storeu_ps(dst + 0 * stride, _mm256_permute2f128_ps(s0, s4, 0x20));
    _mm256_storeu_ps(dst + 1 * stride, _mm256_permute2f128_ps(s1, s5, 0x20));
    _mm256_storeu_ps(dst + 2 * stride, _mm256_permute2f128_ps(s2, s6, 0x20));
    _mm256_storeu_ps(dst + 3 * stride, _mm256_permute2f128_ps(s3, s7, 0x20));
    _mm256_storeu_ps(dst + 4 * stride, _mm256_permute2f128_ps(s0, s4, 0x31));
    _mm256_storeu_ps(dst + 5 * stride, _mm256_permute2f128_ps(s1, s5, 0x31));
    _mm256_storeu_ps(dst + 6 * stride, _mm256_permute2f128_ps(s2, s6, 0x31));
    _mm256_storeu_ps(dst + 7 * stride, _mm256_permute2f128_ps(s3, s7, 0x31));
  }
  // 2^x; exactly 0 below -125 (so exp2(-inf) = 0). 2^x = 2^n * 2^f with n = round(x), f in
  // [-0.5, 0.5], 2^f a degree-5 minimax polynomial in f (see kExp2C0) and 2^n built in the
  // exponent bits. Lanes below -125 (and -inf, NaN) are zeroed by the final AND whatever n's
  // conversion gave, so only the upper clamp is needed.
  static inline vf exp2(vf x) {
    const __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(-125.0f), _CMP_GE_OQ);
    x = _mm256_min_ps(x, _mm256_set1_ps(127.0f));
    const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 f = _mm256_sub_ps(x, n);
    __m256 p = _mm256_set1_ps(kExp2C5);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2C4));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2C3));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2C2));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2C1));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2C0));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), keep);
  }
  static inline vf load_cvt(const float* p) { return _mm256_loadu_ps(p); }
  static inline vf load_cvt(const bf16_t* p) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static inline vf load_cvt(const fp16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  // To L2, not L1: the attention kernels prefetch a whole chunk ahead (see PrefetchCursor).
  static inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T2); }

  // bf16 in even/odd lane pairs: one 256-bit load of 16 bf16 values gives two fp32 vectors,
  // elements 0, 2, ..., 14 and 1, 3, ..., 15, for a shift and an AND (instead of two loads,
  // two widening moves and two shifts). Used where the order of terms does not matter (Q.K
  // dot products, with Q stored in the same order).
  static constexpr bool kBf16Pairs = true;
  static inline void load_bf16_pair(const bf16_t* p, vf& even, vf& odd) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    even = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
    odd = _mm256_castsi256_ps(_mm256_and_si256(raw, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
  static constexpr bool kBf16Dot = false;  // the bf16 dot-product path is avx512bf16 only
};

}  // namespace avx2
}  // namespace cpu_attn
}  // namespace kv_offload
