// SPDX-License-Identifier: Apache-2.0
// Writes new tokens' K/V into a paged KV cache, in whatever page format the kv_layout list
// describes (the same 13-int list the attention ops take; see csrc/ops/cpu_attention.cpp).
//
//   reshape_and_cache(kv_cache!, key, value, slot_mapping, kv_layout, kv_dtype) -> ()
//
// kv_cache: uint8 [num_blocks, block_bytes] (rows may be strided), key [T, H, D] and value
// [T, H, Dv] in the KV dtype (any strides), slot_mapping int64 [>= T]: token t goes to block
// slot / block_size, position slot % block_size. Negative slots (padding) are skipped; a slot
// past the cache is an error, raised before anything is written. This is the kv-offload
// counterpart of vLLM's cpu_attn_reshape_and_cache (written from the page geometry, not from
// vLLM's code): with the CPU page format it writes K transposed ([D][N] per head), V as rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

namespace kv_offload {
namespace {

constexpr int64_t kInt32Max = 2147483647;

struct PageAddr {
  int64_t page_offset_bytes, heads, block_size, head_size, head_size_v;
  int64_t k_off, k_head, k_token, k_dim, v_off, v_head, v_token, v_dim;
};

PageAddr parse_layout(at::IntArrayRef l) {
  TORCH_CHECK(l.size() == 13, "kv_layout must have 13 entries, got ", l.size());
  for (size_t i = 0; i < 13; ++i) TORCH_CHECK(l[i] >= 0, "kv_layout entry ", i, " must be >= 0, got ", l[i]);
  TORCH_CHECK(l[1] >= 1 && l[1] <= kInt32Max && l[2] >= 1 && l[2] <= kInt32Max && l[3] >= 1 && l[4] >= 1,
              "kv_layout: heads, block size and head sizes must be positive");
  return {l[0], l[1], l[2], l[3], l[4], l[5], l[6], l[7], l[8], l[9], l[10], l[11], l[12]};
}

// Offset in elements of the last element a page's K (or V) touches (all values are small:
// checked against the block size in bytes by the caller).
int64_t extent(int64_t off, int64_t heads, int64_t head, int64_t tokens, int64_t token, int64_t dims, int64_t dim) {
  return off + (heads - 1) * head + (tokens - 1) * token + (dims - 1) * dim;
}

template <class E>
void write_rows(uint8_t* base, int64_t block_stride, const PageAddr& a, const at::Tensor& src, const int64_t* slots,
                int64_t tokens, int64_t dims, int64_t off, int64_t head, int64_t token_stride, int64_t dim) {
  const E* data = static_cast<const E*>(src.data_ptr());
  const int64_t s0 = src.stride(0), s1 = src.stride(1), s2 = src.stride(2);
  at::parallel_for(0, tokens, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t slot = slots[t];
      if (slot < 0) continue;
      const int64_t block = slot / a.block_size, pos = slot % a.block_size;
      E* page = reinterpret_cast<E*>(base + block * block_stride + a.page_offset_bytes);
      for (int64_t h = 0; h < a.heads; ++h) {
        const E* in = data + t * s0 + h * s1;
        E* o = page + off + h * head + pos * token_stride;
        if (dim == 1 && s2 == 1) {
          std::memcpy(o, in, static_cast<size_t>(dims) * sizeof(E));
        } else {
          for (int64_t d = 0; d < dims; ++d) o[d * dim] = in[d * s2];
        }
      }
    }
  });
}

void reshape_and_cache(const at::Tensor& kv_cache, const at::Tensor& key, const at::Tensor& value,
                       const at::Tensor& slot_mapping, at::IntArrayRef kv_layout, at::ScalarType kv_dtype) {
  TORCH_CHECK(kv_dtype == at::kFloat || kv_dtype == at::kBFloat16 || kv_dtype == at::kHalf,
              "reshape_and_cache: kv_dtype ", kv_dtype, " is not supported; expected float32, bfloat16 or float16");
  TORCH_CHECK(kv_cache.is_cpu() && kv_cache.layout() == at::kStrided && kv_cache.scalar_type() == at::kByte &&
                  kv_cache.dim() == 2 && kv_cache.stride(1) == 1,
              "kv_cache must be a uint8 CPU tensor [num_blocks, block_bytes] with contiguous rows, got ",
              kv_cache.scalar_type(), " ", kv_cache.sizes());
  const PageAddr a = parse_layout(kv_layout);
  const int64_t esize = c10::elementSize(kv_dtype);
  for (const at::Tensor* t : {&key, &value})
    TORCH_CHECK(t->is_cpu() && t->layout() == at::kStrided && t->dim() == 3 && t->scalar_type() == kv_dtype,
                "key and value must be 3-D CPU tensors of the KV dtype ", kv_dtype, ", got ", t->scalar_type(), " ",
                t->sizes());
  const int64_t tokens = key.size(0);
  TORCH_CHECK(key.size(1) == a.heads && key.size(2) == a.head_size, "key must be [", tokens, ", ", a.heads, ", ",
              a.head_size, "], got ", key.sizes());
  TORCH_CHECK(value.size(0) == tokens && value.size(1) == a.heads && value.size(2) == a.head_size_v,
              "value must be [", tokens, ", ", a.heads, ", ", a.head_size_v, "], got ", value.sizes());
  TORCH_CHECK(slot_mapping.is_cpu() && slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 &&
                  slot_mapping.is_contiguous() && slot_mapping.size(0) >= tokens,
              "slot_mapping must be a contiguous int64 CPU tensor of at least ", tokens, " entries, got ",
              slot_mapping.scalar_type(), " ", slot_mapping.sizes());
  const int64_t last = std::max(extent(a.k_off, a.heads, a.k_head, a.block_size, a.k_token, a.head_size, a.k_dim),
                                extent(a.v_off, a.heads, a.v_head, a.block_size, a.v_token, a.head_size_v, a.v_dim));
  TORCH_CHECK(a.page_offset_bytes + (last + 1) * esize <= kv_cache.size(1), "kv_layout writes ",
              a.page_offset_bytes + (last + 1) * esize, " bytes of each block but kv_cache blocks have ",
              kv_cache.size(1));
  TORCH_CHECK(a.page_offset_bytes % esize == 0 && reinterpret_cast<uintptr_t>(kv_cache.data_ptr()) % esize == 0,
              "kv_cache blocks and page offset must be aligned to the KV element size");
  if (tokens == 0) return;
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const int64_t capacity = kv_cache.size(0) * a.block_size;
  for (int64_t t = 0; t < tokens; ++t)
    TORCH_CHECK(slots[t] < capacity, "slot ", slots[t], " (token ", t, ") is past the cache's ", capacity,
                " slots (", kv_cache.size(0), " blocks of ", a.block_size, ")");
  uint8_t* base = kv_cache.data_ptr<uint8_t>();
  const int64_t block_stride = kv_cache.size(0) > 1 ? kv_cache.stride(0) : kv_cache.size(1);
  auto run = [&](auto tag) {
    using E = decltype(tag);
    write_rows<E>(base, block_stride, a, key, slots, tokens, a.head_size, a.k_off, a.k_head, a.k_token, a.k_dim);
    write_rows<E>(base, block_stride, a, value, slots, tokens, a.head_size_v, a.v_off, a.v_head, a.v_token, a.v_dim);
  };
  if (esize == 4) {
    run(uint32_t{});
  } else {
    run(uint16_t{});
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kv_offload, m) {
  m.def(
      "reshape_and_cache(Tensor(a!) kv_cache, Tensor key, Tensor value, Tensor slot_mapping, int[] kv_layout, "
      "ScalarType kv_dtype) -> ()");
}

TORCH_LIBRARY_IMPL(kv_offload, CPU, m) { m.impl("reshape_and_cache", &reshape_and_cache); }

}  // namespace kv_offload
