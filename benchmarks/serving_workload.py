# SPDX-License-Identifier: Apache-2.0
"""The multi-user workload of ``bench_serving.py``, its HTTP client and its statistics.

Nothing here starts a server: :func:`build_workload` makes the requests (deterministic for a
seed), :func:`drive` sends them to a running OpenAI-compatible server over HTTP on 127.0.0.1
(one thread per user, streamed completions), :func:`scrape_metrics` reads ``/metrics`` and
:func:`summarize` turns one configuration's run into the figures the benchmark reports.

The workload models chat users asking about their own documents:

* users arrive as a Poisson process (``arrival_rate`` users/s); each then asks ``turns``
  questions, one at a time: the next one is sent an exponentially distributed think time
  after the answer to the previous one has finished streaming (a closed loop per user, so a
  slow server is offered less work, as real users offer it, and throughput is what the
  server sustains);
* every prompt starts with the same system prompt;
* a turn is, with probability ``oneoff_prob``, a one-off prompt (text never seen again),
  otherwise a question about one of the user's own documents: system prompt + document +
  a new question. Each document is revisited over several turns;
* output lengths vary (uniform in ``output_tokens``); greedy, ``ignore_eos``, so every
  configuration generates exactly the same tokens if its KV cache is right.
"""

from __future__ import annotations

import http.client
import json
import math
import random
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

#: token ids are drawn from [3, VOCAB_HI): clear of the tokenizer's special tokens
VOCAB_HI = 2000


@dataclass(frozen=True)
class WorkloadSpec:
    users: int = 16
    turns: int = 10
    docs_per_user: int = 3
    doc_tokens: tuple[int, int] = (1024, 2048)
    system_tokens: int = 256
    question_tokens: tuple[int, int] = (16, 64)
    oneoff_prob: float = 0.1
    oneoff_tokens: tuple[int, int] = (512, 1536)
    output_tokens: tuple[int, int] = (16, 128)
    arrival_rate: float = 2.0  # users per second
    think_s: float = 2.0  # mean think time between a user's turns
    seed: int = 0

    def max_prompt_tokens(self) -> int:
        return self.system_tokens + max(self.doc_tokens[1] + self.question_tokens[1], self.oneoff_tokens[1])


@dataclass
class Request:
    rid: str
    user: int
    turn: int
    kind: str  # "doc" (a question about one of the user's documents) or "oneoff"
    doc: int | None  # the document's global index
    prompt: list[int]
    max_tokens: int
    #: seconds to wait before sending: from the start of the run for turn 0 (the user's
    #: arrival), from the end of the previous answer for later turns (think time)
    delay_s: float
    first_visit: bool = False


def build_workload(spec: WorkloadSpec) -> list[list[Request]]:
    """Each user's requests, in order (the same for a given ``spec``)."""
    rng = random.Random(spec.seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(3, VOCAB_HI) for _ in range(n)]

    system = tokens(spec.system_tokens)
    docs = [tokens(rng.randint(*spec.doc_tokens)) for _ in range(spec.users * spec.docs_per_user)]
    users: list[list[Request]] = []
    arrival = 0.0
    for u in range(spec.users):
        if u:
            arrival += rng.expovariate(spec.arrival_rate)
        mine = list(range(u * spec.docs_per_user, (u + 1) * spec.docs_per_user))
        seen: set[int] = set()
        reqs = []
        for t in range(spec.turns):
            delay = arrival if t == 0 else rng.expovariate(1.0 / spec.think_s) if spec.think_s > 0 else 0.0
            max_tokens = rng.randint(*spec.output_tokens)
            # The first turns visit the user's documents, so that every document is asked
            # about more than once; one-offs come any time after.
            if t >= len(mine) and rng.random() < spec.oneoff_prob:
                prompt = system + tokens(rng.randint(*spec.oneoff_tokens))
                reqs.append(Request(f"u{u}t{t}", u, t, "oneoff", None, prompt, max_tokens, delay))
                continue
            d = mine[t] if t < len(mine) else rng.choice(mine)
            prompt = system + docs[d] + tokens(rng.randint(*spec.question_tokens))
            reqs.append(Request(f"u{u}t{t}", u, t, "doc", d, prompt, max_tokens, delay, first_visit=d not in seen))
            seen.add(d)
        users.append(reqs)
    return users


def working_set_tokens(users: list[list[Request]]) -> int:
    """Distinct prompt tokens (what a cache would need to hold to hit on every repeat)."""
    docs: dict[int, int] = {}
    total = 0
    for reqs in users:
        for r in reqs:
            if r.kind == "doc":
                docs.setdefault(r.doc or 0, len(r.prompt))
            else:
                total += len(r.prompt)
    return total + sum(docs.values())


# -- the client ----------------------------------------------------------------------------


@dataclass
class Result:
    rid: str
    user: int
    kind: str
    first_visit: bool
    prompt_tokens: int
    max_tokens: int
    sent: float = 0.0  # seconds since the run's start
    ttft: float = float("nan")
    latency: float = float("nan")
    #: arrival time of each streamed chunk (seconds after sending) and its tokens
    chunk_times: list[float] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    cached_tokens: int | None = None
    error: str | None = None
    #: the client closed the stream on purpose after ``abort_after`` tokens
    aborted: bool = False

    def itls(self) -> list[float]:
        """Inter-token latencies: each chunk's gap from the previous one, split over its tokens."""
        out = []
        for i in range(1, len(self.chunk_times)):
            n = self.chunk_tokens[i]
            if n:
                out += [(self.chunk_times[i] - self.chunk_times[i - 1]) / n] * n
        return out


def stream_completion(port: int, model: str, req: Request, t0: float, timeout: float = 900.0, *,
                      extra: dict[str, Any] | None = None, abort_after: int | None = None) -> Result:  # fmt: skip
    """Send one streamed completion and time its chunks.

    ``extra``: more fields of the request body (e.g. ``cache_salt``). ``abort_after``: close
    the connection once that many tokens arrived (a client that goes away mid-stream; the
    result is then marked ``aborted``). A stream the server ends without ``[DONE]`` (it
    died mid-stream) is an error, whatever tokens came before."""
    res = Result(req.rid, req.user, req.kind, req.first_visit, len(req.prompt), req.max_tokens)
    body = {
        "model": model, "prompt": req.prompt, "max_tokens": req.max_tokens, "temperature": 0.0,
        "ignore_eos": True, "stream": True, "return_token_ids": True,
        "stream_options": {"include_usage": True}, **(extra or {}),
    }  # fmt: skip
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        start = time.perf_counter()
        res.sent = start - t0
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            res.error = f"HTTP {resp.status}: {resp.read()[:300]!r}"
            return res
        done = False
        while True:
            raw = resp.readline()
            if not raw:
                break
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                done = True
                break
            now = time.perf_counter() - start
            chunk = json.loads(data)
            usage = chunk.get("usage")
            if usage:
                details = usage.get("prompt_tokens_details") or {}
                res.cached_tokens = details.get("cached_tokens")
            for choice in chunk.get("choices") or []:
                ids = choice.get("token_ids") or []
                if not ids:
                    continue
                if not res.chunk_times:
                    res.ttft = now
                res.chunk_times.append(now)
                res.chunk_tokens.append(len(ids))
                res.token_ids += ids
            if abort_after is not None and len(res.token_ids) >= abort_after:
                res.aborted = True
                break
        res.latency = time.perf_counter() - start
        if not res.token_ids:
            res.error = "no token streamed"
        elif not done and not res.aborted:
            res.error = f"the stream ended without [DONE] after {len(res.token_ids)} tokens"
    except (OSError, http.client.HTTPException, ValueError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()
    return res


class Progress:
    """A one-line progress bar on stderr (redrawn in place when stderr is a terminal)."""

    def __init__(self, total: int, label: str, width: int = 30) -> None:
        self.total, self.label, self.width = total, label, width
        self.done = 0
        self.lock = threading.Lock()
        self.start = time.monotonic()
        self.tty = sys.stderr.isatty()
        self.last_print = 0.0

    def step(self) -> None:
        with self.lock:
            self.done += 1
            now = time.monotonic()
            if self.tty or now - self.last_print > 10 or self.done == self.total:
                self.last_print = now
                filled = self.width * self.done // max(self.total, 1)
                bar = "#" * filled + "." * (self.width - filled)
                end = "\r" if self.tty and self.done < self.total else "\n"
                sys.stderr.write(f"  {self.label:<24} [{bar}] {self.done}/{self.total} requests, {now - self.start:5.0f} s{end}")
                sys.stderr.flush()


def drive(port: int, model: str, users: list[list[Request]], label: str) -> tuple[list[Result], float]:
    """Run the workload (one thread per user); returns the results and the run's wall time
    (first send to last answer)."""
    results: list[Result] = []
    lock = threading.Lock()
    progress = Progress(sum(len(u) for u in users), label)
    t0 = time.perf_counter()

    def user(reqs: list[Request]) -> None:
        for i, r in enumerate(reqs):
            wake = (t0 + r.delay_s) if i == 0 else time.perf_counter() + r.delay_s
            time.sleep(max(0.0, wake - time.perf_counter()))
            res = stream_completion(port, model, r, t0)
            with lock:
                results.append(res)
            progress.step()

    threads = [threading.Thread(target=user, args=(reqs,), daemon=True) for reqs in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first = min(r.sent for r in results)
    last = max(r.sent + (r.latency if r.latency == r.latency else 0.0) for r in results)
    return results, last - first


# -- server metrics ------------------------------------------------------------------------


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {"name{label=value,...}": value}, without the model/engine labels
    (one engine per server here)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        name, _, labels = key.partition("{")
        kept = []
        for part in labels.rstrip("}").split(","):
            if part and not part.startswith(("model_name=", "engine=")):
                kept.append(part.replace('"', ""))
        full = name + ("{" + ",".join(kept) + "}" if kept else "")
        try:
            out[full] = out.get(full, 0.0) + float(value)
        except ValueError:
            continue
    return out


def scrape_metrics(port: int) -> dict[str, float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/metrics")
        return parse_metrics(conn.getresponse().read().decode())
    finally:
        conn.close()


def metrics_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if not k.endswith("_created")}


# -- statistics ----------------------------------------------------------------------------


def json_clean(obj: Any) -> Any:
    """NaN -> None, in nested dicts and lists, for strict JSON."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_clean(v) for v in obj]
    return obj


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summarize(results: list[Result], wall_s: float, delta: dict[str, float], baseline: dict[str, list[int]] | None,
              bytes_per_token: int, extra_bytes: dict[str, float] | None = None) -> dict[str, Any]:  # fmt: skip
    """One configuration's figures (see the table in bench_serving.py)."""
    ok = [r for r in results if r.error is None]
    ttfts = [r.ttft for r in ok]
    itls = [x for r in ok for x in r.itls()]
    out_tokens = sum(len(r.token_ids) for r in ok)
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    g = delta.get
    kvo_hit = g("kv_offload:hit_tokens_total", 0.0)
    disk_hit = g("kv_offload:disk_hit_tokens_total", 0.0)
    remote_hit = g("kv_offload:remote_hit_tokens_total", 0.0)
    vllm_hit = g("vllm:prompt_tokens_cached_by_source_total{source=device}", g("vllm:prefix_cache_hits_total", 0.0))
    external = g("vllm:external_prefix_cache_hits_total", 0.0)
    # vLLM counts the connector's tokens as external hits; kv-offload's own counters split
    # them by tier. The example connector has no counters of its own: its hits are vLLM's
    # external hits.
    connector_hit = 0.0 if kvo_hit else external
    hits = {
        "vllm_cache": vllm_hit / prompt_tokens if prompt_tokens else 0.0,
        "dram": (kvo_hit - disk_hit - remote_hit) / prompt_tokens if prompt_tokens else 0.0,
        "disk": disk_hit / prompt_tokens if prompt_tokens else 0.0,
        "remote": remote_hit / prompt_tokens if prompt_tokens else 0.0,
        "example_connector": connector_hit / prompt_tokens if prompt_tokens else 0.0,
    }
    loaded = g("kv_offload:loaded_bytes_total", 0.0) or connector_hit * bytes_per_token
    stored = g("kv_offload:stored_bytes_total", 0.0)
    moved = {"loaded": loaded, "stored": stored}
    for tier in ("disk", "remote"):
        moved[f"{tier}_read"] = g(f"kv_offload:tier_read_bytes_total{{tier={tier}}}", 0.0)
        moved[f"{tier}_written"] = g(f"kv_offload:tier_written_bytes_total{{tier={tier}}}", 0.0)
    moved.update(extra_bytes or {})
    matched = mismatched = 0
    first_mismatch = None
    if baseline is not None:
        for r in ok:
            if baseline.get(r.rid) == r.token_ids:
                matched += 1
            else:
                mismatched += 1
                first_mismatch = first_mismatch or r.rid
    hist = {}
    for name in ("request_queue_time_seconds", "request_prefill_time_seconds", "request_decode_time_seconds",
                 "time_to_first_token_seconds", "e2e_request_latency_seconds"):  # fmt: skip
        n = g(f"vllm:{name}_count", 0.0)
        hist[name.replace("_seconds", "_mean_s")] = g(f"vllm:{name}_sum", 0.0) / n if n else None

    def by_kind(pred: Any) -> dict[str, float]:
        sel = [r.ttft for r in ok if pred(r)]
        return {"n": len(sel), "ttft_p50_ms": pct(sel, 50) * 1e3, "ttft_p90_ms": pct(sel, 90) * 1e3}

    return {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "error_sample": next((r.error for r in results if r.error), None),
        "wall_s": wall_s,
        "requests_per_s": len(ok) / wall_s,
        "output_tokens_per_s": out_tokens / wall_s,
        "prompt_tokens": prompt_tokens,
        "output_tokens": out_tokens,
        "ttft_p50_ms": pct(ttfts, 50) * 1e3,
        "ttft_p90_ms": pct(ttfts, 90) * 1e3,
        "ttft_p99_ms": pct(ttfts, 99) * 1e3,
        "itl_p50_ms": pct(itls, 50) * 1e3,
        "itl_p99_ms": pct(itls, 99) * 1e3,
        "hit_rate": hits,
        "hit_tokens": {"vllm_cache": vllm_hit, "kv_offload": kvo_hit, "disk": disk_hit, "remote": remote_hit,
                       "external": external},  # fmt: skip
        "bytes": moved,
        "preemptions": g("vllm:num_preemptions_total", 0.0),
        "server_means": hist,
        "kvo_load_seconds": g("kv_offload:transfer_seconds_total{direction=load}", 0.0),
        "kvo_store_seconds": g("kv_offload:transfer_seconds_total{direction=store}", 0.0),
        "ttft_by_kind": {
            "repeat_doc": by_kind(lambda r: r.kind == "doc" and not r.first_visit),
            "first_visit": by_kind(lambda r: r.kind == "doc" and r.first_visit),
            "oneoff": by_kind(lambda r: r.kind == "oneoff"),
        },
        "timeline": step_timeline(results),
        "completions_checked": matched + mismatched if baseline is not None else 0,
        "completions_matched": matched if baseline is not None else None,
        "first_mismatch": first_mismatch,
    }


def step_timeline(results: list[Result], merge_s: float = 0.004) -> dict[str, Any]:
    """The engine's steps as the streams show them, and where a request's TTFT went.

    Every engine step that produces tokens streams them to all its requests at once, so the
    union of all chunk arrival times, merged within ``merge_s``, marks step ends (a step that
    produces no token, such as one that only computes part of a long prompt while nothing
    decodes, is merged into the next). For each request: the steps that ended between its send
    and its first token (the first token's step included) and the longest of them.
    """
    ends = sorted(r.sent + t for r in results if r.error is None for t in r.chunk_times)
    steps: list[float] = []
    for t in ends:
        if not steps or t - steps[-1] > merge_s:
            steps.append(t)
    durations = [b - a for a, b in zip(steps, steps[1:])]
    arr = np.asarray(steps)
    per: dict[str, dict[str, float]] = {}
    for r in results:
        if r.error is not None:
            continue
        lo = int(np.searchsorted(arr, r.sent, side="right"))
        hi = int(np.searchsorted(arr, r.sent + r.ttft - merge_s, side="left")) + 1
        spans = [steps[i] - (steps[i - 1] if i > lo else r.sent) for i in range(lo, min(hi, len(steps)))]
        per[r.rid] = {"steps": float(len(spans)), "longest_s": max(spans, default=0.0)}

    def agg(pred: Any) -> dict[str, float]:
        sel = [per[r.rid] for r in results if r.rid in per and pred(r)]
        return {
            "n": len(sel),
            "steps_to_first_token_p50": pct([s["steps"] for s in sel], 50),
            "steps_to_first_token_mean": float(np.mean([s["steps"] for s in sel])) if sel else float("nan"),
            "longest_step_in_ttft_p50_ms": pct([s["longest_s"] for s in sel], 50) * 1e3,
        }

    return {
        "steps": len(steps),
        "step_p50_ms": pct(durations, 50) * 1e3,
        "step_p90_ms": pct(durations, 90) * 1e3,
        "step_p99_ms": pct(durations, 99) * 1e3,
        "repeat_doc": agg(lambda r: r.kind == "doc" and not r.first_visit),
        "first_visit": agg(lambda r: r.kind == "doc" and r.first_visit),
        "oneoff": agg(lambda r: r.kind == "oneoff"),
    }


def per_request(results: list[Result]) -> list[dict[str, Any]]:
    """The raw per-request figures kept in the JSON (no token ids)."""
    keep = ("rid", "user", "kind", "first_visit", "prompt_tokens", "max_tokens", "sent", "ttft", "latency",
            "cached_tokens", "error")  # fmt: skip
    rows = []
    for r in sorted(results, key=lambda r: r.sent):
        d = {k: v for k, v in asdict(r).items() if k in keep}
        d["output_tokens"] = len(r.token_ids)
        rows.append(d)
    return rows
