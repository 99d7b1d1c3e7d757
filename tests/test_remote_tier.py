# SPDX-License-Identifier: Apache-2.0
"""The remote tier over a real Redis server: checked values, faults, lookups off the step.

Each test starts its own ``redis-server`` on 127.0.0.1 (kv_offload.testing.redis_server). The
adapter alone is tested in test_remote_redis.py; here the tier's own duties: headers and
checksums (tampered, truncated, swapped and foreign values are misses, counted, discarded),
the store down at start-up, killed, stalled and back, and :class:`RemoteIndex`'s budget.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import numpy as np
import pytest

from kv_offload.config import RemoteConfig
from kv_offload.testing.redis_server import RedisServer
from kv_offload.testing.store_process import StoreStartError
from kv_offload.tiers.remote.format import (
    HEADER_BYTES,
    check_header,
    encode_header,
    store_key,
)
from kv_offload.tiers.remote.lookup import RemoteIndex
from kv_offload.tiers.remote.tier import RemoteTier
from tests.remote_common import redis_server, store_unavailable

BLOCK = 64 * 1024
NS = bytes(range(16))


@pytest.fixture
def server() -> Iterator[RedisServer]:
    yield from redis_server()


def _config(url: str, **extra: object) -> RemoteConfig:
    return RemoteConfig.from_dict({"url": url, "timeout_ms": 500, "reconnect_max_s": 1, **extra})


def _blocks(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, BLOCK), dtype=np.uint8)


def _keys(n: int, tag: int = 0) -> list[bytes]:
    return [bytes([tag, i]) * 16 for i in range(n)]


def _client(srv: RedisServer):  # type: ignore[no-untyped-def]
    import redis

    return redis.Redis.from_url(srv.url)


def test_header_binds_namespace_key_length_and_body() -> None:
    body = memoryview(bytes(range(256)) * 16)
    header = memoryview(bytearray(HEADER_BYTES))
    encode_header(header, NS, b"k" * 32, body)
    promised = check_header(header, NS, b"k" * 32, len(body))
    assert isinstance(promised, int)
    assert check_header(header, bytes(16), b"k" * 32, len(body)) == "another namespace's value"
    assert check_header(header, NS, b"j" * 32, len(body)) == "another key's value"
    assert check_header(header, NS, b"k" * 31, len(body)) == "another key's value"
    assert "body of" in str(check_header(header, NS, b"k" * 32, len(body) + 1))
    flipped = bytearray(header)
    flipped[20] ^= 1
    assert check_header(memoryview(flipped), NS, b"k" * 32, len(body)) == "header checksum mismatch"
    assert store_key("p:", NS, b"\x01\x02") == "p:" + NS.hex() + ":0102"


def test_blocks_round_trip_exactly_and_misses_leave_buffers_alone(server: RedisServer) -> None:
    src, keys = _blocks(5), _keys(5)
    with RemoteTier(_config(server.url), NS, BLOCK) as tier:
        assert tier.write([(k, memoryview(src[i])) for i, k in enumerate(keys)]) == [True] * 5
        assert tier.contains(keys + _keys(1, tag=9)) == [True] * 5 + [False]
        dst = np.full((6, BLOCK), 7, dtype=np.uint8)
        ok = tier.read(keys + _keys(1, tag=9), [memoryview(dst[i]) for i in range(6)])
        assert ok == [True] * 5 + [False]
        assert np.array_equal(dst[:5], src)
        assert (dst[5] == 7).all()  # a miss writes nothing
        st = tier.stats()
        assert (st.writes, st.hits, st.misses, st.corruptions, st.connected) == (5, 5, 1, 0, 1)


def test_a_tier_of_another_namespace_or_prefix_sees_nothing(server: RedisServer) -> None:
    src, keys = _blocks(2), _keys(2)
    with RemoteTier(_config(server.url), NS, BLOCK) as tier:
        tier.write([(k, memoryview(src[i])) for i, k in enumerate(keys)])
    with RemoteTier(_config(server.url), bytes(16), BLOCK) as other_ns, \
            RemoteTier(_config(server.url, prefix="other:"), NS, BLOCK) as other_prefix:  # fmt: skip
        assert other_ns.contains(keys) == [False, False]
        assert other_prefix.contains(keys) == [False, False]


@pytest.mark.parametrize("tamper", ["flip_body", "truncate", "swap_keys", "foreign_namespace", "garbage"])
def test_tampered_values_are_misses_counted_and_discarded(server: RedisServer, tamper: str) -> None:
    src, keys = _blocks(2, seed=3), _keys(2)
    config = _config(server.url)
    with RemoteTier(config, NS, BLOCK) as tier:
        tier.write([(k, memoryview(src[i])) for i, k in enumerate(keys)])
        r = _client(server)
        name0, name1 = (store_key(config.prefix, NS, k) for k in keys)
        value = bytearray(r.get(name0))
        if tamper == "flip_body":
            value[HEADER_BYTES + 1000] ^= 0x40
            r.set(name0, bytes(value))
        elif tamper == "truncate":
            r.set(name0, bytes(value[: len(value) // 2]))
        elif tamper == "swap_keys":
            r.set(name0, r.get(name1))  # a valid value, under the wrong name
        elif tamper == "foreign_namespace":
            with RemoteTier(config, bytes(16), BLOCK) as foreign:  # same key, another namespace
                foreign.write([(keys[0], memoryview(src[1]))])
            r.set(name0, r.get(store_key(config.prefix, bytes(16), keys[0])))
        else:
            r.set(name0, b"\x00" * len(value))
        dst = np.full((2, BLOCK), 7, dtype=np.uint8)
        assert tier.read(keys, [memoryview(dst[0]), memoryview(dst[1])]) == [False, True]
        assert np.array_equal(dst[1], src[1])
        assert (dst[0] == 7).all() or (dst[0] == 0).all()  # untouched, or zeroed: never bytes that look valid
        assert tier.stats().corruptions == 1
        assert r.exists(name0) == 0  # discarded: the next writer stores a good copy
        assert tier.write([(keys[0], memoryview(src[0]))]) == [True]
        assert tier.read(keys[:1], [memoryview(dst[0])]) == [True] and np.array_equal(dst[0], src[0])


def test_store_down_at_start_warns_once_serves_misses_and_reconnects(caplog: pytest.LogCaptureFixture) -> None:
    try:
        srv = RedisServer()
        srv.start()
    except StoreStartError as exc:
        store_unavailable(str(exc))
        raise
    url = srv.url
    srv.kill()
    src, keys = _blocks(1), _keys(1)
    dst = np.zeros((1, BLOCK), dtype=np.uint8)
    try:
        with caplog.at_level(logging.WARNING, "kv_offload"):
            tier = RemoteTier(_config(url), NS, BLOCK)  # never raises: the server starts anyway
            assert not tier.connected
            assert tier.write([(keys[0], memoryview(src[0]))]) == [False]
            assert tier.read(keys, [memoryview(dst[0])]) == [False]
            assert tier.contains(keys) == [False]
        warnings = [r for r in caplog.records if "unavailable" in r.getMessage()]
        assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
        assert srv.password not in caplog.text
        srv.restart()
        deadline = time.monotonic() + 5
        while not tier.write([(keys[0], memoryview(src[0]))])[0]:
            assert time.monotonic() < deadline, "the tier never reconnected"
            time.sleep(0.05)
        assert tier.read(keys, [memoryview(dst[0])]) == [True] and np.array_equal(dst, src)
        st = tier.stats()
        assert st.reconnects == 1 and st.connected == 1 and st.errors >= 1
        tier.close()
    finally:
        srv.close()


def test_a_killed_store_fails_operations_fast_and_hits_resume_after_restart(server: RedisServer) -> None:
    src, keys = _blocks(2), _keys(2)
    tier = RemoteTier(_config(server.url), NS, BLOCK)
    dst = np.zeros((2, BLOCK), dtype=np.uint8)
    try:
        assert tier.write([(k, memoryview(src[i])) for i, k in enumerate(keys)]) == [True, True]
        server.kill()
        t0 = time.monotonic()
        assert tier.read(keys, [memoryview(dst[0]), memoryview(dst[1])]) == [False, False]
        assert time.monotonic() - t0 < 2.0
        assert not dst.any()  # a failed read leaves nothing that looks valid
        server.restart()  # an empty store (no persistence): writes go in again
        deadline = time.monotonic() + 5
        while not all(tier.write([(k, memoryview(src[i])) for i, k in enumerate(keys)])):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert tier.read(keys, [memoryview(dst[0]), memoryview(dst[1])]) == [True, True]
        assert np.array_equal(dst, src) and tier.stats().reconnects == 1
    finally:
        tier.close()


def test_a_stalled_store_costs_one_timeout_not_a_hang(server: RedisServer) -> None:
    src, keys = _blocks(1), _keys(1)
    tier = RemoteTier(_config(server.url), NS, BLOCK)
    dst = np.zeros((1, BLOCK), dtype=np.uint8)
    try:
        tier.write([(keys[0], memoryview(src[0]))])
        server.pause()
        t0 = time.monotonic()
        assert tier.read(keys, [memoryview(dst[0])]) == [False]
        assert 0.3 < time.monotonic() - t0 < 2.0  # the 500 ms operation limit, not forever
        t0 = time.monotonic()
        assert tier.contains(keys) == [False]  # backing off: answered at once
        assert time.monotonic() - t0 < 0.1
    finally:
        server.resume()
        tier.close()


def test_lookups_run_off_the_caller_and_answer_within_the_budget(server: RedisServer) -> None:
    src, keys = _blocks(3), _keys(3)
    tier = RemoteTier(_config(server.url), NS, BLOCK)
    index = RemoteIndex(tier, budget_s=0.2)
    try:
        tier.write([(k, memoryview(src[i])) for i, k in enumerate(keys[:2])])
        assert index.contains(keys) is None  # not known yet: asked off the caller's thread
        deadline = time.monotonic() + 2
        while (answer := index.contains(keys)) is None:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        assert answer == [True, True, False]
        assert len(index.take_latencies()) == 1
        # A stalled store: callers get None until the budget is spent, then go ahead.
        server.pause()
        other = _keys(2, tag=5)
        t0 = time.monotonic()
        while (answer := index.contains(other)) is None:
            time.sleep(0.005)
        waited = time.monotonic() - t0
        assert answer == [False, False] and 0.19 < waited < 0.45
        assert index.timeouts >= 1
        # Answers already known are still served at once while the store is stalled.
        t0 = time.monotonic()
        assert index.contains(keys) == [True, True, False]
        assert time.monotonic() - t0 < 0.01
    finally:
        server.resume()
        index.close()
        tier.close()


def test_stats_never_wait_for_a_connection_attempt(server: RedisServer) -> None:
    """``stats`` runs on the engine step (the worker's connector stats): a reconnection that
    waits on a stalled store must not hold it."""
    import threading

    tier = RemoteTier(_config(server.url), NS, BLOCK)
    try:
        server.pause()
        assert tier.contains(_keys(1)) == [False]  # fails after the timeout: now down
        time.sleep(0.6)  # past the first backoff: the next call tries to connect (and waits)
        attempt = threading.Thread(target=tier.contains, args=(_keys(1),))
        attempt.start()
        time.sleep(0.1)  # the attempt is waiting on the stalled store now
        t0 = time.monotonic()
        st = tier.stats()
        assert time.monotonic() - t0 < 0.05 and st.connected == 0
        attempt.join()
    finally:
        server.resume()
        tier.close()


def test_the_lookup_cache_keeps_only_answers_it_can_still_use(server: RedisServer) -> None:
    """Found by the soak: expired answers were dropped only past 200 000 keys, and the
    scheduler's process grew about 1.3 MiB a minute under load (vLLM alone: flat)."""
    tier = RemoteTier(_config(server.url), NS, BLOCK)
    index = RemoteIndex(tier, budget_s=0.5, ttl_s=0.2)
    try:
        for round_ in range(5):
            keys = _keys(200, tag=10 + round_)
            deadline = time.monotonic() + 5
            while index.contains(keys) is None:
                assert time.monotonic() < deadline
                time.sleep(0.005)
            assert len(index) >= 1
            index.learn(_keys(50, tag=100 + round_))
            assert len(index) <= 200 + 50, len(index)  # this round's answers only, never the earlier rounds'
            time.sleep(0.3)  # past the ttl: the next answers push these out
        assert index.contains(_keys(1, tag=10)) is None  # an expired answer is asked again, not reused
    finally:
        index.close()
        tier.close()
