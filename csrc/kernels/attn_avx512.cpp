// SPDX-License-Identifier: Apache-2.0
// Attention kernels for the avx512 path: AVX-512F (built with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mf16c; x86-64 only).
// setup.py compiles this file with that path's flags; dispatch.cpp calls it only after a
// run-time CPUID check says the CPU has the instructions.
#include "kernels/simd_avx512.h"

#define KVO_ISA avx512
#define KVO_ISA_NAME "avx512"
#include "kernels/attn_impl.h"

namespace kv_offload {
namespace cpu_attn {
const KernelTable* kernel_table_avx512() { return &avx512::kTable; }
}  // namespace cpu_attn
}  // namespace kv_offload
