# SPDX-License-Identifier: Apache-2.0
"""The avx512bf16 path (bf16 prefill Q.K with vdpbf16ps, csrc/kernels/attn_bf16dot.h) against
the avx512 path on the same inputs.

bf16 prefill with bf16 Q takes the dot-product kernels there: its outputs must match the
avx512 path's to a bf16 rounding (the scores differ in their last fp32 bits only), which a
wrong pair interleave, a wrong token order in the staged K, or a missing or doubled scale
breaks by far. Everything else (decode, fp32/fp16 KV, fp32 Q, few rows) runs the avx512 code
and must give the same bits. Skipped where this build or CPU has no avx512bf16 path.
"""

from __future__ import annotations

import pytest
import torch
from attention_cases import make_geometry, make_paged

from kv_offload.attention import (
    auto_isa,
    available_isas,
    bf16_dot_rate,
    paged_decode_attention,
    paged_prefill_attention,
)
from kv_offload.attention._ops import layout_list, ops
from kv_offload.attention.reference import prefill_attention_ref
from kv_offload.geometry import PageFormat

ISAS = available_isas()
pytestmark = pytest.mark.skipif(
    "avx512bf16" not in ISAS, reason="no avx512bf16 path here (CPU without AVX512_BF16, or not compiled)"
)
BF16 = torch.bfloat16


def _prefill(
    isa: str,
    fmt: PageFormat,
    head_size: int,
    group: int,
    prefix: list[int],
    new: list[int],
    *,
    block_size: int = 16,
    window: int | None = None,
    in_cache: bool = False,
    q_dtype: torch.dtype = BF16,
    kv_dtype: torch.dtype = BF16,
    magnitude: float = 1.0,
    seed: int = 0,
) -> torch.Tensor:
    """One prefill call on `isa` (same inputs for the same arguments but `isa`)."""
    hkv = 2
    g = make_geometry(kv_dtype, fmt, head_size=head_size, num_kv_heads=hkv, block_size=block_size)
    cached = [p + n for p, n in zip(prefix, new)] if in_cache else prefix
    case = make_paged(g, cached, seed=seed)
    if magnitude != 1.0:
        case.cache.view(kv_dtype).mul_(magnitude)
    gen = torch.Generator().manual_seed(seed + 1)
    t = sum(new)
    q = (torch.randn(t, hkv * group, head_size, generator=gen) * magnitude).to(q_dtype)
    k = (torch.randn(t, hkv, head_size, generator=gen) * magnitude).to(kv_dtype)
    v = torch.randn(t, hkv, head_size, generator=gen).to(kv_dtype)
    qsl = torch.tensor([0] + torch.tensor(new).cumsum(0).tolist(), dtype=torch.int32)
    pre = torch.tensor(prefix, dtype=torch.int32)
    if not in_cache:
        return paged_prefill_attention(q, k, v, qsl, case.cache, case.table, pre, g, case.layer, isa=isa, window=window)
    out = torch.full_like(q, float("nan"))
    ops().paged_prefill_attention(
        out, q, k, v, qsl, case.cache, case.table, pre, layout_list(g, case.layer), kv_dtype, head_size**-0.5,
        window or 0, isa, True, True,
    )  # fmt: skip
    return out


def _assert_bf16_close(out: torch.Tensor, base: torch.Tensor) -> None:
    """Equal up to a flip of the last bf16 bit (2**-7 relative at most)."""
    assert out.dtype == base.dtype == BF16 and not out.isnan().any()
    torch.testing.assert_close(out.float(), base.float(), rtol=2**-7, atol=1e-4)


def test_avx512bf16_is_listed_first() -> None:
    assert ISAS[0] == "avx512bf16" and "avx512" in ISAS


def test_auto_takes_the_dot_path_only_where_it_pays() -> None:
    """``auto`` runs avx512bf16 where vdpbf16ps does clearly more products per second than the
    FMAs it replaces (>= 1.25x, kMinBf16DotRate in cpu_attn.h; Zen 4/5: about 2x), else avx512
    (Emerald Rapids: 0.5x, where the dot path made bf16 prefill 1.2x slower). The two paths' bf16 prefills differ in their last
    bits, so the output of ``auto`` shows which one ran."""
    rate = bf16_dot_rate()
    assert 0.05 < rate < 20, rate  # measured on this CPU, not a placeholder
    assert bf16_dot_rate() == rate  # measured once per process
    chosen = "avx512bf16" if rate >= 1.25 else "avx512"
    other = "avx512" if chosen == "avx512bf16" else "avx512bf16"
    assert auto_isa() == chosen
    args = (PageFormat.CPU, 128, 4, [0], [300])
    kw = {"block_size": 128, "in_cache": True, "seed": 7}
    ran = _prefill("auto", *args, **kw)  # type: ignore[arg-type]
    assert not torch.equal(_prefill(other, *args, **kw), ran)  # type: ignore[arg-type]
    assert torch.equal(_prefill(chosen, *args, **kw), ran)  # type: ignore[arg-type]


# (fmt, head size, group, prefix, new, block size, window, new K/V in the cache)
CASES = [
    # vLLM's call: CPU pages, K^T dim-major, no prefix; 64-token chunks and a 44-token tail
    (PageFormat.CPU, 128, 4, [0], [300], 128, None, True),
    (PageFormat.CPU, 128, 8, [200], [77], 128, None, True),  # prefix, odd counts
    (PageFormat.CPU, 64, 1, [37, 0, 16], [51, 19, 9], 16, 9, False),  # dense new K (token-major)
    (PageFormat.CPU, 256, 4, [45], [33], 16, None, True),
    (PageFormat.HND, 256, 8, [45], [33], 16, None, False),  # token-major pages
    (PageFormat.HND, 128, 1, [130], [70], 64, 50, True),
    (PageFormat.NHD, 64, 8, [16], [40], 16, 20, True),  # token-major rows strided over heads
    (PageFormat.HND, 48, 4, [21], [35], 16, None, False),  # 24 pairs: the scalar staging fallback
    (PageFormat.CPU, 48, 4, [21], [35], 16, 7, True),
]


@pytest.mark.parametrize("fmt,head_size,group,prefix,new,block_size,window,in_cache", CASES)
def test_bf16_prefill_matches_avx512(
    fmt: PageFormat,
    head_size: int,
    group: int,
    prefix: list[int],
    new: list[int],
    block_size: int,
    window: int | None,
    in_cache: bool,
) -> None:
    args = (fmt, head_size, group, prefix, new)
    kw = {"block_size": block_size, "window": window, "in_cache": in_cache, "seed": head_size + group}
    _assert_bf16_close(_prefill("avx512bf16", *args, **kw), _prefill("avx512", *args, **kw))  # type: ignore[arg-type]


def test_bf16_prefill_non_contiguous_query_and_out() -> None:
    """Q rows with other token/head strides, and with dim stride 2 (Q pairs gathered element
    by element), give the same bits as contiguous Q; out strides do not matter either."""
    g = make_geometry(BF16, PageFormat.CPU, head_size=128, num_kv_heads=2, block_size=16)
    case = make_paged(g, [20, 5], seed=21)
    gen = torch.Generator().manual_seed(22)
    q = torch.randn(60, 8, 128, generator=gen).to(BF16)
    k, v = torch.randn(60, 2, 128, generator=gen).to(BF16), torch.randn(60, 2, 128, generator=gen).to(BF16)
    qsl, pre = torch.tensor([0, 37, 60], dtype=torch.int32), case.lens

    def run(query: torch.Tensor, out: torch.Tensor | None = None, isa: str = "avx512bf16") -> torch.Tensor:
        return paged_prefill_attention(query, k, v, qsl, case.cache, case.table, pre, g, case.layer, isa=isa, out=out)

    base = run(q)
    q_heads = q.transpose(0, 1).contiguous().transpose(0, 1)  # head-major, dim stride 1
    wide = torch.zeros(60, 8, 256, dtype=BF16)
    wide[..., ::2] = q
    out_s = torch.full((60, 8, 256), float("nan"), dtype=BF16)[..., 1::2]
    assert not q_heads.is_contiguous() and wide[..., ::2].stride(2) == 2
    assert torch.equal(run(q_heads), base)
    assert torch.equal(run(wide[..., ::2], out=out_s), base)
    _assert_bf16_close(base, run(q, isa="avx512"))


@pytest.mark.parametrize("magnitude", [1.0, 8.0, 30.0])
def test_bf16_prefill_close_to_oracle(magnitude: float) -> None:
    """Against the fp32 oracle, with Q, K and V scaled by `magnitude` (at 30, scores in the
    thousands: a peaked softmax, where the scale applied after the dot product, as the oracle
    does, instead of folded into Q matters most): no worse than the avx512 path. Both round
    the output to bf16, which dominates their errors; they differ in a few dozen outputs,
    which shows that the dot-product kernels ran (the inputs are seeded: no flakiness)."""
    g = make_geometry(BF16, PageFormat.CPU, head_size=128, num_kv_heads=2, block_size=128)
    case = make_paged(g, [70], seed=31)
    case.cache.view(BF16).mul_(magnitude)
    gen = torch.Generator().manual_seed(32)
    q, k, v = ((torch.randn(130, h, 128, generator=gen) * magnitude).to(BF16) for h in (8, 2, 2))
    qsl, pre = torch.tensor([0, 130], dtype=torch.int32), case.lens
    ref = prefill_attention_ref(q, k, v, qsl, case.cache, case.table, pre, g, case.layer)
    outs, errs = {}, {}
    for isa in ("avx512bf16", "avx512"):
        outs[isa] = paged_prefill_attention(q, k, v, qsl, case.cache, case.table, pre, g, case.layer, isa=isa)
        assert outs[isa].isfinite().all()
        errs[isa] = (outs[isa].float() - ref).abs().max().item()
    assert errs["avx512bf16"] <= 1.5 * errs["avx512"] + 1e-6, errs
    assert not torch.equal(outs["avx512bf16"], outs["avx512"])


@pytest.mark.parametrize(
    "q_dtype,kv_dtype,new",
    [
        (torch.float32, BF16, [40]),  # fp32 Q is not exact in bf16: the fp32 kernels
        (torch.float16, BF16, [40]),
        (BF16, torch.float16, [40]),
        (torch.float32, torch.float32, [40]),
        (BF16, BF16, [1]),  # 1 token x group 4 = 4 rows: K read in place (decode's kernels)
    ],
    ids=str,
)
def test_other_prefills_are_the_avx512_bits(q_dtype: torch.dtype, kv_dtype: torch.dtype, new: list[int]) -> None:
    kw = {"q_dtype": q_dtype, "kv_dtype": kv_dtype, "seed": 41}
    for fmt in (PageFormat.CPU, PageFormat.HND):
        out = _prefill("avx512bf16", fmt, 64, 4, [25], new, **kw)  # type: ignore[arg-type]
        assert torch.equal(out, _prefill("avx512", fmt, 64, 4, [25], new, **kw))  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", [PageFormat.CPU, PageFormat.HND], ids=lambda f: f.value)
def test_decode_is_the_avx512_bits(fmt: PageFormat) -> None:
    g = make_geometry(BF16, fmt, head_size=128, num_kv_heads=2, block_size=16)
    case = make_paged(g, [1, 17, 300], seed=51)
    q = torch.randn(3, 8, 128).to(BF16)
    outs = [paged_decode_attention(q, case.cache, case.table, case.lens, g, case.layer, isa=i) for i in ISAS[:2]]
    assert torch.equal(outs[0], outs[1])
