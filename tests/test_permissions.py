# SPDX-License-Identifier: Apache-2.0
"""Owner-only files, whatever the umask: the disk tier's directories (0700) and segment files
(0600), its O_DIRECT probe file, and the shared pool's segment in /dev/shm (0600).

Each case runs under umask 0o000 (nothing masked: a mode the code forgets to give is what the
file gets) and 0o022 (the usual one), restored afterwards. A segment file or namespace
directory found with group or other bits (copied in with ``cp``, made by hand under a loose
umask) is made owner-only when the tier opens it: KV blocks are the users' prompts.
"""

from __future__ import annotations

import os
import stat
import uuid
from collections.abc import Iterator

import pytest
from disk_tier_helpers import BB, NS, NS2, body, key, read_back, tier, write

from kv_offload.pool import HostPool, PoolSpec
from kv_offload.tiers.disk import cli
from kv_offload.tiers.disk.files import probe_direct

UMASKS = [0o000, 0o022]


@pytest.fixture(params=UMASKS, ids=lambda m: f"umask{m:03o}")
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _modes(root: str) -> dict[str, int]:
    """Every path under ``root`` (``root`` too), relative, with its permission bits."""
    out = {".": stat.S_IMODE(os.lstat(root).st_mode)}
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(d, n)
            out[os.path.relpath(p, root)] = stat.S_IMODE(os.lstat(p).st_mode)
    return out


def _assert_owner_only(root: str) -> None:
    for rel, mode in _modes(root).items():
        kind = os.lstat(os.path.join(root, rel)).st_mode
        assert stat.S_ISDIR(kind) or stat.S_ISREG(kind), f"{rel}: unexpected file type"
        want = 0o700 if stat.S_ISDIR(kind) else 0o600
        assert mode == want, f"{rel} has mode {mode:o}, expected {want:o}"


def test_disk_tier_directories_and_files_are_owner_only(tmp_path: object, umask: int) -> None:
    root = os.path.join(str(tmp_path), "cache")
    with tier(root, blocks=32) as t, tier(root, ns=NS2, blocks=32) as t2:
        assert write(t, [key(i) for i in range(20)]) == [True] * 20  # several segments
        assert write(t2, [NS2 + bytes(8) + i.to_bytes(8, "little") for i in range(3)]) == [True] * 3
        t.refresh()
    with tier(root, blocks=32) as t:  # a restart adopts the segments, and writes more
        assert write(t, [key(i, salt=1) for i in range(20)]) == [True] * 20
    assert cli.main(["purge", "--path", root, "--namespace", NS2.hex()]) == 0
    names = _modes(root)
    assert any(n.endswith(".dat") for n in names) and any(n.endswith(".idx") for n in names)
    assert not any(".direct-probe" in n for n in names), "a probe file was left behind"
    _assert_owner_only(root)


def test_the_direct_io_probe_file_is_owner_only_while_it_exists(tmp_path: object, umask: int) -> None:
    """The probe file exists only during the probe: its mode is read from inside the write."""
    seen: list[int] = []
    real_pwrite = os.pwrite

    def watching_pwrite(fd: int, data: object, offset: int) -> int:
        seen.append(stat.S_IMODE(os.fstat(fd).st_mode))
        return real_pwrite(fd, data, offset)  # type: ignore[arg-type]

    d = os.open(str(tmp_path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.pwrite = watching_pwrite  # type: ignore[assignment]
        try:
            direct = probe_direct(d)
        finally:
            os.pwrite = real_pwrite
    finally:
        os.close(d)
    if direct or seen:
        assert seen == [0o600]
    assert os.listdir(str(tmp_path)) == []


def test_existing_group_readable_segments_are_made_owner_only(tmp_path: object, umask: int) -> None:
    root = os.path.join(str(tmp_path), "cache")
    with tier(root) as t:
        assert write(t, [key(1)]) == [True]
    ns = os.path.join(root, NS.hex())
    os.chmod(ns, 0o755)
    for n in os.listdir(ns):
        os.chmod(os.path.join(ns, n), 0o644)
    with tier(root) as t:
        ok, outs = read_back(t, [key(1)])
        assert ok == [True] and outs[0] == body(key(1))
    _assert_owner_only(root)


def test_shared_pool_segment_is_owner_only(umask: int) -> None:
    name = f"test-perm-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with HostPool(PoolSpec(capacity_bytes=4 * BB, slot_bytes=BB, shm_name=name)) as pool:
        assert pool.shm_path is not None
        st = os.stat(pool.shm_path)
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600, f"{stat.S_IMODE(st.st_mode):o}"
        assert st.st_uid == os.geteuid()
        reader = HostPool.attach(name, readonly=False)
        reader.close()
        assert stat.S_IMODE(os.stat(pool.shm_path).st_mode) == 0o600  # attaching changes nothing
