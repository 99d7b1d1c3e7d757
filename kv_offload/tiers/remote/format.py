# SPDX-License-Identifier: Apache-2.0
"""The value format of the remote tier: a checked header, then the block's bytes.

A store is shared by every instance that points at it, can be written by anything that holds
its credentials, and can lose or truncate values (eviction, a restart mid-write). So nothing
read back is trusted until it proves what it is: each value starts with an 80-byte header::

    magic "KVOR" | format version (u16) | key length (u16) | body length (u64)
    | xxh3-64 of the body (u64) | tier namespace (16 bytes) | key (32 bytes, zero padded)
    | xxh3-64 of the 72 bytes before it (u64)

A value whose header is not exactly the one expected for the (namespace, key) asked for, whose
length differs, or whose body does not hash to the header's checksum is a miss: counted as
corrupt, discarded, never loaded. The namespace and key inside the value also catch a value
stored under the wrong name (a swapped key, another deployment's prefix).

Store keys are text: ``<prefix><namespace hex>:<key hex>``; the prefix separates deployments
sharing one store (and is what an ACL rule restricts a user to).
"""

from __future__ import annotations

import struct

import xxhash

__all__ = ["FORMAT_VERSION", "HEADER_BYTES", "MAX_KEY_BYTES", "encode_header", "check_header", "store_key", "checksum"]

FORMAT_VERSION = 1
MAX_KEY_BYTES = 32
_MAGIC = b"KVOR"
_BODY = struct.Struct("<4sHHQQ16s32s")
_HASH = struct.Struct("<Q")
HEADER_BYTES = _BODY.size + _HASH.size
assert HEADER_BYTES == 80


def checksum(data: bytes | bytearray | memoryview) -> int:
    """The body checksum: xxh3-64, as the disk tier's."""
    return xxhash.xxh3_64_intdigest(data)


def store_key(prefix: str, namespace: bytes, key: bytes) -> str:
    """The store's name for ``key`` of ``namespace``."""
    return f"{prefix}{namespace.hex()}:{key.hex()}"


def encode_header(into: memoryview, namespace: bytes, key: bytes, body: memoryview) -> None:
    """Write the header of ``body`` (stored under ``key`` of ``namespace``) into ``into``."""
    if len(key) > MAX_KEY_BYTES:
        raise ValueError(f"key of {len(key)} bytes is longer than {MAX_KEY_BYTES}")
    _BODY.pack_into(into, 0, _MAGIC, FORMAT_VERSION, len(key), len(body), checksum(body), namespace, key)
    _HASH.pack_into(into, _BODY.size, xxhash.xxh3_64_intdigest(into[: _BODY.size]))


def check_header(header: memoryview, namespace: bytes, key: bytes, body_bytes: int) -> int | str:
    """The body checksum the header promises, or why the header is not the expected one."""
    if len(header) != HEADER_BYTES:
        return f"header of {len(header)} bytes"
    (digest,) = _HASH.unpack_from(header, _BODY.size)
    if digest != xxhash.xxh3_64_intdigest(header[: _BODY.size]):
        return "header checksum mismatch"
    magic, version, key_len, length, body_hash, ns, padded = _BODY.unpack_from(header, 0)
    if magic != _MAGIC:
        return "not a kv-offload value"
    if version != FORMAT_VERSION:
        return f"format version {version} (this build reads {FORMAT_VERSION})"
    if ns != namespace:
        return "another namespace's value"
    if key_len != len(key) or padded[:key_len] != key or any(padded[key_len:]):
        return "another key's value"
    if length != body_bytes:
        return f"body of {length} bytes, expected {body_bytes}"
    return int(body_hash)
