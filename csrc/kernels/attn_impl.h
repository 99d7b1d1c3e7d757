// SPDX-License-Identifier: Apache-2.0
// The attention kernels' core, written once over a small SIMD interface (`Simd`, see simd_*.h)
// and compiled once per instruction set: one work item's walk over its KV (attend). The
// decode and prefill drivers, the dispatch and the kernel table are in attn_entry.h, which
// includes this; an attn_<isa>.cpp includes that after defining KVO_ISA (the namespace of that
// ISA's Simd) and including its simd_<isa>.h.
//
// Algorithm (both decode and prefill): a work item owns R query rows that share one KV head
// (decode: the G query heads of a GQA group; prefill: M new tokens x G heads). It walks the
// visible KV positions in chunks of at most kChunk (staged, many rows) or kInPlaceChunk (in
// place, few rows) tokens (one block, or part of one, or a piece of the dense new-token K/V),
// and per chunk:
//   1. S = Q K^T for all R rows (scores already in log2 units: Q is pre-scaled by
//      scale * log2(e), or, for bf16 prefill on avx512bf16, the scores are scaled after
//      bf16 dot products, see attn_bf16dot.h); each K element is read from memory once for
//      the R rows;
//   2. masks positions outside a row's window/causal range;
//   3. online softmax: new running max, rescale of the accumulator, P = 2^(S - max);
//   4. acc += P V, again reading each V element once for the R rows.
// K is read in place whether it is token-major (dim stride 1: HND, NHD, LATENT, dense) or
// dim-major (token stride 1: the CPU page format's K^T).
#pragma once

#ifndef KVO_ISA
#error "define KVO_ISA before including attn_impl.h (through attn_entry.h)"
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "kernels/cpu_attn.h"
#include "kernels/scalar_cvt.h"
#include "kernels/attn_micro.h"
#include "kernels/attn_bf16dot.h"

namespace kv_offload {
namespace cpu_attn {
namespace KVO_ISA {

struct Scratch {
  std::vector<float> q, qp, s, acc, m, l, kbuf, vbuf;
  std::vector<uint32_t> qb;  // Q rows as bf16 pairs (attn_bf16dot.h)
  alignas(64) float raw[kPartialFloats] = {};  // partial dot products (see chunk_scores)
  std::vector<int64_t> lo, hi;
  float sink = 0.0f;
  void ensure(int rows, int d, int dv) {
    if (static_cast<int>(m.size()) < rows) {
      m.resize(rows);
      l.resize(rows);
      lo.resize(rows);
      hi.resize(rows);
      s.resize(static_cast<size_t>(rows) * kSStride);
    }
    if (q.size() < static_cast<size_t>(rows) * d) {
      q.resize(static_cast<size_t>(rows) * d);
      qp.resize(static_cast<size_t>(rows) * d);
      if constexpr (Simd::kBf16Dot) qb.resize(static_cast<size_t>(rows) * d / 2);
    }
    if (acc.size() < static_cast<size_t>(rows) * dv) acc.resize(static_cast<size_t>(rows) * dv);
    if (kbuf.size() < static_cast<size_t>(kChunk) * d) kbuf.resize(static_cast<size_t>(kChunk) * d);
    if (vbuf.size() < static_cast<size_t>(kChunk) * dv) vbuf.resize(static_cast<size_t>(kChunk) * dv);
  }
};

static Scratch& scratch() {
  static thread_local Scratch s;
  return s;
}

// Reads every 64-byte line of [lo, hi) with independent loads (like a read-bandwidth loop),
// so a chunk streams from DRAM at full rate before the compute loops, whose FMA dependency
// chains would otherwise keep too few loads in flight, read it from cache.
static inline vf touch_span(const char* lo, const char* hi, vf sink) {
  lo = reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(lo) & ~uintptr_t{63});
  vf a0 = Simd::zero(), a1 = Simd::zero(), a2 = Simd::zero(), a3 = Simd::zero();
  for (; lo + 256 <= hi; lo += 256) {
    a0 = Simd::add(a0, Simd::load(reinterpret_cast<const float*>(lo)));
    a1 = Simd::add(a1, Simd::load(reinterpret_cast<const float*>(lo + 64)));
    a2 = Simd::add(a2, Simd::load(reinterpret_cast<const float*>(lo + 128)));
    a3 = Simd::add(a3, Simd::load(reinterpret_cast<const float*>(lo + 192)));
  }
  for (; lo < hi; lo += 64) a0 = Simd::add(a0, Simd::load(reinterpret_cast<const float*>(lo)));
  return Simd::add(sink, Simd::add(Simd::add(a0, a1), Simd::add(a2, a3)));
}

// A prefetch cursor over chunk c's K and V lines, with `rate` still to set: one byte range
// when they are dense enough to stream as one (HND, CPU, dense new tokens), else one range
// per token (in `ranges`, for a RangedCursor only) when each token's K and V of this head lie
// together (NHD, whose rows interleave the other heads); false otherwise (nothing prefetched).
template <class KT, class Cur>
static inline bool chunk_cursor(const Chunk<KT>& c, int d, int dv, Cur* pf, PrefetchRanges* ranges, int64_t* lines) {
  constexpr int64_t es = sizeof(KT);
  const char* k_lo = reinterpret_cast<const char*>(c.k);
  const char* v_lo = reinterpret_cast<const char*>(c.v);
  const char* lo = std::min(k_lo, v_lo);
  const char* hi = std::max(k_lo + ((c.n - 1) * c.k_tok + (d - 1) * c.k_dim + 1) * es,
                            v_lo + ((c.n - 1) * c.v_tok + dv) * es);
  int64_t count = 1;
  if (hi - lo > 2 * static_cast<int64_t>(c.n) * (d + dv) * es) {
    if constexpr (!std::is_same_v<Cur, RangedCursor>) return false;
    if (c.k_dim != 1 || c.k_tok != c.v_tok) return false;
    hi = std::max(k_lo + d * es, v_lo + dv * es);
    if (hi - lo > 2 * static_cast<int64_t>(d + dv) * es) return false;
    count = c.n;
    *ranges = {lo, c.k_tok * es, hi - lo, count - 1};
    if constexpr (std::is_same_v<Cur, RangedCursor>) pf->more = ranges;
  }
  pf->next = reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(lo) & ~uintptr_t{63});
  pf->end = hi;
  *lines = count * ((hi - pf->next + 63) / 64);
  return true;
}

// Touches chunk c's K and V: one span when K and V rows are dense enough (HND, CPU, dense
// new tokens), else row by row (NHD, whose rows interleave the other heads).
template <class KT>
static inline vf touch_chunk(const KT* k, int64_t k_tok, int64_t k_dim, const KT* v, int64_t v_tok, int n, int d,
                             int dv, vf sink) {
  constexpr int64_t es = sizeof(KT);
  const char* k_lo = reinterpret_cast<const char*>(k);
  const char* k_hi = k_lo + ((n - 1) * k_tok + (d - 1) * k_dim + 1) * es;
  const char* v_lo = reinterpret_cast<const char*>(v);
  const char* v_hi = v_lo + ((n - 1) * v_tok + dv) * es;
  const char* lo = std::min(k_lo, v_lo);
  const char* hi = std::max(k_hi, v_hi);
  if (hi - lo <= 2 * static_cast<int64_t>(n) * (d + dv) * es) return touch_span(lo, hi, sink);
  if (k_dim == 1) {
    for (int t = 0; t < n; ++t) sink = touch_span(k_lo + t * k_tok * es, k_lo + (t * k_tok + d) * es, sink);
  } else {
    sink = touch_span(k_lo, k_hi, sink);
  }
  for (int t = 0; t < n; ++t) sink = touch_span(v_lo + t * v_tok * es, v_lo + (t * v_tok + dv) * es, sink);
  return sink;
}

// Rows and their KV source for one work item.
template <class KT>
struct RowJob {
  int rows, d, dv;
  const KVLayout* kv;
  int head;
  const int32_t* block_ids;  // this sequence's row of the block table
  int64_t prefix;            // positions [0, prefix) come from blocks
  const KT* new_k;           // positions >= prefix come from dense rows (prefill only)
  const KT* new_v;
  int64_t new_k_tok, new_v_tok;
  int64_t p_lo, p_hi;  // union of the rows' visible ranges
  bool bf16_dot = false;  // staged Q.K from Scratch::qb with dot_bf16, scores times qscale
  float qscale = 0.0f;
};

// ---- online softmax ------------------------------------------------------------------------

// Row scores s[0..n) (log2 units; s[n..round_up(n, W)) already -inf) -> probabilities, with the
// running max m, running sum l and the accumulator row rescaled.
static inline void softmax_row(float* s, int n, float& m, float& l, float* acc, int dv) {
  const int nv = (n + W - 1) / W * W;
  vf mx = Simd::set1(kNegInf);
  for (int i = 0; i < nv; i += W) mx = Simd::max(mx, Simd::load(s + i));
  const float cm = Simd::hmax(mx);
  if (cm == kNegInf) {  // nothing visible to this row in this chunk
    for (int i = 0; i < nv; i += W) Simd::store(s + i, Simd::zero());
    return;
  }
  const float mn = std::max(m, cm);
  // The running max often holds over a chunk: no exp2 call then (it was 1% of a prefill).
  const float corr = m == kNegInf ? 0.0f : (mn == m ? 1.0f : std::exp2(m - mn));
  const vf mnv = Simd::set1(mn);
  vf sum = Simd::zero();
  for (int i = 0; i < nv; i += W) {
    vf e = Simd::exp2(Simd::sub(Simd::load(s + i), mnv));
    Simd::store(s + i, e);
    sum = Simd::add(sum, e);
  }
  l = l * corr + Simd::hsum(sum);
  if (corr != 1.0f) {
    const vf cv = Simd::set1(corr);
    for (int i = 0; i < dv; i += W) Simd::store(acc + i, Simd::mul(Simd::load(acc + i), cv));
  }
  m = mn;
}

// ---- one work item -----------------------------------------------------------------------

template <class KT>
static inline Chunk<KT> make_chunk(const RowJob<KT>& job, int64_t p, int limit) {
  const KVLayout& kv = *job.kv;
  const int64_t bs = kv.block_size;
  Chunk<KT> c;
  c.pos = p;
  if (p < job.prefix) {
    const int64_t blk = p / bs, off = p % bs;
    c.n = static_cast<int>(std::min<int64_t>({bs - off, job.p_hi - p, job.prefix - p, limit}));
    const uint8_t* page =
        kv.base + static_cast<int64_t>(job.block_ids[blk]) * kv.block_stride_bytes + kv.page_offset_bytes;
    const KT* pg = reinterpret_cast<const KT*>(page);
    c.k = pg + kv.k_off + job.head * kv.k_head + off * kv.k_token;
    c.v = pg + kv.v_off + job.head * kv.v_head + off * kv.v_token;
    c.k_tok = kv.k_token;
    c.k_dim = kv.k_dim;
    c.v_tok = kv.v_token;
  } else {
    const int64_t t = p - job.prefix;
    c.n = static_cast<int>(std::min<int64_t>(job.p_hi - p, limit));
    c.k = job.new_k + t * job.new_k_tok;
    c.v = job.new_v + t * job.new_v_tok;
    c.k_tok = job.new_k_tok;
    c.k_dim = 1;
    c.v_tok = job.new_v_tok;
  }
  return c;
}

// Converts n elements to fp32.
template <class KT>
static inline void convert_row(const KT* src, float* dst, int n) {
  int i = 0;
  for (; i + W <= n; i += W) Simd::store(dst + i, Simd::load_cvt(src + i));
  for (; i < n; ++i) dst[i] = to_f32(src[i]);
}

// Chunk c's V rows as fp32 in vbuf (fp32 V rows are read in place) into f.
template <class KT>
static Chunk<float> stage_v(const Chunk<KT>& c, int dv, float* vbuf, Chunk<float> f) {
  if constexpr (std::is_same_v<KT, float>) {
    f.v = c.v;
    f.v_tok = c.v_tok;
  } else {
    for (int t = 0; t < c.n; ++t) convert_row(c.v + t * c.v_tok, vbuf + static_cast<size_t>(t) * dv, dv);
  }
  return f;
}

// For many rows (prefill): chunk c as fp32 K^T (rows of kChunk floats) and V rows, so the
// Q.K tiles broadcast Q over token vectors (no horizontal sums) and nothing is converted
// again for each row tile. k_pairs: K as bf16 pair rows instead (attn_bf16dot.h).
template <class KT>
static Chunk<float> stage_chunk(const Chunk<KT>& c, int d, int dv, float* kbuf, float* vbuf, bool k_pairs) {
  Chunk<float> f;
  f.n = c.n;
  f.pos = c.pos;
  f.k = kbuf;
  f.k_tok = 1;
  f.k_dim = kChunk;
  f.v = vbuf;
  f.v_tok = dv;
  const int n = c.n;
  if constexpr (std::is_same_v<KT, float>) {
    if (c.k_tok == 1 && c.k_dim != 1) {  // fp32 K^T (the CPU page format): read in place, no copy
      f.k = c.k;
      f.k_dim = c.k_dim;
      f.v = c.v;
      f.v_tok = c.v_tok;
      return f;
    }
  }
  if (k_pairs) {
    stage_k_pairs(c, d, kbuf);
    return stage_v(c, dv, vbuf, f);
  }
  int t0 = 0;
  if (c.k_tok == 1) {
    for (int i = 0; i < d; ++i) convert_row(c.k + i * c.k_dim, kbuf + static_cast<size_t>(i) * kChunk, n);
    t0 = n;
  } else if constexpr (W == 8) {
    if (c.k_dim == 1) {
      for (; t0 + 8 <= n; t0 += 8)
        for (int i = 0; i < d; i += 8) {
          vf rows8[8];
          for (int j = 0; j < 8; ++j) rows8[j] = Simd::load_cvt(c.k + (t0 + j) * c.k_tok + i);
          Simd::transpose8_store(rows8, kbuf + static_cast<size_t>(i) * kChunk + t0, kChunk);
        }
    }
  } else if constexpr (W == 16) {  // AVX-512: 16x16 transposes (head sizes are multiples of 16)
    if (c.k_dim == 1) {
      for (; t0 + 16 <= n; t0 += 16)
        for (int i = 0; i < d; i += 16) {
          vf rows16[16];
          for (int j = 0; j < 16; ++j) rows16[j] = Simd::load_cvt(c.k + (t0 + j) * c.k_tok + i);
          Simd::transpose16_store(rows16, kbuf + static_cast<size_t>(i) * kChunk + t0, kChunk);
        }
    }
  }
  for (int t = t0; t < n; ++t)
    for (int i = 0; i < d; ++i) kbuf[static_cast<size_t>(i) * kChunk + t] = to_f32(c.k[t * c.k_tok + i * c.k_dim]);
  return stage_v(c, dv, vbuf, f);
}

// Cur: RangedCursor where the next chunk's lines are one range per token (decode over NHD
// pages), else PrefetchCursor.
template <class KT, int DC, class Cur = PrefetchCursor>
static void attend(const RowJob<KT>& job, Scratch& sc) {
  const int rows = job.rows, d = job.d, dv = job.dv;
  std::fill(sc.acc.begin(), sc.acc.begin() + static_cast<size_t>(rows) * dv, 0.0f);
  std::fill(sc.m.begin(), sc.m.begin() + rows, kNegInf);
  std::fill(sc.l.begin(), sc.l.begin() + rows, 0.0f);
  float* s = sc.s.data();
  // Many rows (prefill) go through fp32 staging, few (decode) read K in place.
  const bool staged = rows > kMaxInPlaceRows;
  const int limit = staged ? kChunk : kInPlaceChunk;
  if constexpr (kPairs<KT>) {  // Q in pair order for qk_bf16_pairs (the in-place path only)
    for (int r = 0; !staged && r < rows; ++r) {
      const float* q = sc.q.data() + static_cast<size_t>(r) * d;
      float* qp = sc.qp.data() + static_cast<size_t>(r) * d;
      for (int g0 = 0; g0 < d; g0 += 2 * W)
        for (int j = 0; j < W; ++j) {
          qp[g0 + j] = q[g0 + 2 * j];
          qp[g0 + W + j] = q[g0 + 2 * j + 1];
        }
    }
  }
  vf sink = Simd::zero();
  int64_t p = job.p_lo;
  bool prefetched = false;  // this chunk's lines were prefetched during the previous one
  while (p < job.p_hi) {
    const Chunk<KT> c = make_chunk(job, p, limit);
    const int n = c.n;
    const int nv = (n + W - 1) / W * W;
    if (!prefetched) sink = touch_chunk(c.k, c.k_tok, c.k_dim, c.v, c.v_tok, n, d, dv, sink);
    Cur pf;
    PrefetchRanges ranges;  // pf's further ranges, if any: live until the chunk is done
    prefetched = false;
    if (p + n < job.p_hi) {
      const Chunk<KT> next = make_chunk(job, p + n, limit);
      int64_t lines = 0;
      if (chunk_cursor(next, d, dv, &pf, &ranges, &lines)) {
        // Units of work in this chunk (see PrefetchCursor): per token, one per W-lane vector
        // of V and row tile (P.V) and one per W-lane vector of K (in-place Q.K, either K layout).
        const int row_tiles = staged ? (rows + kRowTile - 1) / kRowTile : 1;
        int64_t units = static_cast<int64_t>(dv / W) * row_tiles * n;
        if (!staged) units += static_cast<int64_t>(n) * d / W;
        pf.rate = static_cast<uint32_t>((lines * 65536 + units - 1) / units);
        prefetched = true;
      }
    }
    Chunk<float> f{};
    if (staged) {
      f = stage_chunk(c, d, dv, sc.kbuf.data(), sc.vbuf.data(), job.bf16_dot);
      if (job.bf16_dot)
        chunk_scores_pairs<DC>(sc.qb.data(), rows, d, sc.kbuf.data(), n, job.qscale, s);
      else
        chunk_scores<float, DC>(sc.q.data(), nullptr, rows, d, f, s, nullptr, pf);
    } else {
      chunk_scores<KT, DC>(sc.q.data(), sc.qp.data(), rows, d, c, s, sc.raw, pf);
    }
    for (int r = 0; r < rows; ++r) {
      float* sr = s + r * kSStride;
      for (int t = n; t < nv; ++t) sr[t] = kNegInf;
      const int64_t lo = sc.lo[r], hi = sc.hi[r];
      if (p < lo || p + n > hi) {
        for (int t = 0; t < n; ++t)
          if (p + t < lo || p + t >= hi) sr[t] = kNegInf;
      }
      softmax_row(sr, n, sc.m[r], sc.l[r], sc.acc.data() + static_cast<size_t>(r) * dv, dv);
    }
    if (staged)
      chunk_pv<float>(s, rows, f, sc.acc.data(), dv, pf);
    else
      chunk_pv<KT>(s, rows, c, sc.acc.data(), dv, pf);
    p += n;
  }
  sc.sink = Simd::hsum(sink);  // keeps the touch loads alive
}

// Loads one row of Q (any dtype and strides) as fp32, pre-scaled into log2 units. Rows with
// dim stride 1 (the usual case) convert W lanes at a time: the per-element dtype switch cost
// 4% of a 4K-token fp32 prefill (perf).
template <class T>
static inline void load_q_vec(const T* src, int d, float scale, float* dst) {
  const vf sv = Simd::set1(scale);
  int i = 0;
  for (; i + W <= d; i += W) Simd::store(dst + i, Simd::mul(Simd::load_cvt(src + i), sv));
  for (; i < d; ++i) dst[i] = to_f32(src[i]) * scale;
}

static inline void load_q_row(const Strided3& q, int64_t row, int64_t head, int d, float scale, float* dst) {
  const int64_t base = row * q.s0 + head * q.s1;
  if (q.s2 == 1) {
    switch (q.dtype) {
      case DType::kFloat32:
        return load_q_vec(static_cast<const float*>(q.data) + base, d, scale, dst);
      case DType::kBFloat16:
        return load_q_vec(static_cast<const bf16_t*>(q.data) + base, d, scale, dst);
      default:
        return load_q_vec(static_cast<const fp16_t*>(q.data) + base, d, scale, dst);
    }
  }
  for (int i = 0; i < d; ++i) dst[i] = load_any(q.data, q.dtype, base + i * q.s2) * scale;
}

static inline void store_out_row(const MutStrided3& o, int64_t row, int64_t head, int dv, const float* acc,
                                 float l) {
  const int64_t base = row * o.s0 + head * o.s1;
  const float inv = l > 0.0f ? 1.0f / l : 0.0f;
  int i = 0;
  if (o.s2 == 1 && o.dtype == DType::kFloat32) {  // fp32 rows: W lanes at a time
    float* dst = static_cast<float*>(o.data) + base;
    const vf iv = Simd::set1(inv);
    for (; i + W <= dv; i += W) Simd::store(dst + i, Simd::mul(Simd::load(acc + i), iv));
  }
  for (; i < dv; ++i) store_any(o.data, o.dtype, base + i * o.s2, acc[i] * inv);
}

}  // namespace KVO_ISA
}  // namespace cpu_attn
}  // namespace kv_offload
