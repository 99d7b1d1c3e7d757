// SPDX-License-Identifier: Apache-2.0
// 4 x fp32 vectors on AArch64 NEON (baseline on every aarch64 CPU).
#pragma once

#include <arm_neon.h>

#include <cmath>

#include "kernels/cpu_attn.h"

namespace kv_offload {
namespace cpu_attn {
namespace neon {

struct Simd {
  using vf = float32x4_t;
  static constexpr int W = 4;
  static inline vf zero() { return vdupq_n_f32(0.0f); }
  static inline vf set1(float x) { return vdupq_n_f32(x); }
  static inline void keep_in_register(vf& v) { (void)v; }
  static inline vf load(const float* p) { return vld1q_f32(p); }
  static inline void store(float* p, vf v) { vst1q_f32(p, v); }
  static inline vf fma(vf a, vf b, vf c) { return vfmaq_f32(c, a, b); }
  static inline vf add(vf a, vf b) { return vaddq_f32(a, b); }
  static inline vf sub(vf a, vf b) { return vsubq_f32(a, b); }
  static inline vf mul(vf a, vf b) { return vmulq_f32(a, b); }
  static inline vf max(vf a, vf b) { return vmaxq_f32(a, b); }
  static inline float hsum(vf v) { return vaddvq_f32(v); }
  static inline float hmax(vf v) { return vmaxvq_f32(v); }
  static inline void hsum8(vf v0, vf v1, vf v2, vf v3, vf v4, vf v5, vf v6, vf v7, float* out) {
    const vf v[8] = {v0, v1, v2, v3, v4, v5, v6, v7};
    vst1q_f32(out, vpaddq_f32(vpaddq_f32(v[0], v[1]), vpaddq_f32(v[2], v[3])));
    vst1q_f32(out + 4, vpaddq_f32(vpaddq_f32(v[4], v[5]), vpaddq_f32(v[6], v[7])));
  }
  static inline void transpose16_store(const vf*, float*, int64_t) {}  // only used when W == 16
  static inline void transpose8_store(const vf*, float*, int64_t) {}  // only used when W == 8
  static inline vf exp2(vf x) {
    uint32x4_t keep = vcgeq_f32(x, vdupq_n_f32(-125.0f));
    x = vminq_f32(vmaxq_f32(x, vdupq_n_f32(-125.0f)), vdupq_n_f32(127.0f));
    float32x4_t n = vrndnq_f32(x);
    float32x4_t y = vmulq_f32(vsubq_f32(x, n), vdupq_n_f32(0.6931471805599453f));
    float32x4_t p = vdupq_n_f32(1.0f / 720);
    p = vfmaq_f32(vdupq_n_f32(1.0f / 120), p, y);
    p = vfmaq_f32(vdupq_n_f32(1.0f / 24), p, y);
    p = vfmaq_f32(vdupq_n_f32(1.0f / 6), p, y);
    p = vfmaq_f32(vdupq_n_f32(0.5f), p, y);
    p = vfmaq_f32(vdupq_n_f32(1.0f), p, y);
    p = vfmaq_f32(vdupq_n_f32(1.0f), p, y);
    int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);
    float32x4_t r = vmulq_f32(p, vreinterpretq_f32_s32(e));
    return vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(r), keep));
  }
  static inline vf load_cvt(const float* p) { return vld1q_f32(p); }
  static inline vf load_cvt(const bf16_t* p) {
    return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(reinterpret_cast<const uint16_t*>(p)), 16));
  }
  static inline vf load_cvt(const fp16_t* p) {
    return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(reinterpret_cast<const uint16_t*>(p))));
  }
  static inline void prefetch(const void* p) { __builtin_prefetch(p); }
  static constexpr bool kBf16Pairs = false;  // the even/odd bf16 path is AVX2-only (see simd_avx2.h)
  static inline void load_bf16_pair(const bf16_t*, vf&, vf&) {}
  static constexpr bool kBf16Dot = false;  // the bf16 dot-product path is avx512bf16 only
};

}  // namespace neon
}  // namespace cpu_attn
}  // namespace kv_offload
