# SPDX-License-Identifier: Apache-2.0
"""Serving attention in place from a host pool, by slot or by block hash.

A writer process (the one running :class:`~kv_offload.manager.OffloadManager`) owns a shared
pool (``PoolSpec(shm_name=..., metadata={"geometry": geometry.describe()})``) and publishes a
:class:`BlockIndex` snapshot, ``{block hash: slot}`` of ready blocks, as a JSON file next to
the pool (:func:`index_path`), replaced atomically. A reader maps the pool read-only
(:meth:`PoolAttention.attach`), loads the index, and computes attention for new queries over
the stored prefix, reading the slots in place (no copy).

Consistency: an index is a point-in-time snapshot. The writer must not reuse the slots of a
published snapshot while readers serve from it (e.g. keep those blocks protected with
``prepare_load`` until the next snapshot, or only publish blocks it will not evict); the
reader cannot detect a slot rewritten under it.
"""

from __future__ import annotations

import json
import numbers
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from kv_offload.attention._ops import ops
from kv_offload.attention.paged import paged_decode_attention, paged_prefill_attention
from kv_offload.geometry import KVGeometry
from kv_offload.pool.host_pool import HostPool, shm_path
from kv_offload.pool.numa import node_cpus

__all__ = ["BlockIndex", "PoolAttention", "index_path", "pin_threads_to_numa_node"]

_INDEX_VERSION = 1


def index_path(shm_name: str) -> str:
    """Where the writer of shared pool ``shm_name`` publishes its :class:`BlockIndex`."""
    return shm_path(shm_name) + ".index.json"


@dataclass(frozen=True)
class BlockIndex:
    """``{block hash: slot}`` of ready blocks in one pool, as published by its writer."""

    slots: Mapping[bytes, int] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, mapping: Mapping[bytes, int]) -> BlockIndex:
        """E.g. ``BlockIndex.from_mapping(manager.index())``."""
        return cls(dict(mapping))

    def save(self, path: str) -> None:
        """Write atomically (temp file + rename), so a reader never sees a partial index."""
        doc = {"version": _INDEX_VERSION, "blocks": {k.hex(): int(v) for k, v in self.slots.items()}}
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".index.", dir=directory)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str) -> BlockIndex:
        with open(path) as f:
            doc = json.load(f)
        if doc.get("version") != _INDEX_VERSION:
            raise ValueError(f"{path}: block index version {doc.get('version')!r}, expected {_INDEX_VERSION}")
        return cls({bytes.fromhex(k): int(v) for k, v in doc["blocks"].items()})

    def resolve(self, hashes: Sequence[bytes]) -> list[int]:
        """Slots of ``hashes``; ``KeyError`` naming the first hash the index does not hold."""
        out = []
        for i, h in enumerate(hashes):
            slot = self.slots.get(h)
            if slot is None:
                raise KeyError(f"block {i} (hash {h.hex()}) is not in the pool's index")
            out.append(slot)
        return out


def _ints(values: Sequence[int], name: str) -> list[int]:
    """``values`` as Python ints; floats, bools and other non-integers are refused, not truncated."""
    out: list[int] = []
    for i, x in enumerate(values):
        if isinstance(x, bool) or not isinstance(x, numbers.Integral):
            raise TypeError(f"{name}[{i}] must be an int, got {type(x).__name__} {x!r}")
        if not -(2**63) <= int(x) < 2**63:
            raise ValueError(f"{name}[{i}] = {int(x)} does not fit int64")
        out.append(int(x))
    return out


def _table(block_ids: Sequence[Sequence[int]] | torch.Tensor) -> torch.Tensor:
    # int64, so the attention wrappers see (and refuse) ids outside int32 instead of a wrapped cast.
    if isinstance(block_ids, torch.Tensor):
        return block_ids
    width = max((len(r) for r in block_ids), default=0)
    table = torch.zeros((len(block_ids), max(width, 1)), dtype=torch.int64)
    for i, row in enumerate(block_ids):
        ids = _ints(row, f"block_ids[{i}]")
        table[i, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
    return table


def _lens(lens: Sequence[int] | torch.Tensor, name: str) -> torch.Tensor:
    return lens if isinstance(lens, torch.Tensor) else torch.tensor(_ints(lens, name), dtype=torch.int64)


class PoolAttention:
    """Decode/prefill attention over the blocks of one :class:`HostPool`, read in place.

    Args:
        pool: the pool (its ``tensor`` rows are the slots).
        geometry: the KV geometry of its blocks; default: ``pool.metadata["geometry"]``.
    """

    def __init__(self, pool: HostPool, geometry: KVGeometry | None = None) -> None:
        if geometry is None:
            desc = pool.metadata.get("geometry")
            if desc is None:
                raise ValueError("the pool's metadata has no 'geometry'; pass geometry=")
            geometry = KVGeometry.from_description(desc)
        if geometry.slot_bytes > pool.slot_bytes:
            raise ValueError(f"geometry needs {geometry.slot_bytes} bytes per slot, the pool has {pool.slot_bytes}")
        self.pool = pool
        self.geometry = geometry
        self.shm_name: str | None = None

    @classmethod
    def attach(cls, shm_name: str, geometry: KVGeometry | None = None) -> PoolAttention:
        """Map the shared pool ``shm_name`` read-only (written by another process)."""
        self = cls(HostPool.attach(shm_name, readonly=True), geometry)
        self.shm_name = shm_name
        return self

    def load_index(self, path: str | None = None) -> BlockIndex:
        """The writer's latest snapshot (default path: :func:`index_path` of the attached pool)."""
        if path is None:
            if self.shm_name is None:
                raise ValueError("pass the index path: this pool was not attached by name")
            path = index_path(self.shm_name)
        return BlockIndex.load(path)

    def decode(
        self,
        query: torch.Tensor,
        block_ids: Sequence[Sequence[int]] | torch.Tensor,
        context_lens: Sequence[int] | torch.Tensor,
        layer: int = 0,
        **kwargs: object,
    ) -> torch.Tensor:
        """:func:`~kv_offload.attention.paged_decode_attention` over this pool's slots.

        ``block_ids[b]`` are sequence ``b``'s slots in token order; ``query`` is
        ``[num_seqs, num_q_heads, head_size]``; returns ``[num_seqs, num_q_heads, head_size_v]``.
        """
        lens = _lens(context_lens, "context_lens")
        return paged_decode_attention(
            query, self.pool.tensor, _table(block_ids), lens, self.geometry, layer, **kwargs  # type: ignore[arg-type]
        )

    def decode_by_hashes(
        self,
        query: torch.Tensor,
        block_hashes: Sequence[Sequence[bytes]],
        context_lens: Sequence[int] | torch.Tensor,
        index: BlockIndex,
        layer: int = 0,
        **kwargs: object,
    ) -> torch.Tensor:
        """As :meth:`decode`, with each sequence's prefix named by its block hashes."""
        return self.decode(query, [index.resolve(h) for h in block_hashes], context_lens, layer, **kwargs)

    def prefill(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        query_start_loc: Sequence[int] | torch.Tensor,
        block_ids: Sequence[Sequence[int]] | torch.Tensor,
        prefix_lens: Sequence[int] | torch.Tensor,
        layer: int = 0,
        **kwargs: object,
    ) -> torch.Tensor:
        """:func:`~kv_offload.attention.paged_prefill_attention` over this pool's slots."""
        qsl, pre = _lens(query_start_loc, "query_start_loc"), _lens(prefix_lens, "prefix_lens")
        return paged_prefill_attention(
            query, key, value, qsl, self.pool.tensor, _table(block_ids), pre, self.geometry, layer,
            **kwargs,  # type: ignore[arg-type]
        )  # fmt: skip

    def close(self) -> None:
        self.pool.close()


def pin_threads_to_numa_node(node: int) -> int:
    """Pin torch's intra-op threads (and the caller) to NUMA ``node``'s CPUs; returns threads pinned.

    Use it with a pool bound to the same node (``PoolSpec(numa_node=...)``) so the kernels read
    local memory. Linux only.
    """
    return int(ops().pin_intraop_threads(node_cpus(node)))
