# SPDX-License-Identifier: Apache-2.0
"""The only place kv-offload touches cuda-python.

Imports happen on first use, so this module imports cleanly on machines without CUDA.

kv-offload talks to the **driver** API (``cuda.bindings.driver``) for everything it does
itself: host registration, batched and single async copies. The driver API works with any
installed driver (the runtime bindings of a newer cuda-python refuse to run on an older
driver), and it shares the device's primary context with torch, so streams, events and
pinned ranges are the same objects for both. Driver calls need a current context on the
calling thread: :func:`ensure_context` provides it (torch's runtime usually has made the
primary context current already).
"""

from __future__ import annotations

import functools
import threading
from types import ModuleType
from typing import Any

__all__ = [
    "CudaError",
    "cuda_available",
    "cudart",
    "driver",
    "check",
    "driver_version",
    "ensure_context",
    "host_register",
    "host_unregister",
    "is_host_registered",
    "MAX_REGISTER_CHUNK",
]

#: cuMemHostRegister is applied in chunks of at most this many bytes (single registrations
#: of hundreds of GiB fail on some hosts, and a failed one is costly to recover from).
MAX_REGISTER_CHUNK = 64 << 30


class CudaError(RuntimeError):
    """A CUDA call returned an error code."""


def cuda_available() -> bool:
    """A CUDA device is usable by torch in this process."""
    import torch

    return bool(torch.cuda.is_available())


@functools.cache
def cudart() -> ModuleType:
    """cuda-python's runtime bindings (``cuda.bindings.runtime``, or the pre-12.8 ``cuda.cudart``)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        from cuda import cudart as runtime  # type: ignore[no-redef]
    module: ModuleType = runtime
    return module


@functools.cache
def driver() -> ModuleType:
    """cuda-python's driver bindings (``cuda.bindings.driver``, or the pre-12.8 ``cuda.cuda``)."""
    try:
        from cuda.bindings import driver as drv
    except ImportError:
        from cuda import cuda as drv  # type: ignore[no-redef]
    module: ModuleType = drv
    return module


def check(result: Any, what: str) -> Any:
    """Unpack a cuda-python ``(err, *values)`` tuple, raising :class:`CudaError` on error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        name = getattr(err, "name", str(err))
        raise CudaError(f"{what} failed: {name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


_init_lock = threading.Lock()
_initialized = False


def _init_driver() -> ModuleType:
    global _initialized
    drv = driver()
    if not _initialized:
        with _init_lock:
            if not _initialized:
                check(drv.cuInit(0), "cuInit")
                _initialized = True
    return drv


def driver_version() -> int:
    """The installed driver's CUDA version as ``1000 * major + 10 * minor`` (12080 = 12.8)."""
    return int(check(_init_driver().cuDriverGetVersion(), "cuDriverGetVersion"))


def ensure_context(device_index: int | None = None) -> None:
    """Make sure the calling thread has a current context (the device's primary context).

    torch uses the primary context too, so kv-offload's driver calls and torch's kernels
    operate on the same address space, streams and events. ``None`` means torch's current
    device.
    """
    drv = _init_driver()
    ctx = check(drv.cuCtxGetCurrent(), "cuCtxGetCurrent")
    if ctx is not None and int(ctx) != 0:
        return
    if device_index is None:
        import torch

        device_index = int(torch.cuda.current_device())
    dev = check(drv.cuDeviceGet(device_index), "cuDeviceGet")
    primary = check(drv.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
    check(drv.cuCtxSetCurrent(primary), "cuCtxSetCurrent")


def host_register(address: int, length: int, chunk: int = MAX_REGISTER_CHUNK) -> list[tuple[int, int]]:
    """Page-lock ``[address, address+length)`` for DMA, ``chunk`` bytes at a time.

    Registered as portable (usable from every context) and device-mapped, which is what the
    runtime's ``cudaHostRegisterDefault`` means under unified addressing. Returns the
    registered (address, length) chunks. On failure, chunks registered so far are
    unregistered again and :class:`CudaError` is raised.
    """
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    drv = _init_driver()
    ensure_context()
    flags = int(drv.CU_MEMHOSTREGISTER_PORTABLE) | int(drv.CU_MEMHOSTREGISTER_DEVICEMAP)
    done: list[tuple[int, int]] = []
    offset = 0
    try:
        while offset < length:
            n = min(chunk, length - offset)
            check(drv.cuMemHostRegister(address + offset, n, flags), f"cuMemHostRegister({n} bytes)")
            done.append((address + offset, n))
            offset += n
    except Exception:
        host_unregister(done)
        raise
    return done


def host_unregister(chunks: list[tuple[int, int]]) -> None:
    """Undo :func:`host_register`. Every chunk is attempted; the first error is raised after."""
    if not chunks:
        return
    drv = _init_driver()
    ensure_context()
    first: CudaError | None = None
    for address, _ in chunks:
        try:
            check(drv.cuMemHostUnregister(address), "cuMemHostUnregister")
        except CudaError as exc:
            first = first or exc
    if first is not None:
        raise first


def is_host_registered(address: int) -> bool:
    """``address`` lies in page-locked host memory known to CUDA (registered or allocated).

    Asks the driver for the pointer's memory type: page-locked host memory reports
    ``CU_MEMORYTYPE_HOST``; plain pageable memory is unknown to CUDA (an error).
    """
    drv = _init_driver()
    ensure_context()
    err, value = drv.cuPointerGetAttribute(drv.CUpointer_attribute.CU_POINTER_ATTRIBUTE_MEMORY_TYPE, address)
    return int(err) == 0 and int(value) == int(drv.CUmemorytype.CU_MEMORYTYPE_HOST)
