# SPDX-License-Identifier: Apache-2.0
"""Running a real store server (redis-server, Mooncake master) as a child process for tests,
demos and benchmarks.

The remote tier is tested against real stores, not mocks, and those tests need the faults a
real deployment sees: a store that dies (:meth:`ManagedProcess.kill`), one that stalls without
closing its sockets (:meth:`ManagedProcess.pause`, SIGSTOP) and one that comes back. This
module holds what every launcher shares: a free loopback port, waiting for readiness with a
clear error, and a process in its own process group (so a signal reaches the server and any
helpers it spawned, and a Ctrl-C in the terminal does not) whose output goes to a log file
that an error message can quote.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

__all__ = ["StoreStartError", "free_port", "wait_until", "ManagedProcess", "launch", "StoreServer"]


class StoreStartError(RuntimeError):
    """A store server could not be started (not installed, bad config, not ready in time)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that is free now (the OS picks it; another process may take it
    before it is used, which a launcher reports as a start error)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, *, interval: float = 0.02) -> None:
    """Call ``predicate`` until it returns true; raise :class:`StoreStartError` naming ``what``
    after ``timeout`` seconds. An exception from ``predicate`` counts as "not yet"."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except Exception:
            pass
        if time.monotonic() >= deadline:
            raise StoreStartError(f"{what}: not ready after {timeout:g} s")
        time.sleep(interval)


def log_tail(path: Path, max_bytes: int = 2000) -> str:
    """The last ``max_bytes`` of a log file (empty when it cannot be read), for error messages."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


#: processes spawned and not yet stopped or killed (strong references: killed at exit even
#: when their owner forgot them)
_LIVE: set[ManagedProcess] = set()


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_LIVE):
        try:
            proc.kill(wait_s=5.0)
        except RuntimeError:
            pass  # the interpreter is exiting: SIGKILL was sent, nothing else can be done


def _wait_stopped(pgid: int, timeout_s: float = 5.0) -> None:
    """Until every thread of every process in group ``pgid`` is stopped (or ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        running = False
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[2]) != pgid:
                        continue
                for tid in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{tid}/stat") as f:
                        running = running or f.read().rsplit(")", 1)[1].split()[0] not in ("T", "t", "Z", "X")
            except (OSError, IndexError, ValueError):
                continue  # it exited meanwhile
        if not running:
            return
        time.sleep(0.002)


class ManagedProcess:
    """One server process in its own process group, output to ``log_path``.

    Started by :meth:`spawn`; ended by :meth:`stop` (SIGTERM, then SIGKILL after a grace
    period) or :meth:`kill`; stalled and resumed by :meth:`pause` / :meth:`resume`. A process
    still running when the interpreter exits is killed (atexit), so a failed test leaves no
    server behind. Not thread-safe: one owner drives it.
    """

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def running(self) -> bool:
        """Whether the process was spawned and has not exited."""
        return self._proc is not None and self._proc.poll() is None

    def spawn(self, argv: Sequence[str], *, cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
        """Start ``argv`` (output appended to the log). Raises :class:`StoreStartError` when the
        program cannot be executed."""
        if self.running():
            raise StoreStartError(f"{argv[0]} is already running (pid {self.pid})")
        try:
            with open(self.log_path, "ab") as log:
                self._proc = subprocess.Popen(
                    list(argv), cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )  # fmt: skip
        except OSError as exc:
            raise StoreStartError(f"cannot run {argv[0]!r}: {exc.strerror or exc}") from None
        self._paused = False
        _LIVE.add(self)

    def exit_code(self) -> int | None:
        """The exit status once the process ended (None while running or never spawned)."""
        return self._proc.poll() if self._proc is not None else None

    def log_tail(self, max_bytes: int = 2000) -> str:
        return log_tail(self.log_path, max_bytes)

    def _signal(self, sig: int) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        try:
            os.killpg(self._proc.pid, sig)
        except ProcessLookupError:
            pass

    def pause(self) -> None:
        """SIGSTOP the process group: the server keeps its sockets open but answers nothing.
        Returns once every thread of it has stopped: a stop takes effect only when one of its
        threads next runs, and meanwhile another can answer a call (a paused Mooncake master
        answered ``exists`` in a CI run on 2 busy cores)."""
        self._signal(signal.SIGSTOP)
        self._paused = True
        if self._proc is not None:
            _wait_stopped(self._proc.pid)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        self._signal(signal.SIGCONT)
        self._paused = False

    def stop(self, grace_s: float = 5.0) -> None:
        """End the process gracefully (SIGTERM; SIGKILL if it is still there after ``grace_s``)."""
        if self._proc is None:
            return
        if self._paused:
            self.resume()  # a stopped process cannot act on SIGTERM
        self._signal(signal.SIGTERM)
        try:
            self._proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.kill()
        _LIVE.discard(self)

    def kill(self, wait_s: float = 120.0) -> None:
        """SIGKILL the process group at once (a crash, as far as clients can tell), and wait
        until the process has exited: a later :meth:`spawn` or a server's ``start()`` would
        otherwise see it still running and start nothing. A killed process can take seconds
        to go (its memory is freed on exit; a soak saw a 1 GB redis-server outlive a 5 s wait
        on a loaded 2-core machine, and its "restart" then started nothing).

        Raises :class:`RuntimeError` naming the process if it is still there after ``wait_s``.
        """
        if self._proc is None:
            return
        self._signal(signal.SIGKILL)
        try:
            self._proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"pid {self._proc.pid} still running {wait_s:g} s after SIGKILL") from None
        finally:
            self._paused = False
        _LIVE.discard(self)


def launch(
    what: str, argv: Sequence[str], *, log: Path, cwd: Path, ready: Callable[[], bool], timeout_s: float,
    hint: Callable[[str], str] | None = None,
) -> ManagedProcess:
    """Spawn ``argv`` and wait until ``ready()`` (or it exits): the running process, or
    :class:`StoreStartError` quoting the log's tail (and ``hint(tail)``, when given)."""
    proc = ManagedProcess(log)
    proc.spawn(argv, cwd=cwd)
    try:
        wait_until(lambda: not proc.running() or ready(), timeout_s, what)
    except StoreStartError as exc:
        proc.kill()
        raise StoreStartError(f"{exc}; log tail:\n{proc.log_tail()}") from None
    if not proc.running():
        tail = proc.log_tail()
        extra = hint(tail) if hint is not None else ""
        raise StoreStartError(f"{what} exited with status {proc.exit_code()}; {extra}log tail:\n{tail}")
    return proc


_S = TypeVar("_S", bound="StoreServer")


class StoreServer:
    """The life cycle every store launcher shares, over the processes it runs.

    Subclasses implement :meth:`start` (creating the private directory with
    :meth:`_make_directory`) and :meth:`_processes` (in the order they are stopped)."""

    #: seconds a process gets to exit after SIGTERM before SIGKILL
    stop_grace_s = 5.0

    def __init__(self) -> None:
        self._dir: Path | None = None
        self._cleanup: weakref.finalize[Any, Any] | None = None

    def start(self: _S) -> _S:
        raise NotImplementedError

    def _processes(self) -> list[ManagedProcess]:
        raise NotImplementedError

    def _make_directory(self, prefix: str) -> Path:
        """The server's private directory (mode 0700), removed by :meth:`close` or at exit."""
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix=prefix))
            self._cleanup = weakref.finalize(self, shutil.rmtree, str(self._dir), True)
        return self._dir

    def stop(self) -> None:
        """End every process (SIGTERM, SIGKILL after a grace period). Every value is lost."""
        for proc in self._processes():
            proc.stop(grace_s=self.stop_grace_s)

    def kill(self) -> None:
        """SIGKILL every process: a crash, as clients see it."""
        for proc in self._processes():
            proc.kill()

    def pause(self) -> None:
        """SIGSTOP every process: a stalled store. Connections stay open and new ones complete
        (the kernel accepts them), but nothing is answered until :meth:`resume`."""
        for proc in self._processes():
            proc.pause()

    def resume(self) -> None:
        """SIGCONT whatever :meth:`pause` stopped."""
        for proc in self._processes():
            proc.resume()

    def restart(self) -> None:
        """Stop (if running) and start again on the same ports with the same config, empty."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop everything and remove the directory. Idempotent."""
        self.stop()
        if self._cleanup is not None:
            self._cleanup()
        self._dir = None

    def __enter__(self: _S) -> _S:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
