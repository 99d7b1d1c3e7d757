# SPDX-License-Identifier: Apache-2.0
"""What tests of the remote tier share: a store that cannot start fails the test in CI.

``scripts/test.sh`` sets ``KV_OFFLOAD_REQUIRE_STORES=1`` (as it sets ``KV_OFFLOAD_REQUIRE_VLLM``):
there a store that does not start is a failure, never a silent skip. Elsewhere (a developer
machine without redis-server) the test is skipped with the reason.
"""

from __future__ import annotations

import os

import pytest

__all__ = ["store_unavailable"]


def store_unavailable(reason: str) -> None:
    """Fail (stores required) or skip (not required) a test whose store cannot start."""
    if os.environ.get("KV_OFFLOAD_REQUIRE_STORES") == "1":
        pytest.fail(f"store required (KV_OFFLOAD_REQUIRE_STORES=1) but unavailable: {reason}")
    pytest.skip(f"store unavailable: {reason}")
