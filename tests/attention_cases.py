# SPDX-License-Identifier: Apache-2.0
"""Builders for the CPU-attention tests: random KV written into randomly placed blocks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kv_offload.attention.reference import gather_tokens, write_tokens
from kv_offload.geometry import KVGeometry, PageFormat


@dataclass
class PagedCase:
    geometry: KVGeometry
    layer: int
    cache: torch.Tensor  # uint8 [num_blocks, slot_bytes]
    table: torch.Tensor  # int32 [num_seqs, max_blocks]
    lens: torch.Tensor  # int32 [num_seqs]


def make_geometry(
    dtype: torch.dtype,
    fmt: PageFormat = PageFormat.HND,
    head_size: int = 64,
    num_kv_heads: int = 2,
    block_size: int = 16,
    num_layers: int = 2,
) -> KVGeometry:
    heads = 1 if fmt is PageFormat.LATENT else num_kv_heads
    return KVGeometry(
        num_layers=num_layers, num_kv_heads=heads, head_size=head_size, block_size=block_size, dtype=dtype,
        page_format=fmt,
    )  # fmt: skip


def make_paged(geometry: KVGeometry, lens: list[int], layer: int = 1, seed: int = 0) -> PagedCase:
    """Sequences of ``lens`` tokens in shuffled blocks (plus unused blocks) of a fresh cache."""
    gen = torch.Generator().manual_seed(seed)
    bs = geometry.block_size
    need = [-(-n // bs) for n in lens]
    total = sum(need) + 3
    cache = torch.randint(0, 256, (total, geometry.slot_bytes), dtype=torch.uint8, generator=gen)
    # Garbage bytes may be NaN/inf patterns; zero every page so unused tokens are finite.
    cache.zero_()
    perm = torch.randperm(total, generator=gen).tolist()
    width = max(need + [1])
    table = torch.full((len(lens), width), -1, dtype=torch.int32)
    pos = 0
    for b, (n, nb) in enumerate(zip(lens, need)):
        blocks = perm[pos : pos + nb]
        pos += nb
        table[b, :nb] = torch.tensor(blocks, dtype=torch.int32)
        h = geometry.num_kv_heads
        k = torch.randn(h, n, geometry.head_size, generator=gen).to(geometry.dtype)
        v = torch.randn(h, n, geometry.v_head_size, generator=gen).to(geometry.dtype)
        write_tokens(cache, blocks, k, v, geometry, layer)
    table.clamp_(min=0)  # unused entries must still be valid ids for a fixed-width table
    return PagedCase(geometry, layer, cache, table, torch.tensor(lens, dtype=torch.int32))


def torch_lowp_decode(
    query: torch.Tensor, case: PagedCase, scale: float | None = None, window: int | None = None
) -> torch.Tensor:
    """torch's own SDPA in the query's dtype on the gathered KV (the 'torch error' baseline)."""
    g = case.geometry
    out = torch.zeros(query.shape[0], query.shape[1], g.v_head_size, dtype=query.dtype)
    for b in range(query.shape[0]):
        n = int(case.lens[b])
        if n == 0:
            continue
        k, v = gather_tokens(case.cache, case.table[b].tolist(), n, g, case.layer)
        lo = max(0, n - window) if window else 0
        k, v = k[:, lo:].to(query.dtype), v[:, lo:].to(query.dtype)
        q = query[b].unsqueeze(1).unsqueeze(0)  # [1, Hq, 1, D]
        o = F.scaled_dot_product_attention(q, k.unsqueeze(0), v.unsqueeze(0), scale=scale, enable_gqa=True)
        out[b] = o[0, :, 0]
    return out


def assert_close_to_oracle(out: torch.Tensor, ref: torch.Tensor, torch_out: torch.Tensor | None) -> None:
    """fp32: tight; low precision: at most 2x torch's own error against the same fp32 oracle."""
    err = (out.float() - ref).abs().max().item() if out.numel() else 0.0
    if out.dtype == torch.float32 or torch_out is None:
        assert err <= 2e-5 * max(1.0, ref.abs().max().item()), f"max abs error {err}"
        return
    torch_err = (torch_out.float() - ref).abs().max().item() if out.numel() else 0.0
    assert err <= 2 * torch_err + 1e-6, f"max abs error {err} > 2 x torch's {torch_err}"
