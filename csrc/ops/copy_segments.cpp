// SPDX-License-Identifier: Apache-2.0
// Batched host-memory copy: the CPU analogue of cuMemcpyBatchAsync.
//
// _copy_segments(src, dst, sizes, num_threads) copies sizes[i] bytes from address src[i] to
// address dst[i] for every i. Addresses are raw (int64) because the segments span many
// tensors (one per layer) and a pool; kv_offload.transfer.plan builds and bounds-checks them
// against the engine's KV cache and pool before they reach here. Because it copies between
// arbitrary addresses the op is internal (underscore name, undocumented); the checks below
// (NULL addresses, negative sizes, sums and ranges that overflow) are defence in depth, not
// a licence to call it with untrusted input. Work is split by bytes over `num_threads`
// threads, so one large segment and many small ones both spread evenly. The GIL is not held
// (torch.ops releases it).
#include <torch/library.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

namespace kv_offload {
namespace {

void copy_range(const int64_t* src, const int64_t* dst, const int64_t* sizes, int64_t first,
                int64_t first_skip, int64_t last, int64_t last_take) {
  // Copies segments [first, last]; skips `first_skip` bytes of the first one and takes only
  // `last_take` bytes of the last one (a segment can be shared by two threads).
  for (int64_t i = first; i <= last; ++i) {
    int64_t begin = (i == first) ? first_skip : 0;
    int64_t end = (i == last) ? last_take : sizes[i];
    if (end > begin) {
      std::memcpy(reinterpret_cast<void*>(dst[i] + begin),
                  reinterpret_cast<const void*>(src[i] + begin),
                  static_cast<size_t>(end - begin));
    }
  }
}

constexpr int64_t kMaxThreads = 256;

void copy_segments(const at::Tensor& src, const at::Tensor& dst, const at::Tensor& sizes,
                   int64_t num_threads) {
  TORCH_CHECK(src.dim() == 1 && dst.dim() == 1 && sizes.dim() == 1,
              "_copy_segments: src, dst and sizes must be 1-D");
  TORCH_CHECK(src.scalar_type() == at::kLong && dst.scalar_type() == at::kLong &&
                  sizes.scalar_type() == at::kLong,
              "_copy_segments: src, dst and sizes must be int64");
  TORCH_CHECK(src.numel() == dst.numel() && src.numel() == sizes.numel(),
              "_copy_segments: src, dst and sizes must have the same length");
  TORCH_CHECK(src.is_cpu() && dst.is_cpu() && sizes.is_cpu(),
              "_copy_segments: descriptor tensors must be on the CPU");
  const int64_t n = src.numel();
  if (n == 0) return;
  auto s = src.contiguous(), d = dst.contiguous(), z = sizes.contiguous();
  const int64_t* sp = s.data_ptr<int64_t>();
  const int64_t* dp = d.data_ptr<int64_t>();
  const int64_t* zp = z.data_ptr<int64_t>();
  TORCH_CHECK(num_threads >= 1, "_copy_segments: num_threads must be >= 1, got ", num_threads);
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(zp[i] >= 0, "_copy_segments: negative size ", zp[i], " at index ", i);
    if (zp[i] == 0) continue;
    TORCH_CHECK(sp[i] != 0 && dp[i] != 0, "_copy_segments: NULL address at index ", i);
    TORCH_CHECK(sp[i] > 0 && dp[i] > 0, "_copy_segments: negative address at index ", i);
    int64_t end = 0;
    TORCH_CHECK(!__builtin_add_overflow(sp[i], zp[i], &end) && !__builtin_add_overflow(dp[i], zp[i], &end),
                "_copy_segments: address + size overflows at index ", i);
    TORCH_CHECK(!__builtin_add_overflow(total, zp[i], &total),
                "_copy_segments: total size overflows int64 at index ", i);
  }
  // Below ~256 KiB a thread start costs more than it saves.
  int64_t threads = std::max<int64_t>(1, std::min<int64_t>({num_threads, kMaxThreads, total >> 18}));
  if (threads == 1) {
    copy_range(sp, dp, zp, 0, 0, n - 1, zp[n - 1]);
    return;
  }
  // Split [0, total) into `threads` byte ranges and map each to (segment, offset) bounds.
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  auto locate = [&](int64_t byte, int64_t& seg, int64_t& off) {
    int64_t acc = 0;
    for (seg = 0; seg < n; ++seg) {
      if (acc + zp[seg] > byte) break;
      acc += zp[seg];
    }
    off = byte - acc;
  };
  std::vector<int64_t> seg_at(threads + 1), off_at(threads + 1);
  for (int64_t t = 0; t <= threads; ++t) {
    // 128-bit product: total may be close to INT64_MAX.
    int64_t byte = static_cast<int64_t>(static_cast<__int128>(total) * t / threads);
    if (t == threads) {
      seg_at[t] = n - 1;
      off_at[t] = zp[n - 1];
    } else {
      locate(byte, seg_at[t], off_at[t]);
    }
  }
  auto work = [&](int64_t t) {
    int64_t first = seg_at[t], skip = off_at[t];
    int64_t last = seg_at[t + 1], take = off_at[t + 1];
    if (first >= n) return;
    if (take == 0 && last > first) {  // range ends exactly at a segment boundary
      last -= 1;
      take = zp[last];
    }
    if (last == first && take <= skip) return;
    copy_range(sp, dp, zp, first, skip, last, take);
  };
  for (int64_t t = 1; t < threads; ++t) pool.emplace_back(work, t);
  work(0);
  for (auto& th : pool) th.join();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kv_offload, m) {
  m.def("_copy_segments(Tensor src, Tensor dst, Tensor sizes, int num_threads) -> ()");
}

TORCH_LIBRARY_IMPL(kv_offload, CPU, m) { m.impl("_copy_segments", &copy_segments); }

}  // namespace kv_offload
