# SPDX-License-Identifier: Apache-2.0
"""Eviction policies, admission, and the lazy registry (built-ins and module-path classes)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from kv_offload import BACKENDS, POLICIES, BackendSpec, KVGeometry, OffloadManager, RegistryError, StorageBackend
from kv_offload.policies import EvictionPolicy
from kv_offload.policies.arc import ARCPolicy
from kv_offload.policies.lru import LRUPolicy
from kv_offload.registry import Registry

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


def k(i: int) -> bytes:
    return i.to_bytes(4, "big")


def store(m: OffloadManager, *ids: int) -> None:
    plan = m.prepare_store([k(i) for i in ids])
    assert plan is not None
    m.complete_store(plan.keys)


def test_lru_evicts_least_recently_used() -> None:
    m = OffloadManager(3, LRUPolicy(3))
    store(m, 1, 2, 3)
    m.touch([k(1)])  # 2 is now the oldest
    plan = m.prepare_store([k(4)])
    assert plan is not None and plan.evicted == (k(2),)
    assert m.lookup([k(1)]) == 1 and m.lookup([k(2)]) == 0


def test_lru_skips_blocks_in_use_and_refuses_when_all_are() -> None:
    m = OffloadManager(2, LRUPolicy(2))
    store(m, 1, 2)
    m.prepare_load([k(1)])
    plan = m.prepare_store([k(3)])
    assert plan is not None and plan.evicted == (k(2),)  # 1 is being read
    assert m.prepare_store([k(4)]) is None  # 1 read, 3 being written
    assert m.stats.stores_skipped == 1
    m.complete_load([k(1)])
    m.complete_store([k(3)])
    plan = m.prepare_store([k(4)])
    assert plan is not None and plan.evicted == (k(1),)


def test_arc_keeps_frequent_blocks_over_a_scan() -> None:
    m = OffloadManager(4, ARCPolicy(4))
    store(m, 1, 2)
    m.touch([k(1), k(2)])  # 1 and 2 now frequent (T2)
    for i in range(10, 30):  # a long scan of blocks seen once
        store(m, i)
    assert m.lookup([k(1), k(2)]) == 2
    lru = OffloadManager(4, LRUPolicy(4))
    store(lru, 1, 2)
    lru.touch([k(1), k(2)])
    for i in range(10, 30):
        store(lru, i)
    assert lru.lookup([k(1)]) == 0  # LRU lost them to the scan


def test_arc_ghost_hit_adapts_target() -> None:
    p = ARCPolicy(2)
    for key in (k(1), k(2)):
        p.insert(key)
    assert p.evict(1, lambda _: True) == [k(1)]  # from T1 into ghost B1
    p.insert(k(1))  # ghost hit: T1 was too small
    assert p.p > 0
    assert k(1) in list(p.keys())


def test_failed_evict_changes_nothing() -> None:
    for policy in (LRUPolicy(3), ARCPolicy(3)):
        for i in range(3):
            policy.insert(k(i))
        before = list(policy.keys())
        assert policy.evict(2, lambda key: key == k(0)) is None
        assert list(policy.keys()) == before


def test_admission_threshold_stores_on_nth_offer() -> None:
    m = OffloadManager(4, LRUPolicy(4), store_threshold=3)
    for _ in range(2):
        plan = m.prepare_store([k(1)])
        assert plan is not None and plan.keys == ()
    plan = m.prepare_store([k(1)])
    assert plan is not None and plan.keys == (k(1),)


def test_refused_store_keeps_its_keys_admitted() -> None:
    m = OffloadManager(1, LRUPolicy(1), store_threshold=2)
    store(m, 1)
    store(m, 1)  # second offer: stored
    m.prepare_load([k(1)])  # the only block is being read: nothing can be evicted
    plan = m.prepare_store([k(2)])
    assert plan is not None and plan.keys == ()  # first offer of 2: only counted
    assert m.prepare_store([k(2)]) is None  # second offer: admitted, but no room
    m.complete_load([k(1)])
    plan = m.prepare_store([k(2)])  # room now: the refusal must not have reset the count
    assert plan is not None and plan.keys == (k(2),) and plan.evicted == (k(1),)


def test_complete_store_with_a_bad_key_changes_nothing() -> None:
    m = OffloadManager(4, LRUPolicy(4))
    plan = m.prepare_store([k(1), k(2)])
    assert plan is not None
    for bad in ([k(1), k(9)], [k(1), k(1)]):
        with pytest.raises(KeyError, match="no store in progress"):
            m.complete_store(bad)
        assert m.lookup([k(1)]) == 0 and m.num_writing == 2
    assert m.take_events() == [] and m.stats.stores == 0
    m.complete_store([k(1), k(2)])
    assert [(e.kind.value, e.keys) for e in m.take_events()] == [("stored", (k(1), k(2)))]


def test_complete_load_with_a_bad_key_changes_nothing() -> None:
    m = OffloadManager(2, LRUPolicy(2))
    store(m, 1, 2)
    m.prepare_load([k(1)])
    for bad in ([k(1), k(2)], [k(1), k(1)], [k(1), k(7)]):
        with pytest.raises(KeyError, match="no load in progress"):
            m.complete_load(bad)
        assert m.num_reading == 1
    m.prepare_load([k(1)])
    m.complete_load([k(1), k(1)])  # two loads of one block end together
    assert m.num_reading == 0 and m.stats.loads == 2


def test_complete_store_failure_frees_the_slot() -> None:
    m = OffloadManager(1, LRUPolicy(1), block_bytes=10)
    plan = m.prepare_store([k(1)])
    assert plan is not None and m.num_free == 0
    assert m.lookup([k(1)]) == 0  # not readable while being written
    m.complete_store(plan.keys, success=False)
    assert m.num_free == 1 and m.lookup([k(1)]) == 0
    assert m.stats.store_failures == 1 and m.stats.bytes_stored == 0
    store(m, 2)
    assert m.stats.stores == 1 and m.stats.bytes_stored == 10


def test_events_report_stores_and_evictions() -> None:
    m = OffloadManager(1, LRUPolicy(1))
    store(m, 1)
    store(m, 2)
    kinds = [(e.kind.value, e.keys) for e in m.take_events()]
    assert kinds == [("stored", (k(1),)), ("evicted", (k(1),)), ("stored", (k(2),))]
    assert m.take_events() == []


def test_prepare_load_of_missing_block_protects_nothing() -> None:
    m = OffloadManager(2, LRUPolicy(2))
    store(m, 1)
    with pytest.raises(KeyError, match="not stored"):
        m.prepare_load([k(1), k(2)])
    assert m.num_reading == 0


def test_builtin_registries_resolve_lazily() -> None:
    assert POLICIES.names() == ["arc", "lru"]
    assert POLICIES.resolve("lru") is LRUPolicy
    assert "host" in BACKENDS


def test_unknown_name_lists_what_is_registered() -> None:
    with pytest.raises(RegistryError, match=r"unknown eviction policy 'lfu'; registered: \['arc', 'lru'\]"):
        POLICIES.resolve("lfu")


def test_duplicate_registration_is_refused() -> None:
    reg: Registry[EvictionPolicy] = Registry("eviction policy", EvictionPolicy)
    reg.register("x", "plugins.fifo_policy", "FIFOPolicy")
    with pytest.raises(RegistryError, match="already registered"):
        reg.register("x", "elsewhere", "Other")


def test_policy_by_module_path_drives_the_manager() -> None:
    cls = POLICIES.resolve("FIFOPolicy", module_path="plugins.fifo_policy")
    m = OffloadManager(2, cls(2))
    store(m, 1, 2)
    m.touch([k(1)])  # FIFO ignores it: 1 still goes first
    plan = m.prepare_store([k(3)])
    assert plan is not None and plan.evicted == (k(1),)


def test_registered_out_of_tree_policy_resolves_by_name() -> None:
    reg: Registry[EvictionPolicy] = Registry("eviction policy", EvictionPolicy)
    reg.register("fifo", "plugins.fifo_policy", "FIFOPolicy")
    assert reg.resolve("fifo").__name__ == "FIFOPolicy"


@pytest.mark.parametrize(
    ("name", "module", "message"),
    [
        ("FIFOPolicy", "plugins.no_such_module", "cannot import module 'plugins.no_such_module'"),
        ("Missing", "plugins.fifo_policy", "has no class 'Missing'"),
        ("NotAPolicy", "plugins.fifo_policy", "is not a subclass of EvictionPolicy"),
    ],
)
def test_module_path_errors_name_the_problem(name: str, module: str, message: str) -> None:
    with pytest.raises(RegistryError, match=message):
        POLICIES.resolve(name, module_path=module)


def test_backend_by_module_path_from_examples(tmp_path: "os.PathLike[str]") -> None:
    sys.path.insert(0, EXAMPLES)
    try:
        cls = BACKENDS.resolve("FileBackend", module_path="file_backend")
    finally:
        sys.path.remove(EXAMPLES)
    assert issubclass(cls, StorageBackend)
    geometry = KVGeometry(num_layers=2, num_kv_heads=1, head_size=16, block_size=16, dtype=torch.float16)
    spec = BackendSpec(capacity_bytes=5 * geometry.slot_bytes, geometry=geometry, options={"path": str(tmp_path)})
    backend = cls(spec)
    assert backend.num_slots() == 5
    region = backend.open()
    region[3].fill_(7)
    backend.on_stored([3])
    backend.close()
    reopened = cls(spec)
    assert bool((reopened.open()[3] == 7).all())  # blocks survive a restart
    reopened.close()
