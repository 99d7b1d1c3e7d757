# SPDX-License-Identifier: Apache-2.0
"""One vLLM process of the remote-tier tests: run phases of prompts, print what happened.

``python remote_child.py SPEC_JSON``: SPEC has ``model``, ``max_tokens``, ``remote`` (the
connector's ``remote`` section, or null for vLLM alone) and ``phases``, each with
``prompts`` (token id lists), optional ``reset`` (drop vLLM's prefix cache and the pool
first, so hits must come from the store), ``then`` (after the prompts, drain, create the file
``then`` names and wait for the file ``<then>.go``: the test changes the store meanwhile) and
``timed`` (record how long each scheduler step took). Prints one line ``RESULT {...}``: per
phase the tokens, ``num_cached_tokens`` and the connector's counters of that phase; the
worker's tier stats; the store's names of the blocks it wrote; the longest scheduler step
of timed phases.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import time
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import connector_config, greedy, make_llm, prompt  # noqa: E402


def _timed_schedule(llm: Any, durations: list[float]) -> None:
    """Record the duration of every scheduler step (where the connector's lookups run)."""
    from kv_offload.vllm import compat

    scheduler = compat.engine_core(llm).scheduler
    original = scheduler.schedule

    def schedule(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            durations.append(time.perf_counter() - t0)

    scheduler.schedule = schedule


def _timed_worker_hooks(durations: list[float]) -> None:
    """Record the duration of every call of the worker connector's per-step hooks (what the
    engine's step runs of kv-offload besides the forward pass)."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    worker = get_kv_transfer_group()
    for name in ("start_load_kv", "wait_for_save", "get_finished", "get_kv_connector_stats",
                 "build_connector_worker_meta", "get_block_ids_with_load_errors"):  # fmt: skip
        original = getattr(worker, name)

        def hook(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                durations.append(time.perf_counter() - t0)

        setattr(worker, name, hook)


def main() -> None:
    spec = json.loads(sys.argv[1])
    faulthandler.dump_traceback_later(spec.get("watchdog", 300), exit=True)
    remote = spec.get("remote")
    cfg = connector_config(cpu_bytes="64MiB", remote=remote) if remote is not None else None
    llm = make_llm(spec["model"], cfg)
    connector = None
    if cfg is not None:
        from kv_offload.vllm import compat

        connector = compat.scheduler_connector(llm)
    durations: list[float] = []
    _timed_schedule(llm, durations)
    hooks: list[float] = []
    if connector is not None:
        _timed_worker_hooks(hooks)
    phases = []
    for phase in spec["phases"]:
        if phase.get("reset"):
            assert llm.reset_prefix_cache(reset_connector=True), "vLLM refused to reset its caches"
        if connector is not None:
            connector.get_kv_connector_stats()  # start the phase's counters from zero
            connector.totals = type(connector.totals)()
        durations.clear()
        hooks.clear()
        outs = []
        for ids in phase["prompts"]:
            (res,) = llm.generate([prompt(ids)], greedy(spec["max_tokens"]), use_tqdm=False)
            outs.append((list(res.outputs[0].token_ids), int(res.num_cached_tokens or 0)))
        record: dict[str, Any] = {"outputs": outs}
        if phase.get("timed"):
            record["max_step_s"] = max(durations, default=0.0)
            record["steps"] = len(durations)
            record["max_hook_s"] = max(hooks, default=0.0)
        if connector is not None:
            from kv_offload.vllm import compat

            compat.drain(llm)
            connector.get_kv_connector_stats()
            totals = dict(connector.totals.data)
            totals.pop("transfers", None)
            record["totals"] = totals
        phases.append(record)
        if phase.get("then"):
            open(phase["then"], "w").close()
            deadline = time.monotonic() + 120
            while not os.path.exists(phase["then"] + ".go"):
                assert time.monotonic() < deadline, "the test never answered"
                time.sleep(0.05)
    result: dict[str, Any] = {"phases": phases}
    if connector is not None:
        from vllm.distributed.kv_transfer import get_kv_transfer_group

        connector.scheduler_half.check_settled()
        worker = get_kv_transfer_group().worker_half
        result["tier_stats"] = {name: tier.stats().__dict__ for name, tier in worker.tiers.items()}
        from kv_offload.tiers.remote.format import store_key

        written = connector.scheduler_half.tiers["remote"].written
        ns = connector.namespace.rank_digest(0)
        result["remote_names"] = [store_key(connector.config.remote.prefix, ns, k) for k in written]
        result["remote_namespace"] = ns.hex()
    print("RESULT " + json.dumps(result), flush=True)
    del llm


if __name__ == "__main__":
    main()
