# SPDX-License-Identifier: Apache-2.0
"""Copy planning: from (device block, host slot) pairs to a batch of byte-range descriptors.

Pure logic shared by every engine (CPU memcpy, CUDA batched DMA): where each page of a
block lies in the KV cache, where it goes in the host block, and which neighbouring ranges
merge into one descriptor.

A KV cache is described as :class:`PageRegion` s. Block ``b``'s page of a region starts at
``base + b * block_stride`` and is ``page_bytes`` long; it maps to bytes
``[host_offset, host_offset + page_bytes)`` of the host block. Per-layer layouts (vLLM's
LBHNC, the CPU backend) give one region per layer with ``block_stride == page_bytes``;
block-outermost packed layouts (BLHNC) give regions whose pages of one block are adjacent,
and :func:`coalesce` merges them into one descriptor per block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from kv_offload.geometry import KVGeometry
from kv_offload.pool.host_pool import is_read_only
from kv_offload.transfer.base import Direction, TransferError, TransferJob

__all__ = [
    "PageRegion", "CopyBatch", "HostSlots", "regions_from_layers", "host_slots_for", "build_copy_batch", "coalesce",
]  # fmt: skip

I64 = npt.NDArray[np.int64]


@dataclass(frozen=True)
class PageRegion:
    """One run of per-block pages in a KV cache."""

    base: int
    num_blocks: int
    block_stride: int
    page_bytes: int
    host_offset: int
    #: device type of the memory at ``base`` (``"cpu"``, ``"cuda"``, ``"meta"``, ...)
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.num_blocks <= 0 or self.page_bytes <= 0:
            raise ValueError(f"empty page region: {self}")
        if self.base < 0 or self.host_offset < 0:
            raise ValueError(f"page region with a negative address or host offset: {self}")
        if self.block_stride < self.page_bytes:
            raise ValueError(
                f"page region block_stride {self.block_stride} < page_bytes {self.page_bytes}:"
                " pages of neighbouring blocks would overlap"
            )


@dataclass(frozen=True)
class CopyBatch:
    """Descriptors of one job: copy ``sizes[i]`` bytes from ``src[i]`` to ``dst[i]``."""

    src: I64
    dst: I64
    sizes: I64

    @property
    def num_descriptors(self) -> int:
        return int(self.sizes.size)

    @property
    def total_bytes(self) -> int:
        return int(self.sizes.sum())

    def as_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (torch.from_numpy(self.src), torch.from_numpy(self.dst), torch.from_numpy(self.sizes))


def regions_from_layers(layers: Sequence[torch.Tensor], geometry: KVGeometry) -> list[PageRegion]:
    """Regions of a KV cache given as one tensor per layer, dim 0 indexing blocks.

    Each layer's block ``b`` must be the ``geometry.page_bytes`` bytes starting at
    ``t[b]``, i.e. ``t[b]`` contiguous. Layers that share storage (vLLM allocates one
    backing buffer) are fine; regions are addressed by raw pointer.
    """
    if len(layers) != geometry.num_layers:
        raise ValueError(f"expected {geometry.num_layers} layer tensors, got {len(layers)}")
    regions = []
    for layer, t in enumerate(layers):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"layer {layer}: expected a torch.Tensor, got {type(t).__name__}")
        if t.layout != torch.strided:
            raise ValueError(f"layer {layer}: KV tensor must be dense (strided), got layout {t.layout}")
        if t.dim() < 1 or t.shape[0] == 0:
            raise ValueError(f"layer {layer}: KV tensor must have a non-empty block dim 0")
        if not t[0].is_contiguous():
            raise ValueError(f"layer {layer}: one block of the KV tensor is not contiguous")
        page = t[0].numel() * t.element_size()
        if page != geometry.page_bytes:
            raise ValueError(
                f"layer {layer}: a block holds {page} bytes, the geometry says "
                f"{geometry.page_bytes} (shape {tuple(t.shape)}, dtype {t.dtype})"
            )
        regions.append(
            PageRegion(
                base=t.data_ptr(),
                num_blocks=int(t.shape[0]),
                block_stride=t.stride(0) * t.element_size(),
                page_bytes=page,
                host_offset=geometry.page_offset(layer),
                device=t.device.type,
            )
        )
    return regions


@dataclass(frozen=True)
class HostSlots:
    """Where an engine's host pool is, as checked once when the engine is built."""

    base: int
    slot_bytes: int
    num_slots: int
    #: the pool is a read-only attach of a shared segment: STORE jobs are refused
    read_only: bool


def host_slots_for(pool: torch.Tensor, regions: Sequence[PageRegion]) -> HostSlots:
    """Check ``pool`` (``uint8[num_slots, slot_bytes]`` on the CPU) against ``regions``.

    Raises ``ValueError`` when a block's pages do not fit in one slot: a pool built for a
    smaller KV geometry would otherwise be written past its end.
    """
    if not isinstance(pool, torch.Tensor):
        raise TypeError(f"pool must be a torch.Tensor, got {type(pool).__name__}")
    if pool.dim() != 2 or pool.dtype != torch.uint8 or pool.device.type != "cpu" or pool.layout != torch.strided:
        raise ValueError(
            f"pool must be a CPU uint8 tensor [num_slots, slot_bytes], got {pool.dtype} {tuple(pool.shape)}"
            f" on {pool.device}"
        )
    if pool.shape[0] == 0 or pool.shape[1] == 0:
        raise ValueError(f"pool has no room: shape {tuple(pool.shape)}")
    if pool.stride(1) != 1 or pool.stride(0) < pool.shape[1]:
        raise ValueError(f"pool slots must be contiguous and disjoint, got strides {pool.stride()}")
    if not regions:
        raise ValueError("no KV cache regions")
    need = max(r.host_offset + r.page_bytes for r in regions)
    have = int(pool.shape[1])
    if need > have:
        raise ValueError(
            f"a KV block needs {need} bytes of a host slot, the pool's slots hold {have} bytes"
            " (was the pool built for a smaller KV geometry?)"
        )
    base = int(pool.data_ptr())
    num_slots = int(pool.shape[0])
    slot_bytes = int(pool.stride(0))
    nbytes = (num_slots - 1) * slot_bytes + have
    return HostSlots(base, slot_bytes, num_slots, read_only=is_read_only(base, nbytes))


def _check_indices(values: I64, limit: int, what: str, job_id: int) -> None:
    if values.size and (int(values.min()) < 0 or int(values.max()) >= limit):
        bad = values[(values < 0) | (values >= limit)][0]
        raise TransferError(f"job {job_id}: {what} {int(bad)} out of range [0, {limit})")


def build_copy_batch(
    job: TransferJob,
    regions: Sequence[PageRegion],
    host_base: int,
    slot_bytes: int,
    num_slots: int,
    *,
    merge: bool = True,
    read_only: bool = False,
) -> CopyBatch:
    """Descriptors for ``job``, block-major (all pages of pair 0, then pair 1, ...).

    Raises :class:`TransferError` for out-of-range ids, two sources writing one block, a
    block whose pages overrun a ``slot_bytes`` slot, or a STORE into a ``read_only`` pool.
    """
    if not regions:
        raise TransferError("no KV cache regions registered")
    if not isinstance(job.direction, Direction):
        raise TransferError(f"job {job.job_id}: direction must be a Direction, got {job.direction!r}")
    if read_only and job.direction is Direction.STORE:
        raise TransferError(
            f"job {job.job_id}: STORE into a read-only host pool (attached with readonly=True)"
        )
    for what, ids in (("device blocks", job.device_blocks), ("host slots", job.host_slots)):
        if not isinstance(ids, np.ndarray) or ids.dtype != np.int64 or ids.ndim != 1:
            raise TransferError(f"job {job.job_id}: {what} must be a 1-D int64 array (use TransferJob.make)")
    if job.device_blocks.shape != job.host_slots.shape:
        raise TransferError(
            f"job {job.job_id}: {job.device_blocks.size} device blocks but {job.host_slots.size} host slots"
        )
    need = max(r.host_offset + r.page_bytes for r in regions)
    if need > slot_bytes:
        raise TransferError(f"a KV block needs {need} bytes of a host slot, the slots hold {slot_bytes}")
    num_blocks = min(r.num_blocks for r in regions)
    _check_indices(job.device_blocks, num_blocks, "device block", job.job_id)
    _check_indices(job.host_slots, num_slots, "host slot", job.job_id)
    written = job.device_blocks if job.direction is Direction.LOAD else job.host_slots
    if np.unique(written).size != written.size:
        raise TransferError(f"job {job.job_id}: a destination block appears twice")
    n = job.num_blocks
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return CopyBatch(empty, empty.copy(), empty.copy())
    bases = np.array([r.base for r in regions], dtype=np.int64)
    strides = np.array([r.block_stride for r in regions], dtype=np.int64)
    pages = np.array([r.page_bytes for r in regions], dtype=np.int64)
    offsets = np.array([r.host_offset for r in regions], dtype=np.int64)
    dev = bases[None, :] + job.device_blocks[:, None] * strides[None, :]
    host = host_base + job.host_slots[:, None] * slot_bytes + offsets[None, :]
    sizes = np.broadcast_to(pages, (n, len(regions)))
    if job.direction is Direction.STORE:
        src, dst = dev.ravel(), host.ravel()
    else:
        src, dst = host.ravel(), dev.ravel()
    batch = CopyBatch(np.ascontiguousarray(src), np.ascontiguousarray(dst), sizes.ravel().copy())
    return coalesce(batch) if merge else batch


def coalesce(batch: CopyBatch) -> CopyBatch:
    """Merge runs of descriptors that are adjacent in both source and destination.

    Order is kept, so the result copies exactly the same bytes to the same places.
    """
    n = batch.num_descriptors
    if n <= 1:
        return batch
    src, dst, sizes = batch.src, batch.dst, batch.sizes
    joins = (src[:-1] + sizes[:-1] == src[1:]) & (dst[:-1] + sizes[:-1] == dst[1:])
    if not joins.any():
        return batch
    starts = np.flatnonzero(np.concatenate(([True], ~joins)))
    return CopyBatch(
        src=src[starts].copy(),
        dst=dst[starts].copy(),
        sizes=np.add.reduceat(sizes, starts).astype(np.int64),
    )
