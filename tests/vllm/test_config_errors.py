# SPDX-License-Identifier: Apache-2.0
"""Every invalid connector config stops vLLM's start-up with an error naming the key."""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

import pytest
from conftest import connector_config, make_llm

pytestmark = pytest.mark.vllm

CASES: list[tuple[str, dict[str, Any]]] = [
    ("cpu_byte", {"cpu_byte": "1GiB"}),  # unknown key (typo)
    ("cpu_bytes", {}),  # required key missing
    ("cpu_bytes", {"cpu_bytes": "lots"}),
    ("cpu_bytes", {"cpu_bytes": 1000}),  # smaller than one KV block
    ("eviction_policy", {"cpu_bytes": "64MiB", "eviction_policy": "most-recent"}),
    ("backend", {"cpu_bytes": "64MiB", "backend": "tape"}),
    ("backend_options", {"cpu_bytes": "64MiB", "backend_options": {"compression": True}}),
    ("store_threshold", {"cpu_bytes": "64MiB", "store_threshold": -1}),
    ("transfer_threads", {"cpu_bytes": "64MiB", "transfer_threads": 0}),
    ("pin_memory", {"cpu_bytes": "64MiB", "pin_memory": "yes"}),
    ("numa_node", {"cpu_bytes": "64MiB", "numa_node": -1}),
    ("shm_name", {"cpu_bytes": "64MiB", "shm_name": "../etc"}),
    ("min_load_tokens", {"cpu_bytes": "64MiB", "min_load_tokens": "128"}),
]


@pytest.mark.parametrize(("key", "extra"), CASES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(CASES)])
def test_bad_config_stops_start_up(tiny_model: Path, key: str, extra: dict[str, Any]) -> None:
    from vllm.config import KVTransferConfig

    cfg = connector_config(cpu_bytes="64MiB")
    cfg = KVTransferConfig(
        kv_connector=cfg.kv_connector, kv_connector_module_path=cfg.kv_connector_module_path,
        kv_role="kv_both", kv_connector_extra_config=extra,
    )  # fmt: skip
    with pytest.raises(Exception) as info:
        llm = make_llm(tiny_model, cfg)
        del llm
    text = "".join(traceback.format_exception(info.value))
    assert f"kv_offload config key {key!r}" in text, text[-2000:]
