# SPDX-License-Identifier: Apache-2.0
"""The disk tier under races inside one process and with forked children: slot locks shared by
an instance's threads, a corrupt read against a rewrite, two writers of one key, close during
inline work, fork, purge against a process that has a segment open, unsafe segment files,
bounded bounce buffers, ``contains`` during a refresh, and two instances on one directory."""

from __future__ import annotations

import errno
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from disk_tier_helpers import BB, NS, body, key, read_back, tier, write
from kv_offload.tiers.disk import DiskTier, DiskTierError, cli
from kv_offload.tiers.disk import files as files_mod
from kv_offload.tiers.disk import segment as segment_mod
from kv_offload.tiers.disk.files import lock_range, unlock_range
from kv_offload.tiers.disk.segment import ReadResult, Segment


def _ns_dir(root: str) -> str:
    return os.path.join(root, NS.hex())


def _thread(fn: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []
    th = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    th.start()
    return th, out


def _entry_lock_free(root: str, stem: str, slot: int) -> bool:
    """Whether another open file description could take a slot's lock exclusively now."""
    fd = os.open(os.path.join(_ns_dir(root), stem + ".idx"), os.O_RDWR)
    try:
        at = 4096 + slot * 128
        free = lock_range(fd, at, 128, exclusive=True, wait=False)
        if free:
            unlock_range(fd, at, 128)
        return free
    finally:
        os.close(fd)


@pytest.fixture
def blocked_checksum(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[set[int], threading.Event, threading.Event]]:
    """Body checksums of the threads in the set wait for ``gate`` (``entered`` says one did)."""
    blocked: set[int] = set()
    gate, entered = threading.Event(), threading.Event()
    real = segment_mod.checksum

    def slow(data: object) -> int:
        if threading.get_ident() in blocked:
            entered.set()
            gate.wait(10)
        return real(data)  # type: ignore[arg-type]

    monkeypatch.setattr(segment_mod, "checksum", slow)
    yield blocked, gate, entered
    gate.set()


def test_a_slot_read_by_two_threads_stays_locked_until_both_are_done(tmp_path: object, blocked_checksum: tuple[set[int], threading.Event, threading.Event]) -> None:  # fmt: skip
    blocked, gate, entered = blocked_checksum
    with tier(str(tmp_path), threads=1) as t:
        k = key(1)
        write(t, [k])
        out = bytearray(BB)
        where = (str(tmp_path), t._index[k].seg.stem, t._index[k].slot)

        def slow_reader() -> list[bool]:
            blocked.add(threading.get_ident())
            return t.read([k], [memoryview(out)])

        a, a_out = _thread(slow_reader)
        assert entered.wait(5)
        assert read_back(t, [k])[0] == [True]  # a second thread reads the slot and leaves
        assert not _entry_lock_free(*where), "one thread's unlock dropped the other's slot lock"
        c, c_out = _thread(lambda: t.remove([k]))  # must wait for the reader, not clear under it
        time.sleep(0.2)
        assert c.is_alive() and not _entry_lock_free(*where)
        gate.set()
        a.join(5), c.join(5)
        assert a_out == [[True]] and bytes(out) == body(k) and c_out == [[True]]
        assert t.stats().corruptions == 0


def _corrupt_then_repair(monkeypatch: pytest.MonkeyPatch, root: str, stem: str, slot: int, k: bytes) -> None:
    """Corrupt ``k``'s body now; put it back right after a read sees it corrupt (as the owner
    rewriting that key into the slot would, between that read and anything it does next)."""
    path = os.path.join(_ns_dir(root), stem + ".dat")
    with open(path, "r+b") as f:
        f.seek(slot * BB + 10)
        f.write(b"\xff\x00\xff")
    real = Segment.read_run  # what the tier reads with (Segment.read is a run of one)

    def read_run(self: Segment, *a: object, **kw: object) -> list[ReadResult]:
        res = real(self, *a, **kw)  # type: ignore[arg-type]
        if ReadResult.CORRUPT in res:
            with open(path, "r+b") as f:
                f.seek(slot * BB)
                f.write(body(k))
        return res

    monkeypatch.setattr(Segment, "read_run", read_run)


def test_a_corrupt_read_does_not_clear_a_block_the_owner_rewrote(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    root = str(tmp_path)
    k = key(3)
    with tier(root, threads=1) as owner, tier(root, threads=1) as reader:
        write(owner, [k])
        reader.refresh()
        loc = owner._index[k]
        _corrupt_then_repair(monkeypatch, root, loc.seg.stem, loc.slot, k)
        assert read_back(reader, [k])[0] == [False]
        ok, outs = read_back(owner, [k])
        assert ok == [True] and bytes(outs[0]) == body(k), "the reader erased the owner's fresh block"


def test_a_corrupt_read_in_our_own_segment_rechecks_before_clearing(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    root = str(tmp_path)
    k = key(4)
    with tier(root, threads=1) as t:
        write(t, [k])
        loc = t._index[k]
        _corrupt_then_repair(monkeypatch, root, loc.seg.stem, loc.slot, k)
        assert read_back(t, [k])[0] == [False]  # it changed under the read: a miss
        ok, outs = read_back(t, [k])
        assert ok == [True] and bytes(outs[0]) == body(k) and t.stats().corruptions == 0


def test_a_write_of_a_key_another_thread_is_writing_gets_that_writes_outcome(tmp_path: object) -> None:
    stuck, gate, entered = set(), threading.Event(), threading.Event()

    def hook(step: str) -> None:
        if step == "begin" and threading.get_ident() in stuck:
            entered.set()
            gate.wait(10)
            raise OSError(errno.EIO, "injected")

    with tier(str(tmp_path), threads=1, fault_hook=hook) as t:
        k = key(5)

        def first() -> list[bool]:
            stuck.add(threading.get_ident())
            return write(t, [k])

        a, a_out = _thread(first)
        assert entered.wait(5)
        b, b_out = _thread(lambda: write(t, [k]))
        time.sleep(0.2)
        gate.set()
        a.join(5), b.join(5)
        assert a_out == [[False]] and b_out == [[False]], "True for a write that then failed"
        assert t.contains([k]) == [False]
        assert write(t, [k]) == [True]


def test_close_waits_for_a_write_running_on_the_callers_thread(tmp_path: object) -> None:
    stuck, gate, entered = set(), threading.Event(), threading.Event()

    def hook(step: str) -> None:
        if step == "body" and threading.get_ident() in stuck:
            entered.set()
            gate.wait(10)

    t = tier(str(tmp_path), threads=2, fault_hook=hook)
    k = key(6)

    def writer() -> list[bool]:
        stuck.add(threading.get_ident())
        return write(t, [k])  # a batch of one runs inline on this thread

    a, a_out = _thread(writer)
    assert entered.wait(5)
    c, _ = _thread(t.close)
    time.sleep(0.2)
    alive = c.is_alive()
    gate.set()
    a.join(5), c.join(5)
    assert alive, "close() closed the descriptors under a write in flight"
    assert a_out == [[True]] and not c.is_alive()
    with tier(str(tmp_path)) as t2:
        assert read_back(t2, [k])[0] == [True]


def test_an_inherited_instance_refuses_every_call_in_a_forked_child(tmp_path: object) -> None:
    root = str(tmp_path)
    with tier(root) as t:
        write(t, [key(1)])
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                calls: list[Callable[[], object]] = [
                    lambda: t.contains([key(1)]), lambda: write(t, [key(2)]), lambda: read_back(t, [key(1)]),
                    lambda: t.remove([key(1)]), t.refresh, t.stats,
                ]  # fmt: skip
                refused = 0
                for call in calls:
                    try:
                        call()
                    except RuntimeError as e:
                        refused += "forked child" in str(e)
                t.close()  # allowed: closes the child's copies, unlocks nothing
                with tier(root) as mine:  # the child's own instance works, and sees the block
                    good = read_back(mine, [key(1)])[0] == [True] and write(mine, [key(3)]) == [True]
                code = 0 if refused == len(calls) and good else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        # the parent still owns its segment and its blocks
        assert write(t, [key(4)]) == [True] and read_back(t, [key(1), key(4)])[0] == [True, True]
        assert t.stats().segments_owned == 1


def test_purge_of_a_segment_a_live_tier_has_open_but_not_owned(tmp_path: object) -> None:
    root = os.path.join(str(tmp_path), "kv")
    with tier(root) as t:
        write(t, [key(i) for i in range(3)])
    open(os.path.join(_ns_dir(root), "keep"), "w").close()  # so the purge leaves the directory
    with tier(root) as t:  # has the segment open (indexed), owns nothing yet
        assert t.contains([key(0)]) == [True] and t.stats().segments_owned == 0
        assert cli.main(["purge", "--path", root, "--namespace", NS.hex()]) == 0
        assert write(t, [key(9)]) == [True]  # must not adopt the unlinked segment
        t.refresh()
        assert t.contains([key(0)]) == [False]
    with tier(root) as fresh:
        assert fresh.contains([key(9), key(0)]) == [True, False]
        assert read_back(fresh, [key(9)])[0] == [True]


def test_an_idx_without_its_dat_gets_no_stale_blocks(tmp_path: object) -> None:
    root = str(tmp_path)
    keys = [key(i) for i in range(4)]
    with tier(root) as t:
        write(t, keys)
    os.unlink(os.path.join(_ns_dir(root), f"s{BB}-0000.dat"))
    with tier(root) as t:
        assert t.contains(keys) == [False] * 4
        assert write(t, [key(20)]) == [True]
        assert t.contains(keys) == [False] * 4  # laid out afresh, not its old entries
        assert read_back(t, [key(20)])[0] == [True] and t.stats().corruptions == 0


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_unsafe_segment_files_are_skipped_without_leaking(tmp_path: object, caplog: pytest.LogCaptureFixture) -> None:
    root = str(tmp_path)
    with tier(root) as t:
        write(t, [key(1)])
    ns = _ns_dir(root)
    os.mkfifo(os.path.join(ns, f"s{BB}-0005.idx"), 0o600)  # not a regular file
    os.link(os.path.join(ns, f"s{BB}-0000.idx"), os.path.join(root, "hardlink"))  # two links
    with caplog.at_level(logging.WARNING, "kv_offload.tiers.disk"), tier(root) as t:
        before = _fds()
        for _ in range(50):
            t.refresh()
        assert _fds() == before
        assert t.contains([key(1)]) == [False]  # the hard-linked segment is not used either
        assert write(t, [key(2)]) == [True] and read_back(t, [key(2)])[0] == [True]
        for stem in (f"s{BB}-0005", f"s{BB}-0000"):
            assert sum(stem in r.getMessage() and "unusable" in r.getMessage() for r in caplog.records) == 1
    out = cli.main(["list", "--path", root])
    assert out == 0


def test_group_writable_directories_are_refused(tmp_path: object) -> None:
    root = os.path.join(str(tmp_path), "kv")
    os.mkdir(root, 0o700)
    os.chmod(root, 0o770)
    with pytest.raises(DiskTierError, match="group- or world-writable"):
        tier(root)
    assert cli.main(["list", "--path", root]) == 2
    os.chmod(root, 0o700)
    with tier(root):
        pass
    os.chmod(_ns_dir(root), 0o730)
    with pytest.raises(DiskTierError, match="namespace directory .* group- or world-writable"):
        tier(root)
    assert cli.main(["list", "--path", root]) == 2


def test_bounce_buffers_stay_bounded_with_short_lived_threads(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    live = [0]
    real_init, real_close = files_mod.AlignedBuffer.__init__, files_mod.AlignedBuffer.close

    def init(self: files_mod.AlignedBuffer, n: int) -> None:
        live[0] += 1
        real_init(self, n)

    def close(self: files_mod.AlignedBuffer) -> None:
        live[0] -= 1
        real_close(self)

    monkeypatch.setattr(files_mod.AlignedBuffer, "__init__", init)
    monkeypatch.setattr(files_mod.AlignedBuffer, "close", close)
    with tier(str(tmp_path), threads=2) as t:
        for i in range(40):
            th, _ = _thread(lambda i=i: (write(t, [key(i)]), read_back(t, [key(i)])))
            th.join(5)
        assert live[0] <= 2 + 2, f"{live[0]} bounce buffers kept for 40 finished threads"


def test_contains_answers_while_a_refresh_reads_the_disk(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    root = str(tmp_path)
    gate, entered = threading.Event(), threading.Event()
    with tier(root) as owner, tier(root) as reader:
        write(owner, [key(i) for i in range(8)])
        real = Segment.entries

        def slow(self: Segment, *a: object) -> object:
            entered.set()
            gate.wait(10)
            return real(self, *a)  # type: ignore[arg-type]

        monkeypatch.setattr(Segment, "entries", slow)
        try:
            r, _ = _thread(reader.refresh)
            assert entered.wait(5)
            c, c_out = _thread(lambda: reader.contains([key(0)]))
            c.join(2)
            assert not c.is_alive(), "contains() waited for a refresh's disk reads"
        finally:
            gate.set()
        r.join(5)
        assert reader.contains([key(i) for i in range(8)]) == [True] * 8


def test_two_instances_in_one_process_one_writing_one_reading(tmp_path: object) -> None:
    root = str(tmp_path)
    with tier(root, blocks=16, threads=2) as w, tier(root, blocks=16, threads=4) as r:
        stop = threading.Event()
        bad: list[bytes] = []
        hits = [0]

        def reads() -> None:
            while not stop.is_set():
                r.refresh()
                keys = list(r._index)
                ok, outs = read_back(r, keys)
                bad.extend(k for k, g, o in zip(keys, ok, outs) if g and bytes(o) != body(k))
                hits[0] += sum(ok)
                r.contains(keys)

        readers = [threading.Thread(target=reads) for _ in range(3)]
        for th in readers:
            th.start()
        i, deadline = 0, time.monotonic() + 1.0
        while time.monotonic() < deadline:
            write(w, [key(i + j) for j in range(4)])  # fills, then evicts and rewrites slots
            i += 4
        stop.set()
        for th in readers:
            th.join(10)
        assert not bad and hits[0] > 0
        assert r.stats().corruptions == 0 and w.stats().corruptions == 0
        assert w.stats().segments_owned >= 1 and r.stats().segments_owned == 0


def test_threads_reading_one_key_while_another_process_rewrites_and_evicts(tmp_path: object) -> None:
    root = str(tmp_path)
    r_fd, w_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the writer child
        code = 1
        try:
            os.close(r_fd)
            with tier(root, blocks=8, threads=2) as t:
                write(t, [key(0)])
                os.write(w_fd, b"x")
                i, deadline = 1, time.monotonic() + 1.5
                while time.monotonic() < deadline:
                    t.remove([key(0)])
                    write(t, [key(0)] + [key(i + j) for j in range(3)])  # rewrites, evicts
                    i += 3
            code = 0
        finally:
            os._exit(code)
    os.close(w_fd)
    os.read(r_fd, 1)
    os.close(r_fd)
    bad: list[int] = []
    with tier(root, blocks=8, threads=4) as t:
        def reads() -> int:
            hits = 0
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                t.refresh()
                ok, outs = read_back(t, [key(0)] * 4)
                for g, o in zip(ok, outs):
                    if g and bytes(o) != body(key(0)):
                        bad.append(1)
                    hits += g
            return hits

        threads = [_thread(reads) for _ in range(4)]
        for th, _ in threads:
            th.join(10)
        assert not bad and t.stats().corruptions == 0
        assert sum(out[0] for _, out in threads) > 0  # type: ignore[misc]
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_killed_owner_leaves_nothing_for_a_forked_childs_instance(tmp_path: object) -> None:
    """SIGKILL of a child that inherited a live instance does not release the parent's locks."""
    root = str(tmp_path)
    with tier(root, blocks=8) as t:
        write(t, [key(1)])
        pid = os.fork()
        if pid == 0:  # pragma: no cover
            os.kill(os.getpid(), signal.SIGKILL)
        os.waitpid(pid, 0)
        with tier(root, blocks=8) as other:
            assert write(other, [key(2)]) == [True]
            assert other._index[key(2)].seg.stem != t._index[key(1)].seg.stem  # not adopted
        assert read_back(t, [key(1)])[0] == [True]


