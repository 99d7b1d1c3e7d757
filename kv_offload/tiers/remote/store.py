# SPDX-License-Identifier: Apache-2.0
"""The client interface of a distributed key-value store a remote tier runs on.

A :class:`RemoteStore` is a thin adapter over a store's own client (Redis/Valkey, Mooncake
Store): batched existence checks, puts and gets of whole values, nothing else. Everything
the tier needs on top (value headers and checksums, reconnecting, counting) lives in
:class:`~kv_offload.tiers.remote.tier.RemoteTier`, once for every store.

A value is written and read as two parts, ``header`` then ``body`` (the store keeps them as
one value, their concatenation), so that a store that can read and write host memory in
place (Mooncake) moves the body straight from and into the pool's slot, with no copy.

Errors: a store that cannot be reached, times out or drops the connection raises
:class:`StoreUnavailable` (the tier then reconnects with backoff). Per-key outcomes
(missing, too large, refused for memory) are results, not exceptions.

Adapters are registered by URL scheme in :data:`STORES` (``redis``, ``rediss``, ``valkey``,
``valkeys``, ``mooncake``); a store of your own registers its scheme the same way.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

from kv_offload.registry import Registry

__all__ = ["RemoteStore", "StoreUnavailable", "STORES", "MISSING"]

#: ``get`` result for a key the store does not hold.
MISSING = -1


class StoreUnavailable(ConnectionError):
    """The store could not be reached or did not answer in time (the tier reconnects)."""


class RemoteStore(ABC):
    """One connection (or connection pool) to a store. Thread-safe: the tier calls it from
    its I/O threads and, for lookups, from the scheduler's lookup thread.

    Args (every adapter takes the same ones):
        url: the store's URL as configured, credentials included (never log it, nor put it
            in an exception: use :func:`kv_offload.tiers.remote.url.redact`).
        options: the adapter's own options from the ``remote`` config section, as returned
            by its :meth:`check_options`.
        timeout_s: limit of any one operation (connect, a batch's round trip); past it the
            operation raises :class:`StoreUnavailable`. A stalled store never blocks longer.
        password: from ``password_file`` / ``password_env`` (takes the place of the URL's).

    The constructor connects and raises :class:`StoreUnavailable` when the store cannot be
    reached or refuses the credentials (the message says which, without the secret).
    Client packages are imported in the constructor, not at module import, so a config can
    be checked where a store's client is not installed.
    """

    #: option names this adapter accepts in the ``remote`` section, with one-line help
    OPTIONS: Mapping[str, str] = {}

    @abstractmethod
    def __init__(self, url: str, options: Mapping[str, Any], *, timeout_s: float, password: str | None = None) -> None: ...

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> Mapping[str, Any]:
        """Check and normalise the adapter's options once, when the config is parsed; a bad
        value raises :class:`~kv_offload.config.ConfigError` naming ``remote.<key>``.
        Default: accept them as given (the names were already checked against OPTIONS)."""
        return dict(options)

    @abstractmethod
    def exists(self, keys: Sequence[str]) -> list[bool]:
        """Whether each key is held, in one round trip."""

    @abstractmethod
    def put(self, keys: Sequence[str], values: Sequence[tuple[memoryview, memoryview]]) -> list[bool]:
        """Store ``header + body`` under each key, batched (no round trip per key).

        ``False`` for a key the store refused (out of memory, too large); a key already held
        may be overwritten or kept (equal keys carry equal content).
        """

    @abstractmethod
    def get(self, keys: Sequence[str], into: Sequence[tuple[memoryview, memoryview]]) -> list[int]:
        """Read each key's value into ``(header, body)`` buffers, batched.

        Returns per key the value's total length in bytes, or :data:`MISSING`. Only a value of
        exactly ``len(header) + len(body)`` bytes is copied in (its first ``len(header)`` bytes
        into the header buffer, the rest into the body); for any other length nothing is
        written and the length is returned, for the tier to count as corrupt.
        """

    def remove(self, keys: Sequence[str]) -> None:
        """Drop each key if present (used to discard corrupt values). Default: nothing."""

    def scan(self, pattern: str, limit: int) -> list[str]:
        """Up to ``limit`` key names matching the Redis-style glob ``pattern``, for operators'
        listings (``python -m kv_offload remote list``), never on a serving path.
        Default: the store cannot list its keys (``NotImplementedError``)."""
        raise NotImplementedError(f"{type(self).__name__} cannot list its keys")

    def register_memory(self, buffer: memoryview) -> None:
        """Host memory that ``put``/``get`` bodies will lie in (the pool), for stores that
        move data in place and need it registered first. Default: nothing to do."""

    def close(self) -> None:
        """Release connections and memory. Default: nothing. Idempotent."""


#: URL scheme -> adapter class.
STORES: Registry[RemoteStore] = Registry("remote store", RemoteStore)
for _scheme in ("redis", "rediss", "valkey", "valkeys"):
    STORES.register(_scheme, "kv_offload.tiers.remote.redis_store", "RedisStore")
STORES.register("mooncake", "kv_offload.tiers.remote.mooncake_store", "MooncakeStore")
