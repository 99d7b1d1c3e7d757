# SPDX-License-Identifier: Apache-2.0
"""Chunked-prefill attention (cached prefix in blocks + causal new tokens) against the oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attention_cases import PagedCase, assert_close_to_oracle, make_geometry, make_paged
from kv_offload.attention import available_isas, paged_prefill_attention
from kv_offload.attention.reference import gather_tokens, prefill_attention_ref
from kv_offload.geometry import PageFormat

ISAS = available_isas()
BS = 16
PREFIX = [0, BS, BS + 1, 40, 7]
NEW = [5, 1, 0, 33, 20]


def _new_tokens(case: PagedCase, hq: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    g = case.geometry
    t = sum(NEW)
    q = torch.randn(t, hq, g.head_size, generator=gen).to(dtype)
    k = torch.randn(t, g.num_kv_heads, g.head_size, generator=gen).to(g.dtype)
    v = torch.randn(t, g.num_kv_heads, g.v_head_size, generator=gen).to(g.dtype)
    qsl = torch.tensor([0] + list(torch.tensor(NEW).cumsum(0)), dtype=torch.int32)
    return q, k, v, qsl


def _torch_lowp_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qsl: torch.Tensor, case: PagedCase, window: int | None
) -> torch.Tensor:
    g = case.geometry
    out = torch.zeros(q.shape[0], q.shape[1], g.v_head_size, dtype=q.dtype)
    for b, pre in enumerate(PREFIX):
        lo, hi = int(qsl[b]), int(qsl[b + 1])
        if lo == hi:
            continue
        kc, vc = gather_tokens(case.cache, case.table[b].tolist(), pre, g, case.layer)
        kk = torch.cat([kc.to(q.dtype), k[lo:hi].transpose(0, 1)], 1)
        vv = torch.cat([vc.to(q.dtype), v[lo:hi].transpose(0, 1)], 1)
        qpos = pre + torch.arange(hi - lo)
        kpos = torch.arange(pre + hi - lo)
        mask = kpos[None] <= qpos[:, None]
        if window:
            mask &= kpos[None] > qpos[:, None] - window
        o = F.scaled_dot_product_attention(
            q[lo:hi].transpose(0, 1).unsqueeze(0), kk.unsqueeze(0), vv.unsqueeze(0), attn_mask=mask, enable_gqa=True
        )
        out[lo:hi] = o[0].transpose(0, 1)
    return out


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", [PageFormat.HND, PageFormat.CPU], ids=lambda f: f.value)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("window", [None, 9])
def test_prefill_matches_oracle(isa: str, fmt: PageFormat, dtype: torch.dtype, window: int | None) -> None:
    g = make_geometry(dtype, fmt, head_size=64, num_kv_heads=2, block_size=BS)
    case = make_paged(g, PREFIX, seed=1)
    q, k, v, qsl = _new_tokens(case, 8, dtype, seed=2)
    pre = torch.tensor(PREFIX, dtype=torch.int32)
    out = paged_prefill_attention(q, k, v, qsl, case.cache, case.table, pre, g, case.layer, isa=isa, window=window)
    ref = prefill_attention_ref(q, k, v, qsl, case.cache, case.table, pre, g, case.layer, window=window)
    assert_close_to_oracle(out, ref, _torch_lowp_prefill(q, k, v, qsl, case, window))


@pytest.mark.parametrize("head_size,group", [(128, 4), (256, 1), (48, 8)])
def test_prefill_head_sizes_non_contiguous(head_size: int, group: int) -> None:
    g = make_geometry(torch.float32, PageFormat.NHD, head_size=head_size, num_kv_heads=2, block_size=BS)
    case = make_paged(g, PREFIX, seed=4)
    q, k, v, qsl = _new_tokens(case, 2 * group, torch.float32, seed=5)
    q_nc = q.transpose(0, 1).contiguous().transpose(0, 1)  # same values, head-major strides
    k_nc = k.transpose(0, 1).contiguous().transpose(0, 1)
    assert not q_nc.is_contiguous() and not k_nc.is_contiguous()
    pre = torch.tensor(PREFIX, dtype=torch.int32)
    out = paged_prefill_attention(q_nc, k_nc, v, qsl, case.cache, case.table, pre, g, case.layer)
    ref = prefill_attention_ref(q, k, v, qsl, case.cache, case.table, pre, g, case.layer)
    assert_close_to_oracle(out, ref, None)


def test_prefill_long_chunk_without_prefix_is_causal_attention() -> None:
    """No cached prefix: plain causal attention, checked against SDPA(is_causal=True) in fp32."""
    g = make_geometry(torch.float32, head_size=64, num_kv_heads=2, block_size=BS)
    case = make_paged(g, [0], seed=6)
    t = 300
    q, k, v = torch.randn(t, 8, 64), torch.randn(t, 2, 64), torch.randn(t, 2, 64)
    qsl = torch.tensor([0, t], dtype=torch.int32)
    out = paged_prefill_attention(q, k, v, qsl, case.cache, case.table, torch.zeros(1, dtype=torch.int32), g)
    sdpa = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], is_causal=True, enable_gqa=True
    )[0].transpose(0, 1)
    torch.testing.assert_close(out, sdpa, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", [PageFormat.HND, PageFormat.CPU], ids=lambda f: f.value)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("window", [None, 9])
def test_prefill_new_kv_in_cache_equals_dense(isa: str, fmt: PageFormat, dtype: torch.dtype, window: int | None) -> None:
    """``new_kv_in_cache=True`` (the vLLM backend's call: the step's K/V already written to the
    pages) reads the new tokens from the blocks: close to the oracle and to passing them dense
    (chunk boundaries differ, so the summation order does too); key/value are then not read."""
    from kv_offload.attention._ops import layout_list, ops

    g = make_geometry(dtype, fmt, head_size=64, num_kv_heads=2, block_size=BS)
    case = make_paged(g, [p + n for p, n in zip(PREFIX, NEW)], seed=7)
    q, _, _, qsl = _new_tokens(case, 8, dtype, seed=8)
    ks, vs = [], []
    for b, (p, n) in enumerate(zip(PREFIX, NEW)):
        kb, vb = gather_tokens(case.cache, case.table[b].tolist(), p + n, g, case.layer)
        ks.append(kb[:, p:].transpose(0, 1))
        vs.append(vb[:, p:].transpose(0, 1))
    k, v = torch.cat(ks).to(dtype).contiguous(), torch.cat(vs).to(dtype).contiguous()
    pre = torch.tensor(PREFIX, dtype=torch.int32)
    dense = paged_prefill_attention(q, k, v, qsl, case.cache, case.table, pre, g, case.layer, isa=isa, window=window)
    out = torch.full_like(dense, float("nan"))
    scale = g.head_size**-0.5
    ops().paged_prefill_attention(
        out, q, torch.zeros_like(k), torch.zeros_like(v), qsl, case.cache, case.table, pre,
        layout_list(g, case.layer), dtype, scale, window or 0, isa, True, True,
    )  # fmt: skip
    assert not out.isnan().any()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), dense.float(), atol=tol, rtol=tol)
    ref = prefill_attention_ref(q, k, v, qsl, case.cache, case.table, pre, g, case.layer, window=window)
    assert_close_to_oracle(out, ref, _torch_lowp_prefill(q, k, v, qsl, case, window))
    bad = case.table.clone()
    bad[3, (PREFIX[3] + NEW[3] - 1) // BS] = case.cache.shape[0]  # a new token's block out of range
    with pytest.raises(RuntimeError, match="out of range"):
        ops().paged_prefill_attention(
            out, q, k, v, qsl, case.cache, bad, pre, layout_list(g, case.layer), dtype, scale, 0, isa, True, True
        )


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_prefill_query_and_out_dim_strides(isa: str, dtype: torch.dtype) -> None:
    """Query and out rows with dim stride 1 are converted W lanes at a time, other strides
    element by element: both give the same bits (GQA 4, prefixes, odd lengths, CPU pages)."""
    g = make_geometry(dtype, PageFormat.CPU, head_size=64, num_kv_heads=2, block_size=BS)
    case = make_paged(g, PREFIX, seed=12)
    q, k, v, qsl = _new_tokens(case, 8, dtype, seed=13)
    pre = torch.tensor(PREFIX, dtype=torch.int32)
    out = paged_prefill_attention(q, k, v, qsl, case.cache, case.table, pre, g, case.layer, isa=isa)
    q_wide = torch.zeros(*q.shape[:2], 2 * g.head_size, dtype=dtype)
    q_wide[..., ::2] = q
    q_s = q_wide[..., ::2]  # dim stride 2
    out_s = torch.full((*q.shape[:2], 2 * g.head_size), float("nan"), dtype=dtype)[..., 1::2]
    assert q_s.stride(2) == 2 and out_s.stride(2) == 2
    paged_prefill_attention(q_s, k, v, qsl, case.cache, case.table, pre, g, case.layer, isa=isa, out=out_s)
    assert torch.equal(out_s, out)
    ref = prefill_attention_ref(q, k, v, qsl, case.cache, case.table, pre, g, case.layer)
    assert_close_to_oracle(out, ref, _torch_lowp_prefill(q, k, v, qsl, case, None))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("scale", [0.125, 8.0, 40.0])
def test_prefill_peaked_softmax(isa: str, scale: float) -> None:
    """Large scores (scale up to 40: logits spread over hundreds, most exp2 arguments below
    the -125 cut to exact 0, the running max rising chunk after chunk). The fp32 rounding of
    the scaled scores dominates the error there (1e-4 at scale 8 on every path), so each path
    is held to the scalar path's error, whose exp2 is libm's: the SIMD exp2 polynomials and
    the skipped rescales add nothing visible."""
    g = make_geometry(torch.float32, PageFormat.CPU, head_size=64, num_kv_heads=2, block_size=BS)
    case = make_paged(g, PREFIX, seed=14)
    q, k, v, qsl = _new_tokens(case, 8, torch.float32, seed=15)
    pre = torch.tensor(PREFIX, dtype=torch.int32)
    ref = prefill_attention_ref(q, k, v, qsl, case.cache, case.table, pre, g, case.layer, scale=scale)
    errs = {}
    for path in (isa, "scalar"):
        out = paged_prefill_attention(q, k, v, qsl, case.cache, case.table, pre, g, case.layer, isa=path, scale=scale)
        assert out.isfinite().all()
        errs[path] = (out - ref).abs().max().item()
    assert errs[isa] <= 1.25 * errs["scalar"] + 1e-6, errs
