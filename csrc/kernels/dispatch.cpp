// SPDX-License-Identifier: Apache-2.0
// Run-time choice of the kernel path. Built with baseline flags (no ISA extensions): it only
// asks the CPU what it supports and returns the function table of a path that setup.py
// compiled in (KVO_HAVE_<ISA> is defined for each one it built).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>

#include "kernels/cpu_attn.h"

namespace kv_offload {
namespace cpu_attn {

#ifdef KVO_HAVE_AVX512BF16
const KernelTable* kernel_table_avx512bf16();
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
// Seconds for `iters` rounds of run_chains(dot, .): the best of kRounds alternating timings of
// `iters` and of 2 * `iters` rounds, differenced, so that the clock's own cost (tens of ns on a
// VM whose clocksource traps) and the call cancel out; taking each best keeps a preemption
// during one timing from deciding.
double chain_seconds(bool dot, int iters) {
  constexpr int kRounds = 5;
  double once = 1e30, twice = 1e30;
  for (int round = 0; round < kRounds; ++round) {
    for (int n = 1; n <= 2; ++n) {
      const auto t0 = std::chrono::steady_clock::now();
      run_chains(dot, n * iters);
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      double& best = n == 1 ? once : twice;
      best = std::min(best, s);
    }
  }
  return twice - once;
}

// bf16 products per second of vdpbf16ps (two per fp32 lane) over fp32 products per second of
// vfmadd231ps, on the calling core. 8192 rounds of 16 FMAs take 20-40 us at one or two 512-bit
// FMAs per cycle, their doubled window twice that, and vdpbf16ps as long or, where it issues
// every other cycle, up to 4x: 1.1 ms in all on a Zen 4 VM, a few ms at most, once per
// process. 0 where a timing came out unusable (a clock too coarse to see the window), so that
// "auto" keeps the avx512 path.
double bf16_dot_rate() {
  constexpr int kIters = 8192;
  const double fma = chain_seconds(false, kIters);
  const double dot = chain_seconds(true, kIters);
  const double rate = 2.0 * fma / dot;
  return (fma > 0.0 && dot > 0.0 && std::isfinite(rate)) ? rate : 0.0;
}

// The avx512bf16 path differs from avx512 only in bf16 prefill's Q.K (vdpbf16ps, two products
// per lane), so it pays only where vdpbf16ps does clearly more products per second than the
// FMAs it replaces. Zen 4 and Zen 5 run it at the FMA rate (about 2x the products); an
// Emerald Rapids core runs one every two cycles (0.5x), where bf16 prefill took 1.2x the CPU
// time of avx512 (2048 tokens: 523 against 424 ms). Measured once per process, on first use;
// KV_OFFLOAD_CPU_ATTN_ISA names a path outright where an operator wants no measurement.
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
  if (isa == nullptr || *isa == '\0' || std::strcmp(isa, "auto") == 0) isa = auto_isa();
  for (const Path& p : kPaths) {
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
