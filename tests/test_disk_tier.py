# SPDX-License-Identifier: Apache-2.0
"""The disk tier in one process: round trips, namespaces, restart, capacity, corruption,
I/O errors (a real tmpfs where this user can mount one, the documented fault hook otherwise),
directory permissions and symlinks, and the command line."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import time

import pytest

from disk_tier_helpers import BB, NS, NS2, body, key, read_back, tier, tmpfs, write
from kv_offload.tiers import BlockTier
from kv_offload.tiers.disk import DiskTier, DiskTierError
from kv_offload.tiers.disk import cli
from kv_offload.tiers.disk.files import AlignedBuffer


def _ns_dir(root: str, ns: bytes = NS) -> str:
    return os.path.join(root, ns.hex())


def test_round_trip_batches_byte_exact_and_untouched_buffers_unchanged(tmp_path: object) -> None:
    with tier(str(tmp_path)) as t:
        assert isinstance(t, BlockTier)
        keys = [key(i) for i in range(20)]
        assert write(t, keys) == [True] * 20
        assert t.contains(keys + [key(99)]) == [True] * 20 + [False]
        ok, outs = read_back(t, keys)
        assert ok == [True] * 20 and all(bytes(o) == body(k) for o, k in zip(outs, keys))
        # a miss leaves its buffer exactly as it was; the hits beside it are exact
        sentinel = bytearray(b"\xa5" * BB)
        hit = bytearray(BB)
        assert t.read([key(99), keys[3]], [memoryview(sentinel), memoryview(hit)]) == [False, True]
        assert sentinel == b"\xa5" * BB and bytes(hit) == body(keys[3])
        # page-aligned buffers (the pool's slots) take the O_DIRECT path without a copy
        buf = AlignedBuffer(BB)
        assert t.read([keys[5]], [buf.view]) == [True] and bytes(buf.view) == body(keys[5])
        assert t.write([(key(50), buf.view)]) == [True]
        s = t.stats()
        assert (s.blocks, s.writes, s.hits, s.misses) == (21, 21, 22, 1)
        assert s.io_mode in ("direct", "buffered") and s.checksum == "xxh3_64"
        buf.close()


def test_wrong_arguments_are_clear_errors(tmp_path: object) -> None:
    with pytest.raises(ValueError, match="namespace must be 16 bytes"):
        DiskTier(str(tmp_path), 1 << 20, b"short", BB)
    with pytest.raises(ValueError, match="multiple of 4096"):
        DiskTier(str(tmp_path), 1 << 20, NS, 1000)
    with pytest.raises(ValueError, match="capacity_bytes"):
        DiskTier(str(tmp_path), 100, NS, BB)
    with tier(str(tmp_path)) as t:
        with pytest.raises(ValueError, match="write item 0: block is 10 bytes"):
            t.write([(key(1), memoryview(b"x" * 10))])
        with pytest.raises(ValueError, match="key must be 1..64 bytes"):
            t.write([(b"k" * 65, memoryview(bytes(BB)))])
        with pytest.raises(ValueError, match="writable buffer"):
            t.read([key(1)], [memoryview(bytes(BB))])


def test_namespaces_are_separate_even_for_the_same_key(tmp_path: object) -> None:
    root = str(tmp_path)
    a, b = tier(root, ns=NS), tier(root, ns=NS2)
    k = key(7)
    assert a.write([(k, memoryview(b"A" * BB))]) == [True]
    assert b.contains([k]) == [False] and read_back(b, [k])[0] == [False]
    assert b.write([(k, memoryview(b"B" * BB))]) == [True]
    assert bytes(read_back(a, [k])[1][0]) == b"A" * BB and bytes(read_back(b, [k])[1][0]) == b"B" * BB
    b.refresh()  # rescans its own namespace only
    assert bytes(read_back(b, [k])[1][0]) == b"B" * BB
    a.close(), b.close()


def test_restart_indexes_blocks_without_reading_bodies(tmp_path: object) -> None:
    root = str(tmp_path)
    keys = [key(i) for i in range(40)]
    with tier(root) as t:
        write(t, keys)
    with tier(root) as t2:
        s = t2.stats()
        assert s.index_blocks == 40 and 0 <= s.index_seconds < 5
        assert t2.contains(keys) == [True] * 40 and s.hits == 0
        ok, outs = read_back(t2, keys)
        assert all(ok) and all(bytes(o) == body(k) for o, k in zip(outs, keys))


def test_capacity_evicts_least_recent_and_holds_the_bound(tmp_path: object) -> None:
    root = str(tmp_path)
    with tier(root, blocks=16) as t:  # 2 segments of 8 slots
        first = [key(i) for i in range(16)]
        write(t, first)
        read_back(t, first[:4])  # the first four are now the most recent
        write(t, [key(i) for i in range(100, 108)])
        s = t.stats()
        assert s.blocks == 16 and s.evictions == 8
        assert t.contains(first[:4]) == [True] * 4 and t.contains(first[4:12]) == [False] * 8
        for i in range(200, 260):  # keep writing: the bound holds
            write(t, [key(i)])
        assert t.stats().blocks == 16
    size = sum(os.path.getsize(os.path.join(_ns_dir(root), f)) for f in os.listdir(_ns_dir(root)) if f.endswith(".dat"))
    assert size == 16 * BB


def test_a_batch_larger_than_the_tier_stores_what_fits(tmp_path: object) -> None:
    with tier(str(tmp_path), blocks=8) as t:
        res = write(t, [key(i) for i in range(12)])
        assert sum(res) == 8 and t.stats().refused == 4


def test_remove(tmp_path: object) -> None:
    root = str(tmp_path)
    with tier(root) as t:
        write(t, [key(1), key(2)])
        assert t.remove([key(1), key(3)]) == [True, False]
        assert read_back(t, [key(1)])[0] == [False] and t.contains([key(2)]) == [True]
    with tier(root) as t:  # gone on disk too
        assert t.contains([key(1), key(2)]) == [False, True]


def test_evict_drops_only_our_own_unheld_blocks(tmp_path: object) -> None:
    """``evict`` (room the connector's scheduler chose) never drops another live instance's
    block, which ``remove`` would, nor one whose read is queued (held)."""
    root = str(tmp_path)
    with tier(root, threads=1) as other, tier(root, threads=1) as ours:
        write(other, [key(1)])
        write(ours, [key(2), key(3)])
        ours.refresh()  # now it indexes key(1), in a segment it does not own
        assert ours.contains([key(1), key(2), key(3)]) == [True, True, True]
        ours.hold([key(3)])
        ours.evict([key(1), key(2), key(3), key(4), key(2)])
        assert ours.contains([key(1), key(2), key(3)]) == [True, False, True]
        assert other.contains([key(1)]) == [True] and read_back(other, [key(1)])[0] == [True]
        assert ours.stats().evictions == 1
        ours.release([key(3)])
        ours.evict([key(3)])
        assert ours.contains([key(3)]) == [False] and ours.stats().evictions == 2


def test_evicted_room_is_written_without_the_tier_choosing_victims(tmp_path: object) -> None:
    with tier(str(tmp_path), blocks=4, threads=1) as t:
        write(t, [key(i) for i in range(4)])  # full
        t.evict([key(2), key(0)])
        assert write(t, [key(10), key(11)]) == [True, True]
        # key(1), the least recently used now, was not evicted by the write: the room was made.
        assert t.contains([key(i) for i in (0, 1, 2, 3, 10, 11)]) == [False, True, False, True, True, True]
        assert t.stats().evictions == 2


@pytest.mark.parametrize("where", ["body", "entry"])
def test_corruption_is_a_counted_miss_and_removed_nothing_else_affected(tmp_path: object, where: str,
                                                                        caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    root = str(tmp_path)
    keys = [key(i) for i in range(8)]
    with tier(root) as t:
        write(t, keys)
    seg = os.path.join(_ns_dir(root), f"s{BB}-0000")
    slot = 0  # 8 keys in 8 slots: slot 0 holds one of them
    with open(seg + (".dat" if where == "body" else ".idx"), "r+b") as f:
        off = slot * BB + 100 if where == "body" else 4096 + slot * 128 + 60
        f.seek(off)
        byte = f.read(1)
        f.seek(off)
        f.write(bytes([byte[0] ^ 0xFF]))
    with tier(root) as t:
        if where == "entry":  # a bad entry is not indexed at all: the block is simply absent
            assert sum(t.contains(keys)) == 7
        with caplog.at_level(logging.WARNING, "kv_offload.tiers.disk"):
            ok, outs = read_back(t, keys)
        assert sum(ok) == 7
        bad = keys[ok.index(False)]
        assert all(bytes(o) == body(k) for o, k, g in zip(outs, keys, ok) if g)
        assert outs[ok.index(False)] == bytes(BB)  # never garbage left as if valid
        if where == "body":
            assert t.stats().corruptions == 1 and "failed its checksum" in caplog.text
        assert t.contains([bad]) == [False]
    with tier(root) as t:  # removed on disk: the next instance does not index it
        assert sum(t.contains(keys)) == 7 and t.contains([bad]) == [False]


@pytest.mark.parametrize("threads", [1, 4])
def test_neighbouring_slots_read_together_each_block_on_its_own_merits(tmp_path: object, threads: int) -> None:
    """A batch of consecutive slots is read with one preadv per run: a corrupt block, a removed
    one, a missing key, a buffer O_DIRECT cannot take and a segment boundary inside the batch
    each affect only their own block."""
    root = str(tmp_path)
    keys = [key(i) for i in range(16)]  # two segments of 8 slots
    with tier(root, threads=threads) as t:
        assert write(t, keys) == [True] * 16
        bad, gone = keys[3], keys[5]
        loc = t._index[bad]
        assert {t._index[k].seg.stem for k in keys} == {loc.seg.stem, f"s{BB}-0001"}
        with open(os.path.join(_ns_dir(root), loc.seg.stem + ".dat"), "r+b") as f:
            f.seek(loc.slot * BB + 100)
            f.write(b"\xff\x00\xff")
        assert t.remove([gone]) == [True]
        asked = keys[:12] + [key(99)] + keys[12:]
        bufs = [AlignedBuffer(BB) for _ in asked]
        for b in bufs:
            b.view[:] = b"\xa5" * BB
        odd = bytearray(b"\xa5" * BB)  # not page-aligned: read alone, through a bounce buffer
        dests = [b.view for b in bufs]
        dests[9] = memoryview(odd)
        ok = t.read(asked, dests)
        assert ok == [k not in (bad, gone, key(99)) for k in asked]
        for k, d, good in zip(asked, dests, ok):
            want = body(k) if good else bytes(BB) if k == bad else b"\xa5" * BB
            assert bytes(d) == want, k
        s = t.stats()
        assert (s.hits, s.misses, s.corruptions) == (14, 3, 1)
        for b in bufs:
            b.close()


def _one_warning(caplog: pytest.LogCaptureFixture) -> int:
    return sum("failed (" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_enospc_on_a_small_tmpfs_fails_writes_with_one_warning(tmp_path: object, caplog: pytest.LogCaptureFixture) -> None:
    with tmpfs(os.path.join(str(tmp_path), "mnt"), "64k") as mnt:
        if mnt is None:
            pytest.skip("cannot mount a tmpfs here (test_injected_errors covers the same paths)")
        with tier(mnt, blocks=32, segment_bytes=32 * BB) as t, caplog.at_level(logging.WARNING):
            res = [write(t, [key(i)])[0] for i in range(20)]
            assert res == [False] * 20
            s = t.stats()
            assert s.write_failures == 20 and _one_warning(caplog) == 1 and "ENOSPC" in caplog.text
            assert read_back(t, [key(1)])[0] == [False]


def test_read_only_file_system_reads_work_writes_fail_once_warned(tmp_path: object, caplog: pytest.LogCaptureFixture) -> None:
    with tmpfs(os.path.join(str(tmp_path), "mnt"), "4m") as mnt:
        if mnt is None:
            pytest.skip("cannot mount a tmpfs here")
        with tier(mnt) as t:
            write(t, [key(i) for i in range(8)])
        assert subprocess.run(["mount", "-o", "remount,ro", mnt], capture_output=True).returncode == 0
        with tier(mnt) as t, caplog.at_level(logging.WARNING):
            ok, outs = read_back(t, [key(i) for i in range(8)])
            assert all(ok) and bytes(outs[0]) == body(key(0))
            assert [write(t, [key(100 + i)])[0] for i in range(10)] == [False] * 10
            assert t.stats().write_failures == 10 and _one_warning(caplog) == 1


def test_vanished_directory_writes_fail_reads_miss_one_warning(tmp_path: object, caplog: pytest.LogCaptureFixture) -> None:
    root = os.path.join(str(tmp_path), "kv")
    with tier(root) as t, caplog.at_level(logging.WARNING):
        write(t, [key(1)])
        shutil.rmtree(root)
        assert [write(t, [key(10 + i)])[0] for i in range(5)] == [False] * 5
        assert read_back(t, [key(1)])[0] == [False]
        s = t.stats()
        assert s.write_failures == 5 and s.misses == 1
        assert _one_warning(caplog) == 2  # one for writes, one for reads


def test_injected_errors_through_the_fault_hook(tmp_path: object, caplog: pytest.LogCaptureFixture) -> None:
    """The documented hook raises a real OSError inside the write path (EIO, ENOSPC)."""
    fail: list[int] = []

    def hook(step: str) -> None:
        if fail and step == "body":
            raise OSError(fail[0], os.strerror(fail[0]))

    with tier(str(tmp_path), fault_hook=hook) as t, caplog.at_level(logging.WARNING):
        write(t, [key(0)])
        fail.append(errno.EIO)
        assert [write(t, [key(i)])[0] for i in range(1, 11)] == [False] * 10
        assert t.stats().write_failures == 10 and _one_warning(caplog) == 1 and "EIO" in caplog.text
        fail.clear()
        assert write(t, [key(50)]) == [True]  # recovers; a new run of failures warns again
        fail.append(errno.ENOSPC)
        assert write(t, [key(51), key(52)]) == [False, False]
        assert _one_warning(caplog) == 2
        ok, _ = read_back(t, [key(0), key(1), key(50)])
        assert ok == [True, False, True]


def test_directories_and_files_are_owner_only(tmp_path: object) -> None:
    root = os.path.join(str(tmp_path), "kv")
    with tier(root) as t:
        write(t, [key(1)])
    for d, _, files in os.walk(root):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
        for f in files:
            assert stat.S_IMODE(os.stat(os.path.join(d, f)).st_mode) == 0o600


def test_refuses_world_writable_or_foreign_directories(tmp_path: object) -> None:
    root = os.path.join(str(tmp_path), "kv")
    os.mkdir(root)
    os.chmod(root, 0o777)
    with pytest.raises(DiskTierError, match="world-writable"):
        tier(root)
    os.chmod(root, 0o700)
    if os.geteuid() == 0:
        os.chown(root, 65534, 65534)
        with pytest.raises(DiskTierError, match="owned by uid 65534, not by this user"):
            tier(root)
        os.chown(root, 0, 0)
    with tier(root):
        pass
    os.chmod(_ns_dir(root), 0o777)
    with pytest.raises(DiskTierError, match="namespace directory .* world-writable"):
        tier(root)


def test_no_symlink_is_followed_inside_the_directory(tmp_path: object) -> None:
    root = os.path.join(str(tmp_path), "kv")
    elsewhere = os.path.join(str(tmp_path), "elsewhere")
    os.makedirs(root, mode=0o700)
    os.makedirs(elsewhere, mode=0o700)
    os.symlink(elsewhere, _ns_dir(root))
    with pytest.raises(DiskTierError, match="symlink; refusing to follow it"):
        tier(root)
    os.unlink(_ns_dir(root))
    os.mkdir(_ns_dir(root), 0o700)
    victim = os.path.join(elsewhere, "victim")
    with open(victim, "wb") as f:
        f.write(b"keep me")
    for ext in ("idx", "dat"):
        os.symlink(victim, os.path.join(_ns_dir(root), f"s{BB}-0000.{ext}"))
    with tier(root) as t:
        # segment 0 is a symlink: never opened; the tier writes into segment 1 instead
        assert write(t, [key(1)]) == [True]
        assert read_back(t, [key(1)])[0] == [True]
    with open(victim, "rb") as f:
        assert f.read() == b"keep me"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The command line, in this process (the ``python -m`` entry is checked once below)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(list(args))
    return subprocess.CompletedProcess(["disk", *args], rc, out.getvalue(), err.getvalue())


def test_cli_entry_point(tmp_path: object) -> None:
    root = os.path.join(str(tmp_path), "kv")
    with tier(root) as t:
        write(t, [key(1)])
    out = subprocess.run([sys.executable, "-m", "kv_offload", "disk", "list", "--path", root],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0 and f"{NS.hex()}         1" in out.stdout, out.stderr
    bad = subprocess.run([sys.executable, "-m", "kv_offload"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "usage: python -m kv_offload disk" in bad.stderr


def test_cli_list_verify_purge(tmp_path: object) -> None:
    root = os.path.join(str(tmp_path), "kv")
    with tier(root) as t:
        write(t, [key(i) for i in range(5)])
    with tier(root, ns=NS2) as t:
        write(t, [key(i) for i in range(3)])
    out = _cli("list", "--path", root)
    assert out.returncode == 0, out.stderr
    assert f"{NS.hex()}         5           {5 * BB}" in out.stdout and f"{NS2.hex()}         3" in out.stdout
    ok = _cli("verify", "--path", root)
    assert ok.returncode == 0 and "verified 8 blocks: 8 ok, 0 corrupt" in ok.stdout
    with open(os.path.join(_ns_dir(root), f"s{BB}-0000.dat"), "r+b") as f:
        f.seek(BB + 7)
        f.write(b"\x00\xff\x00")
    bad = _cli("verify", "--path", root, "--namespace", NS.hex())
    assert bad.returncode == 1 and "CORRUPT namespace=" + NS.hex() in bad.stdout and "4 ok, 1 corrupt" in bad.stdout
    gone = _cli("purge", "--path", root, "--namespace", NS.hex())
    assert gone.returncode == 0 and "2 segments deleted" not in gone.stdout and "segments deleted" in gone.stdout
    assert not os.path.exists(_ns_dir(root))
    assert f"{NS2.hex()}         3" in _cli("list", "--path", root).stdout
    err = _cli("purge", "--path", root)
    assert err.returncode == 2 and "purge needs --namespace" in err.stderr
    assert _cli("list", "--path", os.path.join(root, "nope")).returncode == 2


def test_purge_while_a_process_owns_the_segment_clears_its_entries(tmp_path: object) -> None:
    root = os.path.join(str(tmp_path), "kv")
    with tier(root) as t:
        write(t, [key(i) for i in range(3)])
        out = _cli("purge", "--path", root, "--namespace", NS.hex())
        assert "3 blocks cleared in segments in use" in out.stdout, out.stdout + out.stderr
        assert read_back(t, [key(0)])[0] == [False] and t.stats().corruptions == 0


def test_threads_share_one_tier(tmp_path: object) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with tier(str(tmp_path), blocks=24, threads=3) as t:
        def work(w: int) -> bool:
            good = True
            for i in range(30):
                k = key(i % 12, salt=w % 2)
                write(t, [k, key(i + 100, salt=w)])
                ok, outs = read_back(t, [k])
                good &= not ok[0] or bytes(outs[0]) == body(k)
            return good

        t0 = time.perf_counter()
        with ThreadPoolExecutor(4) as ex:
            assert all(ex.map(work, range(4)))
        assert t.stats().blocks <= 24 and time.perf_counter() - t0 < 20


def test_a_namespace_says_what_it_holds_and_a_bad_label_changes_nothing_else(tmp_path: object) -> None:
    """The label (``namespace.json``) of a namespace directory: written owner-only, shown by
    ``list``, removed by ``purge``; a planted symlink, directory or garbage there is ignored
    (and replaced by the next writer) and the blocks stay readable."""
    from kv_offload.tiers.disk.label import LABEL_NAME

    root = os.path.join(str(tmp_path), "kv")
    label = {"page_format": "NHD", "kv_dtype": "bfloat16", "block_size": 16, "rank": 0, "model": "/models/tiny-llama/"}
    with tier(root, label=label) as t:
        write(t, [key(i) for i in range(3)])
    path = os.path.join(_ns_dir(root), LABEL_NAME)
    assert json.loads(open(path).read()) == label and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    listed = _cli("list", "--path", root)
    assert "NHD, bfloat16, 16-token blocks, rank 0, tiny-llama" in listed.stdout, listed.stdout
    outside = os.path.join(str(tmp_path), "outside.json")
    with open(outside, "w") as f:
        f.write("{}")
    for planted in ("symlink", "directory", "garbage"):
        if os.path.isdir(path) and not os.path.islink(path):
            os.rmdir(path)
        elif os.path.lexists(path):
            os.unlink(path)
        if planted == "symlink":
            os.symlink(outside, path)
        elif planted == "directory":
            os.mkdir(path)
        else:
            with open(path, "w") as f:
                f.write("not json")
        assert "(no label)" in _cli("list", "--path", root).stdout, planted  # never followed or trusted
        with tier(root) as t:  # no label given: nothing written, blocks found by key
            assert read_back(t, [key(i) for i in range(3)])[0] == [True] * 3
        if planted != "directory":  # the next writer replaces it (a directory stays: one warning)
            with tier(root, label=label) as t:
                assert read_back(t, [key(0)])[0] == [True]
            assert not os.path.islink(path) and json.loads(open(path).read()) == label, planted
    assert open(outside).read() == "{}"  # the symlink's target was never written
    gone = _cli("purge", "--path", root, "--namespace", NS.hex())
    assert gone.returncode == 0 and not os.path.exists(_ns_dir(root)), gone.stdout
