# SPDX-License-Identifier: Apache-2.0
"""``benchmarks/soak.py --quick``: two minutes of mixed load on ``vllm serve`` with every tier,
a Redis crash during it, ``kill -9`` of the server mid-store with a restart on the same disk
tier, and ``cache_salt`` tenants through every tier.

One run of the script (about six minutes on 2 cores: the soak, the faults, the isolation
check, and a vLLM-alone server answering every prompt sent); the tests check what it reports.
Timing is reported by the script, never asserted here.
"""

from __future__ import annotations

import json
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
SCRIPT = ROOT / "benchmarks" / "soak.py"


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if shutil.which("redis-server") is None:
        store_unavailable("redis-server is not installed")
    tmp = tmp_path_factory.mktemp("soak")
    cmd = [sys.executable, str(SCRIPT), "--quick", "--fault", "kill-redis", "--fault", "kill-server", "--isolation",
           "--out", str(tmp / "out"), "--json", str(tmp / "soak.json")]  # fmt: skip
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server runs as it would in production
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=720, check=False)
    path = tmp / "soak.json"
    assert path.exists(), f"rc {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    doc: dict[str, Any] = json.loads(path.read_text())
    doc["rc"], doc["stdout"] = done.returncode, done.stdout
    return doc


# Found by this soak (docs/reliability_soak.md): under the mixed load, within about a minute,
# the engine stopped making progress for good (vLLM: "Running: 0 reqs, Waiting: 8, KV fetch: 1
# waiting to start, 7 completed waiting"): a request whose asynchronous load had failed was
# offered another asynchronous load when vLLM admitted it again. Fixed in e5132fb (it recomputes).
def test_the_engine_never_stalled(report: dict[str, Any]) -> None:
    assert "stall" not in report, report.get("stall")


def _after_the_soak(report: dict[str, Any], key: str) -> dict[str, Any]:
    """A later phase's report; skipped (not passed) when the stall kept it from running."""
    if key not in report and "stall" in report:
        pytest.skip(f"{key} did not run: the engine stalled during the soak")
    value: dict[str, Any] = report[key]
    return value


def test_load_held_with_no_wrong_token(report: dict[str, Any]) -> None:
    s = report["soak"]
    assert report["meta"]["clients"] >= 8
    assert s["wall_s"] >= 110
    assert s["requests"] > 0 and s["by_mode"]["abort"] > 0 and s["by_kind"]["overflow"] > 0
    assert s["errors"] == 0, s["error_samples"]
    every = report["checks"]["all"]
    assert every["checked"] >= s["requests"]
    assert every["mismatches"] == 0, every["mismatch_samples"]
    assert s["hit_rate"]["kv_offload"] > 0


def test_nothing_leaked(report: dict[str, Any]) -> None:
    s = report["soak"]
    assert "stall" not in report, report.get("stall")  # a stalled engine has blocks in flight
    for leaks in [s["leaks"]] + ([report["kill_server"]["leaks"]] if "kill_server" in report else []):
        # Every in-flight gauge is exported, and reads 0 once the load stopped: within the
        # flushes' 90 s, past the workers' 60 s job deadline (a slow job settles, or is failed
        # and reported, in it), before the scheduler's 125 s backstop (a job no worker ever
        # reports would hold them). The report says how long they took and which jobs timed
        # out meanwhile. (A CI run read pending_jobs 2 here: a stale gauge, whose last change
        # vLLM dropped as an "empty" stats object; fixed in kv_offload/vllm/stats.py.)
        assert leaks["missing"] == [], leaks
        for gauge in ("pool_reading_blocks", "pool_writing_blocks", "pending_jobs", "quarantined_slots"):
            assert leaks[gauge] == 0, (gauge, leaks)
        assert leaks["settled_after_s"] is not None, leaks
    assert s["fds"]["growth"] < 0.05, s["fds"]
    # Memory: the API server and the engine core stay flat after the 30 s warm-up. The worker
    # process (model runner, kv-offload's worker half) grows its heap for about 2.5 minutes
    # of this load and then holds (the 10-minute soak, docs/reliability_soak.md): longer than
    # the quick run, so its growth after warm-up is checked there, not here.
    procs = s["rss_by_process"]
    assert "api_server" in procs and any(name.startswith("VLLM::EngineCor") for name in procs), procs
    for name, g in procs.items():
        if not name.startswith("VLLM::Worker"):
            assert g["growth"] < 0.05, (name, g)
    lo = report["leftovers"]
    assert lo["shm_segments_after_stop"] == [] and lo["temp_files"] == [] and lo["redis_dir_removed"], lo


def test_the_password_never_appears(report: dict[str, Any]) -> None:
    assert report["password_in_logs"] == [] and report["password_in_metrics"] is False


def test_redis_crash_survived(report: dict[str, Any]) -> None:
    k = report["kill_redis"]
    if "stall" in report and report["stall"]["first_at_s"] < k["killed_at_s"] + 30:
        pytest.skip("the engine stalled before the Redis restart could be observed")
    # The outage was seen (operations failed and were counted), the tier came back, hits resumed.
    assert k["remote_errors"] >= 1 and k["reconnects"] >= 1 and k["connected_at_end"] == 1, k
    assert k["remote_hit_tokens_after_restart"] > 0, k
    assert report["checks"]["soak"]["mismatches"] == 0


def test_server_crash_mid_store_survived(report: dict[str, Any]) -> None:
    k = _after_the_soak(report, "kill_server")
    n = k["new_server"]
    assert k["errors_outside_kill_window"] == 0, k["error_samples"]
    assert k["failed_in_kill_window"] >= 1  # the crash was real
    assert report["checks"]["kill"]["mismatches"] == 0 and report["checks"]["burst-again"]["mismatches"] == 0
    assert report["checks"]["kill"]["checked"] > 0
    assert n["disk_hit_tokens"] > 0, n
    assert report["leftovers"]["kv_offload_shm_after_kill"] == [], report["leftovers"]
    # Nothing the crash tore was served: the disk verifies, or what failed was counted and dropped.
    verify = k["disk_verify_after_kill"]
    assert verify.get("corrupt", 1) == 0 or n["tier_corrupt_blocks_total{tier=disk}"] > 0, (verify, n)


def test_tenants_isolated_in_every_tier(report: dict[str, Any]) -> None:
    iso = _after_the_soak(report, "isolation")
    for place, stage in iso["stages"].items():
        assert stage["isolated"], (place, stage)  # B: cached_tokens 0, no hit counter moved
        assert stage["b_tokens_equal_a"] and stage["a_again_equal"], (place, stage)
        assert stage["a_hit_here"], (place, stage)  # A's blocks were there, and A hits them
    assert report["checks"]["isolation"]["mismatches"] == 0
    assert len(iso["timing_raw_ms"]["b_on_a_prompt"]) == len(iso["timing_raw_ms"]["never_seen"]) >= 8


def test_exit_status_says_what_failed(report: dict[str, Any]) -> None:
    assert (report["rc"] == 0) == (report["failures"] == []), report["failures"]
    assert "completions checked / mismatches" in report["stdout"]
