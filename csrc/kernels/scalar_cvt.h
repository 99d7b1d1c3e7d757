// SPDX-License-Identifier: Apache-2.0
// Scalar fp16/bf16 <-> fp32 conversions (bit manipulation, round to nearest even).
// All functions are `static inline` so each per-ISA TU keeps its own copy: no inline symbol
// compiled with AVX flags can be picked by the linker for the scalar path.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels/cpu_attn.h"

namespace kv_offload {
namespace cpu_attn {

static inline float bits_to_f32(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

static inline uint32_t f32_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

static inline float to_f32(float x) { return x; }
static inline float to_f32(bf16_t x) { return bits_to_f32(static_cast<uint32_t>(x.bits) << 16); }

static inline float to_f32(fp16_t x) {
  uint32_t h = x.bits;
  uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0) {
    if (mant == 0) return bits_to_f32(sign);
    int e = 1;
    while (!(mant & 0x400u)) {
      mant <<= 1;
      --e;
    }
    mant &= 0x3ffu;
    return bits_to_f32(sign | (static_cast<uint32_t>(112 + e) << 23) | (mant << 13));
  }
  if (exp == 31) return bits_to_f32(sign | 0x7f800000u | (mant << 13));
  return bits_to_f32(sign | ((exp + 112) << 23) | (mant << 13));
}

static inline bf16_t f32_to_bf16(float f) {
  uint32_t b = f32_to_bits(f);
  if ((b & 0x7fffffffu) > 0x7f800000u) return bf16_t{0x7fc0};
  b += 0x7fffu + ((b >> 16) & 1u);
  return bf16_t{static_cast<uint16_t>(b >> 16)};
}

static inline fp16_t f32_to_fp16(float value) {
  uint32_t f = f32_to_bits(value);
  uint16_t sign = static_cast<uint16_t>((f >> 16) & 0x8000u);
  f &= 0x7fffffffu;
  if (f >= 0x7f800000u) return fp16_t{static_cast<uint16_t>(sign | (f > 0x7f800000u ? 0x7e00 : 0x7c00))};
  if (f >= 0x477ff000u) return fp16_t{static_cast<uint16_t>(sign | 0x7c00)};
  if (f < 0x38800000u) {  // half subnormal (or zero): value * 2^24, rounded to even
    float v = bits_to_f32(f) * 16777216.0f;
    return fp16_t{static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(v)))};
  }
  f += 0xfffu + ((f >> 13) & 1u);
  return fp16_t{static_cast<uint16_t>(sign | ((f >> 13) - (112u << 10)))};
}

static inline float load_any(const void* base, DType dt, int64_t index) {
  switch (dt) {
    case DType::kFloat32:
      return static_cast<const float*>(base)[index];
    case DType::kBFloat16:
      return to_f32(static_cast<const bf16_t*>(base)[index]);
    default:
      return to_f32(static_cast<const fp16_t*>(base)[index]);
  }
}

static inline void store_any(void* base, DType dt, int64_t index, float v) {
  switch (dt) {
    case DType::kFloat32:
      static_cast<float*>(base)[index] = v;
      break;
    case DType::kBFloat16:
      static_cast<bf16_t*>(base)[index] = f32_to_bf16(v);
      break;
    default:
      static_cast<fp16_t*>(base)[index] = f32_to_fp16(v);
      break;
  }
}

}  // namespace cpu_attn
}  // namespace kv_offload
