# SPDX-License-Identifier: Apache-2.0
"""``cache_salt`` isolation end to end on the soak's server (vLLM's cache, DRAM pool, disk, Redis).

Tenant A and tenant B send the same prompt with different ``cache_salt`` values. For each
place a block can be (vLLM's own prefix cache, kv-offload's DRAM pool, its disk tier, the
remote tier), a stage puts A's prompt exactly there: A asks it, then unsalted filler prompts
push it out of every place above (more blocks than those places hold). The DRAM stage
cannot: the pool (24 blocks) is smaller than vLLM's cache (64), so a filler that empties
vLLM's cache empties the pool too; there vLLM's own prefix cache is reset instead
(``POST /reset_prefix_cache``, a dev endpoint: the server runs with
``VLLM_SERVER_DEV_MODE=1``; the connector's pool is left as it is). B then asks the same
prompt: it must get no hit anywhere (its response's ``cached_tokens`` is 0 and no hit counter
on ``/metrics`` moves), and its tokens must equal A's. A then asks again and must hit in that
place (the counter of that source moves), which proves A's blocks were there when B asked.

Timing: over ``trials`` fresh prompts, B's first request for A's just-computed prompt (a
miss) against a never-seen prompt of the same length (a miss too), in alternating order; and
A's re-ask (a hit) as a control that a hit is visible in the TTFT. The distributions and a
Mann-Whitney U test are reported: a salted miss that looked like a hit would leak A's prompt.
"""

from __future__ import annotations

import json
import math
import random
import time
import urllib.request
from typing import Any

import numpy as np
from serving_workload import (
    VOCAB_HI,
    Request,
    Result,
    metrics_delta,
    pct,
    scrape_metrics,
    stream_completion,
)
from soak_workload import Prompts, plain_completion

__all__ = ["isolation_check", "mann_whitney"]

BLOCK = 128
HIT_KEYS = {
    "vllm": "vllm:prefix_cache_hits_total",
    "dram": "kv_offload:tier_hit_tokens_total{tier=dram}",
    "disk": "kv_offload:tier_hit_tokens_total{tier=disk}",
    "remote": "kv_offload:tier_hit_tokens_total{tier=remote}",
}

FILLER_KEYS = {
    "disk_written_bytes": "kv_offload:tier_written_bytes_total{tier=disk}",
    "disk_evicted_blocks": "kv_offload:tier_evicted_blocks_total{tier=disk}",
    "disk_failed_writebacks": "kv_offload:tier_failed_writebacks_total{tier=disk}",
    "remote_written_bytes": "kv_offload:tier_written_bytes_total{tier=remote}",
    "failed_writebacks": "kv_offload:failed_writebacks_total",
    "dram_evicted_blocks": "kv_offload:tier_evicted_blocks_total{tier=dram}",
    "stored_blocks": "kv_offload:stored_blocks_total",
    "written_back_blocks": "kv_offload:written_back_blocks_total",
}


def mann_whitney(a: list[float], b: list[float]) -> dict[str, float]:
    """Two-sided Mann-Whitney U test (normal approximation, ties by mid-rank): U of ``a``, z, p."""
    both = sorted([(v, 0) for v in a] + [(v, 1) for v in b])
    ranks = [0.0] * len(both)
    i = 0
    while i < len(both):
        j = i
        while j + 1 < len(both) and both[j + 1][0] == both[i][0]:
            j += 1
        for k in range(i, j + 1):
            ranks[k] = (i + j) / 2 + 1
        i = j + 1
    n1, n2 = len(a), len(b)
    u = sum(r for r, (_, g) in zip(ranks, both) if g == 0) - n1 * (n1 + 1) / 2
    sd = math.sqrt(n1 * n2 * (n1 + n2 + 1) / 12) or 1.0
    z = (u - n1 * n2 / 2) / sd
    return {"u": u, "z": z, "p": math.erfc(abs(z) / math.sqrt(2))}


def reset_vllm_prefix_cache(port: int, tries: int = 50) -> None:
    """Empty vLLM's own prefix cache, not the connector's (it refuses while blocks are held:
    retried)."""
    for _ in range(tries):
        req = urllib.request.Request(f"http://127.0.0.1:{port}/reset_prefix_cache", data=b"", method="POST")
        if json.loads(urllib.request.urlopen(req, timeout=30).read()).get("success"):
            return
        time.sleep(0.2)
    raise RuntimeError("vLLM refused to reset its prefix cache")


class _Tenant:
    def __init__(self, port: int, model: str, prompts: Prompts) -> None:
        self.port, self.model, self.prompts = port, model, prompts
        self.n = 0
        self.sent: list[tuple[Result, str]] = []  # (result, prompt digest): checked against vLLM alone

    def ask(self, prompt: list[int], salt: str | None, max_tokens: int = 4, stream: bool = True) -> Result:
        self.n += 1
        digest = self.prompts.add(prompt, max_tokens)
        req = Request(f"iso{self.n}", 0, self.n, "isolation", None, prompt, max_tokens, 0.0)
        extra = {"cache_salt": salt} if salt else None
        if stream:
            res = stream_completion(self.port, self.model, req, time.perf_counter(), timeout=300, extra=extra)
        else:
            res = plain_completion(self.port, self.model, req, time.perf_counter(), timeout=300, extra=extra)
        if res.error is not None:
            raise RuntimeError(f"isolation request failed: {res.error}")
        self.sent.append((res, digest))
        return res

    def settled_metrics(self) -> dict[str, float]:
        """``/metrics`` once the last step's stats and the write-backs are in."""
        time.sleep(1.0)
        self.ask([7] * 8, None, 1, stream=False)  # the last step's stats reach /metrics with the next outputs
        time.sleep(0.5)
        return scrape_metrics(self.port)


def isolation_check(port: int, model: str, prompts: Prompts, vllm_blocks: int, trials: int, seed: int = 1) -> dict[str, Any]:
    """The stages and the timing trials (see the module docstring); raises on a failed request."""
    rng = random.Random(seed)
    t = _Tenant(port, model, prompts)
    salt_a, salt_b = f"tenant-a-{rng.getrandbits(64):x}", f"tenant-b-{rng.getrandbits(64):x}"

    def fresh(n: int) -> list[int]:
        return [rng.randrange(3, VOCAB_HI) for _ in range(n)]

    m = t.settled_metrics()
    pool_blocks = int(m.get("kv_offload:tier_capacity_blocks{tier=dram}", 0))
    disk_blocks = int(m.get("kv_offload:tier_capacity_blocks{tier=disk}", 0))
    # Every place receives the whole filler and evicts its least recently used blocks: a
    # prompt leaves every place above the stage's once the filler outgrows the largest of them.
    # The filler stays far below Redis's size (maxmemory 1gb, about 2,000 blocks, evicting by
    # approximate LRU): a filler as large as Redis could evict A's blocks there too. (Until
    # f0578db the Redis stage also had to outgrow the scheduler's record of blocks written to
    # disk, 1,024 blocks: that record is now trusted only until the disk index re-reads the tier.)
    above = {"vllm": 0, "dram": 0, "disk": max(vllm_blocks, pool_blocks),
             "remote": max(vllm_blocks, pool_blocks, disk_blocks)}  # fmt: skip
    length = 6 * BLOCK + 40  # six full blocks
    stages: dict[str, Any] = {}
    for place, filler_blocks in above.items():
        prompt = fresh(length)
        a1 = t.ask(prompt, salt_a)
        pre_fill = t.settled_metrics()
        filled = 0
        if filler_blocks:
            target = int(filler_blocks * 1.5) + 8
            while filled < target:
                t.ask(fresh(8 * BLOCK), None, 1, stream=False)
                filled += 8
        if place == "dram":
            reset_vllm_prefix_cache(port)
        before = t.settled_metrics()
        fill = metrics_delta(pre_fill, before)
        b = t.ask(prompt, salt_b)
        mid = t.settled_metrics()
        a2 = t.ask(prompt, salt_a)
        after = t.settled_metrics()
        b_delta, a_delta = metrics_delta(before, mid), metrics_delta(mid, after)
        b_hits = {k: b_delta.get(key, 0.0) for k, key in HIT_KEYS.items()}
        a_hits = {k: a_delta.get(key, 0.0) for k, key in HIT_KEYS.items()}
        stages[place] = {
            "filler_blocks": filled,
            "b_cached_tokens": b.cached_tokens, "b_hit_tokens": b_hits,
            "a_cached_tokens": a2.cached_tokens, "a_hit_tokens": a_hits,
            "b_tokens_equal_a": b.token_ids == a1.token_ids, "a_again_equal": a2.token_ids == a1.token_ids,
            "isolated": (b.cached_tokens or 0) == 0 and not any(b_hits.values()),
            "a_hit_here": a_hits[place] > 0,
            # what the filler did to the tiers (a stage whose filler did not reach a tier
            # cannot have pushed A's blocks out of it)
            "filler": {k: fill.get(key, 0.0) for k, key in FILLER_KEYS.items()},
        }  # fmt: skip
    # Timing: B's miss on A's prompt vs a never-seen prompt, in alternating order; A's hit as a control.
    ttft: dict[str, list[float]] = {"b_on_a_prompt": [], "never_seen": [], "a_again_hit": []}
    for i in range(trials):
        prompt = fresh(length)
        t.ask(prompt, salt_a, 1)
        pair = [("b_on_a_prompt", prompt), ("never_seen", fresh(length))]
        for name, p in pair if i % 2 == 0 else pair[::-1]:
            ttft[name].append(t.ask(p, salt_b, 1).ttft)
        ttft["a_again_hit"].append(t.ask(prompt, salt_a, 1).ttft)
    summary = {name: {"n": len(v), "p10_ms": pct(v, 10) * 1e3, "p50_ms": pct(v, 50) * 1e3, "p90_ms": pct(v, 90) * 1e3,
                      "mean_ms": float(np.mean(v)) * 1e3} for name, v in ttft.items()}  # fmt: skip
    return {
        "salts": "two random 64-bit salts (not recorded)",
        "prompt_tokens": length,
        "stages": stages,
        "isolated_everywhere": all(s["isolated"] for s in stages.values()),
        "a_hit_in_every_place": all(s["a_hit_here"] for s in stages.values()),
        "outputs_equal": all(s["b_tokens_equal_a"] and s["a_again_equal"] for s in stages.values()),
        "timing": summary,
        "timing_raw_ms": {k: [round(x * 1e3, 2) for x in v] for k, v in ttft.items()},
        "miss_vs_never_seen": mann_whitney(ttft["b_on_a_prompt"], ttft["never_seen"]),
        "hit_vs_never_seen": mann_whitney(ttft["a_again_hit"], ttft["never_seen"]),
        "sent": t.sent,
    }
