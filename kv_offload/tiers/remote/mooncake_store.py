# SPDX-License-Identifier: Apache-2.0
"""The Mooncake Store adapter of the remote tier (``mooncake://HOST:PORT``: the master's RPC
address).

Mooncake moves values between host memory and the memory *segments* that store processes
mount; the master only keeps metadata. A put or get is one ``batch_*_multi_buffers`` call, two
buffers per key (the header, and the body in the pool) moved in place: no copy in Python nor
in the library. With ``global_segment_size`` 0 (the default) values live in a dedicated store
process (``mooncake_client``, see :mod:`kv_offload.testing.mooncake_server`) and outlive vLLM
instances; with a size > 0 this process serves memory too, and its values die with it.

One client per process: ``MooncakeDistributedStore.close()`` (and its destructor) holds the
GIL about a second (it joins a thread that sleeps 1 s), freezing every Python thread, and a
client reconnects by itself to a master that comes back. So adapters of the same master and
options share one client for the process's lifetime (closed at exit or by
:func:`release_clients`); an adapter's ``close`` is free. A shared client that 10 adapters in
a row broke on, the master accepting connections each time, is retired and replaced.

Memory: RDMA needs the pool registered (``register_buffer``), and the tier's headers (small
temporary buffers) then go through a registered *header arena* (80 bytes copied per key). TCP
reads and writes the caller's memory in place without registration, and registering would let
any peer reaching this process's transfer-engine port (all interfaces, no authentication) read
and write that memory: ``register`` defaults to false for TCP.

Time: by default the library waits 30 s for an RPC to a stalled master, 60 s for a transfer
from a stalled store process and ~90 s in ``setup`` for an unreachable master. The constructor
sets, unless the user exported them before this module was imported, ``MC_RPC_TIMEOUT_MS``
(= timeout), ``MC_TCP_PROGRESS_TIMEOUT_SEC`` / ``MC_TCP_STATUS_TIMEOUT_SEC`` (timeout / 2, at
least 1 s) and ``MC_STORE_CLIENT_SETUP_RETRIES`` (1), process-wide; checks that the master
accepts a TCP connection; and abandons a ``setup`` still running after ``timeout_s``.
Operations are never abandoned: the library reads or writes the caller's buffers, and a
transfer ending after the call returned would write a pool slot the tier has reused. Measured
(loopback, timeout 1-2 s): a paused master fails an operation after the RPC timeout; a paused
store process fails a transfer in 2-3 s, but the *first* transfer of a new client to it waits
up to 60 s (a handshake read timeout hard-coded in Mooncake); a killed master fails the next
call at once (EOF) and each later one after ~4.3 s of reconnect attempts, so the first
connection-level failure makes every later call on the adapter raise at once (the tier then
builds a new adapter).

Results: ``put`` stored (OBJECT_ALREADY_EXISTS too) or refused (no space, invalid); ``get`` the
value's length, :data:`MISSING`, or another length with nothing written (the library checks
the destination's size before moving a byte; the length then comes from ``get_size``). RPC
failures and timeouts, failed transfers and a wrong number of results raise
:class:`StoreUnavailable`. Mooncake has no authentication: a password is refused.
"""

from __future__ import annotations

import atexit
import ctypes
import importlib
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from kv_offload.config import ConfigError, parse_bytes
from kv_offload.tiers.remote.store import MISSING, RemoteStore, StoreUnavailable
from kv_offload.tiers.remote.url import redact

__all__ = ["MooncakeStore", "release_clients"]

_PIP_HINT = ("pip install mooncake-transfer-engine-non-cuda (machines without CUDA) or mooncake-transfer-engine (CUDA);"
             " it also needs libibverbs.so.1 (Debian/Ubuntu: apt-get install libibverbs1)")  # fmt: skip
_NO_AUTH = "Mooncake Store has no authentication (keep it on an isolated network)"
_INVALID_PARAMS, _OBJECT_NOT_FOUND, _OBJECT_ALREADY_EXISTS, _TRANSFER_FAIL = -600, -704, -705, -800  # ErrorCode, types.h
_CONNECTION = {-900: "RPC to the master failed", -901: "RPC to the master timed out",
               _TRANSFER_FAIL: "a transfer to or from a store process failed or timed out"}  # fmt: skip
_RETIRE_AFTER = 10
_ENV = ("MC_RPC_TIMEOUT_MS", "MC_TCP_PROGRESS_TIMEOUT_SEC", "MC_TCP_STATUS_TIMEOUT_SEC", "MC_STORE_CLIENT_SETUP_RETRIES")
_USER_ENV = frozenset(name for name in _ENV if name in os.environ)
_LOCK = threading.Lock()  # guards the environment and _CLIENTS
_CLIENTS: dict[tuple[Any, ...], _Client] = {}


def _address(view: memoryview) -> int:
    """The address of a C-contiguous buffer (read-only ones too)."""
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)


def _zero(*views: memoryview) -> None:
    for view in views:
        if view.nbytes and not view.readonly:
            ctypes.memset(_address(view), 0, view.nbytes)


class _Client:
    """A set-up ``MooncakeDistributedStore`` shared by the adapters of one master and options,
    with its registered memory and header arena; closed once retired and idle."""

    SLOT, CHUNK_SLOTS = 256, 1024  # header arena

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.lock = threading.Lock()
        self._register_lock = threading.Lock()  # registering (RDMA) can be slow: not under self.lock
        self.inflight = self.failures = 0  # failures: adapters broken on it since its last success
        self.retired = self.closed = False
        self.registered: dict[tuple[int, int], memoryview | None] = {}
        self._arena: list[np.ndarray[Any, np.dtype[np.uint8]]] = []
        self._free: list[int] = []

    def enter(self) -> bool:
        with self.lock:
            if self.retired:
                return False
            self.inflight += 1
            return True

    def leave(self, retire: bool = False) -> None:
        with self.lock:
            self.inflight -= not retire
            self.retired = self.retired or retire
            close = self.retired and self.inflight == 0 and not self.closed
            self.closed = self.closed or close
        if close:
            for address, _ in list(self.registered):
                try:
                    self.handle.unregister_buffer(address)
                except Exception:  # closing anyway
                    pass
            try:
                self.handle.close()  # holds the GIL ~1 s: on retirement and at exit only
            except Exception:
                pass
            self.registered.clear()

    def register(self, address: int, size: int, keep: memoryview | None = None) -> None:
        with self._register_lock:
            if (address, size) not in self.registered:
                rc = int(self.handle.register_buffer(address, size))
                if rc != 0:
                    raise StoreUnavailable(f"registering {size} bytes with the Mooncake client failed (code {rc};"
                                           " with RDMA: is the locked-memory limit, ulimit -l, large enough?)")  # fmt: skip
                self.registered[(address, size)] = keep

    def take_slots(self, n: int) -> list[int]:
        while True:
            with self.lock:
                if len(self._free) >= n:
                    taken = self._free[len(self._free) - n :]
                    del self._free[len(self._free) - n :]
                    return taken
                need = n - len(self._free)
            chunk = np.zeros(max(self.CHUNK_SLOTS, need) * self.SLOT, dtype=np.uint8)
            self.register(int(chunk.ctypes.data), chunk.nbytes)
            with self.lock:
                self._arena.append(chunk)
                self._free.extend(int(chunk.ctypes.data) + i * self.SLOT for i in range(chunk.nbytes // self.SLOT))

    def give_slots(self, slots: list[int]) -> None:
        with self.lock:
            self._free.extend(slots)


def release_clients() -> None:
    """Close every shared client now (the next adapter sets up a new one): for tests and
    orderly shutdowns, once the tiers are closed and while the store is up (each close holds
    the GIL ~1 s; with the master gone, an embedded segment waits ~7-9 s to unmount). Also
    run at exit."""
    with _LOCK:
        clients = list(_CLIENTS.values())
        _CLIENTS.clear()
    for client in clients:
        client.leave(retire=True)


atexit.register(release_clients)


def _parse_url(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        raise ConfigError("remote.url", f"bad port in {redact(url)!r}") from None
    if parts.username is not None or parts.password is not None:
        raise ConfigError("remote.url", f"{_NO_AUTH}: give no user or password in the URL")
    if not host or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError("remote.url", f"expected mooncake://HOST:PORT (the master's RPC address), got {redact(url)!r}")
    return host, 50051 if port is None else port


class MooncakeStore(RemoteStore):
    """A Mooncake Store client (see the module docstring)."""

    OPTIONS: Mapping[str, str] = {
        "local_hostname": "address other Mooncake processes reach this one at (default 127.0.0.1; set it when"
                          " global_segment_size > 0 and other nodes read from this process)",
        "metadata_server": "transfer-engine metadata: 'P2PHANDSHAKE' (default), 'http://HOST:PORT/metadata' or 'etcd://...'",
        "protocol": "'tcp' (default) or 'rdma'",
        "device": "RDMA device(s), comma separated (protocol rdma; default: all)",
        "global_segment_size": "memory this process serves to the store (default 0: values live in a dedicated store"
                               " process; > 0: they die with this process)",
        "local_buffer_size": "the client's staging buffer (default 0: puts and gets move data in place)",
        "register": "register the pool and headers with the transfer engine (default: true for rdma, which needs it;"
                    " false for tcp, where it only exposes that memory to peers)",
    }  # fmt: skip

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> Mapping[str, Any]:
        out: dict[str, Any] = {}
        for key, value in options.items():
            name = f"remote.{key}"
            if key in ("local_hostname", "metadata_server", "protocol", "device"):
                if not isinstance(value, str):
                    raise ConfigError(name, f"expected a string, got {type(value).__name__}")
                if len(value) > 1024 or any(c.isspace() or not c.isprintable() for c in value):
                    raise ConfigError(name, "must be at most 1024 printable characters without spaces")
                if not value and key in ("local_hostname", "metadata_server"):
                    raise ConfigError(name, "must not be empty")
                if key == "protocol" and value not in ("tcp", "rdma"):
                    raise ConfigError(name, f"must be 'tcp' or 'rdma', got {value!r}")
            elif key in ("global_segment_size", "local_buffer_size"):
                value = 0 if value == 0 and type(value) is int else parse_bytes(value, name)
            elif key == "register":
                if not isinstance(value, bool):
                    raise ConfigError(name, f"expected true or false, got {type(value).__name__}")
            else:
                raise ConfigError(name, f"unknown option; accepted: {sorted(cls.OPTIONS)}")
            out[key] = value
        if out.get("device") and out.get("protocol", "tcp") != "rdma":
            raise ConfigError("remote.device", "is only used with protocol 'rdma'")
        return out

    def __init__(self, url: str, options: Mapping[str, Any], *, timeout_s: float, password: str | None = None) -> None:
        if password:
            raise ConfigError("remote", f"{_NO_AUTH}: remove password_file / password_env")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        host, port = _parse_url(url)
        opts = self.check_options(options)
        try:
            mooncake_store = importlib.import_module("mooncake.store")
        except ImportError as exc:
            raise ImportError(f"Mooncake Store's client cannot be imported ({exc}): {_PIP_HINT}") from None
        master = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._shown, self._timeout_s = f"mooncake://{master}", timeout_s
        self._register: bool = opts.get("register", opts.get("protocol") == "rdma")
        self._lock = threading.Lock()
        self._closed, self._broken = False, ""
        deadline = time.monotonic() + timeout_s
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
        except OSError as exc:
            reason = "no answer" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__)
            raise StoreUnavailable(f"cannot connect to the Mooncake master at {self._shown} ({reason})") from None
        args = (opts.get("local_hostname", "127.0.0.1"), opts.get("metadata_server", "P2PHANDSHAKE"),
                opts.get("global_segment_size", 0), opts.get("local_buffer_size", 0), opts.get("protocol", "tcp"),
                opts.get("device", ""), master)  # fmt: skip
        with _LOCK:  # one setup at a time: adapters of the same master and options share it
            client = _CLIENTS.get(args)
            if client is not None and client.failures >= _RETIRE_AFTER:
                del _CLIENTS[args]
                client.leave(retire=True)
                client = None
            if client is None:
                half = str(max(1, math.ceil(timeout_s / 2)))
                for name, value in zip(_ENV, (str(max(1, math.ceil(timeout_s * 1000))), half, half, "1")):
                    if name not in _USER_ENV:
                        os.environ[name] = value
                self._client = self._setup(mooncake_store.MooncakeDistributedStore(), args, deadline - time.monotonic())
                return
        self._client = client  # shared: check that the master answers (one RPC, bounded by the RPC timeout)
        (code,) = self._call("connect", 1, lambda h: h.batch_is_exist(["kv-offload:probe"]))
        if code not in (0, 1):
            raise self._fail(code, "connect")

    def _setup(self, handle: Any, args: tuple[Any, ...], timeout_s: float) -> _Client:
        """``setup`` on a thread, abandoned after ``timeout_s`` (a late success is kept for the
        next adapter). Called with ``_LOCK`` held."""
        done, result = threading.Event(), [-1]

        def run() -> None:
            try:
                result[0] = int(handle.setup(*args))
            except Exception:  # a binding error: counts as a failed setup
                pass
            finally:
                done.set()
            if result[0] == 0:
                with _LOCK:  # once the constructor gave up, or kept it
                    kept = _CLIENTS.setdefault(args, _Client(handle))
                if kept.handle is not handle:
                    _Client(handle).leave(retire=True)  # another took its place meanwhile

        threading.Thread(target=run, name="kv-offload-mooncake-setup", daemon=True).start()
        if not done.wait(max(0.0, timeout_s)):
            raise StoreUnavailable(f"the Mooncake master at {self._shown} did not complete setup within {self._timeout_s:g} s")
        if result[0] != 0:
            raise StoreUnavailable(f"Mooncake setup against {self._shown} failed (code {result[0]}): master unreachable or"
                                   f" refusing, or protocol {args[4]!r} unusable here (the log on stderr says which)")  # fmt: skip
        client = _CLIENTS[args] = _Client(handle)
        return client

    def __repr__(self) -> str:
        return f"MooncakeStore({self._shown})"

    # -- RemoteStore ---------------------------------------------------------------------

    def register_memory(self, buffer: memoryview) -> None:
        if self._register and buffer.nbytes:
            self._enter()
            try:
                self._client.register(_address(buffer), buffer.nbytes, buffer)
            finally:
                self._client.leave()

    def exists(self, keys: Sequence[str]) -> list[bool]:
        codes = self._call("exists", len(keys), lambda h: h.batch_is_exist(list(keys))) if keys else []
        for code in codes:
            if code not in (0, 1):
                raise self._fail(code, "exists")
        return [c == 1 for c in codes]

    def put(self, keys: Sequence[str], values: Sequence[tuple[memoryview, memoryview]]) -> list[bool]:
        if len(keys) != len(values):
            raise ValueError(f"{len(keys)} keys but {len(values)} values")
        codes = self._transfer("put", keys, values) if keys else []
        for code in codes:
            if code in _CONNECTION:
                raise self._fail(code, "put")
        return [code in (0, _OBJECT_ALREADY_EXISTS) for code in codes]

    def get(self, keys: Sequence[str], into: Sequence[tuple[memoryview, memoryview]]) -> list[int]:
        if len(keys) != len(into) or any(h.readonly or b.readonly for h, b in into):
            raise ValueError(f"get needs one pair of writable buffers per key ({len(keys)} keys, {len(into)} pairs)")
        out: list[int] = []
        for key, code, (header, body) in zip(keys, self._transfer("get", keys, into) if keys else [], into):
            expected = header.nbytes + body.nbytes
            if code == expected or code == _OBJECT_NOT_FOUND:
                out.append(MISSING if code == _OBJECT_NOT_FOUND else code)
            elif code in (_INVALID_PARAMS, _TRANSFER_FAIL):
                # Both come back for a destination of another size, checked before a byte
                # moves; TRANSFER_FAIL also for a transfer that failed on the way.
                (size,) = self._call("get", 1, lambda h: [h.get_size(key)])
                if size in _CONNECTION or size == expected or (size < 0 and code == _TRANSFER_FAIL):
                    _zero(header, body)
                    raise self._fail(size if size in _CONNECTION else _TRANSFER_FAIL, "get")
                out.append(size if size >= 0 else MISSING)
            elif code in _CONNECTION:
                raise self._fail(code, "get")
            else:  # not ready, replica gone, lease expired...: a miss, nothing left behind
                _zero(header, body)
                out.append(code if code >= 0 else MISSING)
        return out

    def remove(self, keys: Sequence[str]) -> None:
        # force: a value read in the last seconds holds a lease that refuses a plain remove
        for code in self._call("remove", len(keys), lambda h: h.batch_remove(list(keys), True)) if keys else []:
            if code in _CONNECTION:
                raise self._fail(code, "remove")

    def close(self) -> None:
        """Idempotent and immediate: the shared client stays for the next adapter."""
        with self._lock:
            self._closed = True

    # -- internals -----------------------------------------------------------------------

    def _enter(self) -> None:
        with self._lock:
            if self._closed or self._broken:
                why = f"lost the store earlier ({self._broken})" if self._broken else "is closed"
                raise StoreUnavailable(f"the Mooncake adapter of {self._shown} {why}")
        if not self._client.enter():
            raise StoreUnavailable(f"the Mooncake client of {self._shown} was retired after repeated failures")

    def _call(self, op: str, n: int, fn: Callable[[Any], Any]) -> list[int]:
        self._enter()
        try:
            codes = fn(self._client.handle)
        finally:
            self._client.leave()
        return self._results(op, codes, n)

    def _transfer(self, op: str, keys: Sequence[str], pairs: Sequence[tuple[memoryview, memoryview]]) -> list[int]:
        """One batched put or get: per key the header (through a registered arena slot when
        registering) and the body, in place; empty parts left out."""
        self._enter()
        slots: list[int] = []
        try:
            slots = self._client.take_slots(len(keys)) if self._register else []
            pointers: list[list[int]] = []
            for i, (header, body) in enumerate(pairs):
                arena = bool(slots) and 0 < header.nbytes <= _Client.SLOT
                if arena and op == "put":
                    ctypes.memmove(slots[i], _address(header), header.nbytes)
                parts = [(slots[i] if arena else _address(header), header.nbytes)] if header.nbytes else []
                pointers.append([p for p, _ in parts] + ([_address(body)] if body.nbytes else []))
            sizes = [[n for n in (h.nbytes, b.nbytes) if n] for h, b in pairs]
            handle = self._client.handle
            call = handle.batch_put_from_multi_buffers if op == "put" else handle.batch_get_into_multi_buffers
            codes = call(list(keys), pointers, sizes)
            for i, ((header, body), code) in enumerate(zip(pairs, codes if op == "get" and slots else [])):
                if 0 < header.nbytes <= _Client.SLOT and code == header.nbytes + body.nbytes:
                    ctypes.memmove(_address(header), slots[i], header.nbytes)
        finally:
            self._client.give_slots(slots)
            self._client.leave()
        return self._results(op, codes, len(keys))

    def _results(self, op: str, codes: Any, n: int) -> list[int]:
        if not isinstance(codes, list) or len(codes) != n:
            got = len(codes) if isinstance(codes, list) else type(codes).__name__
            raise self._fail(f"the client answered {got} results for {n} keys", op)
        out = [int(c) for c in codes]
        if not any(c in _CONNECTION for c in out):
            with self._client.lock:
                self._client.failures = 0
        return out

    def _fail(self, why: int | str, op: str) -> StoreUnavailable:
        """A connection-level failure: every later call on this adapter fails at once."""
        text = _CONNECTION.get(why, f"error code {why}") if isinstance(why, int) else why
        with self._lock:
            first, self._broken = not self._broken, self._broken or text
        if first:
            with self._client.lock:
                self._client.failures += 1
        return StoreUnavailable(f"Mooncake {op} on {self._shown}: {text} (timeout {self._timeout_s:g} s)")
