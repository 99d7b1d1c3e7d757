# SPDX-License-Identifier: Apache-2.0
"""Disk tier throughput against a plain sequential write/read of the same bytes.

For each block size (64 KiB, 256 KiB, 1 MiB, 2 MiB) the tier writes ``--mib`` MiB of blocks from
page-aligned buffers (as the host pool's slots are) in batches, then reads them back into
page-aligned buffers; the baseline writes the same bytes to one file sequentially, one block
size per call, single-threaded, then reads them back. Both use O_DIRECT when the tier's probe
found the file system takes it (then the page cache is out of the picture), buffered I/O
otherwise; write times include flushing to the device (``fdatasync``/``syncfs``), and the page
cache of every file is dropped with ``posix_fadvise(DONTNEED)`` between write and read. The
restart index time is measured on ``--index-blocks`` 4 KiB blocks and scaled to 10^5. Each
size runs ``--repeat`` times and the medians (ratios too) are reported.

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

from kv_offload.tiers.disk import DiskTier
from kv_offload.tiers.disk.files import AlignedBuffer

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


def bench_size(d: str, bs: int, total: int, threads: int) -> dict[str, float]:
    n = total // bs
    src = AlignedBuffer(n * bs)
    src.map.write(os.urandom(1 << 20) * (n * bs >> 20))
    dst = AlignedBuffer(n * bs)
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
    _drop(path)
    t0 = time.perf_counter()
    for i in range(0, n, BATCH):
        assert all(t.read(keys[i : i + BATCH], outs[i : i + BATCH]))
    r = time.perf_counter() - t0
    assert dst.view == src.view
    direct = t.direct
    t.close()
    shutil.rmtree(path)

    plain = os.path.join(d, f"plain-{bs}")
    flag = getattr(os, "O_DIRECT", 0) if direct else 0
    t0 = time.perf_counter()
    fd = os.open(plain, os.O_CREAT | os.O_WRONLY | flag, 0o600)
    for i in range(n):
        os.pwrite(fd, views[i], i * bs)
    os.fdatasync(fd)
    os.close(fd)
    pw = time.perf_counter() - t0
    _drop(plain)
    fd = os.open(plain, os.O_RDONLY | flag)
    t0 = time.perf_counter()
    for i in range(n):
        os.preadv(fd, [outs[i]], i * bs)
    pr = time.perf_counter() - t0
    os.close(fd)
    os.unlink(plain)
    for v in views + outs:
        v.release()
    src.close(), dst.close()
    gb = n * bs / 1e9
    return {
        "block_kib": bs >> 10, "blocks": n, "io_mode": "direct" if direct else "buffered",
        "tier_write_gbs": gb / w, "tier_read_gbs": gb / r, "plain_write_gbs": gb / pw,
        "plain_read_gbs": gb / pr, "write_ratio": pw / w, "read_ratio": pr / r,
    }  # fmt: skip


def bench_repeated(d: str, bs: int, total: int, threads: int, repeat: int) -> dict[str, float]:
    """Median of ``repeat`` runs (tier then plain, alternating): this VM's disk is noisy."""
    runs = [bench_size(d, bs, total, threads) for _ in range(repeat)]
    out = dict(runs[0])
    for k in ("tier_write_gbs", "tier_read_gbs", "plain_write_gbs", "plain_read_gbs", "write_ratio", "read_ratio"):
        out[k] = statistics.median(r[k] for r in runs)
    return out


def bench_index(d: str, blocks: int) -> dict[str, float]:
    bs = 4096
    path = os.path.join(d, "index")
    buf = AlignedBuffer(bs * 256)
    keys = _keys(blocks)
    with DiskTier(path, blocks * bs, NS, bs, threads=4) as t:
        for i in range(0, blocks, 256):
            chunk = keys[i : i + 256]
            assert all(t.write([(k, buf.view[j * bs : (j + 1) * bs]) for j, k in enumerate(chunk)]))
    with DiskTier(path, blocks * bs, NS, bs) as t:
        s = t.stats()
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
    ap.add_argument("--index-blocks", type=int, default=100_000, help="blocks for the restart index time")
    args = ap.parse_args()
    d = tempfile.mkdtemp(prefix="kvo-bench-", dir=args.dir)
    os.chmod(d, 0o700)
    try:
        rows = [bench_repeated(d, bs, args.mib << 20, args.threads, args.repeat) for bs in SIZES]
        index = bench_index(d, args.index_blocks)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    print(f"{'block':>8} {'mode':>8} {'tier W':>8} {'plain W':>8} {'ratio':>6} {'tier R':>8} {'plain R':>8} {'ratio':>6}  (GB/s)")
    for r in rows:
        print(
            f"{r['block_kib']:>6}Ki {r['io_mode']:>8} {r['tier_write_gbs']:8.2f} {r['plain_write_gbs']:8.2f} "
            f"{r['write_ratio']:6.2f} {r['tier_read_gbs']:8.2f} {r['plain_read_gbs']:8.2f} {r['read_ratio']:6.2f}"
        )
    print(f"restart index: {index['blocks']} blocks in {index['seconds']:.3f} s ({index['seconds_per_1e5']:.3f} s per 10^5)")
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "mib_per_size": args.mib, "repeat": args.repeat, "threads": args.threads, "batch": BATCH, "sizes": rows, "index": index,
    }  # fmt: skip
    text = json.dumps(result, indent=2)
    if args.json:
        print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
