# SPDX-License-Identifier: Apache-2.0
"""Tiers that hold whole KV blocks by key, below the host-DRAM pool (``disk``; more to come)."""

from kv_offload.tiers.base import BlockTier as BlockTier
from kv_offload.tiers.base import TierStats as TierStats

__all__ = ["BlockTier", "TierStats"]
