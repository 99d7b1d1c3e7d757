# SPDX-License-Identifier: Apache-2.0
"""Fuzzing the public transfer entry points with hostile block ids, slot ids, layers and pools.

Every input either raises a clean error (TransferError, ValueError, TypeError) or copies
exactly what the reference says: destination equal to the mapped source, source unchanged,
every other block unchanged. An independent oracle says which of the two must happen. The
search runs in a child process, so a crash shows as a signal instead of killing pytest.
Bounded for CI: a few seconds on two cores (derandomized, so every run checks the same cases).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kv_layouts import LAYOUTS, KVCache, make_kv_cache, small_geometry
from kv_offload.transfer import Direction, TransferError, TransferJob, regions_from_layers
from kv_offload.transfer.cpu_engine import CpuTransferEngine

CLEAN = (TransferError, ValueError, TypeError)
GEOM = small_geometry()  # 3 layers, float32, 8 KiB pages
NUM_BLOCKS = 10
NUM_SLOTS = 6
FUZZ = settings(max_examples=400, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))  # fmt: skip
_job_ids = itertools.count(1)


# -- the oracle ------------------------------------------------------------------------------
def exact_ints(values: Any) -> list[int] | None:
    """``values`` as a list of ints if it is a 1-D list of integers within int64, else None."""
    if isinstance(values, torch.Tensor):
        values = values.numpy()
    if isinstance(values, (np.ndarray, np.generic)):
        values = np.asarray(values)
        if values.ndim != 1:
            return None
        if values.size == 0:
            return []
        if values.dtype.kind not in "iu":
            return None
        items = [int(v) for v in values]
    else:
        items = list(values)
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in items):
            return None
        items = [int(v) for v in items]
    return items if all(-(1 << 63) <= v < (1 << 63) for v in items) else None


# -- hostile ids -----------------------------------------------------------------------------
ID_VALUES = st.one_of(
    st.integers(-3, NUM_BLOCKS + 3),
    st.integers(-(1 << 70), 1 << 70),
    st.sampled_from([(1 << 63) - 1, -(1 << 63), 1 << 63, 1 << 64, -(1 << 63) - 1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 1.0, 1.9, -0.5]),
    st.booleans(),
    st.text(max_size=2),
    st.none(),
    st.builds(np.int32, st.integers(0, NUM_BLOCKS)),
)
NP_DTYPES = st.sampled_from([np.int64, np.int32, np.uint8, np.uint64, np.float64, np.float32, np.bool_])
ID_LISTS = st.one_of(
    st.lists(st.integers(0, NUM_SLOTS - 1), max_size=5),  # mostly valid
    st.lists(st.integers(0, NUM_SLOTS - 1), max_size=5).map(tuple),
    st.lists(ID_VALUES, max_size=5),
    st.builds(
        lambda v, dt: np.array(v, dtype=np.int64).astype(dt), st.lists(st.integers(-2, NUM_BLOCKS + 2), max_size=5), NP_DTYPES
    ),
    st.lists(st.integers(0, 5), min_size=1, max_size=6).map(lambda v: np.array(v).reshape(-1, 1)),  # 2-D
    st.lists(st.lists(st.integers(0, 5), max_size=3), min_size=1, max_size=3),  # nested, maybe ragged
    st.just(np.int64(3)),  # 0-D
)


ID_FORMS: list[Callable[[list[int]], Any]] = [
    list, tuple, lambda v: np.array(v, dtype=np.int64), lambda v: np.array(v, dtype=np.int64).astype(np.int32),
    lambda v: np.array(v, dtype=np.int64).astype(np.uint8), lambda v: [np.int64(x) for x in v],
    lambda v: torch.tensor(v, dtype=torch.int64),
]  # fmt: skip


@st.composite
def id_pairs(draw: st.DrawFn) -> tuple[Any, Any]:
    """Device-block and host-slot lists: often a well-formed job (in range or not, duplicates
    or not), otherwise anything from :data:`ID_LISTS`."""
    n = draw(st.integers(0, 5))

    def one(limit: int) -> Any:
        if draw(st.integers(0, 3)) == 0:
            return draw(ID_LISTS)
        ids = draw(st.lists(st.integers(0, limit - 1), min_size=n, max_size=n, unique=draw(st.booleans())))
        if n and draw(st.integers(0, 5)) == 0:
            ids[draw(st.integers(0, n - 1))] = draw(st.sampled_from([-1, limit, 1 << 40]))
        return draw(st.sampled_from(ID_FORMS))(ids)

    return one(NUM_BLOCKS), one(NUM_SLOTS)


class Rig:
    """One engine per layout, reused across examples (its job ids never repeat)."""

    def __init__(self, layout: str) -> None:
        self.cache = make_kv_cache(GEOM, NUM_BLOCKS, layout, seed=len(layout))
        self.pool = torch.randint(0, 256, (NUM_SLOTS, GEOM.slot_bytes), dtype=torch.uint8)
        self.engine = CpuTransferEngine(regions_from_layers(self.cache.layers, GEOM), self.pool, num_threads=2)


def storage_views(cache: KVCache, storage: torch.Tensor) -> list[torch.Tensor]:
    base = cache.storage
    return [storage.as_strided(t.shape, t.stride(), t.storage_offset() - base.storage_offset()) for t in cache.layers]


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (pool bytes copied into float pages may be NaN patterns)."""
    return torch.equal(as_bytes(a.contiguous()), as_bytes(b.contiguous()))


def run_job(engine: CpuTransferEngine, job: TransferJob) -> None:
    engine.submit(job)
    engine.wait([job.job_id])
    results = engine.poll()
    assert [r.job_id for r in results] == [job.job_id] and results[0].success, results


_rigs: dict[str, Rig] = {}


@FUZZ
@given(layout=st.sampled_from(LAYOUTS), direction=st.sampled_from(list(Direction)), ids=id_pairs())
def fuzz_block_and_slot_ids(layout: str, direction: Direction, ids: tuple[Any, Any]) -> None:
    dev, host = ids
    rig = _rigs[layout] if layout in _rigs else _rigs.setdefault(layout, Rig(layout))
    dev_ok, host_ok = exact_ints(dev), exact_ints(host)
    valid = dev_ok is not None and host_ok is not None and len(dev_ok) == len(host_ok)
    if valid:
        assert dev_ok is not None and host_ok is not None
        written = dev_ok if direction is Direction.LOAD else host_ok
        valid = (all(0 <= b < NUM_BLOCKS for b in dev_ok) and all(0 <= s < NUM_SLOTS for s in host_ok)
                 and len(set(written)) == len(written))  # fmt: skip
    kv_before, pool_before = rig.cache.storage.clone(), rig.pool.clone()
    try:
        job = TransferJob.make(next(_job_ids), direction, dev, host)
        run_job(rig.engine, job)
    except CLEAN:
        assert not valid, f"valid job refused: {dev!r} -> {host!r}"
        assert same(rig.cache.storage, kv_before) and same(rig.pool, pool_before)
        assert rig.engine.pending() == 0
        return
    assert valid, f"invalid job accepted: {direction} {dev!r} -> {host!r}"
    assert dev_ok is not None and host_ok is not None
    expected_kv, expected_pool = kv_before.clone(), pool_before.clone()
    views = storage_views(rig.cache, expected_kv)
    before_views = storage_views(rig.cache, kv_before)
    for b, s in zip(dev_ok, host_ok):
        for layer in range(GEOM.num_layers):
            page = slice(GEOM.page_offset(layer), GEOM.page_offset(layer) + GEOM.page_bytes)
            if direction is Direction.STORE:
                expected_pool[s, page] = as_bytes(before_views[layer][b])
            else:
                as_bytes(views[layer][b]).copy_(pool_before[s, page])
    assert torch.equal(rig.pool, expected_pool), "pool differs from the reference"
    assert same(rig.cache.storage, expected_kv), "KV cache differs from the reference"


# -- odd layers and pools --------------------------------------------------------------------
H, N, C = GEOM.num_kv_heads, GEOM.block_size, GEOM.head_size + GEOM.v_head_size
PAGE = GEOM.page_elements
# name -> (base tensor for nb blocks, view of it the layer is, accepted by the engine)
LayerKind = tuple[Callable[[int], Any], Callable[[Any], Any], bool]
LAYER_KINDS: dict[str, LayerKind] = {
    "plain": (lambda nb: torch.randn(nb, H, N, C), lambda b: b, True),
    "padded": (lambda nb: torch.randn(nb, PAGE + 64), lambda b: b[:, :PAGE].unflatten(1, (H, N, C)), True),
    "every_other_block": (lambda nb: torch.randn(2 * nb, H, N, C), lambda b: b[::2], True),
    "bf16_same_bytes": (lambda nb: torch.randn(nb, 2 * PAGE).to(torch.bfloat16), lambda b: b, True),
    "int8_same_bytes": (lambda nb: torch.randint(-128, 128, (nb, 4 * PAGE), dtype=torch.int8), lambda b: b, True),
    "wrong_bytes": (lambda nb: torch.randn(nb, H, N, C - 1), lambda b: b, False),
    "transposed_block": (lambda nb: torch.randn(nb, H, N, C), lambda b: b.transpose(1, 2), False),
    "blocks_last": (lambda nb: torch.randn(H, N, C, nb), lambda b: b.permute(3, 0, 1, 2), False),
    "expanded": (lambda nb: torch.randn(1, H, N, C), lambda b: b.expand(4, H, N, C), False),
    "meta": (lambda nb: torch.empty(nb, H, N, C, device="meta"), lambda b: b, False),
    "sparse": (lambda nb: torch.randn(nb, PAGE), lambda b: b.to_sparse(), False),
    "no_blocks": (lambda nb: torch.randn(0, H, N, C), lambda b: b, False),
    "scalar": (lambda nb: torch.tensor(1.0), lambda b: b, False),
    "numpy": (lambda nb: np.zeros((nb, H, N, C), dtype=np.float32), lambda b: b, False),
    "none": (lambda nb: None, lambda b: b, False),
}
# name -> (pool for a slot size, accepted)
POOL_KINDS: dict[str, tuple[Callable[[int], Any], bool]] = {
    "plain": (lambda sb: torch.randint(0, 256, (NUM_SLOTS, sb), dtype=torch.uint8), True),
    "wide_rows": (lambda sb: torch.randint(0, 256, (NUM_SLOTS, sb + 4096), dtype=torch.uint8), True),
    "strided_rows": (lambda sb: torch.randint(0, 256, (NUM_SLOTS, 2 * sb), dtype=torch.uint8)[:, :sb], True),
    "one_layer_slots": (lambda sb: torch.zeros(NUM_SLOTS, GEOM.page_bytes, dtype=torch.uint8), False),
    "narrow_rows": (lambda sb: torch.zeros(NUM_SLOTS, 2 * sb, dtype=torch.uint8)[:, : sb - 4096], False),
    "overlapping_rows": (
        lambda sb: torch.zeros(NUM_SLOTS * sb, dtype=torch.uint8).as_strided((NUM_SLOTS, sb), (sb // 2, 1)), False
    ),
    "column_major": (lambda sb: torch.zeros(sb, NUM_SLOTS, dtype=torch.uint8).t(), False),
    "flat": (lambda sb: torch.zeros(NUM_SLOTS * sb, dtype=torch.uint8), False),
    "float": (lambda sb: torch.zeros(NUM_SLOTS, sb // 4), False),
    "no_slots": (lambda sb: torch.zeros(0, sb, dtype=torch.uint8), False),
    "meta": (lambda sb: torch.empty(NUM_SLOTS, sb, dtype=torch.uint8, device="meta"), False),
    "list": (lambda sb: [[0] * 8] * NUM_SLOTS, False),
}


GOOD_LAYERS = sorted(k for k, v in LAYER_KINDS.items() if v[2])
GOOD_POOLS = sorted(k for k, v in POOL_KINDS.items() if v[1])
# Mostly acceptable layers and pools (so copies run), with hostile ones mixed in.
LAYER_KIND = st.one_of(st.sampled_from(GOOD_LAYERS), st.sampled_from(GOOD_LAYERS), st.sampled_from(sorted(LAYER_KINDS)))
POOL_KIND = st.one_of(st.sampled_from(GOOD_POOLS), st.sampled_from(sorted(POOL_KINDS)))


@FUZZ
@given(
    kinds=st.sampled_from([3, 3, 3, 3, 0, 2, 4]).flatmap(lambda n: st.lists(LAYER_KIND, min_size=n, max_size=n)),
    blocks_per_layer=st.lists(st.integers(2, 6), min_size=4, max_size=4),
    pool_kind=POOL_KIND,
    data=st.data(),
)
def fuzz_odd_layers_and_pools(
    kinds: list[str], blocks_per_layer: list[int], pool_kind: str, data: st.DataObject
) -> None:
    bases = [LAYER_KINDS[k][0](nb) for k, nb in zip(kinds, blocks_per_layer)]
    layers = [LAYER_KINDS[k][1](b) for k, b in zip(kinds, bases)]
    make_pool, pool_ok = POOL_KINDS[pool_kind]
    pool = make_pool(GEOM.slot_bytes)
    valid = len(kinds) == GEOM.num_layers and all(LAYER_KINDS[k][2] for k in kinds) and pool_ok
    try:
        engine = CpuTransferEngine(regions_from_layers(layers, GEOM), pool, num_threads=2)
    except CLEAN:
        assert not valid, f"valid layers {kinds} / pool {pool_kind} refused"
        return
    assert valid, f"invalid layers {kinds} / pool {pool_kind} accepted"
    try:
        num_blocks = min(t.shape[0] for t in layers)
        n = data.draw(st.integers(1, min(num_blocks, NUM_SLOTS)))
        blocks = data.draw(st.permutations(range(num_blocks)))[:n]
        slots = data.draw(st.permutations(range(NUM_SLOTS)))[:n]
        layer_before = [b.clone() for b in bases]
        pool_before = pool.clone()
        run_job(engine, TransferJob.make(1, Direction.STORE, blocks, slots))
        expected = pool_before.clone()
        for b, s in zip(blocks, slots):
            for i, t in enumerate(layers):
                off = GEOM.page_offset(i)
                expected[s, off : off + GEOM.page_bytes] = as_bytes(t[b])
        assert torch.equal(pool, expected), "store differs from the reference"
        assert all(same(b, c) for b, c in zip(bases, layer_before)), "a store changed its source"
        # Bring slot contents back into other blocks; only those pages may change.
        targets = data.draw(st.permutations(range(num_blocks)))[:n]
        run_job(engine, TransferJob.make(2, Direction.LOAD, targets, slots))
        for i, (kind, base, before) in enumerate(zip(kinds, bases, layer_before)):
            want = before.clone()
            view = LAYER_KINDS[kind][1](want)
            off = GEOM.page_offset(i)
            for b, s in zip(targets, slots):
                as_bytes(view[b]).copy_(pool[s, off : off + GEOM.page_bytes])
            assert same(base, want), f"layer {i} ({kind}) differs from the reference after a load"
        assert torch.equal(pool, expected), "a load changed the pool"
    finally:
        engine.shutdown()


def run_fuzz() -> None:
    # One torch thread: on a loaded machine OpenMP's spinning workers make each tiny clone or
    # comparison take milliseconds. The engine's own copy threads are unaffected.
    torch.set_num_threads(1)
    fuzz_block_and_slot_ids()
    fuzz_odd_layers_and_pools()
    for rig in _rigs.values():
        rig.engine.shutdown()
    print("FUZZ OK")


def test_fuzz_transfer_entry_points_in_a_child() -> None:
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-c", "import test_fuzz_transfer as m; m.run_fuzz()"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode >= 0, f"fuzzing crashed the process with signal {-proc.returncode}\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0 and "FUZZ OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-6000:]
