// SPDX-License-Identifier: Apache-2.0
// The kernels' entry points for one ISA: decode and prefill work items (each filling a RowJob
// and running attend() from attn_impl.h), the split-decode reduction, the dispatch over KV
// dtype and head size, and the KernelTable that dispatch.cpp picks at run time. Include this
// from an attn_<isa>.cpp after defining KVO_ISA and KVO_ISA_NAME and including its simd_<isa>.h.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "kernels/attn_impl.h"

namespace kv_offload {
namespace cpu_attn {
namespace KVO_ISA {

// ---- decode ----------------------------------------------------------------------------------

template <class KT, int DC>
static void decode_items(const DecodeParams& p, int64_t begin, int64_t end) {
  const KVLayout& kv = p.kv;
  const int hkv = kv.num_kv_heads, g = p.num_q_heads / hkv, d = kv.head_size, dv = kv.head_size_v;
  const int splits = p.num_splits;
  const int64_t bs = kv.block_size;
  Scratch& sc = scratch();
  sc.ensure(g, d, dv);
  const float qscale = p.scale * kLog2e;
  // NHD pages (each token row holds every head's K and V): the next chunk is prefetched as
  // one range per token (see RangedCursor); before, such chunks were not prefetched at all.
  const bool ranged = kv.num_kv_heads > 1 && kv.k_dim == 1 && kv.k_head < kv.k_token;
  for (int64_t item = begin; item < end; ++item) {
    const int split = static_cast<int>(item % splits);
    const int h = static_cast<int>((item / splits) % hkv);
    const int64_t b = item / splits / hkv;
    const int64_t ctx = p.context_lens[b];
    const int64_t lo = p.window > 0 ? std::max<int64_t>(0, ctx - p.window) : 0;
    const int64_t first = lo / bs, nblk = (ctx + bs - 1) / bs - first;
    const int64_t sb = first + nblk * split / splits, se = first + nblk * (split + 1) / splits;
    RowJob<KT> job;
    job.rows = g;
    job.d = d;
    job.dv = dv;
    job.kv = &kv;
    job.head = h;
    job.block_ids = p.block_table + b * p.bt_stride;
    job.prefix = ctx;
    job.new_k = job.new_v = nullptr;
    job.new_k_tok = job.new_v_tok = 0;
    job.p_lo = std::max(lo, sb * bs);
    job.p_hi = std::min(ctx, se * bs);
    for (int r = 0; r < g; ++r) {
      sc.lo[r] = lo;
      sc.hi[r] = ctx;
      load_q_row(p.query, b, static_cast<int64_t>(h) * g + r, d, qscale, sc.q.data() + static_cast<size_t>(r) * d);
    }
    if (ranged)
      attend<KT, DC, RangedCursor>(job, sc);
    else
      attend<KT, DC>(job, sc);
    if (splits == 1) {
      for (int r = 0; r < g; ++r)
        store_out_row(p.out, b, static_cast<int64_t>(h) * g + r, dv, sc.acc.data() + static_cast<size_t>(r) * dv,
                      sc.l[r]);
    } else {
      float* ws = p.workspace + static_cast<size_t>(item) * g * (dv + 2);
      for (int r = 0; r < g; ++r) {
        float* w = ws + static_cast<size_t>(r) * (dv + 2);
        std::copy(sc.acc.data() + static_cast<size_t>(r) * dv, sc.acc.data() + static_cast<size_t>(r + 1) * dv, w);
        w[dv] = sc.m[r];
        w[dv + 1] = sc.l[r];
      }
    }
  }
}

static void decode_reduce(const DecodeParams& p, int64_t begin, int64_t end) {
  const int hkv = p.kv.num_kv_heads, g = p.num_q_heads / hkv, dv = p.kv.head_size_v;
  const int splits = p.num_splits;
  std::vector<float> acc(dv);
  for (int64_t bh = begin; bh < end; ++bh) {
    const int64_t b = bh / hkv;
    const int h = static_cast<int>(bh % hkv);
    for (int r = 0; r < g; ++r) {
      float mx = kNegInf;
      for (int s = 0; s < splits; ++s) {
        const float* w = p.workspace + ((static_cast<size_t>(bh) * splits + s) * g + r) * (dv + 2);
        mx = std::max(mx, w[dv]);
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      float l = 0.0f;
      if (mx != kNegInf) {
        for (int s = 0; s < splits; ++s) {
          const float* w = p.workspace + ((static_cast<size_t>(bh) * splits + s) * g + r) * (dv + 2);
          if (w[dv] == kNegInf) continue;
          const float f = std::exp2(w[dv] - mx);
          l += w[dv + 1] * f;
          const vf fv = Simd::set1(f);
          for (int i = 0; i < dv; i += W)
            Simd::store(acc.data() + i, Simd::fma(fv, Simd::load(w + i), Simd::load(acc.data() + i)));
        }
      }
      store_out_row(p.out, b, static_cast<int64_t>(h) * g + r, dv, acc.data(), l);
    }
  }
}

// ---- prefill ---------------------------------------------------------------------------------

template <class KT, int DC>
static void prefill_items(const PrefillParams& p, int64_t begin, int64_t end) {
  const KVLayout& kv = p.kv;
  const int hkv = kv.num_kv_heads, g = p.num_q_heads / hkv, d = kv.head_size, dv = kv.head_size_v;
  Scratch& sc = scratch();
  sc.ensure(p.tokens_per_item * g, d, dv);
  const float qscale = p.scale * kLog2e;
  for (int64_t item = begin; item < end; ++item) {
    const int h = static_cast<int>(item % hkv);
    const int64_t i = item / hkv;
    const int64_t b = p.item_seq[i], tok0 = p.item_tok[i];
    const int64_t row0 = p.query_start_loc[b];
    const int64_t n_new = p.query_start_loc[b + 1] - row0;
    const int m = static_cast<int>(std::min<int64_t>(p.tokens_per_item, n_new - tok0));
    if (m <= 0) continue;
    const int64_t prefix = p.prefix_lens[b];
    RowJob<KT> job;
    job.rows = m * g;
    job.d = d;
    job.dv = dv;
    job.kv = &kv;
    job.head = h;
    job.block_ids = p.block_table + b * p.bt_stride;
    job.prefix = p.new_in_cache ? prefix + n_new : prefix;
    job.new_k = static_cast<const KT*>(p.key.data) + row0 * p.key.s0 + h * p.key.s1;
    job.new_v = static_cast<const KT*>(p.value.data) + row0 * p.value.s0 + h * p.value.s1;
    job.new_k_tok = p.key.s0;
    job.new_v_tok = p.value.s0;
    // bf16 Q and K, many rows (the staged path): Q.K as bf16 dot products (attn_bf16dot.h).
    job.bf16_dot = kBf16Dot<KT> && p.query.dtype == DType::kBFloat16 && job.rows > kMaxInPlaceRows;
    job.qscale = qscale;
    int64_t p_lo = std::numeric_limits<int64_t>::max(), p_hi = 0;
    for (int t = 0; t < m; ++t) {
      const int64_t hi = prefix + tok0 + t + 1;
      const int64_t lo = p.window > 0 ? std::max<int64_t>(0, hi - p.window) : 0;
      p_lo = std::min(p_lo, lo);
      p_hi = std::max(p_hi, hi);
      for (int r = 0; r < g; ++r) {
        const int row = t * g + r;
        sc.lo[row] = lo;
        sc.hi[row] = hi;
        if (job.bf16_dot)
          load_q_pairs(p.query, row0 + tok0 + t, static_cast<int64_t>(h) * g + r, d,
                       sc.qb.data() + static_cast<size_t>(row) * d / 2);
        else
          load_q_row(p.query, row0 + tok0 + t, static_cast<int64_t>(h) * g + r, d, qscale,
                     sc.q.data() + static_cast<size_t>(row) * d);
      }
    }
    job.p_lo = p_lo;
    job.p_hi = p_hi;
    attend<KT, DC>(job, sc);
    for (int t = 0; t < m; ++t)
      for (int r = 0; r < g; ++r) {
        const int row = t * g + r;
        store_out_row(p.out, row0 + tok0 + t, static_cast<int64_t>(h) * g + r, dv,
                      sc.acc.data() + static_cast<size_t>(row) * dv, sc.l[row]);
      }
  }
}

// ---- dispatch over KV dtype and head size -----------------------------------------------------

template <template <class, int> class F, class KT, class... Args>
static void by_head(int d, Args&&... args) {
  if (d == 64) F<KT, 64>::run(args...);
  else if (d == 128) F<KT, 128>::run(args...);
  else if (d == 256) F<KT, 256>::run(args...);
  else F<KT, 0>::run(args...);
}

template <template <class, int> class F, class... Args>
static void by_dtype_and_head(DType dt, int d, Args&&... args) {
  switch (dt) {
    case DType::kFloat32: by_head<F, float>(d, args...); break;
    case DType::kBFloat16: by_head<F, bf16_t>(d, args...); break;
    default: by_head<F, fp16_t>(d, args...); break;
  }
}

template <class KT, int DC>
struct DecodeF {
  static void run(const DecodeParams& p, int64_t b, int64_t e) { decode_items<KT, DC>(p, b, e); }
};
template <class KT, int DC>
struct PrefillF {
  static void run(const PrefillParams& p, int64_t b, int64_t e) { prefill_items<KT, DC>(p, b, e); }
};

static void decode_entry(const DecodeParams& p, int64_t begin, int64_t end) {
  by_dtype_and_head<DecodeF>(p.kv_dtype, p.kv.head_size, p, begin, end);
}

static void prefill_entry(const PrefillParams& p, int64_t begin, int64_t end) {
  by_dtype_and_head<PrefillF>(p.kv_dtype, p.kv.head_size, p, begin, end);
}

static double read_sum(const float* data, int64_t n) {
  vf a[8];
  for (auto& x : a) x = Simd::zero();
  int64_t i = 0;
  for (; i + 8 * W <= n; i += 8 * W)
    for (int j = 0; j < 8; ++j) a[j] = Simd::add(a[j], Simd::load(data + i + j * W));
  double total = 0.0;
  for (auto& x : a) total += Simd::hsum(x);
  for (; i < n; ++i) total += data[i];
  return total;
}

static const KernelTable kTable = {KVO_ISA_NAME, &decode_entry, &decode_reduce, &prefill_entry, &read_sum};

}  // namespace KVO_ISA
}  // namespace cpu_attn
}  // namespace kv_offload
