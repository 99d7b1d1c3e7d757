// SPDX-License-Identifier: Apache-2.0
// Attention kernels for the avx2 path: AVX2 + FMA + F16C (built with -mavx2 -mfma -mf16c; x86-64 only).
// setup.py compiles this file with that path's flags; dispatch.cpp calls it only after a
// run-time CPUID check says the CPU has the instructions.
#include "kernels/simd_avx2.h"

#define KVO_ISA avx2
#define KVO_ISA_NAME "avx2"
#include "kernels/attn_entry.h"

namespace kv_offload {
namespace cpu_attn {
const KernelTable* kernel_table_avx2() { return &avx2::kTable; }
}  // namespace cpu_attn
}  // namespace kv_offload
