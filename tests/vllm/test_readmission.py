# SPDX-License-Identifier: Apache-2.0
"""A request whose asynchronous load failed is admitted again by vLLM: it must recompute.

vLLM 0.32 rolls a request whose asynchronous load failed back to nothing computed, frees its
blocks, and admits it again; but it keeps the request among its in-flight prefills, whose
block reservations gate every asynchronous admission (the request's own stale one
included). If the connector offered the same hit as an asynchronous load again, the request
either never fit (the soak's stall: vLLM stops admitting at the first waiting request that
does not fit, so every request behind it waited for good) or failed the same way again,
without end. Here every load fails (fault injection): a document's blocks are in the pool
and on disk; the pool load fails, and the disk could serve the same blocks. The request must
finish within a step bound, recomputed after one failed load, with the tokens first computed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import BLOCK, connector_config, documents, greedy, prompt, run_engine

pytestmark = pytest.mark.vllm

DOC = documents(1, 600, seed=31)[0]


def _serve(llm: Any, prompts: list[list[int]], max_steps: int = 200) -> tuple[list[list[int] | None], dict[str, Any]]:
    engine = llm.llm_engine
    outputs: list[list[int] | None] = [None] * len(prompts)
    for i, ids in enumerate(prompts):
        engine.add_request(f"r{i}", prompt(ids), greedy(8))
        steps = 0
        while engine.has_unfinished_requests() and steps < max_steps:
            for out in engine.step():
                if out.finished:
                    outputs[int(out.request_id[1:])] = list(out.outputs[0].token_ids)
            steps += 1
        if engine.has_unfinished_requests():  # stalled or retrying without end
            engine.abort_request([f"r{i}"])
            while engine.has_unfinished_requests():
                engine.step()
    connector = engine.engine_core.engine_core.scheduler.connector
    connector.get_kv_connector_stats()  # fold counters not yet reported into the totals
    return outputs, dict(connector.totals.data)


def test_a_request_whose_load_failed_recomputes_once_and_finishes(tiny_model: Path, tmp_path: Path) -> None:
    disk = {"path": str(tmp_path / "disk"), "bytes": "64MiB"}

    def work(llm: Any) -> tuple[list[list[int] | None], list[list[int] | None], dict[str, Any]]:
        first, _ = _serve(llm, [DOC + [40, 41]])  # computed; stored in the pool and on disk
        llm.reset_prefix_cache()  # vLLM's own cache only: the pool and the disk keep the blocks
        again, totals = _serve(llm, [DOC + [40, 41]])
        return first, again, totals

    # Every load fails: the pool hit's load fails, vLLM rolls the request back to nothing
    # computed and admits it again; the disk still holds the blocks the pool dropped.
    first, again, totals = run_engine(tiny_model, connector_config(disk=disk, fail_load_every=1), work)
    assert first[0] is not None and totals.get("written_back_blocks", 0) >= 600 // BLOCK
    assert again[0] is not None, "the request never finished: its failed load was retried or stalled the engine"
    assert again[0] == first[0], "outputs differ from what the engine computed itself"
    assert totals.get("failed_loads", 0) >= 1, f"the load did not fail as the test intends: {totals}"
    assert totals.get("failed_loads", 0) <= 1, f"the failed load was tried again (from disk): {totals}"
