# SPDX-License-Identifier: Apache-2.0
"""The remote tier on real vLLM and real stores (Redis with TLS and an ACL user; Mooncake
Store), one engine per process (``remote_child.py``), fp32 greedy, outputs compared with
vLLM alone.

Per store: (a) two vLLM instances, two processes and no shared disk: the second serves the
documents the first computed; (b) the store killed mid-run: every request completes with the
right tokens, and hits resume once it is back, with no restart; (c) the store stalled
(SIGSTOP): requests complete, and neither a scheduler step nor a worker-side connector hook
waits past the lookup budget; (d) values
overwritten through the store's own client: outputs as recompute, corruptions counted.
Redis also: (e) a wrong password is a start-up warning, never a crash.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import BLOCK, documents

from kv_offload.testing.store_process import StoreStartError
from tests.remote_common import store_unavailable

pytestmark = pytest.mark.vllm

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "remote_child.py")
DOCS = documents(3, 600, seed=33)
FULL = (600 // BLOCK) * BLOCK  # tokens of each document in full blocks
BUDGET_MS = 300


def turn(q: int) -> list[list[int]]:
    return [d + [40 + q, 41] for d in DOCS]


#: the environment variable the tests pass the store's password in (vLLM prints its whole
#: kv-transfer-config at start-up, so a password in the URL would be in its log)
PASSWORD_ENV = "KVO_TEST_REMOTE_PASSWORD"


def child(spec: dict[str, Any], wait: bool = True, password: str = "") -> Any:
    cmd = [sys.executable, CHILD, json.dumps(spec)]
    env = dict(os.environ, **{PASSWORD_ENV: password})
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    return finish(proc) if wait else proc


def finish(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=600)
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"child failed ({proc.returncode}):\n{out[-4000:]}"
    result = json.loads(lines[-1][len("RESULT ") :])
    result["log"] = out
    return result  # type: ignore[no-any-return]


def await_file(path: Path, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 300
    while not path.exists():
        assert proc.poll() is None, f"child exited early:\n{proc.communicate()[0][-4000:]}"
        assert time.monotonic() < deadline, f"child never reached {path.name}"
        time.sleep(0.05)


def tokens(phase: dict[str, Any]) -> list[list[int]]:
    return [t for t, _ in phase["outputs"]]


def cached(phase: dict[str, Any]) -> list[int]:
    return [c for _, c in phase["outputs"]]


class Store:
    """A real store for one test module: started, killed, paused, tampered with."""

    def __init__(self, kind: str, tmp: Path) -> None:
        self.kind = kind
        self.tmp = tmp
        if kind == "redis":
            from kv_offload.testing.redis_server import RedisServer

            # TLS with a self-signed CA and an ACL user: the set-up an operator runs.
            self.server: Any = RedisServer(tls=True, user="kvo")
        else:
            from kv_offload.testing.mooncake_server import MooncakeServer

            self.server = MooncakeServer()
        self.server.start()

    @property
    def password(self) -> str:
        return str(self.server.user_password) if self.kind == "redis" else ""

    def remote(self, **extra: Any) -> dict[str, Any]:
        section: dict[str, Any] = {"url": self.server.url, "lookup_budget_ms": BUDGET_MS, "timeout_ms": 1000,
                                   "reconnect_max_s": 1}  # fmt: skip
        if self.kind == "redis":
            # The ACL user in the URL, its password from the environment.
            section["url"] = f"rediss://{self.server.user}@127.0.0.1:{self.server.port}/0"
            section["password_env"] = PASSWORD_ENV
            section["tls_ca_file"] = str(self.server.ca_file)
        section.update(extra)
        return section

    def tamper(self, names: list[str], prefix: str = "kvo:") -> int:
        """Overwrite every value of the tier (Redis: every key under ``prefix``; Mooncake,
        which cannot list keys: ``names``) with bytes of the same length, one byte flipped,
        through the store's own client; returns how many."""
        if self.kind == "redis":
            import redis

            r = redis.Redis.from_url(self.server.url, ssl_ca_certs=str(self.server.ca_file))
            names = list(r.scan_iter(match=f"{prefix}*", count=1000))
            for name in names:
                value = bytearray(r.get(name))
                value[len(value) // 2] ^= 0x5A  # one byte of the body
                r.set(name, bytes(value))
            r.close()
            return len(names)
        from kv_offload.tiers.remote.mooncake_store import MooncakeStore

        # get and put of bytes go through the client's own buffer, which is off by default
        adapter = MooncakeStore(self.server.url, MooncakeStore.check_options({"local_buffer_size": "64MiB"}), timeout_s=5.0)
        client = adapter._client.handle  # Mooncake's own MooncakeDistributedStore
        done = 0
        for name in names:
            value = bytearray(client.get(name))
            if not value:
                continue
            value[len(value) // 2] ^= 0x5A
            assert client.remove(name, True) == 0
            assert client.put(name, bytes(value)) == 0
            done += 1
        adapter.close()
        return done

    def close(self) -> None:
        self.server.close()


@pytest.fixture(scope="module")
def baseline(tiny_model: Path) -> dict[str, Any]:
    spec = {"model": str(tiny_model), "max_tokens": 8, "remote": None,
            "phases": [{"prompts": sum((turn(q) for q in range(7)), [])}]}  # fmt: skip
    (phase,) = child(spec)["phases"]
    outs = tokens(phase)
    return {q: outs[3 * q : 3 * q + 3] for q in range(7)}


@pytest.fixture(scope="module", params=["redis", "mooncake"])
def store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    try:
        s = Store(request.param, tmp_path_factory.mktemp(request.param))
    except (StoreStartError, ImportError) as exc:
        store_unavailable(f"{request.param}: {exc}")
        raise
    try:
        yield s
    finally:
        s.close()


def remote_cli(store: Store, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m kv_offload remote ...`` on the test's store, configured as the connector is."""
    cmd = [sys.executable, "-m", "kv_offload", "remote", *args, "--remote", json.dumps(store.remote())]
    env = dict(os.environ, **{PASSWORD_ENV: store.password})
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120, env=env)


def check_label(store: Store, namespace: str, model: Path) -> None:
    """The writer labelled its namespace in the store with what it holds; the CLI shows it."""
    shown = remote_cli(store, "show", "--namespace", namespace)
    assert shown.returncode == 0, shown.stderr
    label = json.loads(shown.stdout)
    assert (label["page_format"], label["kv_dtype"], label["block_size"], label["rank"]) == ("CPU", "float32", BLOCK, 0)
    assert label["rank_digest"] == namespace and label["model"].rstrip("/").endswith(model.name), label
    listed = remote_cli(store, "list")
    if store.kind == "redis":
        assert listed.returncode == 0, listed.stderr
        (row,) = [ln for ln in listed.stdout.splitlines() if ln.startswith(namespace)]
        assert f"CPU, float32, {BLOCK}-token blocks, rank 0, {model.name}" in row, listed.stdout
    else:  # Mooncake Store cannot list its keys: a clear error, and show works
        assert listed.returncode == 2 and "cannot list" in listed.stderr, (listed.returncode, listed.stderr)


def test_a_second_instance_serves_what_the_first_computed_through_faults(
    store: Store, baseline: dict[str, Any], tiny_model: Path, tmp_path: Path
) -> None:
    base = {"model": str(tiny_model), "max_tokens": 8, "remote": store.remote()}
    # (a) the first instance computes the documents and writes them to the store.
    first_run = child({**base, "phases": [{"prompts": turn(0)}]}, password=store.password)
    first = first_run["phases"][0]
    assert tokens(first) == baseline[0]
    assert first["totals"]["remote_written_bytes"] > 0
    written = first["totals"]["written_back_blocks"]
    assert written >= 3 * (FULL // BLOCK), first["totals"]
    check_label(store, first_run["remote_namespace"], tiny_model)
    # ... and says where (what `remote show` needs on a store that cannot list its keys).
    assert f"rank 0's lower-tier namespace {first_run['remote_namespace']}" in first_run["log"]

    killed, back, stalled = (tmp_path / n for n in ("killed", "back", "stalled"))
    proc = child({**base, "phases": [
        {"prompts": turn(1), "then": str(killed)},
        {"prompts": turn(2), "reset": True, "then": str(back)},
        {"prompts": turn(3), "reset": True},
        {"prompts": turn(4), "reset": True, "then": str(stalled)},
        {"prompts": turn(5), "reset": True, "timed": True},
    ]}, wait=False, password=store.password)  # fmt: skip
    await_file(killed, proc)
    store.server.kill()
    Path(f"{killed}.go").touch()
    await_file(back, proc)
    store.server.restart()  # an empty store: what the second instance writes from now on
    time.sleep(2.5)  # the tiers reconnect within one backoff period (reconnect_max_s = 1)
    Path(f"{back}.go").touch()
    await_file(stalled, proc)
    store.server.pause()
    Path(f"{stalled}.go").touch()
    try:
        result = finish(proc)
    finally:
        store.server.resume()
    a, down, refill, resumed, slow = result["phases"]

    # (a) another process, no shared disk: every full block of every document from the store.
    assert tokens(a) == baseline[1], "outputs differ from vLLM alone"
    assert all(c >= FULL for c in cached(a)), cached(a)
    assert a["totals"]["remote_hit_tokens"] >= 3 * FULL

    # (b) the store killed: every request completes, recomputed, with vLLM's tokens ...
    assert tokens(down) == baseline[2]
    assert down["totals"].get("remote_read_bytes", 0) == 0
    # ... and once it is back, this instance writes again, and hits resume without a restart.
    assert tokens(refill) == baseline[3]
    assert tokens(resumed) == baseline[4]
    assert resumed["totals"]["remote_hit_tokens"] >= 3 * FULL, resumed["totals"]
    assert "unavailable" in result["log"] and "is back" in result["log"]
    remote_stats = result["tier_stats"]["remote"]
    assert remote_stats["reconnects"] >= 1 and remote_stats["errors"] >= 1

    # (c) the store stalled: requests complete, no scheduler step waits past the budget.
    assert tokens(slow) == baseline[5]
    assert slow["max_step_s"] < BUDGET_MS / 1000, slow["max_step_s"]
    assert slow["max_hook_s"] < BUDGET_MS / 1000, slow["max_hook_s"]  # nor any worker-side hook
    if store.kind == "redis":  # no credential in any log line, vLLM's included
        assert store.server.user_password not in result["log"] and store.server.password not in result["log"]


def test_tampered_values_are_misses_and_outputs_match_recompute(
    store: Store, baseline: dict[str, Any], tiny_model: Path
) -> None:
    if not store.server.running():  # a test before this one failed between kill and restart
        store.server.restart()
    # A prefix of its own: the writer finds nothing from the other test and writes it all.
    base = {"model": str(tiny_model), "max_tokens": 8, "remote": store.remote(prefix="tamper:")}
    writer = child({**base, "phases": [{"prompts": turn(0)}]}, password=store.password)
    assert len(writer["remote_names"]) >= 3 * (FULL // BLOCK)
    tampered = store.tamper(writer["remote_names"], prefix="tamper:")
    assert tampered >= 3 * (FULL // BLOCK)
    result = child({**base, "phases": [{"prompts": turn(6)}]}, password=store.password)
    (phase,) = result["phases"]
    assert tokens(phase) == baseline[6], "a tampered block changed the output"
    assert phase["totals"].get("promoted_blocks", 0) == 0, "a tampered block was loaded"
    assert result["tier_stats"]["remote"]["corruptions"] >= 1
    assert "rejected" in result["log"]


def test_a_wrong_redis_password_is_a_warning_not_a_crash(
    baseline: dict[str, Any], tiny_model: Path
) -> None:
    from kv_offload.testing.redis_server import RedisServer

    try:
        server = RedisServer(password="right-password-123").start()
    except StoreStartError as exc:
        store_unavailable(str(exc))
        raise
    try:
        remote = {"url": f"redis://127.0.0.1:{server.port}/0", "password_env": PASSWORD_ENV}
        result = child({"model": str(tiny_model), "max_tokens": 8, "remote": remote,
                        "phases": [{"prompts": turn(0)}]}, password="wrong-password-456")  # fmt: skip
    finally:
        server.close()
    (phase,) = result["phases"]
    assert tokens(phase) == baseline[0]
    lines = [ln for ln in result["log"].splitlines() if "remote store" in ln and "unavailable" in ln]
    assert lines and any("auth" in ln.lower() or "password" in ln.lower() for ln in lines), lines
    assert "wrong-password-456" not in result["log"]
