// SPDX-License-Identifier: Apache-2.0
// Attention kernels for the avx512 path: AVX-512F (built with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mf16c; x86-64 only).
// setup.py compiles this file with that path's flags; dispatch.cpp calls it only after a
// run-time CPUID check says the CPU has the instructions.
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's own AVX-512 headers trip these on their casts (_mm512_castps512_ps256), a known
// false positive; the kernels themselves are clean with -Wall on the other paths.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include "kernels/simd_avx512.h"

#define KVO_ISA avx512
#define KVO_ISA_NAME "avx512"
#include "kernels/attn_entry.h"

namespace kv_offload {
namespace cpu_attn {
const KernelTable* kernel_table_avx512() { return &avx512::kTable; }
}  // namespace cpu_attn
}  // namespace kv_offload
