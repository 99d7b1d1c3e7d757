# SPDX-License-Identifier: Apache-2.0
"""Shared pools against hostile or broken segments: a clear PoolError, never a hang or a crash.

``/dev/shm`` is world-writable: what sits at a pool's name may be a FIFO, a symlink, another
user's file, a corrupt header or the leftover of a killed owner. Cases that used to hang or
crash run in a child process with a timeout.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator

import pytest
import torch

from child_process import assert_clean, run_child
from kv_offload.pool import HostPool, PoolError, PoolSpec

SLOT = 8192
MAGIC = b"KVOFFLD1"  # the shared header: magic, u32 JSON length, JSON, in the first 4 KiB
HEADER_BYTES = 4096


@pytest.fixture
def name() -> Iterator[str]:
    """A unique segment name; whatever a test leaves at it is removed."""
    n = f"test-hostile-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    yield n
    path = f"/dev/shm/kv_offload.{n}"
    if os.path.lexists(path):
        os.unlink(path)


def path_of(name: str) -> str:
    return f"/dev/shm/kv_offload.{name}"


# -- item 4: a read-only attach cannot crash or change the owner ----------------------------
def test_writes_through_a_read_only_attach_neither_crash_nor_reach_the_owner(name: str) -> None:
    with HostPool(PoolSpec(capacity_bytes=4 * SLOT, slot_bytes=SLOT, shm_name=name)) as owner:
        owner.tensor[1].fill_(5)
        proc = run_child(f"""
            from kv_offload.pool import HostPool
            p = HostPool.attach({name!r}, readonly=True)
            assert p.readonly
            p.tensor[1].fill_(99)       # plain tensor code writing the reader's view
            p.tensor.view(-1)[-1] = 7
            assert int(p.tensor[1, 0]) == 99  # the write is visible to this process only
            print("WROTE")
        """)
        assert_clean(proc, "WROTE")
        assert bool((owner.tensor[1] == 5).all()) and int(owner.tensor.view(-1)[-1]) == 0
        # And a second reader sees the owner's bytes, not the first reader's writes.
        reader = HostPool.attach(name)
        try:
            assert bool((reader.tensor[1] == 5).all())
            owner.tensor[2].fill_(3)  # later owner writes reach a reader's unwritten pages
            assert bool((reader.tensor[2] == 3).all())
        finally:
            reader.close()


def test_read_only_registry_forgets_a_closed_attach(name: str) -> None:
    from kv_offload.pool.host_pool import is_read_only

    with HostPool(PoolSpec(capacity_bytes=4 * SLOT, slot_bytes=SLOT, shm_name=name)) as owner:
        reader = HostPool.attach(name)
        base, nbytes = reader.base_ptr, reader.nbytes
        assert is_read_only(base, nbytes) and is_read_only(base + nbytes - 1, 1)
        assert not is_read_only(owner.base_ptr, owner.nbytes)
        writer = HostPool.attach(name, readonly=False)
        assert not is_read_only(writer.base_ptr, writer.nbytes)
        writer.close()
        reader.close()
        assert not is_read_only(base, nbytes)


# -- item 6: a FIFO, a symlink or another user's file at the name ---------------------------
@pytest.mark.parametrize("readonly", [True, False])
def test_fifo_at_the_segment_name_is_refused_not_waited_on(name: str, readonly: bool) -> None:
    os.mkfifo(path_of(name), 0o600)
    proc = run_child(f"""
        from kv_offload.pool import HostPool, PoolError
        try:
            HostPool.attach({name!r}, readonly={readonly})
        except PoolError as exc:
            print("REFUSED", exc)
    """, timeout=30)
    assert_clean(proc, "REFUSED")
    assert "FIFO" in proc.stdout and "not a kv_offload pool segment" in proc.stdout


def test_fifo_at_the_segment_name_is_refused_when_creating(name: str) -> None:
    os.mkfifo(path_of(name), 0o600)
    proc = run_child(f"""
        from kv_offload.pool import HostPool, PoolError, PoolSpec
        try:
            HostPool(PoolSpec(capacity_bytes=4 * 8192, slot_bytes=8192, shm_name={name!r}))
        except PoolError as exc:
            print("REFUSED", exc)
    """, timeout=30)
    assert_clean(proc, "REFUSED")
    assert "FIFO" in proc.stdout
    assert os.path.lexists(path_of(name)), "someone else's file was removed"


def test_symlink_at_the_segment_name_is_refused(name: str) -> None:
    target = path_of(name + "-target")
    with HostPool(PoolSpec(capacity_bytes=4 * SLOT, slot_bytes=SLOT, shm_name=name + "-target")):
        os.symlink(target, path_of(name))  # a real pool behind it: still not followed
        with pytest.raises(PoolError, match="symbolic link"):
            HostPool.attach(name)
    os.unlink(path_of(name))
    os.symlink("/nonexistent/kv_offload-target", path_of(name))  # dangling
    with pytest.raises(PoolError, match="symbolic link") as info:
        HostPool(PoolSpec(capacity_bytes=4 * SLOT, slot_bytes=SLOT, shm_name=name))
    assert "another process owns it" not in str(info.value)
    with pytest.raises(PoolError, match="symbolic link"):
        HostPool.attach(name)
    assert os.path.islink(path_of(name)), "the symlink was removed"


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_segment_of_another_user_is_neither_used_nor_reclaimed(name: str) -> None:
    fd = os.open(path_of(name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    header = MAGIC + b"\0" * (HEADER_BYTES - len(MAGIC))
    os.write(fd, header + b"\0" * SLOT)
    os.close(fd)
    os.chown(path_of(name), 65534, 65534)
    with pytest.raises(PoolError, match="owned by uid 65534"):
        HostPool.attach(name)
    with pytest.raises(PoolError, match="owned by uid 65534"):
        HostPool(PoolSpec(capacity_bytes=4 * SLOT, slot_bytes=SLOT, shm_name=name))
    assert os.path.exists(path_of(name))


# -- item 12: malformed headers are PoolErrors naming the defect ----------------------------
def plant(name: str, body: bytes, length: int | None = None, size: int = HEADER_BYTES + 4 * SLOT) -> None:
    n = len(body) if length is None else length
    with open(path_of(name), "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(MAGIC + n.to_bytes(4, "little") + body)
        f.truncate(size)


def good(**overrides: object) -> bytes:
    body: dict[str, object] = {"num_slots": 4, "slot_bytes": SLOT, "metadata": {}}
    body.update(overrides)
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    ("body", "length", "message"),
    [
        (good(), 0xFFFFFFF0, "header length 4294967280 is out of range"),
        (good(), 0, "header length 0 is out of range"),
        (b"\xff\xfe{}", None, "header is not UTF-8"),
        (b"{not json", None, "header is not valid JSON"),
        (b"[" * 3000 + b"]" * 3000 + b"", 4000, "header is not valid JSON"),
        (b"[1, 2]", None, "header is a JSON list, not an object"),
        (b"42", None, "header is a JSON int, not an object"),
        (b'"text"', None, "header is a JSON str, not an object"),
        (json.dumps({"slot_bytes": SLOT, "metadata": {}}).encode(), None, "header has no 'num_slots'"),
        (json.dumps({"num_slots": 4, "metadata": {}}).encode(), None, "header has no 'slot_bytes'"),
        (json.dumps({"num_slots": 4, "slot_bytes": SLOT}).encode(), None, "header has no 'metadata'"),
        (good(num_slots="4"), None, "num_slots='4'"),
        (good(num_slots=4.0), None, "num_slots=4.0"),
        (good(num_slots=True), None, "num_slots=True"),
        (good(num_slots=None), None, "num_slots=None"),
        (good(num_slots=0), None, "num_slots=0"),
        (good(num_slots=-3), None, "num_slots=-3"),
        (good(slot_bytes=1000), None, "slot_bytes=1000"),
        (good(slot_bytes=0), None, "slot_bytes=0"),
        (good(metadata=[1]), None, "header metadata is a JSON list"),
        (good(owner="me"), None, "header owner 'me'"),
        (good(owner={"pid": -1, "start": 0, "pid_ns": 0}), None, "header owner"),
        (good(num_slots=1 << 40), None, "its header says"),
    ],
    ids=lambda v: repr(v)[:40],
)
def test_malformed_header_is_a_pool_error(name: str, body: bytes, length: int | None, message: str) -> None:
    if len(body) > HEADER_BYTES - 12:
        body = body[: HEADER_BYTES - 12]
    plant(name, body, length)
    with pytest.raises(PoolError) as info:
        HostPool.attach(name)
    assert message in str(info.value) and path_of(name) in str(info.value)
    # Creating over it names the defect too, and leaves the file alone.
    with pytest.raises(PoolError, match="not a usable pool") as info:
        HostPool(PoolSpec(capacity_bytes=4 * SLOT, slot_bytes=SLOT, shm_name=name))
    assert message in str(info.value)
    assert os.path.exists(path_of(name))


def test_header_shorter_than_its_length_field_is_a_pool_error(name: str) -> None:
    plant(name, good(), length=200, size=HEADER_BYTES + 4 * SLOT)  # length past the JSON: zeros follow
    with pytest.raises(PoolError, match="not valid JSON"):
        HostPool.attach(name)


# -- item 14: a segment left by a killed owner is reclaimed ---------------------------------
def test_segment_of_a_sigkilled_owner_is_reclaimed_with_a_warning(name: str, caplog: pytest.LogCaptureFixture) -> None:
    proc = run_child(f"""
        import os, signal
        from kv_offload.pool import HostPool, PoolSpec
        pool = HostPool(PoolSpec(capacity_bytes=4 * 8192, slot_bytes=8192, shm_name={name!r}))
        pool.tensor.fill_(1)
        print(os.getpid(), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert proc.returncode == -signal.SIGKILL
    assert os.path.exists(path_of(name)), "the killed owner's segment should be left behind"
    dead_pid = int(proc.stdout.split()[0])
    with caplog.at_level(logging.WARNING, logger="kv_offload.pool.segment"):
        with HostPool(PoolSpec(capacity_bytes=2 * SLOT, slot_bytes=SLOT, shm_name=name)) as pool:
            assert pool.num_slots == 2 and not pool.tensor.any()
    assert any(f"left behind by pid {dead_pid}" in r.getMessage() for r in caplog.records)
    assert not os.path.exists(path_of(name))


def test_segment_of_a_live_owner_is_never_reclaimed(name: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from kv_offload.pool import HostPool, PoolSpec
            pool = HostPool(PoolSpec(capacity_bytes=4 * 8192, slot_bytes=8192, shm_name={name!r}))
            pool.tensor.fill_(4)
            print("READY", flush=True)
            sys.stdin.readline()
            pool.close()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "READY"
        with pytest.raises(PoolError, match=f"another process owns it \\(pid {proc.pid}, running\\)"):
            HostPool(PoolSpec(capacity_bytes=4 * SLOT, slot_bytes=SLOT, shm_name=name))
        reader = HostPool.attach(name)
        assert bool((reader.tensor == 4).all())
        reader.close()
    finally:
        assert proc.stdin is not None
        proc.stdin.write("\n")
        proc.stdin.close()
        proc.wait(timeout=60)
    assert not os.path.exists(path_of(name))


def test_owner_reusing_a_dead_pid_or_from_another_namespace_is_judged_right() -> None:
    from kv_offload.pool.segment import Owner

    me = Owner.current()
    assert me.start > 0 and me.is_gone() is False
    assert Owner(me.pid, me.start + 1, me.pid_ns).is_gone() is True  # the pid was reused
    assert Owner(me.pid, me.start, me.pid_ns + 1).is_gone() is None  # cannot tell: keep it
    assert Owner(1 << 30, 1, me.pid_ns).is_gone() is True  # no such process


def test_segment_without_a_recorded_owner_is_not_reclaimed(name: str) -> None:
    plant(name, good())  # an older version's header: no owner to check
    with pytest.raises(PoolError, match="records no owner"):
        HostPool(PoolSpec(capacity_bytes=4 * SLOT, slot_bytes=SLOT, shm_name=name))
    assert os.path.exists(path_of(name))
    pool = HostPool.attach(name)  # still attachable
    assert pool.num_slots == 4
    pool.close()


def test_closing_owner_does_not_unlink_a_successor_segment(name: str) -> None:
    pool = HostPool(PoolSpec(capacity_bytes=4 * SLOT, slot_bytes=SLOT, shm_name=name))
    os.unlink(path_of(name))  # e.g. removed by hand, then the name taken again
    plant(name, good())
    pool.close()
    assert os.path.exists(path_of(name)), "close() removed a segment it does not own"


def test_read_only_attach_tensor_is_plain_uint8(name: str) -> None:
    with HostPool(PoolSpec(capacity_bytes=4 * SLOT, slot_bytes=SLOT, shm_name=name)):
        reader = HostPool.attach(name)
        assert reader.tensor.dtype == torch.uint8 and reader.tensor.shape == (4, SLOT)
        reader.close()
