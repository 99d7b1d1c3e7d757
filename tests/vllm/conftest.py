# SPDX-License-Identifier: Apache-2.0
"""Shared set-up of the end-to-end tests on a real vLLM engine (marker ``vllm``).

The CI recipe for vLLM on a small CPU machine: engines run in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), eager, fp32 (so outputs can be compared exactly),
with a tiny KV cache so vLLM's own prefix cache evicts prompts quickly. One engine at a
time; module-scoped fixtures share engines between tests.
"""

from __future__ import annotations

import gc
import os
import random
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CACHE_ROOT", str(Path(__file__).resolve().parents[2] / ".cache" / "vllm"))

T = TypeVar("T")

#: 16 blocks of 128 tokens for the tiny model (512 KiB per block in fp32)
KV_CACHE_BYTES = 8 << 20
BLOCK = 128


def connector_config(**extra: Any) -> Any:
    from vllm.config import KVTransferConfig

    extra.setdefault("cpu_bytes", "64MiB")
    return KVTransferConfig(
        kv_connector="KVOffloadConnector",
        kv_connector_module_path="kv_offload.vllm",
        kv_role="kv_both",
        kv_connector_extra_config=extra,
    )


def make_llm(model: Path, kv_transfer_config: Any = None, **kwargs: Any) -> Any:
    from vllm import LLM

    options: dict[str, Any] = dict(
        model=str(model), dtype="float32", max_model_len=1024, enforce_eager=True,
        kv_cache_memory_bytes=KV_CACHE_BYTES, seed=0, kv_transfer_config=kv_transfer_config,
    )  # fmt: skip
    options.update(kwargs)
    return LLM(**options)


def run_engine(model: Path, kv_transfer_config: Any, work: Callable[[Any], T], **kwargs: Any) -> T:
    """Start an engine, run ``work(llm)``, and shut the engine down before returning.

    The engine must be gone before the next one starts: its shutdown tears down vLLM's
    process-wide parallel groups, which the next engine would otherwise lose mid-run.
    """
    llm = make_llm(model, kv_transfer_config, **kwargs)
    try:
        return work(llm)
    finally:
        del llm
        gc.collect()


@contextmanager
def generate_deadline(seconds: int) -> Iterator[None]:
    """Turn a stall inside ``LLM.generate`` (which loops until every request is done) into a
    test failure instead of a hung test (SIGALRM; the main thread only)."""

    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"LLM.generate did not finish within {seconds} s: requests stalled")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def documents(n: int, tokens: int, seed: int = 1) -> list[list[int]]:
    """``n`` random token-id documents (ids clear of the special tokens 0-2)."""
    rng = random.Random(seed)
    return [[rng.randrange(3, 2000) for _ in range(tokens)] for _ in range(n)]


def greedy(max_tokens: int) -> Any:
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def prompt(ids: list[int]) -> Any:
    from vllm.inputs import TokensPrompt

    return TokensPrompt(prompt_token_ids=ids)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    from kv_offload.testing.tiny_model import build_tiny_llama

    yield build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny")
