# SPDX-License-Identifier: Apache-2.0
"""CPU attention computed in place over KV blocks (host pool slots or any paged cache).

* :func:`paged_decode_attention`, :func:`paged_prefill_attention`: the kernels, over a
  ``uint8 [num_blocks, block_bytes]`` cache and a :class:`~kv_offload.geometry.KVGeometry`.
* :class:`PoolAttention`: the same over a :class:`~kv_offload.pool.HostPool` (also one
  attached read-only from another process), addressed by slots or by block hashes.
* :mod:`kv_offload.attention.reference`: the plain-torch oracle of every op.

See docs/attention.md for the build, the ISA paths and the page formats.
"""

from kv_offload.attention._ops import ISA_ENV as ISA_ENV
from kv_offload.attention._ops import auto_isa as auto_isa
from kv_offload.attention._ops import available_isas as available_isas
from kv_offload.attention._ops import bf16_dot_rate as bf16_dot_rate
from kv_offload.attention._ops import effective_isa as effective_isa
from kv_offload.attention.paged import paged_decode_attention as paged_decode_attention
from kv_offload.attention.paged import paged_prefill_attention as paged_prefill_attention
from kv_offload.attention.serving import BlockIndex as BlockIndex
from kv_offload.attention.serving import PoolAttention as PoolAttention
from kv_offload.attention.serving import pin_threads_to_numa_node as pin_threads_to_numa_node

__all__ = [
    "ISA_ENV", "auto_isa", "available_isas", "bf16_dot_rate", "effective_isa", "paged_decode_attention", "paged_prefill_attention", "BlockIndex",
    "PoolAttention", "pin_threads_to_numa_node",
]  # fmt: skip
