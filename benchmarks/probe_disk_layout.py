# SPDX-License-Identifier: Apache-2.0
"""Measure the two candidate disk-tier layouts on one file system (the figures behind docs/disk_tier.md).

A: one file per block (create a temp file, one ``pwritev`` of header + body, rename; read = open +
``preadv`` + close). B: one preallocated segment file with fixed slots (``pwritev``/``preadv`` at
an offset, no open or rename). C: a plain sequential write/read of the same bytes in one file.
All with O_DIRECT where the file system takes it, so the page cache plays no part.

    python benchmarks/probe_disk_layout.py --dir DIR [--mib 256] [--threads 1 2 4]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

HDR = 4096


def _aligned(n: int) -> mmap.mmap:
    m = mmap.mmap(-1, n)
    m.write(os.urandom(min(n, 1 << 20)) * (n // min(n, 1 << 20)))
    return m


def _direct_ok(d: str) -> int:
    path = os.path.join(d, ".probe")
    try:
        fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_DIRECT, 0o600)
        try:
            os.pwrite(fd, _aligned(4096), 0)
        finally:
            os.close(fd)
        return os.O_DIRECT
    except OSError:
        return 0
    finally:
        if os.path.exists(path):
            os.unlink(path)


def _chunks(n: int, k: int) -> list[range]:
    step = (n + k - 1) // k
    return [range(i, min(n, i + step)) for i in range(0, n, step)]


def run(d: str, bs: int, total: int, threads: int, direct: int) -> dict[str, float]:
    n = total // bs
    hdr, body = _aligned(HDR), _aligned(bs)
    out: dict[str, float] = {}
    pool = ThreadPoolExecutor(threads)

    # A: file per block
    fdir = os.path.join(d, "files")
    os.makedirs(fdir)

    def a_write(r: range) -> None:
        for i in r:
            tmp, fin = os.path.join(fdir, f"{i}.tmp"), os.path.join(fdir, f"{i}.blk")
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | direct, 0o600)
            os.pwritev(fd, [hdr, body], 0)
            os.close(fd)
            os.rename(tmp, fin)

    rbufs = [(_aligned(HDR), _aligned(bs)) for _ in range(threads)]

    def a_read(r: range, t: int) -> None:
        h, b = rbufs[t]
        for i in r:
            fd = os.open(os.path.join(fdir, f"{i}.blk"), os.O_RDONLY | direct)
            os.preadv(fd, [h, b], 0)
            os.close(fd)

    t0 = time.perf_counter()
    list(pool.map(a_write, _chunks(n, threads)))
    out["file_write"] = total / (time.perf_counter() - t0) / 1e9
    os.sync()
    t0 = time.perf_counter()
    list(pool.map(a_read, _chunks(n, threads), range(threads)))
    out["file_read"] = total / (time.perf_counter() - t0) / 1e9
    shutil.rmtree(fdir)

    # B: segment file with slots
    seg = os.path.join(d, "segment")
    fd = os.open(seg, os.O_CREAT | os.O_RDWR | direct, 0o600)
    os.posix_fallocate(fd, 0, n * (bs + HDR))

    def b_write(r: range) -> None:
        for i in r:
            os.pwritev(fd, [hdr, body], i * (bs + HDR))

    def b_read(r: range, t: int) -> None:
        h, b = rbufs[t]
        for i in r:
            os.preadv(fd, [h, b], i * (bs + HDR))

    t0 = time.perf_counter()
    list(pool.map(b_write, _chunks(n, threads)))
    out["segment_write"] = total / (time.perf_counter() - t0) / 1e9
    t0 = time.perf_counter()
    list(pool.map(b_read, _chunks(n, threads), range(threads)))
    out["segment_read"] = total / (time.perf_counter() - t0) / 1e9
    os.close(fd)
    os.unlink(seg)

    # C: plain sequential, one thread, chunks of the block size
    plain = os.path.join(d, "plain")
    t0 = time.perf_counter()
    fd = os.open(plain, os.O_CREAT | os.O_WRONLY | direct, 0o600)
    for i in range(n):
        os.pwrite(fd, body, i * bs)
    os.fdatasync(fd)
    os.close(fd)
    out["plain_write"] = total / (time.perf_counter() - t0) / 1e9
    fd = os.open(plain, os.O_RDONLY | direct)
    t0 = time.perf_counter()
    for i in range(n):
        os.preadv(fd, [rbufs[0][1]], i * bs)
    out["plain_read"] = total / (time.perf_counter() - t0) / 1e9
    os.close(fd)
    os.unlink(plain)
    pool.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=None, help="a directory on the file system to measure")
    ap.add_argument("--mib", type=int, default=256, help="bytes per pass, MiB")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4])
    args = ap.parse_args()
    d = tempfile.mkdtemp(dir=args.dir)
    try:
        direct = _direct_ok(d)
        print(f"O_DIRECT: {'yes' if direct else 'no (buffered)'}")
        rows = []
        for bs in (64 << 10, 256 << 10, 1 << 20, 2 << 20):
            for t in args.threads:
                r = run(d, bs, args.mib << 20, t, direct)
                rows.append({"block_kib": bs >> 10, "threads": t, **{k: round(v, 3) for k, v in r.items()}})
                print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(d)


if __name__ == "__main__":
    main()
