# SPDX-License-Identifier: Apache-2.0
"""Host pool: private and shared memory, attach from another process, NUMA, errors."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import uuid

import pytest
import torch

from kv_offload import BACKENDS, BackendSpec, KVGeometry
from kv_offload.pool import HostPool, PinMode, PoolError, PoolSpec
from kv_offload.pool.numa import numa_nodes

SLOT = 8192


def unique_name() -> str:
    return f"test-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def test_private_pool_carves_slots() -> None:
    with HostPool(PoolSpec(capacity_bytes=10 * SLOT + 100, slot_bytes=SLOT)) as pool:
        assert pool.num_slots == 10 and pool.tensor.shape == (10, SLOT)
        assert pool.base_ptr % 4096 == 0
        pool.slot(3).fill_(9)
        assert int(pool.tensor[3].sum()) == 9 * SLOT and int(pool.tensor[2].sum()) == 0
        assert not pool.pinned  # no CUDA here
        with pytest.raises(IndexError):
            pool.slot(10)


def test_capacity_below_one_block_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="cannot hold one KV block of 8192 bytes"):
        PoolSpec(capacity_bytes=SLOT - 1, slot_bytes=SLOT)
    with pytest.raises(ValueError, match="multiple of 4096"):
        PoolSpec(capacity_bytes=1 << 20, slot_bytes=1000)


def test_shared_pool_is_private_to_the_user_and_seen_by_another_process() -> None:
    name = unique_name()
    spec = PoolSpec(capacity_bytes=4 * SLOT, slot_bytes=SLOT, shm_name=name, metadata={"hello": "world"})
    with HostPool(spec) as pool:
        assert pool.shm_path is not None
        assert stat.S_IMODE(os.stat(pool.shm_path).st_mode) == 0o600
        pool.tensor[2] = torch.arange(SLOT, dtype=torch.int64).to(torch.uint8)
        with pytest.raises(PoolError, match="already exists"):
            HostPool(spec)
        code = (
            "import sys, torch\n"
            "from kv_offload.pool import HostPool\n"
            f"p = HostPool.attach({name!r})\n"
            "assert p.readonly and p.num_slots == 4 and p.metadata == {'hello': 'world'}\n"
            "expected = torch.arange(8192, dtype=torch.int64).to(torch.uint8)\n"
            "sys.exit(0 if torch.equal(p.tensor[2], expected) and not p.tensor[1].any() else 3)\n"
        )
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        path = pool.shm_path
    assert not os.path.exists(path), "the creator unlinks the segment on close"
    with pytest.raises(PoolError, match="no shared pool"):
        HostPool.attach(name)


def test_shared_pool_with_oversized_metadata_leaves_no_segment() -> None:
    name = unique_name()
    spec = PoolSpec(capacity_bytes=4 * SLOT, slot_bytes=SLOT, shm_name=name, metadata={"x": "y" * 5000})
    with pytest.raises(PoolError, match="metadata too large"):
        HostPool(spec)
    assert not os.path.exists(f"/dev/shm/kv_offload.{name}")


def test_attach_refuses_foreign_or_truncated_segments_without_leaking() -> None:
    name = unique_name()
    fds_before = len(os.listdir("/proc/self/fd"))
    with HostPool(PoolSpec(capacity_bytes=4 * SLOT, slot_bytes=SLOT, shm_name=name)) as pool:
        assert pool.shm_path is not None
        os.truncate(pool.shm_path, 4096 + 2 * SLOT)
        with pytest.raises(PoolError, match="its header says"):
            HostPool.attach(name)
        os.truncate(pool.shm_path, 100)
        with pytest.raises(PoolError, match="not a kv_offload pool"):
            HostPool.attach(name)
    assert len(os.listdir("/proc/self/fd")) == fds_before


def test_numa_bound_pool_is_touched_and_usable() -> None:
    node = numa_nodes()[0]
    with HostPool(PoolSpec(capacity_bytes=4 * SLOT, slot_bytes=SLOT, numa_node=node, pin=PinMode.NEVER)) as pool:
        pool.tensor.fill_(1)
        assert int(pool.tensor.sum()) == 4 * SLOT


def test_missing_numa_node_is_named() -> None:
    with pytest.raises(ValueError, match="numa_node 4096 does not exist"):
        HostPool(PoolSpec(capacity_bytes=4 * SLOT, slot_bytes=SLOT, numa_node=4096))


def test_host_backend_sizes_without_allocating_and_rejects_unknown_options() -> None:
    geometry = KVGeometry(num_layers=2, num_kv_heads=2, head_size=64, block_size=16, dtype=torch.bfloat16)
    cls = BACKENDS.resolve("host")
    backend = cls(BackendSpec(capacity_bytes=10 * geometry.slot_bytes + 1, geometry=geometry))
    assert backend.num_slots() == 10
    region = backend.open()
    assert region.shape == (10, geometry.slot_bytes) and region.dtype == torch.uint8
    del region
    backend.close()
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['prefetch'\]"):
        cls(BackendSpec(capacity_bytes=1 << 20, geometry=geometry, options={"prefetch": 1}))
