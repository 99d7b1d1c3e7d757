# SPDX-License-Identifier: Apache-2.0
from kv_offload.pool.host_pool import HostPool as HostPool
from kv_offload.pool.host_pool import PinMode as PinMode
from kv_offload.pool.host_pool import PoolError as PoolError
from kv_offload.pool.host_pool import PoolSpec as PoolSpec

__all__ = ["HostPool", "PinMode", "PoolError", "PoolSpec"]
