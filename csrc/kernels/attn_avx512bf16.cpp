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

#if !defined(__x86_64__)
#error "the avx512bf16 path is x86-64 only"
#endif

// `iters` rounds of 16 independent 512-bit vdpbf16ps (dot) or vfmadd231ps chains, for
// dispatch.cpp to time (see measured_bf16_dot_rate there). One asm block holds the loop, so
// that the compiler neither folds it nor keeps the chains in memory; the chains start from
// zero (no denormal or NaN inputs), and 16 of them cover the 4-5 cycle latency of two FMA
// ports. The "memory" clobber keeps the loop between the caller's clock reads.
#define KVO_CHAIN_OPS(OP)                                                                          \
  OP " %%zmm16, %%zmm17, %%zmm0\n\t" OP " %%zmm16, %%zmm17, %%zmm1\n\t"                            \
  OP " %%zmm16, %%zmm17, %%zmm2\n\t" OP " %%zmm16, %%zmm17, %%zmm3\n\t"                            \
  OP " %%zmm16, %%zmm17, %%zmm4\n\t" OP " %%zmm16, %%zmm17, %%zmm5\n\t"                            \
  OP " %%zmm16, %%zmm17, %%zmm6\n\t" OP " %%zmm16, %%zmm17, %%zmm7\n\t"                            \
  OP " %%zmm16, %%zmm17, %%zmm8\n\t" OP " %%zmm16, %%zmm17, %%zmm9\n\t"                            \
  OP " %%zmm16, %%zmm17, %%zmm10\n\t" OP " %%zmm16, %%zmm17, %%zmm11\n\t"                          \
  OP " %%zmm16, %%zmm17, %%zmm12\n\t" OP " %%zmm16, %%zmm17, %%zmm13\n\t"                          \
  OP " %%zmm16, %%zmm17, %%zmm14\n\t" OP " %%zmm16, %%zmm17, %%zmm15\n\t"
#define KVO_CHAIN_LOOP(OP)                                                                         \
  __asm__ volatile(                                                                                \
      "vpxord %%zmm16, %%zmm16, %%zmm16\n\tvmovaps %%zmm16, %%zmm17\n\t"                            \
      "vmovaps %%zmm16, %%zmm0\n\tvmovaps %%zmm16, %%zmm1\n\tvmovaps %%zmm16, %%zmm2\n\t"            \
      "vmovaps %%zmm16, %%zmm3\n\tvmovaps %%zmm16, %%zmm4\n\tvmovaps %%zmm16, %%zmm5\n\t"            \
      "vmovaps %%zmm16, %%zmm6\n\tvmovaps %%zmm16, %%zmm7\n\tvmovaps %%zmm16, %%zmm8\n\t"            \
      "vmovaps %%zmm16, %%zmm9\n\tvmovaps %%zmm16, %%zmm10\n\tvmovaps %%zmm16, %%zmm11\n\t"          \
      "vmovaps %%zmm16, %%zmm12\n\tvmovaps %%zmm16, %%zmm13\n\tvmovaps %%zmm16, %%zmm14\n\t"         \
      "vmovaps %%zmm16, %%zmm15\n\t"                                                               \
      "1:\n\t" KVO_CHAIN_OPS(OP) "dec %[n]\n\tjnz 1b"                                                \
      : [n] "+r"(n)                                                                                \
      :                                                                                            \
      : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10",    \
        "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "xmm16", "xmm17", "cc", "memory")
void run_chains(bool dot, int iters) {
  if (iters <= 0) return;
  long n = iters;
  if (dot)
    KVO_CHAIN_LOOP("vdpbf16ps");
  else
    KVO_CHAIN_LOOP("vfmadd231ps");
}
#undef KVO_CHAIN_LOOP
#undef KVO_CHAIN_OPS
}  // namespace cpu_attn
}  // namespace kv_offload
