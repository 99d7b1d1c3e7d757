# SPDX-License-Identifier: Apache-2.0
"""Handles on the ``torch.ops.kv_offload`` attention ops, their fake kernels and the ISA choice.

The C++ ops are loaded from ``kv_offload._C`` on first use. Fake (meta) kernels are registered
here so ``torch.compile`` can trace callers: both attention ops only write their ``out``
argument (``Tensor(a!)`` in the schema) and return nothing; ``reshape_and_cache`` only writes
its ``kv_cache``.

``KV_OFFLOAD_CPU_ATTN_ISA`` (read in :func:`default_isa`, the only place) forces a kernel path:
``auto`` (default), ``avx512bf16``, ``avx512``, ``avx2``, ``neon`` or ``scalar``.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from kv_offload._native import load_native
from kv_offload.geometry import KVGeometry

__all__ = [
    "ISA_ENV", "ISA_NAMES", "MAX_SPLITS", "auto_isa", "available_isas", "bf16_dot_rate", "default_isa", "effective_isa",
    "resolve_isa", "layout_list", "ops",
]  # fmt: skip

ISA_ENV = "KV_OFFLOAD_CPU_ATTN_ISA"
MAX_SPLITS = 1024  # most num_splits the decode op takes (kMaxSplits in csrc/ops/cpu_attention.cpp)
ISA_NAMES = ("auto", "avx512bf16", "avx512", "avx2", "neon", "scalar")
KV_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def ops() -> Any:
    """``torch.ops.kv_offload`` with the native library loaded and the fake kernels registered."""
    load_native()
    _register_fakes()
    return torch.ops.kv_offload


def _register_fakes() -> None:
    def _decode_fake(
        out: torch.Tensor,
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        block_table: torch.Tensor,
        context_lens: torch.Tensor,
        kv_layout: list[int],
        kv_dtype: torch.dtype,
        scale: float,
        window: int,
        num_splits: int,
        isa: str,
        check_ids: bool = True,
    ) -> None:
        _check_out(out, query)

    def _prefill_fake(
        out: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        query_start_loc: torch.Tensor,
        kv_cache: torch.Tensor,
        block_table: torch.Tensor,
        prefix_lens: torch.Tensor,
        kv_layout: list[int],
        kv_dtype: torch.dtype,
        scale: float,
        window: int,
        isa: str,
        check_ids: bool = True,
        new_kv_in_cache: bool = False,
    ) -> None:
        _check_out(out, query)

    def _cache_fake(
        kv_cache: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        slot_mapping: torch.Tensor,
        kv_layout: list[int],
        kv_dtype: torch.dtype,
    ) -> None:
        return None

    torch.library.register_fake("kv_offload::paged_decode_attention", _decode_fake)
    torch.library.register_fake("kv_offload::reshape_and_cache", _cache_fake)
    torch.library.register_fake("kv_offload::paged_prefill_attention", _prefill_fake)


def _check_out(out: torch.Tensor, query: torch.Tensor) -> None:
    if query.dim() != 3 or out.dim() != 3 or out.shape[:2] != query.shape[:2]:
        raise ValueError(f"out {tuple(out.shape)} does not match query {tuple(query.shape)}")


def available_isas() -> list[str]:
    """Kernel paths compiled in and supported by this CPU, in preference order (e.g. ``["avx2", "scalar"]``).

    Every one can be named; :func:`auto_isa` is the one ``"auto"`` takes.
    """
    return list(ops().cpu_attention_isas())


def auto_isa() -> str:
    """The path ``"auto"`` takes on this CPU: the first of :func:`available_isas` that pays here.

    Every listed path is usable by name; ``avx512bf16`` is passed over unless its bf16 dot
    products (``vdpbf16ps``) clearly outrun the FMAs they replace (see :func:`bf16_dot_rate`).
    """
    return str(ops().cpu_attention_auto_isa())


def bf16_dot_rate() -> float:
    """bf16 products per second of ``vdpbf16ps`` over fp32 products per second of FMAs on this
    CPU, measured once per process, about 1 ms (about 2 on Zen 4/5, 0.5 on Emerald Rapids); 0.0
    where the ``avx512bf16`` path is not built or not supported, or the timing was unusable.
    ``auto`` takes that path at 1.25 or more; ``KV_OFFLOAD_CPU_ATTN_ISA`` pins a path outright."""
    return float(ops().cpu_attention_bf16_dot_rate())


def default_isa() -> str:
    """The path forced by ``KV_OFFLOAD_CPU_ATTN_ISA``, else ``"auto"``."""
    value = os.environ.get(ISA_ENV, "auto").strip().lower() or "auto"
    if value not in ISA_NAMES:
        raise ValueError(f"{ISA_ENV}={value!r} is not one of {', '.join(ISA_NAMES)}")
    return value


def resolve_isa(isa: str | None) -> str:
    """``isa`` if given (validated), else :func:`default_isa`."""
    if isa is None:
        return default_isa()
    if isa not in ISA_NAMES:
        raise ValueError(f"isa={isa!r} is not one of {', '.join(ISA_NAMES)}")
    return isa


def effective_isa(isa: str | None = None) -> str:
    """The kernel path a call with ``isa`` runs: :func:`resolve_isa`, with ``"auto"`` replaced
    by :func:`auto_isa` (the first use of ``auto`` times ``vdpbf16ps``, see :func:`bf16_dot_rate`)."""
    name = resolve_isa(isa)
    return auto_isa() if name == "auto" else name


def layout_list(geometry: KVGeometry, layer: int) -> list[int]:
    """The ``kv_layout`` int list the ops take for ``layer`` of ``geometry``."""
    if geometry.dtype not in KV_DTYPES:
        raise ValueError(f"KV dtype {geometry.dtype} is not supported by the CPU attention kernels; expected"
                         " float32, bfloat16 or float16")
    for name, size in (("head size", geometry.head_size), ("V head size", geometry.v_head_size)):
        if size % 16:
            raise ValueError(f"{name} {size} is not supported: the CPU attention kernels need a multiple of 16")
    k, v = geometry.k_strides(), geometry.v_strides()
    return [
        geometry.page_offset(layer), geometry.num_kv_heads, geometry.block_size, geometry.head_size,
        geometry.v_head_size, k.offset, k.head, k.token, k.dim, v.offset, v.head, v.token, v.dim,
    ]  # fmt: skip
