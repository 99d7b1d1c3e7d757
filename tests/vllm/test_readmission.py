# SPDX-License-Identifier: Apache-2.0
"""A request whose asynchronous load failed is admitted again by vLLM: it must recompute.

vLLM 0.32 rolls a request whose asynchronous load failed back to nothing computed, frees its
blocks, and admits it again; but it keeps the request among its in-flight prefills, whose
block reservations gate every asynchronous admission (the request's own stale one
included). If the connector offered the same hit as an asynchronous load again, the request
either never fit (the soak's stall: vLLM stops admitting at the first waiting request that
does not fit, so every request behind it waited for good) or failed the same way again,
without end. Here: a disk tier holds a document's four blocks, written by a first engine;
a second engine's pool has room for two, so their promotion fails. The request must finish
within a step bound, once recomputed, with the tokens the first engine computed.
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
    first, totals1 = run_engine(tiny_model, connector_config(disk=disk), lambda llm: _serve(llm, [DOC + [40, 41]]))
    assert first[0] is not None and totals1.get("written_back_blocks", 0) >= 600 // BLOCK
    # 1 MiB: a pool of two 512 KiB blocks, too small to promote the document's four.
    again, totals2 = run_engine(
        tiny_model, connector_config(cpu_bytes="1MiB", disk=disk), lambda llm: _serve(llm, [DOC + [40, 41]])
    )
    assert again[0] is not None, "the request never finished: its failed load was retried or stalled the engine"
    assert again[0] == first[0], "outputs differ from what the first engine computed"
    assert totals2.get("failed_promotes", 0) >= 1, f"the promotion did not fail as the test intends: {totals2}"
    assert totals2.get("failed_promotes", 0) <= 1, f"the failed load was tried again: {totals2}"
