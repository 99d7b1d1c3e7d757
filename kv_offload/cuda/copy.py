# SPDX-License-Identifier: Apache-2.0
"""Asynchronous byte-range copies on a CUDA stream through the driver API.

Two ways to enqueue a list of ``(src, dst, size)`` descriptors:

* :func:`memcpy_batch_async`: one ``cuMemcpyBatchAsync`` call (CUDA >= 12.8 drivers). The
  driver reads the three arrays during the call, so they need not outlive it (no pinned
  descriptor buffers are needed from Python). The batch runs in stream order as a whole;
  copies inside it have no order among themselves, which is fine because the descriptors
  of one job never overlap.
* :func:`memcpy_loop_async`: one ``cuMemcpyAsync`` per descriptor (any driver).

:func:`probe_batch_memcpy` finds out, with a real 4 KiB copy, whether the first way works
with the installed driver and bindings (the call's signature changed between CUDA 12 and
13 and older drivers lack it); the engine falls back to the loop otherwise.

Pointers are raw integers: device addresses and page-locked (or, slower, pageable) host
addresses in the unified address space. Nothing here imports cuda-python at module load.
"""

from __future__ import annotations

import logging

import numpy as np
import numpy.typing as npt

from kv_offload.cuda.runtime import CudaError, check, driver, driver_version, ensure_context

__all__ = ["BATCH_MIN_DRIVER", "memcpy_batch_async", "memcpy_loop_async", "probe_batch_memcpy"]

logger = logging.getLogger(__name__)

#: First driver version with cuMemcpyBatchAsync (CUDA 12.8).
BATCH_MIN_DRIVER = 12080

I64 = npt.NDArray[np.int64]


def _attributes(src_order_any: bool) -> object:
    drv = driver()
    attr = drv.CUmemcpyAttributes()
    order = drv.CUmemcpySrcAccessOrder
    # STREAM: the source is read in stream order, i.e. only after every barrier enqueued
    # before the copy. Required when the source is device memory that compute kernels
    # write (stores) - otherwise the DMA could read the block before the kernel that
    # produced it finished. ANY lets the driver read the source out of stream order; it is
    # valid only for sources nothing in flight writes (host slots being loaded: the manager
    # pins them for the load and their store finished before they could be looked up).
    attr.srcAccessOrder = (
        order.CU_MEMCPY_SRC_ACCESS_ORDER_ANY if src_order_any else order.CU_MEMCPY_SRC_ACCESS_ORDER_STREAM
    )
    return attr


def memcpy_batch_async(src: I64, dst: I64, sizes: I64, stream: int, *, src_order_any: bool = False) -> None:
    """Enqueue ``sizes[i]`` bytes ``src[i] -> dst[i]`` for every ``i`` as one batched call on ``stream``."""
    n = int(sizes.size)
    if n == 0:
        return
    drv = driver()
    ptr = drv.CUdeviceptr
    dsts = [ptr(p) for p in dst.tolist()]
    srcs = [ptr(p) for p in src.tolist()]
    # One attribute set for the whole batch: attrsIdxs=[0] says it applies from copy 0 on.
    result = drv.cuMemcpyBatchAsync(dsts, srcs, sizes.tolist(), n, [_attributes(src_order_any)], [0], 1, stream)
    # CUDA 12.x bindings return (err, failIdx), 13.x return (err,): check() accepts both.
    err = result[0] if isinstance(result, tuple) else result
    if int(err) != 0:
        fail = f" (descriptor {int(result[1])})" if isinstance(result, tuple) and len(result) > 1 else ""
        name = getattr(err, "name", str(err))
        raise CudaError(f"cuMemcpyBatchAsync of {n} copies failed: {name}{fail}")


def memcpy_loop_async(src: I64, dst: I64, sizes: I64, stream: int) -> None:
    """Enqueue one ``cuMemcpyAsync`` per descriptor on ``stream`` (in order)."""
    drv = driver()
    copy = drv.cuMemcpyAsync
    for s, d, n in zip(src.tolist(), dst.tolist(), sizes.tolist()):
        check(copy(d, s, n, stream), f"cuMemcpyAsync({n} bytes)")


def probe_batch_memcpy(device_index: int) -> str | None:
    """``None`` if cuMemcpyBatchAsync works here, else why not (for the log and the fallback).

    Copies 4 KiB between two device buffers with one batched call on a private stream and
    checks the bytes, so a binding/driver mismatch is found before any job depends on it.
    """
    import torch

    try:
        version = driver_version()
    except Exception as exc:  # no usable driver bindings at all
        return f"driver version unknown ({exc})"
    if version < BATCH_MIN_DRIVER:
        return f"driver supports CUDA {version // 1000}.{version % 1000 // 10} < 12.8"
    if not hasattr(driver(), "cuMemcpyBatchAsync"):
        return "the installed cuda-python has no cuMemcpyBatchAsync binding"
    device = torch.device("cuda", device_index)
    try:
        ensure_context(device_index)
        with torch.cuda.device(device):
            src = torch.arange(4096, dtype=torch.uint8, device=device)
            dst = torch.zeros(4096, dtype=torch.uint8, device=device)
            stream = torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]
            # The probe's stream must see the buffers' initialisation (done on the current
            # stream) before it copies.
            stream.wait_stream(torch.cuda.current_stream(device))
            one = np.array([4096], dtype=np.int64)
            memcpy_batch_async(
                np.array([src.data_ptr()], dtype=np.int64),
                np.array([dst.data_ptr()], dtype=np.int64),
                one,
                stream.cuda_stream,
            )
            stream.synchronize()
            if not torch.equal(src, dst):
                return "cuMemcpyBatchAsync probe copied wrong bytes"
    except Exception as exc:
        logger.info("kv_offload: cuMemcpyBatchAsync unavailable (%s); using cuMemcpyAsync", exc)
        return f"{type(exc).__name__}: {exc}"
    return None
