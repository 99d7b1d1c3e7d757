# SPDX-License-Identifier: Apache-2.0
"""Faults on a real vLLM engine (issue 14): jobs that hang, exceptions inside the transfer
threads, a full disk and slow disk I/O. Every request must finish with vLLM-alone's tokens
(fp32 greedy), the fault must be counted, and the connector's accounting must come back to
rest (``check_settled``) with nothing reserved, protected or quarantined.

One workload for every run, in three rounds (vLLM's own prefix cache reset between them):
four 600-token documents A, then four others B, then A and B again with new suffixes (pool
hits: loads; in the disk run, with the pool cleared first: promotions from disk).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    connector_config,
    documents,
    generate_deadline,
    greedy,
    prompt,
    run_engine,
)
from disk_tier_helpers import fill
from disk_tier_helpers import small_fs as disk_small_fs

pytestmark = pytest.mark.vllm

DOCS_A = documents(4, 600, seed=21)
DOCS_B = documents(4, 600, seed=22)
ROUNDS = [[d + [10, 11] for d in DOCS_A], [d + [12, 13] for d in DOCS_B], [d + [14, 15] for d in DOCS_A + DOCS_B]]
MAX_TOKENS = 6
#: a stall inside LLM.generate fails the test instead of hanging it
GENERATE_GUARD_S = 240


def _rounds(llm: Any, between: Callable[[int], None] | None = None) -> list[list[list[int]]]:
    out = []
    for r, prompts in enumerate(ROUNDS):
        with generate_deadline(GENERATE_GUARD_S):
            results = llm.generate([prompt(p) for p in prompts], greedy(MAX_TOKENS), use_tqdm=False)
        out.append([list(res.outputs[0].token_ids) for res in results])
        if between is not None:
            between(r)
        else:
            llm.reset_prefix_cache()
    return out


def _faulty(between: Callable[[Any, int], None] | None = None) -> Callable[[Any], tuple[Any, dict[str, Any]]]:
    def work(llm: Any) -> tuple[Any, dict[str, Any]]:
        from kv_offload.vllm import compat

        out = _rounds(llm, None if between is None else (lambda r: between(llm, r)))
        compat.drain(llm)
        connector = compat.scheduler_connector(llm)
        half = connector.scheduler_half
        half.check_settled()  # nothing reserved, protected, fenced or quarantined
        connector.get_kv_connector_stats()  # fold what was not reported yet into the totals
        return out, dict(connector.totals.data)

    return work


@pytest.fixture(scope="module")
def baseline(tiny_model: Path) -> list[list[list[int]]]:
    return run_engine(tiny_model, None, _rounds)


def _check(outputs: list[list[list[int]]], base: list[list[list[int]]]) -> None:
    for r, (got, want) in enumerate(zip(outputs, base)):
        for i, (g, w) in enumerate(zip(got, want)):
            assert g == w, f"round {r}, request {i}: differs from vLLM alone"
    assert len(outputs) == len(base)


def test_hung_jobs_time_out_recompute_and_settle(tiny_model: Path, baseline: list[list[list[int]]]) -> None:
    # Every 5th job on the copy thread stalls 1 s; jobs past 0.3 s fail (loads recompute).
    # The stall holds the copy thread, so the jobs queued behind it time out too.
    faults = {"job_timeout_s": 0.3, "hang_every": 5, "hang_ms": 1000}
    outputs, totals = run_engine(tiny_model, connector_config(**faults), _faulty())
    _check(outputs, baseline)
    timed_out = totals.get("timed_out_loads", 0) + totals.get("timed_out_stores", 0)
    assert timed_out > 0, totals
    assert totals.get("failed_loads", 0) >= totals.get("timed_out_loads", 0)
    assert totals.get("hit_tokens", 0) > 0 and totals.get("stored_blocks", 0) > 0, "loads were planned, stores landed"
    assert totals["pending_jobs"] == 0 and totals["quarantined_slots"] == 0
    assert totals["pool_reading_blocks"] == 0 and totals["pool_writing_blocks"] == 0


def test_exceptions_in_transfer_threads_fail_jobs_not_requests(
    tiny_model: Path, baseline: list[list[list[int]]], tmp_path: Path
) -> None:
    # Every 2nd job raises inside the copy thread and inside the disk tier's I/O thread.
    cfg = {"raise_in_transfer_every": 2, "disk": {"path": str(tmp_path / "disk"), "bytes": "16MiB"}}
    outputs, totals = run_engine(tiny_model, connector_config(**cfg), _faulty())
    _check(outputs, baseline)
    failed = totals.get("failed_loads", 0) + totals.get("failed_stores", 0)
    assert failed > 0 and totals.get("failed_writebacks", 0) > 0, totals
    assert totals.get("stored_blocks", 0) > 0 and totals.get("written_back_blocks", 0) > 0, "threads went on"
    assert totals.get("timed_out_loads", 0) == 0  # an exception is a failure, never a hang


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs of its own (or a skip saying why none can be mounted here)."""
    yield from disk_small_fs(tmp_path, "24m")


def test_full_then_slow_disk(tiny_model: Path, baseline: list[list[list[int]]], small_fs: Path) -> None:
    """Round A with the disk full (write-backs fail), B once space is back (written), then A
    and B again from an emptied pool through a disk whose every call takes 50 ms."""
    ballast = small_fs / "ballast"

    def between(llm: Any, r: int) -> None:
        from kv_offload.vllm import compat

        # Round A's write-backs all run against the full disk; round B's all land before
        # the pool is emptied (a block pinned by a write-back in flight is not dropped).
        compat.drain(llm)
        if r == 0:
            os.unlink(ballast)
        llm.reset_prefix_cache(reset_connector=r == 1)  # before round 2: the pool too

    def work(llm: Any) -> tuple[Any, dict[str, Any]]:
        fill(ballast)
        return _faulty(between)(llm)

    # 16 MiB of disk (32 blocks: A and B fit, no disk eviction), one segment, laid out when
    # the first write-back needs it: not while the ballast fills the 24 MiB file system.
    cfg = {"disk": {"path": str(small_fs / "tier"), "bytes": "16MiB"}, "slow_io_ms": 50, "job_timeout_s": 30}
    outputs, totals = run_engine(tiny_model, connector_config(**cfg), work)
    _check(outputs, baseline)
    assert totals.get("failed_writebacks", 0) > 0, totals  # round A: no space
    assert totals.get("written_back_blocks", 0) > 0  # round B: space is back
    assert totals.get("promoted_blocks", 0) > 0 and totals.get("disk_hit_tokens", 0) > 0  # round 2, slowly
    assert totals.get("failed_promotes", 0) == 0 and totals.get("timed_out_promotes", 0) == 0
