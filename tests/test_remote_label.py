# SPDX-License-Identifier: Apache-2.0
"""The remote tier's namespace labels over a real Redis server: put with the blocks, back
after the store lost them, never trusted when planted or damaged, listed and shown by
``python -m kv_offload remote``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import kv_offload.tiers.remote.tier as tier_mod
from kv_offload.config import RemoteConfig
from kv_offload.testing.redis_server import RedisServer
from kv_offload.tiers.remote.format import HEADER_BYTES, encode_header
from kv_offload.tiers.remote.label import (
    LABEL_KEY,
    MAX_LABEL_BYTES,
    encode_label,
    label_name,
    label_pattern,
    namespace_of,
    put_label,
    read_label,
)
from kv_offload.tiers.remote.redis_store import RedisStore
from kv_offload.tiers.remote.tier import RemoteTier
from tests.remote_common import redis_server

BLOCK = 4096
NS = bytes(range(16))
OTHER = bytes(range(16, 32))
LABEL: dict[str, Any] = {
    "model": "/models/tiny-llama/", "kv_dtype": "bfloat16", "block_size": 16, "page_format": "HND", "rank": 0,
    "rank_digest": NS.hex(), "geometry": {"num_kv_heads": 2, "head_size": 64},
}  # fmt: skip


@pytest.fixture
def server() -> Iterator[RedisServer]:
    yield from redis_server()


def _config(url: str, **extra: object) -> RemoteConfig:
    return RemoteConfig.from_dict({"url": url, "timeout_ms": 500, "reconnect_max_s": 1, **extra})


def _store(srv: RedisServer) -> RedisStore:
    return RedisStore(srv.url, {}, timeout_s=2.0)


def _write(tier: RemoteTier, n: int = 2, tag: int = 0) -> list[bool]:
    blocks = np.random.default_rng(tag).integers(0, 256, size=(n, BLOCK), dtype=np.uint8)
    return tier.write([(bytes([tag, i]) * 16, memoryview(blocks[i])) for i in range(n)])


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "kv_offload", "remote", *args]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60)


def test_a_writing_tier_puts_its_label_with_its_blocks_and_the_cli_shows_it(server: RedisServer) -> None:
    store = _store(server)
    tier = RemoteTier(_config(server.url), NS, BLOCK, label=LABEL)
    try:
        assert read_label(store, "kvo:", NS) is None  # connected, nothing written yet: no label
        assert _write(tier) == [True, True]  # the label goes with the batch, not as a result
        assert read_label(store, "kvo:", NS) == LABEL
        assert tier.stats().writes == 2
    finally:
        tier.close()
    listed = _cli("list", "--url", server.url)
    assert listed.returncode == 0, listed.stderr
    (row,) = [ln for ln in listed.stdout.splitlines() if ln.startswith(NS.hex())]
    assert row.split(None, 1)[1] == "HND, bfloat16, 16-token blocks, rank 0, tiny-llama"
    shown = _cli("show", "--url", server.url, "--namespace", NS.hex())
    assert shown.returncode == 0 and json.loads(shown.stdout) == LABEL, shown.stderr
    assert server.password not in listed.stdout + listed.stderr + shown.stderr
    store.close()


def test_no_label_from_a_read_only_tier_nor_one_without_a_label(server: RedisServer) -> None:
    store = _store(server)
    read_only = RemoteTier(_config(server.url, write=False), NS, BLOCK, label=LABEL)
    unlabelled = RemoteTier(_config(server.url), OTHER, BLOCK)
    try:
        assert _write(read_only) == [False, False]
        assert _write(unlabelled) == [True, True]
        assert read_label(store, "kvo:", NS) is None and read_label(store, "kvo:", OTHER) is None
        assert store.scan(label_pattern("kvo:"), 100) == []
    finally:
        read_only.close()
        unlabelled.close()
        store.close()


def test_the_label_comes_back_after_the_store_lost_it(server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tier_mod, "_LABEL_REFRESH_S", 0.5)
    store = _store(server)
    tier = RemoteTier(_config(server.url), NS, BLOCK, label=LABEL)
    try:
        assert _write(tier) == [True, True]
        store.remove([label_name("kvo:", NS)])  # evicted
        assert _write(tier, tag=1) == [True, True]
        assert read_label(store, "kvo:", NS) is None  # not put again with every batch ...
        time.sleep(0.6)
        assert _write(tier, tag=2) == [True, True]
        assert read_label(store, "kvo:", NS) == LABEL  # ... but once the refresh period is over
        # A store restarted empty: the label is back with the first batch after reconnecting,
        # long before the refresh period is over.
        monkeypatch.setattr(tier_mod, "_LABEL_REFRESH_S", 3600.0)
        time.sleep(0.6)
        assert _write(tier, tag=3) == [True, True]  # the next put is due in an hour
        store.close()
        server.kill()
        assert _write(tier, tag=4) == [False, False]  # the tier sees the outage ...
        server.restart()  # ... and the store comes back empty
        deadline = time.monotonic() + 10
        while not all(_write(tier, tag=5)):
            assert time.monotonic() < deadline, "the tier never reconnected"
            time.sleep(0.05)
        store = _store(server)
        assert tier.stats().reconnects == 1 and read_label(store, "kvo:", NS) == LABEL
    finally:
        tier.close()
        store.close()


@pytest.mark.parametrize("planted", ["garbage", "other_namespace", "flipped_byte", "not_an_object", "too_large"])
def test_planted_or_damaged_labels_are_not_trusted(server: RedisServer, planted: str) -> None:
    import redis

    store = _store(server)
    client = redis.Redis.from_url(server.url)
    name = label_name("kvo:", NS)
    header, body = encode_label(OTHER if planted == "other_namespace" else NS, LABEL)
    value = bytearray(bytes(header) + bytes(body))
    if planted == "garbage":
        value = bytearray(b"not a label at all" * 10)
    elif planted == "flipped_byte":
        value[HEADER_BYTES + 3] ^= 0x20
    elif planted == "not_an_object":  # a valid header and checksum over a JSON list
        list_body = memoryview(b"[1, 2]\n")
        list_header = memoryview(bytearray(HEADER_BYTES))
        encode_header(list_header, NS, LABEL_KEY, list_body)
        value = bytearray(bytes(list_header) + bytes(list_body))
    elif planted == "too_large":
        big = {"padding": "x" * (MAX_LABEL_BYTES - 100)}
        h, b = encode_label(NS, big)
        value = bytearray(bytes(h) + bytes(b) + b" " * 200)  # past the limit: not even read
    client.set(name, bytes(value))
    try:
        assert read_label(store, "kvo:", NS) is None
        listed = _cli("list", "--url", server.url)
        assert listed.returncode == 0, listed.stderr
        (row,) = [ln for ln in listed.stdout.splitlines() if ln.startswith(NS.hex())]
        assert "(label unreadable or not valid)" in row
        shown = _cli("show", "--url", server.url, "--namespace", NS.hex())
        assert shown.returncode == 1 and "no label" in shown.stderr
    finally:
        client.close()
        store.close()


def test_a_label_longer_than_the_first_read_is_read_whole(server: RedisServer) -> None:
    store = _store(server)
    label = {**LABEL, "notes": "y" * 20_000}
    try:
        assert put_label(store, "kvo:", NS, label)
        assert read_label(store, "kvo:", NS) == label
    finally:
        store.close()


def test_listing_stays_within_its_prefix_and_escapes_glob_characters(server: RedisServer) -> None:
    store = _store(server)
    try:
        for prefix in ("a*[b]:", "a-other:", "kvo:"):
            assert put_label(store, prefix, NS, {**LABEL, "prefix": prefix})
        names = store.scan(label_pattern("a*[b]:"), 100)
        assert names == [label_name("a*[b]:", NS)]
        assert namespace_of("a*[b]:", names[0]) == NS
        assert namespace_of("kvo:", names[0]) is None and namespace_of("kvo:", "kvo:zz" * 8 + ":label") is None
        listed = _cli("list", "--url", server.url, "--prefix", "a-other:")
        assert listed.returncode == 0 and listed.stdout.count(NS.hex()) == 1, listed.stdout
    finally:
        store.close()


def test_cli_errors_name_what_is_wrong(server: RedisServer) -> None:
    no_ns = _cli("show", "--url", server.url)
    assert no_ns.returncode == 2 and "--namespace" in no_ns.stderr
    bad_ns = _cli("show", "--url", server.url, "--namespace", "xyz")
    assert bad_ns.returncode == 2 and "32 hex digits" in bad_ns.stderr
    no_url = _cli("list")
    assert no_url.returncode == 2 and "remote.url" in no_url.stderr
    bad_json = _cli("list", "--remote", "{not json")
    assert bad_json.returncode == 2 and "--remote is not JSON" in bad_json.stderr
    bad_key = _cli("list", "--remote", json.dumps({"url": server.url, "timeout": 5}))
    assert bad_key.returncode == 2 and "remote.timeout" in bad_key.stderr
    server.kill()
    down = _cli("list", "--url", server.url)
    assert down.returncode == 1 and "error:" in down.stderr and server.password not in down.stderr
    cmd = [sys.executable, "-m", "kv_offload", "nope"]
    usage = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "python -m kv_offload remote list|show" in usage.stderr
