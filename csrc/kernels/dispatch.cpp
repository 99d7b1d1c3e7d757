// SPDX-License-Identifier: Apache-2.0
// Run-time choice of the kernel path. Built with baseline flags (no ISA extensions): it only
// asks the CPU what it supports and returns the function table of a path that setup.py
// compiled in (KVO_HAVE_<ISA> is defined for each one it built).
#include <cstring>

#include "kernels/cpu_attn.h"

namespace kv_offload {
namespace cpu_attn {

#ifdef KVO_HAVE_AVX512BF16
const KernelTable* kernel_table_avx512bf16();
double bf16_dot_rate();  // attn_avx512bf16.cpp
#endif
#ifdef KVO_HAVE_AVX512
const KernelTable* kernel_table_avx512();
#endif
#ifdef KVO_HAVE_AVX2
const KernelTable* kernel_table_avx2();
#endif
#ifdef KVO_HAVE_NEON
const KernelTable* kernel_table_neon();
#endif
const KernelTable* kernel_table_scalar();

namespace {

struct Path {
  const char* name;
  bool compiled;
  bool (*supported)();
  const KernelTable* (*table)();
  bool (*pays)();  // whether "auto" takes this path where it is usable (null: always)
};

#if defined(__x86_64__) || defined(__i386__)
bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("fma");
}
bool cpu_has_avx512bf16() {
  __builtin_cpu_init();
  return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
}
bool cpu_has_avx2() {
  __builtin_cpu_init();
  // F16C has no __builtin_cpu_supports name on older compilers; every AVX2 CPU has it.
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#else
bool cpu_has_avx512() { return false; }
bool cpu_has_avx512bf16() { return false; }
bool cpu_has_avx2() { return false; }
#endif
#if defined(__aarch64__)
bool cpu_has_neon() { return true; }
#else
bool cpu_has_neon() { return false; }
#endif
bool always() { return true; }

#ifdef KVO_HAVE_AVX512BF16
// The avx512bf16 path differs from avx512 only in bf16 prefill's Q.K (vdpbf16ps, two products
// per lane), so it pays only where vdpbf16ps does at least as many products per second as the
// FMAs it replaces. Zen 4 and Zen 5 run it at the FMA rate (about 2x the products); an
// Emerald Rapids core runs one every two cycles (0.5x), where bf16 prefill took 1.2x the CPU
// time of avx512 (2048 tokens: 523 against 424 ms). Measured once per process, on first use.
double measured_bf16_dot_rate() {
  static const double rate = cpu_has_avx512bf16() ? bf16_dot_rate() : 0.0;
  return rate;
}
bool bf16_dot_pays() { return measured_bf16_dot_rate() >= kMinBf16DotRate; }
#endif

const KernelTable* none() { return nullptr; }

const Path kPaths[] = {
#ifdef KVO_HAVE_AVX512BF16
    {"avx512bf16", true, &cpu_has_avx512bf16, &kernel_table_avx512bf16, &bf16_dot_pays},
#else
    {"avx512bf16", false, &cpu_has_avx512bf16, &none, nullptr},
#endif
#ifdef KVO_HAVE_AVX512
    {"avx512", true, &cpu_has_avx512, &kernel_table_avx512, nullptr},
#else
    {"avx512", false, &cpu_has_avx512, &none, nullptr},
#endif
#ifdef KVO_HAVE_AVX2
    {"avx2", true, &cpu_has_avx2, &kernel_table_avx2, nullptr},
#else
    {"avx2", false, &cpu_has_avx2, &none, nullptr},
#endif
#ifdef KVO_HAVE_NEON
    {"neon", true, &cpu_has_neon, &kernel_table_neon, nullptr},
#else
    {"neon", false, &cpu_has_neon, &none, nullptr},
#endif
    {"scalar", true, &always, &kernel_table_scalar, nullptr},
};

}  // namespace

int available_isas(const char** names, int max_names) {
  int n = 0;
  for (const Path& p : kPaths)
    if (p.compiled && p.supported() && n < max_names) names[n++] = p.name;
  return n;
}

const char* auto_isa() {
  for (const Path& p : kPaths)
    if (p.compiled && p.supported() && (p.pays == nullptr || p.pays())) return p.name;
  return "scalar";
}

double bf16_dot_rate_here() {
#ifdef KVO_HAVE_AVX512BF16
  return measured_bf16_dot_rate();
#else
  return 0.0;
#endif
}

const KernelTable* select_kernels(const char* isa, const char** error) {
  const bool automatic = isa == nullptr || *isa == '\0' || std::strcmp(isa, "auto") == 0;
  for (const Path& p : kPaths) {
    if (automatic) {
      if (p.compiled && p.supported() && (p.pays == nullptr || p.pays())) return p.table();
      continue;
    }
    if (std::strcmp(isa, p.name) != 0) continue;
    if (!p.compiled) {
      *error = "this ISA path was not compiled into kv_offload._C (compiler or architecture lacks it)";
      return nullptr;
    }
    if (!p.supported()) {
      *error = "this CPU does not support the requested ISA path";
      return nullptr;
    }
    return p.table();
  }
  *error = "unknown ISA path; expected one of auto, avx512bf16, avx512, avx2, neon, scalar";
  return nullptr;
}

}  // namespace cpu_attn
}  // namespace kv_offload
