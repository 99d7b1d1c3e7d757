// SPDX-License-Identifier: Apache-2.0
// Attention kernels for the avx512bf16 path: the avx512 path plus AVX512_BF16 (built with the
// avx512 flags and -mavx512bf16; x86-64 only). The same code as attn_avx512.cpp, in its own
// namespace, except that bf16 prefill computes Q.K with vdpbf16ps (see attn_bf16dot.h).
// setup.py compiles this file with that path's flags; dispatch.cpp calls it only after a
// run-time CPUID check says the CPU has the instructions.
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's own AVX-512 headers trip these on their casts (_mm512_castps512_ps256), a known
// false positive; the kernels themselves are clean with -Wall on the other paths.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#define KVO_AVX512_BF16 1
#include "kernels/simd_avx512.h"

#define KVO_ISA avx512bf16
#define KVO_ISA_NAME "avx512bf16"
#include "kernels/attn_entry.h"

namespace kv_offload {
namespace cpu_attn {
const KernelTable* kernel_table_avx512bf16() { return &avx512bf16::kTable; }
}  // namespace cpu_attn
}  // namespace kv_offload
