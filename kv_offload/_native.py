# SPDX-License-Identifier: Apache-2.0
"""Loads the compiled extension ``kv_offload._C`` (which registers ``torch.ops.kv_offload``)."""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

__all__ = ["load_native", "NativeExtensionMissing"]


class NativeExtensionMissing(ImportError):
    pass


@functools.cache
def load_native() -> ModuleType:
    """Import ``kv_offload._C`` once; a clear error if the package was installed without it."""
    try:
        module = importlib.import_module("kv_offload._C")
    except ImportError as exc:
        raise NativeExtensionMissing(
            "kv_offload._C is not built: reinstall with `pip install --no-build-isolation -e .`"
            f" next to the torch you run (a C++17 compiler is needed): {exc}"
        ) from exc
    return module
