# SPDX-License-Identifier: Apache-2.0
"""``DiskTier``: KV blocks in segment files on a local disk, shared safely between processes.

Layout and format: :mod:`kv_offload.tiers.disk.format`; the segment set (scan, claim, adopt):
:mod:`kv_offload.tiers.disk.segments`; cross-process rules:
:mod:`kv_offload.tiers.disk.segment`; the measurements behind them: docs/disk_tier.md.

Capacity. ``capacity_bytes`` is cut into ``max_segments`` segments of ``slots_per_segment``
slots. Segment names are numbered, so the segments of one (namespace, block size) in a
directory number at most ``max_segments``, plus one per live process that found every segment
claimed by others (so each process can write): disk use stays within ``capacity_bytes`` plus
one segment per concurrent process, however many processes come and go. A process allocates
slots only in segments it owns (claimed lazily, as it fills them) and evicts only its own
blocks, through the eviction policy; blocks in segments owned by others are read, not evicted.

Threads and processes. Every public method may be called from several threads. Disk I/O runs
outside the instance's lock (a refresh scans into a new structure and swaps it in), so
``contains`` never waits for the disk. An instance belongs to the process that built it: a
forked child inherits its descriptors and locks but not its ownership, so every method of an
inherited instance raises ``RuntimeError`` there (the child opens its own).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from kv_offload.policies import POLICIES, EvictionPolicy
from kv_offload.tiers.base import BlockTier, TierStats
from kv_offload.tiers.disk.files import (
    BufferPool, DiskTierError, check_stat, make_private_dir, open_private_subdir, probe_direct,
)  # fmt: skip
from kv_offload.tiers.disk.format import MAX_KEY_BYTES
from kv_offload.tiers.disk.label import write_label
from kv_offload.tiers.disk.segment import FaultHook, ReadResult, Segment
from kv_offload.tiers.disk.segments import Loc, SegmentSet, slot_runs

__all__ = ["DiskTier", "DiskTierStats", "DiskTierError"]

log = logging.getLogger("kv_offload.tiers.disk")

_T = TypeVar("_T")
_R = TypeVar("_R")
#: Default segment size: large enough for long sequential runs, few enough files (<= 64).
_SEGMENT_BYTES = 256 << 20
_MAX_DEFAULT_SEGMENTS = 64
#: Most bytes read by one ``preadv`` of consecutive slots.
_RUN_BYTES = 8 << 20


@dataclass
class DiskTierStats(TierStats):
    """:class:`TierStats` plus how the disk is used: ``io_mode`` is ``"direct"`` (O_DIRECT) or
    ``"buffered"``; ``index_seconds`` is the start-up index time, ``index_blocks`` what it found."""

    io_mode: str = "buffered"
    checksum: str = "xxh3_64"
    index_seconds: float = 0.0
    index_blocks: int = 0
    segments_owned: int = 0
    segments_seen: int = 0


#: Live instances, marked dead in a forked child (see the module docstring).
_LIVE: weakref.WeakSet[DiskTier] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for t in list(_LIVE):
        t._forked = True


os.register_at_fork(after_in_child=_after_fork_in_child)


class DiskTier(SegmentSet, BlockTier):
    """A :class:`BlockTier` on local disk (see the module docstring).

    ``path``: the directory (created 0700 if missing; refused if another user owns it or it is
    group- or world-writable). ``threads``: I/O threads for batches. ``policy``: an eviction
    policy name from ``kv_offload.policies.POLICIES`` or an instance. ``segment_bytes``: target
    segment size (default 256 MiB, or capacity/64 when larger). ``fault_hook``: a test hook, see
    :data:`~kv_offload.tiers.disk.segment.FaultHook`. ``io_delay_s``: test only, every
    :meth:`read` and :meth:`write` call first sleeps this long (slow I/O, config ``slow_io_ms``).
    ``label``: what this namespace holds, written as the namespace directory's label
    (:mod:`~kv_offload.tiers.disk.label`; advice for operators and importers, never trusted).
    """

    def __init__(
        self, path: str | os.PathLike[str], capacity_bytes: int, namespace: bytes, block_bytes: int, *,
        threads: int = 4, policy: str | EvictionPolicy = "lru", segment_bytes: int | None = None,
        fault_hook: FaultHook | None = None, io_delay_s: float = 0.0, label: Mapping[str, Any] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(namespace, block_bytes)
        self.io_delay_s = io_delay_s
        if not isinstance(capacity_bytes, int) or capacity_bytes < block_bytes:
            raise ValueError(f"capacity_bytes must be an int >= block_bytes ({block_bytes}), got {capacity_bytes!r}")
        if not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive int, got {threads!r}")
        self.path = os.fspath(path)
        self.capacity_blocks = capacity_bytes // block_bytes
        target = segment_bytes or max(_SEGMENT_BYTES, -(-capacity_bytes // _MAX_DEFAULT_SEGMENTS))
        # as many segments as the target size asks for, sized to split the capacity evenly
        self.max_segments = max(1, -(-self.capacity_blocks // max(1, target // block_bytes)))
        self.slots_per_segment = max(1, self.capacity_blocks // self.max_segments)
        # what the segments hold: the whole blocks of capacity_bytes that split evenly (the
        # scheduler's record of this tier models exactly this many)
        self.capacity_blocks = self.max_segments * self.slots_per_segment
        self.fault_hook = fault_hook
        self._policy = POLICIES.resolve(policy)(self.capacity_blocks) if isinstance(policy, str) else policy
        self._pid = os.getpid()
        self._forked = False
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)  # in-flight calls and keys being written
        self._claim_lock = threading.Lock()  # one segment claim at a time (its I/O outside _lock)
        self._refresh_lock = threading.Lock()
        self._inflight = 0
        self._stats = DiskTierStats()
        self._index: dict[bytes, Loc] = {}
        self._segments: dict[str, Segment] = {}
        self._retired: list[Segment] = []  # unlinked/replaced under us: closed by close() only
        self._free: list[Loc] = []
        self._pins: dict[tuple[str, int], int] = {}
        #: key -> the slots pinned for its queued reads (see hold)
        self._held: dict[bytes, list[Loc]] = {}
        self._writing: set[bytes] = set()
        self._unusable: set[str] = set()  # segment names that are symlinks or not safe files
        self._warned = {"write": False, "read": False}
        self._bufs = BufferPool(block_bytes, keep=threads + 2)
        self._closed = False

        make_private_dir(self.path, follow=True)
        self._root_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            check_stat(os.fstat(self._root_fd), f"disk tier directory {self.path!r}")
            ns_dir = f"disk tier namespace directory {os.path.join(self.path, namespace.hex())!r}"
            self._ns_fd = open_private_subdir(self._root_fd, namespace.hex(), ns_dir)
        except BaseException:
            os.close(self._root_fd)
            raise
        if label is not None:
            try:
                write_label(self._ns_fd, label)
            except (OSError, ValueError) as e:
                log.warning("disk tier %s: cannot write the namespace label (%s); blocks are unaffected", self.path, e)
        self.direct = probe_direct(self._ns_fd)
        self._stats.io_mode = "direct" if self.direct else "buffered"
        t0 = time.perf_counter()
        #: when the index last started re-reading other processes' entries (monotonic): a
        #: block written and evicted by another process before then is known to be gone
        self.refreshed_at = time.monotonic()
        self._refresh()
        self._stats.index_seconds = time.perf_counter() - t0
        self._stats.index_blocks = len(self._index)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="kvo-disk") if threads > 1 else None
        self._threads = threads
        self._max_run = max(1, _RUN_BYTES // block_bytes)
        _LIVE.add(self)
        log.info(
            "disk tier %s: %s I/O, %d blocks indexed in %.3f s, %d segments of %d slots at most",
            self.path, self._stats.io_mode, len(self._index), self._stats.index_seconds,
            self.max_segments, self.slots_per_segment,
        )  # fmt: skip

    # -- calls ---------------------------------------------------------------------------------

    def _check_process(self) -> None:
        if self._forked or os.getpid() != self._pid:
            raise RuntimeError(
                f"this DiskTier was opened in process {self._pid}; it cannot be used in the forked "
                f"child {os.getpid()} (segment ownership and slot locks are shared through fork): "
                "open a new DiskTier in the child"
            )

    def _enter(self) -> bool:
        """Start a call that does I/O: ``False`` once closed, else counted until :meth:`_leave`."""
        self._check_process()
        with self._lock:
            if self._closed:
                return False
            self._inflight += 1
            return True

    def _leave(self) -> None:
        with self._lock:
            self._inflight -= 1
            if not self._inflight:
                self._cv.notify_all()

    # -- index -------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Re-read the entries of segments owned by other processes: index the blocks they
        stored since, forget the ones they dropped. Reads entry files only, never bodies, and
        never while holding the lock ``contains`` takes."""
        if not self._enter():
            return
        try:
            with self._refresh_lock:
                started = time.monotonic()
                self._refresh()
                self.refreshed_at = started
        except OSError as e:
            with self._lock:
                self._warn_once("read", e)
        finally:
            self._leave()

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        self._check_process()
        with self._lock:
            return [k in self._index for k in keys]

    def stats(self) -> DiskTierStats:
        self._check_process()
        with self._lock:
            self._stats.blocks = len(self._index)
            self._stats.bytes = len(self._index) * self.block_bytes
            self._stats.segments_owned = sum(s.owned for s in self._segments.values())
            self._stats.segments_seen = len(self._segments)
            return replace(self._stats)

    # -- slots ---------------------------------------------------------------------------------

    def hold(self, keys: Sequence[bytes]) -> None:
        with self._lock:
            for key in keys:
                loc = self._index.get(key)
                if loc is not None:
                    pin = (loc.seg.stem, loc.slot)
                    self._pins[pin] = self._pins.get(pin, 0) + 1
                    self._held.setdefault(key, []).append(loc)

    def release(self, keys: Sequence[bytes]) -> None:
        with self._lock:
            for key in keys:
                held = self._held.get(key)
                if not held:
                    continue  # not held when its read was queued
                loc = held.pop()
                if not held:
                    del self._held[key]
                pin = (loc.seg.stem, loc.slot)
                self._pins[pin] -= 1
                if not self._pins[pin]:
                    del self._pins[pin]

    def _pinned(self, loc: Loc) -> bool:
        return self._pins.get((loc.seg.stem, loc.slot), 0) > 0

    def _evictable(self, key: bytes) -> bool:
        loc = self._index.get(key)
        return loc is not None and loc.seg.owned and not self._pinned(loc)

    def _take_slots(self, n: int) -> tuple[list[Loc], OSError | None]:
        """(Not under ``_lock``.) Up to ``n`` slots to write: free ones, a claimed segment's, or
        evicted ones (the policy picks; only our own, unpinned blocks); and the error that
        stopped a segment from being claimed, if one did."""
        got: list[Loc] = []
        err: OSError | None = None
        claim = True
        while True:
            with self._lock:
                skipped: list[Loc] = []
                while self._free and len(got) < n:
                    loc = self._free.pop()
                    (skipped if self._pinned(loc) else got).append(loc)
                self._free.extend(skipped)
                if len(got) == n:
                    return got, err
                if not claim:
                    need = n - len(got)
                    victims = self._policy.evict(need, self._evictable)
                    if victims is None:
                        can = sum(1 for k in list(self._policy.keys()) if self._evictable(k))
                        victims = self._policy.evict(can, self._evictable) if can else []
                    for key in victims or []:
                        got.append(self._index.pop(key))
                        self._stats.evictions += 1
                    return got, err
            try:
                claim = self._claim_segment()
            except OSError as e:
                err, claim = e, False

    # -- I/O ---------------------------------------------------------------------------------

    def _map(self, fn: Callable[[_T], _R], items: list[_T]) -> list[_R]:
        """``fn`` over ``items``: inline for one, else in chunks on the I/O threads."""
        if self._pool is None or len(items) <= 1:
            return [fn(it) for it in items]
        k = min(self._threads, len(items))
        step = -(-len(items) // k)  # contiguous runs: neighbouring slots stay sequential on disk
        chunks = [items[i : i + step] for i in range(0, len(items), step)]
        return [r for done in self._pool.map(lambda c: [fn(it) for it in c], chunks) for r in done]

    def _vanished(self) -> OSError | None:
        try:
            if os.fstat(self._ns_fd).st_nlink == 0:
                return FileNotFoundError(errno.ENOENT, "the directory was removed")
        except OSError as e:
            return e
        return None

    def _warn_once(self, kind: str, err: OSError) -> None:
        """(Under the lock.) One warning per run of failures; a success re-arms it."""
        if not self._warned[kind]:
            self._warned[kind] = True
            name = errno.errorcode.get(err.errno or 0, "?")
            log.warning(
                "disk tier %s: %s failed (%s: %s); going on without it, failures are counted "
                "(no further warning until a %s succeeds)", self.path, kind, name, err.strerror or err, kind,
            )  # fmt: skip

    def _check_key(self, key: bytes) -> None:
        if not isinstance(key, bytes) or not 0 < len(key) <= MAX_KEY_BYTES:
            raise ValueError(f"a disk tier key must be 1..{MAX_KEY_BYTES} bytes, got {key!r}")

    def write(self, items: Sequence[tuple[bytes, memoryview]]) -> list[bool]:
        views: list[memoryview] = []
        for i, (key, body) in enumerate(items):
            self._check_key(key)
            view = memoryview(body).cast("B")
            if len(view) != self.block_bytes:
                raise ValueError(f"write item {i}: block is {len(view)} bytes, this tier's blocks are {self.block_bytes}")
            views.append(view)
        if self.io_delay_s > 0:
            time.sleep(self.io_delay_s)
        if not self._enter():
            raise RuntimeError("disk tier is closed")
        try:
            return self._write([k for k, _ in items], views)
        finally:
            self._leave()

    def _write(self, keys: list[bytes], views: list[memoryview]) -> list[bool]:
        result = [False] * len(keys)
        gone = self._vanished()
        waits: list[int] = []  # keys another call of ours is writing: its outcome is ours
        fresh: list[int] = []
        with self._lock:
            if gone is not None:
                self._stats.write_failures += len(keys)
                self._warn_once("write", gone)
                return result
            for i, key in enumerate(keys):
                if key in self._index:
                    self._policy.touch(key)
                    result[i] = True
                elif key in self._writing:
                    waits.append(i)
                else:
                    self._writing.add(key)
                    fresh.append(i)
        try:
            slots, err = self._take_slots(len(fresh)) if fresh else ([], None)
        except BaseException:
            self._done_writing([keys[i] for i in fresh])
            raise
        with self._lock:
            for i in fresh[len(slots) :]:
                self._writing.discard(keys[i])
                if err is None:
                    self._stats.refused += 1
                else:
                    self._stats.write_failures += 1
                    self._warn_once("write", err)
            self._cv.notify_all()
        jobs = list(zip(fresh, slots))

        def one(job: tuple[int, Loc]) -> OSError | None:
            i, loc = job
            buf = self._bufs.take()
            try:
                loc.seg.write(loc.slot, keys[i], self.namespace, views[i], buf, self.fault_hook)
            except OSError as e:
                return e
            finally:
                self._bufs.give(buf)
            return None

        try:
            errors = self._map(one, jobs)
        except BaseException:  # a fault hook stopped us: the slots' state is unknown, drop them
            self._done_writing([keys[i] for i, _ in jobs])
            raise
        with self._lock:
            for (i, loc), err in zip(jobs, errors):
                key = keys[i]
                self._writing.discard(key)
                if err is None:
                    self._index[key] = loc
                    self._policy.insert(key)
                    self._stats.writes += 1
                    self._warned["write"] = False
                    result[i] = True
                else:
                    self._free.append(loc)
                    self._stats.write_failures += 1
                    self._warn_once("write", err)
            self._cv.notify_all()
            for i in waits:
                while keys[i] in self._writing:
                    self._cv.wait()
                result[i] = keys[i] in self._index
        return result

    def _done_writing(self, keys: list[bytes]) -> None:
        with self._lock:
            self._writing.difference_update(keys)
            self._cv.notify_all()

    def read(self, keys: Sequence[bytes], into: Sequence[memoryview]) -> list[bool]:
        if len(keys) != len(into):
            raise ValueError(f"read: {len(keys)} keys but {len(into)} destination buffers")
        dests: list[memoryview] = []
        for i, buf in enumerate(into):
            view = memoryview(buf).cast("B")
            if view.readonly or len(view) != self.block_bytes:
                raise ValueError(f"read destination {i} must be a writable buffer of {self.block_bytes} bytes")
            dests.append(view)
        if self.io_delay_s > 0:
            time.sleep(self.io_delay_s)
        if not self._enter():
            raise RuntimeError("disk tier is closed")
        try:
            return self._read(keys, dests)
        finally:
            self._leave()

    def _read(self, keys: Sequence[bytes], dests: list[memoryview]) -> list[bool]:
        result = [False] * len(keys)
        gone = self._vanished()
        jobs: list[tuple[int, Loc]] = []
        with self._lock:
            for i, key in enumerate(keys):
                loc = self._index.get(key)
                if loc is None or gone is not None:
                    self._stats.misses += 1
                    continue
                pin = (loc.seg.stem, loc.slot)
                self._pins[pin] = self._pins.get(pin, 0) + 1
                jobs.append((i, loc))
            if gone is not None and keys:
                self._warn_once("read", gone)

        def run(part: list[tuple[int, Loc]]) -> list[ReadResult | OSError]:
            """Blocks in consecutive slots of one segment, read together (see Segment.read_run)."""
            first = part[0][1]
            buf = self._bufs.take()
            try:
                try:
                    res: list[ReadResult | OSError] = list(first.seg.read_run(
                        first.slot, [keys[i] for i, _ in part], self.namespace, [dests[i] for i, _ in part], buf,
                    ))  # fmt: skip
                except OSError as e:
                    return [e] * len(part)
                for n, (i, loc) in enumerate(part):
                    # cleared only where no other live instance writes, and only if it still
                    # fails its check under the exclusive slot lock
                    if res[n] is ReadResult.CORRUPT and self._may_clear(loc.seg):
                        try:
                            if not loc.seg.clear_if_bad(loc.slot, keys[i], self.namespace, buf):
                                res[n] = ReadResult.RACED
                        except OSError as e:
                            res[n] = e
                return res
            finally:
                self._bufs.give(buf)

        outcomes = [r for rs in self._map(run, slot_runs(jobs, self._threads, self._max_run)) for r in rs]
        with self._lock:
            for (i, loc), res in zip(jobs, outcomes):
                pin = (loc.seg.stem, loc.slot)
                self._pins[pin] -= 1
                if not self._pins[pin]:
                    del self._pins[pin]
                key = keys[i]
                if res is ReadResult.OK:
                    self._stats.hits += 1
                    self._policy.touch(key)
                    self._warned["read"] = False
                    result[i] = True
                    continue
                self._stats.misses += 1
                if isinstance(res, OSError):
                    self._stats.read_failures += 1
                    self._warn_once("read", res)
                    continue
                if res is ReadResult.RACED:
                    continue  # rewritten while we read: a miss, the entry stays
                if res is ReadResult.CORRUPT:
                    self._stats.corruptions += 1
                    log.warning(
                        "disk tier %s: block %s failed its checksum; removed (left on disk only when "
                        "another live process owns its segment)", self.path, key.hex(),
                    )  # fmt: skip
                if self._index.get(key) == loc:
                    del self._index[key]
                    self._policy.remove(key)
                    if loc.seg.owned:
                        self._free.append(loc)
        return result

    def _may_clear(self, seg: Segment) -> bool:
        """Whether a corrupt block in ``seg`` may be cleared: ours, or no live owner (a live
        owner's slot is left to it; we only forget the block)."""
        if seg.owned:
            return True
        with self._claim_lock:  # the probe must not drop a claim of ours in progress
            return seg.owned or seg.unowned()

    def remove(self, keys: Sequence[bytes]) -> list[bool]:
        return self._remove(keys)

    def evict(self, keys: Sequence[bytes]) -> None:
        """Drop those of ``keys`` in segments this instance owns whose reads are not held
        (see :meth:`BlockTier.evict`); counted as evictions."""
        self._remove(list(dict.fromkeys(keys)), evicting=True)

    def _remove(self, keys: Sequence[bytes], evicting: bool = False) -> list[bool]:
        if not self._enter():
            return [False] * len(keys)
        try:
            with self._lock:
                locs = [self._index.pop(k, None) if not evicting or self._evictable(k) else None for k in keys]
                self._stats.evictions += sum(loc is not None for loc in locs) if evicting else 0
                for k, loc in zip(keys, locs):
                    if loc is not None:
                        self._policy.remove(k)
            for k, loc in zip(keys, locs):
                if loc is not None:
                    try:
                        loc.seg.clear(loc.slot, k)  # waits for our own readers of the slot
                    except OSError as e:
                        with self._lock:
                            self._warn_once("write", e)
            with self._lock:
                self._free.extend(loc for loc in locs if loc is not None and loc.seg.owned)
            return [loc is not None for loc in locs]
        finally:
            self._leave()

    def close(self) -> None:
        """Wait for the calls in flight (on I/O threads or inline on callers' threads), then
        close every descriptor, even if closing one fails. In a forked child: close only the
        child's copies of the descriptors, unlocking nothing (the parent still holds them)."""
        if self._forked or os.getpid() != self._pid:
            if not self._closed:
                self._closed = True
                self._close_fds()
            return
        with self._lock:
            if self._closed:
                return
            self._closed = True
            while self._inflight:
                self._cv.wait()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        with self._lock:
            self._close_fds()
            self._index.clear()
            self._free.clear()
        self._bufs.close()
        _LIVE.discard(self)

    def _close_fds(self) -> None:
        for seg in (*self._segments.values(), *self._retired):
            seg.close()
        self._segments.clear()
        self._retired.clear()
        for fd in (self._ns_fd, self._root_fd):
            try:
                os.close(fd)
            except OSError:
                pass

    def abandon(self) -> None:
        """Test hook: drop every descriptor and lock as a killed process would, writing nothing."""
        self.close()
