# SPDX-License-Identifier: Apache-2.0
"""Content keys: what names an offloaded KV block in every tier, process and restart.

kv-offload never keys a block by vLLM's block hash, which changes with ``PYTHONHASHSEED``,
``--prefix-caching-hash-algo`` and the vLLM version. A key is 32 bytes::

    key   = namespace digest (16 bytes) || chain hash (16 bytes)
    h[-1] = namespace digest
    h[i]  = BLAKE2b-128( h[i-1] || u32 n || n token ids as little-endian u32 || extra )

``h[i]`` covers every token of blocks ``0..i``; ``extra`` is the canonical encoding of what
else changes block ``i``'s KV (a LoRA adapter, multimodal inputs, a ``cache_salt``, prompt
embeddings: whatever vLLM folds into its own block hash), empty when nothing does. BLAKE2b
(Python's ``hashlib``) is unkeyed and unsalted here, so the same tokens give the same key in
any process, on any machine, forever; the golden values in ``tests/test_keys.py`` pin it.

The namespace digest covers everything that makes the bytes of a block differ for the same
tokens: the model (its path or name, revision, and a fingerprint of its config and weights
that reads a few KiB per weight file, never the whole file), the KV dtype, tokens per block,
the page format, the storage format version, tensor- and pipeline-parallel sizes and the KV
cache group. A worker's shard additionally carries its rank (:meth:`Namespace.rank_digest`).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "KEY_BYTES", "DIGEST_BYTES", "FORMAT_VERSION", "Namespace", "KeyChain", "ExtraKeys", "Unkeyable",
    "encode_extra", "chain_hash", "model_fingerprint",
]  # fmt: skip

#: bytes of a namespace digest and of a chain hash
DIGEST_BYTES = 16
#: bytes of a key: namespace digest + chain hash
KEY_BYTES = 2 * DIGEST_BYTES
#: the storage format version, part of every namespace (bump it when block bytes change meaning)
FORMAT_VERSION = 1

_SAMPLE = 64 << 10  # bytes read at each sampled offset of a weight file
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")


class Unkeyable(ValueError):
    """A block whose KV depends on something kv-offload cannot encode canonically."""


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES).digest()


def encode_extra(value: object) -> bytes:
    """Canonical bytes of an extra key: ``str``, ``bytes``, ``int``, ``bool``, ``None`` and
    tuples or lists of them, each tagged and length-prefixed. Anything else is
    :class:`Unkeyable` (a float, an object whose ``repr`` varies between processes, ...)."""
    if value is None:
        return b"N"
    if isinstance(value, bool):
        return b"T" if value else b"F"
    if isinstance(value, int):
        raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
        return b"I" + struct.pack("<I", len(raw)) + raw
    if isinstance(value, str):
        raw = value.encode("utf-8", "surrogatepass")
        return b"S" + struct.pack("<I", len(raw)) + raw
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        return b"B" + struct.pack("<I", len(raw)) + raw
    if isinstance(value, (tuple, list)):
        return b"L" + struct.pack("<I", len(value)) + b"".join(encode_extra(v) for v in value)
    raise Unkeyable(f"cannot key a block on a {type(value).__name__} extra key")


def _tokens_bytes(tokens: Sequence[int]) -> bytes:
    arr = np.asarray(tokens, dtype=np.int64)
    if arr.ndim != 1:
        raise Unkeyable("token ids must be a flat sequence")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= 2**32):
        raise Unkeyable("a token id is outside [0, 2**32)")
    return struct.pack("<I", arr.size) + arr.astype("<u4").tobytes()


def chain_hash(parent: bytes, tokens: Sequence[int], extra: object = None) -> bytes:
    """``h[i]`` from ``h[i-1]`` (``parent``), block ``i``'s token ids and its extra keys."""
    tail = b"" if extra is None else encode_extra(extra)
    return _digest(parent + _tokens_bytes(tokens) + tail)


def model_fingerprint(model: str, revision: str | None = None) -> str:
    """A hex digest of a model's identity that reads no weight file in full.

    For a local directory (wherever it lies): ``config.json`` and, per weight file (sorted by
    name), its name, size, safetensors header, and 64 KiB at the start, middle and end of its
    data, so two checkpoints with the same shapes but other weights differ. For anything else
    (a hub name vLLM resolves itself): the name and revision only.
    """
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    if not os.path.isdir(model):
        h.update(encode_extra(("model", model, revision)))
        return h.hexdigest()
    h.update(encode_extra(("local", revision)))  # content only: a copy elsewhere is the same model
    config = os.path.join(model, "config.json")
    if os.path.isfile(config):
        with open(config, "rb") as f:
            h.update(encode_extra(("config.json", f.read())))
    files = sorted({p for pat in _WEIGHT_PATTERNS for p in glob.glob(os.path.join(model, "**", pat), recursive=True)})
    for path in files:
        h.update(encode_extra(("file", os.path.relpath(path, model))))
        _sample_file(path, h)
    return h.hexdigest()


def _sample_file(path: str, h: Any) -> None:
    size = os.path.getsize(path)
    h.update(encode_extra(size))
    start = 0
    with open(path, "rb") as f:
        if path.endswith(".safetensors") and size >= 8:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len <= min(size - 8, 100 << 20):
                h.update(f.read(header_len))  # names, dtypes, shapes, offsets
                start = 8 + header_len
        data = size - start
        for offset in sorted({start, start + max(0, data // 2 - _SAMPLE // 2), max(start, size - _SAMPLE)}):
            f.seek(offset)
            h.update(f.read(_SAMPLE))


@dataclass(frozen=True)
class Namespace:
    """Everything that makes a block's bytes differ for the same tokens.

    ``model`` is the model's path or name, ``fingerprint`` :func:`model_fingerprint`'s
    digest; the rest describes the KV cache and how it is split.
    """

    model: str
    fingerprint: str
    kv_dtype: str
    block_size: int
    page_format: str
    revision: str | None = None
    tp_size: int = 1
    pp_size: int = 1
    kv_group: int = 0
    format_version: int = FORMAT_VERSION
    _digest: bytes = field(default=b"", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        fields = {k: v for k, v in asdict(self).items() if k != "_digest"}
        object.__setattr__(self, "_digest", _digest(encode_extra(sorted(fields.items()))))

    @property
    def digest(self) -> bytes:
        """16 bytes that prefix every key of this namespace (the scheduler's keys)."""
        return self._digest

    def rank_digest(self, rank: int) -> bytes:
        """The namespace of one worker's shard (what a tier holding per-rank bytes keys by)."""
        return _digest(self._digest + encode_extra(("rank", rank)))

    def describe(self) -> dict[str, Any]:
        """Plain data for headers, logs and ``python -m kv_offload``."""
        out = {k: v for k, v in asdict(self).items() if k != "_digest"}
        out["digest"] = self._digest.hex()
        return out

    def to_json(self) -> str:
        return json.dumps(self.describe(), sort_keys=True)


#: ``extra(start_token, end_token, state) -> (extra keys or None, new state)``: what else
#: changes the KV of the block covering ``[start_token, end_token)`` (vLLM's extra keys)
ExtraKeys = Callable[[int, int, Any], tuple[Any, Any]]


class KeyChain:
    """The keys of one request's full blocks, computed once each, as its tokens grow.

    ``keys(tokens, n)`` returns the first ``n`` keys, hashing only blocks not hashed before,
    so a step costs O(new blocks), not O(context). A block that cannot be keyed
    (:class:`Unkeyable`) ends the chain there: :attr:`unkeyable` is set and no later block
    gets a key (nothing after it can be matched or stored).
    """

    def __init__(self, namespace: bytes, block_size: int, extra: ExtraKeys | None = None, state: Any = 0) -> None:
        self._prefix = namespace
        self._block_size = block_size
        self._extra = extra
        self._state = state
        self._hashes: list[bytes] = []
        self._keys: list[bytes] = []
        self.unkeyable: str | None = None

    def __len__(self) -> int:
        return len(self._keys)

    def keys(self, tokens: Sequence[int], n: int) -> list[bytes]:
        """Keys of blocks ``0..n-1`` of ``tokens`` (``n`` is capped at the full blocks)."""
        bs = self._block_size
        n = min(n, len(tokens) // bs)
        while len(self._keys) < n and self.unkeyable is None:
            i = len(self._keys)
            start, end = i * bs, (i + 1) * bs
            parent = self._hashes[-1] if self._hashes else self._prefix
            try:
                extra = None
                if self._extra is not None:
                    extra, self._state = self._extra(start, end, self._state)
                h = chain_hash(parent, tokens[start:end], extra)
            except Unkeyable as exc:
                self.unkeyable = str(exc)
                break
            self._hashes.append(h)
            self._keys.append(self._prefix + h)
        return self._keys[:n]
