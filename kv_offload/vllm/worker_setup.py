# SPDX-License-Identifier: Apache-2.0
"""What a worker half is built from: the backend spec, the lower tiers, the transfer engine
(the one place engines are chosen). Also used by the scheduler side (the backend's size, the
scheduler's read-only view of the disk tier)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from kv_offload.backends import BackendSpec
from kv_offload.config import DiskConfig, OffloadConfig, RemoteConfig
from kv_offload.geometry import KVGeometry
from kv_offload.keys import Namespace
from kv_offload.transfer import TransferEngine
from kv_offload.transfer.plan import PageRegion
from kv_offload.tiers.base import BlockTier

__all__ = ["backend_spec", "make_engine", "namespace_label", "open_disk_tier", "open_import_tiers", "open_remote_tier"]


def backend_spec(config: OffloadConfig, geometry: KVGeometry, world_size: int, rank: int) -> BackendSpec:
    """The backend spec of one worker: ``cpu_bytes`` is split evenly over the workers."""
    shm_name = config.shm_name
    if shm_name is not None and world_size > 1:
        shm_name = f"{shm_name}.{rank}"
    return BackendSpec(
        capacity_bytes=config.cpu_bytes // world_size,
        geometry=geometry,
        options=config.backend_options,
        numa_node=config.numa_node,
        shm_name=shm_name,
        pin=config.pin_memory,
        world_size=world_size,
        rank=rank,
    )


def open_disk_tier(
    disk: DiskConfig, block_bytes: int, namespace: bytes, world_size: int = 1, *, io_delay_s: float = 0.0,
    label: Mapping[str, Any] | None = None,
) -> BlockTier:  # fmt: skip
    """The disk tier of one worker (or the scheduler's view of it): ``disk.capacity_bytes`` is
    split evenly over the workers, each of which keeps its shards in its own namespace.
    ``io_delay_s``: test only (config ``slow_io_ms``), every read and write sleeps first.
    ``label``: what the namespace holds (:func:`namespace_label`), for our own namespaces only."""
    from kv_offload.tiers.disk import DiskTier

    return DiskTier(
        disk.path, disk.capacity_bytes // world_size, namespace, block_bytes, threads=disk.threads,
        io_delay_s=io_delay_s, label=label,
    )  # fmt: skip


def namespace_label(namespace: Namespace, rank: int, geometry: KVGeometry) -> dict[str, Any]:
    """The label of one worker's namespace (a disk tier directory, a remote tier label value):
    the namespace's fields, the rank (the namespace is ``namespace.rank_digest(rank)``) and
    the page geometry of its blocks."""
    return {**namespace.describe(), "rank": rank, "rank_digest": namespace.rank_digest(rank).hex(),
            "geometry": geometry.describe()}  # fmt: skip


def open_remote_tier(
    remote: RemoteConfig, block_bytes: int, namespace: bytes, *, label: Mapping[str, Any] | None = None
) -> BlockTier:
    """The remote tier of one worker (or the scheduler's lookup client): each worker keeps
    its shard under its own namespace. Connects now; a store that is down is a warning,
    and the tier reconnects in the background of its next calls. ``label``: what the
    namespace holds (:func:`namespace_label`), put with the blocks; for our own namespaces only."""
    from kv_offload.tiers.remote.tier import RemoteTier

    return RemoteTier(remote, namespace, block_bytes, label=label)


def open_import_tiers(
    config: OffloadConfig,
    geometry: KVGeometry,
    imports: Sequence[tuple[KVGeometry, bytes]],
    world_size: int,
    max_blocks: int,
) -> dict[str, BlockTier]:
    """One worker's view of other engines' blocks (config ``imports``), by tier name
    (``disk.import0``, ...): each producer's tier (disk and/or remote, as configured) opened
    on its rank namespace and slot size, wrapped to convert into ``geometry`` on read.
    ``imports``: per entry, (the producer's geometry, its namespace for this rank)."""
    from kv_offload.vllm.imports import ConvertingTier, import_tier_name

    tiers: dict[str, BlockTier] = {}
    for i, (src, namespace) in enumerate(imports):
        if config.disk is not None:
            inner = open_disk_tier(config.disk, src.slot_bytes, namespace, world_size)
            tiers[import_tier_name("disk", i)] = ConvertingTier(inner, src, geometry, max_blocks)
        if config.remote is not None:
            inner = open_remote_tier(config.remote, src.slot_bytes, namespace)
            tiers[import_tier_name("remote", i)] = ConvertingTier(inner, src, geometry, max_blocks)
    return tiers


def make_engine(
    regions: Sequence[PageRegion], pool: torch.Tensor, device: torch.device, num_threads: int
) -> TransferEngine:
    """The transfer engine for a KV cache on ``device`` (the one place engines are chosen)."""
    if device.type == "cuda":
        from kv_offload.transfer.cuda_engine import CudaTransferEngine  # GPU builds only

        return CudaTransferEngine(regions, pool)  # type: ignore[no-any-return, unused-ignore]
    if device.type != "cpu":
        raise ValueError(f"kv_offload has no transfer engine for KV caches on {device.type!r}")
    from kv_offload.transfer.cpu_engine import CpuTransferEngine

    return CpuTransferEngine(regions, pool, num_threads=num_threads)
