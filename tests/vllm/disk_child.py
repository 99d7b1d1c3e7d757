# SPDX-License-Identifier: Apache-2.0
"""One vLLM process of the disk-tier tests: run prompts, print what happened as JSON.

``python disk_child.py SPEC_JSON``: SPEC has ``model``, ``prompts`` (token id lists),
``max_tokens``, ``disk`` (a directory, or null for vLLM without the connector), optional
``hash_algo`` (vLLM's ``--prefix-caching-hash-algo``), ``cache_salt``, ``barrier`` (a
file to create once the prompts ran, then ``wait_for`` a file to appear before running
``then_prompts``), ``vanish_after`` (the disk directory is removed before that prompt),
``disk_bytes`` (the tier's capacity, default 256 MiB). Prints one line ``RESULT {...}``: per prompt the tokens and
``num_cached_tokens``, and the connector's totals and manager counters.
"""

from __future__ import annotations

import faulthandler
import json
import os
import shutil
import sys
import time
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import connector_config, greedy, make_llm  # noqa: E402


def _prompt(ids: list[int], salt: str | None) -> Any:
    from vllm.inputs import TokensPrompt

    p = TokensPrompt(prompt_token_ids=ids)
    if salt is not None:
        p["cache_salt"] = salt
    return p


def _run(llm: Any, prompts: list[list[int]], spec: dict[str, Any]) -> list[tuple[list[int], int]]:
    out = []
    for i, ids in enumerate(prompts):
        if spec.get("vanish_after") == i:
            from kv_offload.vllm import compat

            compat.drain(llm)  # the earlier write-backs land first
            shutil.rmtree(spec["disk"])  # the directory goes away under the running server
        (res,) = llm.generate([_prompt(ids, spec.get("cache_salt"))], greedy(spec["max_tokens"]), use_tqdm=False)
        out.append((list(res.outputs[0].token_ids), int(res.num_cached_tokens or 0)))
    return out


def main() -> None:
    spec = json.loads(sys.argv[1])
    # A hung child prints every thread's stack and exits instead of eating the test's time.
    faulthandler.dump_traceback_later(spec.get("watchdog", 240), exit=True)
    cfg = None
    if spec.get("disk"):
        disk = {"path": spec["disk"], "bytes": spec.get("disk_bytes", "256MiB"), "threads": 2}
        cfg = connector_config(cpu_bytes="64MiB", disk=disk)
    kwargs: dict[str, Any] = {}
    if spec.get("hash_algo"):
        kwargs["prefix_caching_hash_algo"] = spec["hash_algo"]
    llm = make_llm(spec["model"], cfg, **kwargs)
    result: dict[str, Any] = {"outputs": _run(llm, spec["prompts"], spec)}
    if spec.get("barrier"):
        from kv_offload.vllm import compat

        compat.drain(llm)  # every write-back done before the other process looks
        open(spec["barrier"], "w").close()
        deadline = time.monotonic() + 300
        while not os.path.exists(spec["wait_for"]) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2.5)  # one refresh of the disk index (every 2 s)
        result["then"] = _run(llm, spec["then_prompts"], spec)
    if cfg is not None:
        from kv_offload.vllm import compat

        compat.drain(llm)
        connector = compat.scheduler_connector(llm)
        connector.scheduler_half.check_settled()
        connector.get_kv_connector_stats()
        result["totals"] = dict(connector.totals.data)
        result["totals"].pop("transfers", None)
        result["manager"] = connector.scheduler_half.manager.stats.as_dict()
        result["namespace"] = connector.namespace.digest.hex()
    print("RESULT " + json.dumps(result), flush=True)
    del llm


if __name__ == "__main__":
    main()
