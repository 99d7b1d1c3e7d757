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


def _run_slots(block_size: int) -> list[int]:
    """Slot runs for every way a run of consecutive slots can start, stop or be cut."""
    bs = block_size
    return (
        list(range(bs + 5, 3 * bs - 7))  # starts mid-block, crosses two block boundaries, longer than 32
        + [5 * bs + 3, 5 * bs + 4, 5 * bs + 5, -1, 5 * bs + 6, 5 * bs + 7, 5 * bs + 8]  # cut by padding
        + [4 * bs + 2, 4 * bs + 1, 4 * bs]  # descending
        + [6 * bs + 1, 6 * bs + 3, 6 * bs + 5, 6 * bs + 6]  # same block, gaps
        + list(range(7 * bs, 8 * bs))  # one whole block (tiles of 8 / 16 tokens and the 32-token cap)
        + list(range(8 * bs + 1, 8 * bs + 12))  # not a multiple of any tile
        + [9 * bs - 1, 9 * bs]  # consecutive slots in two blocks
        + [-1, -1]
    )


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.value)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("src", ["qkv", "dim_strided"])
def test_runs_match_reference(fmt: PageFormat, dtype: torch.dtype, src: str) -> None:
    # Runs of consecutive slots take the tiled path for a transposed K (CPU format); head size
    # 160 is more than one 128-dim buffer fill.
    g = KVGeometry(num_layers=2, num_kv_heads=3, head_size=160, block_size=48, dtype=dtype, page_format=fmt,
                   head_size_v=32 if fmt is PageFormat.HND else None)  # fmt: skip
    slots = torch.tensor(_run_slots(g.block_size))
    tokens, num_blocks = len(slots), 10
    gen = torch.Generator().manual_seed(1)
    cache = torch.randint(0, 256, (num_blocks, g.block_bytes + 64), dtype=torch.uint8, generator=gen)[:, 64:]
    expected = cache.clone()
    h, d, dv = g.num_kv_heads, g.head_size, g.v_head_size
    if src == "qkv":  # token-strided views of one wider tensor, as vLLM passes them
        qkv = torch.randn(tokens, 2 * h * d + h * dv, generator=gen).to(dtype)
        k = qkv[:, h * d : 2 * h * d].view(tokens, h, d)
        v = qkv[:, 2 * h * d :].view(tokens, h, dv)
    else:  # dim stride != 1
        k = torch.randn(tokens, d, h, generator=gen).to(dtype).transpose(1, 2)
        v = torch.randn(tokens, dv, h, generator=gen).to(dtype).transpose(1, 2)
    k_before, v_before = k.clone(), v.clone()
    reshape_and_cache(k, v, cache, slots, g, 1)
    _reference(expected, k, v, slots, g, 1)
    assert torch.equal(cache, expected)
    assert torch.equal(k, k_before) and torch.equal(v, v_before)
    # every valid slot was written (the random cache bytes do not already hold the K/V)
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            kp, vp = page_views(cache, slot // g.block_size, g, 1)
            assert torch.equal(kp[:, slot % g.block_size], k[t]) and torch.equal(vp[:, slot % g.block_size], v[t])


def test_prefill_sized_write_matches_reference() -> None:
    # Hundreds of consecutive slots from a block start, as a prefill writes them (many threads' items).
    g = KVGeometry(num_layers=1, num_kv_heads=4, head_size=64, block_size=32, dtype=torch.bfloat16,
                   page_format=PageFormat.CPU)  # fmt: skip
    tokens = 700
    gen = torch.Generator().manual_seed(2)
    cache = torch.zeros(30, g.block_bytes, dtype=torch.uint8)
    expected = cache.clone()
    qkv = torch.randn(tokens, 12, 64, generator=gen).to(torch.bfloat16)
    k, v = qkv[:, 4:8], qkv[:, 8:12]
    slots = torch.arange(4 * g.block_size + 9, 4 * g.block_size + 9 + tokens)
    reshape_and_cache(k, v, cache, slots, g, 0)
    _reference(expected, k, v, slots, g, 0)
    assert torch.equal(cache, expected)
    assert not cache[:4].any() and cache[4:].any()


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
