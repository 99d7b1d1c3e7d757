# SPDX-License-Identifier: Apache-2.0
"""kv-offload: a larger KV cache for vLLM, in host memory.

The engine-agnostic core lives here (geometry, pool, manager, policies, backends, transfer
engines). The vLLM connector is ``kv_offload.vllm.KVOffloadConnector``; it is the only
place vLLM is imported.
"""

from kv_offload.backends import BACKENDS as BACKENDS
from kv_offload.backends import BackendSpec as BackendSpec
from kv_offload.backends import StorageBackend as StorageBackend
from kv_offload.config import ConfigError as ConfigError
from kv_offload.config import OffloadConfig as OffloadConfig
from kv_offload.geometry import KVGeometry as KVGeometry
from kv_offload.geometry import PageFormat as PageFormat
from kv_offload.manager import OffloadManager as OffloadManager
from kv_offload.manager import StorePlan as StorePlan
from kv_offload.policies import POLICIES as POLICIES
from kv_offload.policies import EvictionPolicy as EvictionPolicy
from kv_offload.pool import HostPool as HostPool
from kv_offload.pool import PoolSpec as PoolSpec
from kv_offload.registry import Registry as Registry
from kv_offload.registry import RegistryError as RegistryError

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "BackendSpec", "StorageBackend", "ConfigError", "OffloadConfig", "KVGeometry",
    "PageFormat", "OffloadManager", "StorePlan", "POLICIES", "EvictionPolicy", "HostPool",
    "PoolSpec", "Registry", "RegistryError", "__version__",
]  # fmt: skip
