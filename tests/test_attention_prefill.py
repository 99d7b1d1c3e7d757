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
