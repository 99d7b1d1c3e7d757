# SPDX-License-Identifier: Apache-2.0
"""Property fuzz of the CPU attention entry points with hostile arguments (issue 15).

Each example builds a small valid call (random geometry, lengths, group size, ISA path, scale,
window, splits) of an entry point (``paged_decode_attention``, ``paged_prefill_attention`` and
the raw ``torch.ops.kv_offload`` ops), then applies one hostile mutation or none: a wrong shape,
dtype or stride, an out-of-range or negative block id, a negative or huge length (2**31,
2**32 + n, 2**62), a huge ``num_splits``, a non-finite scale, a huge window, a wrapping
``kv_layout`` entry. Each mutation says whether the call must now raise (a clean TypeError/
ValueError/IndexError/RuntimeError); otherwise the output must equal the plain-torch reference,
as for every unmutated call (one mutation accepts either). Each entry point gets 8 unmutated
examples and 3 per mutation.

Everything runs in one child interpreter (each example is printed before it runs), so a signal
fails the test and names the example instead of killing pytest. ``KV_OFFLOAD_FUZZ_EXAMPLES``
scales the example counts (default: about 190 in all, under 10 s on 2 cores).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from attention_cases import make_geometry, make_paged
from child_process import child_reports, run_child

CLEAN_ERRORS = (TypeError, ValueError, IndexError, RuntimeError)
HUGE_INTS = [2**31, 2**32 + 3, 2**62, -1, -(2**31), -(2**31) - 1]
HUGE_SPLITS = [1025, 2**31, 2**62, (2**64 + 2) // 18, -1]
BAD_SCALES = [math.nan, math.inf, -math.inf, 1e39, -1e39]
HUGE_WINDOWS = [2**31, 2**32 + 5, 2**62, 2**70]
# kv_layout values no 13-entry layout of a small cache can take (too wide, wrapping or negative).
BAD_LAYOUT_VALUES = [2**31, 2**32 + 16, 2**40, 2**61, 2**62, 2**63 - 1, -1, -(2**63)]


@dataclass
class Call:
    """One call of an entry point: ``kwargs`` as the mutations left them, and what must happen."""

    op: str  # "decode", "prefill", "decode_op", "prefill_op"
    kwargs: dict[str, Any]
    must_raise: bool = False
    may_raise: bool = False  # either outcome is right (e.g. a cache row one byte longer: misaligned for fp32)
    notes: list[str] = field(default_factory=list)


def _draw_base(data: Any, op: str) -> Call:
    from hypothesis import strategies as st

    from kv_offload.attention import available_isas
    from kv_offload.geometry import PageFormat

    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    fmt = data.draw(st.sampled_from([PageFormat.HND, PageFormat.NHD, PageFormat.CPU]))
    head = data.draw(st.sampled_from([16, 32, 64]))
    hkv = data.draw(st.integers(1, 2))
    bs = data.draw(st.sampled_from([4, 16]))
    g = make_geometry(dtype, fmt, head_size=head, num_kv_heads=hkv, block_size=bs, num_layers=1)
    prefill = op.startswith("prefill")
    lens = data.draw(st.lists(st.integers(0, 40), min_size=1, max_size=3))
    seed = data.draw(st.integers(0, 2**16))
    case = make_paged(g, lens, layer=0, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    hq = hkv * data.draw(st.integers(1, 3))
    qdtype = data.draw(st.sampled_from([torch.float32, dtype]))
    kw: dict[str, Any] = {"geometry": g, "kv_cache": case.cache, "block_table": case.table}
    if prefill:
        new = data.draw(st.lists(st.integers(0, 6), min_size=len(lens), max_size=len(lens)))
        t = sum(new)
        kw["query"] = torch.randn(t, hq, head, generator=gen).to(qdtype)
        kw["key"] = torch.randn(t, hkv, head, generator=gen).to(dtype)
        kw["value"] = torch.randn(t, hkv, g.v_head_size, generator=gen).to(dtype)
        kw["query_start_loc"] = torch.tensor([0] + list(torch.tensor(new).cumsum(0)), dtype=torch.int32)
        kw["prefix_lens"] = case.lens
    else:
        kw["query"] = torch.randn(len(lens), hq, head, generator=gen).to(qdtype)
        kw["context_lens"] = case.lens
        kw["num_splits"] = data.draw(st.integers(0, 8))
    kw["scale"] = data.draw(st.one_of(st.none(), st.floats(-4, 4, allow_nan=False)))
    kw["window"] = data.draw(st.one_of(st.none(), st.integers(1, 50)))
    kw["isa"] = data.draw(st.sampled_from(available_isas() + ["auto"]))
    return Call(op, kw)


# ---- mutations: each edits call.kwargs and says whether the call must now raise ------------------


def _used_entry(call: Call) -> tuple[int, int]:
    """(row, column) of a block-table entry the op reads (a length is raised to 1 if needed)."""
    lens = call.kwargs["prefix_lens" if call.op.startswith("prefill") else "context_lens"]
    b = int(torch.argmax(lens))
    if int(lens[b]) == 0:
        lens = lens.clone()
        lens[b] = 1
        call.kwargs["prefix_lens" if call.op.startswith("prefill") else "context_lens"] = lens
    return b, 0


def m_block_id(call: Call, data: Any) -> None:
    from hypothesis import strategies as st

    b, j = _used_entry(call)
    cache = call.kwargs["kv_cache"]
    bad = data.draw(st.sampled_from([cache.shape[0], cache.shape[0] + 7, -1, -(2**31)] + HUGE_INTS))
    fits = -(2**31) <= bad < 2**31  # int32 where it fits, so the ops reach the range check
    table = call.kwargs["block_table"].to(torch.int32 if fits else torch.int64)
    table[b, j] = bad
    call.kwargs["block_table"] = table
    call.must_raise = True


def m_length(call: Call, data: Any) -> None:
    from hypothesis import strategies as st

    name = "prefix_lens" if call.op.startswith("prefill") else "context_lens"
    too_long = call.kwargs["block_table"].shape[1] * call.kwargs["geometry"].block_size + 1
    bad = data.draw(st.sampled_from(HUGE_INTS + [too_long]))
    lens = call.kwargs[name].to(torch.int32 if -(2**31) <= bad < 2**31 else torch.int64)
    lens[data.draw(st.integers(0, lens.shape[0] - 1))] = bad
    call.kwargs[name] = lens
    call.must_raise = True


def m_scale(call: Call, data: Any) -> None:
    from hypothesis import strategies as st

    call.kwargs["scale"] = data.draw(st.sampled_from(BAD_SCALES))
    call.must_raise = True


def m_huge_window(call: Call, data: Any) -> None:
    from hypothesis import strategies as st

    w = data.draw(st.sampled_from(HUGE_WINDOWS))  # the same as no window
    call.kwargs["window"] = w
    call.may_raise = w >= 2**63 and call.op.endswith("_op")  # past the schema's int64


def m_bad_window(call: Call, data: Any) -> None:
    from hypothesis import strategies as st

    w = data.draw(st.sampled_from([0, -1, -(2**32), 2.5]))
    call.kwargs["window"] = w
    call.must_raise = not (w == 0 and call.op.endswith("_op"))  # the ops read 0 as "no window"


def m_splits(call: Call, data: Any) -> None:
    from hypothesis import strategies as st

    n = data.draw(st.sampled_from(HUGE_SPLITS + [1024]))
    call.kwargs["num_splits"] = n
    call.must_raise = n != 1024


def m_strided(call: Call, data: Any) -> None:
    from hypothesis import strategies as st

    names = ["query", "key", "value"] if call.op.startswith("prefill") else ["query"]
    name = data.draw(st.sampled_from(names))
    t = call.kwargs[name]
    wide = torch.zeros(t.shape[0], t.shape[1], 2 * t.shape[2], dtype=t.dtype)
    wide[..., ::2] = t
    # dim stride 2: the wrappers accept it (K/V made dim-contiguous); the ops refuse strided K/V.
    call.kwargs[name] = wide[..., ::2]
    # An empty K/V's strides are never used (torch gives empty slices arbitrary strides): accepted.
    call.must_raise = call.op == "prefill_op" and name != "query" and t.numel() > 0


def m_dtype(call: Call, data: Any) -> None:
    from hypothesis import strategies as st

    names = ["query", "block_table", "kv_cache"]
    names += ["key", "query_start_loc", "prefix_lens"] if call.op.startswith("prefill") else ["context_lens"]
    name = data.draw(st.sampled_from(names))
    to = data.draw(st.sampled_from([torch.float64, torch.int16, torch.bool, torch.float32, torch.int8]))
    if call.kwargs[name].dtype == to or (name == "query" and to == torch.float32):
        to = torch.float64
    call.kwargs[name] = call.kwargs[name].to(to)
    call.must_raise = True


def m_shape(call: Call, data: Any) -> None:
    from hypothesis import strategies as st

    names = ["query", "block_table", "kv_cache", "out"]
    names += ["key", "value", "query_start_loc", "prefix_lens"] if call.op.startswith("prefill") else ["context_lens"]
    name = data.draw(st.sampled_from(names))
    how = data.draw(st.sampled_from(["flatten", "unsqueeze", "grow_last", "grow_first"]))
    if name == "out":
        q = call.kwargs["query"]
        call.kwargs["out"] = torch.empty(q.shape[0], q.shape[1] + 1, call.kwargs["geometry"].v_head_size, dtype=q.dtype)
        call.must_raise = True
        return
    t = call.kwargs[name]
    if how == "flatten":
        t = t.reshape(-1)
    elif how == "unsqueeze":
        t = t.unsqueeze(0)
    elif how == "grow_last":
        t = torch.cat([t, t.narrow(-1, 0, min(1, t.shape[-1]))], -1) if t.shape[-1] else t.new_zeros(*t.shape[:-1], 1)
    else:
        t = torch.cat([t, t.narrow(0, 0, min(1, t.shape[0]))], 0) if t.shape[0] else t.new_zeros(1, *t.shape[1:])
    call.kwargs[name] = t
    # A block table with an extra column, or a cache with an extra block or byte, is still valid.
    call.must_raise = not ((name == "block_table" and how == "grow_last") or (name == "kv_cache" and how[:4] == "grow"))
    call.may_raise = name == "kv_cache" and how == "grow_last"  # rows of an odd byte count


def m_no_heads(call: Call, data: Any) -> None:
    # num_q_heads = 0 is a multiple of any num_kv_heads: an empty result (prefill divided by G once).
    call.kwargs["query"] = call.kwargs["query"][:, :0]
    if "out" in call.kwargs:
        call.kwargs["out"] = call.kwargs["out"][:, :0]


def m_cache_layout(call: Call, data: Any) -> None:
    from hypothesis import strategies as st

    cache = call.kwargs["kv_cache"]
    how = data.draw(st.sampled_from(["short_rows", "strided_rows", "not_cpu_dtype"]))
    if how == "short_rows":  # one element fewer per block than the page needs (slots may be padded)
        g = call.kwargs["geometry"]
        call.kwargs["kv_cache"] = cache[:, : g.page_offset(0) + g.page_bytes - g.element_size]
        call.must_raise = True
    elif how == "strided_rows":
        call.kwargs["kv_cache"] = torch.zeros(cache.shape[0], 2 * cache.shape[1], dtype=torch.uint8)[:, ::2]
        call.must_raise = True
    else:
        call.kwargs["kv_cache"] = cache.view(torch.int8)
        call.must_raise = True


def m_query_start_loc(call: Call, data: Any) -> None:
    from hypothesis import strategies as st

    qsl = call.kwargs["query_start_loc"].to(torch.int64)
    how = data.draw(st.sampled_from(["end", "start", "decreasing", "huge"]))
    if how == "end":
        qsl[-1] += 1
    elif how == "start":
        qsl[0] = -1
    elif how == "decreasing" and qsl.shape[0] > 2:
        qsl[1] = qsl[-1] + 1
    else:
        qsl[-1] += 2**32
    call.kwargs["query_start_loc"] = qsl
    call.must_raise = True


def m_layout(call: Call, data: Any) -> None:
    from hypothesis import strategies as st

    layout = list(call.kwargs["kv_layout"])
    entry, value = data.draw(st.integers(0, 12)), data.draw(st.sampled_from(BAD_LAYOUT_VALUES))
    layout[entry] = value
    call.kwargs["kv_layout"] = layout
    # The head strides (entries 6 and 10) of a cache with one KV head are never multiplied by
    # anything but 0: like torch, the op ignores the stride of an extent-1 dimension, so a huge
    # one there must give the reference output. Negative entries are refused everywhere.
    call.must_raise = not (entry in (6, 10) and layout[1] == 1 and value >= 0)
    call.notes.append(f"kv_layout[{entry}] = {value}")


def m_isa(call: Call, data: Any) -> None:
    call.kwargs["isa"] = "sse9"
    call.must_raise = True


COMMON: list[Callable[[Call, Any], None]] = [
    m_block_id, m_length, m_scale, m_huge_window, m_bad_window, m_strided, m_dtype, m_shape, m_no_heads,
    m_cache_layout, m_isa,
]  # fmt: skip
MUTATIONS: dict[str, list[Callable[[Call, Any], None]]] = {
    "decode": COMMON + [m_splits],
    "prefill": COMMON + [m_query_start_loc],
    "decode_op": COMMON + [m_splits, m_layout, m_layout],
    "prefill_op": COMMON + [m_query_start_loc, m_layout, m_layout],
}


# ---- running one call ----------------------------------------------------------------------------


def _as_op_args(call: Call) -> None:
    """Turn wrapper kwargs into the raw op's arguments (int32 tensors, layout list, out)."""
    from kv_offload.attention._ops import layout_list

    kw = call.kwargs
    g = kw["geometry"]
    kw["kv_layout"] = layout_list(g, 0)
    kw["scale"] = 1.0 / math.sqrt(g.head_size) if kw["scale"] is None else kw["scale"]
    kw["window"] = kw["window"] or 0
    q = kw["query"]
    kw["out"] = torch.empty(q.shape[0], q.shape[1], g.v_head_size, dtype=q.dtype)


def _invoke(call: Call) -> torch.Tensor:
    from kv_offload.attention import paged_decode_attention, paged_prefill_attention
    from kv_offload.attention._ops import ops

    kw = dict(call.kwargs)
    g = kw.pop("geometry")
    if call.op == "decode":
        return paged_decode_attention(
            kw["query"], kw["kv_cache"], kw["block_table"], kw["context_lens"], g, 0, scale=kw["scale"],
            window=kw["window"], num_splits=kw["num_splits"], isa=kw["isa"], out=kw.get("out"),
        )  # fmt: skip
    if call.op == "prefill":
        return paged_prefill_attention(
            kw["query"], kw["key"], kw["value"], kw["query_start_loc"], kw["kv_cache"], kw["block_table"],
            kw["prefix_lens"], g, 0, scale=kw["scale"], window=kw["window"], isa=kw["isa"], out=kw.get("out"),
        )  # fmt: skip
    if call.op == "decode_op":
        ops().paged_decode_attention(
            kw["out"], kw["query"], kw["kv_cache"], kw["block_table"], kw["context_lens"], kw["kv_layout"],
            g.dtype, kw["scale"], kw["window"], kw["num_splits"], kw["isa"],
        )  # fmt: skip
        return kw["out"]  # type: ignore[no-any-return]
    ops().paged_prefill_attention(
        kw["out"], kw["query"], kw["key"], kw["value"], kw["query_start_loc"], kw["kv_cache"], kw["block_table"],
        kw["prefix_lens"], kw["kv_layout"], g.dtype, kw["scale"], kw["window"], kw["isa"],
    )  # fmt: skip
    return kw["out"]  # type: ignore[no-any-return]


def _reference(call: Call) -> torch.Tensor:
    from kv_offload.attention.reference import decode_attention_ref, prefill_attention_ref

    kw = call.kwargs
    g = kw["geometry"]
    window = min(kw["window"], 2**62) if kw["window"] else None
    if call.op.startswith("decode"):
        return decode_attention_ref(kw["query"], kw["kv_cache"], kw["block_table"], kw["context_lens"], g, 0,
                                    scale=kw["scale"], window=window)  # fmt: skip
    return prefill_attention_ref(
        kw["query"], kw["key"], kw["value"], kw["query_start_loc"], kw["kv_cache"], kw["block_table"],
        kw["prefix_lens"], g, 0, scale=kw["scale"], window=window,
    )  # fmt: skip


def _assert_matches(out: torch.Tensor, ref: torch.Tensor) -> None:
    """fp32 output: the existing tests' tight bound; bf16/fp16: one unit in the last place of the
    output dtype (the kernels round their fp32 result once; the oracle reads the same KV bits)."""
    from attention_cases import assert_close_to_oracle

    assert out.shape == ref.shape, (tuple(out.shape), tuple(ref.shape))
    if out.numel() == 0:
        return
    if out.dtype == torch.float32:
        assert_close_to_oracle(out, ref, None)
        return
    err = (out.float() - ref).abs().max().item()
    bound = torch.finfo(out.dtype).eps * max(1.0, ref.abs().max().item()) + 2e-5
    assert err <= bound, f"max abs error {err} > {bound}"


def _describe(call: Call) -> str:
    parts = []
    for k, v in call.kwargs.items():
        if isinstance(v, torch.Tensor):
            small = v.numel() <= 8 and v.dtype != torch.uint8
            parts.append(f"{k}={v.tolist() if small else ''}{v.dtype}{tuple(v.shape)}/{v.stride()}")
        elif k == "geometry":
            parts.append(f"geometry={v.describe()}")
        else:
            parts.append(f"{k}={v!r}")
    return f"{call.op} must_raise={call.must_raise} " + " ".join(parts)


Mutation = Callable[[Call, Any], None] | None


def run_one(data: Any, op: str, mutation: Mutation) -> None:
    call = _draw_base(data, op)
    if op.endswith("_op"):
        _as_op_args(call)
    if mutation is not None:
        call.notes.append(mutation.__name__)
        mutation(call, data)
    print("CALL", ",".join(call.notes) or "valid", _describe(call), flush=True)
    try:
        out = _invoke(call)
    except CLEAN_ERRORS as e:
        assert call.must_raise or call.may_raise, f"valid call raised {type(e).__name__}: {e}"
        print("RAISED", type(e).__name__, str(e).split("\n")[0][:300], flush=True)
        return
    assert not call.must_raise, f"{call.notes} must raise but returned"
    _assert_matches(out, _reference(call))


def _fuzzer(op: str, mutation: Mutation) -> Callable[[Any], None]:
    def fuzz(data: Any) -> None:
        run_one(data, op, mutation)

    # Distinct names: derandomized runs are seeded from them.
    fuzz.__name__ = fuzz.__qualname__ = f"fuzz_{op}_{mutation.__name__ if mutation else 'valid'}"
    return fuzz


def fuzz_main(scale: float = 1.0) -> None:
    """Run the fuzz (in the child): every entry point x (no mutation, each mutation); about 200
    examples at scale 1 (8 valid calls and 3 per mutation for each entry point)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    for op, mutations in MUTATIONS.items():
        for mutation in [None, *dict.fromkeys(mutations)]:
            n = (8 if mutation is None else 3 * mutations.count(mutation)) * scale
            cfg = settings(
                max_examples=max(1, round(n)), deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck), print_blob=True,
            )  # fmt: skip
            given(st.data())(cfg(_fuzzer(op, mutation)))()
    print("FUZZ OK", flush=True)


def test_fuzz_attention_entry_points() -> None:
    scale = float(os.environ.get("KV_OFFLOAD_FUZZ_EXAMPLES", "1"))
    proc = run_child(f"""
        torch_threads = 2
        import torch
        torch.set_num_threads(torch_threads)
        from test_fuzz_attention import fuzz_main
        fuzz_main({scale})
    """, timeout=600)  # fmt: skip
    child_reports(proc)  # a clean exit, not a signal
    assert proc.stdout.rstrip().endswith("FUZZ OK"), proc.stdout[-3000:] + proc.stderr[-3000:]
