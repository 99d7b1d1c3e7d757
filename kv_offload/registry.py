# SPDX-License-Identifier: Apache-2.0
"""One lazy registry idiom for every pluggable part (eviction policies, storage backends).

``register(name, module_path, class_name)`` records where a class lives; nothing is imported
until ``resolve`` asks for it. A name that was never registered can still be loaded from a
module path (the escape hatch for classes outside kv-offload)::

    POLICIES.register("my_lfu", "my_pkg.policies", "LFUPolicy")
    POLICIES.resolve("my_lfu")                                  # by registered name
    POLICIES.resolve("LFUPolicy", module_path="my_pkg.policies")  # by module path
"""

from __future__ import annotations

import importlib
import threading
from typing import Any, Generic, TypeVar, cast

__all__ = ["Registry", "RegistryError"]

T = TypeVar("T")


class RegistryError(LookupError):
    """Unknown name, duplicate registration, import failure or wrong base class."""


class Registry(Generic[T]):
    """Name -> (module path, class name), resolved lazily to a subclass of ``base``."""

    def __init__(self, kind: str, base: type[Any]) -> None:
        # ``type[Any]``: the base is usually abstract, which ``type[T]`` would refuse.
        self.kind = kind
        self.base = base
        self._entries: dict[str, tuple[str, str]] = {}
        self._lock = threading.Lock()

    def register(self, name: str, module_path: str, class_name: str) -> None:
        """Record ``name``; raises :class:`RegistryError` if it is already taken."""
        with self._lock:
            if name in self._entries:
                raise RegistryError(
                    f"{self.kind} {name!r} is already registered "
                    f"(as {':'.join(self._entries[name])})"
                )
            self._entries[name] = (module_path, class_name)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def resolve(self, name: str, module_path: str | None = None) -> type[T]:
        """The class for ``name``: from ``module_path`` if given, else from the registry."""
        if module_path:
            target = (module_path, name)
        elif name in self._entries:
            target = self._entries[name]
        else:
            raise RegistryError(
                f"unknown {self.kind} {name!r}; registered: {self.names()} "
                f"(or give a module path for a class outside kv-offload)"
            )
        path, class_name = target
        try:
            module = importlib.import_module(path)
        except ImportError as exc:
            raise RegistryError(f"cannot import module {path!r} for {self.kind} {name!r}: {exc}") from exc
        cls = getattr(module, class_name, None)
        if cls is None:
            raise RegistryError(f"module {path!r} has no class {class_name!r} ({self.kind} {name!r})")
        if not isinstance(cls, type) or not issubclass(cls, self.base):
            raise RegistryError(
                f"{path}.{class_name} is not a subclass of {self.base.__name__} ({self.kind} {name!r})"
            )
        return cast("type[T]", cls)
