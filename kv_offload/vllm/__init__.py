# SPDX-License-Identifier: Apache-2.0
"""kv-offload for vLLM: ``KVOffloadConnector``, loaded by module path.

    --kv-transfer-config '{"kv_connector": "KVOffloadConnector",
      "kv_connector_module_path": "kv_offload.vllm", "kv_role": "kv_both",
      "kv_connector_extra_config": {"cpu_bytes": "4GiB"}}'

The connector class is imported on first access, so the vLLM-free parts of this package
(``scheduler``, ``worker``, ``metadata``) can be used and tested without vLLM installed.
"""

from __future__ import annotations

from typing import Any

__all__ = ["KVOffloadConnector"]


def __getattr__(name: str) -> Any:
    if name == "KVOffloadConnector":
        from kv_offload.vllm.connector import KVOffloadConnector

        return KVOffloadConnector
    raise AttributeError(f"module 'kv_offload.vllm' has no attribute {name!r}")
