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
