# SPDX-License-Identifier: Apache-2.0
"""Things planted in the disk tier's directory at a segment's name: never followed, never served.

A directory holding 12 blocks in two segments is written by a real ``DiskTier``; then one file
of segment 0 is moved out of the cache and something else is planted at its name: a symlink to
the moved file (still a valid segment file: if it were followed, its blocks would be served),
a dangling symlink, a symlink to a directory, a hard link to a file outside the cache, a FIFO,
a directory, a socket, and (as root) a character device. A new tier on that directory (a
restart) must:

- serve none of segment 0's blocks, and every block of segment 1, exactly;
- log one warning naming the segment and what sits there, however often it refreshes;
- keep writing and reading new blocks exactly (another segment name is used);
- leave the planted thing and whatever it points to as they were (never written through).

The same plants in an empty directory (the name a first write would create) must not stop the
writes either: a directory or a socket at a segment's name used to make every write fail
(``IsADirectoryError`` / ENXIO out of the segment claim), fixed in ``segment._open_named``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import stat
from collections.abc import Callable

import pytest
from disk_tier_helpers import BB, NS, NS2, body, key, read_back, tier, write

from kv_offload.tiers.disk import DiskTierError
from kv_offload.tiers.disk.format import ENTRY_BYTES, SEGMENT_HEADER_BYTES, Entry

SLOTS = 8
KEYS = [key(i) for i in range(12)]
STEM0, STEM1 = f"s{BB}-0000", f"s{BB}-0001"


def _ns(root: str, ns: bytes = NS) -> str:
    return os.path.join(root, ns.hex())


def _keys_in(idx_path: str) -> list[bytes]:
    with open(idx_path, "rb") as f:
        raw = f.read()
    out = []
    for slot in range(SLOTS):
        e = Entry.unpack(raw[SEGMENT_HEADER_BYTES + slot * ENTRY_BYTES :][:ENTRY_BYTES])
        if e is not None:
            out.append(e.key)
    return out


def _fingerprint(path: str) -> tuple[int, int, str]:
    """What a plant is, and what it points to: file type, link count, bytes (or link target)."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        content = "->" + os.readlink(path)
    elif stat.S_ISREG(st.st_mode):
        with open(path, "rb") as f:
            content = hashlib.sha256(f.read()).hexdigest()
    elif stat.S_ISDIR(st.st_mode):
        content = repr(sorted(os.listdir(path)))
    else:
        content = ""
    return stat.S_IFMT(st.st_mode), st.st_nlink, content


# Each planter puts something at ``at``; ``moved`` is the original file, now outside the cache
# (the planters that link to it make it the thing a followed link would expose). Returns the
# paths whose fingerprint must not change, and the words the warning must hold.
Planter = Callable[[str, str, str], tuple[list[str], str]]


def _symlink_to_file(at: str, moved: str, outside: str) -> tuple[list[str], str]:
    os.symlink(moved, at)
    return [at, moved], "symlink"


def _dangling_symlink(at: str, moved: str, outside: str) -> tuple[list[str], str]:
    os.symlink(os.path.join(outside, "nothing-here"), at)
    return [at], "symlink"


def _symlink_to_dir(at: str, moved: str, outside: str) -> tuple[list[str], str]:
    os.symlink(outside, at)
    return [at, outside], "symlink"


def _hard_link(at: str, moved: str, outside: str) -> tuple[list[str], str]:
    os.link(moved, at)
    return [at, moved], "2 links"


def _fifo(at: str, moved: str, outside: str) -> tuple[list[str], str]:
    os.mkfifo(at, 0o600)
    return [at], "a FIFO"


def _directory(at: str, moved: str, outside: str) -> tuple[list[str], str]:
    os.mkdir(at, 0o700)
    return [at], "directory"


def _socket(at: str, moved: str, outside: str) -> tuple[list[str], str]:
    os.mknod(at, 0o600 | stat.S_IFSOCK)
    return [at], "socket"


def _char_device(at: str, moved: str, outside: str) -> tuple[list[str], str]:
    if os.geteuid() != 0:
        pytest.skip("creating a device node needs root")
    os.mknod(at, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # what /dev/null is
    return [at], "a character device"


PLANTERS: dict[str, Planter] = {
    "symlink_to_file": _symlink_to_file, "dangling_symlink": _dangling_symlink, "symlink_to_dir": _symlink_to_dir,
    "hard_link": _hard_link, "fifo": _fifo, "directory": _directory, "socket": _socket, "char_device": _char_device,
}  # fmt: skip


def _check_tier_survives(root: str, stem: str, served: list[bytes], lost: list[bytes], caplog: pytest.LogCaptureFixture,
                         why: str, fresh_salt: int) -> None:  # fmt: skip
    """One restart on ``root``: ``served`` are read exactly, ``lost`` miss, one warning for
    ``stem`` saying ``why``, new blocks write and read exactly (several batches and refreshes)."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, "kv_offload.tiers.disk"), tier(root, blocks=2 * SLOTS) as t:
        assert t.contains(lost) == [False] * len(lost)
        for _ in range(3):
            t.refresh()
        ok, outs = read_back(t, served + lost)
        assert ok == [True] * len(served) + [False] * len(lost)
        assert all(o == body(k) for o, k in zip(outs, served))
        assert all(o == bytes(BB) for o in outs[len(served) :]), "a miss left bytes behind"
        fresh = [key(i, salt=fresh_salt) for i in range(6)]
        for batch in (fresh[:1], fresh[1:4], fresh[4:]):
            assert write(t, batch) == [True] * len(batch)
            t.refresh()
        ok, outs = read_back(t, fresh)
        assert ok == [True] * len(fresh) and all(o == body(k) for o, k in zip(outs, fresh))
        assert t.stats().corruptions == 0
    warnings = [r.getMessage() for r in caplog.records if stem in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "unusable" in warnings[0] and why in warnings[0], warnings[0]


@pytest.mark.parametrize("ext", [".idx", ".dat"])
@pytest.mark.parametrize("plant", sorted(PLANTERS))
def test_a_plant_in_place_of_a_segment_file_is_never_followed_nor_served(
    tmp_path: object, caplog: pytest.LogCaptureFixture, plant: str, ext: str
) -> None:  # fmt: skip
    root, outside = os.path.join(str(tmp_path), "kv"), os.path.join(str(tmp_path), "outside")
    os.mkdir(outside, 0o700)
    with tier(root, blocks=2 * SLOTS) as t:
        assert write(t, KEYS) == [True] * len(KEYS)
    ns = _ns(root)
    in0 = _keys_in(os.path.join(ns, STEM0 + ".idx"))
    in1 = _keys_in(os.path.join(ns, STEM1 + ".idx"))
    assert sorted(in0 + in1) == sorted(KEYS) and len(in0) == SLOTS
    at, moved = os.path.join(ns, STEM0 + ext), os.path.join(outside, STEM0 + ext)
    os.rename(at, moved)
    keep, why = PLANTERS[plant](at, moved, outside)
    before = {p: _fingerprint(p) for p in keep}
    _check_tier_survives(root, STEM0, in1, in0, caplog, why, fresh_salt=1)
    # again (segment 1's old blocks were evicted by the new ones: half the capacity is the plant's)
    _check_tier_survives(root, STEM0, [], in0, caplog, why, fresh_salt=2)
    assert {p: _fingerprint(p) for p in keep} == before, "the plant or its target changed"


@pytest.mark.parametrize("ext", [".idx", ".dat"])
@pytest.mark.parametrize("plant", sorted(PLANTERS))
def test_a_plant_at_the_first_segment_name_does_not_stop_writes(
    tmp_path: object, caplog: pytest.LogCaptureFixture, plant: str, ext: str
) -> None:  # fmt: skip
    """The name a first write creates is taken by the plant: the claim skips it, once."""
    root, outside = os.path.join(str(tmp_path), "kv"), os.path.join(str(tmp_path), "outside")
    os.mkdir(outside, 0o700)
    os.mkdir(root, 0o700)
    os.mkdir(_ns(root), 0o700)
    moved = os.path.join(outside, "victim")
    with open(moved, "wb") as f:
        f.write(b"keep me" * 1000)
    keep, why = PLANTERS[plant](os.path.join(_ns(root), STEM0 + ext), moved, outside)
    before = {p: _fingerprint(p) for p in keep}
    _check_tier_survives(root, STEM0, [], [], caplog, why, fresh_salt=7)
    assert {p: _fingerprint(p) for p in keep} == before, "the plant or its target changed"


def test_a_symlinked_namespace_directory_is_refused_and_other_namespaces_work(tmp_path: object) -> None:
    """NS's directory replaced by a symlink to a copy of a valid one elsewhere: refused with
    an error naming it (never opened, so never served); NS2 in the same root still works."""
    root, outside = os.path.join(str(tmp_path), "kv"), os.path.join(str(tmp_path), "outside")
    with tier(root, blocks=2 * SLOTS) as t:
        assert write(t, KEYS) == [True] * len(KEYS)
    os.rename(_ns(root), outside)
    os.symlink(outside, _ns(root))
    before = _fingerprint(os.path.join(outside, STEM0 + ".dat"))
    with pytest.raises(DiskTierError, match=f"{NS.hex()}.*symlink; refusing to follow it"):
        tier(root, blocks=2 * SLOTS)
    with tier(root, ns=NS2, blocks=2 * SLOTS) as t2:
        mine = [NS2 + bytes(8) + i.to_bytes(8, "little") for i in range(3)]
        assert write(t2, mine) == [True] * 3
        ok, outs = read_back(t2, mine)
        assert ok == [True] * 3 and all(o == body(k) for o, k in zip(outs, mine))
    assert _fingerprint(os.path.join(outside, STEM0 + ".dat")) == before


def test_a_socket_bound_at_a_segment_name_is_skipped(tmp_path: object, caplog: pytest.LogCaptureFixture) -> None:
    """A live listening socket (not only a socket inode) at a segment's name."""
    root = os.path.join(str(tmp_path), "kv")
    os.makedirs(_ns(root), 0o700)
    cwd = os.getcwd()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.chdir(_ns(root))  # a relative name: socket paths are limited to 108 bytes
        sock.bind(STEM0 + ".idx")
        sock.listen(1)
        os.chdir(cwd)
        _check_tier_survives(root, STEM0, [], [], caplog, "socket", fresh_salt=9)
    finally:
        os.chdir(cwd)
        sock.close()
