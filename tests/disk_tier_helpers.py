# SPDX-License-Identifier: Apache-2.0
"""Shared pieces of the disk-tier tests: block contents derived from keys, a small tier, tmpfs."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kv_offload.tiers.disk import DiskTier

NS = bytes.fromhex("00112233445566778899aabbccddeeff")
NS2 = bytes.fromhex("ffeeddccbbaa99887766554433221100")
BB = 8192


def key(i: int, salt: int = 0) -> bytes:
    """A 32-byte key like the content keys: namespace digest, then a per-block part."""
    return NS + (salt.to_bytes(8, "little") + i.to_bytes(8, "little"))


def body(k: bytes, n: int = BB) -> bytes:
    """The block stored under ``k``: pseudo-random bytes that only ``k`` produces."""
    return np.random.default_rng(list(k)).bytes(n)


def tier(path: str, blocks: int = 64, ns: bytes = NS, bb: int = BB, **kw: object) -> DiskTier:
    kw.setdefault("segment_bytes", 8 * bb)
    return DiskTier(path, blocks * bb, ns, bb, **kw)  # type: ignore[arg-type]


def read_back(t: DiskTier, keys: list[bytes], bb: int = BB) -> tuple[list[bool], list[bytearray]]:
    outs = [bytearray(bb) for _ in keys]
    return t.read(keys, [memoryview(o) for o in outs]), outs


def write(t: DiskTier, keys: list[bytes], bb: int = BB) -> list[bool]:
    return t.write([(k, memoryview(body(k, bb))) for k in keys])


@contextlib.contextmanager
def tmpfs(path: str, size: str) -> Iterator[str | None]:
    """A tmpfs of ``size`` mounted at ``path`` (``None`` when this user cannot mount one)."""
    os.makedirs(path, exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=700", "tmpfs", path],
                        capture_output=True).returncode == 0  # fmt: skip
    try:
        yield path if ok else None
    finally:
        if ok:
            subprocess.run(["umount", "-l", path], capture_output=True)


def small_fs(tmp_path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` of its own under ``tmp_path`` (for a fixture to yield from), or a
    skip saying why none can be mounted here."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mnt)],
                         capture_output=True, text=True)  # fmt: skip
    if res.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here (needs root): {res.stderr.strip()[:120]}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(path: Path) -> None:
    """A ballast file at ``path`` taking every free byte of its file system."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            try:
                while os.write(fd, b"\1" * size):
                    pass
            except OSError:
                pass
    finally:
        os.close(fd)
