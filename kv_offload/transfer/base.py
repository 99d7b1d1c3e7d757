# SPDX-License-Identifier: Apache-2.0
"""The transfer-engine interface: jobs of block copies between a KV cache and the host pool.

A job copies whole blocks: ``device_blocks[i]`` of the engine's KV cache <-> host slot
``host_slots[i]`` of the pool, every layer. Engines run jobs asynchronously: ``submit``
returns at once, ``poll`` hands back what finished (successfully or not) and never blocks,
``wait`` blocks until the named jobs finished (their results still come from ``poll``).
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

__all__ = ["Direction", "TransferJob", "TransferResult", "TransferEngine", "TransferError"]


class TransferError(RuntimeError):
    """A job could not be submitted (bad block ids, engine closed, ...)."""


class Direction(str, enum.Enum):
    #: KV cache -> host pool (offload).
    STORE = "store"
    #: host pool -> KV cache (bring back).
    LOAD = "load"


_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1


def _is_bool(value: object) -> bool:
    return isinstance(value, (bool, np.bool_))


def _as_index_array(values: Sequence[int] | npt.NDArray[np.int64], what: str) -> npt.NDArray[np.int64]:
    """``values`` as a 1-D int64 array, refusing anything that is not exactly integers.

    ``np.asarray(..., dtype=np.int64)`` would truncate ``1.9`` to ``1``, turn ``True`` into
    ``1`` and parse ``"1"``: a wrong block would be copied silently.
    """
    try:
        arr = np.asarray(values)
    except (ValueError, TypeError, OverflowError) as exc:
        raise TransferError(f"{what} must be a 1-D list of integers ({exc})") from exc
    if arr.ndim != 1:
        raise TransferError(f"{what} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    kind = arr.dtype.kind
    if kind == "O":
        items = arr.tolist()
        if not all(isinstance(v, (int, np.integer)) and not _is_bool(v) for v in items):
            bad = next(v for v in items if not isinstance(v, (int, np.integer)) or _is_bool(v))
            raise TransferError(f"{what} must be integers, got {type(bad).__name__} {bad!r}")
        if not all(_INT64_MIN <= int(v) <= _INT64_MAX for v in items):
            bad = next(v for v in items if not _INT64_MIN <= int(v) <= _INT64_MAX)
            raise TransferError(f"{what}: {bad} does not fit in int64")
        return np.array([int(v) for v in items], dtype=np.int64)
    if kind == "u":
        if int(arr.max()) > _INT64_MAX:
            raise TransferError(f"{what}: {int(arr.max())} does not fit in int64")
    elif kind != "i":
        # Floats (even integral ones: a caller computing ids in float has a bug), bools,
        # strings, complex: refused rather than converted.
        raise TransferError(f"{what} must be integers, got dtype {arr.dtype}")
    if isinstance(values, (list, tuple)) and any(_is_bool(v) for v in values):
        raise TransferError(f"{what} must be integers, got a bool")  # [1, True] is int64 to numpy
    return arr.astype(np.int64, copy=False)


@dataclass(frozen=True)
class TransferJob:
    """One batch of block copies in one direction."""

    job_id: int
    direction: Direction
    device_blocks: npt.NDArray[np.int64] = field(repr=False)
    host_slots: npt.NDArray[np.int64] = field(repr=False)

    @classmethod
    def make(
        cls,
        job_id: int,
        direction: Direction,
        device_blocks: Sequence[int] | npt.NDArray[np.int64],
        host_slots: Sequence[int] | npt.NDArray[np.int64],
    ) -> TransferJob:
        dev = _as_index_array(device_blocks, f"job {job_id}: device blocks")
        host = _as_index_array(host_slots, f"job {job_id}: host slots")
        if dev.shape != host.shape:
            raise TransferError(
                f"job {job_id}: {dev.size} device blocks but {host.size} host slots"
            )
        return cls(job_id, Direction(direction), dev, host)

    @property
    def num_blocks(self) -> int:
        return int(self.device_blocks.size)


@dataclass(frozen=True)
class TransferResult:
    job_id: int
    success: bool
    #: bytes moved (0 on failure)
    nbytes: int
    #: seconds from submission to completion
    seconds: float
    direction: Direction
    error: str | None = None


class TransferEngine(ABC):
    """Moves blocks between one worker's KV cache and the host pool.

    Subclasses implement the three abstract methods; ``shutdown`` defaults to waiting for
    every submitted job.
    """

    @abstractmethod
    def submit(self, job: TransferJob) -> None:
        """Queue ``job``; returns without waiting. Raises :class:`TransferError` on a bad job."""

    @abstractmethod
    def poll(self) -> list[TransferResult]:
        """Results of jobs finished since the last call, in completion order. Never blocks."""

    @abstractmethod
    def wait(self, job_ids: Collection[int]) -> None:
        """Block until every job in ``job_ids`` has finished (unknown ids are ignored)."""

    def pending(self) -> int:
        """Jobs submitted and not yet handed back by :meth:`poll` (default: unknown, 0)."""
        return 0

    def wait_for(self, job_ids: Collection[int], timeout: float) -> bool:
        """:meth:`wait`, for at most ``timeout`` seconds: whether every job finished.

        Default: an engine that cannot bound its wait waits for good (and says ``True``)."""
        self.wait(job_ids)
        return True

    def cancel(self, job_ids: Collection[int]) -> set[int]:
        """Cancel jobs that have not started copying: the ids returned will never touch the
        KV cache nor the pool (their results still come from :meth:`poll`, as failures).
        A job already copying, finished or unknown is not in the result. Default: an engine
        that cannot cancel returns an empty set, and its callers wait for the copy instead."""
        return set()

    def shutdown(self) -> None:
        """Stop the engine. Default: nothing to release."""
