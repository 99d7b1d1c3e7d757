# SPDX-License-Identifier: Apache-2.0
"""Offline ``LLM(...)`` with KVOffloadConnector against the same workload without it.

One engine with the connector and one without run the identical sequence:

1. four 640-token documents, then each again with a new question: the KV cache holds 16
   blocks, so vLLM's own prefix cache has evicted each document by its second turn;
2. eight concurrent requests whose KV does not fit at once (vLLM preempts);
3. aborts: one request while its KV is loading from the pool, one mid-decode;
4. the documents once more after the aborts.

Greedy fp32 outputs must be identical, the repeated documents must come from the pool, and
once idle the pool's accounting must be back at rest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import BLOCK, connector_config, documents, greedy, prompt, run_engine

pytestmark = pytest.mark.vllm

DOC_TOKENS = 640


def _sequential(llm: Any, docs: list[list[int]], turn: int) -> list[tuple[list[int], int]]:
    out = []
    for doc in docs:
        (res,) = llm.generate([prompt(doc + [10 + turn, 11])], greedy(8), use_tqdm=False)
        out.append((list(res.outputs[0].token_ids), int(res.num_cached_tokens or 0)))
    return out


def _concurrent(llm: Any) -> list[list[int]]:
    prompts = [prompt(doc) for doc in documents(8, 300, seed=7)]
    results = llm.generate(prompts, greedy(160), use_tqdm=False)
    return [list(r.outputs[0].token_ids) for r in results]


def _aborts(llm: Any, docs: list[list[int]]) -> None:
    engine = llm.llm_engine
    loading = engine.add_request("abort-while-loading", prompt(docs[0] + [40, 41]), greedy(8))
    engine.step()  # admitted: its prefix hit is being loaded
    engine.abort_request([loading if isinstance(loading, str) else "abort-while-loading"])
    decoding = engine.add_request("abort-mid-decode", prompt(docs[1] + [42]), greedy(200))
    for _ in range(6):
        engine.step()
    engine.abort_request([decoding if isinstance(decoding, str) else "abort-mid-decode"])
    while engine.has_unfinished_requests():
        engine.step()


def _workload(llm: Any) -> dict[str, Any]:
    docs = documents(4, DOC_TOKENS)
    out: dict[str, Any] = {"turn0": _sequential(llm, docs, 0), "turn1": _sequential(llm, docs, 1)}
    out["concurrent"] = _concurrent(llm)
    _aborts(llm, docs)
    out["after_aborts"] = _sequential(llm, docs, 2)
    return out


@pytest.fixture(scope="module")
def runs(tiny_model: Path) -> dict[str, Any]:
    from kv_offload.vllm import compat

    baseline = run_engine(tiny_model, None, _workload)

    def with_connector(llm: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        preemptions = compat.count_preemptions(llm)
        out = _workload(llm)
        compat.drain(llm)
        connector = compat.scheduler_connector(llm)
        half = connector.scheduler_half
        settled_error = None
        try:
            half.check_settled()
        except AssertionError as exc:
            settled_error = str(exc)
        info = {
            "manager": half.manager.stats.as_dict(),
            "totals": dict(connector.totals.data),
            "reduced": connector.totals.reduce(),
            "preemptions": preemptions[0],
            "settled_error": settled_error,
            "used": half.manager.num_used,
        }
        return out, info

    # Synchronous loads (the requests compute in the step that loads them) on this run; the
    # asynchronous path is every other test's default.
    offload, info = run_engine(tiny_model, connector_config(sync_load_max_bytes="64MiB"), with_connector)
    return {"baseline": baseline, "offload": offload, "info": info}


def test_outputs_identical_to_no_connector(runs: dict[str, Any]) -> None:
    base, off = runs["baseline"], runs["offload"]
    for phase in ("turn0", "turn1", "after_aborts"):
        assert [t for t, _ in off[phase]] == [t for t, _ in base[phase]], phase
    assert off["concurrent"] == base["concurrent"]


def test_evicted_prefixes_come_back_from_the_pool(runs: dict[str, Any]) -> None:
    base, off, info = runs["baseline"], runs["offload"], runs["info"]
    # Without the connector vLLM's own cache lost each document before its next turn...
    assert all(cached == 0 for _, cached in base["turn1"])
    # ...with it, every document's full blocks are served from the pool.
    full = (DOC_TOKENS // BLOCK) * BLOCK
    assert all(cached >= full for _, cached in off["turn1"]), off["turn1"]
    assert all(cached >= full for _, cached in off["after_aborts"]), off["after_aborts"]
    totals = info["totals"]
    assert totals["hit_tokens"] >= 8 * full
    assert totals["loaded_bytes"] > 0 and totals["stored_bytes"] > 0
    assert info["manager"]["loads"] >= 8 * (DOC_TOKENS // BLOCK)
    assert info["reduced"]["load_gbps"] > 0


def test_preemption_happened_and_accounting_settles(runs: dict[str, Any]) -> None:
    info = runs["info"]
    assert info["preemptions"] > 0, "the concurrent phase was meant to preempt"
    assert info["settled_error"] is None, info["settled_error"]
    assert info["manager"]["load_failures"] == 0 and info["manager"]["store_failures"] == 0
    assert info["used"] > 0


def _two_turns(llm: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    from kv_offload.vllm import compat

    docs = documents(4, DOC_TOKENS)
    out = {"turn0": _sequential(llm, docs, 0), "turn1": _sequential(llm, docs, 1)}
    compat.drain(llm)
    connector = compat.scheduler_connector(llm)
    connector.scheduler_half.check_settled()
    return out, {"manager": connector.scheduler_half.manager.stats.as_dict(), "totals": dict(connector.totals.data)}


def test_injected_failures_recompute_with_identical_output(runs: dict[str, Any], tiny_model: Path) -> None:
    # Every second load and every third store fails for real: a failed load leaves NaN
    # in its destination blocks, so serving them would change the output.
    cfg = connector_config(fail_load_every=2, fail_store_every=3)
    out, info = run_engine(tiny_model, cfg, _two_turns)
    base = runs["baseline"]
    assert [t for t, _ in out["turn0"]] == [t for t, _ in base["turn0"]]
    assert [t for t, _ in out["turn1"]] == [t for t, _ in base["turn1"]]
    assert info["totals"]["failed_loads"] >= 1 and info["manager"]["load_failures"] >= 1
    assert info["totals"]["failed_stores"] >= 1 and info["manager"]["store_failures"] >= 1
    assert info["manager"]["loads"] >= 1, "some loads were meant to succeed"


def test_failed_load_without_recompute_fails_the_request(runs: dict[str, Any], tiny_model: Path) -> None:
    # The control: with vLLM's own default policy ("fail") the same fault is not recomputed.
    cfg = connector_config(fail_load_every=1, recompute_on_load_failure=False)

    def work(llm: Any) -> list[Any]:
        doc = documents(1, DOC_TOKENS)[0]
        llm.generate([prompt(doc + [10, 11])], greedy(8), use_tqdm=False)
        llm.generate([prompt(documents(3, DOC_TOKENS, seed=5)[i]) for i in range(3)], greedy(1), use_tqdm=False)
        try:
            (res,) = llm.generate([prompt(doc + [12, 11])], greedy(8), use_tqdm=False)
        except Exception as exc:  # vLLM may raise for an errored request
            return ["raised", repr(exc)]
        return [res.outputs[0].finish_reason, list(res.outputs[0].token_ids)]

    result = run_engine(tiny_model, cfg, work)
    assert result[0] in ("raised", "error"), result
