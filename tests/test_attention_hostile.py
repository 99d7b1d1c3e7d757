# SPDX-License-Identifier: Apache-2.0
"""Hostile inputs to the CPU attention entry points (issue 15): each gives a clear error, never a
wrapped size, a narrowed value read as another, or a signal.

Inputs that used to crash the process run in a child interpreter (:func:`run_child`), so a
regression fails one test instead of killing pytest.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from child_process import child_reports, run_child
from attention_cases import make_geometry, make_paged
from kv_offload.attention import PoolAttention, paged_decode_attention, paged_prefill_attention
from kv_offload.attention._ops import layout_list, ops
from kv_offload.attention.reference import decode_attention_ref, prefill_attention_ref
from kv_offload.geometry import PageFormat
from kv_offload.pool import HostPool, PoolSpec

def assert_raised(line: str, exc: str, pattern: str) -> None:
    assert line.startswith(f"RAISED {exc} "), line
    assert re.search(pattern, line), f"{pattern!r} not in {line!r}"


# ---- item 1: num_splits ------------------------------------------------------------------------

HUGE_SPLITS = (2**64 + 2) // 18  # x (Dv + 2 = 18) wraps the workspace size to 2 floats


def test_huge_num_splits_is_refused() -> None:
    proc = run_child(f"""
        import torch
        from attention_cases import make_geometry, make_paged
        from kv_offload.attention import paged_decode_attention
        from kv_offload.attention._ops import layout_list, ops
        from kv_offload.geometry import PageFormat
        g = make_geometry(torch.float32, PageFormat.HND, head_size=16, num_kv_heads=1, num_layers=1)
        case = make_paged(g, [40], layer=0)
        q = torch.randn(1, 1, 16)
        report(lambda: paged_decode_attention(q, case.cache, case.table, case.lens, g, 0, num_splits={HUGE_SPLITS}))
        out = torch.empty(1, 1, 16)
        report(lambda: ops().paged_decode_attention(out, q, case.cache, case.table, case.lens,
               layout_list(g, 0), g.dtype, 0.25, 0, {HUGE_SPLITS}, "auto"))
    """)
    wrapper, op = child_reports(proc)
    assert_raised(wrapper, "ValueError", r"num_splits must be in \[0, 1024\]")
    assert_raised(op, "RuntimeError", r"num_splits must be in \[0, 1024\]")


def test_num_splits_at_the_cap_and_wrong_types() -> None:
    g = make_geometry(torch.float32, PageFormat.HND, head_size=16, num_kv_heads=1, num_layers=1)
    case = make_paged(g, [40, 3], layer=0)
    q = torch.randn(2, 2, 16)
    out = paged_decode_attention(q, case.cache, case.table, case.lens, g, 0, num_splits=1024)
    ref = decode_attention_ref(q, case.cache, case.table, case.lens, g, 0)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    for bad, exc in ((1025, ValueError), (-1, ValueError), (2.0, TypeError), (True, TypeError)):
        with pytest.raises(exc, match="num_splits"):
            paged_decode_attention(q, case.cache, case.table, case.lens, g, 0, num_splits=bad)  # type: ignore[arg-type]


# ---- item 2: kv_layout extent overflow -----------------------------------------------------------

# (entry, value) overrides of a 4-KV-head fp32 HND layout, each wrapping or narrowing on main.
LAYOUT_OVERRIDES = [
    ((6, 2**61),),  # K head stride: 3 * 2**61 * 4 bytes wraps negative
    ((10, 2**61),),  # V head stride
    ((7, 2**62),),  # K token stride: 15 * 2**62 wraps
    ((0, 2**63 - 1),),  # page offset + extent wraps
    ((1, 2**32 + 4),),  # num_kv_heads narrowed to 4
    ((3, 2**32 + 16),),  # head size narrowed to 16
    ((8, -1),),  # negative K dim stride
]


def test_layout_overflow_is_refused() -> None:
    proc = run_child(f"""
        import torch
        from attention_cases import make_geometry, make_paged
        from kv_offload.attention._ops import layout_list, ops
        from kv_offload.geometry import PageFormat
        g = make_geometry(torch.float32, PageFormat.HND, head_size=16, num_kv_heads=4, num_layers=1)
        case = make_paged(g, [20], layer=0)
        q, out = torch.randn(1, 4, 16), torch.empty(1, 4, 16)
        for overrides in {LAYOUT_OVERRIDES!r}:
            layout = layout_list(g, 0)
            for i, v in overrides:
                layout[i] = v
            report(lambda: ops().paged_decode_attention(out, q, case.cache, case.table, case.lens, layout,
                   g.dtype, 0.25, 0, 1, "auto"))
    """)
    lines = child_reports(proc)
    assert len(lines) == len(LAYOUT_OVERRIDES)
    patterns = [
        r"kv_layout .*overflows int64", r"kv_layout .*overflows int64", r"kv_layout .*overflows int64",
        r"kv_layout page_offset_bytes \+ extent overflows int64", r"num_kv_heads must be in \[1, 2\^31\)",
        r"head size 4294967312 is not supported", r"kv_layout k_dim \(entry 8\) must be >= 0",
    ]  # fmt: skip
    for line, pattern in zip(lines, patterns):
        assert_raised(line, "RuntimeError", pattern)


# ---- item 7: no narrowing before the range checks ------------------------------------------------


def _eight_blocks() -> tuple[torch.Tensor, torch.Tensor]:
    g = make_geometry(torch.float32, PageFormat.HND, head_size=16, num_kv_heads=1, num_layers=1)
    case = make_paged(g, [16, 16, 16, 16, 16], layer=0)  # 5 + 3 spare = 8 blocks
    assert case.cache.shape[0] == 8
    return case.cache, torch.randn(1, 1, 16)


def test_block_id_past_int32_is_refused() -> None:
    g = make_geometry(torch.float32, PageFormat.HND, head_size=16, num_kv_heads=1, num_layers=1)
    cache, q = _eight_blocks()
    lens = torch.tensor([5])
    for bad in (2**32 + 3, 2**31, -(2**31) - 1):
        with pytest.raises(ValueError, match=rf"block_table holds {bad}, outside"):
            paged_decode_attention(q, cache, torch.tensor([[bad]]), lens, g, 0)
    with pytest.raises(RuntimeError, match=r"block id -1 \(sequence 0, block 0\) out of range \[0, 8\)"):
        paged_decode_attention(q, cache, torch.tensor([[-1]]), lens, g, 0)
    with pytest.raises(TypeError, match="block_table must be int32 or int64"):
        paged_decode_attention(q, cache, torch.tensor([[3.0]]), lens, g, 0)


def test_lengths_past_int32_are_refused() -> None:
    g = make_geometry(torch.float32, PageFormat.HND, head_size=16, num_kv_heads=1, num_layers=1)
    cache, q = _eight_blocks()
    table = torch.tensor([[3]])
    for bad in (2**32 + 5, 2**31, 2**62, -1):
        with pytest.raises(ValueError, match=rf"context_lens holds {bad}, outside \[0, 2147483647\]"):
            paged_decode_attention(q, cache, table, torch.tensor([bad]), g, 0)
    k, v = torch.randn(2, 1, 16), torch.randn(2, 1, 16)
    qq = torch.randn(2, 1, 16)
    for bad in (2**32 + 5, -3):
        with pytest.raises(ValueError, match=rf"prefix_lens holds {bad}, outside"):
            paged_prefill_attention(qq, k, v, torch.tensor([0, 2]), cache, table, torch.tensor([bad]), g, 0)
    with pytest.raises(ValueError, match=r"query_start_loc holds 4294967298, outside"):
        paged_prefill_attention(qq, k, v, torch.tensor([0, 2**32 + 2]), cache, table, torch.tensor([5]), g, 0)


def test_window_is_not_narrowed() -> None:
    # 2**32 + 5 is wider than any context: the same as no window (main read it as 5).
    g = make_geometry(torch.float32, PageFormat.HND, head_size=16, num_kv_heads=1, num_layers=1)
    case = make_paged(g, [40], layer=0)
    q = torch.randn(1, 2, 16)
    full = decode_attention_ref(q, case.cache, case.table, case.lens, g, 0)
    five = decode_attention_ref(q, case.cache, case.table, case.lens, g, 0, window=5)
    assert not torch.allclose(full, five, atol=1e-3)
    out = torch.empty(1, 2, 16)
    ops().paged_decode_attention(out, q, case.cache, case.table, case.lens, layout_list(g, 0), g.dtype,
                                 0.25, 2**32 + 5, 1, "auto")  # fmt: skip
    torch.testing.assert_close(out, full, atol=2e-5, rtol=2e-5)
    out = paged_decode_attention(q, case.cache, case.table, case.lens, g, 0, window=2**32 + 5)
    torch.testing.assert_close(out, full, atol=2e-5, rtol=2e-5)
    qq, k, v = torch.randn(3, 2, 16), torch.randn(3, 1, 16), torch.randn(3, 1, 16)
    qsl = torch.tensor([0, 3], dtype=torch.int32)
    ref = prefill_attention_ref(qq, k, v, qsl, case.cache, case.table, case.lens, g, 0)
    out = torch.empty(3, 2, 16)
    ops().paged_prefill_attention(out, qq, k, v, qsl, case.cache, case.table, case.lens, layout_list(g, 0),
                                  g.dtype, 0.25, 2**32 + 5, "auto")  # fmt: skip
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    for bad, exc in ((0, ValueError), (-(2**32), ValueError), (5.0, TypeError)):
        with pytest.raises(exc, match="window"):
            paged_decode_attention(q, case.cache, case.table, case.lens, g, 0, window=bad)  # type: ignore[arg-type]


def test_non_integer_ids_and_lengths_are_refused() -> None:
    g = make_geometry(torch.float32, head_size=16, num_kv_heads=1, block_size=16)
    pool = HostPool(PoolSpec(capacity_bytes=8 * g.slot_bytes, slot_bytes=g.slot_bytes))
    attn = PoolAttention(pool, g)
    try:
        q = torch.randn(1, 1, 16)
        with pytest.raises(TypeError, match=r"block_ids\[0\]\[0\] must be an int, got float 3.7"):
            attn.decode(q, [[3.7]], [5])  # type: ignore[list-item]
        with pytest.raises(TypeError, match=r"block_ids\[0\]\[0\] must be an int, got bool"):
            attn.decode(q, [[True]], [5])
        with pytest.raises(TypeError, match=r"context_lens\[0\] must be an int, got float"):
            attn.decode(q, [[3]], [5.5])  # type: ignore[list-item]
        with pytest.raises(ValueError, match="block_table holds 4294967299"):
            attn.decode(q, [[2**32 + 3]], [5])
        k, v = torch.randn(1, 1, 16), torch.randn(1, 1, 16)
        with pytest.raises(TypeError, match=r"prefix_lens\[0\] must be an int"):
            attn.prefill(q, k, v, [0, 1], [[3]], [2.0])  # type: ignore[list-item]
    finally:
        attn.close()


# ---- item 8: non-finite scale --------------------------------------------------------------------


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf, 1e39])
def test_non_finite_scale_is_refused(scale: float) -> None:
    g = make_geometry(torch.float32, PageFormat.HND, head_size=16, num_kv_heads=1, num_layers=1)
    case = make_paged(g, [20], layer=0)
    q = torch.randn(1, 1, 16)
    with pytest.raises(ValueError, match="scale must be a finite float32 value"):
        paged_decode_attention(q, case.cache, case.table, case.lens, g, 0, scale=scale)
    k, v = torch.randn(1, 1, 16), torch.randn(1, 1, 16)
    with pytest.raises(ValueError, match="scale must be a finite float32 value"):
        paged_prefill_attention(q, k, v, torch.tensor([0, 1]), case.cache, case.table, case.lens, g, 0, scale=scale)
    out = torch.empty(1, 1, 16)
    with pytest.raises(RuntimeError, match="scale must be a finite float32 value"):
        ops().paged_decode_attention(out, q, case.cache, case.table, case.lens, layout_list(g, 0), g.dtype,
                                     scale, 0, 0, "auto")  # fmt: skip
    with pytest.raises(RuntimeError, match="scale must be a finite float32 value"):
        ops().paged_prefill_attention(out, q, k, v, torch.tensor([0, 1], dtype=torch.int32), case.cache, case.table,
                                      case.lens, layout_list(g, 0), g.dtype, scale, 0, "auto")  # fmt: skip
    with pytest.raises(TypeError, match="scale must be a float"):
        paged_decode_attention(q, case.cache, case.table, case.lens, g, 0, scale="0.5")  # type: ignore[arg-type]


# ---- other size products: query heads per KV head ------------------------------------------------


def test_query_heads_per_kv_head_are_capped() -> None:
    # An expanded query costs no memory but would size the per-thread scratch at 2**20 rows.
    g = make_geometry(torch.float32, PageFormat.HND, head_size=16, num_kv_heads=1, num_layers=1)
    case = make_paged(g, [3], layer=0)
    q = torch.randn(1, 1, 16).expand(1, 2**20, 16)
    out = torch.empty(1, 1, 16).expand(1, 2**20, 16)
    with pytest.raises(RuntimeError, match="query heads per KV head is more than the supported 1024"):
        ops().paged_decode_attention(out, q, case.cache, case.table, case.lens, layout_list(g, 0), g.dtype,
                                     0.25, 0, 0, "auto")  # fmt: skip
