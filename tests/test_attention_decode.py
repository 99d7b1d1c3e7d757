# SPDX-License-Identifier: Apache-2.0
"""Paged decode attention against the plain-torch oracle, on every ISA path this CPU supports."""

from __future__ import annotations

import pytest
import torch

from attention_cases import assert_close_to_oracle, make_geometry, make_paged, torch_lowp_decode
from kv_offload.attention import available_isas, paged_decode_attention
from kv_offload.attention.reference import decode_attention_ref
from kv_offload.geometry import PageFormat

ISAS = available_isas()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FORMATS = [PageFormat.HND, PageFormat.NHD, PageFormat.CPU]
BS = 16
# 1 token, block boundary -1/0/+1, exactly one block, two blocks, a long ragged one.
RAGGED = [1, BS - 1, BS, BS + 1, 2 * BS, 33, 300]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.value)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_dtypes_formats(isa: str, fmt: PageFormat, dtype: torch.dtype) -> None:
    g = make_geometry(dtype, fmt, head_size=64, num_kv_heads=2, block_size=BS)
    case = make_paged(g, RAGGED)
    q = torch.randn(len(RAGGED), 8, 64).to(dtype)
    out = paged_decode_attention(q, case.cache, case.table, case.lens, g, case.layer, isa=isa)
    assert out.dtype == dtype and out.shape == (len(RAGGED), 8, 64)
    ref = decode_attention_ref(q, case.cache, case.table, case.lens, g, case.layer)
    assert_close_to_oracle(out, ref, torch_lowp_decode(q, case))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("head_size", [16, 48, 64, 128, 256])
@pytest.mark.parametrize("group", [1, 3, 5, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_decode_head_sizes_and_gqa(isa: str, head_size: int, group: int, dtype: torch.dtype) -> None:
    # Groups of 3 and 5 leave partial row tiles; 17 and 70 tokens leave partial token tiles
    # (the Q.K kernels take tokens 2 or 3 at a time and rows 4 at a time).
    g = make_geometry(dtype, PageFormat.HND, head_size=head_size, num_kv_heads=2, block_size=BS)
    lens = [1, 17, 70]
    case = make_paged(g, lens, seed=head_size + group)
    q = torch.randn(len(lens), 2 * group, head_size).to(dtype)
    out = paged_decode_attention(q, case.cache, case.table, case.lens, g, case.layer, isa=isa, scale=0.3)
    ref = decode_attention_ref(q, case.cache, case.table, case.lens, g, case.layer, scale=0.3)
    lowp = None if dtype == torch.float32 else torch_lowp_decode(q, case, scale=0.3)
    assert_close_to_oracle(out, ref, lowp)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.value)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("block_size", [128, 256])
@pytest.mark.parametrize("window", [None, 200])
def test_decode_whole_block_chunks(
    isa: str, fmt: PageFormat, dtype: torch.dtype, block_size: int, window: int | None
) -> None:
    # Decode reads K/V in place in chunks of up to 128 tokens: a whole 128-token block, half of
    # a 256-token one. Lengths at and around 128 and 256, a window edge inside a chunk, groups
    # of 4 (one row tile) and 3 (a partial one), a query that is a strided view.
    g = make_geometry(dtype, fmt, head_size=64, num_kv_heads=2, block_size=block_size, num_layers=1)
    lens = [1, 127, 128, 129, 255, 256, 257, 700]
    case = make_paged(g, lens, layer=0, seed=block_size)
    for group in (4, 3):
        q = torch.randn(len(lens), 2 * group, 2, 64).to(dtype)[:, :, 1]
        out = paged_decode_attention(q, case.cache, case.table, case.lens, g, 0, isa=isa, window=window)
        ref = decode_attention_ref(q, case.cache, case.table, case.lens, g, 0, window=window)
        assert_close_to_oracle(out, ref, torch_lowp_decode(q, case, window=window))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("num_splits", [0, 1, 3, 7])
@pytest.mark.parametrize("window", [None, 100])
def test_decode_long_context_splits_and_window(dtype: torch.dtype, num_splits: int, window: int | None) -> None:
    g = make_geometry(dtype, PageFormat.HND, head_size=128, num_kv_heads=2, block_size=64, num_layers=1)
    lens = [3000, 4097, 5, 64]
    case = make_paged(g, lens, layer=0, seed=7)
    q = torch.randn(len(lens), 8, 128).to(dtype)
    out = paged_decode_attention(q, case.cache, case.table, case.lens, g, 0, num_splits=num_splits, window=window)
    ref = decode_attention_ref(q, case.cache, case.table, case.lens, g, 0, window=window)
    assert_close_to_oracle(out, ref, torch_lowp_decode(q, case, window=window))


@pytest.mark.parametrize("isa", ISAS)
def test_decode_latent_format(isa: str) -> None:
    g = make_geometry(torch.bfloat16, PageFormat.LATENT, head_size=64, block_size=BS)
    case = make_paged(g, RAGGED, seed=3)
    q = torch.randn(len(RAGGED), 4, 64).to(torch.bfloat16)
    out = paged_decode_attention(q, case.cache, case.table, case.lens, g, case.layer, isa=isa)
    ref = decode_attention_ref(q, case.cache, case.table, case.lens, g, case.layer)
    assert_close_to_oracle(out, ref, torch_lowp_decode(q, case))


@pytest.mark.parametrize("isa", ISAS)
def test_decode_non_contiguous_query_and_out(isa: str) -> None:
    g = make_geometry(torch.float32, PageFormat.CPU, head_size=64, block_size=BS)
    lens = [5, 40]
    case = make_paged(g, lens, seed=11)
    base = torch.randn(8, len(lens), 3, 64)
    q = base[:, :, 1].transpose(0, 1)  # [2, 8, 64], strides (64*3, 2*3*64, 1)
    assert not q.is_contiguous()
    out_base = torch.full((len(lens), 64, 8), float("nan"))
    out = out_base.transpose(1, 2)  # [2, 8, 64] non-contiguous
    paged_decode_attention(q, case.cache, case.table, case.lens, g, case.layer, isa=isa, out=out)
    ref = decode_attention_ref(q, case.cache, case.table, case.lens, g, case.layer)
    assert_close_to_oracle(out, ref, None)


def test_decode_empty_batch_and_empty_sequence() -> None:
    g = make_geometry(torch.float32, head_size=64)
    case = make_paged(g, [0, 3], seed=5)
    q = torch.randn(2, 4, 64)
    out = paged_decode_attention(q, case.cache, case.table, case.lens, g, case.layer)
    assert torch.equal(out[0], torch.zeros(4, 64))
    assert torch.isfinite(out[1]).all()
    empty = paged_decode_attention(
        torch.empty(0, 4, 64), case.cache, torch.empty(0, 1, dtype=torch.int32), torch.empty(0, dtype=torch.int32), g
    )
    assert empty.shape == (0, 4, 64)


@pytest.mark.skipif(len(ISAS) < 2, reason="only one ISA path on this CPU")
def test_isa_paths_agree() -> None:
    g = make_geometry(torch.bfloat16, head_size=128, block_size=BS)
    case = make_paged(g, RAGGED, seed=9)
    q = torch.randn(len(RAGGED), 8, 128).to(torch.bfloat16)
    outs = [paged_decode_attention(q, case.cache, case.table, case.lens, g, case.layer, isa=i).float() for i in ISAS]
    for other in outs[1:]:
        # Same fp32 math up to summation order and exp rounding; outputs are bf16-rounded.
        torch.testing.assert_close(other, outs[0], atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("q_dtype,kv_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16)], ids=str)
def test_decode_query_and_kv_dtypes_may_differ(q_dtype: torch.dtype, kv_dtype: torch.dtype) -> None:
    g = make_geometry(kv_dtype, PageFormat.HND, head_size=64, block_size=BS)
    case = make_paged(g, RAGGED, seed=13)
    q = torch.randn(len(RAGGED), 8, 64).to(q_dtype)
    out = paged_decode_attention(q, case.cache, case.table, case.lens, g, case.layer)
    assert out.dtype == q_dtype
    ref = decode_attention_ref(q, case.cache, case.table, case.lens, g, case.layer)
    assert_close_to_oracle(out, ref, torch_lowp_decode(q, case) if q_dtype != torch.float32 else None)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_decode_query_and_out_dim_strides(isa: str, dtype: torch.dtype) -> None:
    """Dim stride 1 (W lanes at a time) and dim stride 2 (element by element) give the same bits."""
    g = make_geometry(dtype, PageFormat.CPU, head_size=64, block_size=BS)
    lens = [5, 40, 17]
    case = make_paged(g, lens, seed=12)
    q = torch.randn(len(lens), 8, 64).to(dtype)
    out = paged_decode_attention(q, case.cache, case.table, case.lens, g, case.layer, isa=isa)
    q_wide = torch.zeros(len(lens), 8, 128, dtype=dtype)
    q_wide[..., 1::2] = q
    out_s = torch.full((len(lens), 8, 128), float("nan"), dtype=dtype)[..., ::2]
    paged_decode_attention(q_wide[..., 1::2], case.cache, case.table, case.lens, g, case.layer, isa=isa, out=out_s)
    assert torch.equal(out_s, out)
    ref = decode_attention_ref(q, case.cache, case.table, case.lens, g, case.layer)
    assert_close_to_oracle(out, ref, torch_lowp_decode(q, case))
