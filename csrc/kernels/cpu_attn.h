// SPDX-License-Identifier: Apache-2.0
// CPU attention over paged KV blocks: the framework-free interface.
//
// No torch headers here. The kernels take raw pointers and element strides, read K and V in
// place from blocks laid out as kv_offload.geometry describes (one block = one pool slot, this
// layer's page at `page_offset_bytes`), and accumulate in fp32. One implementation is compiled
// per instruction set (attn_<isa>.cpp, each with its own compiler flags); dispatch.cpp picks
// one at run time from CPUID (or a forced name) and hands out its KernelTable.
#pragma once

#include <cstdint>

namespace kv_offload {
namespace cpu_attn {

enum class DType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// 16-bit storage types (bit patterns only; converted to fp32 in registers).
struct bf16_t {
  uint16_t bits;
};
struct fp16_t {
  uint16_t bits;
};

// Where K and V of one layer lie inside the blocks of a paged cache.
struct KVLayout {
  const uint8_t* base;         // block 0
  int64_t num_blocks;          // valid block ids are [0, num_blocks)
  int64_t block_stride_bytes;  // bytes from one block to the next (pool slot bytes)
  int64_t page_offset_bytes;   // this layer's page inside a block
  int32_t num_kv_heads;
  int32_t block_size;  // tokens per block
  int32_t head_size;   // K head size D
  int32_t head_size_v;  // V head size Dv
  // Element offsets and strides inside a page: element (h, n, d) of K is at
  // k_off + h * k_head + n * k_token + d * k_dim (likewise V; v_dim must be 1).
  int64_t k_off, k_head, k_token, k_dim;
  int64_t v_off, v_head, v_token, v_dim;
};

// A strided 3-D tensor [rows, heads, dim] of any of the three dtypes.
struct Strided3 {
  const void* data;
  DType dtype;
  int64_t s0, s1, s2;  // element strides
};

struct MutStrided3 {
  void* data;
  DType dtype;
  int64_t s0, s1, s2;
};

// Decode: one query token per sequence, attending over context_lens[b] cached tokens (the
// query's own token included: its position is context_lens[b] - 1).
struct DecodeParams {
  Strided3 query;    // [B, Hq, D]
  MutStrided3 out;   // [B, Hq, Dv]
  KVLayout kv;
  DType kv_dtype;
  const int32_t* block_table;  // [B, bt_stride] block ids
  int64_t bt_stride;
  const int32_t* context_lens;  // [B]
  int64_t num_seqs;
  int32_t num_q_heads;
  float scale;
  int64_t window;      // > 0: attend to the last `window` positions only (int64: no narrowing)
  int32_t num_splits;  // >= 1; > 1 writes partials to `workspace`, merged by decode_reduce
  float* workspace;    // [B, Hkv, num_splits, G, Dv + 2] (acc..., max, sum); null when 1 split
};

// Prefill / chunked prefill: sequence b has prefix_lens[b] cached tokens in blocks and
// n_b = query_start_loc[b+1] - query_start_loc[b] new tokens, whose K and V are dense
// (key/value rows query_start_loc[b] ...). New token i sits at position prefix_lens[b] + i
// and attends to every cached token and to new tokens 0..i (causal), within `window`.
struct PrefillParams {
  Strided3 query;   // [T, Hq, D]
  MutStrided3 out;  // [T, Hq, Dv]
  Strided3 key;     // [T, Hkv, D]  (dtype = kv_dtype, dim stride 1)
  Strided3 value;   // [T, Hkv, Dv] (dtype = kv_dtype, dim stride 1)
  KVLayout kv;
  DType kv_dtype;
  const int32_t* block_table;
  int64_t bt_stride;
  const int32_t* prefix_lens;      // [B]
  const int32_t* query_start_loc;  // [B + 1]
  int64_t num_seqs;
  int32_t num_q_heads;
  float scale;
  int64_t window;
  // Work items: item i covers sequence item_seq[i], new tokens [item_tok[i], item_tok[i] +
  // tokens_per_item) of it (clipped), for every KV head (item index = i * Hkv + h).
  const int32_t* item_seq;
  const int32_t* item_tok;
  int32_t tokens_per_item;
  // 1: the new tokens' K/V were written to the blocks before the call (positions
  // [prefix, prefix + n_b) are read from the pages like the prefix; key/value are unused).
  int32_t new_in_cache;
};

struct KernelTable {
  const char* name;
  // Work items [begin, end) of (b * Hkv + h) * num_splits + s.
  void (*decode)(const DecodeParams& p, int64_t begin, int64_t end);
  // Merge split partials for (b * Hkv + h) in [begin, end).
  void (*decode_reduce)(const DecodeParams& p, int64_t begin, int64_t end);
  // Work items [begin, end) of item * Hkv + h.
  void (*prefill)(const PrefillParams& p, int64_t begin, int64_t end);
  // Sum of n floats with wide loads (a read-bandwidth probe).
  double (*read_sum)(const float* data, int64_t n);
};

// 2^f for f in [-0.5, 0.5] as c0 + c1 f + ... + c5 f^5: a relative-error minimax fit (2.3e-7
// relative error evaluated in fp32 Horner form), shared by the SIMD exp2 implementations.
constexpr float kExp2C0 = 1.0000001192092896f;
constexpr float kExp2C1 = 0.6931469440460205f;
constexpr float kExp2C2 = 0.24022120237350464f;
constexpr float kExp2C3 = 0.05550713092088699f;
constexpr float kExp2C4 = 0.009675540961325169f;
constexpr float kExp2C5 = 0.001327647129073739f;

// Names of the instruction-set paths compiled into this build and usable on this CPU, in
// preference order (e.g. {"avx2", "scalar"}); auto_isa() is the one "auto" takes.
int available_isas(const char** names, int max_names);

// The path "auto" selects: the first of available_isas() that pays on this CPU. All are usable;
// avx512bf16 is passed over where bf16_dot_rate_here() < kMinBf16DotRate (see dispatch.cpp).
const char* auto_isa();

// bf16 products per second of vdpbf16ps over fp32 products per second of FMAs on this CPU,
// measured once per process (0 where the avx512bf16 path is not built or not supported, or the
// timing was unusable). "auto" takes avx512bf16 only at kMinBf16DotRate or more: measured rates
// sit near 2 (Zen 4, Zen 5) or 0.5 (Emerald Rapids), and the margin above 1 keeps a CPU near
// break-even on the avx512 path in every process instead of a per-process coin flip.
double bf16_dot_rate_here();
constexpr double kMinBf16DotRate = 1.25;

// attn_avx512bf16.cpp (built only where the compiler has the path): `iters` rounds of 16
// independent vdpbf16ps (dot) or vfmadd231ps chains, untimed; dispatch.cpp times them with
// baseline code.
void run_chains(bool dot, int iters);

// "auto" (or "") = auto_isa(); otherwise the named path. Returns null and sets
// *error when the name is unknown, not compiled in, or not supported by this CPU.
const KernelTable* select_kernels(const char* isa, const char** error);

}  // namespace cpu_attn
}  // namespace kv_offload
