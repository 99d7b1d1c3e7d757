# SPDX-License-Identifier: Apache-2.0
"""A tier on a distributed key-value store (Redis/Valkey, Mooncake Store), shared by every
vLLM instance that uses the same store: see docs/remote_tier.md."""

from kv_offload.tiers.remote.store import STORES as STORES
from kv_offload.tiers.remote.store import RemoteStore as RemoteStore
from kv_offload.tiers.remote.store import StoreUnavailable as StoreUnavailable

__all__ = ["STORES", "RemoteStore", "StoreUnavailable"]
