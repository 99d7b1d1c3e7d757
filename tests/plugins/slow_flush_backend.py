# SPDX-License-Identifier: Apache-2.0
"""A host backend whose ``on_stored`` blocks until released (loaded by module path in tests)."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from kv_offload.backends.host import HostBackend

#: what happened, in order; ``release`` lets a blocked ``on_stored`` finish
EVENTS: list[str] = []
RELEASE = threading.Event()


class SlowFlushBackend(HostBackend):
    def on_stored(self, slots: Sequence[int]) -> None:
        EVENTS.append(f"on_stored:{threading.current_thread() is threading.main_thread()}")
        assert RELEASE.wait(10), "the test never released on_stored"
        EVENTS.append("flushed")

    def close(self) -> None:
        EVENTS.append("close")
        super().close()
