# SPDX-License-Identifier: Apache-2.0
"""Transfer engines: move blocks between an engine's KV cache and the host pool."""

from kv_offload.transfer.base import Direction as Direction
from kv_offload.transfer.base import TransferEngine as TransferEngine
from kv_offload.transfer.base import TransferError as TransferError
from kv_offload.transfer.base import TransferJob as TransferJob
from kv_offload.transfer.base import TransferResult as TransferResult
from kv_offload.transfer.plan import CopyBatch as CopyBatch
from kv_offload.transfer.plan import PageRegion as PageRegion
from kv_offload.transfer.plan import build_copy_batch as build_copy_batch
from kv_offload.transfer.plan import coalesce as coalesce
from kv_offload.transfer.plan import regions_from_layers as regions_from_layers

__all__ = [
    "Direction", "TransferEngine", "TransferError", "TransferJob", "TransferResult",
    "CopyBatch", "PageRegion", "build_copy_batch", "coalesce", "regions_from_layers",
]  # fmt: skip
