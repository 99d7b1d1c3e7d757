# SPDX-License-Identifier: Apache-2.0
"""``reshape_and_cache`` (C++) against a plain-torch write through the page views."""

from __future__ import annotations

import pytest
import torch

from kv_offload.attention._ops import layout_list, ops
from kv_offload.attention.cache_write import reshape_and_cache
from kv_offload.attention.reference import page_views
from kv_offload.geometry import KVGeometry, PageFormat

FORMATS = [PageFormat.HND, PageFormat.NHD, PageFormat.CPU]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _geometry(dtype: torch.dtype, fmt: PageFormat, head_size_v: int | None = None) -> KVGeometry:
    return KVGeometry(num_layers=3, num_kv_heads=2, head_size=32, block_size=16, dtype=dtype, page_format=fmt,
                      head_size_v=head_size_v)  # fmt: skip


def _reference(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, g: KVGeometry,
               layer: int) -> None:  # fmt: skip
    for t, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        kp, vp = page_views(cache, slot // g.block_size, g, layer)
        kp[:, slot % g.block_size] = k[t]
        vp[:, slot % g.block_size] = v[t]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.value)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(fmt: PageFormat, dtype: torch.dtype) -> None:
    g = _geometry(dtype, fmt, head_size_v=48 if fmt is PageFormat.HND else None)
    num_blocks, tokens = 6, 50
    gen = torch.Generator().manual_seed(0)
    cache = torch.randint(0, 256, (num_blocks, g.block_bytes + 64), dtype=torch.uint8, generator=gen)
    cache = cache[:, 64:]  # strided rows, non-zero base offset
    expected = cache.clone()
    # key is a strided view (as vLLM's qkv split hands it over); value is contiguous
    k = torch.randn(tokens, g.num_kv_heads * 2, g.head_size, generator=gen).to(dtype)[:, ::2]
    v = torch.randn(tokens, g.num_kv_heads, g.v_head_size, generator=gen).to(dtype)
    slots = torch.randperm(num_blocks * g.block_size, generator=gen)[:tokens]
    slots[::7] = -1  # padding tokens are skipped
    for layer in (0, 2):
        reshape_and_cache(k, v, cache, slots, g, layer)
        _reference(expected, k, v, slots, g, layer)
    assert torch.equal(cache, expected)


def test_slot_past_cache_writes_nothing() -> None:
    g = _geometry(torch.float32, PageFormat.CPU)
    cache = torch.zeros(2, g.block_bytes, dtype=torch.uint8)
    k = torch.ones(3, 2, 32)
    slots = torch.tensor([0, 1, 2 * g.block_size])
    with pytest.raises(RuntimeError, match="past the cache"):
        reshape_and_cache(k, k, cache, slots, g, 0)
    assert not cache.any()


def test_argument_errors() -> None:
    g = _geometry(torch.float32, PageFormat.CPU)
    cache = torch.zeros(2, g.block_bytes, dtype=torch.uint8)
    k = torch.ones(3, 2, 32)
    with pytest.raises(TypeError, match="KV dtype"):
        reshape_and_cache(k.half(), k, cache, torch.arange(3), g, 0)
    with pytest.raises(TypeError, match="int64"):
        reshape_and_cache(k, k, cache, torch.arange(3, dtype=torch.int32), g, 0)
    with pytest.raises(RuntimeError, match="key must be"):
        reshape_and_cache(torch.ones(3, 4, 32), k, cache, torch.arange(3), g, 0)
    with pytest.raises(RuntimeError, match="slot_mapping"):
        reshape_and_cache(k, k, cache, torch.arange(2), g, 0)


def test_opcheck() -> None:
    g = _geometry(torch.bfloat16, PageFormat.CPU)
    cache = torch.zeros(4, g.block_bytes, dtype=torch.uint8)
    k = torch.randn(5, 2, 32).to(torch.bfloat16)
    args = (cache, k, k.clone(), torch.arange(5) * 3, layout_list(g, 1), g.dtype)
    torch.library.opcheck(ops().reshape_and_cache.default, args)
