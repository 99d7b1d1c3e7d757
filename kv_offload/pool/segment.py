# SPDX-License-Identifier: Apache-2.0
"""The named shared-memory segment behind a shared pool: its file, its header, its owner.

``/dev/shm`` is world-writable, so what sits at ``/dev/shm/kv_offload.<name>`` is not
trusted: it is opened with ``O_NOFOLLOW | O_NONBLOCK`` (a symlink is refused, a FIFO cannot
block the open) and used only when it is a regular file owned by this user. Its header is
parsed defensively; anything malformed is a :class:`PoolError` naming what is wrong.

Header (the first 4 KiB): ``KVOFFLD1``, a little-endian u32 length, then that many bytes of
UTF-8 JSON: ``{"num_slots", "slot_bytes", "metadata", "owner"}``. ``owner`` is the creating
process: pid, start time (``/proc/<pid>/stat`` field 22, so a reused pid is told apart) and
pid namespace. A segment whose owner is gone (killed with SIGKILL, so it never unlinked the
segment) is reclaimed by the next creator of that name, with a warning; a segment whose
owner is alive, or cannot be checked, never is.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import stat
from dataclasses import dataclass
from typing import Any

__all__ = ["PoolError", "Owner", "SegmentHeader", "HEADER_BYTES", "open_segment", "create_segment"]

logger = logging.getLogger(__name__)

MAGIC = b"KVOFFLD1"
HEADER_BYTES = 4096
_PREFIX = len(MAGIC) + 4  # magic + u32 JSON length


class PoolError(RuntimeError):
    """A host pool or its shared segment cannot be created or attached; says why."""


# -- the owner ------------------------------------------------------------------------------
def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of ``pid``; ``None`` when it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm (field 2) may hold spaces and parentheses: fields 3.. follow the last ')'.
    fields = data[data.rindex(b")") + 2 :].split()
    return fields[0].decode(), int(fields[19])  # field 3 (state), field 22 (starttime)


@dataclass(frozen=True)
class Owner:
    """The process that created a segment."""

    pid: int
    start: int
    pid_ns: int

    @classmethod
    def current(cls) -> Owner:
        found = _proc_stat(os.getpid())
        return cls(os.getpid(), found[1] if found else 0, _pid_namespace())

    def as_json(self) -> dict[str, int]:
        return {"pid": self.pid, "start": self.start, "pid_ns": self.pid_ns}

    def is_gone(self) -> bool | None:
        """``True`` when the owner has exited, ``False`` while it runs, ``None`` if unknowable."""
        if self.pid_ns == 0 or self.start == 0 or self.pid_ns != _pid_namespace():
            return None  # another pid namespace (container): its pids mean nothing here
        try:
            found = _proc_stat(self.pid)
        except (OSError, ValueError, IndexError):
            return None  # /proc hidden or unreadable: cannot tell
        if found is None:
            return True
        state, start = found
        # A zombie has exited; a different start time is another process reusing the pid.
        return start != self.start or state in ("Z", "X")


# -- the header -----------------------------------------------------------------------------
@dataclass(frozen=True)
class SegmentHeader:
    num_slots: int
    slot_bytes: int
    metadata: dict[str, Any]
    owner: Owner | None

    @property
    def total_bytes(self) -> int:
        return HEADER_BYTES + self.num_slots * self.slot_bytes

    def encode(self) -> bytes:
        """The header block; raises :class:`PoolError` when the metadata does not fit."""
        body: dict[str, Any] = {"num_slots": self.num_slots, "slot_bytes": self.slot_bytes, "metadata": self.metadata}
        if self.owner is not None:
            body["owner"] = self.owner.as_json()
        data = json.dumps(body).encode()
        if len(data) + _PREFIX > HEADER_BYTES:
            raise PoolError(f"pool metadata too large for the shared header ({len(data)} bytes)")
        return MAGIC + len(data).to_bytes(4, "little") + data

    @classmethod
    def parse(cls, raw: bytes, path: str) -> SegmentHeader:
        """Parse the first :data:`HEADER_BYTES` of a segment; every defect is a :class:`PoolError`."""
        if len(raw) < _PREFIX or raw[: len(MAGIC)] != MAGIC:
            raise PoolError(f"{path} is not a kv_offload pool (no {MAGIC.decode()} header)")
        n = int.from_bytes(raw[len(MAGIC) : _PREFIX], "little")
        if not 0 < n <= HEADER_BYTES - _PREFIX:
            raise PoolError(f"{path}: header length {n} is out of range (1..{HEADER_BYTES - _PREFIX})")
        if len(raw) < _PREFIX + n:
            raise PoolError(f"{path}: header length {n} runs past the end of the segment")
        try:
            body = json.loads(raw[_PREFIX : _PREFIX + n].decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise PoolError(f"{path}: header is not UTF-8 ({exc.reason} at byte {exc.start})") from exc
        except (ValueError, RecursionError) as exc:
            raise PoolError(f"{path}: header is not valid JSON ({exc})") from exc
        if not isinstance(body, dict):
            raise PoolError(f"{path}: header is a JSON {type(body).__name__}, not an object")
        for key in ("num_slots", "slot_bytes", "metadata"):
            if key not in body:
                raise PoolError(f"{path}: header has no {key!r}")
        num_slots, slot_bytes, metadata = body["num_slots"], body["slot_bytes"], body["metadata"]
        if not _is_int(num_slots) or num_slots < 1:
            raise PoolError(f"{path}: header says num_slots={num_slots!r}; a pool has a positive integer count")
        if not _is_int(slot_bytes) or slot_bytes <= 0 or slot_bytes % 4096:
            raise PoolError(f"{path}: header says slot_bytes={slot_bytes!r}; expected a positive multiple of 4096")
        if not isinstance(metadata, dict):
            raise PoolError(f"{path}: header metadata is a JSON {type(metadata).__name__}, not an object")
        return cls(num_slots, slot_bytes, metadata, _parse_owner(body.get("owner"), path))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_owner(value: object, path: str) -> Owner | None:
    if value is None:
        return None  # written by an older version: the owner cannot be checked
    fields = ("pid", "start", "pid_ns")
    if not isinstance(value, dict) or not all(_is_int(value.get(k)) and value[k] >= 0 for k in fields):
        raise PoolError(f"{path}: header owner {value!r} is not {{pid, start, pid_ns}} integers")
    if value["pid"] == 0:
        raise PoolError(f"{path}: header owner pid is 0")
    return Owner(value["pid"], value["start"], value["pid_ns"])


# -- the file -------------------------------------------------------------------------------
def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISDIR, "directory"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISLNK, "symbolic link")):  # fmt: skip
        if test(mode):
            return name
    return "non-regular file"


def _check_file(st: os.stat_result, path: str) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise PoolError(
            f"{path} is a {_kind(st.st_mode)}, not a kv_offload pool segment (a regular file);"
            " another user may have planted it in the world-writable directory: remove it"
        )
    if st.st_uid != os.geteuid():
        raise PoolError(
            f"{path} is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()});"
            " refusing a segment another user could read or change"
        )


def open_segment(path: str, *, write: bool) -> tuple[int, os.stat_result]:
    """Open an existing segment safely; ``FileNotFoundError`` when there is none.

    Never follows a symlink and never blocks (a FIFO opens at once, then is refused).
    """
    flags = (os.O_RDWR if write else os.O_RDONLY) | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PoolError(f"{path} is a symbolic link, not a kv_offload pool segment; remove it") from exc
        if exc.errno in (errno.ENXIO, errno.EISDIR, errno.EACCES, errno.EPERM):
            raise PoolError(f"cannot open {path}: {exc.strerror}") from exc
        raise
    try:
        st = os.fstat(fd)
        _check_file(st, path)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def read_header(fd: int, st: os.stat_result, path: str) -> SegmentHeader:
    """The segment's header, checked against the file's size."""
    if st.st_size < HEADER_BYTES:
        raise PoolError(f"{path} is not a kv_offload pool ({st.st_size} bytes)")
    header = SegmentHeader.parse(os.pread(fd, HEADER_BYTES, 0), path)
    if st.st_size < header.total_bytes:
        raise PoolError(f"{path} holds {st.st_size} bytes, its header says {header.total_bytes}")
    return header


def create_segment(path: str, name: str, total: int) -> int:
    """Create ``path`` (mode 0600) of ``total`` bytes; reclaims one whose owner is gone."""
    for _ in range(3):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            _reclaim_stale(path, name)  # raises unless it removed a dead owner's segment
            continue
        try:
            os.ftruncate(fd, total)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        return fd
    raise PoolError(f"shared pool {name!r} ({path}) keeps reappearing; another process is creating it")


def _reclaim_stale(path: str, name: str) -> None:
    """Remove the existing segment at ``path`` if its owner is gone; otherwise say who has it."""
    exists = f"shared pool {name!r} already exists ({path})"
    try:
        fd, st = open_segment(path, write=False)
    except FileNotFoundError:
        return  # removed meanwhile: try again
    except PoolError as exc:
        raise PoolError(f"{exists}: {exc}") from exc
    try:
        try:
            # Only reclaimers take this lock: two of them never both remove and recreate.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise PoolError(f"{exists}; another process is reclaiming it") from exc
        try:
            header = read_header(fd, st, path)
        except PoolError as exc:
            raise PoolError(f"{exists} and is not a usable pool ({exc}); remove it if no process uses it") from exc
        owner = header.owner
        if owner is None:
            raise PoolError(f"{exists}; another process owns it (its header records no owner to check)")
        gone = owner.is_gone()
        if gone is None:
            raise PoolError(f"{exists}; another process owns it (pid {owner.pid}, which cannot be checked from here)")
        if not gone:
            raise PoolError(f"{exists}; another process owns it (pid {owner.pid}, running)")
        try:
            now = os.stat(path, follow_symlinks=False)
            if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                return  # replaced since it was opened: look again
            os.unlink(path)
        except FileNotFoundError:
            return  # another process reclaimed it first (and may be creating its own): look again
        logger.warning(
            "kv_offload: reclaimed shared pool %r (%s) left behind by pid %d, which is gone", name, path, owner.pid
        )
    finally:
        os.close(fd)


def is_same_file(fd: int, path: str) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        a, b = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
