# SPDX-License-Identifier: Apache-2.0
"""Blocks written by another engine: their page geometry, and conversion into a consumer's.

A producer (e.g. a CUDA vLLM engine) stores KV blocks in its own page format, dtype and block
size; a shared pool says which in its header (``PoolSpec(metadata={"geometry":
geometry.describe()})``, read back with :meth:`KVGeometry.from_description`). A CPU consumer
then either

* attends to the blocks in place: the kernels read ``HND``, ``NHD`` and ``CPU`` pages of any
  block size and dtype (:class:`kv_offload.attention.PoolAttention`), or
* converts them on load into its own page format, dtype and block size with
  :func:`convert_tokens` (what a vLLM engine needs: its attention reads only its own cache).

:func:`cuda_flash_attention_geometry` gives the page geometry of vLLM's CUDA FlashAttention
KV cache, so tests and tools can synthesise producer blocks on a machine without a GPU.
"""

from __future__ import annotations

import torch

from kv_offload.attention.reference import page_views
from kv_offload.geometry import KVGeometry, PageFormat

__all__ = ["cuda_flash_attention_geometry", "convert_tokens"]


def cuda_flash_attention_geometry(
    num_layers: int,
    num_kv_heads: int,
    head_size: int,
    dtype: torch.dtype = torch.bfloat16,
    *,
    block_size: int = 16,
    layout: str = "LBNHC",
) -> KVGeometry:
    """Page geometry of vLLM's CUDA FlashAttention KV cache (vLLM 0.32/0.33).

    FlashAttention takes block sizes that are multiples of 16 (vLLM's CUDA default is 16) and
    declares no KV-cache layout of its own, so vLLM picks its default preference, ``LBNHC``:
    per layer ``[num_blocks, block_size, num_kv_heads, K|V]``, i.e. ``NHD`` pages. With
    kv-offload's connector, which asks for ``LBHNC``, the pages are ``HND``
    (``layout="LBHNC"``).
    """
    formats = {"LBNHC": PageFormat.NHD, "LBHNC": PageFormat.HND}
    if layout not in formats:
        raise ValueError(f"layout must be one of {sorted(formats)}, got {layout!r}")
    if block_size % 16:
        raise ValueError(f"FlashAttention block sizes are multiples of 16, got {block_size}")
    return KVGeometry(num_layers=num_layers, num_kv_heads=num_kv_heads, head_size=head_size,
                      block_size=block_size, dtype=dtype, page_format=formats[layout])  # fmt: skip


def _check_pair(src: KVGeometry, dst: KVGeometry) -> None:
    if src.is_latent or dst.is_latent:
        raise ValueError("converting LATENT (MLA) pages is not supported")
    same = ("num_kv_heads", "head_size", "v_head_size")
    for name in same:
        if getattr(src, name) != getattr(dst, name):
            raise ValueError(f"source and destination differ in {name}: {getattr(src, name)} != {getattr(dst, name)}")


def convert_tokens(
    src_cache: torch.Tensor,
    src_geometry: KVGeometry,
    src_layer: int,
    src_blocks: list[int],
    dst_cache: torch.Tensor,
    dst_geometry: KVGeometry,
    dst_layer: int,
    dst_blocks: list[int],
    start: int,
    stop: int,
) -> None:
    """Copy tokens ``[start, stop)`` of one sequence from ``src`` pages into ``dst`` pages.

    Both caches are ``uint8 [num_blocks, block_bytes]`` (a pool's ``tensor``, or one vLLM
    layer's cache viewed so); ``src_blocks`` / ``dst_blocks`` list the sequence's block ids in
    token order, each in its own block size. Page format, dtype (converted as ``Tensor.copy_``
    does) and block size may all differ; heads and head sizes must match.

    Raises:
        ValueError: mismatched heads, a range outside the block lists, a latent geometry.
    """
    _check_pair(src_geometry, dst_geometry)
    sb, db = src_geometry.block_size, dst_geometry.block_size
    if not 0 <= start <= stop:
        raise ValueError(f"bad token range [{start}, {stop})")
    if stop > len(src_blocks) * sb or stop > len(dst_blocks) * db:
        raise ValueError(f"tokens up to {stop} need {-(-stop // sb)} source and {-(-stop // db)} destination blocks; "
                         f"got {len(src_blocks)} and {len(dst_blocks)}")  # fmt: skip
    views: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def pages(side: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (side, block)
        if key not in views:
            if side == 0:
                views[key] = page_views(src_cache, block, src_geometry, src_layer)
            else:
                views[key] = page_views(dst_cache, block, dst_geometry, dst_layer)
        return views[key]

    pos = start
    while pos < stop:
        so, do = pos % sb, pos % db
        run = min(sb - so, db - do, stop - pos)
        ks, vs = pages(0, src_blocks[pos // sb])
        kd, vd = pages(1, dst_blocks[pos // db])
        kd[:, do : do + run].copy_(ks[:, so : so + run])
        vd[:, do : do + run].copy_(vs[:, so : so + run])
        pos += run
