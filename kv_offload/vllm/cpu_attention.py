# SPDX-License-Identifier: Apache-2.0
"""vLLM plugin: kv-offload's CPU attention kernels as vLLM's CPU attention backend.

Declared as the entry point ``kv_offload_cpu_attention`` of the group ``vllm.general_plugins``,
which vLLM loads in every process (API server, engine core, workers) before any model loads.
:func:`register` does nothing unless ``KV_OFFLOAD_CPU_ATTENTION=1`` is set, so installing
kv-offload never changes vLLM's behaviour by itself. When set, it points vLLM's registry entry
``AttentionBackendEnum.CPU_ATTN`` (the backend the CPU platform always selects) at
:class:`kv_offload.vllm.cpu_attention_backend.KVOffloadCPUAttentionBackend`.

This module imports nothing from vLLM at import time: the hook is cheap where it is inactive.
"""

from __future__ import annotations

import logging
import os

__all__ = ["ENV", "BACKEND_PATH", "enabled", "register"]

#: Set to ``1`` to serve CPU attention with kv-offload's kernels.
ENV = "KV_OFFLOAD_CPU_ATTENTION"
BACKEND_PATH = "kv_offload.vllm.cpu_attention_backend.KVOffloadCPUAttentionBackend"

logger = logging.getLogger(f"vllm.{__name__}")


def enabled() -> bool:
    """Whether ``KV_OFFLOAD_CPU_ATTENTION=1`` is set (any other value, or none: off)."""
    value = os.environ.get(ENV, "").strip()
    if value not in ("", "0", "1"):
        logger.warning("%s=%r is not 0 or 1: kv-offload's CPU attention backend stays off", ENV, value)
    return value == "1"


def register() -> None:
    """The ``vllm.general_plugins`` hook: replace the CPU attention backend when enabled.

    Idempotent (vLLM may load plugins more than once per process). On a platform other than
    CPU the registration is harmless: only the CPU platform selects ``CPU_ATTN``.
    """
    if not enabled():
        return
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CPU_ATTN, BACKEND_PATH)
