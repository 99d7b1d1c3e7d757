// SPDX-License-Identifier: Apache-2.0
// Torch bindings of the CPU attention kernels (csrc/kernels): argument checks, the run-time
// ISA choice, and threading with at::parallel_for. The kernels themselves see only raw
// pointers and strides.
//
// Ops (namespace kv_offload; outputs are marked written in the schema):
//   paged_decode_attention(out!, query, kv_cache, block_table, context_lens, kv_layout, ...)
//   paged_prefill_attention(out!, query, key, value, query_start_loc, kv_cache, block_table,
//                           prefix_lens, kv_layout, ...)
//   cpu_attention_isas() -> str[]          paths usable on this CPU, in preference order
//   cpu_attention_auto_isa() -> str        the path "auto" takes here (see dispatch.cpp)
//   cpu_attention_bf16_dot_rate() -> float vdpbf16ps products/s over FMA products/s (0: none)
//   read_bandwidth_probe(buf, isa) -> float  sum of a float buffer (a read-bandwidth probe)
//   pin_intraop_threads(cpus) -> int         pin torch's intra-op threads to these CPUs
// new_kv_in_cache=True (prefill): the caller wrote this step's K/V into the blocks before the call
// (vLLM does, in do_kv_cache_update), so the new tokens are read from the pages like the prefix
// (in the CPU page format K is already dim-major: no per-item transposes of the dense key).
// check_ids=False skips the per-call check that every block id read lies in the cache: only for
// callers that validated the block table already (the vLLM backend does it once per step, not
// once per layer).
// kv_layout is the int list built by kv_offload.attention (see _layout_list there):
//   [page_offset_bytes, num_kv_heads, block_size, head_size, head_size_v,
//    k_off, k_head, k_token, k_dim, v_off, v_head, v_token, v_dim]
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#ifdef __linux__
#include <sched.h>
#endif

#include "kernels/cpu_attn.h"

namespace kv_offload {
namespace {

using cpu_attn::DType;
using cpu_attn::KernelTable;
using cpu_attn::KVLayout;

DType to_kernel_dtype(at::ScalarType t, const char* what) {
  switch (t) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kHalf:
      return DType::kFloat16;
    default:
      TORCH_CHECK(false, what, " has dtype ", t, "; expected float32, bfloat16 or float16");
  }
}

const KernelTable* kernels_for(const std::string& isa) {
  const char* error = nullptr;
  const KernelTable* table = cpu_attn::select_kernels(isa.c_str(), &error);
  TORCH_CHECK(table != nullptr, "CPU attention ISA path '", isa, "': ", error);
  return table;
}

cpu_attn::Strided3 strided3(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.dim() == 3, what, " must be 3-D, got shape ", t.sizes());
  return {t.data_ptr(), to_kernel_dtype(t.scalar_type(), what), t.stride(0), t.stride(1), t.stride(2)};
}

// Bounds on what one call may ask for: beyond them the per-thread scratch (rows x head size
// floats, indexed with int) or the split workspace would overflow or exhaust memory. Real
// models stay far below (head sizes <= 1024, GQA groups <= 128, splits <= 64).
constexpr int64_t kMaxHeadSize = 8192;
constexpr int64_t kMaxGroup = 1024;       // query heads per KV head
constexpr int64_t kMaxSplits = 1024;      // must match kv_offload.attention._ops.MAX_SPLITS
constexpr int64_t kInt32Max = 2147483647;

// a * b and a + b, or a clear error naming `what` where int64 would wrap.
int64_t mul_checked(int64_t a, int64_t b, const char* what) {
  int64_t r = 0;
  TORCH_CHECK(!__builtin_mul_overflow(a, b, &r), what, " overflows int64 (", a, " * ", b, ")");
  return r;
}

int64_t add_checked(int64_t a, int64_t b, const char* what) {
  int64_t r = 0;
  TORCH_CHECK(!__builtin_add_overflow(a, b, &r), what, " overflows int64 (", a, " + ", b, ")");
  return r;
}

// Offset of the last element a page's K (or V) touches: off + (H-1) * head + (N-1) * token +
// (D-1) * dim, computed without wrapping.
int64_t last_element(int64_t off, int64_t heads, int64_t head, int64_t tokens, int64_t token, int64_t dims,
                     int64_t dim, const char* what) {
  int64_t last = add_checked(off, mul_checked(heads - 1, head, what), what);
  last = add_checked(last, mul_checked(tokens - 1, token, what), what);
  return add_checked(last, mul_checked(dims - 1, dim, what), what);
}

constexpr const char* kLayoutNames[13] = {"page_offset_bytes", "num_kv_heads", "block_size", "head_size",
                                          "head_size_v",       "k_off",        "k_head",     "k_token",
                                          "k_dim",             "v_off",        "v_head",     "v_token",
                                          "v_dim"};

KVLayout make_layout(const at::Tensor& kv_cache, at::IntArrayRef l, int64_t elem_size) {
  TORCH_CHECK(l.size() == 13, "kv_layout must have 13 entries, got ", l.size());
  TORCH_CHECK(kv_cache.is_cpu() && kv_cache.layout() == at::kStrided, "kv_cache must be a strided CPU tensor");
  TORCH_CHECK(kv_cache.scalar_type() == at::kByte && kv_cache.dim() == 2 && kv_cache.stride(1) == 1,
              "kv_cache must be uint8 [num_blocks, block_bytes] with contiguous rows, got ",
              kv_cache.scalar_type(), " ", kv_cache.sizes(), " strides ", kv_cache.strides());
  // Range checks on the int64 values, before any is narrowed to the kernels' int32 fields.
  for (size_t i = 0; i < 13; ++i)
    TORCH_CHECK(l[i] >= 0, "kv_layout ", kLayoutNames[i], " (entry ", i, ") must be >= 0, got ", l[i]);
  TORCH_CHECK(l[1] >= 1 && l[1] <= kInt32Max, "kv_layout num_kv_heads must be in [1, 2^31), got ", l[1]);
  TORCH_CHECK(l[2] >= 1 && l[2] <= kInt32Max, "kv_layout block_size must be in [1, 2^31), got ", l[2]);
  TORCH_CHECK(l[3] > 0 && l[3] % 16 == 0 && l[3] <= kMaxHeadSize, "head size ", l[3],
              " is not supported: it must be a positive multiple of 16 up to ", kMaxHeadSize);
  TORCH_CHECK(l[4] > 0 && l[4] % 16 == 0 && l[4] <= kMaxHeadSize, "V head size ", l[4],
              " is not supported: it must be a positive multiple of 16 up to ", kMaxHeadSize);
  TORCH_CHECK(l[12] == 1, "kv_layout: V must have dim stride 1, got ", l[12]);
  KVLayout kv{};
  kv.base = kv_cache.data_ptr<uint8_t>();
  kv.num_blocks = kv_cache.size(0);
  kv.block_stride_bytes = kv_cache.size(0) > 1 ? kv_cache.stride(0) : kv_cache.size(1);
  kv.page_offset_bytes = l[0];
  kv.num_kv_heads = static_cast<int32_t>(l[1]);
  kv.block_size = static_cast<int32_t>(l[2]);
  kv.head_size = static_cast<int32_t>(l[3]);
  kv.head_size_v = static_cast<int32_t>(l[4]);
  kv.k_off = l[5], kv.k_head = l[6], kv.k_token = l[7], kv.k_dim = l[8];
  kv.v_off = l[9], kv.v_head = l[10], kv.v_token = l[11], kv.v_dim = l[12];
  // Last element either of K or V touches, so no valid block id can read past its block.
  const int64_t k_last = last_element(kv.k_off, kv.num_kv_heads, kv.k_head, kv.block_size, kv.k_token,
                                      kv.head_size, kv.k_dim, "kv_layout K extent");
  const int64_t v_last = last_element(kv.v_off, kv.num_kv_heads, kv.v_head, kv.block_size, kv.v_token,
                                      kv.head_size_v, 1, "kv_layout V extent");
  const int64_t bytes = mul_checked(add_checked(std::max(k_last, v_last), 1, "kv_layout extent"), elem_size,
                                    "kv_layout extent in bytes");
  const int64_t need = add_checked(kv.page_offset_bytes, bytes, "kv_layout page_offset_bytes + extent");
  TORCH_CHECK(need <= kv_cache.size(1), "kv_layout reads ", need, " bytes of each block but kv_cache blocks have ",
              kv_cache.size(1), " (wrong layer, geometry or cache?)");
  TORCH_CHECK(kv.page_offset_bytes % elem_size == 0 && kv.block_stride_bytes % elem_size == 0 &&
                  reinterpret_cast<uintptr_t>(kv.base) % elem_size == 0,
              "kv_cache blocks and page offset must be aligned to the KV element size");
  return kv;
}

void check_int32_1d(const at::Tensor& t, int64_t n, const char* what) {
  TORCH_CHECK(t.is_cpu() && t.scalar_type() == at::kInt && t.dim() == 1 && t.size(0) == n && t.is_contiguous(),
              what, " must be a contiguous int32 CPU tensor of shape [", n, "], got ", t.scalar_type(), " ",
              t.sizes());
}

// Every block id a sequence of `len` cached tokens uses must name a block of the cache.
void check_block_ids(const at::Tensor& block_table, const int32_t* lens, int64_t num_seqs, const KVLayout& kv) {
  const int32_t* bt = block_table.data_ptr<int32_t>();
  const int64_t stride = block_table.stride(0), cols = block_table.size(1);
  for (int64_t b = 0; b < num_seqs; ++b) {
    TORCH_CHECK(lens[b] >= 0, "sequence ", b, " has negative length ", lens[b]);
    const int64_t nb = (static_cast<int64_t>(lens[b]) + kv.block_size - 1) / kv.block_size;
    TORCH_CHECK(nb <= cols, "sequence ", b, " needs ", nb, " blocks for ", lens[b], " tokens but block_table has ",
                cols, " columns");
    for (int64_t j = 0; j < nb; ++j) {
      const int32_t id = bt[b * stride + j];
      TORCH_CHECK(id >= 0 && id < kv.num_blocks, "block id ", id, " (sequence ", b, ", block ", j,
                  ") out of range [0, ", kv.num_blocks, ")");
    }
  }
}

void check_block_table(const at::Tensor& block_table, int64_t num_seqs) {
  TORCH_CHECK(block_table.is_cpu() && block_table.scalar_type() == at::kInt && block_table.dim() == 2 &&
                  block_table.size(0) == num_seqs && (block_table.size(1) <= 1 || block_table.stride(1) == 1),
              "block_table must be int32 [num_seqs=", num_seqs, ", max_blocks] with contiguous rows, got ",
              block_table.scalar_type(), " ", block_table.sizes());
}

// Query and out of either op: [rows, num_q_heads, D] and [rows, num_q_heads, Dv], num_q_heads a
// multiple of num_kv_heads. Returns the GQA group size G (query heads per KV head).
int64_t check_query_out(const at::Tensor& query, const at::Tensor& out, const KVLayout& kv, const char* rows) {
  const int64_t hq = query.size(1);
  TORCH_CHECK(hq <= kInt32Max, "num_q_heads ", hq, " does not fit int32");
  TORCH_CHECK(query.size(2) == kv.head_size, "query head size ", query.size(2), " != KV head size ", kv.head_size);
  TORCH_CHECK(hq % kv.num_kv_heads == 0, "num_q_heads ", hq, " is not a multiple of num_kv_heads ",
              kv.num_kv_heads);
  TORCH_CHECK(hq / kv.num_kv_heads <= kMaxGroup, "num_q_heads / num_kv_heads = ", hq / kv.num_kv_heads,
              " query heads per KV head is more than the supported ", kMaxGroup);
  TORCH_CHECK(out.dim() == 3 && out.size(0) == query.size(0) && out.size(1) == hq && out.size(2) == kv.head_size_v,
              "out must be [", rows, "=", query.size(0), ", ", hq, ", ", kv.head_size_v, "], got ", out.sizes());
  return hq / kv.num_kv_heads;
}

// The softmax scale as the kernels' float: finite, and within float32's range.
float checked_scale(double scale) {
  TORCH_CHECK(std::fabs(scale) <= static_cast<double>(std::numeric_limits<float>::max()),
              "scale must be a finite float32 value, got ", scale);
  return static_cast<float>(scale);
}

// Runs fn(i) for i in [0, n) on torch's intra-op threads, handing out items one at a time
// (ragged sequences make static partitions uneven).
template <class F>
void run_items(int64_t n, const F& fn) {
  if (n <= 0) return;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(i);
  });
}

void paged_decode_attention(const at::Tensor& out, const at::Tensor& query, const at::Tensor& kv_cache,
                            const at::Tensor& block_table, const at::Tensor& context_lens,
                            at::IntArrayRef kv_layout, at::ScalarType kv_dtype, double scale, int64_t window,
                            int64_t num_splits, c10::string_view isa, bool check_ids) {
  TORCH_CHECK(query.is_cpu() && out.is_cpu() && query.layout() == at::kStrided && out.layout() == at::kStrided,
              "query and out must be strided CPU tensors");
  TORCH_CHECK(query.dim() == 3, "query must be [num_seqs, num_q_heads, head_size], got ", query.sizes());
  TORCH_CHECK(out.scalar_type() == query.scalar_type(), "out dtype ", out.scalar_type(), " != query dtype ",
              query.scalar_type());
  const DType kdt = to_kernel_dtype(kv_dtype, "kv_dtype");
  const int64_t esize = c10::elementSize(kv_dtype);
  const KVLayout kv = make_layout(kv_cache, kv_layout, esize);
  const int64_t num_seqs = query.size(0), hq = query.size(1);
  const int64_t g = check_query_out(query, out, kv, "num_seqs");
  check_int32_1d(context_lens, num_seqs, "context_lens");
  check_block_table(block_table, num_seqs);
  TORCH_CHECK(window >= 0, "window must be >= 0 (0: no sliding window), got ", window);
  TORCH_CHECK(num_splits >= 0 && num_splits <= kMaxSplits, "num_splits must be in [0, ", kMaxSplits,
              "] (0: automatic), got ", num_splits);
  const float fscale = checked_scale(scale);
  const KernelTable* table = kernels_for(std::string(isa));
  if (num_seqs == 0 || g == 0) return;  // nothing to compute (g == 0: no query heads)
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  if (check_ids) check_block_ids(block_table, lens, num_seqs, kv);

  const int64_t work = mul_checked(num_seqs, kv.num_kv_heads, "num_seqs * num_kv_heads");
  const int64_t max_ctx = *std::max_element(lens, lens + num_seqs);
  const int64_t max_blocks = (max_ctx + kv.block_size - 1) / kv.block_size;
  int64_t splits = num_splits;
  if (splits == 0) {  // split long contexts until every thread has about two items
    const int64_t want = (2 * at::get_num_threads() + work - 1) / work;
    splits = std::min<int64_t>({want, max_ctx / 512, 64});
  }
  // Splits past a sequence's block count would be empty: more than the longest needs is waste.
  splits = std::max<int64_t>(1, std::min(splits, max_blocks));
  at::Tensor workspace;
  cpu_attn::DecodeParams p{};
  p.query = strided3(query, "query");
  p.out = {out.data_ptr(), p.query.dtype, out.stride(0), out.stride(1), out.stride(2)};
  p.kv = kv;
  p.kv_dtype = kdt;
  p.block_table = block_table.data_ptr<int32_t>();
  p.bt_stride = block_table.size(0) > 1 ? block_table.stride(0) : block_table.size(1);
  p.context_lens = lens;
  p.num_seqs = num_seqs;
  p.num_q_heads = static_cast<int32_t>(hq);
  p.scale = fscale;
  p.window = window;
  p.num_splits = static_cast<int32_t>(splits);
  const int64_t items = mul_checked(work, splits, "decode work items (num_seqs * num_kv_heads * num_splits)");
  if (splits > 1) {
    const int64_t per_item = mul_checked(g, kv.head_size_v + 2, "decode workspace row");
    workspace = at::empty({mul_checked(items, per_item, "decode workspace size")}, at::kFloat);
    p.workspace = workspace.data_ptr<float>();
  }
  run_items(items, [&](int64_t i) { table->decode(p, i, i + 1); });
  if (splits > 1) run_items(work, [&](int64_t i) { table->decode_reduce(p, i, i + 1); });
}

void paged_prefill_attention(const at::Tensor& out, const at::Tensor& query, const at::Tensor& key,
                             const at::Tensor& value, const at::Tensor& query_start_loc,
                             const at::Tensor& kv_cache, const at::Tensor& block_table,
                             const at::Tensor& prefix_lens, at::IntArrayRef kv_layout, at::ScalarType kv_dtype,
                             double scale, int64_t window, c10::string_view isa, bool check_ids,
                             bool new_kv_in_cache) {
  for (const at::Tensor* t : {&query, &out, &key, &value})
    TORCH_CHECK(t->is_cpu() && t->layout() == at::kStrided, "query, key, value and out must be strided CPU tensors");
  TORCH_CHECK(query.dim() == 3, "query must be [num_tokens, num_q_heads, head_size], got ", query.sizes());
  TORCH_CHECK(out.scalar_type() == query.scalar_type(), "out dtype ", out.scalar_type(), " != query dtype ",
              query.scalar_type());
  const DType kdt = to_kernel_dtype(kv_dtype, "kv_dtype");
  const int64_t esize = c10::elementSize(kv_dtype);
  const KVLayout kv = make_layout(kv_cache, kv_layout, esize);
  const int64_t tokens = query.size(0), hq = query.size(1);
  const int64_t g = check_query_out(query, out, kv, "num_tokens");
  TORCH_CHECK(key.dim() == 3 && key.size(0) == tokens && key.size(1) == kv.num_kv_heads &&
                  key.size(2) == kv.head_size && (key.stride(2) == 1 || key.numel() == 0),
              "key must be [", tokens, ", ", kv.num_kv_heads, ", ", kv.head_size, "] with dim stride 1, got ",
              key.sizes(), " strides ", key.strides());
  TORCH_CHECK(value.dim() == 3 && value.size(0) == tokens && value.size(1) == kv.num_kv_heads &&
                  value.size(2) == kv.head_size_v && (value.stride(2) == 1 || value.numel() == 0),
              "value must be [", tokens, ", ", kv.num_kv_heads, ", ", kv.head_size_v,
              "] with dim stride 1, got ", value.sizes(), " strides ", value.strides());
  TORCH_CHECK(key.scalar_type() == kv_dtype && value.scalar_type() == kv_dtype, "key/value dtype (",
              key.scalar_type(), ", ", value.scalar_type(), ") must equal kv_dtype ", kv_dtype);
  TORCH_CHECK(query_start_loc.dim() == 1 && query_start_loc.size(0) >= 1,
              "query_start_loc must be [num_seqs + 1]");
  const int64_t num_seqs = query_start_loc.size(0) - 1;
  check_int32_1d(query_start_loc, num_seqs + 1, "query_start_loc");
  check_int32_1d(prefix_lens, num_seqs, "prefix_lens");
  check_block_table(block_table, num_seqs);
  TORCH_CHECK(window >= 0, "window must be >= 0 (0: no sliding window), got ", window);
  const float fscale = checked_scale(scale);
  const int32_t* qsl = query_start_loc.data_ptr<int32_t>();
  TORCH_CHECK(qsl[0] == 0 && qsl[num_seqs] == tokens, "query_start_loc must start at 0 and end at num_tokens=",
              tokens);
  for (int64_t b = 0; b < num_seqs; ++b)
    TORCH_CHECK(qsl[b + 1] >= qsl[b], "query_start_loc must be non-decreasing (sequence ", b, ")");
  // Checked even when there are no new tokens: a bad call is an error whatever its size.
  const int32_t* pre = prefix_lens.data_ptr<int32_t>();
  if (check_ids && !new_kv_in_cache) check_block_ids(block_table, pre, num_seqs, kv);
  if (check_ids && new_kv_in_cache) {  // the pages hold the new tokens too: check their blocks
    std::vector<int32_t> ends(num_seqs);
    for (int64_t b = 0; b < num_seqs; ++b) {
      const int64_t e = static_cast<int64_t>(pre[b]) + (qsl[b + 1] - qsl[b]);
      TORCH_CHECK(pre[b] >= 0 && e <= kInt32Max, "sequence ", b, ": prefix ", pre[b], " + new tokens ",
                  qsl[b + 1] - qsl[b], " out of range");
      ends[b] = static_cast<int32_t>(e);
    }
    check_block_ids(block_table, ends.data(), num_seqs, kv);
  }
  const KernelTable* table = kernels_for(std::string(isa));
  if (num_seqs == 0 || tokens == 0 || g == 0) return;

  // Query rows (tokens x heads of a group) per item. Each item streams its sequence's K/V
  // once, so more rows per item means fewer passes over the KV: on a 2-core AVX2 machine
  // 128 rows gave 10 to 20% more tokens/s than 36, with no gain past 128. Halved while that
  // leaves fewer than two items per thread. Items of later tokens (longer causal range) go first.
  const int64_t threads = at::get_num_threads();
  auto count_items = [&](int64_t per) {
    int64_t items = 0;
    for (int64_t b = 0; b < num_seqs; ++b) items += (static_cast<int64_t>(qsl[b + 1]) - qsl[b] + per - 1) / per;
    return items * kv.num_kv_heads;
  };
  int64_t tokens_per_item = std::max<int64_t>(1, 128 / g);
  while (tokens_per_item > 1 && count_items(tokens_per_item) < 2 * threads)
    tokens_per_item = (tokens_per_item + 1) / 2;
  const int32_t per_item = static_cast<int32_t>(tokens_per_item);
  std::vector<int32_t> item_seq, item_tok;
  for (int64_t b = 0; b < num_seqs; ++b) {
    const int64_t n = static_cast<int64_t>(qsl[b + 1]) - qsl[b];
    for (int64_t t = ((n + per_item - 1) / per_item - 1) * per_item; t >= 0; t -= per_item) {
      item_seq.push_back(static_cast<int32_t>(b));
      item_tok.push_back(static_cast<int32_t>(t));
    }
  }
  cpu_attn::PrefillParams p{};
  p.query = strided3(query, "query");
  p.out = {out.data_ptr(), p.query.dtype, out.stride(0), out.stride(1), out.stride(2)};
  p.key = strided3(key, "key");
  p.value = strided3(value, "value");
  p.kv = kv;
  p.kv_dtype = kdt;
  p.block_table = block_table.data_ptr<int32_t>();
  p.bt_stride = block_table.size(0) > 1 ? block_table.stride(0) : block_table.size(1);
  p.prefix_lens = pre;
  p.query_start_loc = qsl;
  p.num_seqs = num_seqs;
  p.num_q_heads = static_cast<int32_t>(hq);
  p.scale = fscale;
  p.window = window;
  p.item_seq = item_seq.data();
  p.item_tok = item_tok.data();
  p.tokens_per_item = per_item;
  p.new_in_cache = new_kv_in_cache ? 1 : 0;
  const int64_t items = mul_checked(static_cast<int64_t>(item_seq.size()), kv.num_kv_heads, "prefill work items");
  run_items(items, [&](int64_t i) { table->prefill(p, i, i + 1); });
}

std::vector<std::string> cpu_attention_isas() {
  const char* names[8];
  const int n = cpu_attn::available_isas(names, 8);
  return std::vector<std::string>(names, names + n);
}

std::string cpu_attention_auto_isa() { return cpu_attn::auto_isa(); }

double cpu_attention_bf16_dot_rate() { return cpu_attn::bf16_dot_rate_here(); }

double read_bandwidth_probe(const at::Tensor& buf, c10::string_view isa) {
  TORCH_CHECK(buf.is_cpu() && buf.scalar_type() == at::kFloat && buf.is_contiguous(),
              "read_bandwidth_probe needs a contiguous float32 CPU tensor");
  const KernelTable* table = kernels_for(std::string(isa));
  const float* data = buf.data_ptr<float>();
  const int64_t n = buf.numel();
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / 4096));
  std::vector<double> partial(threads, 0.0);
  at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t lo = n * t / threads, hi = n * (t + 1) / threads;
      partial[t] = table->read_sum(data + lo, hi - lo);
    }
  });
  double total = 0.0;
  for (double x : partial) total += x;
  return total;
}

int64_t pin_intraop_threads(at::IntArrayRef cpus) {
#ifdef __linux__
  TORCH_CHECK(!cpus.empty(), "pin_intraop_threads: empty CPU list");
  cpu_set_t set;
  CPU_ZERO(&set);
  for (int64_t c : cpus) {
    TORCH_CHECK(c >= 0 && c < CPU_SETSIZE, "pin_intraop_threads: CPU ", c, " out of range");
    CPU_SET(static_cast<int>(c), &set);
  }
  std::atomic<int64_t> pinned{0};
  const int64_t threads = at::get_num_threads();
  at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      if (sched_setaffinity(0, sizeof(set), &set) == 0) pinned.fetch_add(1);
  });
  TORCH_CHECK(sched_setaffinity(0, sizeof(set), &set) == 0, "pin_intraop_threads: sched_setaffinity failed");
  return pinned.load();
#else
  TORCH_CHECK(false, "pin_intraop_threads is only supported on Linux");
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kv_offload, m) {
  m.def(
      "paged_decode_attention(Tensor(a!) out, Tensor query, Tensor kv_cache, Tensor block_table, "
      "Tensor context_lens, int[] kv_layout, ScalarType kv_dtype, float scale, int window, int num_splits, "
      "str isa, bool check_ids=True) -> ()");
  m.def(
      "paged_prefill_attention(Tensor(a!) out, Tensor query, Tensor key, Tensor value, Tensor query_start_loc, "
      "Tensor kv_cache, Tensor block_table, Tensor prefix_lens, int[] kv_layout, ScalarType kv_dtype, "
      "float scale, int window, str isa, bool check_ids=True, bool new_kv_in_cache=False) -> ()");
  m.def("read_bandwidth_probe(Tensor buf, str isa) -> float");
  // No tensor arguments: registered as catch-all kernels.
  m.def("cpu_attention_isas() -> str[]", &cpu_attention_isas);
  m.def("cpu_attention_auto_isa() -> str", &cpu_attention_auto_isa);
  m.def("cpu_attention_bf16_dot_rate() -> float", &cpu_attention_bf16_dot_rate);
  m.def("pin_intraop_threads(int[] cpus) -> int", &pin_intraop_threads);
}

TORCH_LIBRARY_IMPL(kv_offload, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention);
  m.impl("paged_prefill_attention", &paged_prefill_attention);
  m.impl("read_bandwidth_probe", &read_bandwidth_probe);
}

}  // namespace kv_offload
