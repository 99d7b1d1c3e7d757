# SPDX-License-Identifier: Apache-2.0
"""The segment set of a :class:`~kv_offload.tiers.disk.tier.DiskTier`: opening segments,
scanning other processes' entries (``refresh``), and claiming and adopting segments to write.

All disk I/O here runs outside the tier's lock (``_lock``, which ``contains`` takes): a scan
reads into new structures and swaps them in under the lock; claims are serialized by
``_claim_lock`` and do their I/O outside ``_lock`` too.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import NamedTuple

from kv_offload.policies import EvictionPolicy
from kv_offload.tiers.disk.format import SegmentHeader, parse_segment_name
from kv_offload.tiers.disk.segment import Segment, UnsafeSegmentFile

__all__ = ["SegmentSet", "Loc", "slot_runs"]

log = logging.getLogger("kv_offload.tiers.disk")


class Loc(NamedTuple):
    seg: Segment
    slot: int


class SegmentSet:
    """Mixin of :class:`DiskTier`: the attributes below are set by its constructor."""

    path: str
    namespace: bytes
    block_bytes: int
    direct: bool
    max_segments: int
    slots_per_segment: int
    _lock: threading.Lock
    _claim_lock: threading.Lock
    _policy: EvictionPolicy
    _index: dict[bytes, Loc]
    _segments: dict[str, Segment]
    _retired: list[Segment]
    _free: list[Loc]
    _writing: set[bytes]
    _unusable: set[str]
    _ns_fd: int
    _closed: bool

    def _ours(self, h: SegmentHeader | None) -> bool:
        return h is not None and h.namespace == self.namespace and h.block_bytes == self.block_bytes

    def _skip_file(self, stem: str, err: OSError) -> None:
        with self._lock:
            first = stem not in self._unusable
            self._unusable.add(stem)
        if first:
            log.warning("disk tier %s: segment %s is unusable (%s); skipping that name", self.path, stem, err)

    def _refresh(self) -> None:
        """(Under the refresh lock.) Open the segments not open yet and re-read the entries of
        those no instance of ours owns, outside ``_lock``; then swap the result in under it."""
        with self._lock:
            known = dict(self._segments)
            skip = set(self._unusable)
        new: dict[str, Segment] = {}
        for name in os.listdir(self._ns_fd):
            stem, _, ext = name.rpartition(".")
            parsed = parse_segment_name(stem) if ext == "idx" else None
            if parsed is None or parsed[0] != self.block_bytes or stem in known or stem in skip:
                continue
            try:
                new[stem] = Segment.open(self._ns_fd, stem, direct=self.direct, create=False)
            except UnsafeSegmentFile as e:
                self._skip_file(stem, e)
            except OSError as e:
                log.debug("disk tier: skipping segment %s: %s", stem, e)
        found: list[tuple[int, bytes, Loc]] = []
        headers: dict[str, SegmentHeader | None] = {}
        stale: list[Segment] = []
        for seg in (*known.values(), *new.values()):
            if seg.owned:
                continue
            if seg.stem in known and not seg.still_linked():
                stale.append(seg)  # purged or replaced: the name is opened afresh next time
                continue
            header = headers[seg.stem] = seg.read_header()
            if seg.dat_fd < 0 or not self._ours(header):
                continue
            for slot, entry in enumerate(seg.entries(header)):
                if entry is not None and entry.namespace == self.namespace and entry.length == self.block_bytes:
                    found.append((entry.written_ns, entry.key, Loc(seg, slot)))
        found.sort(key=lambda f: f[0])
        with self._lock:
            for stem, seg in new.items():
                if self._closed or stem in self._segments:  # a claim opened it meanwhile
                    seg.close()
                else:
                    self._segments[stem] = seg
            for seg in stale:
                if self._segments.get(seg.stem) is seg and not seg.owned:
                    del self._segments[seg.stem]
                    self._retired.append(seg)
            for seg in self._segments.values():
                if not seg.owned and seg.stem in headers:
                    seg.header = headers[seg.stem]
            for key, loc in list(self._index.items()):
                if not loc.seg.owned:
                    del self._index[key]
                    self._policy.remove(key)
            for _, key, loc in found:
                if loc.seg.owned or self._segments.get(loc.seg.stem) is not loc.seg:
                    continue
                old = self._index.get(key)
                if old is None or not old.seg.owned:
                    if old is None:
                        self._policy.insert(key)
                    self._index[key] = loc

    def _claim_segment(self) -> bool:
        """(Not under ``_lock``.) Own one more segment: adopt one no live process owns, else
        create one while the directory holds fewer than ``max_segments`` (or we own none)."""
        with self._claim_lock:
            with self._lock:
                segs = sorted(self._segments.values(), key=lambda s: s.stem)
                taken = [*self._segments, *self._unusable]
            for seg in segs:
                if not seg.owned and seg.try_claim() and self._verified(seg):
                    self._adopt(seg)
                    return True
            with self._lock:
                owned = sum(s.owned for s in self._segments.values())
            numbers = {p[1] for p in map(parse_segment_name, taken) if p}
            while len(numbers) < self.max_segments or owned == 0:
                n = next(i for i in range(len(numbers) + 1) if i not in numbers)
                numbers.add(n)
                stem = Segment.stem_for(self.block_bytes, n)
                try:
                    seg = Segment.open(self._ns_fd, stem, direct=self.direct, create=True)
                except UnsafeSegmentFile as e:  # a symlink, a directory, a FIFO, ... at that name
                    self._skip_file(stem, e)
                    continue
                with self._lock:
                    known = self._segments.setdefault(stem, seg)
                if known is not seg:  # a refresh opened it meanwhile
                    seg.close()
                    seg = known
                if not seg.owned and seg.try_claim() and self._verified(seg):
                    self._adopt(seg)
                    return True
            return False

    def _verified(self, seg: Segment) -> bool:
        """(Holding ``seg``'s ownership lock.) Whether its ``.idx`` is still the file of that
        name: a purge may have unlinked it (or it was replaced) after we opened it. If not,
        the stale segment is retired (closed with the tier) and its blocks forgotten."""
        if seg.still_linked():
            return True
        log.info("disk tier %s: segment %s was removed or replaced under us; reopening the name", self.path, seg.stem)
        with self._lock:
            if self._segments.get(seg.stem) is seg:
                del self._segments[seg.stem]
                self._retired.append(seg)
            for key, loc in list(self._index.items()):
                if loc.seg is seg:
                    del self._index[key]
                    self._policy.remove(key)
        return False

    def _adopt(self, seg: Segment) -> None:
        """(Owning ``seg``, under the claim lock, not under ``_lock``.) Lay it out if it has no
        valid header (new, or its creator died first) or no ``.dat``; then, under the lock,
        index its blocks as ours and free its empty slots. Duplicates are cleared first."""
        header = seg.read_header()
        # A header claiming more slots than the .idx holds (truncated, or forged) would leave
        # slots with no entry to take: found by tests/test_fuzz_disk_format.py (two truncated
        # .idx files left a tier refusing every write). Such a segment is laid out afresh.
        if (seg.ensure_dat() or not self._ours(header) or header is None or header.slots <= 0
                or header.slots > seg.held_entries()):  # fmt: skip
            seg.initialize(self.namespace, self.block_bytes, self.slots_per_segment)
        entries = seg.entries()
        with self._lock:
            held = {k for k, loc in self._index.items() if loc.seg is not seg} | self._writing
        dups = [s for s, e in enumerate(entries) if e is not None and e.key in held]
        for slot in dups:  # a duplicate: keep the copy already indexed
            seg.clear(slot, entries[slot].key)  # type: ignore[union-attr]
            entries[slot] = None
        with self._lock:
            for key, loc in list(self._index.items()):
                if loc.seg is seg:
                    del self._index[key]
                    self._policy.remove(key)
            empty: list[Loc] = []
            for slot, entry in enumerate(entries):
                loc = Loc(seg, slot)
                if entry is None or entry.namespace != self.namespace or entry.length != self.block_bytes:
                    empty.append(loc)
                elif entry.key in self._index or entry.key in self._writing:
                    empty.append(loc)  # became a duplicate since: unindexed, rewritten when taken
                else:
                    self._index[entry.key] = loc
                    self._policy.insert(entry.key)
            seg.owned = True
            self._free.extend(reversed(empty))  # taken from the end: ascending slots, sequential writes


def slot_runs(jobs: list[tuple[int, Loc]], parts: int, most: int) -> list[list[tuple[int, Loc]]]:
    """``jobs`` cut into ``parts`` contiguous chunks (one per I/O thread), each cut into runs
    of consecutive slots of one segment, of at most ``most`` blocks: one ``preadv`` each."""
    out: list[list[tuple[int, Loc]]] = []
    step = max(1, -(-len(jobs) // max(1, parts)))
    for c in range(0, len(jobs), step):
        run: list[tuple[int, Loc]] = []
        for job in jobs[c : c + step]:
            prev = run[-1][1] if run else None
            if prev is None or len(run) >= most or job[1].seg is not prev.seg or job[1].slot != prev.slot + 1:
                run = [job]
                out.append(run)
            else:
                run.append(job)
    return out
