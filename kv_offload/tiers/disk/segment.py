# SPDX-License-Identifier: Apache-2.0
"""One segment: a ``.dat`` file of block slots and an ``.idx`` file of their entries.

Concurrency across processes:

- a segment is *owned* by at most one live tier instance (``flock`` on its ``.idx``, released by
  the kernel when the owner dies); only the owner allocates its slots, so a dead owner's
  half-written slot is only reused by whoever adopts the segment after the lock came free;
- every slot access takes an OFD byte-range lock on the slot's entry: shared to read, exclusive
  to write or clear. A reader in another process therefore sees the whole old block, or the new
  one, or an empty slot (a clean miss); never a block being rewritten under it.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import os
from collections.abc import Callable

from kv_offload.tiers.disk.files import (
    ALIGN, NOFOLLOW, AlignedBuffer, address_of, direct_flag, lock_range, unlock_range,
)  # fmt: skip
from kv_offload.tiers.disk.format import (
    EMPTY_ENTRY, ENTRY_BYTES, SEGMENT_HEADER_BYTES, Entry, SegmentHeader, checksum, looks_written,
    segment_name,
)  # fmt: skip

__all__ = ["Segment", "ReadResult", "FaultHook"]

#: A test hook called with the name of each step of a slot write (see docs/disk_tier.md);
#: raising from it stops the write there, as a crash would.
FaultHook = Callable[[str], None]


class ReadResult(enum.Enum):
    OK = "ok"
    MISS = "miss"          # empty slot, or the slot now holds another block
    CORRUPT = "corrupt"    # the entry or the body fails its check


class Segment:
    """An open segment of one namespace directory."""

    def __init__(self, dir_fd: int, stem: str, idx_fd: int, dat_fd: int, header: SegmentHeader | None) -> None:
        self.dir_fd = dir_fd
        self.stem = stem
        self.idx_fd = idx_fd
        self.dat_fd = dat_fd
        self.header = header
        self.owned = False
        self.direct = False

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def open(cls, dir_fd: int, stem: str, *, direct: bool, create: bool) -> Segment:
        """Open (or, with ``create``, create) both files owner-only, never through a symlink.
        On a read-only file system an existing segment is opened read-only (reads still work)."""
        flags = os.O_RDWR | NOFOLLOW | (os.O_CREAT if create else 0)
        try:
            idx = os.open(stem + ".idx", flags, 0o600, dir_fd=dir_fd)
        except OSError as e:
            if create or e.errno not in (errno.EROFS, errno.EACCES):
                raise
            flags = os.O_RDONLY | NOFOLLOW
            idx = os.open(stem + ".idx", flags, dir_fd=dir_fd)
        try:
            dat = os.open(stem + ".dat", flags | direct_flag(direct), 0o600, dir_fd=dir_fd)
        except BaseException:
            os.close(idx)
            raise
        seg = cls(dir_fd, stem, idx, dat, None)
        seg.direct = direct
        seg.header = seg.read_header()
        return seg

    def read_header(self) -> SegmentHeader | None:
        return SegmentHeader.unpack(os.pread(self.idx_fd, SEGMENT_HEADER_BYTES, 0))

    def try_claim(self) -> bool:
        """Become the owner if no live instance is (non-blocking)."""
        try:
            fcntl.flock(self.idx_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                return False
            raise
        self.owned = True
        return True

    def initialize(self, namespace: bytes, block_bytes: int, slots: int) -> None:
        """(Owner only.) Lay out a fresh segment; the header is written last, so a crash here
        leaves a segment without a valid header, which the next owner lays out again."""
        try:
            os.ftruncate(self.idx_fd, 0)
            os.ftruncate(self.idx_fd, SEGMENT_HEADER_BYTES + slots * ENTRY_BYTES)
            os.ftruncate(self.dat_fd, 0)
            os.posix_fallocate(self.dat_fd, 0, slots * block_bytes)
        except OSError:
            os.ftruncate(self.dat_fd, 0)  # give back what was reserved
            raise
        header = SegmentHeader(namespace, block_bytes, slots)
        os.pwrite(self.idx_fd, header.pack(), 0)
        self.header = header

    @staticmethod
    def stem_for(block_bytes: int, number: int) -> str:
        return segment_name(block_bytes, number)

    # -- entries ---------------------------------------------------------------------------

    @property
    def slots(self) -> int:
        return self.header.slots if self.header else 0

    def _entry_at(self, slot: int) -> int:
        return SEGMENT_HEADER_BYTES + slot * ENTRY_BYTES

    def entries(self) -> list[Entry | None]:
        """Every slot's entry (``None``: empty or invalid), from one sequential read."""
        if self.header is None:
            return []
        raw = os.pread(self.idx_fd, self.slots * ENTRY_BYTES, SEGMENT_HEADER_BYTES)
        view = memoryview(raw)
        out: list[Entry | None] = []
        for i in range(self.slots):
            chunk = view[i * ENTRY_BYTES : (i + 1) * ENTRY_BYTES]
            out.append(Entry.unpack(chunk) if looks_written(chunk) else None)
        return out

    # -- slot I/O --------------------------------------------------------------------------

    def write(
        self, slot: int, key: bytes, namespace: bytes, body: memoryview, bounce: AlignedBuffer,
        fault: FaultHook | None = None,
    ) -> None:  # fmt: skip
        """Store ``body`` in ``slot`` (owner only). Raises ``OSError`` on an I/O error."""
        entry = Entry.make(namespace, key, body).pack()
        src = body
        if self.direct and not _direct_ok(body):
            bounce.view[:] = body
            src = bounce.view
        at = self._entry_at(slot)
        lock_range(self.idx_fd, at, ENTRY_BYTES, exclusive=True)
        try:
            if fault:
                fault("begin")
            _pwrite_all(self.idx_fd, EMPTY_ENTRY, at)
            if fault:
                fault("cleared")
            off = slot * len(body)
            if fault:  # a torn body: half of it, then the hook
                half = (len(src) // 2) // ALIGN * ALIGN
                _pwrite_all(self.dat_fd, src[:half], off)
                fault("body_half")
                _pwrite_all(self.dat_fd, src[half:], off + half)
            else:
                _pwrite_all(self.dat_fd, src, off)
            if fault:
                fault("body")
            _pwrite_all(self.idx_fd, entry, at)
            if fault:
                fault("committed")
        finally:
            unlock_range(self.idx_fd, at, ENTRY_BYTES)

    def read(self, slot: int, key: bytes, namespace: bytes, dest: memoryview, bounce: AlignedBuffer) -> ReadResult:
        """Copy the block in ``slot`` into ``dest`` if it is ``key``'s and checks out."""
        at = self._entry_at(slot)
        lock_range(self.idx_fd, at, ENTRY_BYTES, exclusive=False)
        try:
            raw = os.pread(self.idx_fd, ENTRY_BYTES, at)
            entry = Entry.unpack(raw)
            if entry is None:
                return ReadResult.CORRUPT if looks_written(raw) else ReadResult.MISS
            if entry.namespace != namespace or entry.key != key or entry.length != len(dest):
                return ReadResult.MISS
            into = dest if not self.direct or _direct_ok(dest) else bounce.view
            n = os.preadv(self.dat_fd, [into], slot * len(dest))
            if n != len(dest) or checksum(into) != entry.body_hash:
                if into is dest:
                    dest[:] = bytes(len(dest))
                return ReadResult.CORRUPT
            if into is not dest:
                dest[:] = into
            return ReadResult.OK
        finally:
            unlock_range(self.idx_fd, at, ENTRY_BYTES)

    def clear(self, slot: int, key: bytes | None) -> bool:
        """Empty ``slot`` if it still holds ``key`` (any valid or invalid entry when ``None``)."""
        at = self._entry_at(slot)
        lock_range(self.idx_fd, at, ENTRY_BYTES, exclusive=True)
        try:
            raw = os.pread(self.idx_fd, ENTRY_BYTES, at)
            if not looks_written(raw):
                return False
            if key is not None:
                entry = Entry.unpack(raw)
                if entry is not None and entry.key != key:
                    return False
            _pwrite_all(self.idx_fd, EMPTY_ENTRY, at)
            return True
        finally:
            unlock_range(self.idx_fd, at, ENTRY_BYTES)

    def close(self) -> None:
        for fd in (self.idx_fd, self.dat_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        self.idx_fd = self.dat_fd = -1
        self.owned = False


def _direct_ok(view: memoryview) -> bool:
    return len(view) % ALIGN == 0 and address_of(view) % ALIGN == 0


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while len(view):
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        view, offset = view[n:], offset + n
