# SPDX-License-Identifier: Apache-2.0
"""Plain-torch reference implementations (the test oracle) and page views.

Deliberately simple: K and V are gathered from the blocks through ``torch.as_strided`` views
built from :meth:`KVGeometry.k_strides` / :meth:`KVGeometry.v_strides`, upcast to float32, and
attention is a masked softmax over explicit scores. Slow, but obviously right.
"""

from __future__ import annotations

import math

import torch

from kv_offload.geometry import KVGeometry

__all__ = ["page_views", "write_tokens", "gather_tokens", "decode_attention_ref", "prefill_attention_ref"]


def page_views(kv_cache: torch.Tensor, block: int, geometry: KVGeometry, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(K, V)`` views ``[num_kv_heads, block_size, head_size(_v)]`` into one block's page.

    Writable when ``kv_cache`` is; ``kv_cache`` is ``uint8 [num_blocks, block_bytes]``.
    """
    off = geometry.page_offset(layer)
    page = kv_cache[block, off : off + geometry.page_bytes].view(geometry.dtype)
    h, n = geometry.num_kv_heads, geometry.block_size
    k, v = geometry.k_strides(), geometry.v_strides()
    kv = torch.as_strided(page, (h, n, geometry.head_size), (k.head, k.token, k.dim), page.storage_offset() + k.offset)
    vv = torch.as_strided(page, (h, n, geometry.v_head_size), (v.head, v.token, v.dim), page.storage_offset() + v.offset)
    return kv, vv


def write_tokens(
    kv_cache: torch.Tensor, blocks: list[int], k: torch.Tensor, v: torch.Tensor, geometry: KVGeometry, layer: int
) -> None:
    """Write ``k [num_kv_heads, n, head_size]`` / ``v [.., head_size_v]`` as tokens ``0..n`` of a sequence."""
    n = k.shape[1]
    bs = geometry.block_size
    for j, block in enumerate(blocks):
        lo, hi = j * bs, min(n, (j + 1) * bs)
        if lo >= hi:
            break
        kp, vp = page_views(kv_cache, block, geometry, layer)
        kp[:, : hi - lo].copy_(k[:, lo:hi])
        if not geometry.is_latent:
            vp[:, : hi - lo].copy_(v[:, lo:hi])


def gather_tokens(
    kv_cache: torch.Tensor, blocks: list[int], n: int, geometry: KVGeometry, layer: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens ``0..n`` of a sequence as float32 ``(K [H, n, D], V [H, n, Dv])``."""
    h = geometry.num_kv_heads
    ks = [torch.empty(h, 0, geometry.head_size)]
    vs = [torch.empty(h, 0, geometry.v_head_size)]
    bs = geometry.block_size
    for j in range(-(-n // bs)):
        kp, vp = page_views(kv_cache, blocks[j], geometry, layer)
        take = min(bs, n - j * bs)
        ks.append(kp[:, :take].float())
        vs.append(vp[:, :take].float())
    return torch.cat(ks, 1), torch.cat(vs, 1)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float) -> torch.Tensor:
    """q ``[Hq, T, D]``, k/v ``[Hkv, S, D]``, visible bool ``[T, S]`` -> ``[Hq, T, Dv]`` (rows with nothing visible -> 0)."""
    group = q.shape[0] // k.shape[0]
    k = k.repeat_interleave(group, 0)
    v = v.repeat_interleave(group, 0)
    scores = torch.einsum("htd,hsd->hts", q, k) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    return torch.einsum("hts,hsd->htd", probs, v)


def decode_attention_ref(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    context_lens: torch.Tensor,
    geometry: KVGeometry,
    layer: int = 0,
    *,
    scale: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Float32 oracle of :func:`kv_offload.attention.paged_decode_attention` (same arguments)."""
    scale = 1.0 / math.sqrt(geometry.head_size) if scale is None else scale
    out = torch.zeros(query.shape[0], query.shape[1], geometry.v_head_size)
    for b in range(query.shape[0]):
        n = int(context_lens[b])
        if n == 0:
            continue
        k, v = gather_tokens(kv_cache, [int(x) for x in block_table[b]], n, geometry, layer)
        pos = torch.arange(n)
        visible = (pos >= n - window) if window else torch.ones(n, dtype=torch.bool)
        out[b] = _attend(query[b].float().unsqueeze(1), k, v, visible.unsqueeze(0), scale).squeeze(1)
    return out


def prefill_attention_ref(
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
) -> torch.Tensor:
    """Float32 oracle of :func:`kv_offload.attention.paged_prefill_attention` (same arguments)."""
    scale = 1.0 / math.sqrt(geometry.head_size) if scale is None else scale
    out = torch.zeros(query.shape[0], query.shape[1], geometry.v_head_size)
    for b in range(query_start_loc.shape[0] - 1):
        lo, hi = int(query_start_loc[b]), int(query_start_loc[b + 1])
        if hi == lo:
            continue
        pre = int(prefix_lens[b])
        kc, vc = gather_tokens(kv_cache, [int(x) for x in block_table[b]], pre, geometry, layer)
        k = torch.cat([kc, key[lo:hi].float().transpose(0, 1)], 1)
        v = torch.cat([vc, value[lo:hi].float().transpose(0, 1)], 1)
        qpos = pre + torch.arange(hi - lo)
        kpos = torch.arange(pre + hi - lo)
        visible = kpos[None, :] <= qpos[:, None]
        if window:
            visible &= kpos[None, :] > qpos[:, None] - window
        out[lo:hi] = _attend(query[lo:hi].float().transpose(0, 1), k, v, visible, scale).transpose(0, 1)
    return out
