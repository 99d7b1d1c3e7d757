# SPDX-License-Identifier: Apache-2.0
"""Fuzzing the remote tier's value format: damaged, forged, swapped and foreign values.

Two levels:

- the header parser (``format.check_header``) on its own, over valid headers damaged every
  way (truncated, extended, bits flipped, fields forged with a recomputed header checksum,
  random bytes). The oracle is an independent encoding of the header from its fields: the
  parser promises a body checksum exactly when the bytes are the header of the (namespace,
  key, length) asked for; otherwise it says why, and it never raises;
- the read path of a real :class:`RemoteTier` on a real ``redis-server``: a block is written
  through the tier, then its stored value is overwritten through redis-py with damaged bytes
  (or another key's value, another namespace's, random bytes, a value of another Redis type).
  ``read`` then serves the block only if the value still decodes as that key's block, with
  exactly its bytes; any other value is a miss, counted in ``misses`` and ``corruptions``,
  the destination is left as it was or zeroed, and the value is deleted from the store.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import redis
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kv_offload.config import RemoteConfig
from kv_offload.testing.redis_server import RedisServer
from kv_offload.tiers.remote.format import (
    FORMAT_VERSION,
    HEADER_BYTES,
    MAX_KEY_BYTES,
    check_header,
    store_key,
)
from kv_offload.tiers.remote.tier import RemoteTier
from tests.remote_common import redis_server

NS = bytes(range(16))
NS2 = bytes(range(16, 32))
BLOCK = 4096
PREFILL = 0xA5
_FIELDS = struct.Struct("<4sHHQQ16s32s")  # the oracle's own encoding of the header's fields
PARSER_FUZZ = settings(max_examples=500, deadline=None, derandomize=True, database=None)
STORE_FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                      suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip


def header_of(ns: bytes, key: bytes, length: int, body_hash: int, *, magic: bytes = b"KVOR",
              version: int = FORMAT_VERSION, key_len: int | None = None) -> bytes:  # fmt: skip
    """A header with a valid header checksum, from its fields (any of them may be wrong)."""
    raw = _FIELDS.pack(magic, version, len(key) if key_len is None else key_len, length, body_hash, ns, key)
    return raw + struct.pack("<Q", xxhash.xxh3_64_intdigest(raw))


# -- the parser ------------------------------------------------------------------------------------
_U64 = st.integers(0, (1 << 64) - 1)


@st.composite
def headers(draw: Any) -> tuple[bytes, bytes, int, bytes]:
    """(namespace, key, body length) asked for, and header bytes to check against them."""
    ns, key = draw(st.sampled_from([NS, NS2])), draw(st.binary(min_size=0, max_size=MAX_KEY_BYTES))
    length, body_hash = draw(st.sampled_from([0, 1, BLOCK, 1 << 20, (1 << 64) - 1])), draw(_U64)
    raw = bytearray(header_of(ns, key, length, body_hash))
    kind = draw(st.sampled_from(["none", "truncate", "extend", "flip", "garbage", "forge", "random"]))
    if kind == "truncate":
        del raw[draw(st.integers(0, HEADER_BYTES - 1)) :]
    elif kind == "extend":
        raw += draw(st.binary(min_size=1, max_size=16))
    elif kind == "flip":
        raw[draw(st.integers(0, HEADER_BYTES - 1))] ^= 1 << draw(st.integers(0, 7))
    elif kind == "garbage":
        at = draw(st.integers(0, HEADER_BYTES - 1))
        patch = draw(st.binary(min_size=1, max_size=HEADER_BYTES - at))
        raw[at : at + len(patch)] = patch
    elif kind == "forge":  # a valid header checksum, one field changed
        field = draw(st.sampled_from(["magic", "version", "key_len", "length", "hash", "ns", "key", "padding"]))
        f: dict[str, Any] = {"ns": ns, "key": key, "length": length, "body_hash": body_hash}
        if field == "magic":
            f["magic"] = draw(st.sampled_from([b"KVOB", b"\0\0\0\0", b"kvor"]))
        elif field == "version":
            f["version"] = draw(st.sampled_from([0, FORMAT_VERSION + 1, 0xFFFF]))
        elif field == "key_len":
            f["key_len"] = draw(st.integers(0, 0xFFFF))
        elif field == "length":
            f["length"] = draw(_U64)
        elif field == "hash":
            f["body_hash"] = draw(_U64)
        elif field == "ns":
            f["ns"] = draw(st.binary(min_size=16, max_size=16))
        elif field == "key":
            f["key"] = draw(st.binary(min_size=0, max_size=MAX_KEY_BYTES))
        else:  # a nonzero byte in the key's padding
            f["key"] = key + bytes([draw(st.integers(1, 255))]) if len(key) < MAX_KEY_BYTES else key
            f["key_len"] = len(key)
        raw = bytearray(header_of(**f))
    elif kind == "random":
        raw = bytearray(draw(st.binary(min_size=0, max_size=HEADER_BYTES + 8)))
    asked = draw(st.sampled_from(["same", "other_ns", "other_key", "other_length"]))
    if asked == "other_ns":
        ns = NS2 if ns == NS else NS
    elif asked == "other_key":
        key = draw(st.binary(min_size=0, max_size=MAX_KEY_BYTES))
    elif asked == "other_length":
        length = draw(st.sampled_from([0, BLOCK - 1, BLOCK + 1, 1 << 40]))
    return ns, key, length, bytes(raw)


@PARSER_FUZZ
@given(case=headers())
def test_the_header_parser_promises_a_checksum_only_for_the_exact_header(case: tuple[bytes, bytes, int, bytes]) -> None:
    ns, key, length, raw = case
    got = check_header(memoryview(raw), ns, key, length)
    if isinstance(got, int):
        assert raw == header_of(ns, key, length, got), "a header not of this (namespace, key, length) passed"
    else:
        assert isinstance(got, str) and got
        if len(raw) == HEADER_BYTES:  # what it would have promised, had it been the exact header
            promised = struct.unpack_from("<Q", raw, 16)[0]
            assert raw != header_of(ns, key, length, promised), f"the exact header was refused: {got}"


# -- the read path on a real store --------------------------------------------------------------
@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    yield from redis_server()


@pytest.fixture(scope="module")
def remote(server: RedisServer) -> Iterator[tuple[RemoteTier, redis.Redis]]:
    config = RemoteConfig.from_dict({"url": server.url, "timeout_ms": 2000, "reconnect_max_s": 1, "prefix": "fz:"})
    client = redis.Redis.from_url(server.url)
    with RemoteTier(config, NS, BLOCK) as tier:
        yield tier, client
    client.close()


_COUNTER = itertools.count()


def _block(seed: int) -> bytes:
    return np.random.default_rng(seed).bytes(BLOCK)


def _value(ns: bytes, key: bytes, body: bytes) -> bytes:
    return header_of(ns, key, len(body), xxhash.xxh3_64_intdigest(body)) + body


@st.composite
def damage(draw: Any) -> tuple[Any, ...]:
    kind = draw(st.sampled_from(["truncate", "extend", "flip", "garbage", "forge", "swap_key", "other_ns",
                                 "other_body_old_header", "random", "empty", "wrong_type", "none"]))  # fmt: skip
    if kind == "truncate":
        return (kind, draw(st.one_of(st.integers(0, HEADER_BYTES + 8), st.integers(0, HEADER_BYTES + BLOCK - 1))))
    if kind == "extend":
        return (kind, draw(st.binary(min_size=1, max_size=64)))
    if kind == "flip":
        at = draw(st.one_of(st.integers(0, HEADER_BYTES - 1), st.integers(0, HEADER_BYTES + BLOCK - 1)))
        return (kind, at, draw(st.integers(0, 7)))
    if kind == "garbage":
        return (kind, draw(st.integers(0, HEADER_BYTES + BLOCK - 1)), draw(st.binary(min_size=1, max_size=200)))
    if kind == "forge":
        field = draw(st.sampled_from(["magic", "version", "key_len", "length", "hash"]))
        return (kind, field, draw(st.integers(0, 0xFFFF)))
    if kind == "random":
        return (kind, draw(st.binary(min_size=0, max_size=HEADER_BYTES + 300)), draw(st.booleans()))
    return (kind,)


def apply(value: bytes, key: bytes, op: tuple[Any, ...]) -> bytes | None:
    """``value`` damaged by ``op`` (``None``: store a value of another Redis type instead)."""
    kind = op[0]
    out = bytearray(value)
    if kind == "truncate":
        del out[op[1] :]
    elif kind == "extend":
        out += op[1]
    elif kind == "flip":
        if op[1] < len(out):
            out[op[1]] ^= 1 << op[2]
    elif kind == "garbage":
        out[op[1] : op[1] + len(op[2])] = op[2]
    elif kind == "forge":
        body = bytes(out[HEADER_BYTES:])
        f: dict[str, Any] = {"ns": NS, "key": key, "length": len(body), "body_hash": xxhash.xxh3_64_intdigest(body)}
        f[{"magic": "magic", "version": "version", "key_len": "key_len", "length": "length", "hash": "body_hash"}[op[1]]] = {
            "magic": b"KVO" + bytes([op[2] & 0xFF]), "version": op[2], "key_len": op[2] % 64,
            "length": op[2], "hash": op[2],
        }[op[1]]  # fmt: skip
        out = bytearray(header_of(**f) + body)
    elif kind == "swap_key":  # another key's valid value, stored under this key
        other = bytes([0xEE]) * len(key)
        out = bytearray(_value(NS, other, bytes(out[HEADER_BYTES:])))
    elif kind == "other_ns":
        out = bytearray(_value(NS2, key, bytes(out[HEADER_BYTES:])))
    elif kind == "other_body_old_header":  # another block's bytes behind this block's header
        out[HEADER_BYTES:] = _block(next(_COUNTER) + (1 << 30))[: len(out) - HEADER_BYTES]
    elif kind == "random":
        n = HEADER_BYTES + BLOCK if op[2] else len(op[1])
        out = bytearray((op[1] * (n // max(1, len(op[1])) + 1))[:n]) if op[1] else bytearray(n)
    elif kind == "empty":
        out = bytearray()
    elif kind == "wrong_type":
        return None
    return bytes(out)


def valid_for(value: bytes, key: bytes) -> bool:
    """The oracle: whether ``value`` is exactly a block of ``key`` in ``NS`` (header from its fields)."""
    body = value[HEADER_BYTES:]
    return len(body) == BLOCK and value[:HEADER_BYTES] == header_of(NS, key, BLOCK, xxhash.xxh3_64_intdigest(body))


@STORE_FUZZ
@given(ops=st.lists(damage(), min_size=1, max_size=3))
def test_values_overwritten_in_the_store_are_counted_misses_never_wrong_bytes(
    remote: tuple[RemoteTier, redis.Redis], ops: list[tuple[Any, ...]]
) -> None:  # fmt: skip
    tier, client = remote
    n = next(_COUNTER)
    key = n.to_bytes(8, "little") * 4
    name = store_key(tier.config.prefix, NS, key)
    block = _block(n)
    assert tier.write([(key, memoryview(block))]) == [True]
    stored = client.get(name)
    assert stored is not None and valid_for(stored, key)
    value: bytes | None = stored
    for op in ops:
        value = apply(value, key, op) if value is not None else None
    client.delete(name)
    if value is None:
        client.rpush(name, b"not a string value")
    else:
        client.set(name, value)
    before = tier.stats()
    out = bytearray([PREFILL]) * BLOCK
    got = tier.read([key], [memoryview(out)])
    after = tier.stats()
    assert after.hits + after.misses == before.hits + before.misses + 1
    if value is not None and valid_for(value, key):
        assert got == [True] and out == value[HEADER_BYTES:], "a valid value not served exactly"
        assert after.corruptions == before.corruptions
    else:
        assert got == [False], "a damaged value was served"
        assert out == bytearray([PREFILL]) * BLOCK or out == bytes(BLOCK), "a miss left other bytes"
        assert after.misses == before.misses + 1 and after.corruptions == before.corruptions + 1
        assert client.exists(name) == 0, "a corrupt value was left in the store"
    assert after.errors == before.errors and tier.connected
    client.delete(name)
