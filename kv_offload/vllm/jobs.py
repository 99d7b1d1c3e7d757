# SPDX-License-Identifier: Apache-2.0
"""The scheduler half's jobs: what each planned copy holds in the pool until it settles, and
the backstop for a job no worker reports.

A worker fails its own jobs at ``job_timeout_s`` (see :mod:`kv_offload.vllm.worker`); a job
still unreported at twice that plus 5 s (a lost report, a dead rank) is *timed out* here: counted,
moved out of the pending jobs (vLLM is not kept stepping for it) and its store fence lifted,
but its pool slots stay as they are (protected, reserved or pinned: *quarantined*), since a
worker may still read or write them. A report arriving later settles it, always as a
failure (whatever it copied is never trusted), and frees the slots.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["Job", "Kind"]


class Kind(enum.Enum):
    LOAD = "load"
    STORE = "store"
    #: lower tier (disk, remote) -> pool -> KV cache
    PROMOTE = "promote"
    #: pool -> lower tier
    WRITEBACK = "writeback"


@dataclass
class Job:
    kind: Kind
    keys: tuple[bytes, ...]
    device_blocks: tuple[int, ...]
    reports: int = 0
    success: bool = True
    #: the lower tier of a promotion or write-back
    tier: str = ""
    #: a write-back: the tier's blocks removed first, to make room (``LowerTier.plan_write``)
    evict: tuple[bytes, ...] = ()
    #: when the scheduler stops waiting for its reports (monotonic seconds)
    deadline: float = float("inf")
    #: counted as timed out (by a worker, or by the scheduler's backstop)
    timed_out: bool = False

    @property
    def counter(self) -> str:
        """The counter of its timeouts (``timed_out_loads``, ...)."""
        return f"timed_out_{self.kind.value}s"
