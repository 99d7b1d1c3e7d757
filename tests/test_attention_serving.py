# SPDX-License-Identifier: Apache-2.0
"""Serving attention in place from a pool: slots, block hashes, the published index, the example."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from attention_cases import make_geometry
from kv_offload.attention import BlockIndex, PoolAttention
from kv_offload.attention.reference import decode_attention_ref, prefill_attention_ref, write_tokens
from kv_offload.pool import HostPool, PoolSpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _filled_pool(lens: list[int]) -> tuple[PoolAttention, list[list[int]]]:
    g = make_geometry(torch.bfloat16, head_size=64, block_size=16)
    pool = HostPool(PoolSpec(capacity_bytes=64 * g.slot_bytes, slot_bytes=g.slot_bytes, metadata={"geometry": g.describe()}))
    gen = torch.Generator().manual_seed(0)
    slots = torch.randperm(pool.num_slots, generator=gen).tolist()
    blocks, pos = [], 0
    for n in lens:
        nb = -(-n // 16)
        blocks.append(slots[pos : pos + nb])
        pos += nb
        for layer in range(g.num_layers):
            k = torch.randn(2, n, 64, generator=gen).bfloat16()
            write_tokens(pool.tensor, blocks[-1], k, torch.randn(2, n, 64, generator=gen).bfloat16(), g, layer)
    return PoolAttention(pool), blocks


def test_decode_by_slots_and_by_hashes(tmp_path: "os.PathLike[str]") -> None:
    lens = [40, 16, 1]
    attn, blocks = _filled_pool(lens)
    hashes = [[f"s{i}b{j}".encode() for j in range(len(b))] for i, b in enumerate(blocks)]
    index = BlockIndex.from_mapping({h: s for hs, bs in zip(hashes, blocks) for h, s in zip(hs, bs)})
    path = os.path.join(tmp_path, "index.json")
    index.save(path)
    loaded = BlockIndex.load(path)
    assert loaded == index
    q = torch.randn(3, 4, 64).bfloat16()
    by_slot = attn.decode(q, blocks, lens, layer=1)
    by_hash = attn.decode_by_hashes(q, hashes, lens, loaded, layer=1)
    assert torch.equal(by_slot, by_hash)
    table = torch.zeros(3, 3, dtype=torch.int32)
    for i, b in enumerate(blocks):
        table[i, : len(b)] = torch.tensor(b)
    ref = decode_attention_ref(q, attn.pool.tensor, table, torch.tensor(lens), attn.geometry, 1)
    assert (by_slot.float() - ref).abs().max().item() < 2e-2
    with pytest.raises(KeyError, match="hash 6e6f7065"):
        attn.decode_by_hashes(q, [[b"nope"]], [1, 1, 1], loaded)
    attn.close()


def test_prefill_through_pool_attention() -> None:
    lens = [20, 33]
    attn, blocks = _filled_pool(lens)
    q, k, v = torch.randn(5, 4, 64).bfloat16(), torch.randn(5, 2, 64).bfloat16(), torch.randn(5, 2, 64).bfloat16()
    out = attn.prefill(q, k, v, [0, 2, 5], blocks, lens, layer=0)
    table = torch.zeros(2, 3, dtype=torch.int32)
    for i, b in enumerate(blocks):
        table[i, : len(b)] = torch.tensor(b)
    ref = prefill_attention_ref(q, k, v, torch.tensor([0, 2, 5]), attn.pool.tensor, table, torch.tensor(lens),
                                attn.geometry, 0)
    assert (out.float() - ref).abs().max().item() < 2e-2
    attn.close()


def test_pool_without_geometry_needs_one() -> None:
    pool = HostPool(PoolSpec(capacity_bytes=8192, slot_bytes=4096))
    with pytest.raises(ValueError, match="no 'geometry'"):
        PoolAttention(pool)
    pool.close()


@pytest.mark.parametrize("args", [[], ["--dtype", "float32", "--format", "CPU", "--seqs", "2", "--ctx", "129"]])
def test_example_serves_from_a_shared_pool_in_another_process(args: list[str]) -> None:
    script = os.path.join(ROOT, "examples", "serve_attention_from_shared_pool.py")
    res = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "max |kernel - oracle|" in res.stdout and res.stdout.strip().endswith("OK")
