# SPDX-License-Identifier: Apache-2.0
"""Writing new tokens' K/V into a paged KV cache, in the page format a geometry names.

:func:`reshape_and_cache` is the write half of serving: vLLM's attention layers call it (through
:mod:`kv_offload.vllm.cpu_attention`) once per layer per step with the step's new K/V and
slot mapping, before attending. The plain-torch oracle is
:func:`kv_offload.attention.reference.write_tokens`.
"""

from __future__ import annotations

import torch

from kv_offload.attention._ops import layout_list, ops
from kv_offload.geometry import KVGeometry

__all__ = ["reshape_and_cache"]


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    geometry: KVGeometry,
    layer: int = 0,
) -> None:
    """Write ``key [T, H, D]`` / ``value [T, H, Dv]`` into ``kv_cache`` at ``slot_mapping``.

    Args:
        key, value: the new tokens' K and V, in the KV dtype (any strides).
        kv_cache: ``uint8 [num_blocks, block_bytes]`` (rows may be strided), as the attention
            functions take it.
        slot_mapping: int64 ``[>= T]``: token ``t`` goes to block ``slot // block_size`` at
            position ``slot % block_size``; negative slots (padding) are skipped.
        geometry, layer: the page format and which layer's page to write.

    Raises:
        TypeError / ValueError: wrong dtypes or shapes; a latent (MLA) geometry.
        RuntimeError: from the op: a slot past the cache (nothing is written then).
    """
    if geometry.is_latent:
        raise ValueError("reshape_and_cache writes K and V pages; the LATENT page format has no separate V")
    for name, t in (("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dtype != geometry.dtype:
            raise TypeError(f"{name} must be a tensor of the KV dtype {geometry.dtype}")
    if not isinstance(slot_mapping, torch.Tensor) or slot_mapping.dtype != torch.int64:
        raise TypeError("slot_mapping must be an int64 tensor")
    ops().reshape_and_cache(
        kv_cache, key, value, slot_mapping.contiguous(), layout_list(geometry, layer), geometry.dtype
    )
