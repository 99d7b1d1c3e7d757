# SPDX-License-Identifier: Apache-2.0
"""The only place kv-offload touches cuda-python.

Imports happen on first use, so this module imports cleanly on machines without CUDA.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

__all__ = ["cuda_available", "cudart", "check", "host_register", "host_unregister", "MAX_REGISTER_CHUNK"]

#: cudaHostRegister is applied in chunks of at most this many bytes.
MAX_REGISTER_CHUNK = 64 << 30


class CudaError(RuntimeError):
    pass


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
    return runtime


def check(result: Any, what: str) -> Any:
    """Unpack a cuda-python ``(err, *values)`` tuple, raising :class:`CudaError` on error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        name = getattr(err, "name", str(err))
        raise CudaError(f"{what} failed: {name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def host_register(address: int, length: int, chunk: int = MAX_REGISTER_CHUNK) -> list[tuple[int, int]]:
    """Page-lock ``[address, address+length)`` with cudaHostRegister, ``chunk`` bytes at a time.

    Returns the registered (address, length) chunks. On failure, chunks registered so far
    are unregistered again and :class:`CudaError` is raised.
    """
    rt = cudart()
    done: list[tuple[int, int]] = []
    offset = 0
    try:
        while offset < length:
            n = min(chunk, length - offset)
            check(
                rt.cudaHostRegister(address + offset, n, rt.cudaHostRegisterDefault),
                f"cudaHostRegister({n} bytes)",
            )
            done.append((address + offset, n))
            offset += n
    except Exception:
        host_unregister(done)
        raise
    return done


def host_unregister(chunks: list[tuple[int, int]]) -> None:
    rt = cudart()
    for address, _ in chunks:
        check(rt.cudaHostUnregister(address), "cudaHostUnregister")
