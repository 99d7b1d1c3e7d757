# SPDX-License-Identifier: Apache-2.0
"""File-system plumbing for the disk tier: safe directories, O_DIRECT, aligned buffers, locks.

Everything here is a thin, checked wrapper over one system call or a fixed sequence of them.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat
import struct
import threading

import numpy as np

__all__ = [
    "DiskTierError", "check_directory", "make_private_dir", "probe_direct", "AlignedBuffer", "BufferPool",
    "address_of", "check_stat", "open_private_subdir", "owner_only", "direct_flag", "lock_range", "unlock_range", "NOFOLLOW", "ALIGN",
]  # fmt: skip

#: Alignment of O_DIRECT buffers, offsets and lengths used here (a page).
ALIGN = 4096
NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC
_O_DIRECT = getattr(os, "O_DIRECT", 0)
# struct flock on Linux x86-64 / aarch64: l_type, l_whence, l_start, l_len, l_pid.
_FLOCK = struct.Struct("hhqqi4x")


#: Write bits for anyone but the owner: a directory with either is refused.
_SHARED_WRITE = stat.S_IWGRP | stat.S_IWOTH


class DiskTierError(Exception):
    """The disk tier cannot use a directory (wrong owner, group- or world-writable, not a directory)."""


def check_directory(path: str, *, follow: bool) -> os.stat_result:
    """Refuse a directory another user could tamper with (owned by another user, or group- or
    world-writable: the docs promise 0700). ``follow``: whether ``path`` itself may
    be a symlink (the configured root may be; nothing inside it may)."""
    try:
        st = os.stat(path) if follow else os.lstat(path)
    except OSError as e:
        raise DiskTierError(f"disk tier directory {path!r}: {e.strerror}") from e
    if stat.S_ISLNK(st.st_mode):
        raise DiskTierError(f"disk tier directory {path!r} is a symlink; refusing to follow it")
    if not stat.S_ISDIR(st.st_mode):
        raise DiskTierError(f"disk tier directory {path!r} is not a directory")
    if st.st_uid != os.geteuid():
        raise DiskTierError(
            f"disk tier directory {path!r} is owned by uid {st.st_uid}, not by this user "
            f"(uid {os.geteuid()}); refusing it"
        )
    if st.st_mode & _SHARED_WRITE:
        raise DiskTierError(
            f"disk tier directory {path!r} is group- or world-writable (mode {stat.S_IMODE(st.st_mode):o}); "
            "refusing it (chmod 700 it or pick another)"
        )
    return st


def check_stat(st: os.stat_result, what: str) -> None:
    """The checks of :func:`check_directory` on an ``fstat`` of an opened directory."""
    if not stat.S_ISDIR(st.st_mode):
        raise DiskTierError(f"{what} is not a directory")
    if st.st_uid != os.geteuid():
        raise DiskTierError(f"{what} is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()}); refusing it")
    if st.st_mode & _SHARED_WRITE:
        raise DiskTierError(f"{what} is group- or world-writable (mode {stat.S_IMODE(st.st_mode):o}); refusing it")


def open_private_subdir(parent_fd: int, name: str, what: str, *, create: bool = True) -> int:
    """Create ``name`` under ``parent_fd`` owner-only if missing, open it without following a
    symlink, and check it (owner, not group- or world-writable). Returns the directory's descriptor."""
    if create:
        try:
            os.mkdir(name, 0o700, dir_fd=parent_fd)
        except FileExistsError:
            pass
        except OSError as e:
            raise DiskTierError(f"cannot create {what}: {e.strerror}") from e
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | NOFOLLOW, dir_fd=parent_fd)
    except OSError as e:
        try:
            link = stat.S_ISLNK(os.lstat(name, dir_fd=parent_fd).st_mode)
        except OSError:
            link = False
        why = "it is a symlink; refusing to follow it" if link or e.errno == errno.ELOOP else e.strerror
        raise DiskTierError(f"cannot open {what}: {why}") from e
    try:
        st = os.fstat(fd)
        check_stat(st, what)
        owner_only(fd, st, 0o700)
    except BaseException:
        os.close(fd)
        raise
    return fd


def owner_only(fd: int, st: os.stat_result, mode: int) -> None:
    """Take group and other permission bits off a file or directory of ours found with some
    (copied in with ``cp``, made under a loose umask): its blocks are users' prompts. Best
    effort: a read-only file system keeps the mode it has."""
    if stat.S_IMODE(st.st_mode) & 0o077:
        try:
            os.fchmod(fd, stat.S_IMODE(st.st_mode) & mode)
        except OSError:
            pass


def make_private_dir(path: str, *, follow: bool) -> os.stat_result:
    """Create ``path`` owner-only (0700) if missing, then check it as :func:`check_directory`."""
    try:
        os.mkdir(path, 0o700)
        os.chmod(path, 0o700, follow_symlinks=False)
    except FileExistsError:
        pass
    except OSError as e:
        raise DiskTierError(f"cannot create disk tier directory {path!r}: {e.strerror}") from e
    return check_directory(path, follow=follow)


class AlignedBuffer:
    """A page-aligned anonymous mapping, usable as an O_DIRECT buffer."""

    def __init__(self, nbytes: int) -> None:
        self.map = mmap.mmap(-1, max(nbytes, ALIGN))
        self.view = memoryview(self.map)[:nbytes]

    def close(self) -> None:
        """Unmap; a mapping a view still points into is left to the garbage collector."""
        try:
            self.view.release()
            self.map.close()
        except BufferError:
            pass


class BufferPool:
    """Bounce buffers for callers' threads: taken for one I/O and given back; at most ``keep``
    are kept between calls (the rest are unmapped), so short-lived threads leave nothing."""

    def __init__(self, nbytes: int, keep: int) -> None:
        self.nbytes = nbytes
        self.keep = keep
        self._free: list[AlignedBuffer] = []
        self._lock = threading.Lock()
        self._closed = False

    def take(self) -> AlignedBuffer:
        with self._lock:
            if self._free:
                return self._free.pop()
        return AlignedBuffer(self.nbytes)

    def give(self, buf: AlignedBuffer) -> None:
        with self._lock:
            if not self._closed and len(self._free) < self.keep:
                self._free.append(buf)
                return
        buf.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            bufs, self._free = self._free, []
        for buf in bufs:
            buf.close()


def address_of(view: memoryview) -> int:
    """The address of a contiguous buffer's first byte."""
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)


def probe_direct(dir_fd: int) -> bool:
    """Whether the file system under ``dir_fd`` takes O_DIRECT: one aligned write to a probe file."""
    if not _O_DIRECT:
        return False
    name = f".direct-probe-{os.getpid()}-{os.urandom(4).hex()}"
    buf = AlignedBuffer(ALIGN)
    try:
        fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | NOFOLLOW | _O_DIRECT, 0o600, dir_fd=dir_fd)
    except OSError:
        buf.close()
        return False
    try:
        os.pwrite(fd, buf.view, 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        buf.close()
        try:
            os.unlink(name, dir_fd=dir_fd)
        except OSError:
            pass


def direct_flag(enabled: bool) -> int:
    return _O_DIRECT if enabled else 0


def lock_range(fd: int, start: int, length: int, *, exclusive: bool, wait: bool = True) -> bool:
    """Take an open-file-description byte-range lock (shared or exclusive) on ``fd``.

    OFD locks belong to the open file, not the process: they conflict between processes and
    between separately opened descriptors, are released when the process dies, and closing
    another descriptor of the same file does not drop them. ``False`` when ``wait`` is off and
    the range is held.
    """
    kind = fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK
    cmd = fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK
    try:
        fcntl.fcntl(fd, cmd, _FLOCK.pack(kind, os.SEEK_SET, start, length, 0))
    except OSError as e:
        if not wait and e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def unlock_range(fd: int, start: int, length: int) -> None:
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, start, length, 0))
