# SPDX-License-Identifier: Apache-2.0
"""KV caches in the layouts an engine can have, built on purpose with non-contiguous views."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kv_offload.geometry import KVGeometry, PageFormat

#: Layout names used in parametrized tests.
LAYOUTS = ("per_layer", "per_layer_padded", "block_outermost")


@dataclass
class KVCache:
    layers: list[torch.Tensor]
    storage: torch.Tensor

    def block_bytes(self, layer: int, block: int) -> torch.Tensor:
        """The bytes of ``layer``'s page of ``block`` (a uint8 copy)."""
        return self.layers[layer][block].reshape(-1).view(torch.uint8).clone()


def small_geometry(dtype: torch.dtype = torch.float32, fmt: PageFormat = PageFormat.CPU) -> KVGeometry:
    return KVGeometry(num_layers=3, num_kv_heads=2, head_size=16, block_size=32, dtype=dtype, page_format=fmt)


def make_kv_cache(geometry: KVGeometry, num_blocks: int, layout: str, seed: int = 0) -> KVCache:
    """Random KV cache, one ``[num_blocks, H, N, D + Dv]`` view per layer.

    ``per_layer``: one contiguous region per layer, all in one storage (vLLM LBHNC / CPU).
    ``per_layer_padded``: as above with 256 spare bytes after every page, so each layer view
    is non-contiguous (block stride > page size).
    ``block_outermost``: all layers of a block adjacent (BLHNC): layer views are strided.
    """
    gen = torch.Generator().manual_seed(seed)
    h, n = geometry.num_kv_heads, geometry.block_size
    c = geometry.head_size + geometry.v_head_size
    page = geometry.page_elements
    pad = 256 // geometry.element_size
    num_layers = geometry.num_layers
    if layout == "per_layer":
        storage = torch.randn(num_layers, num_blocks, page, generator=gen).to(geometry.dtype)
        layers = [storage[i].view(num_blocks, h, n, c) for i in range(num_layers)]
    elif layout == "per_layer_padded":
        storage = torch.randn(num_layers, num_blocks, page + pad, generator=gen).to(geometry.dtype)
        layers = [storage[i, :, :page].unflatten(1, (h, n, c)) for i in range(num_layers)]
    elif layout == "block_outermost":
        storage = torch.randn(num_blocks, num_layers, page, generator=gen).to(geometry.dtype)
        layers = [storage[:, i].unflatten(1, (h, n, c)) for i in range(num_layers)]
    else:
        raise ValueError(layout)
    if layout != "per_layer":
        assert not layers[0].is_contiguous()
    return KVCache(layers=layers, storage=storage)
