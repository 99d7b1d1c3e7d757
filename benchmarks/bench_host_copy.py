# SPDX-License-Identifier: Apache-2.0
"""Host-copy benchmark: paged gather into contiguous host blocks and scatter back.

Geometry like Llama-3-8B (32 layers, 8 KV heads, head size 128, 16-token blocks, bf16):
a block is 32 per-layer pages of 64 KiB gathered into one 2 MiB host block. The baseline,
measured in the same run, is one plain copy of the same number of bytes between two
contiguous buffers (torch's ``copy_``, which uses every thread). Also measures the
scheduler-side manager's lookup rate.

    python benchmarks/bench_host_copy.py --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from kv_offload.geometry import KVGeometry, PageFormat
from kv_offload.manager import OffloadManager
from kv_offload.policies.lru import LRUPolicy
from kv_offload.pool import HostPool, PinMode, PoolSpec
from kv_offload.transfer import Direction, TransferJob, build_copy_batch, regions_from_layers
from kv_offload.transfer.cpu_engine import CpuTransferEngine
from kv_offload.transfer.cpu_engine import _run_copy_batch as run_copy_batch  # internal: raw addresses

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import cpu_model  # noqa: E402


def median_seconds(fn: Callable[[], None], reps: int) -> float:
    fn()  # warm-up (page faults, thread start)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_copies(args: argparse.Namespace) -> list[dict[str, object]]:
    g = KVGeometry(num_layers=32, num_kv_heads=8, head_size=128, block_size=16,
                   dtype=torch.bfloat16, page_format=PageFormat.HND)  # fmt: skip
    n = args.blocks_per_job
    num_blocks = args.kv_blocks
    # vLLM-like KV cache: one backing allocation, one contiguous region per layer.
    kv = torch.empty(g.num_layers, num_blocks, g.page_elements, dtype=g.dtype)
    kv.view(torch.int16).random_(-30000, 30000)
    layers = [kv[i].view(num_blocks, g.num_kv_heads, g.block_size, -1) for i in range(g.num_layers)]
    pool = HostPool(PoolSpec(capacity_bytes=args.pool_blocks * g.slot_bytes, slot_bytes=g.slot_bytes,
                             pin=PinMode.NEVER, prefault=True))  # fmt: skip
    regions = regions_from_layers(layers, g)
    rng = np.random.default_rng(0)
    nbytes = n * g.block_bytes
    src_flat = torch.empty(nbytes, dtype=torch.uint8)
    src_flat.random_(0, 256)
    dst_flat = torch.empty_like(src_flat)
    dst_flat.zero_()

    memcpy_s = median_seconds(lambda: dst_flat.copy_(src_flat), args.reps)
    rows = []
    for direction in (Direction.STORE, Direction.LOAD):
        label = "gather: pages -> host blocks" if direction is Direction.STORE else "scatter: host blocks -> pages"
        jobs = [
            TransferJob.make(i, direction, rng.choice(num_blocks, n, replace=False),
                             rng.choice(pool.num_slots, n, replace=False))  # fmt: skip
            for i in range(args.reps + 1)
        ]
        batches = [build_copy_batch(j, regions, pool.base_ptr, pool.slot_bytes, pool.num_slots) for j in jobs]
        it = iter(batches)
        op_s = median_seconds(lambda: run_copy_batch(next(it), args.threads), args.reps)
        # The same through the engine (queue, background thread, completion), as the connector uses it.
        engine = CpuTransferEngine(regions, pool.tensor, num_threads=args.threads)
        jit = iter(jobs)

        def through_engine() -> None:
            job = next(jit)
            job = TransferJob(job.job_id + 1000 * len(rows), job.direction, job.device_blocks, job.host_slots)
            engine.submit(job)
            engine.wait([job.job_id])
            assert all(r.success for r in engine.poll())

        engine_s = median_seconds(through_engine, args.reps)
        engine.shutdown()
        descriptors = batches[0].num_descriptors
        del engine, batches, it
        rows.append({
            "op": label,
            "blocks": n,
            "bytes": nbytes,
            "descriptors": descriptors,
            "threads": args.threads,
            "seconds": op_s,
            "gbps": nbytes / op_s / 1e9,
            "engine_gbps": nbytes / engine_s / 1e9,
            "memcpy_gbps": nbytes / memcpy_s / 1e9,
            "ratio_vs_memcpy": memcpy_s / op_s,
            "engine_ratio_vs_memcpy": memcpy_s / engine_s,
        })
    del layers, regions
    pool.close()
    return rows


def bench_lookups(args: argparse.Namespace) -> dict[str, float]:
    rng = np.random.default_rng(1)
    num = args.lookup_blocks
    keys = [bytes(row) for row in rng.integers(0, 256, (num, 32), dtype=np.uint8)]
    m = OffloadManager(num, LRUPolicy(num))
    for i in range(0, num, 1000):
        plan = m.prepare_store(keys[i : i + 1000])
        assert plan is not None
        m.complete_store(plan.keys)
    # Requests of 1000-block (16K-token) prefixes, all hits, so every key is examined.
    queries = [keys[i : i + 1000] for i in range(0, num, 1000)]
    t0 = time.perf_counter()
    total = 0
    for _ in range(args.lookup_rounds):
        for q in queries:
            total += m.lookup(q)
    seconds = time.perf_counter() - t0
    return {"keys": float(total), "seconds": seconds, "keys_per_s": total / seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write results here")
    p.add_argument("--blocks-per-job", type=int, default=64, help="2 MiB blocks per copy job")
    p.add_argument("--kv-blocks", type=int, default=512, help="blocks in the KV cache")
    p.add_argument("--pool-blocks", type=int, default=256, help="blocks in the host pool")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--lookup-blocks", type=int, default=100_000)
    p.add_argument("--lookup-rounds", type=int, default=20)
    args = p.parse_args()

    rows = bench_copies(args)
    lookups = bench_lookups(args)
    print(f"CPU: {cpu_model()}  ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})")
    print(f"Llama-3-8B-like geometry: 32 x 64 KiB pages -> 2 MiB host blocks, {args.blocks_per_job} blocks/job")
    header = f"{'op':32} {'descr':>6} {'GB/s':>7} {'engine':>7} {'memcpy':>7} {'ratio':>6} {'eng.ratio':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['op']:32} {r['descriptors']:>6} {r['gbps']:7.2f} {r['engine_gbps']:7.2f} "
              f"{r['memcpy_gbps']:7.2f} {r['ratio_vs_memcpy']:6.2f} {r['engine_ratio_vs_memcpy']:9.2f}")  # fmt: skip
    print(f"manager lookups: {lookups['keys_per_s'] / 1e6:.2f} M block keys/s (goal >= 2)")
    result = {
        "benchmark": "host_copy",
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
        "gbps": min(float(str(r["gbps"])) for r in rows),
        "ratio_vs_memcpy": min(float(str(r["ratio_vs_memcpy"])) for r in rows),
        "rows": rows,
        "manager_lookups_per_s": lookups["keys_per_s"],
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
