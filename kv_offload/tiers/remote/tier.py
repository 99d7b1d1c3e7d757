# SPDX-License-Identifier: Apache-2.0
"""The remote tier: KV blocks in a distributed store, shared by every instance that uses it.

:class:`RemoteTier` puts the :class:`~kv_offload.tiers.BlockTier` contract on top of a store
adapter (:class:`~kv_offload.tiers.remote.store.RemoteStore`): each value carries a checked
header (:mod:`~kv_offload.tiers.remote.format`), batches go to the store in one call, and
the connection is managed here, once for every store:

- the store unreachable (at start-up or later) is never an error for the caller: reads are
  misses, writes are dropped and counted, and the tier reconnects on a timer thread (and on
  the first call past the wait), with exponential backoff (0.5 s doubling up to
  ``reconnect_max_s``); one warning per outage, one line when it is back;
- every operation is bounded by ``timeout_ms`` (the adapter's socket or RPC timeout), so a
  stalled store costs a failed job, not a stuck engine.

A writing tier given a ``label`` (what its namespace holds, :mod:`~kv_offload.tiers.remote.label`)
puts it with its first block batch after each (re)connect, and again every 5 minutes with a
batch, so an operator or an importer can tell what the namespace holds.

Unlike the disk tier's, ``contains`` asks the store (one batched round trip): the scheduler
calls it through :class:`~kv_offload.tiers.remote.lookup.RemoteIndex`, off the engine step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from kv_offload.config import ConfigError, RemoteConfig
from kv_offload.tiers.base import BlockTier, TierStats
from kv_offload.tiers.remote.format import HEADER_BYTES, check_header, checksum, encode_header, store_key
from kv_offload.tiers.remote.label import encode_label, label_name
from kv_offload.tiers.remote.store import MISSING, STORES, RemoteStore, StoreUnavailable

__all__ = ["RemoteTier", "RemoteTierStats"]

logger = logging.getLogger(__name__)

_FIRST_BACKOFF_S = 0.5
_LABEL_REFRESH_S = 300.0  # the label is put again this often while blocks are written
_T = TypeVar("_T")


@dataclass
class RemoteTierStats(TierStats):
    """:class:`TierStats`, and the connection's story: ``errors`` (operations that failed
    because the store was unreachable or too slow), ``reconnects`` (times the connection came
    back after a failure), ``connected`` (1 while it is up), ``lookups`` (batched lookups)."""

    errors: int = 0
    reconnects: int = 0
    connected: int = 0
    lookups: int = 0


class RemoteTier(BlockTier):
    """Blocks of ``block_bytes`` in the store of ``config``, under ``namespace``.

    Args:
        config: the ``remote`` config section.
        namespace: this worker's 16-byte namespace digest (keys of other namespaces are other
            values: tensor-parallel ranks each keep their own shard).
        block_bytes: the pool's slot size.
        store_factory: builds the adapter (default: the adapter of the URL's scheme); tests
            pass their own to wrap a real one.
        label: what this namespace holds (JSON-serialisable, at most 64 KiB), put with the
            block writes (see the module docstring); ``None``: no label.
    """

    def __init__(
        self,
        config: RemoteConfig,
        namespace: bytes,
        block_bytes: int,
        *,
        store_factory: Callable[[], RemoteStore] | None = None,
        label: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(namespace, block_bytes)
        self._label = (label_name(config.prefix, namespace), encode_label(namespace, label)) if label else None
        self._label_due = 0.0  # monotonic time from which the next block batch carries the label
        self.config = config
        self._factory = store_factory or self._default_factory
        #: guards the fields below; never held across I/O (``stats`` runs on the engine step)
        self._lock = threading.Lock()
        #: one connection attempt at a time (held across the attempt, by I/O threads only)
        self._connecting = threading.Lock()
        self._store: RemoteStore | None = None
        self._memory: list[memoryview] = []
        self._next_attempt = 0.0
        self._backoff = _FIRST_BACKOFF_S
        self._down_since: float | None = None
        self._stats = RemoteTierStats()
        self._closed = False
        self._probe: threading.Timer | None = None
        try:
            self._connect()
        except StoreUnavailable:
            pass  # warned in _connect; the server starts and serves from local tiers

    def _default_factory(self) -> RemoteStore:
        cfg = self.config
        adapter = STORES.resolve(cfg.scheme)
        return adapter(cfg.url, cfg.options, timeout_s=cfg.timeout_ms / 1000, password=cfg.password)

    # -- connection ----------------------------------------------------------------------
    def _ready(self) -> RemoteStore | None:
        """The connected adapter, ``None`` if it is time to try connecting, else raises."""
        with self._lock:
            if self._store is not None:
                return self._store
            if self._closed:
                raise StoreUnavailable("the remote tier is closed")
            if time.monotonic() < self._next_attempt:
                raise StoreUnavailable("the remote store is down; waiting to reconnect")
            return None

    def _connect(self) -> RemoteStore:
        """The connected adapter, connecting if it is time to try (else ``StoreUnavailable``).

        The attempt (up to ``timeout_ms``) runs without ``_lock``: ``stats`` and the other
        callers that only read counters never wait for a store that does not answer."""
        store = self._ready()
        if store is not None:
            return store
        with self._connecting:
            store = self._ready()  # another thread may have connected meanwhile
            if store is not None:
                return store
            with self._lock:
                memory = list(self._memory)
            try:
                store = self._factory()
                for buffer in memory:
                    store.register_memory(buffer)
            except (StoreUnavailable, OSError, RuntimeError) as exc:
                with self._lock:
                    self._note_down(exc, time.monotonic())
                raise StoreUnavailable(str(exc)) from None
            except (ValueError, TypeError) as exc:  # a bad option the config check missed
                raise ConfigError("remote", str(exc)) from None
            return self._connected(store)

    def _connected(self, store: RemoteStore) -> RemoteStore:
        with self._lock:
            if self._closed:
                store.close()
                raise StoreUnavailable("the remote tier is closed")
            now = time.monotonic()
            self._store = store
            self._stats.connected = 1
            self._label_due = 0.0  # a store back from an outage may have lost it
            if self._down_since is not None:
                self._stats.reconnects += 1
                logger.warning(
                    "kv_offload: remote store %s is back after %.1f s; remote hits resume",
                    self.config.shown_url, now - self._down_since,
                )  # fmt: skip
            self._down_since = None
            self._backoff = _FIRST_BACKOFF_S
            return store

    def _note_down(self, exc: BaseException, now: float) -> None:
        """Called with the lock held: schedule the next attempt; warn once per outage."""
        self._stats.errors += 1
        self._stats.connected = 0
        self._next_attempt = now + self._backoff
        if self._probe is None and not self._closed:
            # Reconnect without waiting for traffic: the gauge and the next lookup see the
            # store back within one backoff period.
            self._probe = threading.Timer(self._backoff, self._try_reconnect)
            self._probe.daemon = True
            self._probe.start()
        self._backoff = min(self._backoff * 2, float(self.config.reconnect_max_s))
        if self._down_since is None:
            self._down_since = now
            logger.warning(
                "kv_offload: remote store %s unavailable (%s); serving from local tiers and reconnecting"
                " with backoff (up to %d s)", self.config.shown_url, exc, self.config.reconnect_max_s,
            )  # fmt: skip

    def _try_reconnect(self) -> None:
        with self._lock:
            self._probe = None
        try:
            self._connect()
        except (StoreUnavailable, ConfigError):
            pass  # _connect scheduled the next attempt

    def _failed(self, store: RemoteStore, exc: BaseException) -> None:
        """An operation on ``store`` failed at the connection level: drop it, back off."""
        with self._lock:
            ours = self._store is store
            if ours:
                self._store = None
                self._note_down(exc, time.monotonic())
            else:
                self._stats.errors += 1
        if ours:
            try:
                store.close()  # outside the lock: closing may wait on the network
            except Exception:  # closing a broken connection may fail too; nothing to keep
                pass

    @property
    def connected(self) -> bool:
        return self._store is not None

    def register_memory(self, buffer: memoryview) -> None:
        """Host memory that block bodies lie in (the pool): registered with the store now and
        on every reconnect, for stores that move data in place."""
        with self._lock:
            self._memory.append(buffer)
            store = self._store
        if store is not None:
            try:
                store.register_memory(buffer)
            except StoreUnavailable as exc:
                self._failed(store, exc)

    def _name(self, key: bytes) -> str:
        return store_key(self.config.prefix, self.namespace, key)

    def _attempt(self, op: Callable[[RemoteStore], _T]) -> _T | None:
        """``op`` on the connected store; ``None`` when the store is down, or when ``op``
        failed at the connection level (then the connection is dropped and backed off)."""
        try:
            store = self._connect()
        except StoreUnavailable:
            return None
        try:
            return op(store)
        except StoreUnavailable as exc:
            self._failed(store, exc)
            return None

    # -- BlockTier -----------------------------------------------------------------------
    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        """Which keys the store holds: one batched round trip (all ``False`` while the store
        is down). Blocking; the scheduler calls it off the step."""
        if not keys:
            return []
        held = self._attempt(lambda store: store.exists([self._name(k) for k in keys]))
        if held is None:
            return [False] * len(keys)
        with self._lock:
            self._stats.lookups += 1
        return held

    def write(self, items: Sequence[tuple[bytes, memoryview]]) -> list[bool]:
        if not items:
            return []
        for i, (key, body) in enumerate(items):
            if len(body) != self.block_bytes:
                raise ValueError(f"block {i} has {len(body)} bytes, expected {self.block_bytes}")
        if not self.config.write:
            return [False] * len(items)

        def put(store: RemoteStore) -> list[bool]:
            headers = memoryview(bytearray(HEADER_BYTES * len(items)))
            values = []
            for i, (key, body) in enumerate(items):
                header = headers[i * HEADER_BYTES : (i + 1) * HEADER_BYTES]
                encode_header(header, self.namespace, key, body)
                values.append((header, body))
            names = [self._name(k) for k, _ in items]
            now = time.monotonic()
            with_label = self._label is not None and now >= self._label_due
            if with_label:  # in the same batch: no round trip of its own
                assert self._label is not None
                names.append(self._label[0])
                values.append(self._label[1])
            ok = store.put(names, values)
            if with_label and ok.pop():  # (pop: the label's own result is not a block's)
                with self._lock:
                    self._label_due = now + _LABEL_REFRESH_S
            return ok

        ok = self._attempt(put)
        if ok is None:
            with self._lock:
                self._stats.write_failures += len(items)
            return [False] * len(items)
        with self._lock:
            self._stats.writes += ok.count(True)
            self._stats.refused += ok.count(False)
        return ok

    def read(self, keys: Sequence[bytes], into: Sequence[memoryview]) -> list[bool]:
        if len(keys) != len(into):
            raise ValueError(f"{len(keys)} keys but {len(into)} buffers")
        for i, buf in enumerate(into):
            if len(buf) != self.block_bytes or buf.readonly:
                raise ValueError(f"buffer {i} must be a writable {self.block_bytes}-byte buffer")
        if not keys:
            return []
        try:
            store = self._connect()
        except StoreUnavailable:
            with self._lock:
                self._stats.read_failures += len(keys)
                self._stats.misses += len(keys)
            return [False] * len(keys)
        headers = memoryview(bytearray(HEADER_BYTES * len(keys)))
        parts = [(headers[i * HEADER_BYTES : (i + 1) * HEADER_BYTES], into[i]) for i in range(len(keys))]
        names = [self._name(k) for k in keys]
        try:
            lengths = store.get(names, parts)
        except StoreUnavailable as exc:
            self._failed(store, exc)
            # A get that failed part way may have written some bodies: none may look valid.
            for buf in into:
                buf[:] = bytes(len(buf))
            with self._lock:
                self._stats.read_failures += len(keys)
                self._stats.misses += len(keys)
            return [False] * len(keys)
        ok: list[bool] = []
        corrupt: list[str] = []
        expected = HEADER_BYTES + self.block_bytes
        for i, (key, length) in enumerate(zip(keys, lengths)):
            if length == MISSING:
                ok.append(False)
                continue
            why: int | str = f"value of {length} bytes, expected {expected}"
            if length == expected:
                why = check_header(parts[i][0], self.namespace, key, self.block_bytes)
                if isinstance(why, int):
                    why = "body checksum mismatch" if checksum(into[i]) != why else 0
            if why == 0:
                ok.append(True)
                continue
            ok.append(False)
            corrupt.append(names[i])
            if length == expected:
                into[i][:] = bytes(self.block_bytes)  # never leave bytes that look valid
            logger.warning("kv_offload: remote value %s rejected: %s (a miss; discarded)", names[i], why)
        with self._lock:
            self._stats.hits += ok.count(True)
            self._stats.misses += ok.count(False)
            self._stats.corruptions += len(corrupt)
        if corrupt:
            self._attempt(lambda live: live.remove(corrupt))
        return ok

    def remove(self, keys: Sequence[bytes]) -> list[bool]:
        if not keys:
            return []

        def drop(store: RemoteStore) -> list[bool]:
            held = store.exists([self._name(k) for k in keys])
            store.remove([self._name(k) for k, h in zip(keys, held) if h])
            return held

        held = self._attempt(drop)
        return [False] * len(keys) if held is None else held

    def stats(self) -> RemoteTierStats:
        with self._lock:
            return RemoteTierStats(**self._stats.__dict__)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            store, self._store = self._store, None
            probe, self._probe = self._probe, None
        if probe is not None:
            probe.cancel()
        if store is not None:
            store.close()
