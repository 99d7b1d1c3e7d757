# SPDX-License-Identifier: Apache-2.0
"""The scheduler half's view of the tiers below the pool (disk, remote): what it asks them,
what its workers wrote there, and which blocks it no longer offers from them."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["REMOTE_RETRY_S", "TIER_ORDER", "LowerTier", "TierIndex"]

#: the lower tiers, top to bottom: a block is looked up in this order below the pool
TIER_ORDER = ("disk", "remote")
#: seconds before a block whose promotion from the remote tier failed is offered again
REMOTE_RETRY_S = 30.0


class TierIndex(Protocol):
    """What the scheduler asks of a tier below the pool: which blocks it holds, without
    waiting (the disk tier's in-memory index; the remote tier's
    :class:`~kv_offload.tiers.remote.lookup.RemoteIndex`). ``None`` means "not known yet"
    (a lookup still in flight): the request is asked about again next step, and the step
    never waits for a slow tier."""

    def contains(self, keys: Sequence[bytes]) -> list[bool] | None: ...


@dataclass
class LowerTier:
    """The scheduler's view of one tier below the pool."""

    name: str
    index: TierIndex
    #: completed stores are written through to it
    write: bool = True
    #: blocks our workers wrote there -> when the write settled (monotonic). The index may
    #: learn of them only later, so they are offered meanwhile; once an index that re-reads
    #: the tier (the disk's: ``refreshed_at``) has done so since, the index decides: the tier
    #: may have evicted them (found by the soak: a disk smaller than this record).
    written: OrderedDict[bytes, float] = field(default_factory=OrderedDict)
    #: blocks whose promotion failed -> when: not offered from this tier again by this
    #: scheduler (a corrupt block in a live process's disk segment stays listed; offering it
    #: again would make the request that recomputes retry the same failing promotion forever)
    failed: OrderedDict[bytes, float] = field(default_factory=OrderedDict)
    #: how long a failed block stays refused (None: for good). The remote tier's failures
    #: are mostly outages, and another instance may store the block again: it is asked
    #: about again after a while.
    failed_ttl_s: float | None = None
    #: another engine's blocks, converted on load (:mod:`kv_offload.vllm.imports`): never
    #: written, and counted as imports besides their medium's hits
    imported: bool = False

    @property
    def medium(self) -> str:
        """The tier the blocks are in ("disk", "remote"); an import's name is ``disk.import0``."""
        return self.name.split(".", 1)[0]

    def ours(self, key: bytes) -> bool:
        """``key`` was written by our workers after the index last looked at the tier."""
        when = self.written.get(key)
        if when is None:
            return False
        seen = getattr(self.index, "refreshed_at", None)
        return seen is None or when > seen

    def refuses(self, key: bytes) -> bool:
        when = self.failed.get(key)
        if when is None:
            return False
        if self.failed_ttl_s is not None and time.monotonic() - when > self.failed_ttl_s:
            del self.failed[key]
            return False
        return True
    #: keys whose store completed, to write through next step
    queue: list[bytes] = field(default_factory=list)
