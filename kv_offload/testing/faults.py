# SPDX-License-Identifier: Apache-2.0
"""Fault injection for tests: a transfer engine that really fails chosen jobs, and faults
raised or stalled inside the real transfer threads.

Selected through the connector config's test-only keys:

* ``fail_load_every`` / ``fail_store_every`` (:class:`FaultInjectingEngine`): every N-th job
  of that direction fails. A failing load does not copy from the pool: it scribbles over its
  destination blocks (so serving them would change the model's output) and reports failure,
  exactly as a broken transfer would. A failing store writes nothing and reports failure.
* ``hang_every`` + ``hang_ms`` and ``raise_in_transfer_every`` (:class:`ThreadFaults`): run on
  the copy thread of the CPU engine and on each tier's I/O thread before every job, they
  stall every N-th job (as a stuck driver or disk would) or raise inside the thread.
* ``slow_io_ms``: the disk tier delays each read and write call (in the tier itself).
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Sequence

import torch

from kv_offload.transfer.base import Direction, TransferEngine, TransferJob, TransferResult

__all__ = ["FaultInjectingEngine", "InjectedFault", "ThreadFaults"]


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

    def wait_for(self, job_ids: Collection[int], timeout: float) -> bool:
        return self.inner.wait_for(job_ids, timeout)

    def cancel(self, job_ids: Collection[int]) -> set[int]:
        return self.inner.cancel(job_ids)

    def pending(self) -> int:
        return self.inner.pending()

    def shutdown(self) -> None:
        self.inner.shutdown()


class InjectedFault(RuntimeError):
    """Raised inside a transfer thread by :class:`ThreadFaults`."""


class ThreadFaults:
    """A hook for a transfer thread (``CpuTransferEngine.fault_hook``, ``TierIO.fault_hook``):
    called before each job, it raises :class:`InjectedFault` on every ``raise_every``-th call
    and stalls every ``hang_every``-th call for ``hang_s`` seconds (0: until :meth:`release`).
    Counts what it did (``raised``, ``hung``)."""

    def __init__(self, *, hang_every: int = 0, hang_s: float = 0.0, raise_every: int = 0, name: str = "") -> None:
        self.hang_every = hang_every
        self.hang_s = hang_s
        self.raise_every = raise_every
        self.name = name
        self.calls = 0
        self.raised = 0
        self.hung = 0
        self._released = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, *job: object) -> None:
        with self._lock:
            self.calls += 1
            n = self.calls
        if self.raise_every and n % self.raise_every == 0:
            with self._lock:
                self.raised += 1
            raise InjectedFault(f"injected exception in the {self.name or 'transfer'} thread (kv_offload.testing)")
        if self.hang_every and n % self.hang_every == 0:
            with self._lock:
                self.hung += 1
            self._released.wait(self.hang_s if self.hang_s > 0 else None)

    def release(self) -> None:
        """End every stall now and from now on (at shutdown: the threads must finish)."""
        self._released.set()


def thread_faults(config: object, name: str) -> ThreadFaults | None:
    """The :class:`ThreadFaults` a connector config's test-only keys ask for, or ``None``."""
    hang_every = int(getattr(config, "hang_every", 0))
    raise_every = int(getattr(config, "raise_in_transfer_every", 0))
    if not hang_every and not raise_every:
        return None
    hang_s = int(getattr(config, "hang_ms", 0)) / 1000
    return ThreadFaults(hang_every=hang_every, hang_s=hang_s, raise_every=raise_every, name=name)
