# SPDX-License-Identifier: Apache-2.0
"""One segment: a ``.dat`` file of block slots and an ``.idx`` file of their entries.

Concurrency across processes:

- a segment is *owned* by at most one live tier instance (``flock`` on its ``.idx``, released by
  the kernel when the owner dies); only the owner allocates its slots, so a dead owner's
  half-written slot is only reused by whoever adopts the segment after the lock came free;
- every slot access takes an OFD byte-range lock on the slot's entry: shared to read, exclusive
  to write or clear. A reader in another process therefore sees the whole old block, or the new
  one, or an empty slot (a clean miss); never a block being rewritten under it. The OFD lock
  belongs to the segment's one descriptor, which the instance's threads share, so the threads
  are counted here (:class:`_SlotLocks`): the OFD lock is taken when a slot's first holder
  arrives and released when its last one leaves, and a thread that wants a slot exclusively
  waits until no other thread of this instance holds it.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import os
import stat
import threading
from collections.abc import Callable, Sequence

from kv_offload.tiers.disk.files import (
    ALIGN, NOFOLLOW, AlignedBuffer, address_of, direct_flag, lock_range, owner_only, unlock_range,
)  # fmt: skip
from kv_offload.tiers.disk.format import (
    EMPTY_ENTRY, ENTRY_BYTES, SEGMENT_HEADER_BYTES, Entry, SegmentHeader, checksum, looks_written,
    segment_name,
)  # fmt: skip

__all__ = ["Segment", "ReadResult", "FaultHook", "UnsafeSegmentFile"]

#: A test hook called with the name of each step of a slot write (see docs/disk_tier.md);
#: raising from it stops the write there, as a crash would.
FaultHook = Callable[[str], None]


class ReadResult(enum.Enum):
    OK = "ok"
    MISS = "miss"          # empty slot, or the slot now holds another block
    CORRUPT = "corrupt"    # the entry or the body fails its check
    RACED = "raced"        # failed its check, then passed it under the exclusive lock: rewritten


class UnsafeSegmentFile(OSError):
    """A segment file that is not a regular file of ours with one link (a FIFO, a device,
    another user's file, a hard link): never used."""


#: ``open`` errors that say what sits at a segment's name is not a file of ours to use.
_UNSAFE_OPEN = {
    errno.ELOOP: "a symlink; not following it", errno.EISDIR: "a directory",
    errno.ENXIO: "a socket or a device with nothing behind it", errno.ENODEV: "a device",
}  # fmt: skip
_KINDS = {stat.S_IFLNK: "a symlink; not following it", stat.S_IFDIR: "a directory", stat.S_IFSOCK: "a socket",
          stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}  # fmt: skip


def _open_named(dir_fd: int, name: str, flags: int) -> int:
    """``os.open`` of ``name`` under ``dir_fd``; a symlink, a directory, a socket or a device
    there is :class:`UnsafeSegmentFile` (skipped with a warning, and another name is used),
    not an I/O error (a directory or a socket planted at a segment name used to stop every
    write: found by tests/test_disk_planted_links.py). Whatever the errno (a device on a
    ``nodev`` mount is EACCES), a name that is not a regular file is unsafe."""
    try:
        return os.open(name, flags, 0o600, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in _UNSAFE_OPEN:
            raise UnsafeSegmentFile(e.errno, _UNSAFE_OPEN[e.errno], name) from None
        try:
            kind = stat.S_IFMT(os.lstat(name, dir_fd=dir_fd).st_mode)
        except OSError:
            raise e from None
        if kind in _KINDS:
            raise UnsafeSegmentFile(e.errno, _KINDS[kind], name) from None
        raise


def check_segment_file(fd: int, name: str) -> None:
    """Refuse an opened segment file that is not a regular file owned by us with one link;
    one with group or other permission bits is made owner-only."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        kind = _KINDS.get(stat.S_IFMT(st.st_mode), "unknown type")
        raise UnsafeSegmentFile(errno.EINVAL, f"not a regular file: {kind}", name)
    if st.st_uid != os.geteuid():
        raise UnsafeSegmentFile(errno.EPERM, f"owned by uid {st.st_uid}, not by this user", name)
    if st.st_nlink != 1:
        raise UnsafeSegmentFile(errno.EMLINK, f"has {st.st_nlink} links, not 1", name)
    owner_only(fd, st, 0o600)


class _SlotLocks:
    """The OFD slot locks of one descriptor, shared by the instance's threads.

    OFD locks do not count holders: two threads of one instance holding a slot shared hold one
    lock, and the first unlock would drop it for both. Here the first holder takes the OFD lock
    and the last one releases it; exclusive holders are alone within the instance too.
    """

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._held: dict[int, list[int]] = {}  # slot -> [holders (-1: exclusive), ready]

    def acquire(self, fd: int, at: int, slot: int, exclusive: bool) -> None:
        with self._cv:
            while True:
                st = self._held.get(slot)
                if st is None:
                    self._held[slot] = [-1 if exclusive else 1, 0]
                    break
                if not exclusive and st[0] > 0 and st[1]:
                    st[0] += 1
                    return
                self._cv.wait()
        try:
            lock_range(fd, at, ENTRY_BYTES, exclusive=exclusive)
        except BaseException:
            with self._cv:
                del self._held[slot]
                self._cv.notify_all()
            raise
        with self._cv:
            self._held[slot][1] = 1
            self._cv.notify_all()

    def release(self, fd: int, at: int, slot: int) -> None:
        with self._cv:
            st = self._held[slot]
            if st[0] > 1:
                st[0] -= 1
                return
            st[1] = 0  # being released: newcomers wait for it to go
        try:
            unlock_range(fd, at, ENTRY_BYTES)
        finally:
            with self._cv:
                del self._held[slot]
                self._cv.notify_all()


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
        self._locks = _SlotLocks()

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def open(cls, dir_fd: int, stem: str, *, direct: bool, create: bool) -> Segment:
        """Open (or, with ``create``, create) both files owner-only, never through a symlink.
        On a read-only file system an existing segment is opened read-only (reads still work).
        A ``.dat`` is only created together with a new ``.idx``; an existing ``.idx`` without
        its ``.dat`` opens with ``dat_fd == -1`` (see :meth:`ensure_dat`). Either file not a
        regular file of ours with one link: :class:`UnsafeSegmentFile`, nothing left open."""
        flags = os.O_RDWR | NOFOLLOW | os.O_NONBLOCK  # O_NONBLOCK: a FIFO must not hang us
        made = False
        try:
            if create:
                try:
                    idx = _open_named(dir_fd, stem + ".idx", flags | os.O_CREAT | os.O_EXCL)
                    made = True
                except FileExistsError:
                    idx = _open_named(dir_fd, stem + ".idx", flags)
            else:
                idx = _open_named(dir_fd, stem + ".idx", flags)
        except OSError as e:
            if create or e.errno not in (errno.EROFS, errno.EACCES):
                raise
            flags = os.O_RDONLY | NOFOLLOW | os.O_NONBLOCK
            idx = _open_named(dir_fd, stem + ".idx", flags)
        dat = -1
        try:
            check_segment_file(idx, stem + ".idx")
            try:
                dat = _open_named(dir_fd, stem + ".dat", flags | direct_flag(direct) | (os.O_CREAT if made else 0))
            except FileNotFoundError:
                dat = -1
            if dat >= 0:
                check_segment_file(dat, stem + ".dat")
            seg = cls(dir_fd, stem, idx, dat, None)
            seg.direct = direct
            seg.header = seg.read_header()
        except BaseException:
            for fd in (idx, dat):
                if fd >= 0:
                    os.close(fd)
            raise
        return seg

    def ensure_dat(self) -> bool:
        """(Owner only.) Create the ``.dat`` an ``.idx`` lacks (its creator died in between, or
        a purge was cut short). ``True`` when it had to: the entries are then meaningless."""
        if self.dat_fd >= 0:
            return False
        flags = os.O_RDWR | NOFOLLOW | os.O_NONBLOCK | os.O_CREAT | direct_flag(self.direct)
        fd = _open_named(self.dir_fd, self.stem + ".dat", flags)
        try:
            check_segment_file(fd, self.stem + ".dat")
        except BaseException:
            os.close(fd)
            raise
        self.dat_fd = fd
        return True

    def still_linked(self) -> bool:
        """Whether our ``.idx`` is still the file of that name (not unlinked by a purge, not
        replaced): checked after taking the ownership lock, before trusting it."""
        try:
            mine = os.fstat(self.idx_fd)
            there = os.stat(self.stem + ".idx", dir_fd=self.dir_fd, follow_symlinks=False)
        except OSError:
            return False
        return mine.st_nlink > 0 and (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino)

    def read_header(self) -> SegmentHeader | None:
        return SegmentHeader.unpack(os.pread(self.idx_fd, SEGMENT_HEADER_BYTES, 0))

    def try_claim(self) -> bool:
        """Take the ownership lock if no live instance holds it (non-blocking). The caller
        checks :meth:`still_linked` next, and sets ``owned`` once it has adopted the segment."""
        try:
            fcntl.flock(self.idx_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                return False
            raise
        return True

    def unowned(self) -> bool:
        """Whether no live instance owns the segment: takes and drops the ownership lock. Only
        for a caller that does not own it, serialized with its own claims."""
        if not self.try_claim():
            return False
        fcntl.flock(self.idx_fd, fcntl.LOCK_UN)
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
        """The slots the header claims, bounded by the entries the ``.idx`` file holds."""
        return min(self.header.slots, self.held_entries()) if self.header else 0

    def held_entries(self) -> int:
        """How many whole entries the ``.idx`` file holds (its header may claim more: a
        truncated or forged file; nothing is ever read past what is there)."""
        return max(0, (os.fstat(self.idx_fd).st_size - SEGMENT_HEADER_BYTES) // ENTRY_BYTES)

    def _entry_at(self, slot: int) -> int:
        return SEGMENT_HEADER_BYTES + slot * ENTRY_BYTES

    def entries(self, header: SegmentHeader | None = None) -> list[Entry | None]:
        """Every slot's entry (``None``: empty or invalid), from one sequential read, for the
        segment's header or the one given (read just before, outside the tier's lock). At
        most as many as the file holds, whatever the header claims (2^40 slots read as 2^47
        bytes were a MemoryError, found by tests/test_fuzz_disk_format.py)."""
        header = header or self.header
        if header is None:
            return []
        n = min(header.slots, self.held_entries())
        raw = os.pread(self.idx_fd, n * ENTRY_BYTES, SEGMENT_HEADER_BYTES) if n else b""
        view = memoryview(raw)
        out: list[Entry | None] = []
        for i in range(min(n, len(raw) // ENTRY_BYTES)):
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
        self._locks.acquire(self.idx_fd, at, slot, True)
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
            self._locks.release(self.idx_fd, at, slot)

    def read(self, slot: int, key: bytes, namespace: bytes, dest: memoryview, bounce: AlignedBuffer) -> ReadResult:
        """Copy the block in ``slot`` into ``dest`` if it is ``key``'s and checks out."""
        return self.read_run(slot, [key], namespace, [dest], bounce)[0]

    def read_run(
        self, first: int, keys: Sequence[bytes], namespace: bytes, dests: Sequence[memoryview], bounce: AlignedBuffer
    ) -> list[ReadResult]:  # fmt: skip
        """:meth:`read` of the blocks in the consecutive slots ``first, first + 1, ...`` (one
        per key): the slots are locked shared in ascending order, their entries read with one
        ``pread``, and each run of matching entries with one ``preadv`` into its destinations
        (a destination O_DIRECT cannot take is read alone through ``bounce``)."""
        n = len(keys)
        size = len(dests[0]) if n else 0
        at = self._entry_at(first)
        held = 0
        try:
            for i in range(n):
                self._locks.acquire(self.idx_fd, at + i * ENTRY_BYTES, first + i, False)
                held += 1
            raw = memoryview(os.pread(self.idx_fd, n * ENTRY_BYTES, at))
            out: list[ReadResult] = [ReadResult.MISS] * n
            hashes: list[int | None] = [None] * n
            for i in range(n):
                chunk = raw[i * ENTRY_BYTES : (i + 1) * ENTRY_BYTES]
                entry = Entry.unpack(chunk) if len(chunk) == ENTRY_BYTES else None
                if entry is None:
                    out[i] = ReadResult.CORRUPT if looks_written(chunk) else ReadResult.MISS
                elif entry.namespace == namespace and entry.key == keys[i] and entry.length == size:
                    hashes[i] = entry.body_hash
            i = 0
            while i < n:
                if hashes[i] is None:
                    i += 1
                    continue
                j = i + 1  # [i, j): matching entries whose destinations O_DIRECT takes as they are
                direct_as_is = not self.direct or _direct_ok(dests[i])
                while direct_as_is and j < n and hashes[j] is not None and (not self.direct or _direct_ok(dests[j])):
                    j += 1
                intos = list(dests[i:j]) if direct_as_is else [bounce.view]
                got = os.preadv(self.dat_fd, intos, (first + i) * size)
                for m in range(i, j):
                    into = intos[m - i]
                    if got < (m - i + 1) * size or checksum(into) != hashes[m]:
                        if into is dests[m]:
                            dests[m][:] = bytes(size)
                        out[m] = ReadResult.CORRUPT
                    else:
                        if into is not dests[m]:
                            dests[m][:] = into
                        out[m] = ReadResult.OK
                i = j
            return out
        finally:
            err: BaseException | None = None
            for i in range(held):  # every one, even if releasing another fails
                try:
                    self._locks.release(self.idx_fd, at + i * ENTRY_BYTES, first + i)
                except BaseException as e:
                    err = err or e
            if err is not None:
                raise err

    def clear_if_bad(self, slot: int, key: bytes, namespace: bytes, bounce: AlignedBuffer) -> bool:
        """After a read of ``key`` failed its check: under the exclusive slot lock, look again,
        and empty the slot only if its entry is invalid, or still names ``key`` and its body
        still fails. ``False``: the slot was rewritten meanwhile (or emptied), left alone."""

        def keep(entry: Entry | None) -> bool:
            if entry is None:
                return False  # an invalid entry: empty it
            if entry.namespace != namespace or entry.key != key or entry.length != len(bounce.view):
                return True  # rewritten with another block meanwhile
            n = os.preadv(self.dat_fd, [bounce.view], slot * entry.length)
            return n == entry.length and checksum(bounce.view) == entry.body_hash  # now whole

        return self._clear_unless(slot, keep)

    def clear(self, slot: int, key: bytes | None) -> bool:
        """Empty ``slot`` if it still holds ``key`` (any valid or invalid entry when ``None``)."""
        return self._clear_unless(slot, lambda entry: key is not None and entry is not None and entry.key != key)

    def _clear_unless(self, slot: int, keep: Callable[[Entry | None], bool]) -> bool:
        """Under the exclusive slot lock: empty the slot's entry unless it is empty already or
        ``keep(entry)`` (``None`` for an entry that fails its own check). Returns whether it did."""
        at = self._entry_at(slot)
        self._locks.acquire(self.idx_fd, at, slot, True)
        try:
            raw = os.pread(self.idx_fd, ENTRY_BYTES, at)
            if not looks_written(raw) or keep(Entry.unpack(raw)):
                return False
            _pwrite_all(self.idx_fd, EMPTY_ENTRY, at)
            return True
        finally:
            self._locks.release(self.idx_fd, at, slot)

    def close(self) -> None:
        """Close both descriptors (each, even if closing the other fails). Never unlocks: in a
        forked child that would drop the parent's locks; closing the last descriptor does."""
        for fd in (self.idx_fd, self.dat_fd):
            if fd < 0:
                continue
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
