# SPDX-License-Identifier: Apache-2.0
"""Host<->GPU transfer benchmark for the CUDA engine, against the link's own ceiling.

Measures, on one GPU, between a page-locked ``HostPool`` and device memory:

* the **ceiling**: one large ``cuMemcpyAsync`` of the whole region, each direction;
* a **page-size sweep** (4 KiB .. 4 MiB, scattered pages): batched DMA
  (``cuMemcpyBatchAsync``) versus a ``cuMemcpyAsync`` loop, each direction;
* **Llama-3-8B-like blocks** through ``CudaTransferEngine``: 32 per-layer 64 KiB pages
  (vLLM's LBHNC) versus one contiguous 2 MiB region per block (BLHNC), batched vs loop;
* **16 KiB pages** through the engine (the small-page case);
* **both directions at once** (a store lane and a load lane in flight together);
* a **compute loop** of large bf16 matmuls alone and with transfers running.

Usage (needs a CUDA GPU; without one it exits with status 2 and says so)::

    PYTHONPATH=. python benchmarks/bench_gpu_transfer.py --json OUT.json

JSON fields include ``device``, ``ceiling_d2h_gbps``, ``ceiling_h2d_gbps``, ``d2h_ratio`` and
``h2d_ratio`` (2 MiB Llama blocks in the per-layer layout through the engine, best copy
method, vs the ceiling), ``small_page_h2d_ratio`` (16 KiB pages, H2D), ``bidir_gbps`` and
``compute_slowdown`` (fractional: 0.01 = 1% slower), plus every measurement behind them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from kv_offload.geometry import KVGeometry, PageFormat
from kv_offload.pool import HostPool, PoolSpec
from kv_offload.transfer import Direction, TransferJob, regions_from_layers
from kv_offload.transfer.cuda_batch import CopyMethod, CopyPolicy, plan_calls
from kv_offload.transfer.plan import CopyBatch

GB = 1e9
MiB = 1 << 20


def _geometry(heads: int) -> KVGeometry:
    # Llama-3-8B: 32 layers, 8 KV heads, head size 128, 16-token blocks, bf16 -> 64 KiB pages.
    return KVGeometry(
        num_layers=32, num_kv_heads=heads, head_size=128, block_size=16, dtype=torch.bfloat16,
        page_format=PageFormat.HND,
    )  # fmt: skip


def _timed(stream: torch.cuda.Stream, enqueue: Callable[[], None], reps: int) -> float:
    """Median seconds of ``enqueue`` (host enqueue time included: the stream idles meanwhile)."""
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        torch.cuda.synchronize()
        start.record(stream)
        enqueue()
        end.record(stream)
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return float(statistics.median(times))


def _direct(batch: CopyBatch, method: CopyMethod, stream: torch.cuda.Stream, any_order: bool) -> Callable[[], None]:
    from kv_offload.cuda.copy import memcpy_batch_async, memcpy_loop_async

    calls = plan_calls(batch, CopyPolicy(batch_available=method is CopyMethod.BATCH, min_batch_descriptors=1))
    handle = int(stream.cuda_stream)

    def run() -> None:
        for c in calls:
            b = c.batch
            if c.method is CopyMethod.BATCH:
                memcpy_batch_async(b.src, b.dst, b.sizes, handle, src_order_any=any_order)
            else:
                memcpy_loop_async(b.src, b.dst, b.sizes, handle)

    return run


def ceiling(host: torch.Tensor, dev: torch.Tensor, stream: torch.cuda.Stream, reps: int) -> dict[str, float]:
    n = dev.numel()
    one = np.array([n], dtype=np.int64)
    h, d = np.array([host.data_ptr()], np.int64), np.array([dev.data_ptr()], np.int64)
    out = {}
    for name, src, dst in (("d2h", d, h), ("h2d", h, d)):
        t = _timed(stream, _direct(CopyBatch(src, dst, one), CopyMethod.LOOP, stream, False), reps)
        out[name] = n / t / GB
    return out


def sweep(host: torch.Tensor, dev: torch.Tensor, stream: torch.cuda.Stream, reps: int, batch_ok: bool,
          max_descriptors: int) -> list[dict[str, Any]]:  # fmt: skip
    rng = np.random.default_rng(0)
    rows = []
    page = 4096
    while page <= 4 * MiB:
        n = min(dev.numel() // page, max_descriptors, max(1, (256 * MiB) // page))
        dev_off = rng.permutation(dev.numel() // page)[:n].astype(np.int64) * page
        host_off = rng.permutation(host.numel() // page)[:n].astype(np.int64) * page
        sizes = np.full(n, page, dtype=np.int64)
        d, h = dev.data_ptr() + dev_off, host.data_ptr() + host_off
        row: dict[str, Any] = {"page_bytes": page, "descriptors": n, "bytes": n * page}
        for direction, src, dst in (("d2h", d, h), ("h2d", h, d)):
            methods = [CopyMethod.BATCH, CopyMethod.LOOP] if batch_ok else [CopyMethod.LOOP]
            for m in methods:
                t = _timed(stream, _direct(CopyBatch(src, dst, sizes), m, stream, direction == "h2d"), reps)
                row[f"{direction}_{m.value}_gbps"] = n * page / t / GB
        rows.append(row)
        page *= 2
    return rows


class EngineRig:
    """A KV cache in one layout on the GPU, a pinned pool, and engines over them."""

    def __init__(self, geometry: KVGeometry, layout: str, num_blocks: int) -> None:
        g = geometry
        tail = (g.num_kv_heads, g.block_size, g.head_size + g.v_head_size)
        if layout == "LBHNC":
            self.storage = torch.empty(g.num_layers, num_blocks, *tail, dtype=g.dtype, device="cuda")
            layers = [self.storage[i] for i in range(g.num_layers)]
        else:
            self.storage = torch.empty(num_blocks, g.num_layers, *tail, dtype=g.dtype, device="cuda")
            layers = [self.storage[:, i] for i in range(g.num_layers)]
        self.geometry = g
        self.num_blocks = num_blocks
        self.regions = regions_from_layers(layers, g)
        self.pool = HostPool(PoolSpec(capacity_bytes=num_blocks * g.slot_bytes, slot_bytes=g.slot_bytes))
        if not self.pool.pinned:
            raise SystemExit("bench_gpu_transfer: the host pool could not be page-locked")

    def engine(self, batch: bool) -> Any:
        from kv_offload.transfer.cuda_engine import CudaTransferEngine

        return CudaTransferEngine(self.regions, self.pool.tensor, policy=CopyPolicy(batch_available=batch))

    def close(self) -> None:
        self.pool.close()


def run_jobs(engine: Any, jobs: list[TransferJob]) -> tuple[float, float]:
    """(wall GB/s from first submit to last completion, device GB/s from the jobs' own timings)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for job in jobs:
        engine.submit(job)
    engine.wait([j.job_id for j in jobs])
    wall = time.perf_counter() - t0
    results = engine.poll()
    if not all(r.success for r in results) or len(results) != len(jobs):
        raise RuntimeError(f"transfer failed: {[r.error for r in results if not r.success]}")
    nbytes = sum(r.nbytes for r in results)
    return nbytes / wall / GB, nbytes / sum(r.seconds for r in results) / GB


def make_jobs(rig: EngineRig, direction: Direction, n_jobs: int, per_job: int, first_id: int,
              seed: int) -> list[TransferJob]:  # fmt: skip
    rng = np.random.default_rng(seed)
    jobs = []
    for i in range(n_jobs):
        blocks = rng.permutation(rig.num_blocks)[:per_job]
        slots = rng.permutation(rig.num_blocks)[:per_job]
        jobs.append(TransferJob.make(first_id + i, direction, blocks, slots))
    return jobs


def engine_cases(rig: EngineRig, methods: list[bool], reps: int, per_job: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for batch in methods:
        engine = rig.engine(batch)
        name = "batch" if batch else "loop"
        for direction in Direction:
            key = "d2h" if direction is Direction.STORE else "h2d"
            run_jobs(engine, make_jobs(rig, direction, 1, per_job, 0, 0))  # warm-up
            walls, devs = [], []
            for r in range(reps):
                w, d = run_jobs(engine, make_jobs(rig, direction, 4, per_job, 100 * (r + 1), r))
                walls.append(w)
                devs.append(d)
            out[f"{key}_{name}_gbps"] = statistics.median(walls)
            out[f"{key}_{name}_device_gbps"] = statistics.median(devs)
        engine.shutdown()
    return out


def bidirectional(rig: EngineRig, batch: bool, reps: int, per_job: int) -> float:
    engine = rig.engine(batch)
    half = rig.num_blocks // 2
    results = []
    for r in range(reps + 1):
        jobs = []
        for i in range(4):
            base = 1000 * r + 10 * i
            lo = np.arange(per_job) % half
            jobs.append(TransferJob.make(base, Direction.STORE, lo, lo))
            jobs.append(TransferJob.make(base + 1, Direction.LOAD, half + lo, half + lo))
        wall_gbps, _ = run_jobs(engine, jobs)
        if r:  # the first round warms up
            results.append(wall_gbps)
    engine.shutdown()
    return float(statistics.median(results))


def compute_slowdown(rig: EngineRig, batch: bool, size: int, iters: int) -> dict[str, float]:
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    c = torch.empty_like(a)
    compute = torch.cuda.current_stream()
    chunks, jobs_per_chunk, per_job = 10, 2, 64

    def timed(with_transfers: bool) -> tuple[float, int]:
        engine = rig.engine(batch) if with_transfers else None
        moved = 0
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        start.record(compute)
        ids: list[int] = []
        for k in range(chunks):
            if engine is not None:
                # Submitted between matmul chunks, as the connector does between steps:
                # each job waits for the compute so far, then overlaps the next chunk.
                # Stores read the lower half of the cache, loads write the upper half.
                half = rig.num_blocks // 2
                for j in range(jobs_per_chunk):
                    lo = (np.arange(per_job) + j * per_job) % half
                    for direction in Direction:
                        job_id = len(ids)
                        blocks = lo if direction is Direction.STORE else half + lo
                        engine.submit(TransferJob.make(job_id, direction, blocks, blocks))
                        ids.append(job_id)
            for _ in range(iters // chunks):
                torch.mm(a, b, out=c)
        end.record(compute)
        end.synchronize()
        if engine is not None:
            engine.wait(ids)
            moved = sum(r.nbytes for r in engine.poll())
            engine.shutdown()
        return start.elapsed_time(end) / 1e3, moved

    timed(False)  # warm-up (cuBLAS heuristics, clocks)
    alone = statistics.median(timed(False)[0] for _ in range(3))
    withs = [timed(True) for _ in range(3)]
    with_t = statistics.median(t for t, _ in withs)
    moved = withs[0][1]
    return {
        "compute_alone_s": alone,
        "compute_with_transfers_s": with_t,
        "compute_slowdown": with_t / alone - 1.0,
        "bytes_moved_during_compute": float(moved),
        "tflops_alone": 2 * size**3 * (iters // chunks * chunks) / alone / 1e12,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--pool-mib", type=int, default=1024, help="pinned pool for the ceiling and sweep")
    parser.add_argument("--max-descriptors", type=int, default=16384, help="per sweep measurement")
    parser.add_argument("--matmul-size", type=int, default=8192)
    parser.add_argument("--matmul-iters", type=int, default=100)
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print(
            "bench_gpu_transfer: no CUDA device here (torch.cuda.is_available() is False). This benchmark"
            " measures host<->GPU DMA and must run on a GPU machine; see docs/architecture_gpu.md.",
            file=sys.stderr,
        )
        return 2

    import cuda.bindings

    from kv_offload.cuda.copy import probe_batch_memcpy
    from kv_offload.cuda.runtime import driver_version

    dev_index = torch.cuda.current_device()
    why_not = probe_batch_memcpy(dev_index)
    batch_ok = why_not is None
    methods = [True, False] if batch_ok else [False]
    stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(dev_index),
        "driver_cuda_version": driver_version(),
        "torch": torch.__version__,
        "cuda_bindings": str(cuda.bindings.__version__),
        "batched_dma": batch_ok,
        "batched_dma_unavailable_reason": why_not,
    }

    # Ceiling and sweep: the same pinned pool memory and one device buffer.
    pool = HostPool(PoolSpec(capacity_bytes=args.pool_mib * MiB, slot_bytes=4 * MiB, prefault=True))
    if not pool.pinned:
        print("bench_gpu_transfer: the host pool could not be page-locked", file=sys.stderr)
        return 3
    host = pool.tensor.view(-1)
    dev = torch.empty(host.numel(), dtype=torch.uint8, device="cuda")
    ceil = ceiling(host, dev, stream, args.reps)
    report["ceiling_d2h_gbps"], report["ceiling_h2d_gbps"] = ceil["d2h"], ceil["h2d"]
    report["sweep"] = sweep(host, dev, stream, args.reps, batch_ok, args.max_descriptors)
    del host, dev
    pool.close()
    torch.cuda.empty_cache()

    # Llama-3-8B-like blocks through the engine: per-layer 64 KiB pages vs packed 2 MiB.
    llama = _geometry(8)
    cases: dict[str, dict[str, float]] = {}
    for layout in ("LBHNC", "BLHNC"):
        rig = EngineRig(llama, layout, num_blocks=256)
        cases[f"llama_{layout}"] = engine_cases(rig, methods, args.reps, per_job=64)
        if layout == "LBHNC":
            report["bidir_gbps"] = bidirectional(rig, batch_ok, args.reps, per_job=64)
            report.update(compute_slowdown(rig, batch_ok, args.matmul_size, args.matmul_iters))
        rig.close()
    # 16 KiB pages (2 KV heads), per-layer: the small-page case.
    rig = EngineRig(_geometry(2), "LBHNC", num_blocks=1024)
    cases["small_16k_LBHNC"] = engine_cases(rig, methods, args.reps, per_job=256)
    rig.close()
    report["cases"] = cases

    def best(case: str, key: str) -> float:
        return max(v for k, v in cases[case].items() if k.startswith(key) and not k.endswith("device_gbps"))

    report["d2h_ratio"] = best("llama_LBHNC", "d2h") / ceil["d2h"]
    report["h2d_ratio"] = best("llama_LBHNC", "h2d") / ceil["h2d"]
    report["d2h_ratio_packed"] = best("llama_BLHNC", "d2h") / ceil["d2h"]
    report["h2d_ratio_packed"] = best("llama_BLHNC", "h2d") / ceil["h2d"]
    report["small_page_h2d_ratio"] = best("small_16k_LBHNC", "h2d") / ceil["h2d"]
    report["bidir_vs_ceiling"] = report["bidir_gbps"] / max(ceil["d2h"], ceil["h2d"])

    _print(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


def _print(report: dict[str, Any]) -> None:
    print(f"device: {report['device']}  batched DMA: {report['batched_dma']}")
    print(f"ceiling  D2H {report['ceiling_d2h_gbps']:6.1f} GB/s   H2D {report['ceiling_h2d_gbps']:6.1f} GB/s")
    print(f"{'page':>9} {'n':>6} " + " ".join(f"{k:>10}" for k in ("d2h batch", "d2h loop", "h2d batch", "h2d loop")))
    for row in report["sweep"]:
        vals = [row.get(k) for k in ("d2h_batch_gbps", "d2h_loop_gbps", "h2d_batch_gbps", "h2d_loop_gbps")]
        cells = " ".join(f"{v:10.1f}" if v is not None else f"{'-':>10}" for v in vals)
        print(f"{row['page_bytes']:>9} {row['descriptors']:>6} {cells}")
    for name, case in report["cases"].items():
        print(f"{name}: " + ", ".join(f"{k}={v:.1f}" for k, v in case.items()))
    for key in ("d2h_ratio", "h2d_ratio", "d2h_ratio_packed", "h2d_ratio_packed", "small_page_h2d_ratio",
                "bidir_gbps", "bidir_vs_ceiling", "compute_slowdown"):  # fmt: skip
        print(f"{key:>22}: {report[key]:.3f}")


if __name__ == "__main__":
    sys.exit(main())
