// SPDX-License-Identifier: Apache-2.0
// How fast can this machine stream memory while doing F vector FMAs of work per 64-byte line?
// A ceiling for bandwidth_fraction in bench_cpu_attention.py: decode attention with 4 query
// rows per KV head does 16 FMAs (8 fp32 lanes) per line of bf16 KV and 8 per line of fp32 KV.
//
//   g++ -O3 -mavx2 -mfma -fopenmp benchmarks/stream_fma_probe.cpp -o stream_fma_probe
//   ./stream_fma_probe [--threads N] [--json OUT.json]
//
// Each thread streams 64 KiB runs (one KV head's part of a block) at shuffled offsets of a
// 1 GiB buffer, like the kernel walking a block table; per line it loads the line, adds it to
// a sum and runs F FMAs on 8 independent accumulators (pure throughput work, no latency
// chain longer than the kernel's). With a prefetch distance, each line also prefetches the
// line `distance` bytes ahead (a rate matched to consumption). F = 0 is the plain read
// baseline of the same run; the table reports each row's ratio to it. x86-64 with AVX2 + FMA.
#include <immintrin.h>
#include <omp.h>
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace {

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

template <int F>
__m256 stream_run(const char* p, int64_t bytes, int64_t distance, __m256 sum) {
  __m256 a[8];
  for (auto& x : a) x = _mm256_set1_ps(1.0f);
  const __m256 m = _mm256_set1_ps(0.999f);
  for (int64_t o = 0; o < bytes; o += 64) {
    if (distance > 0) _mm_prefetch(p + o + distance, _MM_HINT_T0);
    const __m256 x = _mm256_add_ps(_mm256_loadu_ps(reinterpret_cast<const float*>(p + o)),
                                   _mm256_loadu_ps(reinterpret_cast<const float*>(p + o + 32)));
    sum = _mm256_add_ps(sum, x);
    for (int f = 0; f < F; f += 8)
      for (auto& acc : a) acc = _mm256_fmadd_ps(acc, m, x);
  }
  for (auto& acc : a) sum = _mm256_add_ps(sum, acc);
  return sum;
}

using RunFn = __m256 (*)(const char*, int64_t, int64_t, __m256);

RunFn run_for(int f) {
  switch (f) {
    case 0: return stream_run<0>;
    case 8: return stream_run<8>;
    case 16: return stream_run<16>;
    default: return stream_run<32>;
  }
}

}  // namespace

int main(int argc, char** argv) {
  int threads = omp_get_max_threads();
  const char* json = nullptr;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--threads") && i + 1 < argc) {
      threads = std::atoi(argv[++i]);
    } else if (!std::strcmp(argv[i], "--json") && i + 1 < argc) {
      json = argv[++i];
    } else {
      std::fprintf(stderr, "usage: %s [--threads N] [--json OUT.json]\n", argv[0]);
      return 2;
    }
  }
  const int64_t total = int64_t{1} << 30, run = 64 * 1024, runs = total / run;
  char* buf = static_cast<char*>(mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  if (buf == MAP_FAILED) {
    std::perror("mmap 1 GiB");
    return 1;
  }
  std::memset(buf, 0x3f, total);  // 0.747f in every lane: no denormals in the FMA chains
  std::vector<int64_t> order(runs);
  for (int64_t i = 0; i < runs; ++i) order[i] = i;
  std::shuffle(order.begin(), order.end(), std::mt19937(1));

  struct Row {
    int f;
    int64_t distance;
    double gbps;
  };
  std::vector<Row> rows;
  for (int f : {0, 8, 16, 32})
    for (int64_t distance : {int64_t{0}, int64_t{1024}}) rows.push_back({f, distance, 0.0});
  // Round-robin over the rows, best of 7 each, so a drift of the machine's bandwidth during
  // the run touches every row alike.
  float keep = 0.0f;
  for (int rep = 0; rep < 7; ++rep)
    for (Row& row : rows) {
      const RunFn fn = run_for(row.f);
      const int64_t distance = row.distance;
      const double t0 = now();
      float sum = 0.0f;
#pragma omp parallel num_threads(threads) reduction(+ : sum)
      {
        __m256 s = _mm256_setzero_ps();
#pragma omp for schedule(static)
        for (int64_t i = 0; i < runs; ++i) s = fn(buf + order[i] * run, run, distance, s);
        float lanes[8];
        _mm256_storeu_ps(lanes, s);
        sum += lanes[0];
      }
      row.gbps = std::max(row.gbps, static_cast<double>(total) / (now() - t0) / 1e9);
      keep += sum;
    }
  if (keep == 42.0f) std::printf(" ");  // keeps the sums alive
  const double base = std::max(rows[0].gbps, rows[1].gbps);  // F = 0, with or without prefetch
  std::printf("threads %d, 64 KiB runs at shuffled offsets of 1 GiB, best of 7 (round-robin)\n", threads);
  std::printf("%-14s %-10s %8s %10s %12s\n", "FMAs/line", "prefetch", "GB/s", "vs read", "vFMA/ns");
  for (const Row& r : rows)
    std::printf("%-14d %-10s %8.1f %10.2f %12.2f\n", r.f, r.distance ? "1 KiB" : "none", r.gbps, r.gbps / base,
                r.gbps * r.f / 64.0);
  if (json) {
    FILE* out = std::fopen(json, "w");
    if (!out) {
      std::perror(json);
      return 1;
    }
    std::fprintf(out, "{\"threads\": %d, \"read_gbps\": %.3f, \"rows\": [", threads, base);
    for (size_t i = 0; i < rows.size(); ++i)
      std::fprintf(out, "%s{\"fmas_per_line\": %d, \"prefetch_bytes\": %lld, \"gbps\": %.3f, \"fraction_of_read\": %.4f}",
                   i ? ", " : "", rows[i].f, static_cast<long long>(rows[i].distance), rows[i].gbps,
                   rows[i].gbps / base);
    std::fprintf(out, "]}\n");
    std::fclose(out);
  }
  munmap(buf, total);
  return 0;
}
