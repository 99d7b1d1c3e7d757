// SPDX-License-Identifier: Apache-2.0
// The staged bf16 Q.K of the avx512bf16 path (AVX512_BF16: vdpbf16ps). Included by attn_impl.h
// only, after attn_micro.h, inside no namespace: it opens kv_offload::cpu_attn::KVO_ISA itself.
//
// Why: the staged (prefill) path converts K to fp32 and runs one fp32 FMA per Q.K product;
// on a Zen 5 core that path runs near the FMA peak, Q.K is about 40% of a bf16 prefill's
// kernel time (perf) and the op only ties vLLM's CPU attention op. vdpbf16ps does 32 bf16
// products per instruction (two per fp32 lane, summed into it): half the instructions for
// Q.K when Q and K are both bf16. Measured on a Zen 5 VM, 2 threads, 32 query / 8 KV heads,
// head size 128, CPU pages, new K/V in the cache (medians of 5 calls, 3 processes), CPU ms:
// 4096 new tokens, no prefix: 616-641 (avx512) -> 481-510 (avx512bf16), vLLM's op 620-645;
// 2048 new over a 6144 prefix: 1037-1071 -> 809-849, vLLM's op 1076-1184. Q.K fell from 40%
// to 27% of the kernel time; P.V (fp32 P: bf16 P would cost accuracy) is now 56%.
// Products of two bf16 values are exact in fp32; vdpbf16ps flushes denormals and rounds once
// per pair, so scores differ from the fp32 path in their last bits only.
//
// Layout: K is staged as pair rows, kp + i * kChunk floats = pair row i, whose 32-bit lane t
// holds (K[2i][t], K[2i+1][t]) (bf16 bit patterns; the lower dim in the lower half). Q rows
// stay bf16 pairs as the model gave them (qb: (Q[2i], Q[2i+1]) in word i), WITHOUT the scale:
// the fp32 Q scaled by scale * log2(e) and rounded back to bf16 would lose bits. The scores
// are multiplied by that scale once per score vector instead. Only bf16 Q takes this path (an
// fp32 or fp16 Q is not exact in bf16); decode (few rows, K read in place), fp32 and fp16 KV
// keep the fp32 kernels.
//
// The functions take the ISA's Simd as a template parameter (S) so that their bodies are
// only instantiated where S::kBf16Dot holds: the other paths' Simd has no dot_bf16.
#pragma once

#ifndef KVO_ISA
#error "define KVO_ISA before including attn_bf16dot.h"
#endif

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kernels/cpu_attn.h"

namespace kv_offload {
namespace cpu_attn {
namespace KVO_ISA {

// Whether bf16 K with bf16 Q goes through the dot-product kernels when staged on this ISA.
template <class KT>
constexpr bool kBf16Dot = std::is_same_v<KT, bf16_t> && Simd::kBf16Dot;

// Q row `row`, head `head` as d / 2 bf16 pairs, bits unchanged (Q is bf16; no scale).
static inline void load_q_pairs(const Strided3& q, int64_t row, int64_t head, int d, uint32_t* dst) {
  const uint16_t* src = reinterpret_cast<const uint16_t*>(q.data) + row * q.s0 + head * q.s1;
  if (q.s2 == 1) {  // already pairs in memory (little-endian: the lower dim in the lower half)
    std::memcpy(dst, src, static_cast<size_t>(d) * sizeof(uint16_t));
    return;
  }
  for (int i = 0; i < d / 2; ++i)
    dst[i] = static_cast<uint32_t>(src[2 * i * q.s2]) | static_cast<uint32_t>(src[(2 * i + 1) * q.s2]) << 16;
}

// Chunk c's K as pair rows in kp (see the layout above), tokens [0, n); lanes past n keep
// whatever they held (their scores are masked).
template <class KT, class S = Simd>
static void stage_k_pairs(const Chunk<KT>& c, int d, float* kp) {
  if constexpr (std::is_same_v<KT, bf16_t> && S::kBf16Dot) {
    const int n = c.n, dp = d / 2;
    int t0 = 0;
    if (c.k_tok == 1) {  // dim-major (K^T pages): zip dims 2i and 2i + 1, W tokens at a time
      t0 = n / W * W;
      for (int i = 0; i < dp; ++i) {
        const bf16_t* lo = c.k + 2 * i * c.k_dim;
        for (int t = 0; t < t0; t += W) S::store(kp + i * kChunk + t, S::zip_bf16(lo + t, lo + c.k_dim + t));
      }
    } else if (c.k_dim == 1 && dp % W == 0) {  // token-major: each row is pairs already; transpose words
      for (; t0 + W <= n; t0 += W)
        for (int i = 0; i < dp; i += W) {
          vf rows[W];
          for (int j = 0; j < W; ++j)
            rows[j] = S::load(reinterpret_cast<const float*>(c.k + (t0 + j) * c.k_tok + 2 * i));
          S::transpose16_store(rows, kp + i * kChunk + t0, kChunk);
        }
    }
    for (int t = t0; t < n; ++t)  // tails, other strides
      for (int i = 0; i < dp; ++i) {
        const bf16_t* e = c.k + t * c.k_tok + 2 * i * c.k_dim;
        const uint32_t w = static_cast<uint32_t>(e[0].bits) | static_cast<uint32_t>(e[c.k_dim].bits) << 16;
        std::memcpy(kp + i * kChunk + t, &w, sizeof w);
      }
  }
}

// S[RT rows][NV * W tokens] = (Q . K) * qscale, broadcasting one Q pair per pair row against
// NV vectors of W tokens (RT x NV accumulators, as qk_dim_major).
template <int DC, int RT, int NV, class S>
static inline void qk_pairs(const uint32_t* qb, int d, const float* kp, float qscale, float* s) {
  const int dp = (DC ? DC : d) / 2;
  vf acc[RT][NV];
  for (int r = 0; r < RT; ++r)
    for (int j = 0; j < NV; ++j) acc[r][j] = S::zero();
  for (int i = 0; i < dp; ++i) {
    vf kv[NV];
    for (int j = 0; j < NV; ++j) kv[j] = S::load(kp + i * kChunk + j * W);
    for (int r = 0; r < RT; ++r) {
      const vf qv = S::set1_bits(qb[r * dp + i]);
      for (int j = 0; j < NV; ++j) acc[r][j] = S::dot_bf16(acc[r][j], qv, kv[j]);
    }
  }
  const vf sv = S::set1(qscale);
  for (int r = 0; r < RT; ++r)
    for (int j = 0; j < NV; ++j) S::store(s + r * kSStride + j * W, S::mul(acc[r][j], sv));
}

// S[rows][0..round_up(n, W)) = Q K^T * qscale for one chunk staged by stage_k_pairs (scores
// past n come from stale lanes; the caller masks them).
template <int DC, class S = Simd>
static void chunk_scores_pairs(const uint32_t* qb, int rows, int d, const float* kp, int n, float qscale,
                               float* s) {
  if constexpr (S::kBf16Dot) {
    const int dp = (DC ? DC : d) / 2;
    const int nv = (n + W - 1) / W * W;
    int t = 0;
    const auto tiles = [&](auto nvecs) {
      for_row_tiles<kRowTile>(rows, [&](int r0, auto rt) {
        qk_pairs<DC, decltype(rt)::value, decltype(nvecs)::value, S>(qb + r0 * dp, d, kp + t, qscale,
                                                                     s + r0 * kSStride + t);
      });
    };
    for (; t + kWideVecs * W <= nv; t += kWideVecs * W) tiles(std::integral_constant<int, kWideVecs>{});
    for (; t + 2 * W <= nv; t += 2 * W) tiles(std::integral_constant<int, 2>{});
    for (; t < nv; t += W) tiles(std::integral_constant<int, 1>{});
  }
}

}  // namespace KVO_ISA
}  // namespace cpu_attn
}  // namespace kv_offload
