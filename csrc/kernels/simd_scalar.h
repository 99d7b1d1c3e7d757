// SPDX-License-Identifier: Apache-2.0
// The portable fallback: "vectors" of one float, plain C++ (no ISA flags).
#pragma once

#include <algorithm>
#include <cmath>

#include "kernels/cpu_attn.h"
#include "kernels/scalar_cvt.h"

namespace kv_offload {
namespace cpu_attn {
namespace scalar {

struct Simd {
  using vf = float;
  static constexpr int W = 1;
  static inline vf zero() { return 0.0f; }
  static inline vf set1(float x) { return x; }
  static inline void keep_in_register(vf& v) { (void)v; }
  static inline vf load(const float* p) { return *p; }
  static inline void store(float* p, vf v) { *p = v; }
  static inline vf fma(vf a, vf b, vf c) { return a * b + c; }
  static inline vf add(vf a, vf b) { return a + b; }
  static inline vf sub(vf a, vf b) { return a - b; }
  static inline vf mul(vf a, vf b) { return a * b; }
  static inline vf max(vf a, vf b) { return a > b ? a : b; }
  static inline float hsum(vf v) { return v; }
  static inline float hmax(vf v) { return v; }
  static inline void hsum8(vf v0, vf v1, vf v2, vf v3, vf v4, vf v5, vf v6, vf v7, float* out) {
    const vf v[8] = {v0, v1, v2, v3, v4, v5, v6, v7};
    for (int i = 0; i < 8; ++i) out[i] = v[i];
  }
  static inline void transpose16_store(const vf*, float*, int64_t) {}  // only used when W == 16
  static inline void transpose8_store(const vf*, float*, int64_t) {}  // only used when W == 8
  static inline vf exp2(vf x) { return x < -125.0f ? 0.0f : std::exp2(x); }
  static inline vf load_cvt(const float* p) { return *p; }
  static inline vf load_cvt(const bf16_t* p) { return to_f32(*p); }
  static inline vf load_cvt(const fp16_t* p) { return to_f32(*p); }
  static inline void prefetch(const void*) {}
  static constexpr bool kBf16Pairs = false;  // the even/odd bf16 path is AVX2-only (see simd_avx2.h)
  static inline void load_bf16_pair(const bf16_t*, vf&, vf&) {}
  static constexpr bool kBf16Dot = false;  // the bf16 dot-product path is avx512bf16 only
};

}  // namespace scalar
}  // namespace cpu_attn
}  // namespace kv_offload
