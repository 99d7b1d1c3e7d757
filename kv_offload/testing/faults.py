# SPDX-License-Identifier: Apache-2.0
"""Fault injection: a transfer engine that really fails chosen jobs.

Selected through the connector config's test-only keys ``fail_load_every`` /
``fail_store_every`` (every N-th job of that direction fails). A failing load does not
copy from the pool: it scribbles over its destination blocks (so serving them would change
the model's output) and reports failure, exactly as a broken transfer would. A failing
store writes nothing and reports failure. Every other job goes to the wrapped engine.
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Sequence

import torch

from kv_offload.transfer.base import Direction, TransferEngine, TransferJob, TransferResult

__all__ = ["FaultInjectingEngine"]


class FaultInjectingEngine(TransferEngine):
    """Wraps ``inner``; fails every ``fail_load_every``-th load and ``fail_store_every``-th store.

    Args:
        inner: the real engine.
        layers: the KV cache's per-layer tensors (dim 0 indexes blocks), to scribble on.
        fail_load_every, fail_store_every: 0 disables that direction's faults.
    """

    def __init__(
        self,
        inner: TransferEngine,
        layers: Sequence[torch.Tensor],
        *,
        fail_load_every: int = 0,
        fail_store_every: int = 0,
    ) -> None:
        self.inner = inner
        self.layers = list(layers)
        self.every = {Direction.LOAD: fail_load_every, Direction.STORE: fail_store_every}
        self.seen = {Direction.LOAD: 0, Direction.STORE: 0}
        self.injected = {Direction.LOAD: 0, Direction.STORE: 0}
        self._failed: list[TransferResult] = []
        self._in_inner: set[int] = set()
        self._lock = threading.Lock()

    def _should_fail(self, direction: Direction) -> bool:
        every = self.every[direction]
        self.seen[direction] += 1
        return every > 0 and self.seen[direction] % every == 0

    def submit(self, job: TransferJob) -> None:
        if not self._should_fail(job.direction):
            self.inner.submit(job)
            self._in_inner.add(job.job_id)
            return
        if job.direction is Direction.LOAD:
            # Wait for earlier jobs (a store may still read these blocks' old contents),
            # then leave garbage where the KV should have landed.
            self.inner.wait(sorted(self._in_inner))
            index = torch.as_tensor(job.device_blocks, dtype=torch.long)
            for layer in self.layers:
                layer[index.to(layer.device)] = float("nan")
        self.injected[job.direction] += 1
        with self._lock:
            self._failed.append(
                TransferResult(job.job_id, False, 0, 0.0, job.direction, error="injected failure (kv_offload.testing)")
            )

    def poll(self) -> list[TransferResult]:
        with self._lock:
            failed, self._failed = self._failed, []
        done = self.inner.poll()
        for result in done:
            self._in_inner.discard(result.job_id)
        return failed + done

    def wait(self, job_ids: Collection[int]) -> None:
        self.inner.wait(job_ids)

    def pending(self) -> int:
        return self.inner.pending()

    def shutdown(self) -> None:
        self.inner.shutdown()
