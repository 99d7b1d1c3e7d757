# SPDX-License-Identifier: Apache-2.0
"""KV-cache geometry, page formats and the host block layout.

Terms used across kv-offload:

* **block**: ``block_size`` consecutive tokens of one sequence, across every layer.
* **page**: the bytes one layer keeps for one block (every KV head, every token of the
  block, K and V). An engine's KV cache is a set of pages; where they sit is its
  *device layout* (see :mod:`kv_offload.transfer.plan`).
* **host block**: the bytes one block takes in the host pool. It is contiguous and holds
  the block's page of every layer, layer 0 first::

      host block = [ page(layer 0) | page(layer 1) | ... | page(layer L-1) ]  (+ padding)

  Pages are copied byte for byte, so the inner format of a page on the host is the one the
  engine uses on the device. :class:`PageFormat` names that format, and
  :meth:`KVGeometry.k_strides` / :meth:`KVGeometry.v_strides` say where each K and V element
  lies, so the CPU-attention kernel reads host blocks in place.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

__all__ = ["PageFormat", "KVGeometry", "TensorStrides", "SLOT_ALIGNMENT"]

#: Host slots are padded to this many bytes (page size: mmap, O_DIRECT and DMA friendly).
SLOT_ALIGNMENT = 4096

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "int8": torch.int8,
    "uint8": torch.uint8,
}


class PageFormat(str, enum.Enum):
    """Inner format of one layer's page for one block (H heads, N tokens, D head size).

    ``HND``   ``[H][N][K(D) | V(Dv)]`` vLLM's standard attention page in layout LBHNC.
    ``NHD``   ``[N][H][K(D) | V(Dv)]`` the same in layout LBNHC.
    ``CPU``   ``[H][ K^T (D x N) | V (N x Dv) ]`` vLLM's CPU attention backend: per head, K is
              stored transposed, followed by V.
    ``LATENT`` ``[N][C]`` one latent vector per token (MLA); no separate V.
    """

    HND = "HND"
    NHD = "NHD"
    CPU = "CPU"
    LATENT = "LATENT"


@dataclass(frozen=True)
class TensorStrides:
    """Where elements of K (or V) for head ``h``, token ``n``, dim ``d`` lie inside a page.

    Element offset (in elements of the KV dtype, from the start of the page) is
    ``offset + h * head + n * token + d * dim``.
    """

    offset: int
    head: int
    token: int
    dim: int


@dataclass(frozen=True)
class KVGeometry:
    """Frozen description of one model's KV cache, as kv-offload stores it.

    Args:
        num_layers: attention layers whose KV is offloaded.
        num_kv_heads: KV heads per layer held by this worker (1 for MLA latents).
        head_size: K head size (the latent size for MLA).
        block_size: tokens per block.
        dtype: element type of the KV cache.
        page_format: inner format of a page (see :class:`PageFormat`).
        head_size_v: V head size when it differs from ``head_size``.
    """

    num_layers: int
    num_kv_heads: int
    head_size: int
    block_size: int
    dtype: torch.dtype
    page_format: PageFormat = PageFormat.HND
    head_size_v: int | None = None

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_size", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"KVGeometry.{name} must be a positive int, got {value!r}")
        if self.head_size_v is not None and (
            not isinstance(self.head_size_v, int) or self.head_size_v <= 0
        ):
            raise ValueError(f"KVGeometry.head_size_v must be a positive int, got {self.head_size_v!r}")
        if not isinstance(self.dtype, torch.dtype):
            raise ValueError(f"KVGeometry.dtype must be a torch.dtype, got {self.dtype!r}")
        if not isinstance(self.page_format, PageFormat):
            raise ValueError(f"KVGeometry.page_format must be a PageFormat, got {self.page_format!r}")
        if self.page_format is PageFormat.LATENT and self.num_kv_heads != 1:
            raise ValueError("KVGeometry.num_kv_heads must be 1 for the LATENT page format")

    # -- sizes ---------------------------------------------------------------------------
    @property
    def is_latent(self) -> bool:
        return self.page_format is PageFormat.LATENT

    @property
    def v_head_size(self) -> int:
        return self.head_size if self.head_size_v is None else self.head_size_v

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def page_elements(self) -> int:
        """Elements in one layer's page of one block."""
        per_token = self.head_size if self.is_latent else self.head_size + self.v_head_size
        return self.num_kv_heads * self.block_size * per_token

    @property
    def page_bytes(self) -> int:
        return self.page_elements * self.element_size

    @property
    def block_bytes(self) -> int:
        """Payload bytes of one host block (all layers), without padding."""
        return self.num_layers * self.page_bytes

    @property
    def slot_bytes(self) -> int:
        """Bytes one host block takes in the pool: ``block_bytes`` rounded up to 4 KiB."""
        return -(-self.block_bytes // SLOT_ALIGNMENT) * SLOT_ALIGNMENT

    def page_offset(self, layer: int) -> int:
        """Byte offset of ``layer``'s page inside a host block."""
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range [0, {self.num_layers})")
        return layer * self.page_bytes

    # -- element addressing inside a page -------------------------------------------------
    def k_strides(self) -> TensorStrides:
        """Element strides of K (the latent for MLA) inside one page."""
        h, n, d, dv = self.num_kv_heads, self.block_size, self.head_size, self.v_head_size
        fmt = self.page_format
        if fmt is PageFormat.HND:
            return TensorStrides(offset=0, head=n * (d + dv), token=d + dv, dim=1)
        if fmt is PageFormat.NHD:
            return TensorStrides(offset=0, head=d + dv, token=h * (d + dv), dim=1)
        if fmt is PageFormat.CPU:
            return TensorStrides(offset=0, head=n * (d + dv), token=1, dim=n)
        return TensorStrides(offset=0, head=0, token=d, dim=1)

    def v_strides(self) -> TensorStrides:
        """Element strides of V inside one page (for MLA: the latent, as K)."""
        h, n, d, dv = self.num_kv_heads, self.block_size, self.head_size, self.v_head_size
        fmt = self.page_format
        if fmt is PageFormat.HND:
            return TensorStrides(offset=d, head=n * (d + dv), token=d + dv, dim=1)
        if fmt is PageFormat.NHD:
            return TensorStrides(offset=d, head=d + dv, token=h * (d + dv), dim=1)
        if fmt is PageFormat.CPU:
            return TensorStrides(offset=n * d, head=n * (d + dv), token=dv, dim=1)
        return self.k_strides()

    def describe(self) -> dict[str, object]:
        """Plain-data description (for shared-memory headers, logs and metrics)."""
        return {
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_size": self.head_size,
            "head_size_v": self.head_size_v,
            "block_size": self.block_size,
            "dtype": str(self.dtype).removeprefix("torch."),
            "page_format": self.page_format.value,
        }

    @classmethod
    def from_description(cls, desc: dict[str, object]) -> KVGeometry:
        """Inverse of :meth:`describe`."""
        dtype_name = str(desc["dtype"])
        if dtype_name not in _DTYPES:
            raise ValueError(f"unknown KV dtype {dtype_name!r}; known: {sorted(_DTYPES)}")
        head_size_v = desc.get("head_size_v")
        return cls(
            num_layers=int(str(desc["num_layers"])),
            num_kv_heads=int(str(desc["num_kv_heads"])),
            head_size=int(str(desc["head_size"])),
            block_size=int(str(desc["block_size"])),
            dtype=_DTYPES[dtype_name],
            page_format=PageFormat(str(desc["page_format"])),
            head_size_v=None if head_size_v is None else int(str(head_size_v)),
        )


def dtype_from_name(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``, with an error listing the known names."""
    key = name.removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unknown KV dtype {name!r}; known: {sorted(_DTYPES)}")
    return _DTYPES[key]
