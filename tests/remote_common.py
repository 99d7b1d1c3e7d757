# SPDX-License-Identifier: Apache-2.0
"""What tests of the remote tier share: a store that cannot start fails the test in CI.

``scripts/test.sh`` sets ``KV_OFFLOAD_REQUIRE_STORES=1`` (as it sets ``KV_OFFLOAD_REQUIRE_VLLM``):
there a store that does not start is a failure, never a silent skip. Elsewhere (a developer
machine without redis-server) the test is skipped with the reason.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from kv_offload.testing.redis_server import RedisServer
from kv_offload.testing.store_process import StoreStartError

__all__ = ["redis_server", "store_unavailable"]


def store_unavailable(reason: str) -> None:
    """Fail (stores required) or skip (not required) a test whose store cannot start."""
    if os.environ.get("KV_OFFLOAD_REQUIRE_STORES") == "1":
        pytest.fail(f"store required (KV_OFFLOAD_REQUIRE_STORES=1) but unavailable: {reason}")
    pytest.skip(f"store unavailable: {reason}")


def redis_server(**options: Any) -> Iterator[RedisServer]:
    """A private redis-server (``RedisServer(**options)``) for a fixture to yield; stopped after."""
    try:
        srv = RedisServer(**options).start()
    except StoreStartError as exc:
        store_unavailable(str(exc))
        raise
    try:
        yield srv
    finally:
        srv.close()
