# SPDX-License-Identifier: Apache-2.0
"""The disk tier across processes: SIGKILL at every step of a write and at random moments of
large batches, two processes reading each other's blocks, concurrent writers of the same keys,
and readers while another process evicts and rewrites the slots they read.

Children are forked from the test process (kv_offload is imported once), use their own tier
instances, and report through their exit status.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable

from disk_tier_helpers import BB, NS, body, key, read_back, tier, write
from kv_offload.tiers.disk import cli

STEPS = ["begin", "cleared", "body_half", "body", "committed"]
BIG = 64 << 10


def _fork(fn: Callable[[], int]) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            code = fn()
        finally:
            os._exit(code)
    return pid


def _wait(pid: int) -> int:
    """The child's exit status, or minus the signal that killed it."""
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _all_valid(root: str, bb: int = BB, blocks: int = 64, **kw: object) -> int:
    """Open a fresh tier on ``root``: every block it indexes reads back whole and exact."""
    with tier(root, blocks=blocks, bb=bb, **kw) as t:
        keys = list(t._index)  # what the rebuilt index holds
        ok, outs = read_back(t, keys, bb)
        assert all(ok), f"{ok.count(False)} of {len(keys)} indexed blocks failed to read"
        assert all(bytes(o) == body(k, bb) for o, k in zip(outs, keys))
        assert t.stats().corruptions == 0
        return len(keys)


def test_sigkill_at_every_step_of_a_write_leaves_blocks_whole_or_absent(tmp_path: object) -> None:
    root = str(tmp_path)
    for n, step in enumerate(STEPS * 2):
        armed: list[bool] = []

        def hook(s: str, step: str = step) -> None:
            if armed and s == step:
                os.kill(os.getpid(), signal.SIGKILL)

        def child(n: int = n, hook: Callable[[str], None] = hook) -> int:
            t = tier(root, blocks=16, threads=1, fault_hook=hook)
            write(t, [key(i, salt=n) for i in range(6)])  # fills and evicts: slots get rewritten
            armed.append(True)
            write(t, [key(99, salt=n)])
            return 3  # not reached

        assert _wait(_fork(child)) == -signal.SIGKILL
        with tier(root, blocks=16) as t:
            ok, outs = read_back(t, [key(99, salt=n)])
            # committed = the entry was written: the block is there; before that it is absent
            assert ok == [step == "committed"], step
            if ok[0]:
                assert bytes(outs[0]) == body(key(99, salt=n)), step
            ok, outs = read_back(t, list(t._index))  # every committed block reads back cleanly
            assert all(ok) and t.stats().corruptions == 0, step
    assert _all_valid(root, blocks=16) > 0
    assert cli.main(["verify", "--path", root]) == 0


def test_sigkill_at_random_moments_of_large_batches(tmp_path: object) -> None:
    root = str(tmp_path)
    rng = random.Random(7)
    for run in range(6):
        def child(run: int = run) -> int:
            t = tier(root, blocks=48, bb=BIG, threads=4)
            i = 0
            while True:
                write(t, [key(i + j, salt=run) for j in range(16)], bb=BIG)
                i += 16

        pid = _fork(child)
        time.sleep(rng.uniform(0.05, 0.4))
        os.kill(pid, signal.SIGKILL)
        assert _wait(pid) == -signal.SIGKILL
        _all_valid(root, bb=BIG, blocks=48)
    assert cli.main(["verify", "--path", root]) == 0


def test_two_processes_read_each_others_blocks(tmp_path: object) -> None:
    root = str(tmp_path)
    mine = [key(i, salt=1) for i in range(10)]
    theirs = [key(i, salt=2) for i in range(10)]
    with tier(root) as a:
        write(a, mine)

        def child() -> int:
            with tier(root) as b:
                ok, outs = read_back(b, mine)
                if not all(ok) or any(bytes(o) != body(k) for o, k in zip(outs, mine)):
                    return 1
                return 0 if all(write(b, theirs)) else 2

        assert _wait(_fork(child)) == 0
        assert a.contains(theirs) == [False] * 10
        a.refresh()
        ok, outs = read_back(a, theirs)
        assert all(ok) and all(bytes(o) == body(k) for o, k in zip(outs, theirs))


def test_concurrent_writers_of_the_same_keys_and_a_bounded_directory(tmp_path: object) -> None:
    root = str(tmp_path)
    keys = [key(i) for i in range(40)]

    def child() -> int:
        with tier(root, blocks=32) as t:  # 4 segments of 8 slots
            for _ in range(5):
                random.shuffle(keys)
                for i in range(0, 40, 5):
                    write(t, keys[i : i + 5])
                t.refresh()
        return 0

    pids = [_fork(child) for _ in range(3)]
    assert [_wait(p) for p in pids] == [0, 0, 0]
    assert _all_valid(root, blocks=32) > 0
    ns_dir = os.path.join(root, NS.hex())
    dat = sum(os.path.getsize(os.path.join(ns_dir, f)) for f in os.listdir(ns_dir) if f.endswith(".dat"))
    assert dat <= 32 * BB + 3 * 8 * BB  # capacity, plus at most one segment per process


def test_readers_see_whole_blocks_or_misses_while_another_process_evicts(tmp_path: object) -> None:
    root = str(tmp_path)
    r, w = os.pipe()

    def reader() -> int:
        os.close(w)
        os.read(r, 1)  # the writer has stored its first blocks
        hits = 0
        with tier(root, blocks=16, bb=BIG) as t:
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                t.refresh()
                keys = list(t._index)
                ok, outs = read_back(t, keys, BIG)
                for k, good, o in zip(keys, ok, outs):
                    if good and bytes(o) != body(k, BIG):
                        return 1  # garbage returned as valid
                    hits += good
            if t.stats().corruptions:
                return 2  # a race must be a clean miss, not a corruption
        return 0 if hits else 3

    pid = _fork(reader)
    os.close(r)
    with tier(root, blocks=16, bb=BIG) as t:
        write(t, [key(i) for i in range(16)], bb=BIG)
        os.write(w, b"x")
        i, deadline = 16, time.monotonic() + 1.5
        while time.monotonic() < deadline:
            write(t, [key(i + j) for j in range(4)], bb=BIG)  # evicts and rewrites slots
            i += 4
    assert _wait(pid) == 0
    os.close(w)


def test_a_dead_owners_segment_is_adopted_not_while_it_lives(tmp_path: object) -> None:
    root = str(tmp_path)
    r, w = os.pipe()
    r2, w2 = os.pipe()

    def owner() -> int:
        t = tier(root, blocks=8)  # one segment
        write(t, [key(1)])
        os.write(w, b"x")
        os.read(r2, 1)
        return 0

    pid = _fork(owner)
    os.read(r, 1)
    with tier(root, blocks=8) as t:
        # the live owner holds the only segment: we may claim one beyond the bound, never its
        assert write(t, [key(2)]) == [True]
        assert t.stats().segments_owned == 1 and t.contains([key(1)]) == [True]
    os.write(w2, b"x")
    assert _wait(pid) == 0
    with tier(root, blocks=8) as t:
        write(t, [key(3)])
        assert t.stats().segments_owned == 1
        assert all(read_back(t, [key(1), key(2), key(3)])[0])
