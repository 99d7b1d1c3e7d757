# SPDX-License-Identifier: Apache-2.0
"""Soak: ``vllm serve`` with kv-offload and every tier under sustained mixed load, with faults.

    .venv/bin/python benchmarks/soak.py --minutes 10 --clients 12 --fault kill-redis --fault kill-server \\
        --isolation --json benchmarks/results/soak_cpu.json
    .venv/bin/python benchmarks/soak.py --quick --fault kill-redis --fault kill-server --isolation   # CI, ~6.5 min

One server (the OpenAI server module, tiny random-weight Llama, fp32, greedy) with the
connector over a DRAM pool smaller than the working set, a disk tier and a Redis remote tier
on a private ``redis-server`` with a password (given through ``password_env``, never in the
URL). ``--clients`` threads on 127.0.0.1 send the mix of ``soak_workload.py`` (shared long
prefixes, own documents, unique prompts, prompts longer than the pool; streamed, plain and
aborted mid-stream; 1 to 64 tokens) for ``--minutes``. Meanwhile the server's process tree is
sampled from ``/proc`` (resident memory, open file descriptors, shared-memory segments).

Faults: ``--fault kill-redis`` kills Redis at 40% of the soak and starts it again (empty)
some seconds later; ``--fault kill-server`` (after the soak) is ``soak_faults.py``.
``--isolation`` runs ``soak_isolation.py`` (``cache_salt`` tenants) on the soak's server.
``--alone`` sends the same load to vLLM without kv-offload (memory over time, for comparison).

At the end a vLLM-alone server answers every prompt that was sent, and every completion is
compared token for token (an aborted stream must be a prefix). Reported (table and
``--json``): requests, mismatches, errors, TTFT p50/p99, hit rates by source, RSS and file
descriptors over time and their growth after warm-up, the pool's in-flight gauges after the
load (leaks), shared-memory segments and temporary files left after the server stopped,
whether the Redis password appears in any log, and each fault's outcome. Exit status 1 if
any check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import cpu_model
from serving_server import Server, kvo_config, tree_rss_by_name, tree_shm, tree_usage
from serving_workload import json_clean, metrics_delta, pct, scrape_metrics
from soak_faults import kill_server_phase
from soak_isolation import isolation_check
from soak_workload import (
    Clients,
    Prompts,
    Sent,
    SoakSpec,
    check,
    plain_completion,
    reference_run,
)

PASSWORD_ENV = "KV_OFFLOAD_SOAK_REDIS_PASSWORD"
MiB = 1 << 20
BLOCK_TOKENS = 128  # vLLM's block size for this model on CPU
#: the in-flight gauges that must read 0 once the load stopped
LEAK_GAUGES = ("pool_reading_blocks", "pool_writing_blocks", "pending_jobs", "quarantined_slots")
#: the ``direction`` labels of ``kv_offload:timed_out_jobs_total`` (``kv_offload.vllm.stats.TIMED_OUT``;
#: not imported from there: that module loads vLLM, which this driver process never does)
TIMED_OUT_DIRECTIONS = ("load", "store", "promote", "writeback")


class Sampler(threading.Thread):
    """Every ``every`` s: the server tree's RSS and open fds, the remote tier's gauge."""

    def __init__(self, server: Server, t0: float, every: float = 2.0) -> None:
        super().__init__(daemon=True)
        self.server, self.t0, self.every = server, t0, every
        self.samples: list[dict[str, float]] = []
        self.shm: set[str] = set()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.every):
            pids = self.server.pids()
            if not pids:
                continue
            rss, fds = tree_usage(pids)
            self.shm |= tree_shm(pids)
            row = {"t": time.perf_counter() - self.t0, "rss_mib": rss / MiB, "fds": float(fds), "processes": float(len(pids))}
            # per process: the API server (the tree's root) and the engine core apart
            for name, value in tree_rss_by_name(pids).items():
                row[f"rss_mib:{name}"] = value / MiB
            try:
                m = scrape_metrics(self.server.port)
                row["remote_connected"] = m.get("kv_offload:tier_connected{tier=remote}", float("nan"))
                row["remote_hit_tokens"] = m.get("kv_offload:tier_hit_tokens_total{tier=remote}", 0.0)
            except OSError:
                pass
            self.samples.append(row)


def growth(samples: list[dict[str, float]], key: str, warmup_s: float, window_s: float) -> dict[str, float]:
    """Median over ``window_s`` right after warm-up vs median over the last ``window_s``."""
    end_t = samples[-1]["t"] if samples else 0.0
    base = [s[key] for s in samples if warmup_s <= s["t"] < warmup_s + window_s]
    last = [s[key] for s in samples if s["t"] >= end_t - window_s]
    b, e = pct(base, 50), pct(last, 50)
    return {"after_warmup": b, "end": e, "max": max((s[key] for s in samples), default=float("nan")),
            "growth": (e / b - 1) if b else float("nan")}  # fmt: skip


def leak_gauges(server: Server, settle_s: float = 90.0) -> dict[str, Any]:
    """After the load: small requests flush the last steps' stats, then the gauges.

    vLLM keeps an engine without requests stepping while jobs are pending (the connector's
    ``has_pending_push_work``), and each step's gauges are taken after its reports are
    applied; the flushes add steps of a real request on top. Flushes every 2 s until every
    gauge reads 0, for up to ``settle_s``: past the workers' deadline (``job_timeout_s``, 60 s: a job still in
    flight then is failed and reported, ``timed_out_jobs_total``), before the scheduler's
    backstop (2 x 60 + 5 s = 125 s, for a job no worker ever reports). So a gauge still
    above 0 at the end is a leak; a slow job settles within the window, and how long it
    took, the gauges at 30 s, the jobs timed out meanwhile and kv-offload's log lines of the
    window are reported with it.
    """
    from serving_workload import Request

    def timed_out(m: dict[str, float]) -> dict[str, float]:
        return {d: m.get(f"kv_offload:timed_out_jobs_total{{direction={d}}}", 0.0) for d in TIMED_OUT_DIRECTIONS}

    def gauges(m: dict[str, float]) -> dict[str, float | None]:
        return {g: m.get(f"kv_offload:{g}") for g in LEAK_GAUGES}

    log_from = server.log_path.stat().st_size if server.log_path.exists() else 0
    t0 = time.perf_counter()
    before = timed_out(scrape_metrics(server.port))
    at_30: dict[str, float | None] | None = None
    time.sleep(2.0)
    flushes = 0
    while True:
        flush = Request("flush", -1, 0, "flush", None, [6 + flushes % 64] * 8, 1, 0.0)
        plain_completion(server.port, server.model, flush, time.perf_counter())
        flushes += 1
        time.sleep(2.0)
        m = scrape_metrics(server.port)
        waited = time.perf_counter() - t0
        now = gauges(m)
        settled = not any(now.values())
        if at_30 is None and (settled or waited >= 30.0):
            at_30 = now
        if settled or waited >= settle_s:
            break
    out: dict[str, Any] = dict(now)
    out["flushes"] = flushes
    out["settled_after_s"] = round(waited, 1) if settled else None
    out["gauges_at_30s"] = at_30
    after = timed_out(m)
    out["timed_out_jobs"] = {d: after[d] - before[d] for d in TIMED_OUT_DIRECTIONS if after[d] - before[d]}
    out["missing"] = [g for g in LEAK_GAUGES if out[g] is None]
    out["pool_used_blocks"] = m.get("kv_offload:pool_used_blocks")
    if not settled or waited > 30.0:  # what kv-offload said while its jobs were late
        with server.log_path.open("rb") as f:
            f.seek(log_from)
            text = f.read().decode(errors="replace")
        out["log"] = [ln[-300:] for ln in text.splitlines() if "kv_offload" in ln and ("WARNING" in ln or "ERROR" in ln)][-20:]
    return out


def read_by_source(delta: dict[str, float], block_bytes: int) -> dict[str, float]:
    """Tokens kv-offload really put into vLLM's KV cache, by where they came from.

    From what was read, not from the hit-token counters (which also count hits whose load or
    promotion then failed and was recomputed): disk and remote, the bytes their successful
    promotions read (``tier_read_bytes``) over the block size; DRAM, the blocks loaded from
    the pool that were not promoted (``loaded_blocks - promoted_blocks``).
    """
    g = delta.get
    blocks = {
        "dram": g("kv_offload:loaded_blocks_total", 0.0) - g("kv_offload:promoted_blocks_total", 0.0),
        "disk": g("kv_offload:tier_read_bytes_total{tier=disk}", 0.0) / block_bytes,
        "remote": g("kv_offload:tier_read_bytes_total{tier=remote}", 0.0) / block_bytes,
    }
    return {t: b * BLOCK_TOKENS for t, b in blocks.items()}


def summarize(sent: list[Sent], delta: dict[str, float], wall: float, block_bytes: int) -> dict[str, Any]:
    ok = [s.result for s in sent if s.result.error is None]
    streamed = [r.ttft for s in sent if s.mode != "plain" and (r := s.result).error is None]
    prompt_tokens = float(sum(r.prompt_tokens for r in ok)) or 1.0
    g = delta.get
    read = read_by_source(delta, block_bytes)
    by_tier = {t: v / prompt_tokens for t, v in read.items()}
    claimed = {t: g(f"kv_offload:tier_hit_tokens_total{{tier={t}}}", 0.0) / prompt_tokens for t in ("dram", "disk", "remote")}
    return {
        "requests": len(sent), "ok": len(ok), "errors": len(sent) - len(ok),
        "error_samples": [s.result.error for s in sent if s.result.error][:3],
        "by_mode": {m: sum(1 for s in sent if s.mode == m) for m in ("stream", "plain", "abort")},
        "by_kind": {k: sum(1 for s in sent if s.result.kind == k) for k in ("shared", "doc", "unique", "overflow")},
        "aborted": sum(1 for r in ok if r.aborted),
        "wall_s": wall, "requests_per_s": len(ok) / wall if wall else 0.0,
        "output_tokens": sum(len(r.token_ids) for r in ok),
        "ttft_p50_ms": pct(streamed, 50) * 1e3, "ttft_p99_ms": pct(streamed, 99) * 1e3,
        "prompt_tokens": prompt_tokens,
        "hit_rate": {"vllm_cache": g("vllm:prefix_cache_hits_total", 0.0) / prompt_tokens,
                     "kv_offload": sum(read.values()) / prompt_tokens, **by_tier},
        # the hit-token counters, for comparison: they include hits whose load then failed
        "hit_counter_rate": {"kv_offload": g("kv_offload:hit_tokens_total", 0.0) / prompt_tokens, **claimed},
        "counters": {k.removeprefix("kv_offload:"): v for k, v in sorted(delta.items())
                     if k.startswith("kv_offload:") and k.endswith("_total") and v},
        "preemptions": g("vllm:num_preemptions_total", 0.0),
    }  # fmt: skip


class Stack:
    """Redis, the disk directory and the server with every tier (restartable on its port)."""

    def __init__(self, args: argparse.Namespace, model: Path, out: Path) -> None:
        from kv_offload.testing.redis_server import RedisServer

        self.args, self.model, self.out = args, model, out
        self.disk = out / "disk"
        self.tmp = out / "tmp"
        self.tmp.mkdir(mode=0o700)
        self.store = RedisServer(maxmemory="1gb", maxmemory_policy="allkeys-lru").start()
        self.password = self.store.password
        self.kv_config = None if args.alone else kvo_config({
            "cpu_bytes": args.cpu_bytes, "disk": {"path": str(self.disk), "bytes": args.disk_bytes},
            "remote": {"url": f"redis://127.0.0.1:{self.store.port}/0", "password_env": PASSWORD_ENV},
            **json.loads(args.inject or "{}"),
        })  # fmt: skip
        # VLLM_SERVER_DEV_MODE: the isolation check resets vLLM's own prefix cache
        self.env = {PASSWORD_ENV: self.password, "TMPDIR": str(self.tmp), "VLLM_SERVER_DEV_MODE": "1"}
        self.servers: list[Server] = []
        self.port: int | None = None

    def start(self) -> Server:
        n = len(self.servers) + 1
        server = Server(self.model, self.out / f"server-{n}.log", self.args.kv_cache_mib * MiB, self.args.max_model_len,
                        1, self.kv_config, self.env, [], port=self.port)  # fmt: skip
        self.port = server.port
        self.servers.append(server)
        print(f"[soak] server {n} ready in {server.startup_s:.0f} s (port {server.port})", flush=True)
        return server


def run(args: argparse.Namespace) -> dict[str, Any]:
    from kv_offload.testing.tiny_model import SIZES, build_tiny_llama

    model = build_tiny_llama(args.model_dir, size="tiny")
    shape = SIZES["tiny"]
    block_bytes = 2 * shape.num_layers * shape.num_kv_heads * (shape.hidden_size // shape.num_heads) * 4 * 128
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    spec = replace(SoakSpec(), clients=args.clients, seed=args.seed)
    args.max_model_len = spec.max_prompt_tokens() + spec.max_tokens + 16
    prompts = Prompts()
    stack = Stack(args, model, out)
    report: dict[str, Any] = {}
    try:
        server = stack.start()
        server.complete(list(range(1000, 1064)), 4)
        before = scrape_metrics(server.port)
        clients = Clients(spec, server.port, server.model, prompts, "soak", timeout=args.request_timeout)
        sampler = Sampler(server, time.perf_counter())
        sampler.start()
        clients.start()
        duration = args.minutes * 60
        redis_fault: dict[str, Any] | None = None
        if "kill-redis" in args.fault:
            time.sleep(0.4 * duration)
            m0 = scrape_metrics(server.port)
            kill_t = clients.now()
            stack.store.kill()  # returns once redis-server has exited (it can take seconds)
            exit_s = clients.now() - kill_t
            time.sleep(args.redis_down_s)
            stack.store.start()
            redis_fault = {"killed_at_s": kill_t, "restarted_at_s": clients.now(), "down_s": args.redis_down_s,
                           "exit_after_kill_s": exit_s, "_m0": m0}  # fmt: skip
        time.sleep(max(0.0, duration - clients.now()))
        sent = clients.stop()
        wall = clients.now()
        sampler.done.set()
        sampler.join()
        stalled = [s for s in sent if s.result.error and "timed out" in s.result.error]
        if stalled:
            # The engine stopped making progress: what vLLM last said of its queues, and the
            # gauges as they are; the later phases cannot run on a stalled server.
            states = [ln for ln in server.log_path.read_text(errors="replace").splitlines() if "Running:" in ln]
            report["stall"] = {"timed_out_requests": len(stalled), "first_at_s": min(s.ended for s in stalled),
                               "vllm_state": states[-1].split("Engine 000: ")[-1] if states else None}  # fmt: skip
            print(f"[soak] the engine stalled: {report['stall']}", flush=True)
            args.fault, args.isolation = [f for f in args.fault if f != "kill-server"], False
        leaks = leak_gauges(server) if not stalled and not args.alone else {g: None for g in LEAK_GAUGES}
        delta = metrics_delta(before, scrape_metrics(server.port))
        report["soak"] = summarize(sent, delta, wall, block_bytes)
        report["soak"]["leaks"] = leaks
        warmup = min(60.0, 0.25 * duration)
        report["soak"]["rss"] = growth(sampler.samples, "rss_mib", warmup, max(10.0, 0.1 * duration))
        report["soak"]["fds"] = growth(sampler.samples, "fds", warmup, max(10.0, 0.1 * duration))
        names = sorted({k for row in sampler.samples for k in row if k.startswith("rss_mib:")})
        report["soak"]["rss_by_process"] = {
            k.removeprefix("rss_mib:"): growth([row for row in sampler.samples if k in row], k, warmup, max(10.0, 0.1 * duration))
            for k in names
        }  # fmt: skip
        report["soak"]["warmup_s"] = warmup
        report["samples"] = sampler.samples
        if redis_fault is not None:
            m0 = redis_fault.pop("_m0")
            d = metrics_delta(m0, scrape_metrics(server.port))
            after = [s for s in sampler.samples if s["t"] > redis_fault["restarted_at_s"]]
            during = [s for s in sampler.samples if redis_fault["killed_at_s"] < s["t"] <= redis_fault["restarted_at_s"] + 1]
            hits_at_restart = next((s["remote_hit_tokens"] for s in after if "remote_hit_tokens" in s), 0.0)
            redis_fault.update({
                "connected_gauge_seen_0": any(s.get("remote_connected") == 0 for s in during),
                "connected_at_end": sampler.samples[-1].get("remote_connected") if sampler.samples else None,
                "reconnects": d.get("kv_offload:tier_reconnects_total{tier=remote}", 0.0),
                "remote_errors": d.get("kv_offload:tier_errors_total{tier=remote}", 0.0),
                "remote_failed_writebacks": d.get("kv_offload:tier_failed_writebacks_total{tier=remote}", 0.0),
                "remote_failed_promotes": d.get("kv_offload:tier_failed_promotes_total{tier=remote}", 0.0),
                "remote_hit_tokens_after_restart": max((s.get("remote_hit_tokens", 0.0) for s in after), default=0.0) - hits_at_restart,
                "requests_while_down": sum(1 for s in sent if redis_fault["killed_at_s"] <= s.ended and s.result.sent <= redis_fault["restarted_at_s"]),
                "errors_while_down": sum(1 for s in sent if s.result.error and redis_fault["killed_at_s"] <= s.ended
                                         and s.result.sent <= redis_fault["restarted_at_s"]),
            })  # fmt: skip
            report["kill_redis"] = redis_fault
        if args.isolation:
            iso = isolation_check(server.port, server.model, prompts, (args.kv_cache_mib * MiB) // block_bytes, args.trials)
            iso_sent = iso.pop("sent")
            report["isolation"] = iso
            sent += [Sent(r, "stream", d, "isolation", 0.0) for r, d in iso_sent]
        if "kill-server" in args.fault:
            server, report["kill_server"], fault_sent = kill_server_phase(
                server, stack.start, spec, prompts, stack.disk, args.kill_before_s, args.kill_after_s)  # fmt: skip
            sent += fault_sent
            report["kill_server"]["leaks"] = leak_gauges(server)
        metrics_text = urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=30).read().decode()
        final_shm = tree_shm(server.pids()) | sampler.shm
        server.stop()
    finally:
        for s in stack.servers:
            s.stop()
        redis_dir = stack.store.directory
        stack.store.close()
    # What the graceful stop left behind, and what the crash left behind.
    killed_shm = sampler.shm if "kill-server" in args.fault else set()
    report["leftovers"] = {
        "shm_segments_after_stop": sorted(p for p in final_shm - killed_shm if Path(p).exists()),
        "shm_segments_after_kill": sorted(p for p in killed_shm if Path(p).exists()),
        # of those, kv-offload's own (its pool segments are /dev/shm/kv_offload.<name>)
        "kv_offload_shm_after_kill": sorted(p for p in killed_shm if Path(p).exists() and Path(p).name.startswith("kv_offload.")),
        "shm_segments_seen": len(final_shm),
        "temp_files": sorted(p.name for p in stack.tmp.iterdir()),
        "redis_dir_removed": not redis_dir.exists(),
    }
    # SIGKILL leaves what any crashed vLLM leaves (its message queues' psm_* segments, 160-240
    # MiB each): reported above, then removed, so that repeated runs do not fill /dev/shm.
    for p in report["leftovers"]["shm_segments_after_kill"]:
        Path(p).unlink(missing_ok=True)
    logs = sorted(out.glob("server-*.log"))
    report["password_in_logs"] = [p.name for p in logs if stack.password in p.read_text(errors="replace")]
    report["password_in_metrics"] = stack.password in metrics_text
    # vLLM alone answers every prompt that was sent.
    print(f"[soak] reference: vLLM alone on {len(prompts.tokens)} distinct prompts ...", flush=True)
    (out / "tmp-ref").mkdir(mode=0o700)
    ref_server = Server(model, out / "reference.log", 256 * MiB, args.max_model_len, 1, None, {"TMPDIR": str(out / "tmp-ref")}, [])
    try:
        reference = reference_run(ref_server.port, ref_server.model, prompts)
    finally:
        ref_server.stop()
    # vLLM itself leaves files in TMPDIR (its ZMQ sockets, an empty inductor directory, a
    # vllm_dist_* file): those of a kind vLLM alone leaves too are not kv-offload's.
    alone = {_kind(p.name) for p in (out / "tmp-ref").iterdir()}
    report["leftovers"]["temp_files_vllm_alone_too"] = [f for f in report["leftovers"]["temp_files"] if _kind(f) in alone]
    report["leftovers"]["temp_files"] = [f for f in report["leftovers"]["temp_files"] if _kind(f) not in alone]
    phases: dict[str, list[Sent]] = {}
    for item in sent:
        phases.setdefault(item.phase, []).append(item)
    report["checks"] = {phase: check(items, reference) for phase, items in phases.items()}
    report["checks"]["all"] = check(sent, reference)
    report["password_in_logs"] += [p.name for p in [out / "reference.log"] if stack.password in p.read_text(errors="replace")]
    report["meta"] = {
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform()},
        "model": {"size": "tiny", **asdict(shape), "dtype": "float32", "block_bytes": block_bytes},
        "workload": asdict(spec), "minutes": args.minutes, "clients": args.clients, "faults": args.fault,
        "injected": json.loads(args.inject or "{}"), "kv_cache_mib": args.kv_cache_mib, "cpu_bytes": args.cpu_bytes, "disk_bytes": args.disk_bytes,
        "redis": "private redis-server, password via password_env, maxmemory 1gb allkeys-lru",
        "quick": args.quick, "alone": args.alone, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }  # fmt: skip
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return report


def _kind(name: str) -> str:
    """A temporary file's name without its random part."""
    return re.sub(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{32}", "<id>", name)


def failures(r: dict[str, Any]) -> list[str]:
    """Every check the soak makes, as a list of what failed."""
    out = []
    s = r["soak"]
    if "stall" in r:
        out.append(f"the engine stalled: {r['stall']}")
    if r["checks"]["all"]["mismatches"]:
        out.append(f"{r['checks']['all']['mismatches']} completions differ from vLLM alone")
    if s["errors"]:
        out.append(f"{s['errors']} failed requests during the soak: {s['error_samples']}")
    for name, leaks in [] if r["meta"]["alone"] else [("soak", s["leaks"])] + ([("kill-server", r["kill_server"]["leaks"])] if "kill_server" in r else []):
        bad = {g: v for g, v in leaks.items() if g in LEAK_GAUGES and v}
        if bad:
            out.append(f"in-flight gauges not 0 after the load ({name}): {bad}")
    for what in ("rss", "fds"):
        if not s[what]["growth"] < 0.05:
            out.append(f"{what} grew {s[what]['growth']:.1%} after warm-up")
    lo = r["leftovers"]
    if lo["shm_segments_after_stop"] or lo["temp_files"]:
        out.append(f"left behind: {lo['shm_segments_after_stop']} {lo['temp_files']}")
    if r["password_in_logs"] or r["password_in_metrics"]:
        out.append(f"the Redis password appears in {r['password_in_logs']} / metrics {r['password_in_metrics']}")
    k = r.get("kill_redis")
    if k is not None and (not k["reconnects"] or k["connected_at_end"] != 1 or not k["remote_hit_tokens_after_restart"]):
        out.append(f"Redis restart: reconnects {k['reconnects']}, connected {k['connected_at_end']}, "
                       f"hits after {k['remote_hit_tokens_after_restart']}")  # fmt: skip
    if (k := r.get("kill_server")) is not None:
        n = k["new_server"]
        if k["errors_outside_kill_window"]:
            out.append(f"kill-server: {k['errors_outside_kill_window']} failures outside the kill window: {k['error_samples']}")
        if not n["disk_hit_tokens"]:
            out.append("kill-server: the restarted server got no disk hit")
    i = r.get("isolation")
    if i is not None and not (i["isolated_everywhere"] and i["a_hit_in_every_place"] and i["outputs_equal"]):
        out.append(f"isolation: {i['stages']}")
    return out


def _leaks_line(leaks: dict[str, Any]) -> str:
    gauges = ", ".join(f"{g}={leaks[g]}" for g in LEAK_GAUGES)
    if "settled_after_s" not in leaks:  # --alone: not measured
        return gauges
    when = f"settled after {leaks['settled_after_s']} s" if leaks["settled_after_s"] is not None else "NOT settled"
    late = f"; timed out meanwhile: {leaks['timed_out_jobs']}" if leaks["timed_out_jobs"] else ""
    return f"{gauges} ({when}, {leaks['flushes']} flushes{late})"


def table(r: dict[str, Any]) -> str:
    s, c = r["soak"], r["checks"]["all"]
    h = s["hit_rate"]
    lines = [
        f"{'figure':<44} value",
        "-" * 72,
        f"{'requests (soak) / concurrency / duration':<44} {s['requests']} / {r['meta']['clients']} clients / {s['wall_s']:.0f} s",
        f"{'  streamed / plain / aborted mid-stream':<44} {s['by_mode']['stream']} / {s['by_mode']['plain']} / {s['by_mode']['abort']}",
        f"{'  shared / own doc / unique / overflow':<44} {s['by_kind']['shared']} / {s['by_kind']['doc']} / {s['by_kind']['unique']} / {s['by_kind']['overflow']}",
        f"{'completions checked / mismatches (all phases)':<44} {c['checked']} / {c['mismatches']}",
        f"{'errors (soak)':<44} {s['errors']}",
        f"{'TTFT p50 / p99 (streamed)':<44} {s['ttft_p50_ms']:.0f} / {s['ttft_p99_ms']:.0f} ms",
        f"{'hit rate (read): vLLM / DRAM / disk / remote':<44} {h['vllm_cache']:.1%} / {h['dram']:.1%} / {h['disk']:.1%} / {h['remote']:.1%}",
        f"{'RSS after warm-up -> end (growth)':<44} {s['rss']['after_warmup']:.0f} -> {s['rss']['end']:.0f} MiB ({s['rss']['growth']:+.1%})",
        *(f"{'  ' + name:<44} {g['after_warmup']:.0f} -> {g['end']:.0f} MiB ({g['growth']:+.1%})"
          for name, g in s.get("rss_by_process", {}).items()),
        f"{'open fds after warm-up -> end (growth)':<44} {s['fds']['after_warmup']:.0f} -> {s['fds']['end']:.0f} ({s['fds']['growth']:+.1%})",
        f"{'in-flight gauges after the load':<44} " + _leaks_line(s["leaks"]),
        f"{'shm segments / temp files left after stop':<44} {len(r['leftovers']['shm_segments_after_stop'])} / {len(r['leftovers']['temp_files'])}",
        f"{'Redis password in logs / metrics':<44} {r['password_in_logs'] or 'no'} / {'yes' if r['password_in_metrics'] else 'no'}",
    ]  # fmt: skip
    if (st := r.get("stall")) is not None:
        lines.append(f"{'STALLED: timed-out requests / first at':<44} {st['timed_out_requests']} / {st['first_at_s']:.0f} s")
        lines.append(f"  vLLM: {st['vllm_state']}")
    if (k := r.get("kill_redis")) is not None:
        lines.append(f"{'kill-redis: down / reconnects / errors':<44} {k['down_s']:.0f} s / {k['reconnects']:.0f} / "
                     f"{k['remote_errors']:.0f} tier errors, {k['errors_while_down']} failed requests; "
                     f"remote hits after: {k['remote_hit_tokens_after_restart']:.0f} tokens")  # fmt: skip
    if (k := r.get("kill_server")) is not None:
        n = k["new_server"]
        lines.append(f"{'kill-server: down / failed in window / outside':<44} {k['downtime_s']:.0f} s / "
                     f"{k['failed_in_kill_window']} / {k['errors_outside_kill_window']}")  # fmt: skip
        lines.append(f"{'  after restart: disk / remote hit tokens':<44} {n['disk_hit_tokens']:.0f} / {n['remote_hit_tokens']:.0f}; "
                     f"corrupt disk {n['tier_corrupt_blocks_total{tier=disk}']:.0f}, disk verify: {k['disk_verify_after_kill'].get('line')}")  # fmt: skip
        lines.append(f"{'  in-flight gauges after it':<44} " + _leaks_line(k["leaks"]))
    if (i := r.get("isolation")) is not None:
        t = i["timing"]
        lines.append(f"{'isolation: B hit nothing / A hit in each place':<44} {i['isolated_everywhere']} / {i['a_hit_in_every_place']}")
        lines.append(f"{'  TTFT p50: B on A prompt / never seen / A hit':<44} {t['b_on_a_prompt']['p50_ms']:.0f} / "
                     f"{t['never_seen']['p50_ms']:.0f} / {t['a_again_hit']['p50_ms']:.0f} ms "
                     f"(miss vs never seen p={i['miss_vs_never_seen']['p']:.2f}, hit p={i['hit_vs_never_seen']['p']:.3f})")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=None, help="soak duration (default 10; quick 2)")
    parser.add_argument("--clients", type=int, default=None, help="concurrent clients, 8-16 (default 12; quick 8)")
    parser.add_argument("--quick", action="store_true", help="the CI run: 2 minutes, 8 clients, short fault phases")
    parser.add_argument("--fault", action="append", default=[], choices=("kill-redis", "kill-server"))
    parser.add_argument("--inject", default=None, metavar="JSON",
                        help="test-only fault keys of the connector config for the whole soak, e.g. "
                             "'{\"raise_in_transfer_every\": 40, \"hang_every\": 97, \"hang_ms\": 1500, "
                             "\"job_timeout_s\": 0.5, \"slow_io_ms\": 5}' (docs/usage.md)")
    parser.add_argument("--isolation", action="store_true", help="cache_salt isolation and timing after the soak")
    parser.add_argument("--alone", action="store_true",
                        help="the same load on vLLM alone (no kv-offload, no faults): its memory over time, for comparison")
    parser.add_argument("--trials", type=int, default=None, help="isolation timing trials (default 30; quick 12)")
    parser.add_argument("--kv-cache-mib", type=int, default=32, help="vLLM's own KV cache (64 blocks)")
    parser.add_argument("--cpu-bytes", default="12MiB", help="the DRAM pool (24 blocks: smaller than the working set)")
    parser.add_argument("--disk-bytes", default="64MiB", help="the disk tier (smaller than the working set)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--request-timeout", type=float, default=60.0, help="seconds without a byte before a request fails")
    parser.add_argument("--model-dir", default=str(ROOT / ".cache" / "models" / "tiny"))
    parser.add_argument("--out", default=str(ROOT / ".cache" / "soak"), help="logs, disk tier (removed unless --keep)")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    args.minutes = args.minutes or (2.0 if args.quick else 10.0)
    args.clients = args.clients or (8 if args.quick else 12)
    if not 1 <= args.clients <= 64:
        parser.error("--clients: 8-16 is the soak's range")
    args.trials = args.trials or (12 if args.quick else 30)
    if args.alone and (args.fault or args.isolation):
        parser.error("--alone runs the load only: no --fault, no --isolation")
    args.redis_down_s = 5.0 if args.quick else 15.0
    args.kill_before_s, args.kill_after_s = (8.0, 15.0) if args.quick else (30.0, 60.0)
    os.environ.setdefault("VLLM_CACHE_ROOT", str(ROOT / ".cache" / "vllm"))
    started = time.monotonic()
    report = run(args)
    report["meta"]["total_s"] = time.monotonic() - started
    report["failures"] = failures(report)
    print()
    print(table(report))
    for f in report["failures"]:
        print(f"[soak] FAILED: {f}")
    print(f"[soak] {report['meta']['total_s']:.0f} s in all; {'ok' if not report['failures'] else 'FAILED'}", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(json_clean(report), indent=1).replace(str(ROOT), "<repo>") + "\n")
        print(f"[soak] wrote {args.json}")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
