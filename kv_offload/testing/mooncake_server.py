# SPDX-License-Identifier: Apache-2.0
"""A real, private Mooncake Store (master + a store process) for tests, the demo and benchmarks.

Mooncake Store keeps values in memory *segments* that client processes mount; the master
(``mooncake_master``) only keeps metadata. A value therefore lives exactly as long as the
process whose segment holds it: a vLLM instance that mounted memory itself (the adapter's
``global_segment_size`` > 0) takes its values with it when it exits. Values shared across
instances need a process that only serves memory. :class:`MooncakeServer` runs both:

* ``mooncake_master`` with its RPC server and its metrics/admin HTTP server on 127.0.0.1,
  on free ports, and the HTTP metadata server off (clients use ``P2PHANDSHAKE``);
* ``mooncake_client`` (the wheel's standalone store process) that mounts ``segment_bytes``
  of memory, so values outlive the clients that wrote them.

Both binaries come with the ``mooncake-transfer-engine-non-cuda`` (or
``mooncake-transfer-engine``) wheel and link ``libibverbs.so.1`` (Debian: ``apt-get install
libibverbs1``), also for TCP.

What binds where (``ss -ltnp``): the master's RPC and metrics ports, and the store process's
own service port, are on 127.0.0.1. The store process's transfer engine (its P2P handshake
port and its TCP data port, both picked at random, by default in 12000-17000 /
``MC_MIN_RPC_PORT``-``MC_MAX_RPC_PORT``) listens on *all* interfaces: Mooncake 0.3.13 binds
them to INADDR_ANY / in6addr_any with no option to narrow it (``MC_TCP_BIND_ADDRESS`` only
changes the address advertised). Every Mooncake client process, the adapter's included, opens
the same two ports. Mooncake has no authentication: run it on an isolated network.

Faults a deployment meets: :meth:`kill` (SIGKILL of master and store process: every value is
lost), :meth:`pause` / :meth:`resume` (SIGSTOP / SIGCONT of both: a stalled store; a pause
longer than ``client_ttl_s`` makes the master drop the store process's segment, and with it
every value, once it runs again), :meth:`restart` (same ports, empty).

``python -m kv_offload.testing.mooncake_server`` runs one in the foreground and prints its URL.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import socket
import time
from pathlib import Path

from kv_offload.testing.store_process import ManagedProcess, StoreServer, StoreStartError, free_port, launch

__all__ = ["MooncakeServer", "StoreStartError"]

_PIP_HINT = "pip install mooncake-transfer-engine-non-cuda (mooncake-transfer-engine on CUDA machines)"
_VERBS_HINT = "Mooncake needs libibverbs.so.1, also for TCP (on Debian/Ubuntu: apt-get install libibverbs1)"


def _binary(name: str) -> str:
    """The path of a Mooncake program: the one inside the installed ``mooncake`` package (the
    console scripts of the same name only re-exec it), else one on PATH."""
    try:
        spec = importlib.util.find_spec("mooncake")
    except (ImportError, ValueError):
        spec = None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / name
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which(name)
    if found is None:
        raise StoreStartError(f"{name} is not installed: {_PIP_HINT}")
    return found


def _answers(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    with socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True


class MooncakeServer(StoreServer):
    """A ``mooncake_master`` and a store process on 127.0.0.1 (see the module docstring).

    Args:
        segment_bytes: memory the store process mounts (0: no store process; values then
            live only in the segments clients mount themselves).
        port: the master's RPC port (None: a free one); all ports are kept across
            :meth:`restart`.
        client_ttl_s: seconds the master keeps a silent client's segment (Mooncake's default
            is 10); a store process paused longer loses its values.
        start_timeout_s: how long :meth:`start` waits for each process to answer.
    """

    stop_grace_s = 3.0

    def __init__(
        self,
        *,
        segment_bytes: int = 256 << 20,
        port: int | None = None,
        client_ttl_s: int = 10,
        start_timeout_s: float = 15.0,
    ) -> None:
        super().__init__()
        if segment_bytes < 0:
            raise ValueError(f"segment_bytes must be >= 0, got {segment_bytes}")
        if client_ttl_s < 1:
            raise ValueError(f"client_ttl_s must be >= 1, got {client_ttl_s}")
        self.segment_bytes = segment_bytes
        self.client_ttl_s = client_ttl_s
        self.start_timeout_s = start_timeout_s
        self._port = port
        self._metrics_port: int | None = None
        self._store_port: int | None = None
        self._master: ManagedProcess | None = None
        self._store: ManagedProcess | None = None

    # -- what a client needs ------------------------------------------------------------

    @property
    def port(self) -> int:
        """The master's RPC port."""
        if self._port is None:
            raise RuntimeError("the server has no port yet: call start() first")
        return self._port

    @property
    def url(self) -> str:
        """``mooncake://127.0.0.1:PORT``: the master's RPC address (Mooncake has no credentials)."""
        return f"mooncake://127.0.0.1:{self.port}"

    @property
    def directory(self) -> Path:
        if self._dir is None:
            raise RuntimeError("the server has no directory yet: call start() first")
        return self._dir

    @property
    def master_log(self) -> Path:
        return self.directory / "master.log"

    @property
    def store_log(self) -> Path:
        return self.directory / "store.log"

    @property
    def master_pid(self) -> int | None:
        return self._master.pid if self._master is not None and self._master.running() else None

    @property
    def store_pid(self) -> int | None:
        return self._store.pid if self._store is not None and self._store.running() else None

    def running(self) -> bool:
        """Whether the master (and the store process, if any) is running."""
        master = self._master is not None and self._master.running()
        return master and (self.segment_bytes == 0 or (self._store is not None and self._store.running()))

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> MooncakeServer:
        """Start the master, then the store process, each waited for until it answers;
        :class:`StoreStartError` (with the log's tail) when either cannot start."""
        if self.running():
            return self
        master_bin = _binary("mooncake_master")
        store_bin = _binary("mooncake_client") if self.segment_bytes else ""
        self._make_directory("kvo-mooncake-")
        if self._port is None:
            self._port = free_port()
        if self._metrics_port is None:
            self._metrics_port = free_port()
        if self._store_port is None:
            self._store_port = free_port()
        self.stop()  # whatever is left of an earlier start
        self._master = self._launch(
            "mooncake_master", master_bin, self.master_log, self._port,
            ["--rpc_address=127.0.0.1", f"--rpc_port={self._port}",
             "--metrics_host=127.0.0.1", f"--metrics_port={self._metrics_port}",
             "--enable_http_metadata_server=false", f"--client_ttl={self.client_ttl_s}",
             "--enable_metric_reporting=false", "--logtostderr"],
        )  # fmt: skip
        if self.segment_bytes:
            try:
                self._store = self._launch(
                    "mooncake_client (store process)", store_bin, self.store_log, self._store_port,
                    ["--host=127.0.0.1", f"--port={self._store_port}", f"--master_server_address=127.0.0.1:{self._port}",
                     "--metadata_server=P2PHANDSHAKE", f"--global_segment_size={self.segment_bytes}",
                     "--local_buffer_size=0", "--protocol=tcp", "--threads=1", "--logtostderr"],
                )  # fmt: skip
            except StoreStartError:
                self._master.kill()
                raise
        return self

    def _launch(self, what: str, binary: str, log: Path, port: int, args: list[str]) -> ManagedProcess:
        return launch(
            f"{what} on 127.0.0.1:{port}", [binary, *args], log=log, cwd=self.directory, ready=lambda: _answers(port),
            timeout_s=self.start_timeout_s, hint=lambda tail: f"{_VERBS_HINT}; " if "libibverbs" in tail else "",
        )  # fmt: skip

    def _processes(self) -> list[ManagedProcess]:
        return [p for p in (self._store, self._master) if p is not None]

    def kill_master(self) -> None:
        """SIGKILL the master only (the store process keeps its memory and re-registers with
        a master that comes back, but the new master knows no values)."""
        if self._master is not None:
            self._master.kill()

    def pause(self, *, master: bool = True, store: bool = True) -> None:
        """SIGSTOP master and store process (or one of them): a stalled store. Connections stay
        open and new ones complete (the kernel accepts them), but nothing is answered until
        :meth:`resume`. Only the store process paused: metadata RPCs work, transfers stall."""
        for proc, chosen in ((self._master, master), (self._store, store)):
            if proc is not None and chosen:
                proc.pause()

    def __repr__(self) -> str:
        state = "running" if self.running() else "stopped"
        where = self.url if self._port is not None else "no port yet"
        return f"MooncakeServer({where}, segment_bytes={self.segment_bytes}, {state})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kv_offload.testing.mooncake_server",
                                     description="Run a private Mooncake master and store process in the foreground"
                                                 " (Ctrl-C stops them).")  # fmt: skip
    parser.add_argument("--port", type=int, default=None, help="the master's RPC port (default: a free one)")
    parser.add_argument("--segment-mib", type=int, default=1024, help="memory the store process serves (MiB, default 1024)")
    parser.add_argument("--client-ttl", type=int, default=10, help="seconds before the master drops a silent client")
    args = parser.parse_args(argv)
    server = MooncakeServer(segment_bytes=args.segment_mib << 20, port=args.port, client_ttl_s=args.client_ttl)
    try:
        server.start()
    except StoreStartError as exc:
        raise SystemExit(f"error: {exc}") from None
    try:
        print(server.url, flush=True)
        print(f"logs: {server.master_log} {server.store_log}", flush=True)
        signal.signal(signal.SIGTERM, _interrupt)
        while server.running():
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    main()
