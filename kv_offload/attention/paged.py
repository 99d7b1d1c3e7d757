# SPDX-License-Identifier: Apache-2.0
"""Paged decode and prefill attention over KV blocks laid out as :mod:`kv_offload.geometry` says.

Both functions read K and V in place from ``kv_cache``, a ``uint8 [num_blocks, block_bytes]``
tensor whose row ``i`` is block ``i`` (a :class:`~kv_offload.pool.HostPool`'s ``tensor``, whose
rows are pool slots, or any cache with that shape), for one ``layer`` of ``geometry``. Query
heads are grouped as in GQA: query head ``j`` uses KV head ``j // (num_q_heads // num_kv_heads)``.
Accumulation is fp32 whatever the dtypes; the output has the query's dtype.
"""

from __future__ import annotations

import math
import numbers
import operator

import torch

from kv_offload.attention._ops import MAX_SPLITS, layout_list, ops, resolve_isa
from kv_offload.geometry import KVGeometry

__all__ = ["paged_decode_attention", "paged_prefill_attention"]

_QUERY_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _tensor(t: object, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _int32(t: torch.Tensor, name: str, lo: int = _INT32_MIN) -> torch.Tensor:
    """``t`` as contiguous int32; int64 values are checked to lie in ``[lo, 2**31)`` first, so the
    cast never wraps (int32 input is passed as is: the op checks lengths and the ids it reads)."""
    t = _tensor(t, name)
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
    if t.dtype == torch.int64 and t.numel():
        low, high = int(t.min()), int(t.max())
        if low < lo or high > _INT32_MAX:
            bad = low if low < lo else high
            raise ValueError(f"{name} holds {bad}, outside [{lo}, {_INT32_MAX}]")
    return t.to(torch.int32).contiguous()


def _lengths(t: torch.Tensor, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    t = _int32(t, name, lo=0)
    if t.shape != shape:
        raise ValueError(f"{name} must be {list(shape)}, got {tuple(t.shape)}")
    return t


def _block_table(t: torch.Tensor, rows: int) -> torch.Tensor:
    # Ids outside int32 are refused here; the op checks every id it reads against num_blocks.
    t = _int32(t, "block_table")
    if t.dim() != 2 or t.shape[0] != rows:
        raise ValueError(f"block_table must be [{rows}, max_blocks], got {tuple(t.shape)}")
    return t


def _int_arg(value: object, name: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got a bool")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None


def _scale(scale: float | None, head_size: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_size)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a float, got {type(scale).__name__}")
    value = float(scale)
    if not math.isfinite(value) or abs(value) > _FLOAT32_MAX:
        raise ValueError(f"scale must be a finite float32 value, got {scale}")
    return value


def _num_splits(num_splits: int) -> int:
    n = _int_arg(num_splits, "num_splits")
    if not 0 <= n <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in [0, {MAX_SPLITS}] (0: automatic), got {n}")
    return n


def _check_common(query: torch.Tensor, kv_cache: torch.Tensor, geometry: KVGeometry) -> None:
    _tensor(query, "query")
    _tensor(kv_cache, "kv_cache")
    if not isinstance(geometry, KVGeometry):
        raise TypeError(f"geometry must be a KVGeometry, got {type(geometry).__name__}")
    if query.dtype not in _QUERY_DTYPES:
        raise TypeError(f"query dtype {query.dtype} is not supported; expected float32, bfloat16 or float16")
    if query.dim() != 3:
        raise ValueError(f"query must be 3-D [tokens, num_q_heads, head_size], got {tuple(query.shape)}")
    if query.shape[2] != geometry.head_size:
        raise ValueError(f"query head size {query.shape[2]} != geometry head size {geometry.head_size}")
    if query.shape[1] % geometry.num_kv_heads:
        raise ValueError(f"num_q_heads {query.shape[1]} is not a multiple of num_kv_heads {geometry.num_kv_heads}")
    if kv_cache.dtype != torch.uint8 or kv_cache.dim() != 2:
        raise TypeError(f"kv_cache must be uint8 [num_blocks, block_bytes], got {kv_cache.dtype} {tuple(kv_cache.shape)}")


def _window(window: int | None) -> int:
    if window is None:
        return 0
    w = _int_arg(window, "window")
    if w <= 0:
        raise ValueError(f"window must be a positive number of tokens (or None), got {w}")
    # Positions stay below 2**33 (int32 lengths), so any wider window means "no window"; the
    # clamp keeps the value inside the op's int64.
    return min(w, 2**62)


def paged_decode_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    context_lens: torch.Tensor,
    geometry: KVGeometry,
    layer: int = 0,
    *,
    scale: float | None = None,
    window: int | None = None,
    num_splits: int = 0,
    isa: str | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one new query token per sequence over its cached blocks.

    Args:
        query: ``[num_seqs, num_q_heads, head_size]``, float32/bfloat16/float16, any strides.
        kv_cache: ``uint8 [num_blocks, block_bytes]``, block ``i`` in row ``i`` (e.g. ``pool.tensor``).
        block_table: int32/int64 ``[num_seqs, max_blocks]``; row ``b`` lists sequence ``b``'s
            block ids (pool slots) in token order. Only the first ``ceil(context_lens[b] /
            block_size)`` entries are read; each must be in ``[0, num_blocks)``.
        context_lens: int32/int64 ``[num_seqs]``: cached tokens per sequence, the query's own
            token included (the query sits at position ``context_lens[b] - 1``). A sequence
            of length 0 gets a zero output.
        geometry: the KV geometry the blocks were written with (dtype float32/bfloat16/float16).
        layer: which layer's page to read.
        scale: softmax scale, finite (within float32's range); default ``1 / sqrt(head_size)``.
        window: sliding window: attend to the last ``window`` positions only (``None``: all).
        num_splits: split each sequence's context into this many parts, computed in parallel
            and merged (flash-decoding); 0 picks a count from the thread count. At most
            ``MAX_SPLITS`` (1024); more parts than the longest sequence has blocks are not used.
        isa: force a kernel path (``"avx2"``, ``"scalar"``...); default: ``KV_OFFLOAD_CPU_ATTN_ISA``
            or ``"auto"`` (the path :func:`~kv_offload.attention.auto_isa` names).
        out: optional ``[num_seqs, num_q_heads, head_size_v]`` output of the query's dtype.

    Returns:
        ``[num_seqs, num_q_heads, head_size_v]`` in the query's dtype.

    Raises:
        TypeError: an argument of the wrong type or dtype (float ids or lengths included).
        ValueError: a bad shape, or a value out of range (an id or length outside int32, a
            negative length, a non-finite scale, ``num_splits`` past the cap...).
        RuntimeError: from the op: a block id read outside ``[0, num_blocks)``, a context
            longer than its block table row, a cache too small for the geometry...
    """
    _check_common(query, kv_cache, geometry)
    num_seqs, hq = query.shape[0], query.shape[1]
    lens = _lengths(context_lens, "context_lens", (num_seqs,))
    table = _block_table(block_table, num_seqs)
    if out is None:
        out = torch.empty((num_seqs, hq, geometry.v_head_size), dtype=query.dtype)
    ops().paged_decode_attention(
        out, query, kv_cache, table, lens, layout_list(geometry, layer), geometry.dtype,
        _scale(scale, geometry.head_size), _window(window), _num_splits(num_splits), resolve_isa(isa),
    )  # fmt: skip
    return out


def paged_prefill_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_start_loc: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    prefix_lens: torch.Tensor,
    geometry: KVGeometry,
    layer: int = 0,
    *,
    scale: float | None = None,
    window: int | None = None,
    isa: str | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Chunked prefill: new tokens attend to their sequence's cached prefix and causally to each other.

    Sequence ``b`` has ``prefix_lens[b]`` tokens cached in blocks (``block_table`` row ``b``)
    and the new tokens ``query_start_loc[b] : query_start_loc[b+1]`` of the packed ``query``,
    ``key`` and ``value``. New token ``i`` of a sequence sits at position ``prefix_lens[b] + i``
    and attends to every cached token and to new tokens ``0..i`` (within ``window``). The new
    tokens' K/V are passed dense (they need not be in the cache yet; writing them to the
    cache stays the caller's job).

    Args:
        query: ``[num_tokens, num_q_heads, head_size]`` float32/bfloat16/float16, any strides.
        key: ``[num_tokens, num_kv_heads, head_size]`` in the KV dtype (made dim-contiguous if not).
        value: ``[num_tokens, num_kv_heads, head_size_v]`` in the KV dtype.
        query_start_loc: int32/int64 ``[num_seqs + 1]``, from 0 to ``num_tokens``, non-decreasing.
        kv_cache, block_table, geometry, layer, scale, window, isa: as in
            :func:`paged_decode_attention`.
        prefix_lens: int32/int64 ``[num_seqs]`` cached tokens per sequence (may be 0).
        out: optional ``[num_tokens, num_q_heads, head_size_v]`` of the query's dtype.

    Returns:
        ``[num_tokens, num_q_heads, head_size_v]`` in the query's dtype.
    """
    _check_common(query, kv_cache, geometry)
    for name, t in (("key", key), ("value", value)):
        if _tensor(t, name).dtype != geometry.dtype:
            raise TypeError(f"{name} dtype {t.dtype} must equal the KV dtype {geometry.dtype}")
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-D [num_tokens, num_kv_heads, head_size], got {tuple(t.shape)}")
    key = key if key.stride(-1) == 1 else key.contiguous()
    value = value if value.stride(-1) == 1 else value.contiguous()
    qsl = _int32(query_start_loc, "query_start_loc", lo=0)
    if qsl.dim() != 1 or qsl.shape[0] < 1:
        raise ValueError(f"query_start_loc must be [num_seqs + 1], got {tuple(qsl.shape)}")
    num_seqs = qsl.shape[0] - 1
    pre = _lengths(prefix_lens, "prefix_lens", (num_seqs,))
    table = _block_table(block_table, num_seqs)
    if out is None:
        out = torch.empty((query.shape[0], query.shape[1], geometry.v_head_size), dtype=query.dtype)
    ops().paged_prefill_attention(
        out, query, key, value, qsl, kv_cache, table, pre, layout_list(geometry, layer), geometry.dtype,
        _scale(scale, geometry.head_size), _window(window), resolve_isa(isa),
    )  # fmt: skip
    return out
