# SPDX-License-Identifier: Apache-2.0
"""The CUDA path's pure logic on CPU: descriptors, coalescing, splitting, method choice, imports."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kv_offload.geometry import KVGeometry, PageFormat
from kv_offload.transfer import CopyBatch, Direction, TransferJob, build_copy_batch, regions_from_layers
from kv_offload.transfer.cuda_batch import CopyCall, CopyMethod, CopyPolicy, plan_calls, split_batch

# Llama-3-8B-like: 32 layers, 8 KV heads, head size 128, 16-token blocks, bf16.
LLAMA = KVGeometry(
    num_layers=32, num_kv_heads=8, head_size=128, block_size=16, dtype=torch.bfloat16, page_format=PageFormat.HND
)
NUM_BLOCKS = 6
NUM_SLOTS = 5


def llama_layers(layout: str) -> list[torch.Tensor]:
    """Layer views as vLLM builds them (meta tensors: only strides and pointers matter)."""
    g = LLAMA
    tail = (g.num_kv_heads, g.block_size, g.head_size + g.v_head_size)
    if layout == "LBHNC":
        storage = torch.empty(g.num_layers, NUM_BLOCKS, *tail, dtype=g.dtype)
        return [storage[i] for i in range(g.num_layers)]
    storage = torch.empty(NUM_BLOCKS, g.num_layers, *tail, dtype=g.dtype)
    return [storage[:, i] for i in range(g.num_layers)]


HOST_BASE = 1 << 40


def batch_for(layout: str, direction: Direction, blocks: list[int], slots: list[int], merge: bool = True) -> tuple[CopyBatch, int]:
    layers = llama_layers(layout)
    regions = regions_from_layers(layers, LLAMA)
    job = TransferJob.make(1, direction, blocks, slots)
    batch = build_copy_batch(job, regions, HOST_BASE, LLAMA.slot_bytes, NUM_SLOTS, merge=merge)
    return batch, layers[0].data_ptr()


def test_llama_geometry_is_64k_pages_and_2m_blocks() -> None:
    assert LLAMA.page_bytes == 64 << 10
    assert LLAMA.block_bytes == LLAMA.slot_bytes == 2 << 20


@pytest.mark.parametrize("direction", list(Direction))
def test_per_layer_pages_give_one_descriptor_per_page_at_the_right_addresses(direction: Direction) -> None:
    blocks, slots = [4, 1, 2], [0, 3, 1]
    batch, base = batch_for("LBHNC", direction, blocks, slots)
    page, layer_bytes = LLAMA.page_bytes, NUM_BLOCKS * LLAMA.page_bytes
    dev = [base + layer * layer_bytes + b * page for b in blocks for layer in range(32)]
    host = [HOST_BASE + s * LLAMA.slot_bytes + layer * page for s in slots for layer in range(32)]
    src, dst = (dev, host) if direction is Direction.STORE else (host, dev)
    assert batch.src.tolist() == src
    assert batch.dst.tolist() == dst
    assert batch.sizes.tolist() == [page] * 96
    # Pages of one block are a layer apart on the device: nothing merges.
    unmerged, _ = batch_for("LBHNC", direction, blocks, slots, merge=False)
    assert unmerged.num_descriptors == batch.num_descriptors


@pytest.mark.parametrize("direction", list(Direction))
def test_block_outermost_layout_coalesces_to_one_2mib_descriptor_per_block(direction: Direction) -> None:
    blocks, slots = [5, 0, 3], [2, 4, 0]
    batch, base = batch_for("BLHNC", direction, blocks, slots)
    dev = [base + b * LLAMA.block_bytes for b in blocks]
    host = [HOST_BASE + s * LLAMA.slot_bytes for s in slots]
    src, dst = (dev, host) if direction is Direction.STORE else (host, dev)
    assert batch.src.tolist() == src
    assert batch.dst.tolist() == dst
    assert batch.sizes.tolist() == [2 << 20] * 3
    unmerged, _ = batch_for("BLHNC", direction, blocks, slots, merge=False)
    assert unmerged.num_descriptors == 96 and unmerged.total_bytes == batch.total_bytes


def test_consecutive_blocks_to_consecutive_slots_merge_across_blocks_when_packed() -> None:
    batch, base = batch_for("BLHNC", Direction.STORE, [1, 2, 3], [0, 1, 2])
    assert batch.src.tolist() == [base + LLAMA.block_bytes]
    assert batch.sizes.tolist() == [3 * LLAMA.block_bytes]


def _random_batch(rng: np.random.Generator, n: int) -> CopyBatch:
    return CopyBatch(
        src=rng.integers(0, 1 << 40, n, dtype=np.int64),
        dst=rng.integers(0, 1 << 40, n, dtype=np.int64),
        sizes=rng.integers(1, 1 << 22, n, dtype=np.int64),
    )


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 300), cap=st.integers(1, 64), seed=st.integers(0, 2**16))
def test_split_batch_keeps_every_descriptor_in_order(n: int, cap: int, seed: int) -> None:
    batch = _random_batch(np.random.default_rng(seed), n)
    pieces = split_batch(batch, cap)
    assert all(1 <= p.num_descriptors <= cap for p in pieces)
    assert len(pieces) == -(-n // cap)
    for name in ("src", "dst", "sizes"):
        joined = np.concatenate([getattr(p, name) for p in pieces]) if pieces else np.zeros(0, np.int64)
        assert np.array_equal(joined, getattr(batch, name))
    assert all(p.src.flags.c_contiguous and p.src.dtype == np.int64 for p in pieces)


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(0, 200),
    cap=st.integers(1, 50),
    min_batch=st.integers(1, 8),
    available=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_plan_calls_covers_the_batch_and_respects_the_policy(
    n: int, cap: int, min_batch: int, available: bool, seed: int
) -> None:
    batch = _random_batch(np.random.default_rng(seed), n)
    policy = CopyPolicy(batch_available=available, max_descriptors=cap, min_batch_descriptors=min_batch)
    calls = plan_calls(batch, policy)
    joined = np.concatenate([c.batch.src for c in calls]) if calls else np.zeros(0, np.int64)
    assert np.array_equal(joined, batch.src)
    assert sum(c.batch.total_bytes for c in calls) == batch.total_bytes
    for call in calls:
        if call.method is CopyMethod.BATCH:
            assert available and min_batch <= call.batch.num_descriptors <= cap
        else:
            assert not available or call.batch.num_descriptors < min_batch
    if not available and n:
        assert calls == [CopyCall(CopyMethod.LOOP, batch)]


def test_policy_method_choice_and_validation() -> None:
    policy = CopyPolicy(batch_available=True, min_batch_descriptors=4)
    assert policy.method_for(3) is CopyMethod.LOOP
    assert policy.method_for(4) is CopyMethod.BATCH
    assert CopyPolicy(batch_available=False).method_for(1000) is CopyMethod.LOOP
    with pytest.raises(ValueError, match="max_descriptors"):
        CopyPolicy(batch_available=True, max_descriptors=0)
    with pytest.raises(ValueError, match="min_batch_descriptors"):
        CopyPolicy(batch_available=True, min_batch_descriptors=0)
    with pytest.raises(ValueError):
        split_batch(CopyBatch(np.zeros(1, np.int64), np.zeros(1, np.int64), np.ones(1, np.int64)), 0)


def test_one_packed_job_of_many_blocks_is_split_into_capped_batched_calls() -> None:
    blocks = list(range(NUM_BLOCKS))[::-1]
    batch, _ = batch_for("LBHNC", Direction.LOAD, blocks[:5], [0, 1, 2, 3, 4])
    calls = plan_calls(batch, CopyPolicy(batch_available=True, max_descriptors=64))
    assert [c.batch.num_descriptors for c in calls] == [64, 64, 32]
    assert {c.method for c in calls} == {CopyMethod.BATCH}


def test_cuda_modules_import_with_cuda_python_missing() -> None:
    """Importing the CUDA path needs neither a GPU nor cuda-python (it is imported lazily)."""
    code = (
        "import sys, importlib.abc\n"
        "class NoCudaPython(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'cuda' or name.startswith('cuda.'):\n"
        "            raise ImportError('cuda-python is not installed: ' + name)\n"
        "sys.meta_path.insert(0, NoCudaPython())\n"
        "import torch\n"
        "import kv_offload.transfer.cuda_engine, kv_offload.cuda.copy, kv_offload.cuda.runtime\n"
        "import kv_offload.transfer.stream_schedule, kv_offload.transfer.cuda_batch\n"
        "assert not torch.cuda.is_initialized()\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_engine_without_a_gpu_raises_a_clear_error() -> None:
    from kv_offload.transfer.cuda_engine import CudaTransferEngine

    regions = regions_from_layers(llama_layers("BLHNC"), LLAMA)
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        CudaTransferEngine(regions, torch.zeros(2, LLAMA.slot_bytes, dtype=torch.uint8))


def test_gpu_benchmark_without_a_gpu_exits_with_a_clear_message(tmp_path: object) -> None:
    import os
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out_json = Path(str(tmp_path)) / "out.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(root))
    out = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "bench_gpu_transfer.py"), "--json", str(out_json)],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert "no CUDA device" in out.stderr and "Traceback" not in out.stderr
    assert not out_json.exists()
