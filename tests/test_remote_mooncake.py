# SPDX-License-Identifier: Apache-2.0
"""The Mooncake Store adapter against a real Mooncake master and store process (no mocks).

What is checked is what the remote tier relies on: exact bytes through the zero-copy path
(header + body from and into registered host memory), the per-key results (missing, wrong
length with nothing written, already stored), values outliving the process that wrote them,
and the faults: a killed store raises :class:`StoreUnavailable` promptly and a restarted one
works again; a stalled master or store process fails an operation in about ``timeout_s``
instead of Mooncake's own 30-60 s.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from kv_offload.config import ConfigError, RemoteConfig
from kv_offload.testing.mooncake_server import MooncakeServer, StoreStartError
from kv_offload.tiers.remote.mooncake_store import MooncakeStore, release_clients
from kv_offload.tiers.remote.store import MISSING, StoreUnavailable
from tests.remote_common import store_unavailable

KiB, MiB = 1 << 10, 1 << 20
HEADER = 80
TIMEOUT_S = 1.0  # the fault tests' operation limit
#: how much longer than ``timeout_s`` a failing operation may take (the library's TCP
#: progress/status timeouts are whole seconds; loaded CI machines are slow)
SLACK_S = 3.0


def _start(**kwargs: int) -> MooncakeServer:
    try:
        import mooncake.store  # noqa: F401
    except ImportError as exc:
        store_unavailable(f"the Mooncake client does not import ({exc})")
    server = MooncakeServer(**kwargs)
    try:
        return server.start()
    except StoreStartError as exc:
        server.close()
        store_unavailable(str(exc))
        raise  # not reached: store_unavailable skips or fails


@pytest.fixture(scope="module")
def server() -> Iterator[MooncakeServer]:
    srv = _start(segment_bytes=256 * MiB)
    yield srv
    release_clients()  # while the master is up: closing a client whose master is gone takes seconds
    srv.close()


@pytest.fixture
def fresh_server() -> Iterator[MooncakeServer]:
    """A server of its own, for a test that kills or stalls it (and leaves it running)."""
    srv = _start(segment_bytes=64 * MiB)
    yield srv
    if srv.running():
        srv.resume()
        release_clients()
    srv.close()


class Pool:
    """A registered host region standing in for the pool: bodies are slices of it."""

    def __init__(self, store: MooncakeStore, nbytes: int) -> None:
        self.array = np.zeros(nbytes, dtype=np.uint8)
        store.register_memory(memoryview(self.array))

    def view(self, offset: int, n: int) -> memoryview:
        return memoryview(self.array)[offset : offset + n]


def _values(pool: Pool, sizes: list[int], seed: int) -> list[tuple[memoryview, memoryview]]:
    rng = np.random.default_rng(seed)
    out, offset = [], 0
    for n in sizes:
        pool.array[offset : offset + n] = rng.integers(0, 256, n, dtype=np.uint8)
        out.append((memoryview(bytearray(rng.bytes(HEADER))), pool.view(offset, n)))
        offset += n
    return out


def _keys(tag: str, n: int) -> list[str]:
    return [f"kvo-test:{tag}:{os.getpid()}:{time.monotonic_ns()}:{i}" for i in range(n)]


@pytest.mark.parametrize(
    "body, options",
    [(4 * KiB, {}), (64 * KiB, {}), (1 * MiB, {}), (4 * MiB, {}), (64 * KiB, {"register": True})],
    ids=["4KiB", "64KiB", "1MiB", "4MiB", "64KiB-registered"],
)
def test_round_trip_exact_bytes(server: MooncakeServer, body: int, options: dict[str, bool]) -> None:
    """Bodies in place, headers in place (TCP) or through the registered header arena."""
    store = MooncakeStore(server.url, options, timeout_s=5.0)
    try:
        pool = Pool(store, 16 * body)
        keys = _keys("rt", 4)
        values = _values(pool, [body] * 4, seed=body)
        assert store.exists(keys) == [False] * 4
        assert store.put(keys, values) == [True] * 4
        assert store.exists(keys + _keys("absent", 1)) == [True] * 4 + [False]
        headers = [memoryview(bytearray(HEADER)) for _ in keys]
        into = [(headers[i], pool.view((8 + i) * body, body)) for i in range(4)]
        assert store.get(keys, into) == [HEADER + body] * 4
        for (h_in, b_in), (h_out, b_out) in zip(values, into):
            assert bytes(h_out) == bytes(h_in)
            assert bytes(b_out) == bytes(b_in)
        assert store.put(keys[:1], values[:1]) == [True]  # already stored: success, as equal keys carry equal content
    finally:
        store.close()


def test_wrong_length_writes_nothing_and_missing(server: MooncakeServer) -> None:
    store = MooncakeStore(server.url, {}, timeout_s=5.0)
    try:
        pool = Pool(store, 64 * KiB)
        (key,) = _keys("len", 1)
        assert store.put([key], _values(pool, [4 * KiB], seed=1)) == [True]
        pool.array[16 * KiB :] = 0xAB
        header = memoryview(bytearray(b"\xab" * HEADER))
        small = (header, pool.view(16 * KiB, 1000))
        large = (header, pool.view(32 * KiB, 8 * KiB))
        missing = (header, pool.view(48 * KiB, 4 * KiB))
        assert store.get([key, key, key + "-absent"], [small, large, missing]) == [HEADER + 4 * KiB] * 2 + [MISSING]
        assert bytes(header) == b"\xab" * HEADER
        assert (pool.array[16 * KiB :] == 0xAB).all()
    finally:
        store.close()


def test_remove(server: MooncakeServer) -> None:
    store = MooncakeStore(server.url, {}, timeout_s=5.0)
    try:
        pool = Pool(store, 64 * KiB)
        keys = _keys("rm", 2)
        assert store.put(keys, _values(pool, [4 * KiB] * 2, seed=2)) == [True, True]
        into = [(memoryview(bytearray(HEADER)), pool.view(32 * KiB, 4 * KiB))]
        assert store.get(keys[:1], into) == [HEADER + 4 * KiB]  # a read leaves a lease on the value
        store.remove([keys[0], keys[0] + "-absent"])
        assert store.exists(keys) == [False, True]
        assert store.get(keys[:1], into) == [MISSING]
    finally:
        store.close()


def test_threads_share_one_adapter(server: MooncakeServer) -> None:
    store = MooncakeStore(server.url, {}, timeout_s=5.0)
    errors: list[BaseException] = []
    try:
        pool = Pool(store, 8 * 2 * 256 * KiB)

        def work(t: int) -> None:
            try:
                base = t * 2 * 256 * KiB
                for rnd in range(10):
                    keys = _keys(f"thr{t}-{rnd}", 4)
                    src = [(memoryview(bytes([t, rnd]) * (HEADER // 2)), pool.view(base + i * 32 * KiB, 32 * KiB)) for i in range(4)]
                    pool.array[base : base + 128 * KiB] = (t * 31 + rnd) % 251
                    assert store.put(keys, src) == [True] * 4
                    dst = [(memoryview(bytearray(HEADER)), pool.view(base + 256 * KiB + i * 32 * KiB, 32 * KiB)) for i in range(4)]
                    assert store.get(keys, dst) == [HEADER + 32 * KiB] * 4
                    assert all(bytes(h) == bytes([t, rnd]) * (HEADER // 2) for h, _ in dst)
                    assert (pool.array[base + 256 * KiB : base + 384 * KiB] == (t * 31 + rnd) % 251).all()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        assert not errors, errors[0]
    finally:
        store.close()


_WRITER = """
import sys, numpy as np
from kv_offload.tiers.remote.mooncake_store import MooncakeStore
url, key = sys.argv[1], sys.argv[2]
store = MooncakeStore(url, {}, timeout_s=5.0)
body = np.arange(256 * 1024, dtype=np.uint32).view(np.uint8).copy()
store.register_memory(memoryview(body))
assert store.put([key], [(memoryview(b"H" * 80), memoryview(body))]) == [True]
store.close()
"""


def test_value_outlives_the_process_that_wrote_it(server: MooncakeServer) -> None:
    (key,) = _keys("proc", 1)
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", _WRITER, server.url, key], cwd=root, capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr.decode("utf-8", "replace")[-2000:]
    store = MooncakeStore(server.url, {}, timeout_s=5.0)
    try:
        pool = Pool(store, 1 * MiB)
        into = [(memoryview(bytearray(HEADER)), pool.view(0, 1 * MiB))]
        assert store.get([key], into) == [HEADER + 1 * MiB]
        assert bytes(into[0][0]) == b"H" * 80
        assert (pool.array.view(np.uint32) == np.arange(256 * 1024, dtype=np.uint32)).all()
    finally:
        store.close()


def test_embedded_segment_without_a_store_process() -> None:
    srv = _start(segment_bytes=0)
    try:
        store = MooncakeStore(srv.url, {"global_segment_size": "32MiB"}, timeout_s=5.0)
        try:
            pool = Pool(store, 256 * KiB)
            keys = _keys("emb", 2)
            values = _values(pool, [64 * KiB] * 2, seed=3)
            assert store.put(keys, values) == [True, True]
            into = [(memoryview(bytearray(HEADER)), pool.view(128 * KiB + i * 64 * KiB, 64 * KiB)) for i in range(2)]
            assert store.get(keys, into) == [HEADER + 64 * KiB] * 2
            assert all(bytes(a[1]) == bytes(b[1]) for a, b in zip(values, into))
        finally:
            store.close()
            release_clients()  # the segment unmounts while the master is up
    finally:
        srv.close()


def _timed_failure(call: Callable[[], object]) -> float:
    """Seconds until ``call`` raised :class:`StoreUnavailable`."""
    start = time.monotonic()
    with pytest.raises(StoreUnavailable):
        call()
    return time.monotonic() - start


def test_killed_store_fails_fast_and_restart_recovers(fresh_server: MooncakeServer) -> None:
    srv = fresh_server
    store = MooncakeStore(srv.url, {}, timeout_s=TIMEOUT_S)
    pool = Pool(store, 256 * KiB)
    keys = _keys("kill", 2)
    assert store.put(keys, _values(pool, [64 * KiB] * 2, seed=4)) == [True, True]
    srv.kill()
    assert _timed_failure(lambda: store.exists(keys)) < TIMEOUT_S + SLACK_S
    # Every later call fails at once (the library would spend ~4 s reconnecting each time).
    assert _timed_failure(lambda: store.put(keys, _values(pool, [64 * KiB] * 2, seed=5))) < 0.5
    store.close()
    assert _timed_failure(lambda: MooncakeStore(srv.url, {}, timeout_s=TIMEOUT_S)) < TIMEOUT_S + 0.5
    srv.start()  # same ports, empty
    store = MooncakeStore(srv.url, {}, timeout_s=TIMEOUT_S)
    try:
        pool = Pool(store, 256 * KiB)
        assert store.exists(keys) == [False, False]
        values = _values(pool, [64 * KiB] * 2, seed=6)
        assert store.put(keys, values) == [True, True]
        into = [(memoryview(bytearray(HEADER)), pool.view(128 * KiB + i * 64 * KiB, 64 * KiB)) for i in range(2)]
        assert store.get(keys, into) == [HEADER + 64 * KiB] * 2
        assert all(bytes(a[1]) == bytes(b[1]) for a, b in zip(values, into))
    finally:
        store.close()


def test_paused_master_fails_within_timeout(fresh_server: MooncakeServer) -> None:
    srv = fresh_server
    store = MooncakeStore(srv.url, {}, timeout_s=TIMEOUT_S)
    pool = Pool(store, 256 * KiB)
    keys = _keys("pause", 2)
    assert store.put(keys, _values(pool, [64 * KiB] * 2, seed=7)) == [True, True]
    srv.pause()
    try:
        assert _timed_failure(lambda: store.exists(keys)) < TIMEOUT_S + SLACK_S
        store.close()
        # connecting completes (the kernel accepts), setup then waits for the stalled master
        assert _timed_failure(lambda: MooncakeStore(srv.url, {}, timeout_s=TIMEOUT_S)) < TIMEOUT_S + SLACK_S
    finally:
        srv.resume()
    store = MooncakeStore(srv.url, {}, timeout_s=TIMEOUT_S)  # a pause shorter than client_ttl keeps the values
    try:
        assert store.exists(keys) == [True, True]
    finally:
        store.close()


def test_paused_store_process_fails_transfers_within_timeout(fresh_server: MooncakeServer) -> None:
    srv = fresh_server
    store = MooncakeStore(srv.url, {}, timeout_s=TIMEOUT_S)
    other = MooncakeStore(srv.url, {}, timeout_s=TIMEOUT_S)  # shares the client (and its handshake with the store process)
    pool = Pool(store, 512 * KiB)
    keys = _keys("stall", 2)
    assert store.put(keys, _values(pool, [64 * KiB] * 2, seed=8)) == [True, True]
    into = [(memoryview(bytearray(HEADER)), pool.view(256 * KiB + i * 64 * KiB, 64 * KiB)) for i in range(2)]
    srv.pause(master=False)  # metadata RPCs answer, transfers stall
    try:
        outcome: list[BaseException | list[int]] = []

        def reader() -> None:
            try:
                outcome.append(store.get(keys, into))
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=reader)
        start = time.monotonic()
        thread.start()
        time.sleep(0.2)
        store.close()  # while the get is in flight: returns at once, the get still ends normally
        assert time.monotonic() - start < 0.5
        thread.join(TIMEOUT_S + SLACK_S + 2)
        assert not thread.is_alive()
        assert time.monotonic() - start < TIMEOUT_S + SLACK_S
        assert len(outcome) == 1 and isinstance(outcome[0], StoreUnavailable), outcome
        fresh = _keys("stall-put", 1)
        assert _timed_failure(lambda: other.put(fresh, _values(pool, [64 * KiB], seed=9))) < TIMEOUT_S + SLACK_S
    finally:
        srv.resume()
        other.close()
    again = MooncakeStore(srv.url, {}, timeout_s=TIMEOUT_S)  # a stall shorter than client_ttl keeps the values
    try:
        assert again.get(keys, into) == [HEADER + 64 * KiB] * 2
    finally:
        again.close()


def _listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of the TCP sockets ``pid`` listens on, from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            addr, port = fields[1].split(":")
            if table == "tcp":
                shown = ".".join(str(b) for b in reversed(bytes.fromhex(addr)))
            else:
                shown = "::" if int(addr, 16) == 0 else addr
            out.add((shown, int(port, 16)))
    return out


def test_master_listens_on_loopback_only(server: MooncakeServer) -> None:
    assert server.master_pid is not None
    sockets = _listening(server.master_pid)
    assert (("127.0.0.1", server.port)) in sockets
    assert {addr for addr, _ in sockets} == {"127.0.0.1"}, sockets


def test_options_and_credentials_are_checked() -> None:
    for options, key in [
        ({"protocol": "udp"}, "remote.protocol"),
        ({"global_segment_size": "lots"}, "remote.global_segment_size"),
        ({"local_buffer_size": -1}, "remote.local_buffer_size"),
        ({"device": "mlx5_0"}, "remote.device"),
        ({"local_hostname": ""}, "remote.local_hostname"),
        ({"metadata_server": 5}, "remote.metadata_server"),
    ]:
        with pytest.raises(ConfigError) as info:
            RemoteConfig.from_dict({"url": "mooncake://127.0.0.1:1", **options})
        assert info.value.key == key, (options, info.value)
    with pytest.raises(ConfigError) as info:
        RemoteConfig.from_dict({"url": "mooncake://127.0.0.1:1", "ttl_s": 5})
    assert info.value.key == "remote.ttl_s"
    cfg = RemoteConfig.from_dict({"url": "mooncake://127.0.0.1:1", "protocol": "rdma", "device": "mlx5_0", "global_segment_size": 0})
    assert cfg.options == {"protocol": "rdma", "device": "mlx5_0", "global_segment_size": 0}
    with pytest.raises(ConfigError, match="no authentication"):
        MooncakeStore("mooncake://127.0.0.1:1", {}, timeout_s=1.0, password="secret")
    with pytest.raises(ConfigError, match="no authentication") as info:
        MooncakeStore("mooncake://user:secret@127.0.0.1:1", {}, timeout_s=1.0)
    assert info.value.key == "remote.url" and "secret" not in str(info.value)


def test_missing_client_package_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mooncake.store", None)  # makes the import fail
    with pytest.raises(ImportError, match="mooncake-transfer-engine-non-cuda"):
        MooncakeStore("mooncake://127.0.0.1:1", {}, timeout_s=1.0)
