# SPDX-License-Identifier: Apache-2.0
"""From one job's coalesced descriptors to driver calls: split, and pick the copy method.

Pure logic (no CUDA): the CUDA engine turns every job's :class:`CopyBatch` into a list of
:class:`CopyCall` s with :func:`plan_calls` and enqueues them in order on one stream.

* **Splitting.** A batched-copy call is capped at ``max_descriptors`` (the driver copies the
  descriptor arrays during the call, and some platforms fault on very large batches; vLLM
  caps ROCm batches at 8192). Calls of one job stay in order on one stream, so splitting
  never changes the result.
* **Method.** ``BATCH`` (one ``cuMemcpyBatchAsync``) when the driver has it and the call
  has at least ``min_batch_descriptors`` descriptors; ``LOOP`` (``cuMemcpyAsync`` per
  descriptor) otherwise. Both are DMA on the copy engines. The thresholds are data, not
  constants baked into code paths: ``benchmarks/bench_gpu_transfer.py`` measures both
  methods per page size on the device, and a measured crossover goes into
  :class:`CopyPolicy`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from kv_offload.transfer.plan import CopyBatch

__all__ = ["CopyMethod", "CopyPolicy", "CopyCall", "split_batch", "plan_calls"]


class CopyMethod(str, enum.Enum):
    #: one cuMemcpyBatchAsync per call
    BATCH = "batch"
    #: one cuMemcpyAsync per descriptor
    LOOP = "loop"


@dataclass(frozen=True)
class CopyPolicy:
    """How descriptors become driver calls.

    Args:
        batch_available: cuMemcpyBatchAsync works here (see ``probe_batch_memcpy``).
        max_descriptors: most descriptors in one batched call.
        min_batch_descriptors: calls with fewer descriptors use the loop (a single
            cuMemcpyAsync has no batch setup to amortize).
    """

    batch_available: bool
    max_descriptors: int = 4096
    min_batch_descriptors: int = 2

    def __post_init__(self) -> None:
        if self.max_descriptors < 1:
            raise ValueError(f"CopyPolicy.max_descriptors must be >= 1, got {self.max_descriptors}")
        if self.min_batch_descriptors < 1:
            raise ValueError(
                f"CopyPolicy.min_batch_descriptors must be >= 1, got {self.min_batch_descriptors}"
            )

    def method_for(self, num_descriptors: int) -> CopyMethod:
        if self.batch_available and num_descriptors >= self.min_batch_descriptors:
            return CopyMethod.BATCH
        return CopyMethod.LOOP


@dataclass(frozen=True)
class CopyCall:
    """One driver call (or one loop of calls) of a job."""

    method: CopyMethod
    batch: CopyBatch


def split_batch(batch: CopyBatch, max_descriptors: int) -> list[CopyBatch]:
    """``batch`` cut into consecutive pieces of at most ``max_descriptors`` descriptors.

    Order is kept; an empty batch gives no pieces.
    """
    if max_descriptors < 1:
        raise ValueError(f"max_descriptors must be >= 1, got {max_descriptors}")
    n = batch.num_descriptors
    if n <= max_descriptors:
        return [batch] if n else []
    cuts = np.arange(max_descriptors, n, max_descriptors)
    return [
        CopyBatch(np.ascontiguousarray(s), np.ascontiguousarray(d), np.ascontiguousarray(z))
        for s, d, z in zip(np.split(batch.src, cuts), np.split(batch.dst, cuts), np.split(batch.sizes, cuts))
    ]


def plan_calls(batch: CopyBatch, policy: CopyPolicy) -> list[CopyCall]:
    """The driver calls that execute ``batch`` under ``policy``, in order.

    A loop call is not split: cuMemcpyAsync takes one descriptor at a time anyway.
    """
    if batch.num_descriptors == 0:
        return []
    if policy.method_for(batch.num_descriptors) is CopyMethod.LOOP:
        return [CopyCall(CopyMethod.LOOP, batch)]
    return [CopyCall(policy.method_for(p.num_descriptors), p) for p in split_batch(batch, policy.max_descriptors)]
