# SPDX-License-Identifier: Apache-2.0
"""Fuzzing shared pool segments written by someone else: a PoolError naming the problem or a
clean attach, never a crash.

``/dev/shm`` is world-writable, so the bytes at a pool's name are hostile input. Each example
writes a segment file: a header built from a valid one (fields replaced by arbitrary JSON,
deleted or added; the length field, the magic and any byte of the header block overwritten;
whole random headers) and a file size around what the header claims (exact, a byte short,
only the header, tiny, larger). Then, in a child interpreter (a SIGBUS or SIGSEGV from a
mapping larger than its file fails the test instead of killing pytest):

- ``HostPool.attach`` (read-only and writable) either raises ``PoolError`` naming the segment's
  path, or attaches a pool whose shape is what the header says, that fits in the file, and whose
  every page reads (the first and last bytes equal the file's; a write through a writable attach
  lands in the file);
- creating a pool of that name either raises ``PoolError`` naming the path and leaves the file
  as it was, or reclaims it: only a well-formed segment whose recorded owner is not this
  (live) process.

Bounded for CI: derandomized, a few seconds on two cores.
"""

from __future__ import annotations

import os
import re
import uuid

from child_process import run_child

EXAMPLES = 300
_CHILD = r'''
import json, os
from hypothesis import given, settings, strategies as st
from kv_offload.pool import HostPool, PoolError, PoolSpec

NAME = {name!r}
PATH = "/dev/shm/kv_offload." + NAME
MAGIC, HEADER, SLOT = b"KVOFFLD1", 4096, 4096
NS = os.stat("/proc/self/ns/pid").st_ino
ME = {{"pid": os.getpid(), "start": int(open("/proc/self/stat", "rb").read().rsplit(b")", 1)[1].split()[19]), "pid_ns": NS}}
pid = os.fork()
if pid == 0:
    os._exit(0)
os.waitpid(pid, 0)
DEAD = {{"pid": pid, "start": 12345, "pid_ns": NS}}
counts = {{"examples": 0, "attached": 0, "refused": 0, "created": 0}}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)

@st.composite
def segments(draw):
    body = {{"num_slots": draw(st.sampled_from([1, 2, 3])), "slot_bytes": draw(st.sampled_from([SLOT, 2 * SLOT])),
            "metadata": {{"model": "m", "layers": 2}},
            "owner": draw(st.sampled_from([ME, DEAD, {{"pid": 1, "start": 1, "pid_ns": NS}}, None]))}}
    if body["owner"] is None:
        del body["owner"]
    kinds = draw(st.lists(st.sampled_from(["none", "none", "none", "field", "field", "patch", "length", "magic", "size",
                                            "raw", "nested"]), min_size=1, max_size=2))
    for _ in range(kinds.count("field")):
        field = draw(st.sampled_from(["num_slots", "slot_bytes", "metadata", "owner", "extra"]))
        how = draw(st.sampled_from(["replace", "delete", "int"]))
        if how == "delete":
            body.pop(field, None)
        elif how == "int":
            body[field] = draw(st.sampled_from([0, -1, 1, 4095, 4097, 1 << 31, 1 << 40, 1 << 63, 1 << 64]))
        else:
            body[field] = draw(json_values)
    data = json.dumps(body).encode()
    if "raw" in kinds:
        data = draw(st.binary(max_size=200))
    elif "nested" in kinds:
        depth = draw(st.integers(1, 2000))
        data = b"[" * depth + b"]" * depth
    data = data[: HEADER - 12]
    n = len(data)
    if "length" in kinds:
        n = draw(st.one_of(st.sampled_from([0, max(0, n - 1), n + 1, HEADER - 12, HEADER - 11]), st.integers(0, (1 << 32) - 1)))
    magic = draw(st.binary(min_size=8, max_size=8)) if "magic" in kinds else MAGIC
    header = bytearray((magic + n.to_bytes(4, "little") + data).ljust(HEADER, b"\0"))
    if "patch" in kinds:
        at = draw(st.integers(0, HEADER - 1))
        patch = draw(st.binary(min_size=1, max_size=16))
        header[at : at + len(patch)] = patch[: HEADER - at]
    slots, slot_bytes = body.get("num_slots"), body.get("slot_bytes")
    claimed = HEADER + slots * slot_bytes if all(type(v) is int and 0 < v < 1 << 20 for v in (slots, slot_bytes)) else HEADER + SLOT
    size = claimed
    if "size" in kinds:
        size = draw(st.sampled_from([claimed - 1, HEADER, claimed + SLOT, 0, 100, HEADER - 1, claimed - SLOT]))
    fill = draw(st.integers(0, 255))
    return bytes(header), max(0, size), fill

def plant(header, size, fill):
    fd = os.open(PATH, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, (header + bytes([fill]) * max(0, size - HEADER))[:size])
    finally:
        os.close(fd)

def file_bytes():
    with open(PATH, "rb") as f:
        return f.read()

def declared(raw):
    """The header as the file says, parsed here on its own (no validation): (slots, slot bytes, metadata)."""
    n = int.from_bytes(raw[8:12], "little")
    body = json.loads(raw[12 : 12 + n].decode())
    return body["num_slots"], body["slot_bytes"], body["metadata"]

def check_attach(readonly):
    try:
        pool = HostPool.attach(NAME, readonly=readonly)
    except PoolError as exc:
        assert PATH in str(exc), exc
        counts["refused"] += 1
        return
    try:
        raw = file_bytes()
        assert raw[:8] == MAGIC
        assert (pool.num_slots, pool.slot_bytes, pool.metadata) == declared(raw)
        assert HEADER + pool.nbytes <= len(raw), "mapped past the end of the file"
        flat = pool.tensor.view(-1)
        assert int(flat.sum()) >= 0  # every page read
        assert bytes(flat[:16].numpy()) == raw[HEADER : HEADER + 16]
        assert bytes(flat[-16:].numpy()) == raw[HEADER + pool.nbytes - 16 : HEADER + pool.nbytes]
        if not readonly:
            flat[-1] = (int(flat[-1]) + 1) % 256
            assert file_bytes()[HEADER + pool.nbytes - 1] == int(flat[-1])
        counts["attached"] += 1
        del flat
    finally:
        pool.close()
    assert os.path.exists(PATH), "an attach removed the segment"

@settings(max_examples={examples}, deadline=None, derandomize=True, database=None)
@given(seg=segments())
def fuzz(seg):
    header, size, fill = seg
    counts["examples"] += 1
    plant(header, size, fill)
    try:
        check_attach(readonly=True)
        check_attach(readonly=False)
        before = file_bytes()
        try:
            pool = HostPool(PoolSpec(capacity_bytes=2 * SLOT, slot_bytes=SLOT, shm_name=NAME))
        except PoolError as exc:
            assert PATH in str(exc), exc
            assert file_bytes() == before, "a refused create changed the file"
        else:
            counts["created"] += 1
            owner = json.loads(before[12 : 12 + int.from_bytes(before[8:12], "little")].decode())["owner"]
            assert owner != ME and owner["pid"] != os.getpid(), "reclaimed a live owner's segment"
            assert pool.num_slots == 2 and int(pool.tensor.sum()) == 0
            pool.close()
    finally:
        if os.path.lexists(PATH):
            os.unlink(PATH)

fuzz()
print("COUNTS", counts["examples"], counts["attached"], counts["refused"], counts["created"], flush=True)
'''


def test_hostile_segments_are_pool_errors_or_clean_attaches_never_crashes() -> None:
    name = f"test-fuzz-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        proc = run_child(_CHILD.format(name=name, examples=EXAMPLES), timeout=600)
    finally:
        path = f"/dev/shm/kv_offload.{name}"
        if os.path.lexists(path):
            os.unlink(path)
    how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
    assert proc.returncode == 0, f"child ended with {how}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    found = re.search(r"COUNTS (\d+) (\d+) (\d+) (\d+)", proc.stdout)
    assert found, proc.stdout + proc.stderr
    examples, attached, refused, created = map(int, found.groups())
    assert examples == EXAMPLES
    # both outcomes were exercised: the fuzz is not all refusals (nor all clean headers)
    assert attached > 0 and refused > 0 and created > 0, found.group(0)
