# SPDX-License-Identifier: Apache-2.0
"""``vllm serve`` (the OpenAI server module) with the connector, over HTTP on 127.0.0.1.

The same requests go to a server with ``--kv-transfer-config`` and to one without; the
completions must be identical, and the connector's server must report pool hits and bytes
on ``/metrics``.
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
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from tests.remote_common import store_unavailable
from conftest import KV_CACHE_BYTES, documents

pytestmark = pytest.mark.vllm

CONNECTOR = {
    "kv_connector": "KVOffloadConnector",
    "kv_connector_module_path": "kv_offload.vllm",
    "kv_role": "kv_both",
    "kv_connector_extra_config": {"cpu_bytes": "64MiB"},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, model: Path, log: Path, kv_transfer_config: dict[str, Any] | None) -> None:
        self.model = str(model)
        self.port = _free_port()
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
            "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32",
            "--max-model-len", "1024", "--enforce-eager", "--seed", "0",
            "--kv-cache-memory-bytes", str(KV_CACHE_BYTES),
        ]  # fmt: skip
        if kv_transfer_config is not None:
            cmd += ["--kv-transfer-config", json.dumps(kv_transfer_config)]
        self.log = log
        self._log_file = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._log_file, stderr=subprocess.STDOUT, env=dict(os.environ))
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(self.url("/v1/models"), timeout=2)
                return
            except OSError:
                time.sleep(1)
        self.stop()
        raise RuntimeError(f"server not ready in time:\n{log.read_text()[-3000:]}")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def complete(self, prompt: Any, max_tokens: int = 8) -> dict[str, Any]:
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
        req = urllib.request.Request(
            self.url("/v1/completions"), data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=120) as resp:
            result: dict[str, Any] = json.load(resp)
        return result

    def metrics(self) -> dict[str, float]:
        """``kv_offload:`` samples summed by name, and by name and tier or direction as ``name{value}``."""
        text = urllib.request.urlopen(self.url("/metrics"), timeout=10).read().decode()
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("kv_offload:") and not line.startswith("#"):
                name_labels, value = line.rsplit(" ", 1)
                name = name_labels.split("{", 1)[0]
                values[name] = values.get(name, 0.0) + float(value)
                for label in ("tier", "direction"):
                    if f'{label}="' in name_labels:
                        which = name_labels.split(f'{label}="', 1)[1].split('"', 1)[0]
                        key = f"{name}{{{which}}}"
                        values[key] = values.get(key, 0.0) + float(value)
        return values

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()


def _workload(server: Server) -> dict[str, Any]:
    docs = documents(4, 640)
    text_doc = " ".join(f"Section {i}: the pool keeps block {i * 7} warm for the next request." for i in range(30))  # ~700 tokens
    out: dict[str, Any] = {"sequential": []}
    for turn in range(2):
        for doc in docs:
            res = server.complete(doc + [10 + turn, 11])
            out["sequential"].append(res["choices"][0]["text"])
        res = server.complete(text_doc + f" Question {turn}: what does the pool keep?")
        out["sequential"].append(res["choices"][0]["text"])
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda d: server.complete(d + [12], max_tokens=32), docs))
    out["concurrent"] = [r["choices"][0]["text"] for r in results]
    return out


def _serve(model: Path, log: Path, cfg: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, float]]:
    server = Server(model, log, cfg)
    try:
        out = _workload(server)
        time.sleep(1.5)  # let the last steps' stats reach the front-end
        return out, server.metrics()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def served(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from kv_offload.testing.redis_server import RedisServer
    from kv_offload.testing.store_process import StoreStartError

    logs = tmp_path_factory.mktemp("server-logs")
    try:
        store = RedisServer(password="").start()
    except StoreStartError as exc:
        store_unavailable(str(exc))
        raise
    # The connector's server has a disk tier and a remote tier too: every stored block is
    # written through to both.
    extra = {**CONNECTOR["kv_connector_extra_config"], "disk": {"path": str(logs / "disk"), "bytes": "256MiB"},
             "remote": {"url": store.url}}  # fmt: skip
    try:
        with_conn, metrics = _serve(tiny_model, logs / "with.log", {**CONNECTOR, "kv_connector_extra_config": extra})
    finally:
        store.close()
    without, _ = _serve(tiny_model, logs / "without.log", None)
    yield {"with": with_conn, "without": without, "metrics": metrics}


def test_server_outputs_identical_to_no_connector(served: dict[str, Any]) -> None:
    assert served["with"]["sequential"] == served["without"]["sequential"]
    assert served["with"]["concurrent"] == served["without"]["concurrent"]
    assert len(set(served["with"]["sequential"])) > 3, "outputs should vary between prompts"


def test_server_metrics_show_pool_hits_and_bytes(served: dict[str, Any]) -> None:
    m = served["metrics"]
    assert m.get("kv_offload:hit_tokens_total", 0) >= 4 * 640 - 4 * 128
    assert m.get("kv_offload:loaded_bytes_total", 0) > 0
    assert m.get("kv_offload:stored_bytes_total", 0) > 0
    assert m.get("kv_offload:pool_capacity_blocks", 0) > 0
    assert m.get("kv_offload:transfer_throughput_gbps_count", 0) > 0
    assert m.get("kv_offload:failed_transfers_total", -1) == 0


def test_server_metrics_are_labelled_by_tier(served: dict[str, Any]) -> None:
    m = served["metrics"]
    # Every hit of this workload comes from DRAM (the pool holds it all); the disk got a copy.
    assert m.get("kv_offload:tier_hit_tokens_total{dram}", 0) == m.get("kv_offload:hit_tokens_total", -1) > 0
    assert m.get("kv_offload:tier_hit_tokens_total{disk}", -1) == 0
    assert m.get("kv_offload:tier_written_bytes_total{dram}", 0) == m.get("kv_offload:stored_bytes_total", -1)
    assert m.get("kv_offload:tier_written_bytes_total{disk}", 0) > 0, "stores were not written through"
    assert m.get("kv_offload:written_back_blocks_total", 0) > 0
    assert m.get("kv_offload:tier_capacity_blocks{disk}", 0) > 0 and m.get("kv_offload:tier_used_blocks{disk}", 0) > 0
    assert m.get("kv_offload:tier_capacity_blocks{dram}", 0) == m.get("kv_offload:pool_capacity_blocks", -1)
    assert m.get("kv_offload:tier_corrupt_blocks_total{disk}", -1) == 0
    assert m.get("kv_offload:transfer_throughput_gbps_count{writeback}", 0) > 0  # disk write throughput
    # The remote tier: connected, written through, every lookup timed, nothing failed.
    assert m.get("kv_offload:tier_written_bytes_total{remote}", 0) > 0, "stores were not written to the store"
    assert m.get("kv_offload:tier_connected{remote}", 0) == 1
    assert m.get("kv_offload:tier_lookup_seconds_count{remote}", 0) > 0
    assert m.get("kv_offload:tier_throughput_gbps_count{remote}", 0) > 0
    assert m.get("kv_offload:tier_hit_tokens_total{remote}", -1) == 0  # the pool held it all
    for name in ("tier_corrupt_blocks_total", "tier_errors_total", "tier_failed_writebacks_total"):
        assert m.get(f"kv_offload:{name}{{remote}}", -1) == 0, name
