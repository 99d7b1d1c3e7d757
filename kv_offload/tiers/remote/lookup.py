# SPDX-License-Identifier: Apache-2.0
"""Remote lookups for the scheduler: batched, off the engine step, within a time budget.

vLLM asks the connector, per waiting request and per step, how many tokens it can supply
(``get_num_new_matched_tokens``), on the scheduler's thread: a round trip to a store there
would stall every request. :class:`RemoteIndex` answers from what it already knows and
otherwise starts one batched lookup of the request's blocks on its own thread and answers
``None`` ("ask again next step"). A lookup that takes longer than the budget counts as a
miss for the requests that were waiting on it (they go ahead with what the local tiers
hold); its answer, when it comes, still serves later requests.

Answers are kept for ``ttl_s`` (a block another instance stores is seen at most that late;
a block evicted from the store meanwhile makes a failed promotion, which recomputes).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

__all__ = ["RemoteIndex", "Lookup"]

logger = logging.getLogger(__name__)


class Lookup(Protocol):
    """What the index asks: a blocking, batched ``contains`` (a :class:`RemoteTier`)."""

    def contains(self, keys: Sequence[bytes]) -> list[bool]: ...


class RemoteIndex:
    """A non-blocking ``contains`` over a blocking lookup (the scheduler's ``TierIndex``).

    Args:
        tier: answers batched lookups (blocking; called only on this index's thread).
        budget_s: how long a request may wait for a lookup before going ahead without it.
        ttl_s: how long an answer is reused; expired answers are dropped as new ones come
            (they are kept in answer order, so the expired ones are the oldest).
        max_keys: answers kept at most (oldest dropped first), whatever their age.
    """

    def __init__(self, tier: Lookup, budget_s: float, *, ttl_s: float = 2.0, max_keys: int = 200_000) -> None:
        self._tier = tier
        self.budget_s = budget_s
        self.ttl_s = ttl_s
        self._max_keys = max_keys
        self._lock = threading.Lock()
        #: key -> (held, when answered)
        self._answers: OrderedDict[bytes, tuple[bool, float]] = OrderedDict()
        #: key -> when its lookup was started
        self._pending: dict[bytes, float] = {}
        self._queue: queue.SimpleQueue[tuple[bytes, ...] | None] = queue.SimpleQueue()
        #: lookup latencies (seconds) since the last :meth:`take_latencies`
        self._latencies: list[float] = []
        self.timeouts = 0
        self._thread = threading.Thread(target=self._run, name="kv_offload-remote-lookup", daemon=True)
        self._thread.start()

    def contains(self, keys: Sequence[bytes]) -> list[bool] | None:
        """Which leading ``keys`` are held, as far as known; ``None`` while a lookup of them
        runs within the budget. Only the leading run matters (a prefix): the answer stops at
        the first key known to be missing, and the rest of the list is ``False``."""
        now = time.monotonic()
        out = [False] * len(keys)
        ask: list[bytes] = []
        waiting = False
        with self._lock:
            for i, key in enumerate(keys):
                answer = self._answers.get(key)
                if answer is not None and now - answer[1] <= self.ttl_s:
                    if not answer[0]:
                        break
                    out[i] = True
                    continue
                started = self._pending.get(key)
                if started is None:
                    ask = list(keys[i:])
                    for k in ask:
                        self._pending.setdefault(k, now)
                    waiting = self.budget_s > 0
                    break
                if now - started > self.budget_s:
                    self.timeouts += 1
                    break  # over budget: a miss for this request; its answer comes later
                waiting = True
                break
        if ask:
            self._queue.put(tuple(ask))
        return None if waiting else out

    def _run(self) -> None:
        while (first := self._queue.get()) is not None:
            batch = list(first)
            stop = False
            while True:  # fold every lookup queued meanwhile into one round trip
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.extend(more)
            keys = list(dict.fromkeys(batch))
            started = time.monotonic()
            try:
                held = self._tier.contains(keys)
            except Exception:  # the tier reports its own failures; never kill this thread
                logger.exception("kv_offload: remote lookup failed")
                held = [False] * len(keys)
            done = time.monotonic()
            with self._lock:
                self._latencies.append(done - started)
                for key, there in zip(keys, held):
                    self._pending.pop(key, None)
                    self._answers[key] = (bool(there), done)
                    self._answers.move_to_end(key)
                self._drop_old(done)
            if stop:
                break

    def forget(self, keys: Sequence[bytes]) -> None:
        """Drop what is known of ``keys`` (a promotion of them failed: ask the store again)."""
        with self._lock:
            for key in keys:
                self._answers.pop(key, None)

    def learn(self, keys: Sequence[bytes]) -> None:
        """``keys`` were just written to the store by this instance's workers."""
        now = time.monotonic()
        with self._lock:
            for key in keys:
                self._answers[key] = (True, now)
                self._answers.move_to_end(key)
            self._drop_old(now)

    def _drop_old(self, now: float) -> None:
        """With the lock held: drop expired answers and any past ``max_keys``, oldest first.
        Found by the soak: answers were dropped only past ``max_keys`` (200 000), so the
        scheduler's process grew about 1.3 MiB a minute under load, holding answers it could
        no longer use."""
        answers = self._answers
        while answers and (len(answers) > self._max_keys or now - next(iter(answers.values()))[1] > self.ttl_s):
            answers.popitem(last=False)

    def __len__(self) -> int:
        """Answers held (for tests and memory accounting)."""
        with self._lock:
            return len(self._answers)

    def has_latencies(self) -> bool:
        return bool(self._latencies)

    def take_latencies(self) -> list[float]:
        with self._lock:
            out, self._latencies = self._latencies, []
        return out

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)
