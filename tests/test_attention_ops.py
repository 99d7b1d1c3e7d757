# SPDX-License-Identifier: Apache-2.0
"""The torch ops themselves: schemas/fake kernels (opcheck), ISA forcing, argument errors."""

from __future__ import annotations

import os

import pytest
import torch

from attention_cases import make_geometry, make_paged
from kv_offload.attention import (
    ISA_ENV,
    auto_isa,
    available_isas,
    bf16_dot_rate,
    paged_decode_attention,
    paged_prefill_attention,
)
from kv_offload.attention._ops import layout_list, ops
from kv_offload.geometry import KVGeometry, PageFormat


def test_available_isas_end_with_scalar() -> None:
    isas = available_isas()
    assert isas[-1] == "scalar"
    assert len(set(isas)) == len(isas)


def test_opcheck_decode() -> None:
    g = make_geometry(torch.bfloat16, head_size=64)
    case = make_paged(g, [5, 20])
    q = torch.randn(2, 4, 64).to(torch.bfloat16)
    out = torch.empty(2, 4, 64, dtype=torch.bfloat16)
    args = (out, q, case.cache, case.table, case.lens, layout_list(g, case.layer), g.dtype, 0.125, 0, 0, "auto")
    torch.library.opcheck(ops().paged_decode_attention.default, args)


def test_opcheck_prefill() -> None:
    g = make_geometry(torch.float32, head_size=64)
    case = make_paged(g, [5, 20])
    q, k, v = torch.randn(7, 4, 64), torch.randn(7, 2, 64), torch.randn(7, 2, 64)
    qsl = torch.tensor([0, 3, 7], dtype=torch.int32)
    out = torch.empty(7, 4, 64)
    args = (out, q, k, v, qsl, case.cache, case.table, case.lens, layout_list(g, case.layer), g.dtype, 0.125, 0, "auto")
    torch.library.opcheck(ops().paged_prefill_attention.default, args)


def test_env_var_forces_the_path(monkeypatch: pytest.MonkeyPatch) -> None:
    g = make_geometry(torch.float32, head_size=64)
    case = make_paged(g, [30])
    q = torch.randn(1, 4, 64)
    explicit = paged_decode_attention(q, case.cache, case.table, case.lens, g, case.layer, isa="scalar")
    monkeypatch.setenv(ISA_ENV, "scalar")
    forced = paged_decode_attention(q, case.cache, case.table, case.lens, g, case.layer)
    assert torch.equal(explicit, forced)
    monkeypatch.setenv(ISA_ENV, "sse9")
    with pytest.raises(ValueError, match="KV_OFFLOAD_CPU_ATTN_ISA"):
        paged_decode_attention(q, case.cache, case.table, case.lens, g, case.layer)


def test_auto_isa_is_a_usable_path() -> None:
    """``auto`` takes one of the listed paths; the dot-product rate is measured only where the
    avx512bf16 path exists (test_attention_bf16dot.py checks the choice between the two)."""
    assert auto_isa() in available_isas()
    if "avx512bf16" not in available_isas():
        assert bf16_dot_rate() == 0.0
        assert auto_isa() == available_isas()[0]


def test_unsupported_isa_is_a_clear_error() -> None:
    missing = [i for i in ("avx512bf16", "avx512", "avx2", "neon") if i not in available_isas()]
    if not missing:
        pytest.skip("every path is supported here")
    g = make_geometry(torch.float32, head_size=64)
    case = make_paged(g, [3])
    with pytest.raises(RuntimeError, match=f"ISA path '{missing[0]}'"):
        paged_decode_attention(torch.randn(1, 4, 64), case.cache, case.table, case.lens, g, case.layer, isa=missing[0])


def _case() -> tuple[KVGeometry, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = make_geometry(torch.float32, head_size=64)
    case = make_paged(g, [20, 3])
    return g, case.cache, case.table, case.lens


def test_block_id_out_of_range() -> None:
    g, cache, table, lens = _case()
    table = table.clone()
    table[0, 1] = cache.shape[0]
    with pytest.raises(RuntimeError, match=r"block id \d+ \(sequence 0, block 1\) out of range"):
        paged_decode_attention(torch.randn(2, 4, 64), cache, table, lens, g, 1)


def test_context_longer_than_block_table() -> None:
    g, cache, table, lens = _case()
    with pytest.raises(RuntimeError, match="needs 3 blocks"):
        paged_decode_attention(torch.randn(2, 4, 64), cache, table, torch.tensor([40, 3]), g, 1)


def test_bad_query_dtype_and_shapes() -> None:
    g, cache, table, lens = _case()
    with pytest.raises(TypeError, match="query dtype torch.int32"):
        paged_decode_attention(torch.zeros(2, 4, 64, dtype=torch.int32), cache, table, lens, g, 1)
    with pytest.raises(ValueError, match="query head size 32"):
        paged_decode_attention(torch.randn(2, 4, 32), cache, table, lens, g, 1)
    with pytest.raises(ValueError, match="not a multiple of num_kv_heads"):
        paged_decode_attention(torch.randn(2, 3, 64), cache, table, lens, g, 1)
    with pytest.raises(IndexError, match="layer 2 out of range"):
        paged_decode_attention(torch.randn(2, 4, 64), cache, table, lens, g, 2)


def test_unsupported_head_size_and_kv_dtype() -> None:
    g = KVGeometry(num_layers=1, num_kv_heads=1, head_size=40, block_size=16, dtype=torch.float32)
    cache = torch.zeros(2, g.slot_bytes, dtype=torch.uint8)
    one = torch.ones(1, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="head size 40 is not supported"):
        paged_decode_attention(torch.randn(1, 1, 40), cache, one, torch.ones(1, dtype=torch.int32), g)
    g8 = KVGeometry(num_layers=1, num_kv_heads=1, head_size=64, block_size=16, dtype=torch.float8_e4m3fn)
    cache8 = torch.zeros(2, g8.slot_bytes, dtype=torch.uint8)
    with pytest.raises(ValueError, match="KV dtype torch.float8_e4m3fn is not supported"):
        paged_decode_attention(torch.randn(1, 1, 64), cache8, one, torch.ones(1, dtype=torch.int32), g8)


def test_cache_too_small_for_geometry() -> None:
    g = make_geometry(torch.float32, PageFormat.HND, head_size=64)
    cache = torch.zeros(4, g.page_bytes, dtype=torch.uint8)  # one page per block, layer 1 does not fit
    one = torch.zeros(1, 1, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="kv_layout reads .* bytes of each block"):
        paged_decode_attention(torch.randn(1, 4, 64), cache, one, torch.ones(1, dtype=torch.int32), g, 1)


def test_prefill_bad_query_start_loc_and_kv_dtype() -> None:
    g, cache, table, lens = _case()
    q, k, v = torch.randn(5, 4, 64), torch.randn(5, 2, 64), torch.randn(5, 2, 64)
    with pytest.raises(RuntimeError, match="query_start_loc must start at 0 and end at num_tokens=5"):
        paged_prefill_attention(q, k, v, torch.tensor([0, 2, 4]), cache, table, lens, g, 1)
    with pytest.raises(TypeError, match="key dtype torch.bfloat16 must equal the KV dtype"):
        paged_prefill_attention(q, k.bfloat16(), v, torch.tensor([0, 2, 5]), cache, table, lens, g, 1)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="needs Linux CPU affinity")
def test_pin_threads_to_numa_node() -> None:
    from kv_offload.attention import pin_threads_to_numa_node
    from kv_offload.pool.numa import node_cpus, numa_nodes

    before = os.sched_getaffinity(0)
    node = numa_nodes()[0]
    try:
        pinned = pin_threads_to_numa_node(node)
        assert pinned >= 1
        assert os.sched_getaffinity(0) == set(node_cpus(node))
    finally:
        os.sched_setaffinity(0, before)
