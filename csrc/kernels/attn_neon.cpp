// SPDX-License-Identifier: Apache-2.0
// Attention kernels for the neon path: NEON (aarch64 only; NEON is baseline there).
// setup.py compiles this file with that path's flags; dispatch.cpp calls it only after a
// run-time CPUID check says the CPU has the instructions.
#include "kernels/simd_neon.h"

#define KVO_ISA neon
#define KVO_ISA_NAME "neon"
#include "kernels/attn_entry.h"

namespace kv_offload {
namespace cpu_attn {
const KernelTable* kernel_table_neon() { return &neon::kTable; }
}  // namespace cpu_attn
}  // namespace kv_offload
