# SPDX-License-Identifier: Apache-2.0
"""Disk tier throughput against a plain sequential write/read of the same bytes.

For each block size (64 KiB, 256 KiB, 1 MiB, 2 MiB) the tier writes ``--mib`` MiB of blocks from
page-aligned buffers (as the host pool's slots are) in batches, then reads them back into
page-aligned buffers; the baseline writes the same bytes to one file sequentially, one block
size per call, single-threaded, then reads them back. Both writes come first, then both reads,
tier first or plain first in turn (so neither read always follows the other's writes). Both
use O_DIRECT when the tier's probe found the file system takes it (then the page cache is out of the picture), buffered I/O
otherwise; write times include flushing to the device (``fdatasync``/``syncfs``), and the page
cache of every file is dropped with ``posix_fadvise(DONTNEED)`` between write and read. The
restart index time is measured on ``--index-blocks`` 4 KiB blocks and scaled to 10^5. Each
size runs ``--repeat`` times and the medians (ratios too) are reported.

Promotion latency, disk -> KV cache, through the connector's path: a :class:`TierIO` over the
tier reads the blocks into page-aligned pool slots (entries and checksums verified), then a
:class:`CpuTransferEngine` copies them into a KV cache of CPU tensors (vLLM's CPU page format,
4 layers); each promotion waits for both legs. Promotions of 1 and of 16 blocks, the page cache
of the tier's files dropped before each; the baseline in the same rounds, first or second in
turn: one
``os.preadv`` per block of the same bytes from a plain file into an aligned buffer, then a
``copy_`` of each layer's page into the KV cache. Reported per block, in microseconds; the
ratio is the median of each round's tier / plain.

A promotion behind write-backs (1 MiB blocks): ``--backlog`` write-back jobs of 24 blocks
(the soak's pool) are submitted to the tier's I/O, then, 2 ms later (the first of them
running), a one-block promotion read. Reads run on their own thread
(:mod:`kv_offload.transfer.tier_io`): the read's latency is reported against the time the
backlog alone takes to drain (what the read would wait in submission order on one thread,
the baseline) and against the same read on an idle tier; the backlog's drain time with the
read says what the read costs the writes. Medians of ``--promote-rounds`` rounds, the page
cache dropped before each.

    python benchmarks/bench_disk_tier.py --json [--out FILE] [--dir DIR] [--mib 256]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from typing import Any

import torch

from kv_offload.geometry import KVGeometry, PageFormat
from kv_offload.tiers.disk import DiskTier
from kv_offload.tiers.disk.files import AlignedBuffer
from kv_offload.transfer import Direction, TransferJob, regions_from_layers
from kv_offload.transfer.cpu_engine import CpuTransferEngine
from kv_offload.transfer.tier_io import TierIO

NS = bytes(range(16))
SIZES = [64 << 10, 256 << 10, 1 << 20, 2 << 20]
BATCH = 32


def _drop(path: str) -> None:
    for dirpath, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _keys(n: int) -> list[bytes]:
    return [NS + i.to_bytes(16, "little") for i in range(n)]


def bench_size(d: str, bs: int, total: int, threads: int, plain_first: bool = False) -> dict[str, Any]:
    """One run: both writes (tier, then plain), then both reads, in the order asked (the
    repeats alternate it, so neither read always follows the other's writes)."""
    n = total // bs
    src = AlignedBuffer(n * bs)
    src.map.write(os.urandom(1 << 20) * (n * bs >> 20))
    dst = AlignedBuffer(n * bs)
    # Touch the destination first: pool slots are faulted in long before a read lands in them,
    # and whichever read went first into fresh pages paid the page faults (about 2.5 -> 0.8
    # GB/s for a single-threaded tier read at 1 MiB here), which biased the ratio by the order.
    dst.map.write(bytes(n * bs))
    views = [src.view[i * bs : (i + 1) * bs] for i in range(n)]
    outs = [dst.view[i * bs : (i + 1) * bs] for i in range(n)]
    keys = _keys(n)
    path = os.path.join(d, f"tier-{bs}")
    t = DiskTier(path, (n + 1) * bs, NS, bs, threads=threads, segment_bytes=n * bs)
    t0 = time.perf_counter()
    for i in range(0, n, BATCH):
        assert all(t.write(list(zip(keys[i : i + BATCH], views[i : i + BATCH]))))
    os.sync()
    w = time.perf_counter() - t0
    direct = t.direct
    plain = os.path.join(d, f"plain-{bs}")
    flag = getattr(os, "O_DIRECT", 0) if direct else 0
    t0 = time.perf_counter()
    fd = os.open(plain, os.O_CREAT | os.O_WRONLY | flag, 0o600)
    for i in range(n):
        os.pwrite(fd, views[i], i * bs)
    os.fdatasync(fd)
    os.close(fd)
    pw = time.perf_counter() - t0

    def tier_read() -> float:
        _drop(path)
        t0 = time.perf_counter()
        for i in range(0, n, BATCH):
            assert all(t.read(keys[i : i + BATCH], outs[i : i + BATCH]))
        r = time.perf_counter() - t0
        assert dst.view == src.view
        return r

    def plain_read() -> float:
        _drop(plain)
        fd = os.open(plain, os.O_RDONLY | flag)
        t0 = time.perf_counter()
        for i in range(n):
            os.preadv(fd, [outs[i]], i * bs)
        r = time.perf_counter() - t0
        os.close(fd)
        return r

    if plain_first:
        pr, r = plain_read(), tier_read()
    else:
        r, pr = tier_read(), plain_read()
    t.close()
    shutil.rmtree(path)
    os.unlink(plain)
    for v in views + outs:
        v.release()
    src.close()
    dst.close()
    gb = n * bs / 1e9
    return {
        "block_kib": bs >> 10, "blocks": n, "io_mode": "direct" if direct else "buffered",
        "tier_write_gbs": gb / w, "tier_read_gbs": gb / r, "plain_write_gbs": gb / pw,
        "plain_read_gbs": gb / pr, "write_ratio": pw / w, "read_ratio": pr / r,
    }  # fmt: skip


def bench_repeated(d: str, bs: int, total: int, threads: int, repeat: int) -> dict[str, Any]:
    """Median of ``repeat`` runs (the reads' order alternating): this VM's disk is noisy."""
    runs = [bench_size(d, bs, total, threads, plain_first=bool(i % 2)) for i in range(repeat)]
    out = dict(runs[0])
    for k in ("tier_write_gbs", "tier_read_gbs", "plain_write_gbs", "plain_read_gbs", "write_ratio", "read_ratio"):
        out[k] = statistics.median(r[k] for r in runs)
    return out


PROMOTE_SIZES = (1, 16)


def _geometry(bs: int) -> KVGeometry:
    """A KV cache geometry whose host block is ``bs`` bytes: 4 layers, 2 heads of 64, fp16."""
    return KVGeometry(num_layers=4, num_kv_heads=2, head_size=64, block_size=bs // 2048,
                      dtype=torch.float16, page_format=PageFormat.CPU)  # fmt: skip


def bench_promote(d: str, bs: int, rounds: int, threads: int) -> dict[str, float]:
    """Per-block latency of promotions disk -> pool slots -> KV cache against a plain preadv
    plus copy of the same bytes (see the module docstring)."""
    geo = _geometry(bs)
    assert geo.slot_bytes == bs
    most = max(PROMOTE_SIZES)
    n = 4 * most  # blocks on disk; each round reads some of them again (page cache dropped)
    layers = [torch.zeros(2 * most, geo.num_kv_heads, geo.block_size, 2 * geo.head_size, dtype=geo.dtype)
              for _ in range(geo.num_layers)]  # fmt: skip
    pool_buf = AlignedBuffer(most * bs)
    pool = torch.frombuffer(pool_buf.map, dtype=torch.uint8, count=most * bs).view(most, bs)
    src = AlignedBuffer(n * bs)
    src.map.write(os.urandom(n * bs))
    keys = [NS + b"promote" + i.to_bytes(9, "little") for i in range(n)]
    path = os.path.join(d, f"promote-{bs}")
    tier = DiskTier(path, (n + 1) * bs, NS, bs, threads=threads)
    assert all(tier.write([(k, src.view[i * bs : (i + 1) * bs]) for i, k in enumerate(keys)]))
    plain = os.path.join(d, f"promote-plain-{bs}")
    flag = getattr(os, "O_DIRECT", 0) if tier.direct else 0
    fd = os.open(plain, os.O_CREAT | os.O_RDWR | flag, 0o600)
    os.pwrite(fd, src.view, 0)
    os.fsync(fd)
    tio = TierIO(tier, pool)
    engine = CpuTransferEngine(regions_from_layers(layers, geo), pool, num_threads=2)
    buf = AlignedBuffer(most * bs)
    buf_t = torch.frombuffer(buf.map, dtype=torch.uint8, count=most * bs)
    # the plain copy's destinations: each layer's page of each KV cache block, as bytes
    pages = [[t[b].view(torch.uint8).reshape(-1) for t in layers] for b in range(2 * most)]
    page = geo.page_bytes
    jid = 0
    out: dict[str, float] = {"block_kib": bs >> 10}
    try:
        for count in PROMOTE_SIZES:
            tier_us: list[float] = []
            plain_us: list[float] = []
            for r in range(rounds + 1):  # round 0 warms up (first touches, threads) and is dropped
                first = (r * count) % n
                idx = list(range(first, first + count))
                dev = list(range(count))  # tier -> KV blocks [0, count), plain -> [most, most + count)

                def via_tier() -> None:
                    nonlocal jid
                    _drop(path)
                    jid += 1
                    t0 = time.perf_counter()
                    tio.read(jid, [keys[i] for i in idx], list(range(count)))
                    tio.wait_all()
                    assert all(res.success for res in tio.poll())
                    engine.submit(TransferJob.make(jid, Direction.LOAD, dev, list(range(count))))
                    engine.wait([jid])
                    tier_us.append((time.perf_counter() - t0) * 1e6 / count)
                    assert all(res.success for res in engine.poll())

                def via_plain() -> None:
                    _drop(plain)
                    t0 = time.perf_counter()
                    for j, i in enumerate(idx):
                        os.preadv(fd, [buf.view[j * bs : (j + 1) * bs]], i * bs)
                        for lay, dst in enumerate(pages[most + j]):
                            dst.copy_(buf_t[j * bs + lay * page : j * bs + (lay + 1) * page])
                    plain_us.append((time.perf_counter() - t0) * 1e6 / count)

                for run in (via_plain, via_tier) if r % 2 else (via_tier, via_plain):
                    run()
                for t in layers:  # the same bytes arrived both ways (compared as bytes: NaNs)
                    u = t.view(torch.uint8)
                    assert torch.equal(u[:count], u[most : most + count]) and bool(u[:count].any())
                    t.zero_()
            tier_us, plain_us = tier_us[1:], plain_us[1:]
            out[f"promote{count}_us_per_block"] = statistics.median(tier_us)
            out[f"plain{count}_us_per_block"] = statistics.median(plain_us)
            out[f"promote{count}_ratio"] = statistics.median(a / b for a, b in zip(tier_us, plain_us))
    finally:
        engine.shutdown()
        tio.shutdown()
        tier.close()
        os.close(fd)
        del pool, buf_t, pages
        for b in (pool_buf, src, buf):
            b.close()
        shutil.rmtree(path, ignore_errors=True)
        os.unlink(plain)
    return out


def bench_read_behind_writes(d: str, rounds: int, threads: int, backlog: int, job_blocks: int = 24) -> dict[str, float]:
    """A one-block promotion read submitted behind ``backlog`` write-backs (see the module
    docstring): its latency, the same read on an idle tier, the backlog's drain time with the
    read and without it."""
    bs = 1 << 20
    slots = backlog * job_blocks + 1
    pool_buf = AlignedBuffer(slots * bs)
    pool_buf.map.write(os.urandom(slots * bs))
    pool = torch.frombuffer(pool_buf.map, dtype=torch.uint8, count=slots * bs).view(slots, bs)
    path = os.path.join(d, "behind")
    tier = DiskTier(path, 4 * slots * bs, NS, bs, threads=threads)
    wanted = NS + b"wanted".ljust(16, b"-")
    assert tier.write([(wanted, pool_buf.view[:bs])]) == [True]
    tio = TierIO(tier, pool)
    jid = 0
    ms: dict[str, list[float]] = {k: [] for k in ("idle", "behind", "drain", "drain_alone")}

    def run(writes: int, read: bool) -> tuple[float, float]:
        """Submit ``writes`` write jobs, then (2 ms later) the read; ms from the first
        submission until the read, and until everything, ended."""
        nonlocal jid
        _drop(path)
        pool[slots - 1].zero_()
        t0 = time.perf_counter()
        for w in range(writes):
            jid += 1
            first = w * job_blocks
            keys = [NS + b"w" + (jid * 1000 + i).to_bytes(15, "little") for i in range(job_blocks)]
            tio.write(jid, keys, list(range(first, first + job_blocks)))
        read_id, read_at = -1, t0
        if read:
            if writes:
                time.sleep(0.002)  # the read arrives while the first write-back runs
            jid += 1
            read_id = jid
            tio.read(read_id, [wanted], [slots - 1])
        left = writes + read
        while left:
            for res in tio.poll():
                assert res.success, res
                left -= 1
                if res.job_id == read_id:
                    read_at = time.perf_counter()
            time.sleep(0.0002)
        if read:
            assert torch.equal(pool[slots - 1], pool[0])  # the block read is the one stored (slot 0's bytes)
        return (read_at - t0) * 1e3, (time.perf_counter() - t0) * 1e3

    try:
        for r in range(rounds + 1):  # round 0 warms up and is dropped
            row = {"idle": run(0, True)[0]}
            for with_read in (True, False) if r % 2 else (False, True):
                if with_read:
                    row["behind"], row["drain"] = run(backlog, True)
                else:
                    row["drain_alone"] = run(backlog, False)[1]
            for k, v in row.items():
                if r:
                    ms[k].append(v)
    finally:
        tio.shutdown()
        tier.close()
        pool_buf.close()  # left to the garbage collector while the pool's views live
        shutil.rmtree(path, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in ms.items()}
    return {
        "backlog_jobs": backlog, "job_blocks": job_blocks, "block_kib": bs >> 10,
        "read_idle_ms": med["idle"], "read_behind_ms": med["behind"],
        "drain_with_read_ms": med["drain"], "drain_alone_ms": med["drain_alone"],
        "behind_over_drain": statistics.median(a / b for a, b in zip(ms["behind"], ms["drain_alone"])),
        "behind_over_idle": statistics.median(a / b for a, b in zip(ms["behind"], ms["idle"])),
    }  # fmt: skip


def bench_index(d: str, blocks: int) -> dict[str, float]:
    bs = 4096
    path = os.path.join(d, "index")
    buf = AlignedBuffer(bs * 256)
    keys = _keys(blocks)
    with DiskTier(path, blocks * bs, NS, bs, threads=4) as t:
        for i in range(0, blocks, 256):
            chunk = keys[i : i + 256]
            assert all(t.write([(k, buf.view[j * bs : (j + 1) * bs]) for j, k in enumerate(chunk)]))
    reopened = DiskTier(path, blocks * bs, NS, bs)
    s = reopened.stats()
    reopened.close()
    buf.close()
    shutil.rmtree(path)
    return {"blocks": s.index_blocks, "seconds": s.index_seconds, "seconds_per_1e5": s.index_seconds * 1e5 / max(1, s.index_blocks)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print the results as JSON after the table")
    ap.add_argument("--out", help="write the JSON to this file")
    ap.add_argument("--dir", help="a directory on the file system to measure (default: the temp dir)")
    ap.add_argument("--mib", type=int, default=256, help="MiB written per block size")
    ap.add_argument("--threads", type=int, default=4, help="the tier's I/O threads")
    ap.add_argument("--repeat", type=int, default=3, help="runs per block size; the medians are reported")
    ap.add_argument("--promote-rounds", type=int, default=15, help="promotions of each size per block size")
    ap.add_argument("--index-blocks", type=int, default=100_000, help="blocks for the restart index time")
    ap.add_argument("--backlog", type=int, default=4, help="write-back jobs queued ahead of a promotion read")
    args = ap.parse_args()
    d = tempfile.mkdtemp(prefix="kvo-bench-", dir=args.dir)
    os.chmod(d, 0o700)
    try:
        rows = [bench_repeated(d, bs, args.mib << 20, args.threads, args.repeat) for bs in SIZES]
        promote = [bench_promote(d, bs, args.promote_rounds, args.threads) for bs in SIZES]
        behind = bench_read_behind_writes(d, args.promote_rounds, args.threads, args.backlog)
        index = bench_index(d, args.index_blocks)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    print(f"{'block':>8} {'mode':>8} {'tier W':>8} {'plain W':>8} {'ratio':>6} {'tier R':>8} {'plain R':>8} {'ratio':>6}  (GB/s)")
    for r in rows:
        print(
            f"{r['block_kib']:>6}Ki {r['io_mode']:>8} {r['tier_write_gbs']:8.2f} {r['plain_write_gbs']:8.2f} "
            f"{r['write_ratio']:6.2f} {r['tier_read_gbs']:8.2f} {r['plain_read_gbs']:8.2f} {r['read_ratio']:6.2f}"
        )
    print(f"\n{'block':>8} " + " ".join(f"{'tier ' + str(c):>9} {'plain ' + str(c):>9} {'ratio':>6}" for c in PROMOTE_SIZES)
          + "  (promotion disk -> KV cache, us per block)")  # fmt: skip
    for p in promote:
        cells = [f"{p[f'promote{c}_us_per_block']:9.0f} {p[f'plain{c}_us_per_block']:9.0f} {p[f'promote{c}_ratio']:6.2f}"
                 for c in PROMOTE_SIZES]  # fmt: skip
        print(f"{p['block_kib']:>6}Ki " + " ".join(cells))
    b = behind
    print(f"promotion read (1 block) submitted behind {b['backlog_jobs']} write-backs of {b['job_blocks']} x "
          f"{b['block_kib']} KiB: {b['read_behind_ms']:.1f} ms; in submission order it would wait for them to drain: "
          f"{b['drain_alone_ms']:.1f} ms (x{b['behind_over_drain']:.2f}); idle tier {b['read_idle_ms']:.1f} ms "
          f"(x{b['behind_over_idle']:.2f}); the backlog with the read drains in {b['drain_with_read_ms']:.1f} ms")  # fmt: skip
    print(f"restart index: {index['blocks']} blocks in {index['seconds']:.3f} s ({index['seconds_per_1e5']:.3f} s per 10^5)")
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "mib_per_size": args.mib, "repeat": args.repeat, "threads": args.threads, "batch": BATCH, "sizes": rows, "index": index,
        "promote_rounds": args.promote_rounds, "promote": promote, "read_behind_writes": behind,
    }  # fmt: skip
    text = json.dumps(result, indent=2)
    if args.json:
        print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
