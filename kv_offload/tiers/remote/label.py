# SPDX-License-Identifier: Apache-2.0
"""What a namespace of the remote tier holds, in words: one value per namespace.

The remote tier's counterpart of the disk tier's ``namespace.json``
(:mod:`kv_offload.tiers.disk.label`): a namespace is named by a digest, which says nothing
to an operator or to an engine of another page geometry that wants to import its blocks. So
the engine that writes a namespace's blocks also puts its label, a JSON object (model, KV
dtype, block size, page format, rank, page geometry), under ``<prefix><namespace hex>:label``.
No block key can take that name (block keys are hex). ``python -m kv_offload remote list``
and ``remote show`` print it.

The value has the tier's checked header (:mod:`kv_offload.tiers.remote.format`), bound to
the namespace and to the key ``namespace.json``, so a label read back is the one written for
that namespace, or nothing. Like the disk tier's, it is advice, never trusted for data: a
block is found only by its key and checked by its checksum; a missing, planted or damaged
label changes what ``list`` prints, nothing else. The writer puts it with its first block
batch after each (re)connect and again every 5 minutes while it writes blocks, so a store
that evicted it, or restarted empty without the writer noticing (a pooled connection is
replaced silently), has it back within 5 minutes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from kv_offload.tiers.remote.format import HEADER_BYTES, check_header, checksum, encode_header
from kv_offload.tiers.remote.store import MISSING, RemoteStore

__all__ = [
    "LABEL_KEY", "MAX_LABEL_BYTES", "encode_label", "label_name", "label_pattern", "labels", "namespace_of",
    "put_label", "read_label",
]  # fmt: skip

#: the key the label's header is bound to (not a block key: block keys are 32-byte digests)
LABEL_KEY = b"namespace.json"
MAX_LABEL_BYTES = 64 << 10
_SUFFIX = ":label"
_GUESS_BYTES = 4096  # most labels are about 1 KiB: one round trip


def label_name(prefix: str, namespace: bytes) -> str:
    """The store key of ``namespace``'s label."""
    return f"{prefix}{namespace.hex()}{_SUFFIX}"


def label_pattern(prefix: str) -> str:
    """A Redis glob matching every label under ``prefix`` (the prefix's own glob characters escaped)."""
    escaped = "".join("\\" + c if c in "*?[]\\" else c for c in prefix)
    return f"{escaped}*{_SUFFIX}"


def namespace_of(prefix: str, name: str) -> bytes | None:
    """The namespace digest a label's store key names; ``None`` if ``name`` is not one."""
    if not name.startswith(prefix) or not name.endswith(_SUFFIX):
        return None
    text = name[len(prefix) : -len(_SUFFIX)]
    try:
        digest = bytes.fromhex(text)
    except ValueError:
        return None
    return digest if len(digest) == 16 and digest.hex() == text else None


def encode_label(namespace: bytes, label: Mapping[str, Any]) -> tuple[memoryview, memoryview]:
    """The label's value as ``(header, body)`` for :meth:`RemoteStore.put`."""
    body = memoryview((json.dumps(dict(label), sort_keys=True, indent=1) + "\n").encode())
    if len(body) > MAX_LABEL_BYTES:
        raise ValueError(f"a namespace label is at most {MAX_LABEL_BYTES} bytes, got {len(body)}")
    header = memoryview(bytearray(HEADER_BYTES))
    encode_header(header, namespace, LABEL_KEY, body)
    return header, body


def _decode(namespace: bytes, header: memoryview, body: memoryview) -> dict[str, Any] | None:
    expected = check_header(header, namespace, LABEL_KEY, len(body))
    if isinstance(expected, str) or checksum(body) != expected:
        return None
    try:
        value = json.loads(bytes(body))
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def read_label(store: RemoteStore, prefix: str, namespace: bytes) -> dict[str, Any] | None:
    """``namespace``'s label from ``store``; ``None`` if there is none or it is not a valid
    label of that namespace (bad header or checksum, too large, not a JSON object). At most
    two round trips: a value longer than the first guess is read again at its length.
    Raises :class:`~kv_offload.tiers.remote.store.StoreUnavailable` like any store call."""
    name = label_name(prefix, namespace)
    size = _GUESS_BYTES
    for _ in range(2):
        header, body = memoryview(bytearray(HEADER_BYTES)), memoryview(bytearray(size))
        (length,) = store.get([name], [(header, body)])
        if length == MISSING or length < HEADER_BYTES or length > HEADER_BYTES + MAX_LABEL_BYTES:
            return None
        if length == HEADER_BYTES + size:
            return _decode(namespace, header, body)
        size = length - HEADER_BYTES
    return None  # changed length between the two reads: a writer is replacing it


def put_label(store: RemoteStore, prefix: str, namespace: bytes, label: Mapping[str, Any]) -> bool:
    """Put ``namespace``'s label (one round trip); whether the store took it."""
    (ok,) = store.put([label_name(prefix, namespace)], [encode_label(namespace, label)])
    return ok


def labels(store: RemoteStore, prefix: str, names: Sequence[str]) -> list[tuple[bytes, dict[str, Any] | None]]:
    """``(namespace, label or None)`` for each label key in ``names`` (from a listing)."""
    out = []
    for name in names:
        ns = namespace_of(prefix, name)
        if ns is not None:
            out.append((ns, read_label(store, prefix, ns)))
    return out
