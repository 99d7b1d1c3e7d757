# SPDX-License-Identifier: Apache-2.0
"""The persistent local-disk tier: ``DiskTier(path, capacity_bytes, namespace, block_bytes)``."""

from kv_offload.tiers.disk.files import DiskTierError as DiskTierError
from kv_offload.tiers.disk.tier import DiskTier as DiskTier
from kv_offload.tiers.disk.tier import DiskTierStats as DiskTierStats

__all__ = ["DiskTier", "DiskTierStats", "DiskTierError"]
