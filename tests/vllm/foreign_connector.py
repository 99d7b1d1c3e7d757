# SPDX-License-Identifier: Apache-2.0
"""A minimal vLLM KV connector that serves a prefix from a pool another engine wrote.

Test helper for ``test_foreign_blocks.py`` (loaded by module path). The pool is a shared
:class:`~kv_offload.pool.HostPool` whose header says what it holds (``{"geometry": ...}``:
page format, dtype, block size); ``<index>`` is a JSON file ``{"tokens": [...], "blocks":
[...]}``: the token ids the producer computed and its block ids (pool slots), in order.

Scheduler side: a request whose prompt starts with those tokens gets the full consumer
blocks of the common prefix as an external hit (synchronous load). Worker side:
``start_load_kv`` converts the producer's pages into vLLM's own cache with
:func:`kv_offload.attention.convert.convert_tokens` (format, dtype and block size), layer by
layer, before the forward. Nothing is saved.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from kv_offload.attention.convert import convert_tokens
from kv_offload.geometry import KVGeometry, PageFormat
from kv_offload.pool.host_pool import HostPool

STATS: Counter[str] = Counter()


@dataclass
class ForeignLoads(KVConnectorMetadata):  # type: ignore[misc]
    # (block ids of the request in vLLM's cache, first token, end token)
    loads: list[tuple[list[int], int, int]] = field(default_factory=list)


class ForeignPrefixConnector(KVConnectorBase_V1):  # type: ignore[misc]
    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        extra = vllm_config.kv_transfer_config.kv_connector_extra_config
        self.pool = HostPool.attach(extra["shm_name"], readonly=True)
        self.src = KVGeometry.from_description(self.pool.metadata["geometry"])
        with open(extra["index"]) as f:
            index = json.load(f)
        self.tokens: list[int] = index["tokens"]
        self.src_blocks: list[int] = index["blocks"]
        self.block_size = int(vllm_config.cache_config.block_size)
        self.is_scheduler = role == KVConnectorRole.SCHEDULER
        self._computed: dict[str, int] = {}
        self._loads: list[tuple[list[int], int, int]] = []
        self.kv_caches: dict[str, torch.Tensor] = {}

    # -- scheduler side --------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        prompt = list(request.prompt_token_ids)
        common = 0
        for a, b in zip(prompt, self.tokens):
            if a != b:
                break
            common += 1
        usable = (min(common, len(prompt) - 1) // self.block_size) * self.block_size
        if usable <= num_computed_tokens:
            return 0, False
        self._computed[request.request_id] = num_computed_tokens
        return usable - num_computed_tokens, False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        if num_external_tokens <= 0:
            return
        start = self._computed.pop(request.request_id, 0)
        self._loads.append((list(blocks.get_block_ids()[0]), start, start + num_external_tokens))
        STATS["scheduled_loads"] += 1

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        meta = ForeignLoads(loads=self._loads)
        self._loads = []
        return meta

    # -- worker side -----------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.kv_caches = dict(kv_caches)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, ForeignLoads):
            return
        names = sorted(self.kv_caches, key=lambda n: int(n.split("layers.")[1].split(".")[0]))
        for block_ids, start, stop in meta.loads:
            for layer, name in enumerate(names):
                cache = self.kv_caches[name]
                num_blocks, heads, block_size, width = cache.shape
                dst = KVGeometry(num_layers=1, num_kv_heads=heads, head_size=width // 2, block_size=block_size,
                                 dtype=cache.dtype, page_format=PageFormat.CPU)  # fmt: skip
                convert_tokens(self.pool.tensor, self.src, layer, self.src_blocks,
                               cache.view(num_blocks, -1).view(torch.uint8), dst, 0, block_ids, start, stop)  # fmt: skip
            STATS["loaded_tokens"] += stop - start

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return None

    def wait_for_save(self) -> None:
        return None
