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

#include <algorithm>
#include <chrono>

namespace kv_offload {
namespace cpu_attn {
const KernelTable* kernel_table_avx512bf16() { return &avx512bf16::kTable; }

namespace {

// Seconds for `iters` rounds of 12 independent 512-bit vdpbf16ps (dot) or vfmadd231ps chains.
// Inline asm, so that the compiler neither folds the loop nor keeps the chains in memory.
double time_chains(bool dot, int iters) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0, a8 = a0,
         a9 = a0, a10 = a0, a11 = a0;
  const __m512 b = _mm512_setzero_ps(), c = _mm512_setzero_ps();  // zeros: no denormal or overflow
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < iters; ++i) {
    if (dot)
      __asm__ volatile(
          "vdpbf16ps %[b], %[c], %[a0]\n\tvdpbf16ps %[b], %[c], %[a1]\n\tvdpbf16ps %[b], %[c], %[a2]\n\t"
          "vdpbf16ps %[b], %[c], %[a3]\n\tvdpbf16ps %[b], %[c], %[a4]\n\tvdpbf16ps %[b], %[c], %[a5]\n\t"
          "vdpbf16ps %[b], %[c], %[a6]\n\tvdpbf16ps %[b], %[c], %[a7]\n\tvdpbf16ps %[b], %[c], %[a8]\n\t"
          "vdpbf16ps %[b], %[c], %[a9]\n\tvdpbf16ps %[b], %[c], %[a10]\n\tvdpbf16ps %[b], %[c], %[a11]"
          : [a0] "+v"(a0), [a1] "+v"(a1), [a2] "+v"(a2), [a3] "+v"(a3), [a4] "+v"(a4), [a5] "+v"(a5),
            [a6] "+v"(a6), [a7] "+v"(a7), [a8] "+v"(a8), [a9] "+v"(a9), [a10] "+v"(a10), [a11] "+v"(a11)
          : [b] "v"(b), [c] "v"(c));
    else
      __asm__ volatile(
          "vfmadd231ps %[b], %[c], %[a0]\n\tvfmadd231ps %[b], %[c], %[a1]\n\tvfmadd231ps %[b], %[c], %[a2]\n\t"
          "vfmadd231ps %[b], %[c], %[a3]\n\tvfmadd231ps %[b], %[c], %[a4]\n\tvfmadd231ps %[b], %[c], %[a5]\n\t"
          "vfmadd231ps %[b], %[c], %[a6]\n\tvfmadd231ps %[b], %[c], %[a7]\n\tvfmadd231ps %[b], %[c], %[a8]\n\t"
          "vfmadd231ps %[b], %[c], %[a9]\n\tvfmadd231ps %[b], %[c], %[a10]\n\tvfmadd231ps %[b], %[c], %[a11]"
          : [a0] "+v"(a0), [a1] "+v"(a1), [a2] "+v"(a2), [a3] "+v"(a3), [a4] "+v"(a4), [a5] "+v"(a5),
            [a6] "+v"(a6), [a7] "+v"(a7), [a8] "+v"(a8), [a9] "+v"(a9), [a10] "+v"(a10), [a11] "+v"(a11)
          : [b] "v"(b), [c] "v"(c));
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

// bf16 products per second of vdpbf16ps (two per fp32 lane) over fp32 products per second of
// vfmadd231ps, on the calling core: the best of 7 alternating timings of each (about 0.2 ms
// in all), so that a preemption during one timing does not decide. Measured: about 2 on a
// Zen 4 and a Zen 5 VM (one vdpbf16ps per FMA slot), 0.5 on an Emerald Rapids VM (one
// vdpbf16ps every 2 cycles against two FMAs per cycle).
double bf16_dot_rate() {
  constexpr int kIters = 2000;
  double dot = 1e30, fma = 1e30;
  for (int round = 0; round < 7; ++round) {
    dot = std::min(dot, time_chains(true, kIters));
    fma = std::min(fma, time_chains(false, kIters));
  }
  return 2.0 * fma / dot;
}
}  // namespace cpu_attn
}  // namespace kv_offload
