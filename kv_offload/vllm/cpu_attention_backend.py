# SPDX-License-Identifier: Apache-2.0
"""kv-offload's CPU attention kernels behind vLLM's ``CPU_ATTN`` backend.

Registered by :func:`kv_offload.vllm.cpu_attention.register` (only with
``KV_OFFLOAD_CPU_ATTENTION=1``). The classes subclass vLLM's own CPU backend, so what vLLM's
CPU platform checks (name ``CPU_ATTN``, head sizes, block sizes, the LBHNC layout, dtypes)
stays as it is, and a layer the kernels cannot serve runs vLLM's own code unchanged.

Per step, :class:`KVOffloadCPUMetadataBuilder` (once per KV-cache group, not per layer):

* asks vLLM to put decode requests first (``reorder_batch_threshold = 1``) and counts the
  leading one-token requests: they go to the decode kernel, everything after them (prefill,
  chunked prefill, prefix-cache hits) to the prefill kernel;
* builds int32 context lengths, prefix lengths and query start locations for both parts;
* checks every block id the step reads against the cache once, so the kernels skip that
  check in every layer (``check_ids=False``);
* builds vLLM's own scheduler metadata only when some layer of the group, or this step
  (non-causal), needs vLLM's kernels.

Per layer, :class:`KVOffloadCPUAttentionImpl` writes the new K/V with kv-offload's C++
``reshape_and_cache`` in vLLM's CPU page format (K transposed per head, then V rows: the
format vLLM's ``vec`` path writes, ``PageFormat.CPU``), then runs the decode and prefill
kernels on views of vLLM's query/output tensors (no copies).

Features the kernels lack (ALiBi, logit softcap, attention sinks, fp8 KV, encoder and
cross attention, head sizes that are not a multiple of 16) make that layer use vLLM's own
implementation; one log line per reason and process says so.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np
import torch
from vllm.config import VllmConfig, get_current_vllm_config, get_layers_from_vllm_config
from vllm.model_executor.layers.attention import Attention
from vllm.utils.torch_utils import is_quantized_kv_cache
from vllm.v1.attention.backend import AttentionType, CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)
from vllm.v1.kv_cache_interface import AttentionSpec

from kv_offload.attention._ops import available_isas, bf16_dot_rate, default_isa, effective_isa, layout_list, ops
from kv_offload.geometry import KVGeometry, PageFormat

__all__ = [
    "KVOffloadCPUAttentionBackend", "KVOffloadCPUAttentionImpl", "KVOffloadCPUMetadata",
    "KVOffloadCPUMetadataBuilder", "STATS", "check_step_block_ids", "fallback_reasons",
]  # fmt: skip

logger = logging.getLogger(f"vllm.{__name__}")

#: Per-process counts: ``decode_calls`` / ``prefill_calls`` / ``cache_writes`` (kernel calls),
#: ``vllm_calls`` (forwards served by vLLM's own code), ``steps`` (metadata builds),
#: ``mixed_steps`` (decodes and prefills in one batch), ``prefill_over_prefix_steps`` (a
#: prefill over cached tokens: chunked prefill or a prefix-cache hit). Tests read them to
#: prove which kernels ran.
STATS: Counter[str] = Counter()

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ZERO_QSL = torch.zeros(1, dtype=torch.int32)  # no prefill part (read-only)
_NO_LENS = torch.zeros(0, dtype=torch.int32)
_log_lock = threading.Lock()
_logged: set[str] = set()


def _log_once(key: str, message: str, *args: object) -> None:
    with _log_lock:
        if key in _logged:
            return
        _logged.add(key)
    logger.info(message, *args)


def _announce() -> None:
    isa = default_isa()
    usable = available_isas()
    chosen = effective_isa()
    how = "forced by KV_OFFLOAD_CPU_ATTN_ISA" if isa != "auto" else "auto"
    if isa == "auto" and "avx512bf16" in usable and chosen != "avx512bf16":
        how += f"; avx512bf16 passed over: vdpbf16ps does {bf16_dot_rate():.2f}x the FMAs' products here"
    _log_once(
        "active",
        "kv-offload CPU attention backend active: kv_offload::paged_decode_attention, "
        "kv_offload::paged_prefill_attention and kv_offload::reshape_and_cache over the CPU page "
        "format; ISA path %s (%s; usable here: %s)",
        chosen, how, ", ".join(usable),
    )  # fmt: skip


def fallback_reasons(
    *,
    head_size: int,
    dtype: object,
    alibi_slopes: object,
    logits_soft_cap: float | None,
    sinks: object,
    kv_cache_dtype: str,
    attn_type: str,
) -> list[str]:
    """Why kv-offload's kernels cannot serve a layer (empty: they can)."""
    reasons = []
    if alibi_slopes is not None:
        reasons.append("ALiBi")
    if logits_soft_cap:
        reasons.append("logit softcap")
    if sinks is not None:
        reasons.append("attention sinks")
    if is_quantized_kv_cache(kv_cache_dtype):
        reasons.append(f"{kv_cache_dtype} KV cache")
    if attn_type != AttentionType.DECODER:
        reasons.append(f"{getattr(attn_type, 'value', attn_type)} attention")
    if head_size % 16:
        reasons.append(f"head size {head_size} (not a multiple of 16)")
    if dtype not in _KERNEL_DTYPES:
        reasons.append(f"dtype {dtype}")
    return reasons


@dataclass
class KVOffloadCPUMetadata(CPUAttentionMetadata):
    """vLLM's CPU metadata plus the kernels' per-step views (built once per step).

    Requests ``[0, num_decodes)`` are decodes (one new token each, tokens ``[0, num_decodes)``);
    the rest go to the prefill kernel with ``prefill_query_start_loc`` (from 0) and
    ``prefix_lens`` (tokens cached before this step's new ones).
    """

    use_vllm_kernels: bool = False
    num_decodes: int = 0
    decode_lens: torch.Tensor | None = None
    prefill_query_start_loc: torch.Tensor | None = None
    prefix_lens: torch.Tensor | None = None
    kernel_block_table: torch.Tensor | None = None


class KVOffloadCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    """vLLM's CPU metadata builder, plus the decode/prefill split the kernels need."""

    def __init__(
        self, kv_cache_spec: AttentionSpec, layer_names: list[str], vllm_config: VllmConfig, device: torch.device
    ) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        # Decodes first: they then form one contiguous run for the decode kernel.
        self._init_reorder_batch_threshold(1, supports_spec_as_decode=False)
        layers = get_layers_from_vllm_config(vllm_config, Attention, layer_names)
        self.vllm_layers = sorted(
            name for name, layer in layers.items() if not getattr(layer.impl, "uses_kv_offload_kernels", False)
        )
        self._num_blocks: int | None = None
        self._layers = layers

    def _cache_blocks(self) -> int | None:
        if self._num_blocks is None:
            for layer in self._layers.values():
                cache = layer.kv_cache
                if isinstance(cache, list):
                    cache = cache[0] if cache else None
                if isinstance(cache, torch.Tensor) and cache.dim() == 4:
                    self._num_blocks = int(cache.shape[0])
                    break
        return self._num_blocks

    def build(
        self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False
    ) -> KVOffloadCPUMetadata:
        STATS["steps"] += 1
        cm = common_attn_metadata
        causal = cm.causal
        use_vllm = bool(self.vllm_layers) or not (isinstance(causal, bool) and causal)
        if use_vllm:
            base = super().build(common_prefix_len, cm, fast_build)
            values = {f.name: getattr(base, f.name) for f in fields(CPUAttentionMetadata)}
        else:
            values = dict(
                num_actual_tokens=cm.num_actual_tokens, max_query_len=cm.max_query_len,
                query_start_loc=cm.query_start_loc, max_seq_len=cm.max_seq_len, seq_lens=cm.seq_lens,
                block_table=cm.block_table_tensor, slot_mapping=cm.slot_mapping, scheduler_metadata=None,
                causal=True,
            )  # fmt: skip
        num_reqs = cm.num_reqs
        qsl = cm.query_start_loc_cpu[: num_reqs + 1].to(torch.int32)
        seq_lens = cm.seq_lens[:num_reqs].to(torch.int32)
        query_lens = qsl[1:] - qsl[:-1]
        if cm.max_query_len == 1:  # decodes only (most steps): no search for the first prefill
            num_decodes = num_reqs
        else:
            not_decode = (query_lens != 1).nonzero()
            num_decodes = int(not_decode[0, 0]) if not_decode.numel() else num_reqs
        table = cm.block_table_tensor[:num_reqs]
        if table.dtype != torch.int32 or (table.dim() == 2 and table.shape[1] > 1 and table.stride(1) != 1):
            table = table.to(torch.int32).contiguous()
        self._check_block_ids(table, seq_lens)
        meta = KVOffloadCPUMetadata(**values)
        meta.use_vllm_kernels = use_vllm
        meta.num_decodes = num_decodes
        meta.kernel_block_table = table
        if num_decodes == num_reqs:
            meta.decode_lens = seq_lens
            meta.prefill_query_start_loc = _ZERO_QSL
            meta.prefix_lens = _NO_LENS
            return meta
        meta.decode_lens = seq_lens[:num_decodes].contiguous()
        meta.prefill_query_start_loc = (qsl[num_decodes:] - qsl[num_decodes]).contiguous()
        meta.prefix_lens = (seq_lens[num_decodes:] - query_lens[num_decodes:]).contiguous()
        if num_decodes > 0:
            STATS["mixed_steps"] += 1
        if bool((meta.prefix_lens > 0).any()):
            STATS["prefill_over_prefix_steps"] += 1
        return meta

    def _check_block_ids(self, table: torch.Tensor, seq_lens: torch.Tensor) -> None:
        check_step_block_ids(table, seq_lens, self.block_size, self._cache_blocks())


def check_step_block_ids(table: torch.Tensor, seq_lens: torch.Tensor, block_size: int, num_blocks: int | None) -> None:
    """Every block id the step's requests read names a block of the cache (once per step).

    Row ``b`` of ``table`` is read up to ``ceil(seq_lens[b] / block_size)`` entries; each must
    lie in ``[0, num_blocks)`` (``num_blocks=None``: only ``>= 0``). The kernels then skip
    this check in every layer.

    Raises:
        ValueError: a negative length, a row too short, or an id out of range.
    """
    if not seq_lens.numel():
        return
    # numpy views of the CPU tensors: a few microseconds per step instead of ~100 in torch ops.
    lens = seq_lens.numpy()
    if int(lens.min()) < 0:
        raise ValueError(f"negative sequence length in {lens.tolist()}")
    needed = (lens.astype(np.int64) + (block_size - 1)) // block_size
    most = int(needed.max())
    cols = table.shape[1] if table.dim() == 2 else 0
    if most > cols:
        raise ValueError(f"a request needs {most} blocks but the block table has {cols} columns")
    ids = table.numpy()
    used = ids[0, :most] if len(needed) == 1 else ids[:, :most][np.arange(most) < needed[:, None]]
    if used.size and (int(used.min()) < 0 or (num_blocks is not None and int(used.max()) >= num_blocks)):
        raise ValueError(f"block ids out of range [0, {num_blocks}): min {int(used.min())}, max {int(used.max())}")


class KVOffloadCPUAttentionImpl(CPUAttentionBackendImpl):
    """One attention layer: kv-offload's kernels, or vLLM's own code where they cannot serve it."""

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        alibi_slopes: list[float] | None,
        sliding_window: int | None,
        kv_cache_dtype: str,
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        sinks: torch.Tensor | None = None,
    ) -> None:
        super().__init__(
            num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
            logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks,
        )  # fmt: skip
        dtype = get_current_vllm_config().model_config.dtype
        reasons = fallback_reasons(
            head_size=head_size, dtype=dtype, alibi_slopes=alibi_slopes, logits_soft_cap=logits_soft_cap,
            sinks=sinks, kv_cache_dtype=kv_cache_dtype, attn_type=attn_type,
        )  # fmt: skip
        self.uses_kv_offload_kernels = not reasons
        self._isa = default_isa()
        self._window = sliding_window if sliding_window is not None and sliding_window > 0 else 0
        self._layout: list[int] | None = None
        self._layout_key: tuple[int, ...] = ()
        _announce()
        if reasons:
            why = ", ".join(reasons)
            _log_once(
                f"fallback:{why}",
                "kv-offload CPU attention: layers with %s use vLLM's own CPU attention (not supported by "
                "kv-offload's kernels)", why,
            )  # fmt: skip

    # -- per-layer helpers -----------------------------------------------------------------
    def _cache_and_layout(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """The layer cache as ``uint8 [num_blocks, page_bytes]`` and the kernels' layout list."""
        num_blocks, heads, block_size, width = kv_cache.shape
        key = (num_blocks, heads, block_size, width, kv_cache.dtype.itemsize)
        if self._layout is None or key != self._layout_key:
            geometry = KVGeometry(
                num_layers=1, num_kv_heads=heads, head_size=width // 2, block_size=block_size,
                dtype=kv_cache.dtype, page_format=PageFormat.CPU,
            )  # fmt: skip
            self._layout = layout_list(geometry, 0)
            self._layout_key = key
        return kv_cache.view(num_blocks, -1).view(torch.uint8), self._layout

    def do_kv_cache_update(
        self,
        layer: torch.nn.Module,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        if not self.uses_kv_offload_kernels:
            super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
            return
        cache, layout = self._cache_and_layout(kv_cache)
        n = min(key.shape[0], slot_mapping.shape[0])
        slots = slot_mapping[:n]
        if slots.dtype != torch.int64:
            slots = slots.to(torch.int64)
        ops().reshape_and_cache(cache, key[:n], value[:n], slots.contiguous(), layout, kv_cache.dtype)
        STATS["cache_writes"] += 1

    def forward(
        self,
        layer: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: CPUAttentionMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        meta = attn_metadata
        if (
            not self.uses_kv_offload_kernels
            or meta is None
            or output_scale is not None
            or output_block_scale is not None
            or not isinstance(meta, KVOffloadCPUMetadata)
            or (meta.use_vllm_kernels and meta.causal is not True)
        ):
            if meta is not None:
                STATS["vllm_calls"] += 1
            return super().forward(
                layer, query, key, value, kv_cache, meta, output, output_scale, output_block_scale
            )
        cache, layout = self._cache_and_layout(kv_cache)
        total = meta.num_actual_tokens
        nd = meta.num_decodes
        table = meta.kernel_block_table
        assert table is not None and meta.decode_lens is not None
        kernels = ops()
        if nd:
            kernels.paged_decode_attention(
                output[:nd], query[:nd], cache, table[:nd], meta.decode_lens, layout, kv_cache.dtype,
                self.scale, self._window, 0, self._isa, False,
            )  # fmt: skip
            STATS["decode_calls"] += 1
        if total > nd:
            # vLLM wrote this step's K/V into the cache before forward (do_kv_cache_update, as
            # its own CPU backend relies on), so the kernel reads the new tokens from the pages
            # too: K is already dim-major there, no per-item transposes of the dense key
            # (4-11% less CPU time for a 4K-token fp32 prefill, measured).
            kernels.paged_prefill_attention(
                output[nd:total], query[nd:total], key[nd:total], value[nd:total], meta.prefill_query_start_loc,
                cache, table[nd:], meta.prefix_lens, layout, kv_cache.dtype, self.scale, self._window, self._isa,
                False, True,
            )  # fmt: skip
            STATS["prefill_calls"] += 1
        return output


class KVOffloadCPUAttentionBackend(CPUAttentionBackend):
    """vLLM's ``CPU_ATTN`` backend with kv-offload's impl and metadata builder."""

    supported_dtypes: ClassVar[list[torch.dtype]] = list(_KERNEL_DTYPES)

    @staticmethod
    def get_name() -> str:
        return "CPU_ATTN"

    @staticmethod
    def get_impl_cls() -> type[KVOffloadCPUAttentionImpl]:
        return KVOffloadCPUAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[KVOffloadCPUMetadataBuilder]:
        return KVOffloadCPUMetadataBuilder
