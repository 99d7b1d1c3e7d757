# SPDX-License-Identifier: Apache-2.0
"""The Redis / Valkey adapter of the remote tier (``redis://``, ``rediss://``, ``valkey://``,
``valkeys://``; the ``s`` schemes use TLS).

Every batch is one pipeline (``transaction=False``): N keys cost one round trip, not N.
Large batches are split into pipelines of at most ``batch_bytes`` so that neither side
buffers gigabytes at once. Each value is written as one ``SET`` of ``header + body`` (one
copy: see below) with ``EX`` when
``ttl_s`` is set, and read with ``GET``.

Failure handling is deliberately simple, because the tier above owns recovery:

* redis-py retries nothing (``retries=0``): its default retries with backoff would turn a
  stalled store into several timeouts in a row, while the tier's contract is "a stalled store
  never blocks longer than ``timeout_s``". The tier reconnects by building a new adapter.
  A pooled connection left over from a server that restarted is still replaced on its next
  use (redis-py sees the closed socket when it takes it from the pool), so the same adapter
  also keeps working once the server is back.
* Every connection, timeout, TLS or authentication error becomes :class:`StoreUnavailable`
  with a message that says which of those it was, naming the store by its redacted URL and
  never carrying the password.
* Per-key refusals (``OOM`` under ``maxmemory`` with ``noeviction``, ``READONLY`` on a
  replica, an ACL without write rights) are results: ``put`` returns ``False`` for the key.

Commands are packed by :class:`_Packer`, given to redis-py as its ``command_packer``:
it writes a value's two parts as one RESP bulk string straight from the caller's buffers
(the body, in the pool, goes to ``sendall`` as a memoryview), so a put copies nothing in
Python. redis-py's own packers would copy each value twice or three times (concatenating
the parts; hiredis's packer also copies a memoryview into ``bytes``, then packs it into a
new ``bytes``); on loopback that halves put throughput. Replies are still parsed by
redis-py (with hiredis when installed): a get copies each value once more, into the buffers.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

from kv_offload.config import ConfigError, parse_bytes
from kv_offload.tiers.remote.store import MISSING, RemoteStore, StoreUnavailable
from kv_offload.tiers.remote.url import redact, scheme_of

__all__ = ["RedisStore"]

_TLS_SCHEMES = ("rediss", "valkeys")
_DEFAULT_PORT = 6379
_DEFAULT_MAX_CONNECTIONS = 32
_DEFAULT_BATCH_BYTES = 64 << 20
#: an idle pooled connection is PINGed before reuse after this long (a dead peer is found
#: before a batch is written into it)
_HEALTH_CHECK_S = 30
_MAX_TTL_S = 10 * 365 * 86400


def _problem(exc: BaseException, timeout_s: float) -> str:
    """What went wrong, in words, from a redis-py / socket / TLS exception."""
    import redis.exceptions as rex

    text = str(exc)
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and len(chain) < 8:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    if isinstance(exc, rex.AuthenticationError) or "WRONGPASS" in text or "invalid password" in text:
        if "NOAUTH" in text or "Authentication required" in text:
            return "authentication required: the store needs a password and none was given"
        if "without any password configured" in text:
            return "authentication failed: a password was given but the store has none configured"
        return "authentication failed (wrong user or password)"
    if isinstance(exc, rex.NoPermissionError):
        return f"permission denied by the store's ACL ({text[:200]})"
    if isinstance(exc, rex.TimeoutError) or any(isinstance(e, (TimeoutError, OSError)) and "timed out" in str(e) for e in chain):
        return f"no answer within {timeout_s:g} s (store stalled, overloaded or unreachable)"
    if any(isinstance(e, ssl.SSLError) for e in chain) or "SSL" in text or "certificate" in text:
        reason = next((e for e in chain if isinstance(e, ssl.SSLError)), exc)
        return (f"TLS handshake failed ({str(reason)[:200]}); check tls_ca_file, tls_verify_hostname, and"
                " tls_cert_file / tls_key_file if the server requires a client certificate")  # fmt: skip
    hint = "; if the server uses TLS, use rediss://" if "reset by peer" in text or "closed by server" in text else ""
    return f"cannot connect, or the connection was lost ({text[:200]}){hint}"


class RedisStore(RemoteStore):
    """A connection pool to one Redis or Valkey server (see the module docstring)."""

    OPTIONS: Mapping[str, str] = {
        "ttl_s": "expire each value this many seconds after it was written (0 or absent: never)",
        "tls_ca_file": "CA certificate(s) to verify the server with (rediss://; default: the system's)",
        "tls_cert_file": "client certificate, for servers that require one (PEM; may hold the key too)",
        "tls_key_file": "the client certificate's private key (PEM)",
        "tls_verify_hostname": "check that the server certificate names the URL's host (default true)",
        "username": "ACL user name, when the URL does not give one",
        "max_connections": f"most connections open at once (default {_DEFAULT_MAX_CONNECTIONS})",
        "batch_bytes": "split a batch into pipelines of at most this many value bytes (default 64MiB)",
    }

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> Mapping[str, Any]:
        out: dict[str, Any] = {}
        for key, value in options.items():
            name = f"remote.{key}"
            if key == "ttl_s" or key == "max_connections":
                low, high = (0, _MAX_TTL_S) if key == "ttl_s" else (1, 10_000)
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ConfigError(name, f"expected an int, got {type(value).__name__}")
                if not low <= value <= high:
                    raise ConfigError(name, f"must be between {low} and {high}, got {value}")
                out[key] = value
            elif key == "batch_bytes":
                size = parse_bytes(value, name)
                if not 4096 <= size <= 4 << 30:
                    raise ConfigError(name, f"must be between 4KiB and 4GiB, got {size} bytes")
                out[key] = size
            elif key == "tls_verify_hostname":
                if not isinstance(value, bool):
                    raise ConfigError(name, f"expected true or false, got {type(value).__name__}")
                out[key] = value
            elif key in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
                out[key] = _readable_file(name, value)
            elif key == "username":
                if not isinstance(value, str) or not value or len(value) > 256:
                    raise ConfigError(name, "expected a non-empty string (at most 256 characters)")
                if any(c.isspace() or not c.isprintable() for c in value):
                    raise ConfigError(name, "must not contain spaces or control characters")
                out[key] = value
            else:
                raise ConfigError(name, f"unknown option; accepted: {sorted(cls.OPTIONS)}")
        if "tls_key_file" in out and "tls_cert_file" not in out:
            raise ConfigError("remote.tls_key_file", "is set without tls_cert_file")
        return out

    def __init__(self, url: str, options: Mapping[str, Any], *, timeout_s: float, password: str | None = None) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self._shown = redact(url)
        self._timeout_s = timeout_s
        self._closed = False
        opts = dict(self.check_options(options))
        self._ttl_s: int = opts.get("ttl_s", 0)
        self._batch_bytes: int = opts.get("batch_bytes", _DEFAULT_BATCH_BYTES)
        host, port, db, url_user, url_password = _parse_url(url)
        username = url_user or opts.get("username")
        if url_user and opts.get("username") not in (None, url_user):
            raise ConfigError("remote.username", "differs from the user name in the URL; give it in one place")
        self._secrets = tuple(s for s in (password, url_password) if s)
        tls = scheme_of(url) in _TLS_SCHEMES
        tls_keys = [k for k in opts if k.startswith("tls_")]
        if tls_keys and not tls:
            raise ConfigError(f"remote.{tls_keys[0]}", f"is set but the URL {self._shown!r} does not use TLS (use rediss://)")
        kwargs: dict[str, Any] = {
            "host": host,
            "port": port,
            "db": db,
            "username": username,
            "password": password if password is not None else url_password,
            "socket_timeout": timeout_s,
            "socket_connect_timeout": timeout_s,
            "socket_keepalive": True,
            "health_check_interval": _HEALTH_CHECK_S,
            "retry": Retry(NoBackoff(), 0),
            "client_name": "kv-offload",
            "command_packer": _Packer(),
        }
        if tls:
            kwargs |= {
                "connection_class": redis.SSLConnection,
                "ssl_cert_reqs": "required",
                "ssl_ca_certs": opts.get("tls_ca_file"),
                "ssl_certfile": opts.get("tls_cert_file"),
                "ssl_keyfile": opts.get("tls_key_file"),
                "ssl_check_hostname": opts.get("tls_verify_hostname", True),
            }
        self._pool = redis.BlockingConnectionPool(  # type: ignore[no-untyped-call]
            max_connections=opts.get("max_connections", _DEFAULT_MAX_CONNECTIONS), timeout=timeout_s, **kwargs
        )
        self._client = redis.Redis(connection_pool=self._pool)
        self._exists_script = self._client.register_script(_EXISTS_SCRIPT)
        self._script_ok = True
        try:
            self._client.ping()
        except BaseException as exc:
            self._pool.disconnect()
            if isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                                redis.exceptions.ResponseError, OSError)):  # fmt: skip
                raise self._unavailable(exc, "connect") from None
            raise

    def __repr__(self) -> str:
        return f"RedisStore({self._shown!r})"

    # -- the RemoteStore interface ---------------------------------------------------------

    def exists(self, keys: Sequence[str]) -> list[bool]:
        """One script call (EVALSHA) answering every key: measured 0.7 ms p50 for 1,000 keys
        here, against 4 ms for a pipeline of 1,000 EXISTS (the server parses one command
        instead of 1,000). A server that refuses scripts (an ACL without EVAL/EVALSHA,
        scripting disabled) gets the pipeline from then on."""
        if not keys:
            return []
        if self._script_ok:
            answer = self._exists_by_script(keys)
            if answer is not None:
                return answer
        pipe = self._pipeline()
        for key in keys:
            pipe.execute_command("EXISTS", key)
        replies = self._execute(pipe, "exists")
        self._raise_errors(replies, "exists")
        return [r == 1 for r in replies]

    def put(self, keys: Sequence[str], values: Sequence[tuple[memoryview, memoryview]]) -> list[bool]:
        if len(keys) != len(values):
            raise ValueError(f"put: {len(keys)} keys but {len(values)} values")
        expiry: tuple[Any, ...] = ("EX", self._ttl_s) if self._ttl_s else ()
        done: list[bool] = []
        for lo, hi in self._batches([len(h) + len(b) for h, b in values]):
            pipe = self._pipeline()
            for key, (header, body) in zip(keys[lo:hi], values[lo:hi]):
                pipe.execute_command("SET", key, _Value(header, body), *expiry)
            replies = self._execute(pipe, "put")  # a per-key error (OOM, READONLY, NOPERM) is a refusal
            done.extend(r is True or r == b"OK" for r in replies)
        return done

    def get(self, keys: Sequence[str], into: Sequence[tuple[memoryview, memoryview]]) -> list[int]:
        import redis.exceptions as rex

        if len(keys) != len(into):
            raise ValueError(f"get: {len(keys)} keys but {len(into)} buffers")
        lengths: list[int] = []
        for lo, hi in self._batches([len(h) + len(b) for h, b in into]):
            pipe = self._pipeline()
            for key in keys[lo:hi]:
                pipe.execute_command("GET", key)
            replies = self._execute(pipe, "get")
            for reply, (header, body) in zip(replies, into[lo:hi]):
                if reply is None:
                    lengths.append(MISSING)
                elif isinstance(reply, rex.ResponseError) and str(reply).startswith("WRONGTYPE"):
                    lengths.append(0)  # not a string: not ours, so corrupt (the tier removes it)
                elif isinstance(reply, BaseException):
                    raise self._unavailable(reply, "get")
                else:
                    lengths.append(_copy_into(reply, header, body))
        return lengths

    def remove(self, keys: Sequence[str]) -> None:
        if not keys:
            return
        pipe = self._pipeline()
        for key in keys:
            pipe.execute_command("UNLINK", key)
        self._raise_errors(self._execute(pipe, "remove"), "remove")

    def scan(self, pattern: str, limit: int) -> list[str]:
        """``SCAN`` (never ``KEYS``: it does not block the server) until ``limit`` names."""
        import redis.exceptions as rex

        if self._closed:
            raise StoreUnavailable(f"the store connection to {self._shown} is closed")
        names: list[str] = []
        try:
            for name in self._client.scan_iter(match=pattern, count=1000):
                names.append(name.decode() if isinstance(name, bytes) else str(name))
                if len(names) >= limit:
                    break
        except (rex.ConnectionError, rex.TimeoutError, rex.ResponseError, OSError) as exc:  # also: an ACL without SCAN
            raise self._unavailable(exc, "scan") from None
        return names

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._pool.disconnect()

    # -- internals ----------------------------------------------------------------------

    def _exists_by_script(self, keys: Sequence[str]) -> list[bool] | None:
        import redis.exceptions as rex

        if self._closed:
            raise StoreUnavailable(f"the store connection to {self._shown} is closed")
        try:
            replies = self._exists_script(keys=list(keys))
        except (rex.ConnectionError, rex.TimeoutError, OSError) as exc:
            raise self._unavailable(exc, "exists") from None
        except rex.ResponseError:  # NOPERM, scripting disabled, ...: the pipeline always works
            self._script_ok = False
            return None
        if not isinstance(replies, list) or len(replies) != len(keys):
            self._script_ok = False
            return None
        return [r == 1 for r in replies]

    def _pipeline(self) -> Any:
        if self._closed:
            raise StoreUnavailable(f"the store connection to {self._shown} is closed")
        return self._client.pipeline(transaction=False)

    def _execute(self, pipe: Any, op: str) -> list[Any]:
        import redis.exceptions as rex

        try:
            replies: list[Any] = pipe.execute(raise_on_error=False)
            return replies
        except (rex.ConnectionError, rex.TimeoutError, OSError) as exc:
            raise self._unavailable(exc, op) from None
        finally:
            pipe.reset()

    def _raise_errors(self, replies: list[Any], op: str) -> None:
        """Raise for a command that failed (e.g. an ACL without read rights)."""
        for reply in replies:
            if isinstance(reply, BaseException):
                raise self._unavailable(reply, op)

    def _unavailable(self, exc: BaseException, op: str) -> StoreUnavailable:
        message = f"redis store {self._shown} ({op}): {_problem(exc, self._timeout_s)}"
        for secret in self._secrets:
            message = message.replace(secret, "***")
        return StoreUnavailable(message)

    def _batches(self, sizes: Sequence[int]) -> Iterator[tuple[int, int]]:
        """``[lo, hi)`` ranges of at most ``batch_bytes`` of values each (at least one value)."""
        lo, total = 0, 0
        for i, size in enumerate(sizes):
            if i > lo and total + size > self._batch_bytes:
                yield lo, i
                lo, total = i, 0
            total += size
        if lo < len(sizes):
            yield lo, len(sizes)


#: Which of KEYS exist, as a list of 0/1, in one command.
_EXISTS_SCRIPT = "local r = {} for i, k in ipairs(KEYS) do r[i] = redis.call('EXISTS', k) end return r"


def _copy_into(value: bytes, header: memoryview, body: memoryview) -> int:
    """Copy ``value`` into the two buffers if it has exactly their total length; its length."""
    n = len(value)
    if n == len(header) + len(body):
        view = memoryview(value)
        split = len(header)
        header[:] = view[:split]
        body[:] = view[split:]
    return n


class _Value:
    """A value to store, in two parts (``SET``'s argument), packed without joining them."""

    __slots__ = ("header", "body")

    def __init__(self, header: memoryview, body: memoryview) -> None:
        self.header = header
        self.body = body


class _Packer:
    """RESP command packer (redis-py's ``command_packer`` interface: ``pack(*args)`` returns
    the chunks to send). A :class:`_Value` becomes one bulk string whose body chunk is the
    caller's memoryview itself; everything else is small and is joined into ``bytes``."""

    def pack(self, *args: Any) -> list[bytes | memoryview]:
        if isinstance(args[0], str) and " " in args[0]:  # redis-py passes e.g. "CLIENT SETNAME"
            args = tuple(args[0].split()) + args[1:]
        chunks: list[bytes | memoryview] = []
        buf = bytearray(b"*%d\r\n" % len(args))
        for arg in args:
            if isinstance(arg, _Value):
                buf += b"$%d\r\n" % (arg.header.nbytes + arg.body.nbytes)
                buf += arg.header
                chunks += (bytes(buf), arg.body)
                buf = bytearray(b"\r\n")
            else:
                data = _encode(arg)
                buf += b"$%d\r\n" % len(data)
                buf += data
                buf += b"\r\n"
        chunks.append(bytes(buf))
        return chunks


def _encode(value: Any) -> bytes | bytearray | memoryview:
    """A command argument as bytes: buffers as they are, text as UTF-8, numbers in decimal."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(value).encode("ascii")
    raise TypeError(f"cannot send a {type(value).__name__} to redis")


def _parse_url(url: str) -> tuple[str, int, int, str | None, str | None]:
    """host, port, db, user, password of ``scheme://[user[:password]@]host[:port][/db]``."""
    parts = urlsplit(url)
    try:
        port = parts.port or _DEFAULT_PORT
    except ValueError:
        raise ConfigError("remote.url", f"has an invalid port: {redact(url)!r}") from None
    if not parts.hostname:
        raise ConfigError("remote.url", f"has no host: {redact(url)!r}")
    if parts.query or parts.fragment:
        raise ConfigError("remote.url", "query parameters are not supported; give options in the 'remote' section")
    path = parts.path.strip("/")
    if path and not (path.isascii() and path.isdigit()):
        raise ConfigError("remote.url", f"the path must be a database number such as /0, got {redact(url)!r}")
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    return parts.hostname, port, int(path or 0), user, password


def _readable_file(key: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(key, "expected a file path (a non-empty string)")
    path = os.path.expanduser(value)
    if not os.path.isfile(path):
        raise ConfigError(key, f"no such file: {value[:200]!r}")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise ConfigError(key, f"cannot read {value[:200]!r}: {exc.strerror or type(exc).__name__}") from None
    return path
