# SPDX-License-Identifier: Apache-2.0
"""What the scheduler half reads of a vLLM request, and what it keeps per request."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from kv_offload.keys import KeyChain

__all__ = ["ReqState", "RequestView", "ScheduledRequest"]


class RequestView(Protocol):
    """The parts of a vLLM ``Request`` the scheduler half reads."""

    @property
    def request_id(self) -> str: ...
    @property
    def all_token_ids(self) -> Sequence[int]: ...
    @property
    def num_tokens(self) -> int: ...
    @property
    def num_prompt_tokens(self) -> int: ...
    @property
    def num_computed_tokens(self) -> int: ...


@dataclass(frozen=True)
class ScheduledRequest:
    """One request scheduled this step: ``num_new_tokens`` computed from ``num_computed_tokens``."""

    request: RequestView
    num_computed_tokens: int
    num_new_tokens: int
    block_ids: Sequence[int]


@dataclass
class ReqState:
    request: RequestView
    #: the request's block keys, hashed once each as its tokens grow
    chain: KeyChain
    #: leading blocks already offered to the pool (stored, present or in flight); a block
    #: that found no room is offered again, and nothing after it is stored before it
    offered: int = 0
    #: keys of those blocks: never evicted to store the same prompt's later blocks
    kept: set[bytes] = field(default_factory=set)
    #: blocks before this index were already counted as skipped (a retried gap counts once)
    counted: int = 0
    #: the blocks past an unkeyable one were counted as skipped
    unkeyable_counted: bool = False

    def rewind(self) -> None:
        self.offered = self.counted = 0
        self.kept.clear()
