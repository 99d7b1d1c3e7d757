# SPDX-License-Identifier: Apache-2.0
"""The soak's server-level fault: ``kill -9`` of the server's process tree mid-store, then a
restart on the same disk tier (and the same Redis) while the clients keep going.

The clients run; a burst of long new prompts starts storing (``kv_offload:stored_blocks``
moves on ``/metrics``) and the whole tree (API server, engine core) is SIGKILLed at once: pool
stores and disk/remote write-backs are cut mid-flight. The disk tier is then verified from
outside (``python -m kv_offload disk verify``), the server is started again on the same port
with the same configuration, and the clients, which saw failed requests while it was down,
carry on. The burst's prompts are asked again on the new server. Reported: what the clients
saw (failures inside the kill window, counted apart from errors), what the new server loaded
from which tier, what it counted as corrupt, and what the disk held after the crash.
"""

from __future__ import annotations

import random
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from serving_server import Server
from serving_workload import (
    VOCAB_HI,
    Request,
    metrics_delta,
    scrape_metrics,
    stream_completion,
)
from soak_workload import Clients, Prompts, Sent, SoakSpec, plain_completion

__all__ = ["kill_server_phase", "split_kill_window"]

#: the corrupt / failed counters that must stay 0, or count what was dropped
CORRUPT_KEYS = (
    "kv_offload:tier_corrupt_blocks_total{tier=disk}", "kv_offload:tier_corrupt_blocks_total{tier=remote}",
    "kv_offload:tier_failed_promotes_total{tier=disk}", "kv_offload:tier_failed_promotes_total{tier=remote}",
    "kv_offload:failed_transfers_total{direction=load}", "kv_offload:invalidated_blocks_total",
)  # fmt: skip


def split_kill_window(sent: list[Sent], start: float, end: float) -> tuple[list[Sent], list[Sent]]:
    """Failed requests that were in flight or sent between ``start`` (the kill) and ``end`` (the
    new server answers), and the other failed requests."""
    inside, outside = [], []
    for s in sent:
        if s.result.error is None:
            continue
        (inside if s.ended >= start - 0.5 and s.result.sent <= end + 1.0 else outside).append(s)
    return inside, outside


def disk_verify(path: Path) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "kv_offload", "disk", "verify", "--path", str(path)],
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    m = re.search(r"verified (\d+) blocks: (\d+) ok, (\d+) corrupt", done.stdout)
    out: dict[str, Any] = {"rc": done.returncode, "line": done.stdout.strip().splitlines()[-1:] or done.stderr[-300:]}
    if m:
        out.update(blocks=int(m.group(1)), ok=int(m.group(2)), corrupt=int(m.group(3)))
    return out


def kill_server_phase(server: Server, restart: Callable[[], Server], spec: SoakSpec, prompts: Prompts,
                      disk_path: Path, before_s: float, after_s: float) -> tuple[Server, dict[str, Any], list[Sent]]:  # fmt: skip
    """Run the fault (see the module docstring); returns the new server, the report, and
    every request sent (clients' and the burst's re-asks) for the check against vLLM alone."""
    port, model = server.port, server.model
    clients = Clients(spec, port, model, prompts, "kill", seed_offset=1).start()
    time.sleep(before_s)
    rng = random.Random(4242)
    burst = [[rng.randrange(3, VOCAB_HI) for _ in range(rng.randint(2400, 3200))] for _ in range(4)]
    burst_sent: list[Sent] = []

    def send(i: int) -> None:
        digest = prompts.add(burst[i], 4)
        req = Request(f"burst{i}", -1, i, "burst", None, burst[i], 4, 0.0)
        res = stream_completion(port, model, req, clients.t0, timeout=120)
        burst_sent.append(Sent(res, "stream", digest, "burst", clients.now()))

    before = scrape_metrics(port)
    threads = [threading.Thread(target=send, args=(i,), daemon=True) for i in range(len(burst))]
    for t in threads:
        t.start()
    last, deadline = before, time.monotonic() + 60
    while time.monotonic() < deadline:
        last = scrape_metrics(port)
        if last.get("kv_offload:stored_blocks_total", 0) - before.get("kv_offload:stored_blocks_total", 0) >= 8:
            break
        time.sleep(0.05)
    at_kill = metrics_delta(before, last)
    kill_t = clients.now()
    killed = server.kill_tree()
    for t in threads:
        t.join()
    verify = disk_verify(disk_path)
    new = restart()
    ready_t = clients.now()
    time.sleep(after_s)
    sent = clients.stop()
    # The burst's prompts again, on the new server: what survived the crash comes back from
    # a tier (or is recomputed), and the tokens must still be vLLM alone's.
    re_asked = []
    for i, prompt in enumerate(burst):
        req = Request(f"burst{i}-again", -1, i, "burst", None, prompt, 4, 0.0)
        res = plain_completion(port, model, req, clients.t0, timeout=300)
        re_asked.append(Sent(res, "plain", prompts.add(prompt, 4), "burst-again", clients.now()))
    time.sleep(1.0)
    plain_completion(port, model, Request("flush", -1, 0, "flush", None, [7] * 8, 1, 0.0), clients.t0)
    time.sleep(0.5)
    m = scrape_metrics(port)  # the new server's counters start at 0
    everything = sent + burst_sent + re_asked
    inside, outside = split_kill_window(everything, kill_t, ready_t)
    report = {
        "killed_pids": len(killed),
        "kill_at_s": kill_t, "new_server_ready_at_s": ready_t, "downtime_s": ready_t - kill_t,
        "restart_startup_s": new.startup_s,
        # counters: since the burst started; gauges (when this version exports them): at the kill
        "at_kill": {**{k: at_kill.get(f"kv_offload:{k}", 0.0) for k in ("stored_blocks_total", "written_back_blocks_total")},
                    **{k: last.get(f"kv_offload:{k}") for k in ("pending_jobs", "pool_writing_blocks")}},
        "disk_verify_after_kill": verify,
        "requests": len(everything),
        "failed_in_kill_window": len(inside),
        "errors_outside_kill_window": len(outside),
        "error_samples": [s.result.error for s in outside[:3]],
        "burst_before_kill": [{"tokens": len(s.result.token_ids), "error": s.result.error} for s in burst_sent],
        "burst_again_cached_tokens": [s.result.cached_tokens for s in re_asked],
        "new_server": {
            "hit_tokens": m.get("kv_offload:hit_tokens_total", 0.0),
            "disk_hit_tokens": m.get("kv_offload:tier_hit_tokens_total{tier=disk}", 0.0),
            "remote_hit_tokens": m.get("kv_offload:tier_hit_tokens_total{tier=remote}", 0.0),
            "dram_hit_tokens": m.get("kv_offload:tier_hit_tokens_total{tier=dram}", 0.0),
            "prompt_tokens": m.get("vllm:prompt_tokens_total", 0.0),
            **{k.removeprefix("kv_offload:"): m.get(k, 0.0) for k in CORRUPT_KEYS},
        },
    }  # fmt: skip
    return new, report, everything
