# SPDX-License-Identifier: Apache-2.0
"""Fuzzing the disk tier's on-disk format: damaged, forged and swapped files on the real read path.

A directory holding 12 blocks in two segments is written once; each example copies it, damages
the copy (truncation at every offset class, bit flips and garbage in the header, the entries and
the bodies, zero-length files, claimed lengths from 0 to 2^40, forged headers and entries with a
valid checksum but the wrong magic, version, namespace, block size, key or length, entries and
bodies swapped or copied between slots, stray segment-named files) and opens a ``DiskTier`` on it
(a restart), then reopens it once more. The oracle, from the bytes alone:

- a block served equals the bytes stored under its key; a block not served leaves its buffer
  as it was or zeroed (never other bytes);
- a block whose segment header, entry and body are untouched (and whose key appears in no other
  entry) is served, on both opens: damage elsewhere never costs an intact block;
- every read is counted (hits + misses), and the tier still writes and reads new blocks exactly;
- ``disk verify`` on the damaged directory exits 0 or 1 and raises nothing.

No C++ and no mapping of the files is involved (``pread``/``preadv`` only), so these run in
process. Bounded for CI: derandomized, a few seconds on two cores.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import struct
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
import xxhash
from disk_tier_helpers import BB, NS, NS2, body, key, read_back, tier, write
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kv_offload.tiers.disk import cli
from kv_offload.tiers.disk.format import (
    ENTRY_BYTES,
    FORMAT_VERSION,
    SEGMENT_HEADER_BYTES,
    Entry,
    SegmentHeader,
    parse_segment_name,
)  # fmt: skip

SLOTS = 8  # per segment (segment_bytes = 8 blocks)
KEYS = [key(i) for i in range(12)]  # 8 in segment 0, 4 in segment 1
STEMS = [f"s{BB}-0000", f"s{BB}-0001"]
FILES = [s + e for s in STEMS for e in (".idx", ".dat")]
HASHED_HEADER = struct.calcsize("<8sH6x16sQQ") + 8  # the bytes of a segment header its checksum covers
PREFILL = 0xA5
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))  # fmt: skip
FORMAT_FUZZ = settings(max_examples=500, deadline=None, derandomize=True, database=None)

Files = dict[str, bytearray]


@functools.cache
def pristine_files() -> dict[str, bytes]:
    """The files of a tier holding ``KEYS``, by name (built once; each example copies them)."""
    with tempfile.TemporaryDirectory() as root:
        with tier(root, blocks=2 * SLOTS) as t:
            assert write(t, KEYS) == [True] * len(KEYS)
        ns = os.path.join(root, NS.hex())
        assert sorted(os.listdir(ns)) == sorted(FILES)
        out = {}
        for name in FILES:
            with open(os.path.join(ns, name), "rb") as f:
                out[name] = f.read()
    return out


def where(files: dict[str, bytes], k: bytes) -> tuple[str, int]:
    """(segment stem, slot) of ``k`` in the pristine files."""
    for stem in STEMS:
        idx = files[stem + ".idx"]
        for slot in range(SLOTS):
            e = Entry.unpack(idx[SEGMENT_HEADER_BYTES + slot * ENTRY_BYTES :][:ENTRY_BYTES])
            if e is not None and e.key == k:
                return stem, slot
    raise AssertionError(f"{k.hex()} not in the pristine files")


def entry_range(slot: int) -> slice:
    return slice(SEGMENT_HEADER_BYTES + slot * ENTRY_BYTES, SEGMENT_HEADER_BYTES + (slot + 1) * ENTRY_BYTES)


def body_range(slot: int) -> slice:
    return slice(slot * BB, (slot + 1) * BB)


def intact(pristine: dict[str, bytes], files: Files, k: bytes) -> bool:
    """Whether nothing that decides ``k``'s block changed: the hashed part of its segment's
    header, its entry, its body, and no other entry names ``k``."""
    stem, slot = where(pristine, k)
    idx, dat = stem + ".idx", stem + ".dat"
    same = all(
        name in files and files[name][r] == pristine[name][r]
        for name, r in ((idx, slice(0, HASHED_HEADER)), (idx, entry_range(slot)), (dat, body_range(slot)))
    )
    copies = sum(data.count(k) for name, data in files.items() if name.endswith(".idx"))
    return same and copies == 1


@contextlib.contextmanager
def planted(files: Files) -> Iterator[str]:
    """A tier directory holding ``files`` in ``NS``'s namespace directory (owner-only)."""
    with tempfile.TemporaryDirectory() as root:
        os.chmod(root, 0o700)
        ns = os.path.join(root, NS.hex())
        os.mkdir(ns, 0o700)
        for name, data in files.items():
            fd = os.open(os.path.join(ns, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with open(fd, "wb") as f:
                f.write(data)
        yield root


def check_restarts(pristine: dict[str, bytes], files: Files) -> None:
    """The oracle of the module docstring, over two opens of the damaged directory."""
    want = {k: intact(pristine, files, k) for k in KEYS}
    with planted(files) as root:
        for _restart in range(2):
            with tier(root, blocks=2 * SLOTS) as t:
                outs = [bytearray([PREFILL]) * BB for _ in KEYS]
                ok = t.read(KEYS, [memoryview(o) for o in outs])
                for k, got, out in zip(KEYS, ok, outs):
                    if got:
                        assert out == body(k), f"block {k.hex()} served with other bytes"
                    else:
                        assert out == bytes(BB) or out == bytearray([PREFILL]) * BB, "a miss left other bytes"
                    if want[k]:
                        assert got, f"intact block {k.hex()} not served"
                s = t.stats()
                assert s.hits == sum(ok) and s.misses == len(KEYS) - sum(ok)
                assert s.corruptions <= s.misses
        with tier(root, blocks=2 * SLOTS) as t:  # still a working tier: new and lost blocks
            fresh = [key(100 + i) for i in range(3)]
            lost = [k for k in KEYS if not t.contains([k])[0]][:4]
            assert write(t, fresh + lost) == [True] * (len(fresh) + len(lost))
            ok, outs = read_back(t, fresh + lost)
            assert ok == [True] * len(ok) and all(o == body(k) for o, k in zip(outs, fresh + lost))
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            assert cli.main(["verify", "--path", root]) in (0, 1)


# -- byte-level damage ---------------------------------------------------------------------------
def offsets(name: str) -> st.SearchStrategy[int]:
    """Offsets of every class in ``name``: the hashed and padded header, entry boundaries and
    interiors, block boundaries and interiors, and past the end."""
    if name.endswith(".idx"):
        size = SEGMENT_HEADER_BYTES + SLOTS * ENTRY_BYTES
        return st.one_of(
            st.integers(0, HASHED_HEADER), st.integers(HASHED_HEADER, SEGMENT_HEADER_BYTES),
            st.builds(lambda s, r: SEGMENT_HEADER_BYTES + s * ENTRY_BYTES + r, st.integers(0, SLOTS), st.sampled_from([0, 1, 4, 63, 64, 119, 120, 127])),
            st.integers(0, size + 64),
        )  # fmt: skip
    return st.one_of(
        st.builds(lambda s, r: s * BB + r, st.integers(0, SLOTS), st.sampled_from([0, 1, 4095, 4096, BB - 1])),
        st.integers(0, SLOTS * BB + 64),
    )


@st.composite
def damage(draw: Any) -> tuple[Any, ...]:
    name = draw(st.sampled_from(FILES))
    kind = draw(st.sampled_from(["truncate", "flip", "garbage", "extend", "replace", "zeros"]))
    if kind == "truncate":
        return (kind, name, draw(offsets(name)))
    if kind == "flip":
        return (kind, name, draw(offsets(name)), draw(st.integers(0, 7)))
    if kind in ("garbage", "zeros"):
        return (kind, name, draw(offsets(name)), draw(st.binary(min_size=1, max_size=300)))
    if kind == "extend":
        return (kind, name, 0, draw(st.binary(min_size=1, max_size=BB + 10)))
    return (kind, name, 0, draw(st.binary(max_size=5000)))  # replace: zero-length included


def apply_damage(files: Files, op: tuple[Any, ...]) -> None:
    kind, name, at = op[0], op[1], op[2]
    data = files[name]
    if kind == "truncate":
        del data[at:]
    elif kind == "flip":
        if at < len(data):
            data[at] ^= 1 << op[3]
    elif kind == "garbage":
        data[at : at + len(op[3])] = op[3]
    elif kind == "zeros":
        data[at : at + len(op[3])] = bytes(len(op[3]))
    elif kind == "extend":
        data += op[3]
    else:
        files[name] = bytearray(op[3])


@FUZZ
@given(ops=st.lists(damage(), min_size=1, max_size=4))
def test_damaged_files_are_counted_misses_never_wrong_blocks(ops: list[tuple[Any, ...]]) -> None:
    pristine = pristine_files()
    files = {n: bytearray(d) for n, d in pristine.items()}
    for op in ops:
        apply_damage(files, op)
    check_restarts(pristine, files)


# -- forged, swapped and planted structures ------------------------------------------------------
_SEG = struct.Struct("<8sH6x16sQQ")
_ENTRY = struct.Struct("<4sHH16sH6xQQQ64s")
HUGE = [0, 1, SLOTS - 1, SLOTS, SLOTS + 1, 1 << 20, 1 << 40, (1 << 64) - 1]


def forged_header(magic: bytes, version: int, ns: bytes, block_bytes: int, slots: int) -> bytes:
    raw = _SEG.pack(magic, version, ns, block_bytes, slots)
    return raw + struct.pack("<Q", xxhash.xxh3_64_intdigest(raw))


def forged_entry(magic: bytes, version: int, state: int, ns: bytes, key_len: int, length: int, body_hash: int, k: bytes) -> bytes:
    raw = _ENTRY.pack(magic, version, state, ns, key_len, length, 0, body_hash, k)
    return raw + struct.pack("<Q", xxhash.xxh3_64_intdigest(raw))


@st.composite
def structure(draw: Any) -> tuple[Any, ...]:
    stem = draw(st.sampled_from(STEMS))
    kind = draw(st.sampled_from(["swap_entries", "swap_bodies", "swap_slots", "copy_entry", "copy_body", "copy_slot",
                                 "forge_header", "forge_entry", "stray", "plant_foreign"]))  # fmt: skip
    i, j = draw(st.integers(0, SLOTS - 1)), draw(st.integers(0, SLOTS - 1))
    if kind == "forge_header":  # a valid checksum, at most one field wrong
        fields: dict[str, Any] = {"magic": b"KVOSEG01", "version": FORMAT_VERSION, "ns": NS, "block_bytes": BB, "slots": SLOTS}
        wrong = draw(st.sampled_from([None, *fields]))
        if wrong is not None:
            fields[wrong] = draw(st.sampled_from({
                "magic": [b"KVOSEG02", b"\0" * 8], "version": [0, 2, 0xFFFF], "ns": [NS2, bytes(16)],
                "block_bytes": [BB // 2, 2 * BB, 0, 4096, (1 << 64) - 1], "slots": HUGE,
            }[wrong]))  # fmt: skip
        return (kind, stem, forged_header(fields["magic"], fields["version"], fields["ns"], fields["block_bytes"], fields["slots"]))
    if kind == "forge_entry":  # a valid checksum, at most one field wrong
        efields: dict[str, Any] = {"magic": b"KVOB", "version": FORMAT_VERSION, "state": 1, "ns": NS, "key_len": 32,
                                   "length": BB, "hash": "same", "key": "same"}  # fmt: skip
        wrong = draw(st.sampled_from([None, *efields]))
        if wrong is not None:
            efields[wrong] = draw(st.sampled_from({
                "magic": [b"KVOC", b"\0\0\0\0"], "version": [0, 2], "state": [0, 2], "ns": [NS2, bytes(16)],
                "key_len": [0, 31, 64, 65, 0xFFFF], "length": [0, BB - 1, BB + 1, 1 << 40, (1 << 64) - 1],
                "hash": ["zero", "random"], "key": ["fresh"],
            }[wrong]))  # fmt: skip
        return (kind, stem, i, *efields.values())
    if kind == "stray":
        return (kind, draw(st.sampled_from([f"s{BB}-0002", f"s{BB}-0007", f"s{BB // 2}-0000", "s0-0000", f"s{BB}-00001"])),
                draw(st.sampled_from([".idx", ".dat"])), draw(st.binary(max_size=SEGMENT_HEADER_BYTES + 300)))  # fmt: skip
    return (kind, stem, i, j)


def apply_structure(pristine: dict[str, bytes], files: Files, op: tuple[Any, ...]) -> None:
    kind = op[0]
    if kind == "forge_header":
        files[op[1] + ".idx"][: HASHED_HEADER] = op[2]
        return
    if kind == "forge_entry":
        _, stem, slot, magic, version, state, ns, key_len, length, hash_kind, key_kind = op
        old = Entry.unpack(pristine[stem + ".idx"][entry_range(slot)])
        k = old.key if old is not None and key_kind == "same" else key(999)  # never another stored key
        body_hash = {"same": old.body_hash if old else 0, "zero": 0, "random": 0x0123456789ABCDEF}[hash_kind]
        files[stem + ".idx"][entry_range(slot)] = forged_entry(magic, version, state, ns, key_len, length, body_hash, k)
        return
    if kind == "stray":
        files[op[1] + op[2]] = bytearray(op[3])
        return
    _, stem, i, j = op
    idx, dat = files[stem + ".idx"], files[stem + ".dat"]
    if kind == "plant_foreign":  # the other segment's slot i (entry and body) planted in slot j
        other = STEMS[1 - STEMS.index(stem)]
        idx[entry_range(j)] = files[other + ".idx"][entry_range(i)]
        dat[body_range(j)] = files[other + ".dat"][body_range(i)]
        return
    moves = {"swap_entries": [(idx, entry_range)], "swap_bodies": [(dat, body_range)], "swap_slots": [(idx, entry_range), (dat, body_range)],
             "copy_entry": [(idx, entry_range)], "copy_body": [(dat, body_range)], "copy_slot": [(idx, entry_range), (dat, body_range)]}[kind]  # fmt: skip
    for data, r in moves:
        a, b = bytes(data[r(i)]), bytes(data[r(j)])
        data[r(j)] = a
        if kind.startswith("swap"):
            data[r(i)] = b


@FUZZ
@given(ops=st.lists(structure(), min_size=1, max_size=3))
def test_forged_swapped_and_planted_structures_never_serve_a_wrong_block(ops: list[tuple[Any, ...]]) -> None:
    pristine = pristine_files()
    files = {n: bytearray(d) for n, d in pristine.items()}
    for op in ops:
        apply_structure(pristine, files, op)
    check_restarts(pristine, files)


# -- the parsers on their own --------------------------------------------------------------------
@FORMAT_FUZZ
@given(raw=st.one_of(st.binary(max_size=ENTRY_BYTES + 8), st.builds(lambda b: b"KVOB" + b, st.binary(max_size=ENTRY_BYTES))))
def test_entry_parser_takes_any_bytes(raw: bytes) -> None:
    e = Entry.unpack(raw)
    assert e is None or (len(e.key) <= 64 and len(e.namespace) == 16 and Entry.unpack(e.pack()) == e)


@FORMAT_FUZZ
@given(raw=st.one_of(st.binary(max_size=SEGMENT_HEADER_BYTES), st.builds(lambda b: b"KVOSEG01" + b, st.binary(max_size=64))))
def test_segment_header_parser_takes_any_bytes(raw: bytes) -> None:
    h = SegmentHeader.unpack(raw)
    assert h is None or (h.slots > 0 and h.block_bytes > 0 and SegmentHeader.unpack(h.pack()) == h)


@FORMAT_FUZZ
@given(stem=st.text(max_size=40))
def test_segment_name_parser_takes_any_text(stem: str) -> None:
    parsed = parse_segment_name(stem)
    assert parsed is None or (parsed[0] > 0 and parsed[1] >= 0)


# -- deterministic cases the fuzz found or must always cover -------------------------------------
@pytest.mark.parametrize("cut", [HASHED_HEADER, SEGMENT_HEADER_BYTES + 3 * ENTRY_BYTES + 7])
def test_truncated_index_files_leave_a_working_tier(cut: int) -> None:
    """Found by the damage fuzz: both .idx files cut short behind a valid header made the
    adopting tier take segments with no entries to give, and refuse every write."""
    pristine = pristine_files()
    files = {n: bytearray(d) for n, d in pristine.items()}
    for stem in STEMS:
        apply_damage(files, ("truncate", stem + ".idx", cut))
    check_restarts(pristine, files)


@pytest.mark.parametrize("slots", [1 << 40, (1 << 64) - 1])
def test_a_header_claiming_a_huge_slot_count_is_bounded_by_the_file(slots: int) -> None:
    """Found by the structure fuzz: a valid header claiming 2^40 slots made the constructor
    read 2^47 bytes of entries (MemoryError) instead of the entries the file holds."""
    pristine = pristine_files()
    files = {n: bytearray(d) for n, d in pristine.items()}
    apply_structure(pristine, files, ("forge_header", STEMS[0], forged_header(b"KVOSEG01", FORMAT_VERSION, NS, BB, slots)))
    check_restarts(pristine, files)


def test_another_namespaces_segments_serve_nothing_there() -> None:
    """NS's segment files copied into NS2's directory: NS2 indexes none of them (their header
    names NS), serves nothing, and lays them out afresh for its own blocks."""
    with tempfile.TemporaryDirectory() as root:
        os.chmod(root, 0o700)
        ns2 = os.path.join(root, NS2.hex())
        os.mkdir(ns2, 0o700)
        for name, data in pristine_files().items():
            with open(os.open(os.path.join(ns2, name), os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
                f.write(data)
        with tier(root, ns=NS2, blocks=2 * SLOTS) as t:
            assert t.contains(KEYS) == [False] * len(KEYS)
            assert read_back(t, KEYS)[0] == [False] * len(KEYS)
            mine = [NS2 + bytes(8) + i.to_bytes(8, "little") for i in range(4)]
            assert write(t, mine) == [True] * 4
            ok, outs = read_back(t, mine + KEYS)
            assert ok == [True] * 4 + [False] * len(KEYS) and all(o == body(k) for o, k in zip(outs, mine))
