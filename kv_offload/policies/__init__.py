# SPDX-License-Identifier: Apache-2.0
"""Eviction policies and their registry (``lru``, ``arc``; add your own with ``register``)."""

from kv_offload.policies.base import EvictionPolicy as EvictionPolicy
from kv_offload.policies.base import OffloadKey as OffloadKey
from kv_offload.registry import Registry

POLICIES: Registry[EvictionPolicy] = Registry("eviction policy", EvictionPolicy)
POLICIES.register("lru", "kv_offload.policies.lru", "LRUPolicy")
POLICIES.register("arc", "kv_offload.policies.arc", "ARCPolicy")

__all__ = ["EvictionPolicy", "OffloadKey", "POLICIES"]
