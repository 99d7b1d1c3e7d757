# SPDX-License-Identifier: Apache-2.0
"""Config parsing: good values parse, every bad one names its key."""

from __future__ import annotations

from typing import Any

import pytest

from kv_offload.config import ConfigError, OffloadConfig, parse_bytes


@pytest.mark.parametrize(
    ("text", "expected"),
    [(4294967296, 4 << 30), ("4GiB", 4 << 30), ("4 GiB", 4 << 30), ("512MiB", 512 << 20),
     ("2G", 2_000_000_000), ("1.5KiB", 1536), ("100", 100), (8.0, 8)],
)  # fmt: skip
def test_parse_bytes(text: object, expected: int) -> None:
    assert parse_bytes(text) == expected


def test_defaults_and_full_config() -> None:
    cfg = OffloadConfig.from_dict({"cpu_bytes": "1GiB"})
    assert cfg.cpu_bytes == 1 << 30 and cfg.eviction_policy == "lru" and cfg.backend == "host"
    cfg = OffloadConfig.from_dict(
        {"cpu_bytes": 1 << 20, "eviction_policy": "arc", "store_threshold": 2, "numa_node": 0,
         "shm_name": "pool-a", "pin_memory": False, "transfer_threads": 4, "backend_options": {"prefault": True}}
    )  # fmt: skip
    assert cfg.eviction_policy == "arc" and cfg.numa_node == 0 and cfg.shm_name == "pool-a"
    assert cfg.backend_options == {"prefault": True}
    with pytest.raises(AttributeError):
        cfg.cpu_bytes = 5  # type: ignore[misc]  # frozen


BAD: list[tuple[dict[str, Any], str]] = [
    ({}, "cpu_bytes"),
    ({"cpu_bytes": "lots"}, "cpu_bytes"),
    ({"cpu_bytes": -5}, "cpu_bytes"),
    ({"cpu_bytes": True}, "cpu_bytes"),
    ({"cpu_bytes": "4XB"}, "cpu_bytes"),
    ({"cpu_bytes": 1, "cpu_byte": 2}, "cpu_byte"),
    ({"cpu_bytes": 1, "eviction_policy": 3}, "eviction_policy"),
    ({"cpu_bytes": 1, "eviction_policy": ""}, "eviction_policy"),
    ({"cpu_bytes": 1, "store_threshold": -1}, "store_threshold"),
    ({"cpu_bytes": 1, "store_threshold": "2"}, "store_threshold"),
    ({"cpu_bytes": 1, "numa_node": -1}, "numa_node"),
    ({"cpu_bytes": 1, "shm_name": "a/b"}, "shm_name"),
    ({"cpu_bytes": 1, "pin_memory": "yes"}, "pin_memory"),
    ({"cpu_bytes": 1, "transfer_threads": 0}, "transfer_threads"),
    ({"cpu_bytes": 1, "backend_options": [1]}, "backend_options"),
    ({"cpu_bytes": 1, "max_tracker_size": 0}, "max_tracker_size"),
]


@pytest.mark.parametrize(("raw", "key"), BAD)
def test_bad_value_names_the_key(raw: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        OffloadConfig.from_dict(raw)
    assert info.value.key == key
    assert f"'{key}'" in str(info.value)


def test_not_a_mapping() -> None:
    with pytest.raises(ConfigError, match="kv_connector_extra_config"):
        OffloadConfig.from_dict([1, 2])  # type: ignore[arg-type]


# Values a hostile-input probe found raising raw exceptions (OverflowError, MemoryError) or
# accepted and failing much later; each must be a ConfigError naming its key at parse time.
HOSTILE: list[tuple[dict[str, Any], str]] = [
    ({"cpu_bytes": "1" * 400 + "TiB"}, "cpu_bytes"),  # float() overflowed
    ({"cpu_bytes": "1" * 20 + "TiB"}, "cpu_bytes"),
    ({"cpu_bytes": 10**30}, "cpu_bytes"),
    ({"cpu_bytes": 2**62}, "cpu_bytes"),
    ({"cpu_bytes": 10**5000}, "cpu_bytes"),  # too long even to print as an int
    ({"cpu_bytes": -(10**5000)}, "cpu_bytes"),
    ({"cpu_bytes": float("inf")}, "cpu_bytes"),
    ({"cpu_bytes": float("nan")}, "cpu_bytes"),
    ({"cpu_bytes": 1, "transfer_threads": 2**70}, "transfer_threads"),
    ({"cpu_bytes": 1, "transfer_threads": 257}, "transfer_threads"),
    ({"cpu_bytes": 1, "numa_node": 2**70}, "numa_node"),
    ({"cpu_bytes": 1, "store_threshold": 10**5000}, "store_threshold"),
    ({"cpu_bytes": 1, "max_tracker_size": 2**64}, "max_tracker_size"),
    ({"cpu_bytes": 1, "fail_load_every": [10**5000]}, "fail_load_every"),
    ({"cpu_bytes": "0.5"}, "cpu_bytes"),  # less than one byte
    ({"cpu_bytes": "\u0661\u0662GiB"}, "cpu_bytes"),  # non-ASCII digits
    ({"cpu_bytes": 1, "shm_name": "x\n"}, "shm_name"),  # "$" matched before the newline
    ({"cpu_bytes": 1, "shm_name": "a" * 129}, "shm_name"),
    ({"cpu_bytes": 1, 7: 1}, "7"),  # a non-string key next to string keys
    ({"cpu_bytes": 1, 10**5000: 1}, "an integer of 16610 bits"),
    ({"cpu_bytes": 1, "backend_options": {10**5000: 1}}, "backend_options"),
]


@pytest.mark.parametrize(("raw", "key"), HOSTILE, ids=[f"{k}-{i}" for i, (_, k) in enumerate(HOSTILE)])
def test_hostile_value_names_the_key(raw: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        OffloadConfig.from_dict(raw)
    assert info.value.key == key
    assert len(str(info.value)) < 1000, "the message must stay readable"


def test_byte_counts_parse_exactly() -> None:
    # No float rounding: 1.1 GiB is exactly 1.1 * 2**30 rounded down, and the cap is exact.
    assert parse_bytes("1.1GiB") == (11 * 2**30) // 10
    assert parse_bytes(2**60) == 2**60
    with pytest.raises(ConfigError, match="largest supported size"):
        parse_bytes(2**60 + 1)


def test_pool_larger_than_physical_memory_is_refused_at_start_up() -> None:
    # Before, the scheduler accepted it and the worker died later with ENOMEM.
    import torch

    from kv_offload.backends import BackendSpec
    from kv_offload.backends.host import HostBackend, physical_memory_bytes
    from kv_offload.geometry import KVGeometry

    memory = physical_memory_bytes()
    assert memory is not None and memory > 0
    geometry = KVGeometry(num_layers=2, num_kv_heads=2, head_size=64, block_size=16, dtype=torch.float16)
    fits = HostBackend(BackendSpec(capacity_bytes=memory // 4, geometry=geometry, world_size=2))
    assert fits.num_slots() == (memory // 4) // geometry.slot_bytes  # sized, nothing allocated
    for per_worker, workers in ((memory + 4096, 1), (memory // 2 + 4096, 2)):
        with pytest.raises(ConfigError, match="physical memory") as info:
            HostBackend(BackendSpec(capacity_bytes=per_worker, geometry=geometry, world_size=workers))
        assert info.value.key == "cpu_bytes"
    with pytest.raises(ConfigError, match="cannot hold one KV block") as info:
        HostBackend(BackendSpec(capacity_bytes=100, geometry=geometry))
    assert info.value.key == "cpu_bytes"


# -- the remote section ---------------------------------------------------------------------------
def test_remote_section_parses_and_never_shows_the_password(tmp_path: "os.PathLike[str]", monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    secret = tmp_path / "pass"  # type: ignore[operator]
    secret.write_text("s3cret-from-file\n")
    cfg = OffloadConfig.from_dict({"cpu_bytes": "1GiB", "remote": {
        "url": "rediss://kvo:s3cret-in-url@127.0.0.1:6380/0", "prefix": "prod:", "lookup_budget_ms": 20,
        "ttl_s": 3600, "password_file": str(secret)}})  # fmt: skip
    remote = cfg.remote
    assert remote is not None and remote.scheme == "rediss" and remote.prefix == "prod:"
    assert remote.password == "s3cret-from-file" and remote.options == {"ttl_s": 3600}
    assert remote.url_has_password and remote.shown_url == "rediss://***@127.0.0.1:6380/0"
    for text in (repr(cfg), repr(remote), str(cfg)):
        assert "s3cret" not in text
    monkeypatch.setenv("KVO_TEST_PW", "s3cret-from-env")
    cfg = OffloadConfig.from_dict({"cpu_bytes": "1GiB", "remote": {"url": "redis://h/0", "password_env": "KVO_TEST_PW"}})
    assert cfg.remote is not None and cfg.remote.password == "s3cret-from-env" and not cfg.remote.url_has_password
    assert os.environ["KVO_TEST_PW"] not in repr(cfg)


@pytest.mark.parametrize(
    ("remote", "key"),
    [
        ({}, "remote.url"),
        ({"url": "ftp://h"}, "remote.url"),
        ({"url": "redis://[::1"}, "remote.url"),
        ({"url": "redis://h", "ttl": 5}, "remote.ttl"),
        ({"url": "redis://h", "metadata_server": "P2PHANDSHAKE"}, "remote.metadata_server"),  # Mooncake's, not Redis's
        ({"url": "redis://h", "lookup_budget_ms": -1}, "remote.lookup_budget_ms"),
        ({"url": "redis://h", "timeout_ms": 0}, "remote.timeout_ms"),
        ({"url": "redis://h", "write": "yes"}, "remote.write"),
        ({"url": "redis://h", "prefix": "a b"}, "remote.prefix"),
        ({"url": "redis://h", "password_env": "KVO_SURELY_NOT_SET"}, "remote.password_env"),
        ({"url": "redis://h", "password_file": "/nonexistent/pw"}, "remote.password_file"),
        ({"url": "redis://h", "password_file": "/dev/null", "password_env": "X"}, "remote.password_file"),
        ({"url": "redis://h", "ttl_s": -5}, "remote.ttl_s"),
        ({"url": "redis://h", "tls_ca_file": "/nonexistent/ca.crt"}, "remote.tls_ca_file"),
        ("redis://h", "remote"),
    ],
)
def test_remote_section_errors_name_the_key(remote: object, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        OffloadConfig.from_dict({"cpu_bytes": "1GiB", "remote": remote})
    assert err.value.key == key, str(err.value)


def test_sync_load_max_bytes() -> None:
    assert OffloadConfig.from_dict({"cpu_bytes": "1GiB"}).sync_load_max_bytes == 0  # off by default
    assert OffloadConfig.from_dict({"cpu_bytes": "1GiB", "sync_load_max_bytes": 0}).sync_load_max_bytes == 0
    assert OffloadConfig.from_dict({"cpu_bytes": "1GiB", "sync_load_max_bytes": "8MiB"}).sync_load_max_bytes == 8 << 20
    for bad in (-1, "lots", True, [1]):
        with pytest.raises(ConfigError) as err:
            OffloadConfig.from_dict({"cpu_bytes": "1GiB", "sync_load_max_bytes": bad})
        assert err.value.key == "sync_load_max_bytes"
