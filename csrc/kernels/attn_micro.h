// SPDX-License-Identifier: Apache-2.0
// The Q.K and P.V micro-kernels of the attention kernels (see attn_impl.h for the algorithm),
// written over the ISA's `Simd` interface. Included by attn_impl.h only, inside no namespace:
// it opens kv_offload::cpu_attn::KVO_ISA itself.
#pragma once

#ifndef KVO_ISA
#error "define KVO_ISA before including attn_micro.h"
#endif

#include <cstdint>
#include <limits>
#include <type_traits>

#include "kernels/cpu_attn.h"
#include "kernels/scalar_cvt.h"

namespace kv_offload {
namespace cpu_attn {
namespace KVO_ISA {

// Most tokens per chunk: kChunk where the chunk is staged (many rows: prefill; its K^T staging
// buffer stays within L1), kInPlaceChunk where K and V are read in place (few rows: decode). A
// decode chunk is then a whole 128-token block, so each line of the CPU page format's K^T rows
// is read, and prefetched, once per block; with 64-token chunks each prefetch span also
// covered the other half of every K^T row, and the spans overlapped (Zen 4: decode from DRAM
// 20 -> 26 GB/s fp32 with the change below to the prefetch pacing and hint).
constexpr int kChunk = 64;
constexpr int kInPlaceChunk = 128;
constexpr int kRowTile = 6;                   // query rows per register tile (12 accumulators)
constexpr int kSStride = kInPlaceChunk + 16;  // row stride of the score buffer
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

using vf = Simd::vf;
constexpr int W = Simd::W;
constexpr int kDvVecs = 16 / W;  // V dims per P.V tile = 16 (head sizes are multiples of 16)
// Vectors per register tile where the ISA has room for more: AVX-512 (32 registers) tiles
// kRowTile rows x 4 vectors (24 accumulators), so each V (or K^T) vector load and each
// broadcast feeds 4-6 FMAs instead of 1-6 (with 6 accumulators it was bound by loads and by
// the FMA latency). AVX2 (16 registers) keeps its 12-accumulator tiles.
constexpr int kWideVecs = W == 16 ? 4 : kDvVecs;

// One contiguous run of KV positions [pos, pos + n) of one KV head.
template <class KT>
struct Chunk {
  const KT* k;  // element (token pos, dim 0)
  const KT* v;
  int64_t k_tok, k_dim, v_tok;
  int n;
  int64_t pos;
};

// ---- Q.K micro-kernels -----------------------------------------------------------------

// Calls f(r0, std::integral_constant<int, RT>{}) for row tiles covering [0, rows): full tiles
// of Max rows, then one tile of the remaining rows, so each tile size is its own instantiation.
template <int N, class F>
static inline void row_tail(int r0, int rest, F& f) {
  if constexpr (N > 0) {
    if (rest == N)
      f(r0, std::integral_constant<int, N>{});
    else
      row_tail<N - 1>(r0, rest, f);
  }
}

template <int Max, class F>
static inline void for_row_tiles(int rows, F&& f) {
  int r0 = 0;
  for (; r0 + Max <= rows; r0 += Max) f(r0, std::integral_constant<int, Max>{});
  row_tail<Max - 1>(r0, rows - r0, f);
}

// The bf16 pair Q.K kernel below (decode's in-place path) leaves W-lane partial dot products
// in a buffer, raw[(r * kInPlaceChunk + t) * W], instead of reducing each tile at once: the
// horizontal sums then run in one pass per chunk (reduce_partials), off the FMA dependency
// chains, and each tile's chains are split over two halves of the head dims, so out-of-order
// execution overlaps neighbouring tiles (+25% on hot bf16 decode here; fp32's 3-token tiles
// already have 12 independent chains and lost 15% this way, so they reduce at once). At most
// kMaxInPlaceRows rows read K in place.
constexpr int kMaxInPlaceRows = 4;
constexpr int kPartialFloats = kMaxInPlaceRows * kInPlaceChunk * W;

// Stores (half 0) or adds (half 1) an RT x NT tile of partial sums.
template <int RT, int NT>
static inline void store_partials(vf (&acc)[RT][NT], int half, float* raw) {
  for (int r = 0; r < RT; ++r)
    for (int t = 0; t < NT; ++t) {
      float* o = raw + (r * kInPlaceChunk + t) * W;
      Simd::store(o, half ? Simd::add(Simd::load(o), acc[r][t]) : acc[r][t]);
    }
}

// S[r][t] = the sum of raw's W lanes, for t in [0, round_up(n, 8)) (lanes past n hold stale
// finite values; the caller masks those scores).
static inline void reduce_partials(const float* raw, int rows, int n, float* s) {
  for (int r = 0; r < rows; ++r)
    for (int t = 0; t < n; t += 8) {
      const float* x = raw + (r * kInPlaceChunk + t) * W;
      Simd::hsum8(Simd::load(x), Simd::load(x + W), Simd::load(x + 2 * W), Simd::load(x + 3 * W),
                  Simd::load(x + 4 * W), Simd::load(x + 5 * W), Simd::load(x + 6 * W), Simd::load(x + 7 * W),
                  s + r * kSStride + t);
    }
}

// Horizontal sums of an RT x NT tile of dot-product accumulators into the score rows.
template <int RT, int NT>
static inline void store_scores(vf (&acc)[RT][NT], float* s) {
  if constexpr (RT * NT == 8 || RT * NT == 12) {
    float out[16];
    vf* a = &acc[0][0];
    Simd::hsum8(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], out);
    if constexpr (RT * NT == 12) {
      const vf z = Simd::zero();
      Simd::hsum8(a[8], a[9], a[10], a[11], z, z, z, z, out + 8);
    }
    for (int r = 0; r < RT; ++r)
      for (int t = 0; t < NT; ++t) s[r * kSStride + t] = out[r * NT + t];
  } else {
    for (int r = 0; r < RT; ++r)
      for (int t = 0; t < NT; ++t) s[r * kSStride + t] = Simd::hsum(acc[r][t]);
  }
}

// Token-major K (dim stride 1): RT rows x NT tokens of dot products over D.
template <class KT, int DC, int RT, int NT>
static inline void qk_token_major(const float* q, int d, const KT* k, int64_t k_tok, float* s) {
  const int dn = DC ? DC : d;
  vf acc[RT][NT];
  for (int r = 0; r < RT; ++r)
    for (int t = 0; t < NT; ++t) acc[r][t] = Simd::zero();
  for (int i = 0; i < dn; i += W) {
    vf kv[NT];
    for (int t = 0; t < NT; ++t) kv[t] = Simd::load_cvt(k + t * k_tok + i);
    for (int r = 0; r < RT; ++r) {
      vf qv = Simd::load(q + r * dn + i);
      Simd::keep_in_register(qv);  // one load for NT FMAs, not one folded into each
      for (int t = 0; t < NT; ++t) acc[r][t] = Simd::fma(qv, kv[t], acc[r][t]);
    }
  }
  store_scores<RT, NT>(acc, s);
}

// Token-major bf16 K read as even/odd lane pairs (Simd::kBf16Pairs): qp is Q with every
// 2W-dim group stored as its W even dims, then its W odd dims (a dot product does not care
// about the order of its terms), so each K load feeds 2 x RT FMAs after one shift or AND.
template <int DC, int RT, int NT>
static inline void qk_bf16_pairs(const float* qp, int d, const bf16_t* k, int64_t k_tok, float* raw) {
  const int dn = DC ? DC : d;
  const int mid = dn / (4 * W) * (2 * W);
  for (int half = 0; half < 2; ++half) {
    vf acc[RT][NT];
    for (int r = 0; r < RT; ++r)
      for (int t = 0; t < NT; ++t) acc[r][t] = Simd::zero();
    for (int i = half ? mid : 0; i < (half ? dn : mid); i += 2 * W) {
      vf ke[NT], ko[NT];
      for (int t = 0; t < NT; ++t) Simd::load_bf16_pair(k + t * k_tok + i, ke[t], ko[t]);
      for (int r = 0; r < RT; ++r) {
        vf qe = Simd::load(qp + r * dn + i);
        Simd::keep_in_register(qe);
        for (int t = 0; t < NT; ++t) acc[r][t] = Simd::fma(qe, ke[t], acc[r][t]);
        vf qo = Simd::load(qp + r * dn + i + W);
        Simd::keep_in_register(qo);
        for (int t = 0; t < NT; ++t) acc[r][t] = Simd::fma(qo, ko[t], acc[r][t]);
      }
    }
    store_partials<RT, NT>(acc, half, raw);
  }
}

template <int DC, int NT>
static inline void qk_bf16_pairs_rows(const float* qp, int rows, int d, const bf16_t* k, int64_t k_tok, float* raw) {
  const int dn = DC ? DC : d;
  for_row_tiles<4>(rows, [&](int r0, auto rt) {
    qk_bf16_pairs<DC, decltype(rt)::value, NT>(qp + r0 * dn, d, k, k_tok, raw + r0 * kInPlaceChunk * W);
  });
}

template <class KT, int DC, int NT>
static inline void qk_token_major_rows(const float* q, int rows, int d, const KT* k, int64_t k_tok,
                                       float* s) {
  const int dn = DC ? DC : d;
  for_row_tiles<4>(rows, [&](int r0, auto rt) {
    qk_token_major<KT, DC, decltype(rt)::value, NT>(q + r0 * dn, d, k, k_tok, s + r0 * kSStride);
  });
}

// Lines of the next chunk still to prefetch, issued at a steady pace over the whole of this
// chunk's compute: `advance(k)` is called with the work done, in units of one W-lane vector
// of one token (P.V: per row tile; Q.K: for all rows), and issues rate/65536 lines per unit.
// Bursts stall the core: a prefetch waits for a free miss buffer, and so do the compute
// loop's own L1 misses behind it. The micro-kernels advance a local copy and write it back
// at the end: advanced through a reference, the cursor lived in memory, each line's
// prefetch waited on the store-to-load chain of `credit` and `next`, and the accumulators
// spilled around the loop (perf: 60% of fp32 decode's P.V time was that loop; hot fp32
// decode on one Zen 5 core went from 30 to 50 GB/s, bf16 from 21 to 36 GB/s).
// The hint is L2 (Simd::prefetch): a line is prefetched a whole chunk (up to 128 KiB of K and
// V) before it is read, more than an L1 holds, so L1-bound prefetches evicted each other and
// the chunk being computed (Zen 4: prefetcht2 ahead of prefetcht0 in every interleaved run).
struct PrefetchCursor {
  const char* next = nullptr;
  const char* end = nullptr;
  uint32_t rate = 0;    // lines per unit of work, x 65536
  uint32_t credit = 0;  // lines owed, x 65536
  inline void advance(uint32_t units) {
    credit += rate * units;
    for (; credit >= 65536u && next < end; credit -= 65536u, next += 64) Simd::prefetch(next);
  }
};

// Further byte ranges of the same length at a fixed stride, after a cursor's first one (NHD
// pages: one token row's K and V of this head per range, the other heads between).
struct PrefetchRanges {
  const char* start;  // the current range's first byte
  int64_t stride, bytes, left;
};

// The cursor for NHD decode: the same, going on to the next range when one ends. It is a type
// of its own, so that the other layouts keep the plain cursor's loop: with this one in every
// micro-kernel, hot bf16 decode lost 5 to 8% (Zen 4).
struct RangedCursor : PrefetchCursor {
  PrefetchRanges* more = nullptr;
  inline void advance(uint32_t units) {
    credit += rate * units;
    for (; credit >= 65536u; credit -= 65536u, next += 64) {
      if (next >= end) {
        if (more == nullptr || more->left == 0) return;
        --more->left;
        more->start += more->stride;
        next = reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(more->start) & ~uintptr_t{63});
        end = more->start + more->bytes;
      }
      Simd::prefetch(next);
    }
  }
};

// Dim-major K (token stride 1): RT rows x NV vectors of W tokens, broadcasting Q. Paced: the
// in-place (decode) tile advances the prefetch cursor by NV units per head dim, so the next
// chunk's lines are issued over Q.K as well as P.V (before, only P.V advanced it for this
// layout, so every line went out in half the time, in bursts).
template <class KT, int DC, int RT, int NV, bool Paced, class Cur>
static inline void qk_dim_major(const float* q, int d, const KT* k, int64_t k_dim, float* s, Cur& pf) {
  const int dn = DC ? DC : d;
  vf acc[RT][NV];
  for (int r = 0; r < RT; ++r)
    for (int j = 0; j < NV; ++j) acc[r][j] = Simd::zero();
  Cur cur = pf;  // a local copy stays in registers (see PrefetchCursor)
  for (int i = 0; i < dn; ++i) {
    if constexpr (Paced) cur.advance(NV);
    vf kv[NV];
    for (int j = 0; j < NV; ++j) kv[j] = Simd::load_cvt(k + i * k_dim + j * W);
    for (int r = 0; r < RT; ++r) {
      vf qb = Simd::set1(q[r * dn + i]);
      for (int j = 0; j < NV; ++j) acc[r][j] = Simd::fma(qb, kv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < RT; ++r)
    for (int j = 0; j < NV; ++j) Simd::store(s + r * kSStride + j * W, acc[r][j]);
  pf = cur;
}

// Few rows (decode: one tile, read in place) advance the cursor; many rows (prefill, staged)
// advance it in P.V only (see attend's units).
template <class KT, int DC, int NV, class Cur>
static inline void qk_dim_major_rows(const float* q, int rows, int d, const KT* k, int64_t k_dim, float* s,
                                     Cur& pf) {
  const int dn = DC ? DC : d;
  if (rows <= kMaxInPlaceRows) {
    for_row_tiles<kMaxInPlaceRows>(rows, [&](int r0, auto rt) {
      qk_dim_major<KT, DC, decltype(rt)::value, NV, true>(q + r0 * dn, d, k, k_dim, s + r0 * kSStride, pf);
    });
    return;
  }
  for_row_tiles<kRowTile>(rows, [&](int r0, auto rt) {
    qk_dim_major<KT, DC, decltype(rt)::value, NV, false>(q + r0 * dn, d, k, k_dim, s + r0 * kSStride, pf);
  });
}

// Whether token-major bf16 K goes through the even/odd pair kernels on this ISA.
template <class KT>
constexpr bool kPairs = std::is_same_v<KT, bf16_t> && Simd::kBf16Pairs;

// S[rows][0..n) = Q K^T for one chunk. qp: Q in pair order (see qk_bf16_pairs), used for
// token-major K when kPairs<KT>. raw: kPartialFloats of scratch for token-major K, which is
// read in place only for at most kMaxInPlaceRows rows.
template <class KT, int DC, class Cur>
static void chunk_scores(const float* q, const float* qp, int rows, int d, const Chunk<KT>& c, float* s,
                         float* raw, Cur& pf_out) {
  const int dn = DC ? DC : d;
  const int n = c.n;
  Cur pf = pf_out;  // a local copy stays in registers (see PrefetchCursor)
  struct WriteBack {
    Cur& out;
    const Cur& cur;
    ~WriteBack() { out = cur; }
  } write_back{pf_out, pf};
  if (c.k_dim == 1) {
    int t = 0;
    if constexpr (kPairs<KT>) {
      for (; t + 2 <= n; t += 2) {
        pf.advance(2 * dn / W);
        qk_bf16_pairs_rows<DC, 2>(qp, rows, d, c.k + t * c.k_tok, c.k_tok, raw + t * W);
      }
      if (t < n) qk_bf16_pairs_rows<DC, 1>(qp, rows, d, c.k + t * c.k_tok, c.k_tok, raw + t * W);
      reduce_partials(raw, rows, n, s);
    } else {
      for (; t + 3 <= n; t += 3) {
        pf.advance(3 * dn / W);
        qk_token_major_rows<KT, DC, 3>(q, rows, d, c.k + t * c.k_tok, c.k_tok, s + t);
      }
      if (n - t == 2) qk_token_major_rows<KT, DC, 2>(q, rows, d, c.k + t * c.k_tok, c.k_tok, s + t);
      if (n - t == 1) qk_token_major_rows<KT, DC, 1>(q, rows, d, c.k + t * c.k_tok, c.k_tok, s + t);
    }
  } else if (c.k_tok == 1) {
    int t = 0;
    if constexpr (kWideVecs > 2)
      for (; t + kWideVecs * W <= n; t += kWideVecs * W)
        qk_dim_major_rows<KT, DC, kWideVecs>(q, rows, d, c.k + t, c.k_dim, s + t, pf);
    for (; t + 2 * W <= n; t += 2 * W) qk_dim_major_rows<KT, DC, 2>(q, rows, d, c.k + t, c.k_dim, s + t, pf);
    for (; t + W <= n; t += W) qk_dim_major_rows<KT, DC, 1>(q, rows, d, c.k + t, c.k_dim, s + t, pf);
    for (; t < n; ++t)
      for (int r = 0; r < rows; ++r) {
        float acc = 0.0f;
        for (int i = 0; i < d; ++i) acc += q[r * d + i] * to_f32(c.k[i * c.k_dim + t]);
        s[r * kSStride + t] = acc;
      }
  } else {  // any other strides: plain loops
    for (int t = 0; t < n; ++t)
      for (int r = 0; r < rows; ++r) {
        float acc = 0.0f;
        for (int i = 0; i < d; ++i) acc += q[r * d + i] * to_f32(c.k[t * c.k_tok + i * c.k_dim]);
        s[r * kSStride + t] = acc;
      }
  }
}

// ---- P.V micro-kernel ----------------------------------------------------------------------

// acc[RT][NV * W dims] += P[RT][0..n) V[0..n)[NV * W dims], one token step at a time.
template <class KT, int RT, int NV, class Cur>
static inline void pv_tile(const float* p, const KT* v, int64_t v_tok, int n, float* acc, int dv, Cur& pf) {
  vf a[RT][NV];
  for (int r = 0; r < RT; ++r)
    for (int j = 0; j < NV; ++j) a[r][j] = Simd::load(acc + r * dv + j * W);
  Cur cur = pf;  // a local copy stays in registers (see PrefetchCursor)
  for (int t = 0; t < n; ++t) {
    cur.advance(NV);
    vf vv[NV];
    for (int j = 0; j < NV; ++j) vv[j] = Simd::load_cvt(v + t * v_tok + j * W);
    for (int r = 0; r < RT; ++r) {
      vf pb = Simd::set1(p[r * kSStride + t]);
      for (int j = 0; j < NV; ++j) a[r][j] = Simd::fma(pb, vv[j], a[r][j]);
    }
  }
  for (int r = 0; r < RT; ++r)
    for (int j = 0; j < NV; ++j) Simd::store(acc + r * dv + j * W, a[r][j]);
  pf = cur;
}

// Vectors per P.V tile when at most kMaxInPlaceRows rows share it: 3 on AVX2 (4 x 3 = 12
// accumulators, so the FMA units do not wait on their own latency), else 16 dims' worth.
constexpr int kPvWideVecs = W == 8 ? 3 : kWideVecs;

template <class KT, class Cur>
static void chunk_pv(const float* p, int rows, const Chunk<KT>& c, float* acc, int dv, Cur& pf) {
  if (rows <= kMaxInPlaceRows && kPvWideVecs != kDvVecs) {
    int d0 = 0;
    for (; d0 + kPvWideVecs * W <= dv; d0 += kPvWideVecs * W)
      for_row_tiles<kMaxInPlaceRows>(rows, [&](int r0, auto rt) {
        pv_tile<KT, decltype(rt)::value, kPvWideVecs>(p + r0 * kSStride, c.v + d0, c.v_tok, c.n, acc + r0 * dv + d0,
                                                      dv, pf);
      });
    for (; d0 < dv; d0 += W)
      for_row_tiles<kMaxInPlaceRows>(rows, [&](int r0, auto rt) {
        pv_tile<KT, decltype(rt)::value, 1>(p + r0 * kSStride, c.v + d0, c.v_tok, c.n, acc + r0 * dv + d0, dv, pf);
      });
    return;
  }
  int d0 = 0;
  if constexpr (kWideVecs != kDvVecs)
    for (; d0 + kWideVecs * W <= dv; d0 += kWideVecs * W)
      for_row_tiles<kRowTile>(rows, [&](int r0, auto rt) {
        pv_tile<KT, decltype(rt)::value, kWideVecs>(p + r0 * kSStride, c.v + d0, c.v_tok, c.n, acc + r0 * dv + d0,
                                                    dv, pf);
      });
  for (; d0 < dv; d0 += kDvVecs * W) {
    for_row_tiles<kRowTile>(rows, [&](int r0, auto rt) {
      pv_tile<KT, decltype(rt)::value, kDvVecs>(p + r0 * kSStride, c.v + d0, c.v_tok, c.n, acc + r0 * dv + d0, dv,
                                                pf);
    });
  }
}

}  // namespace KVO_ISA
}  // namespace cpu_attn
}  // namespace kv_offload
