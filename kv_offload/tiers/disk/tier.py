# SPDX-License-Identifier: Apache-2.0
"""``DiskTier``: KV blocks in segment files on a local disk, shared safely between processes.

Layout and format: :mod:`kv_offload.tiers.disk.format`; cross-process rules:
:mod:`kv_offload.tiers.disk.segment`; the measurements behind them: docs/disk_tier.md.

Capacity. ``capacity_bytes`` is cut into ``max_segments`` segments of ``slots_per_segment``
slots. Segment names are numbered, so the segments of one (namespace, block size) in a
directory number at most ``max_segments``, plus one per live process that found every segment
claimed by others (so each process can write): disk use stays within ``capacity_bytes`` plus
one segment per concurrent process, however many processes come and go. A process allocates
slots only in segments it owns (claimed lazily, as it fills them) and evicts only its own
blocks, through the eviction policy; blocks in segments owned by others are read, not evicted.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import NamedTuple, TypeVar

from kv_offload.policies import POLICIES, EvictionPolicy
from kv_offload.tiers.base import BlockTier, TierStats
from kv_offload.tiers.disk.files import (
    AlignedBuffer, DiskTierError, check_stat, make_private_dir, open_private_subdir, probe_direct,
)  # fmt: skip
from kv_offload.tiers.disk.format import MAX_KEY_BYTES, parse_segment_name
from kv_offload.tiers.disk.segment import FaultHook, ReadResult, Segment

__all__ = ["DiskTier", "DiskTierStats", "DiskTierError"]

log = logging.getLogger("kv_offload.tiers.disk")

_T = TypeVar("_T")
_R = TypeVar("_R")
#: Default segment size: large enough for long sequential runs, few enough files (<= 64).
_SEGMENT_BYTES = 256 << 20
_MAX_DEFAULT_SEGMENTS = 64


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


class _Loc(NamedTuple):
    seg: Segment
    slot: int


class DiskTier(BlockTier):
    """A :class:`BlockTier` on local disk (see the module docstring).

    ``path``: the directory (created 0700 if missing; refused if another user owns it or it is
    world-writable). ``threads``: I/O threads for batches. ``policy``: an eviction policy name
    from ``kv_offload.policies.POLICIES`` or an instance. ``segment_bytes``: target segment
    size (default 256 MiB, or capacity/64 when larger). ``fault_hook``: a test hook, see
    :data:`~kv_offload.tiers.disk.segment.FaultHook`.
    """

    def __init__(
        self, path: str | os.PathLike[str], capacity_bytes: int, namespace: bytes, block_bytes: int, *,
        threads: int = 4, policy: str | EvictionPolicy = "lru", segment_bytes: int | None = None,
        fault_hook: FaultHook | None = None,
    ) -> None:  # fmt: skip
        super().__init__(namespace, block_bytes)
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
        self.fault_hook = fault_hook
        self._policy = POLICIES.resolve(policy)(self.capacity_blocks) if isinstance(policy, str) else policy
        self._lock = threading.Lock()
        self._stats = DiskTierStats()
        self._index: dict[bytes, _Loc] = {}
        self._segments: dict[str, Segment] = {}
        self._free: list[_Loc] = []
        self._pins: dict[tuple[str, int], int] = {}
        self._writing: set[bytes] = set()
        self._unusable: set[str] = set()  # segment names that are symlinks
        self._warned = {"write": False, "read": False}
        self._local = threading.local()
        self._buffers: list[AlignedBuffer] = []
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
        self.direct = probe_direct(self._ns_fd)
        self._stats.io_mode = "direct" if self.direct else "buffered"
        t0 = time.perf_counter()
        self._scan()
        self._stats.index_seconds = time.perf_counter() - t0
        self._stats.index_blocks = len(self._index)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="kvo-disk") if threads > 1 else None
        self._threads = threads
        log.info(
            "disk tier %s: %s I/O, %d blocks indexed in %.3f s, %d segments of %d slots at most",
            self.path, self._stats.io_mode, len(self._index), self._stats.index_seconds,
            self.max_segments, self.slots_per_segment,
        )  # fmt: skip

    # -- index -------------------------------------------------------------------------------

    def _scan(self) -> None:
        """Open the segments on disk not open yet and index the foreign ones' blocks (headers only)."""
        found: list[tuple[int, bytes, _Loc]] = []
        for name in os.listdir(self._ns_fd):
            stem, dot, ext = name.rpartition(".")
            parsed = parse_segment_name(stem) if ext == "idx" else None
            if parsed is None or parsed[0] != self.block_bytes or stem in self._segments:
                continue
            try:
                self._segments[stem] = Segment.open(self._ns_fd, stem, direct=self.direct, create=False)
            except OSError as e:
                log.debug("disk tier: skipping segment %s: %s", stem, e)
        for seg in self._segments.values():
            if seg.owned:
                continue
            seg.header = seg.read_header()
            if not self._ours(seg):
                continue
            for slot, entry in enumerate(seg.entries()):
                if entry is not None and entry.namespace == self.namespace and entry.length == self.block_bytes:
                    found.append((entry.written_ns, entry.key, _Loc(seg, slot)))
        found.sort(key=lambda f: f[0])
        for _, key, loc in found:
            old = self._index.get(key)
            if old is None or not old.seg.owned:
                if old is None:
                    self._policy.insert(key)
                self._index[key] = loc

    def _ours(self, seg: Segment) -> bool:
        h = seg.header
        return h is not None and h.namespace == self.namespace and h.block_bytes == self.block_bytes

    def refresh(self) -> None:
        """Re-read the entries of segments owned by other processes: index the blocks they
        stored since, forget the ones they dropped. Reads entry files only, never bodies."""
        with self._lock:
            if self._closed:
                return
            for key, loc in list(self._index.items()):
                if not loc.seg.owned:
                    del self._index[key]
                    self._policy.remove(key)
            try:
                self._scan()
            except OSError as e:
                self._warn_once("read", e)

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        with self._lock:
            return [k in self._index for k in keys]

    def stats(self) -> DiskTierStats:
        with self._lock:
            self._stats.blocks = len(self._index)
            self._stats.bytes = len(self._index) * self.block_bytes
            self._stats.segments_owned = sum(s.owned for s in self._segments.values())
            self._stats.segments_seen = len(self._segments)
            return replace(self._stats)

    # -- slots ---------------------------------------------------------------------------------

    def _pinned(self, loc: _Loc) -> bool:
        return self._pins.get((loc.seg.stem, loc.slot), 0) > 0

    def _claim_segment(self) -> bool:
        """(Under the lock.) Own one more segment: adopt one no live process owns, else create
        one while the directory holds fewer than ``max_segments`` (or we own none)."""
        for seg in sorted(self._segments.values(), key=lambda s: s.stem):
            if seg.owned and seg.header is None:  # laying it out failed before (ENOSPC): retry
                self._adopt(seg)
                return True
            if not seg.owned and seg.try_claim():
                self._adopt(seg)
                return True
        owned = sum(s.owned for s in self._segments.values())
        numbers = {parse_segment_name(s)[1] for s in (*self._segments, *self._unusable) if parse_segment_name(s)}  # type: ignore[index]
        while len(numbers) < self.max_segments or owned == 0:
            n = next(i for i in range(len(numbers) + 1) if i not in numbers)
            numbers.add(n)
            stem = Segment.stem_for(self.block_bytes, n)
            if stem in self._unusable:
                continue
            try:
                seg = Segment.open(self._ns_fd, stem, direct=self.direct, create=True)
            except OSError as e:
                if e.errno != errno.ELOOP:
                    raise
                log.warning("disk tier %s: segment %s is a symlink; not following it, skipping the name", self.path, stem)
                self._unusable.add(stem)
                continue
            self._segments[stem] = seg
            if seg.try_claim():
                self._adopt(seg)
                return True
        return False

    def _adopt(self, seg: Segment) -> None:
        """(Under the lock, owning ``seg``.) Lay it out if it has no valid header (new, or its
        creator died first); index its blocks as ours and free its empty slots."""
        seg.header = seg.read_header()
        if not self._ours(seg) or seg.slots <= 0:
            seg.initialize(self.namespace, self.block_bytes, self.slots_per_segment)
        for key, loc in list(self._index.items()):
            if loc.seg is seg:
                del self._index[key]
                self._policy.remove(key)
        empty: list[_Loc] = []
        for slot, entry in enumerate(seg.entries()):
            loc = _Loc(seg, slot)
            if entry is None or entry.namespace != self.namespace or entry.length != self.block_bytes:
                empty.append(loc)
            elif entry.key in self._index or entry.key in self._writing:
                seg.clear(slot, entry.key)  # a duplicate: keep the copy already indexed
                empty.append(loc)
            else:
                self._index[entry.key] = loc
                self._policy.insert(entry.key)
        self._free.extend(reversed(empty))  # taken from the end: ascending slots, sequential writes

    def _evictable(self, key: bytes) -> bool:
        loc = self._index.get(key)
        return loc is not None and loc.seg.owned and not self._pinned(loc)

    def _take_slots(self, n: int) -> tuple[list[_Loc], OSError | None]:
        """(Under the lock.) Up to ``n`` slots to write: free ones, a claimed segment's, or
        evicted ones (the policy picks; only our own, unpinned blocks); and the error that
        stopped a segment from being claimed, if one did."""
        got: list[_Loc] = []
        err: OSError | None = None
        skipped: list[_Loc] = []
        while len(got) < n:
            while self._free and len(got) < n:
                loc = self._free.pop()
                (skipped if self._pinned(loc) else got).append(loc)
            if len(got) == n:
                break
            try:
                if self._claim_segment():
                    continue
            except OSError as e:
                err = e
            need = n - len(got)
            victims = self._policy.evict(need, self._evictable)
            if victims is None:
                can = sum(1 for k in list(self._policy.keys()) if self._evictable(k))
                victims = self._policy.evict(can, self._evictable) if can else []
            for key in victims or []:
                got.append(self._index.pop(key))
                self._stats.evictions += 1
            break
        self._free.extend(skipped)
        return got, err

    # -- I/O ---------------------------------------------------------------------------------

    def _bounce(self) -> AlignedBuffer:
        buf: AlignedBuffer | None = getattr(self._local, "buf", None)
        if buf is None:
            buf = AlignedBuffer(self.block_bytes)
            self._local.buf = buf
            with self._lock:
                self._buffers.append(buf)
        return buf

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
        result = [False] * len(items)
        todo: list[int] = []
        gone = self._vanished()
        with self._lock:
            if self._closed:
                raise RuntimeError("disk tier is closed")
            if gone is not None:
                self._stats.write_failures += len(items)
                self._warn_once("write", gone)
                return result
            fresh: list[int] = []
            for i, (key, _) in enumerate(items):
                if key in self._index:
                    self._policy.touch(key)
                    result[i] = True
                elif key in self._writing:
                    result[i] = True  # another thread of ours is storing it right now
                else:
                    self._writing.add(key)
                    fresh.append(i)
            slots, err = self._take_slots(len(fresh))
            for i in fresh[len(slots):]:
                self._writing.discard(items[i][0])
                if err is None:
                    self._stats.refused += 1
                else:
                    self._stats.write_failures += 1
                    self._warn_once("write", err)
            todo = fresh[: len(slots)]
        jobs = list(zip(todo, slots))

        def one(job: tuple[int, _Loc]) -> OSError | None:
            i, loc = job
            try:
                loc.seg.write(loc.slot, items[i][0], self.namespace, views[i], self._bounce(), self.fault_hook)
            except OSError as e:
                return e
            return None

        try:
            errors = self._map(one, jobs)
        except BaseException:
            with self._lock:  # a fault hook stopped us: the slots' state is unknown, drop them
                for i, _ in jobs:
                    self._writing.discard(items[i][0])
            raise
        with self._lock:
            for (i, loc), err in zip(jobs, errors):
                key = items[i][0]
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
        return result

    def read(self, keys: Sequence[bytes], into: Sequence[memoryview]) -> list[bool]:
        if len(keys) != len(into):
            raise ValueError(f"read: {len(keys)} keys but {len(into)} destination buffers")
        dests: list[memoryview] = []
        for i, buf in enumerate(into):
            view = memoryview(buf).cast("B")
            if view.readonly or len(view) != self.block_bytes:
                raise ValueError(f"read destination {i} must be a writable buffer of {self.block_bytes} bytes")
            dests.append(view)
        result = [False] * len(keys)
        gone = self._vanished()
        jobs: list[tuple[int, _Loc]] = []
        with self._lock:
            if self._closed:
                raise RuntimeError("disk tier is closed")
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

        def one(job: tuple[int, _Loc]) -> ReadResult | OSError:
            i, loc = job
            try:
                res = loc.seg.read(loc.slot, keys[i], self.namespace, dests[i], self._bounce())
                if res is ReadResult.CORRUPT:
                    loc.seg.clear(loc.slot, keys[i])
                return res
            except OSError as e:
                return e

        outcomes = self._map(one, jobs)
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
                if isinstance(res, OSError):
                    self._stats.read_failures += 1
                    self._warn_once("read", res)
                else:
                    if res is ReadResult.CORRUPT:
                        self._stats.corruptions += 1
                        log.warning("disk tier %s: block %s failed its checksum; removed", self.path, key.hex())
                    if self._index.get(key) == loc:
                        del self._index[key]
                        self._policy.remove(key)
                        if loc.seg.owned:
                            self._free.append(loc)
                self._stats.misses += 1
        return result

    def remove(self, keys: Sequence[bytes]) -> list[bool]:
        with self._lock:
            locs = [self._index.pop(k, None) for k in keys]
            for k, loc in zip(keys, locs):
                if loc is not None:
                    self._policy.remove(k)
        for k, loc in zip(keys, locs):
            if loc is not None:
                try:
                    loc.seg.clear(loc.slot, k)
                except OSError as e:
                    with self._lock:
                        self._warn_once("write", e)
        with self._lock:
            self._free.extend(loc for loc in locs if loc is not None and loc.seg.owned)
        return [loc is not None for loc in locs]

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        with self._lock:
            for seg in self._segments.values():
                seg.close()
            self._segments.clear()
            self._index.clear()
            for buf in self._buffers:
                buf.close()
            self._buffers.clear()
            for fd in (self._ns_fd, self._root_fd):
                os.close(fd)

    def abandon(self) -> None:
        """Test hook: drop every descriptor and lock as a killed process would, writing nothing."""
        self.close()
