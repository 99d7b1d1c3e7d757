# SPDX-License-Identifier: Apache-2.0
"""``benchmarks/bench_serving.py --quick``: the serving benchmark runs end to end on real vLLM.

One short run (4 users, small documents; vLLM alone, kv-offload with DRAM, with DRAM + disk,
with DRAM + Redis), each configuration its own ``vllm serve`` process driven over HTTP. The
test checks what the benchmark claims, not how fast it is: every streamed completion of
every configuration is token for token vLLM alone's (fp32, greedy), every kv-offload
configuration served prompt tokens from its tiers (the disk and Redis ones from the lower
tier, their pool being smaller than the working set), and every figure of the report exists.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tests.remote_common import store_unavailable

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_serving.py"
FIGURES = ("requests_per_s", "output_tokens_per_s", "ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if shutil.which("redis-server") is None:
        store_unavailable("redis-server is not installed")
    tmp = tmp_path_factory.mktemp("bench-serving")
    cmd = [sys.executable, str(SCRIPT), "--quick", "--out", str(tmp / "out"), "--json", str(tmp / "serving.json")]
    has_plot = importlib.util.find_spec("matplotlib") is not None
    if has_plot:
        cmd += ["--plot", str(tmp / "serving.png")]
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the servers run as they would in production
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, f"rc {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    doc: dict[str, Any] = json.loads((tmp / "serving.json").read_text())
    doc["stdout"] = done.stdout
    doc["png"] = (tmp / "serving.png") if has_plot else None
    return doc


def configs(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["config"]: c for c in report["configs"]}


def test_every_configuration_ran_the_whole_workload(report: dict[str, Any]) -> None:
    by = configs(report)
    assert list(by) == ["vllm", "kvo-dram", "kvo-disk", "kvo-redis"]
    n = report["meta"]["workload"]["requests"]
    assert report["meta"]["workload"]["working_set_over_kv_cache"] > 2, "the working set must not fit vLLM's cache"
    for name, c in by.items():
        assert c["errors"] == 0, (name, c["error_sample"])
        assert c["requests"] == n == len(c["per_request"]), name
        assert c["output_tokens"] == sum(r["max_tokens"] for r in c["per_request"]), name


def test_every_completion_matches_vllm_alone(report: dict[str, Any]) -> None:
    by = configs(report)
    assert by["vllm"]["completions_matched"] is None  # the reference
    for name, c in by.items():
        if name != "vllm":
            assert c["completions_checked"] == c["requests"], name
            assert c["completions_matched"] == c["requests"], (name, c["first_mismatch"])


def test_kv_offload_served_hits_from_its_tiers(report: dict[str, Any]) -> None:
    by = configs(report)
    assert by["vllm"]["hit_tokens"]["kv_offload"] == 0
    assert by["vllm"]["hit_tokens"]["vllm_cache"] > 0, "the shared system prompt hits vLLM's own cache"
    for name in ("kvo-dram", "kvo-disk", "kvo-redis"):
        c = by[name]
        assert c["hit_tokens"]["kv_offload"] > 0, name
        assert c["bytes"]["loaded"] > 0 and c["bytes"]["stored"] > 0, name
        assert c["hit_rate"]["dram"] + c["hit_rate"]["disk"] + c["hit_rate"]["remote"] > 0, name
    assert by["kvo-dram"]["hit_tokens"]["disk"] == by["kvo-dram"]["hit_tokens"]["remote"] == 0
    # The tiered configurations' pool is smaller than the working set: the tier below serves.
    assert by["kvo-disk"]["hit_tokens"]["disk"] > 0 and by["kvo-disk"]["bytes"]["disk_written"] > 0
    assert by["kvo-redis"]["hit_tokens"]["remote"] > 0 and by["kvo-redis"]["bytes"]["remote_written"] > 0
    # Repeated documents really were hits: their responses report cached prompt tokens.
    repeats = [r for r in by["kvo-dram"]["per_request"] if r["kind"] == "doc" and not r["first_visit"]]
    assert repeats and all((r["cached_tokens"] or 0) >= 128 for r in repeats)


def test_every_figure_is_reported(report: dict[str, Any]) -> None:
    for c in report["configs"]:
        for key in FIGURES:
            assert isinstance(c[key], float) and math.isfinite(c[key]) and c[key] > 0, (c["config"], key)
        assert c["ttft_p50_ms"] <= c["ttft_p90_ms"] <= c["ttft_p99_ms"]
        assert set(c["hit_rate"]) == {"vllm_cache", "dram", "disk", "remote", "example_connector"}
        assert all(0 <= v <= 1 for v in c["hit_rate"].values()), c["hit_rate"]
        assert all(math.isfinite(r["ttft"]) and r["ttft"] > 0 for r in c["per_request"])
    out = report["stdout"]
    assert "TTFT p50" in out and "kv-offload DRAM" in out and "vLLM alone" in out
    assert {g["goal"] for g in report["goals"]} >= {"p50 TTFT, vLLM alone / kv-offload", "requests/s, kv-offload / vLLM alone"}
    if report["png"] is not None:
        assert report["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
