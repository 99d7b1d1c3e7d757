# SPDX-License-Identifier: Apache-2.0
"""Transfer engines given hostile input: a clear error, never a wrong copy or a crash.

Inputs that used to crash the process run in a child, which must exit cleanly with the
expected error (a signal shows as a negative return code).
"""

from __future__ import annotations

import os
import uuid

import numpy as np
import pytest
import torch

from child_process import assert_clean, run_child
from kv_layouts import make_kv_cache
from kv_offload.geometry import KVGeometry, PageFormat
from kv_offload.transfer import Direction, TransferError, TransferJob, regions_from_layers
from kv_offload.transfer.cpu_engine import CpuTransferEngine
from kv_offload.transfer.cuda_engine import CudaTransferEngine



def geometry(num_layers: int) -> KVGeometry:
    return KVGeometry(num_layers=num_layers, num_kv_heads=2, head_size=64, block_size=16,
                      dtype=torch.bfloat16, page_format=PageFormat.HND)  # fmt: skip


# -- item 3: a block's pages must fit in one pool slot --------------------------------------
def test_pool_for_a_smaller_geometry_is_refused_when_the_engine_is_built() -> None:
    """A 4-layer cache over a pool of 1-layer slots: STORE used to write past the mapping."""
    proc = run_child("""
        import torch
        from kv_layouts import make_kv_cache
        from kv_offload.geometry import KVGeometry, PageFormat
        from kv_offload.pool import HostPool, PoolSpec
        from kv_offload.transfer import Direction, TransferJob, regions_from_layers
        from kv_offload.transfer.cpu_engine import CpuTransferEngine

        def geom(n):
            return KVGeometry(num_layers=n, num_kv_heads=2, head_size=64, block_size=16,
                              dtype=torch.bfloat16, page_format=PageFormat.HND)
        big, small = geom(4), geom(1)
        cache = make_kv_cache(big, 8, "per_layer")
        pool = HostPool(PoolSpec(capacity_bytes=2 * small.slot_bytes, slot_bytes=small.slot_bytes))
        try:
            engine = CpuTransferEngine(regions_from_layers(cache.layers, big), pool.tensor)
        except ValueError as exc:
            print("REFUSED", exc)
            raise SystemExit(0)
        engine.submit(TransferJob.make(1, Direction.STORE, [0], [1]))  # the last slot
        engine.wait([1])
        print("ACCEPTED", engine.poll())
        raise SystemExit(5)
    """)
    assert_clean(proc, "REFUSED")
    g1, g4 = geometry(1), geometry(4)
    assert f"needs {g4.block_bytes} bytes" in proc.stdout and f"hold {g1.slot_bytes} bytes" in proc.stdout


def test_cuda_engine_checks_the_slot_size_with_the_same_plan_code() -> None:
    """No GPU needed: the check runs before any CUDA call."""
    big, small = geometry(4), geometry(1)
    cache = make_kv_cache(big, 8, "per_layer")
    pool = torch.zeros(2, small.slot_bytes, dtype=torch.uint8)
    with pytest.raises(ValueError, match=f"needs {big.block_bytes} bytes of a host slot.*hold {small.slot_bytes}"):
        CudaTransferEngine(regions_from_layers(cache.layers, big), pool)


def test_pool_rows_narrower_than_their_stride_are_measured_by_their_width() -> None:
    g = geometry(2)
    cache = make_kv_cache(g, 4, "per_layer")
    wide = torch.zeros(3, 2 * g.slot_bytes, dtype=torch.uint8)
    with pytest.raises(ValueError, match="pool's slots hold"):
        CpuTransferEngine(regions_from_layers(cache.layers, g), wide[:, : g.slot_bytes // 2])


# -- item 4 (engine part): no STORE into a read-only attach ---------------------------------
def test_engine_refuses_store_into_a_read_only_pool_and_still_loads() -> None:
    name = f"test-ro-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    proc = run_child(f"""
        import torch
        from kv_layouts import make_kv_cache
        from kv_offload.geometry import KVGeometry, PageFormat
        from kv_offload.pool import HostPool, PoolSpec
        from kv_offload.transfer import Direction, TransferError, TransferJob, regions_from_layers
        from kv_offload.transfer.cpu_engine import CpuTransferEngine

        g = KVGeometry(num_layers=2, num_kv_heads=2, head_size=64, block_size=16,
                       dtype=torch.bfloat16, page_format=PageFormat.HND)
        cache = make_kv_cache(g, 8, "per_layer")
        owner = HostPool(PoolSpec(capacity_bytes=4 * g.slot_bytes, slot_bytes=g.slot_bytes, shm_name={name!r}))
        owner.tensor[2].random_(0, 256)
        before = owner.tensor.clone()
        reader = HostPool.attach({name!r}, readonly=True)
        engine = CpuTransferEngine(regions_from_layers(cache.layers, g), reader.tensor)
        try:
            engine.submit(TransferJob.make(1, Direction.STORE, [0, 1], [0, 1]))
        except TransferError as exc:
            print("REFUSED", exc)
        engine.submit(TransferJob.make(2, Direction.LOAD, [5], [2]))
        engine.wait([2])
        assert engine.poll()[0].success
        page = g.page_bytes
        assert torch.equal(cache.layers[1][5].reshape(-1).view(torch.uint8), owner.tensor[2, page : 2 * page])
        assert torch.equal(owner.tensor, before), "the owner's data changed"
        engine.shutdown()
        owner.close()
    """)
    leftover = f"/dev/shm/kv_offload.{name}"
    if os.path.exists(leftover):  # a crashed child never unlinks its segment
        os.unlink(leftover)
        pytest.fail(f"the child left its segment behind\n{proc.stderr}")
    assert_clean(proc, "REFUSED")
    assert "read-only" in proc.stdout


# -- item 5: the raw-address copy op is internal and checks what it can ---------------------
def test_raw_copy_op_is_private_and_refuses_null_and_overflowing_sizes() -> None:
    proc = run_child("""
        import torch
        from kv_offload._native import load_native
        load_native()
        ops = torch.ops.kv_offload
        assert not hasattr(ops, "copy_segments"), "the raw-address op is still public"
        buf = torch.zeros(64, dtype=torch.uint8)
        p = buf.data_ptr()
        L = lambda *v: torch.tensor(v, dtype=torch.int64)
        cases = {
            "NULL": (L(0), L(p), L(8)),
            "NULL dst": (L(p), L(0), L(8)),
            "overflow": (L(p, p), L(p, p), L(1 << 62, 1 << 62)),
            "overflows": (L(p), L(p), L((1 << 63) - 1)),
            "negative": (L(p), L(p), L(-1)),
        }
        for what, (src, dst, sizes) in cases.items():
            try:
                ops._copy_segments(src, dst, sizes, 2)
            except RuntimeError as exc:
                print("REFUSED", what, "|", str(exc).splitlines()[0])
            else:
                raise SystemExit(f"{what}: accepted")
        ops._copy_segments(L(), L(), L(), 1)  # empty is fine
        ops._copy_segments(L(0), L(0), L(0), 1)  # zero bytes touch nothing
    """)
    assert_clean(proc, "REFUSED")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REFUSED")]
    assert len(lines) == 5
    assert "NULL address" in lines[0] and "NULL address" in lines[1]
    assert "overflows" in lines[2] and "overflows" in lines[3] and "negative size" in lines[4]


def test_engine_module_exports_no_raw_copy_entry_point() -> None:
    import kv_offload.transfer.cpu_engine as cpu_engine

    assert "run_copy_batch" not in cpu_engine.__all__ and not hasattr(cpu_engine, "run_copy_batch")


# -- item 7: block ids are exact integers ---------------------------------------------------
@pytest.mark.parametrize(
    "ids",
    [
        [1.9],
        [1.0],
        np.array([1.0, 2.0]),
        np.array([0.5], dtype=np.float32),
        [True],
        [1, True],
        np.array([True, False]),
        ["1"],
        [1 + 0j],
        [2**63],
        [2**70],
        [-(2**63) - 1],
        np.array([2**63], dtype=np.uint64),
        [None],
        [[1, 2], [3]],
    ],
    ids=repr,
)
def test_non_integer_or_oversized_block_ids_are_refused(ids: object) -> None:
    n = len(ids)  # type: ignore[arg-type]
    with pytest.raises(TransferError, match="job 3: device blocks"):
        TransferJob.make(3, Direction.STORE, ids, list(range(n)))  # type: ignore[arg-type]
    with pytest.raises(TransferError, match="job 3: host slots"):
        TransferJob.make(3, Direction.LOAD, list(range(n)), ids)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "ids", [[1, 2], (1, 2), np.array([1, 2], dtype=np.int32), np.array([1, 2], dtype=np.uint8),
            [np.int64(1), np.int16(2)], torch.tensor([1, 2]), range(1, 3), []],  # fmt: skip
    ids=repr,
)
def test_integer_block_ids_of_any_integer_type_are_taken(ids: object) -> None:
    job = TransferJob.make(1, Direction.STORE, ids, list(range(len(ids))))  # type: ignore[arg-type]
    assert job.device_blocks.dtype == np.int64 and job.device_blocks.tolist() == list(ids)  # type: ignore[call-overload]


def test_jobs_built_without_make_are_checked_when_planned() -> None:
    g = geometry(2)
    cache = make_kv_cache(g, 4, "per_layer")
    pool = torch.zeros(4, g.slot_bytes, dtype=torch.uint8)
    engine = CpuTransferEngine(regions_from_layers(cache.layers, g), pool)
    try:
        bad = TransferJob(1, Direction.STORE, np.array([1.9]), np.array([0]))  # type: ignore[arg-type]
        with pytest.raises(TransferError, match="1-D int64"):
            engine.submit(bad)
        assert engine.pending() == 0
    finally:
        engine.shutdown()
