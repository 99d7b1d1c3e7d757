// SPDX-License-Identifier: Apache-2.0
// Attention kernels for the scalar path: portable C++, no ISA flags (always built).
// setup.py compiles this file with that path's flags; dispatch.cpp calls it only after a
// run-time CPUID check says the CPU has the instructions.
#include "kernels/simd_scalar.h"

#define KVO_ISA scalar
#define KVO_ISA_NAME "scalar"
#include "kernels/attn_entry.h"

namespace kv_offload {
namespace cpu_attn {
const KernelTable* kernel_table_scalar() { return &scalar::kTable; }
}  // namespace cpu_attn
}  // namespace kv_offload
