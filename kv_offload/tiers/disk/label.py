# SPDX-License-Identifier: Apache-2.0
"""What a namespace directory of the disk tier holds, in words: ``<namespace>/namespace.json``.

A namespace directory is named by a digest (the key namespace of one engine's blocks for one
worker rank), which says nothing to an operator or to another engine. The engine that writes
blocks there also writes a label: the namespace's fields (model, fingerprint, KV dtype, block
size, page format, parallel sizes), the worker rank, and the KV page geometry of its blocks.
``python -m kv_offload disk list`` shows it, and it is what a consumer engine of another page
geometry names in its ``imports`` config to read these blocks (docs/attention.md).

The label is advice, never trusted for data: a block is found only by its key, whose
namespace digest covers the same fields, and checked by its checksum. So a missing, planted
or malformed label changes what ``list`` prints, nothing else. Written owner-only and
atomically (a temporary file renamed over it) without following symlinks; read without
following symlinks, only from a regular file of at most 64 KiB.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping
from typing import Any

from kv_offload.tiers.disk.files import NOFOLLOW

__all__ = ["LABEL_NAME", "read_label", "remove_label", "summary", "write_label"]

LABEL_NAME = "namespace.json"
_MAX_BYTES = 64 << 10


def write_label(ns_fd: int, label: Mapping[str, Any]) -> bool:
    """Write ``label`` (JSON-serialisable) as the namespace directory's label unless it already
    says exactly that. Returns whether it wrote. Raises ``OSError`` (the caller warns)."""
    data = (json.dumps(dict(label), sort_keys=True, indent=1) + "\n").encode()
    if len(data) > _MAX_BYTES:
        raise ValueError(f"a namespace label is at most {_MAX_BYTES} bytes, got {len(data)}")
    if read_raw(ns_fd) == data:
        return False
    tmp = f".{LABEL_NAME}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=ns_fd)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask, and if an old temporary file was there
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.rename(tmp, LABEL_NAME, src_dir_fd=ns_fd, dst_dir_fd=ns_fd)
    except OSError:
        os.unlink(tmp, dir_fd=ns_fd)
        raise
    return True


def remove_label(ns_fd: int) -> None:
    """Remove the label if there is one (``purge``, with the namespace's last segment)."""
    try:
        os.unlink(LABEL_NAME, dir_fd=ns_fd)
    except FileNotFoundError:
        pass


def read_raw(ns_fd: int) -> bytes | None:
    """The label's bytes; ``None`` if it is missing, not a regular file, too large or unreadable."""
    try:
        fd = os.open(LABEL_NAME, os.O_RDONLY | NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=ns_fd)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_BYTES:
            return None
        return os.read(fd, _MAX_BYTES + 1)[: _MAX_BYTES]
    except OSError:
        return None
    finally:
        os.close(fd)


def read_label(ns_fd: int) -> dict[str, Any] | None:
    """The label as a dict; ``None`` if there is none or it is not a JSON object."""
    data = read_raw(ns_fd)
    if data is None:
        return None
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def summary(label: Mapping[str, Any] | None) -> str:
    """One line for ``disk list``: page format, dtype, block size, rank, model."""
    if label is None:
        return "(no label)"
    fields = []
    for key, fmt in (("page_format", "{}"), ("kv_dtype", "{}"), ("block_size", "{}-token blocks"), ("rank", "rank {}")):
        if key in label:
            fields.append(fmt.format(label[key]))
    model = label.get("model")
    if isinstance(model, str):
        fields.append(os.path.basename(model.rstrip("/")) or model)
    return ", ".join(str(f) for f in fields) or "(empty label)"
