# SPDX-License-Identifier: Apache-2.0
"""The Redis adapter (RedisStore) against a real redis-server, no mocks.

Each server is a private ``redis-server`` on 127.0.0.1 (kv_offload.testing.redis_server). What
is checked: exact bytes through the two-part put/get for block sizes from 4 KiB to 4 MiB,
the wrong-length rule of ``get`` (length reported, buffers untouched), TTLs, passwords, ACL
users and TLS (right credentials work; wrong ones fail with a message that says why and
holds no secret), the faults (killed, stalled, restarted: StoreUnavailable within the
timeout, never a hang; the same adapter works again once the server is back), refused
writes under ``maxmemory``/``noeviction`` as per-key results, and option checking.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kv_offload.config import ConfigError, RemoteConfig
from kv_offload.testing.redis_server import RedisServer
from kv_offload.testing.store_process import StoreStartError
from kv_offload.tiers.remote.redis_store import RedisStore
from kv_offload.tiers.remote.store import MISSING, StoreUnavailable
from tests.remote_common import store_unavailable

HEADER = 32
TIMEOUT_S = 0.5


def _start(**kwargs: Any) -> RedisServer:
    try:
        return RedisServer(**kwargs).start()
    except StoreStartError as exc:
        store_unavailable(str(exc))
        raise


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    srv = _start()
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture
def own_server() -> Iterator[RedisServer]:
    """A server of the test's own, for tests that kill, stall or restart it."""
    srv = _start()
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture
def store(server: RedisServer) -> Iterator[RedisStore]:
    st = RedisStore(server.url, {}, timeout_s=TIMEOUT_S)
    try:
        yield st
    finally:
        st.close()


def _keys(n: int) -> list[str]:
    tag = uuid.uuid4().hex
    return [f"test:{tag}:{i}" for i in range(n)]


def _values(n: int, body_bytes: int, header_bytes: int = HEADER) -> list[tuple[memoryview, memoryview]]:
    return [(memoryview(bytearray(os.urandom(header_bytes))), memoryview(bytearray(os.urandom(body_bytes)))) for _ in range(n)]


def _buffers(n: int, body_bytes: int, header_bytes: int = HEADER, fill: int = 0xAB) -> list[tuple[memoryview, memoryview]]:
    return [(memoryview(bytearray([fill]) * header_bytes), memoryview(bytearray([fill]) * body_bytes)) for _ in range(n)]


def _fails_within(limit_s: float, op: Any) -> tuple[StoreUnavailable, float]:
    start = time.monotonic()
    with pytest.raises(StoreUnavailable) as info:
        op()
    elapsed = time.monotonic() - start
    assert elapsed < limit_s, f"took {elapsed:.2f} s"
    return info.value, elapsed


# -- data path --------------------------------------------------------------------------


@pytest.mark.parametrize("body_bytes", [4096, 64 * 1024, 1 << 20, 4 << 20])
def test_round_trip_is_exact(store: RedisStore, body_bytes: int) -> None:
    keys = _keys(3)
    values = _values(3, body_bytes)
    assert store.put(keys, values) == [True] * 3
    into = _buffers(3, body_bytes)
    assert store.get(keys, into) == [HEADER + body_bytes] * 3
    for (h, b), (h2, b2) in zip(values, into):
        assert h2.tobytes() == h.tobytes() and b2.tobytes() == b.tobytes()


def test_body_only_values_and_views_into_one_buffer(store: RedisStore) -> None:
    """The tier's bodies are slices of one pool buffer; an empty header is allowed."""
    pool = bytearray(os.urandom(8 * 4096))
    view = memoryview(pool)
    keys = _keys(8)
    empty = memoryview(b"")
    assert store.put(keys, [(empty, view[i * 4096 : (i + 1) * 4096]) for i in range(8)]) == [True] * 8
    out = bytearray(len(pool))
    into = [(memoryview(bytearray()), memoryview(out)[i * 4096 : (i + 1) * 4096]) for i in range(8)]
    assert store.get(keys, into) == [4096] * 8
    assert out == pool


def test_exists_held_and_missing(store: RedisStore) -> None:
    keys = _keys(4)
    assert store.exists(keys) == [False] * 4
    assert store.put(keys[1:3], _values(2, 100)) == [True, True]
    assert store.exists(keys) == [False, True, True, False]
    assert store.exists([]) == []


def test_missing_key_reads_nothing(store: RedisStore) -> None:
    into = _buffers(1, 64)
    assert store.get(_keys(1), into) == [MISSING]
    assert set(into[0][0].tobytes() + into[0][1].tobytes()) == {0xAB}


@pytest.mark.parametrize("delta", [-1, 1, -HEADER - 10])
def test_wrong_length_is_reported_and_nothing_written(store: RedisStore, delta: int) -> None:
    keys = _keys(1)
    assert store.put(keys, _values(1, 1000)) == [True]
    into = _buffers(1, 1000 + delta)
    assert store.get(keys, into) == [HEADER + 1000]
    assert set(into[0][0].tobytes() + into[0][1].tobytes()) == {0xAB}


def test_remove(store: RedisStore) -> None:
    keys = _keys(3)
    store.put(keys, _values(3, 10))
    store.remove(keys[:2] + _keys(1))  # a key not held is fine
    assert store.exists(keys) == [False, False, True]
    store.remove([])


def test_overwrite_replaces_the_value(store: RedisStore) -> None:
    keys = _keys(1)
    store.put(keys, _values(1, 10))
    new = _values(1, 20)
    assert store.put(keys, new) == [True]
    into = _buffers(1, 20)
    assert store.get(keys, into) == [HEADER + 20]
    assert into[0][1].tobytes() == new[0][1].tobytes()


def test_small_batch_bytes_splits_pipelines_and_keeps_order(server: RedisServer) -> None:
    st = RedisStore(server.url, {"batch_bytes": 4096}, timeout_s=TIMEOUT_S)
    try:
        keys = _keys(20)
        values = _values(20, 3000)
        assert st.put(keys, values) == [True] * 20
        into = _buffers(20, 3000)
        assert st.get(keys, into) == [HEADER + 3000] * 20
        assert [b.tobytes() for _, b in into] == [b.tobytes() for _, b in values]
    finally:
        st.close()


def test_ttl_expires_values(server: RedisServer) -> None:
    st = RedisStore(server.url, {"ttl_s": 1}, timeout_s=TIMEOUT_S)
    try:
        keys = _keys(2)
        assert st.put(keys, _values(2, 100)) == [True, True]
        assert st.exists(keys) == [True, True]
        deadline = time.monotonic() + 3.0
        while st.exists(keys) != [False, False]:
            assert time.monotonic() < deadline, "values did not expire"
            time.sleep(0.1)
    finally:
        st.close()


def test_threads_share_one_store(store: RedisStore) -> None:
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(10):
                keys = _keys(4)
                values = _values(4, 5000)
                assert store.put(keys, values) == [True] * 4
                into = _buffers(4, 5000)
                assert store.get(keys, into) == [HEADER + 5000] * 4
                assert [b.tobytes() for _, b in into] == [b.tobytes() for _, b in values]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_valkey_scheme_speaks_the_same_protocol(server: RedisServer) -> None:
    st = RedisStore(server.url.replace("redis://", "valkey://"), {}, timeout_s=TIMEOUT_S)
    try:
        keys = _keys(1)
        assert st.put(keys, _values(1, 10)) == [True]
    finally:
        st.close()


def test_close_is_idempotent_and_later_calls_fail_cleanly(server: RedisServer) -> None:
    st = RedisStore(server.url, {}, timeout_s=TIMEOUT_S)
    st.close()
    st.close()
    with pytest.raises(StoreUnavailable, match="closed"):
        st.exists(_keys(1))


# -- refused writes -----------------------------------------------------------------------


def test_maxmemory_noeviction_refuses_per_key_without_raising() -> None:
    srv = _start(maxmemory="4mb")
    try:
        st = RedisStore(srv.url, {}, timeout_s=2.0)
        keys = _keys(10)
        done = st.put(keys, _values(10, 1 << 20))
        assert False in done
        assert st.exists(keys) == done  # refused keys were not stored
        assert st.get(keys[:1], _buffers(1, 1)) in ([HEADER + (1 << 20)], [MISSING])  # still usable
        st.close()
    finally:
        srv.close()


# -- credentials and TLS ------------------------------------------------------------------


def test_password_right_wrong_missing_and_override(server: RedisServer) -> None:
    assert server.password
    RedisStore(server.url, {}, timeout_s=TIMEOUT_S).close()
    wrong = "Wr0ng-p4ssw0rd-xyz"
    with pytest.raises(StoreUnavailable) as info:
        RedisStore(server.url, {}, timeout_s=TIMEOUT_S, password=wrong)  # overrides the URL's
    message = str(info.value)
    assert "authentication failed" in message
    assert wrong not in message and server.password not in message
    with pytest.raises(StoreUnavailable) as info:
        RedisStore(server.url.replace(server.password, wrong), {}, timeout_s=TIMEOUT_S)
    assert "authentication failed" in str(info.value) and wrong not in str(info.value)
    with pytest.raises(StoreUnavailable, match="authentication required"):
        RedisStore(f"redis://127.0.0.1:{server.port}/0", {}, timeout_s=TIMEOUT_S)
    # the right password given separately replaces a wrong one in the URL
    RedisStore(server.url.replace(server.password, wrong), {}, timeout_s=TIMEOUT_S, password=server.password).close()


def test_acl_user_in_url_or_option() -> None:
    srv = _start(user="alice")
    try:
        assert srv.user_password
        RedisStore(srv.url, {}, timeout_s=TIMEOUT_S).close()
        bare = f"redis://127.0.0.1:{srv.port}/0"
        RedisStore(bare, {"username": "alice"}, timeout_s=TIMEOUT_S, password=srv.user_password).close()
        with pytest.raises(StoreUnavailable) as info:
            RedisStore(bare, {"username": "bob"}, timeout_s=TIMEOUT_S, password=srv.user_password)
        assert "wrong user or password" in str(info.value) and srv.user_password not in str(info.value)
        with pytest.raises(ConfigError) as cfg:
            RedisStore(srv.url, {"username": "bob"}, timeout_s=TIMEOUT_S)
        assert cfg.value.key == "remote.username"
    finally:
        srv.close()


def test_tls_with_the_ca_works_and_without_it_fails_clearly() -> None:
    srv = _start(tls=True)
    try:
        assert srv.url.startswith("rediss://") and srv.ca_file is not None
        st = RedisStore(srv.url, {"tls_ca_file": str(srv.ca_file)}, timeout_s=TIMEOUT_S)
        keys = _keys(1)
        values = _values(1, 1 << 20)
        assert st.put(keys, values) == [True]
        into = _buffers(1, 1 << 20)
        assert st.get(keys, into) == [HEADER + (1 << 20)]
        assert into[0][1].tobytes() == values[0][1].tobytes()
        st.close()
        error, _ = _fails_within(TIMEOUT_S + 1, lambda: RedisStore(srv.url, {}, timeout_s=TIMEOUT_S))
        assert "TLS" in str(error) and "certificate verify failed" in str(error)
        assert srv.password not in str(error)
        error, _ = _fails_within(TIMEOUT_S + 1, lambda: RedisStore(srv.url.replace("rediss://", "redis://"), {}, timeout_s=TIMEOUT_S))
        assert srv.password not in str(error)
        with pytest.raises(ConfigError) as cfg:  # TLS options on a plain URL are a mistake
            RedisStore(srv.url.replace("rediss://", "redis://"), {"tls_ca_file": str(srv.ca_file)}, timeout_s=TIMEOUT_S)
        assert cfg.value.key == "remote.tls_ca_file"
    finally:
        srv.close()


def test_tls_client_certificate() -> None:
    srv = _start(tls=True, tls_client_certs=True)
    try:
        ca = str(srv.ca_file)
        with pytest.raises(StoreUnavailable, match="TLS handshake failed"):
            RedisStore(srv.url, {"tls_ca_file": ca}, timeout_s=TIMEOUT_S)
        opts = {"tls_ca_file": ca, "tls_cert_file": str(srv.client_cert_file), "tls_key_file": str(srv.client_key_file)}
        RedisStore(srv.url, opts, timeout_s=TIMEOUT_S).close()
    finally:
        srv.close()


# -- faults -------------------------------------------------------------------------------


def test_nothing_listening_fails_at_once() -> None:
    from kv_offload.testing.store_process import free_port

    error, _ = _fails_within(TIMEOUT_S + 1, lambda: RedisStore(f"redis://:pw@127.0.0.1:{free_port()}/0", {}, timeout_s=TIMEOUT_S))
    assert "cannot connect" in str(error) and "pw@" not in str(error)


def test_killed_server_fails_fast_and_the_same_store_works_after_restart(own_server: RedisServer) -> None:
    st = RedisStore(own_server.url, {}, timeout_s=TIMEOUT_S)
    keys = _keys(2)
    assert st.put(keys, _values(2, 4096)) == [True, True]
    own_server.kill()
    for op in (lambda: st.exists(keys), lambda: st.put(keys, _values(2, 10)), lambda: st.get(keys, _buffers(2, 10)), lambda: st.remove(keys)):
        error, _ = _fails_within(TIMEOUT_S + 1, op)
        assert own_server.password not in str(error)
    with pytest.raises(StoreUnavailable, match="cannot connect"):
        RedisStore(own_server.url, {}, timeout_s=TIMEOUT_S)
    own_server.restart()  # same port, no persistence: the data is gone
    # Documented behaviour: the same adapter reconnects by itself (stale pooled connections
    # are replaced); the tier above makes a new adapter anyway.
    assert st.exists(keys) == [False, False]
    assert st.put(keys, _values(2, 10)) == [True, True]
    st.close()
    fresh = RedisStore(own_server.url, {}, timeout_s=TIMEOUT_S)
    assert fresh.exists(keys) == [True, True]
    fresh.close()


def test_stalled_server_fails_within_the_timeout_then_recovers(own_server: RedisServer) -> None:
    st = RedisStore(own_server.url, {}, timeout_s=TIMEOUT_S)
    keys = _keys(2)
    assert st.put(keys, _values(2, 4096)) == [True, True]
    own_server.pause()
    try:
        _, elapsed = _fails_within(TIMEOUT_S * 3, lambda: st.exists(keys))
        assert elapsed >= TIMEOUT_S * 0.8
        error, _ = _fails_within(TIMEOUT_S * 3, lambda: st.get(keys, _buffers(2, 4096)))
        assert "no answer within" in str(error)
        # a large put into a stalled server also gives up (the send blocks once buffers fill)
        _fails_within(TIMEOUT_S * 3, lambda: st.put(_keys(16), _values(16, 1 << 20, 0)))
        # connecting to it also times out (the kernel accepts, the server never answers)
        _fails_within(TIMEOUT_S * 3, lambda: RedisStore(own_server.url, {}, timeout_s=TIMEOUT_S))
    finally:
        own_server.resume()
    assert st.exists(keys) == [True, True]  # the same adapter works again
    st.close()


# -- options and URLs ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("ttl_s", -1),
        ("ttl_s", "10"),
        ("ttl_s", True),
        ("max_connections", 0),
        ("batch_bytes", "lots"),
        ("batch_bytes", 100),
        ("tls_verify_hostname", "yes"),
        ("tls_ca_file", "/nonexistent/ca.pem"),
        ("tls_cert_file", ""),
        ("username", "has space"),
        ("username", 7),
    ],
)
def test_bad_options_name_their_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        RedisStore.check_options({key: value})
    assert info.value.key == f"remote.{key}"
    with pytest.raises(ConfigError) as info:  # the same through the config section
        RemoteConfig.from_dict({"url": "redis://127.0.0.1:6379/0", key: value})
    assert info.value.key == f"remote.{key}"


def test_options_are_normalised(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    checked = RedisStore.check_options({"batch_bytes": "1MiB", "ttl_s": 0, "tls_ca_file": str(ca), "tls_verify_hostname": False})
    assert checked == {"batch_bytes": 1 << 20, "ttl_s": 0, "tls_ca_file": str(ca), "tls_verify_hostname": False}
    with pytest.raises(ConfigError) as info:
        RedisStore.check_options({"tls_key_file": str(ca)})
    assert info.value.key == "remote.tls_key_file"
    if os.geteuid() != 0:
        ca.chmod(0)
        with pytest.raises(ConfigError, match="cannot read"):
            RedisStore.check_options({"tls_ca_file": str(ca)})


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/zero", "redis://127.0.0.1:6379/0?ssl=true", "redis://:secret@:6379/0"])
def test_bad_urls_are_config_errors_without_secrets(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        RedisStore(url, {}, timeout_s=TIMEOUT_S)
    assert info.value.key == "remote.url" and "secret" not in str(info.value)


# -- the launcher ------------------------------------------------------------------------


def test_server_restart_keeps_port_and_drops_data(own_server: RedisServer) -> None:
    port, url = own_server.port, own_server.url
    st = RedisStore(url, {}, timeout_s=TIMEOUT_S)
    keys = _keys(1)
    st.put(keys, _values(1, 10))
    own_server.restart()
    assert own_server.port == port and own_server.url == url
    assert st.exists(keys) == [False]
    st.close()
    assert repr(own_server).count(own_server.password) == 0


def test_server_directory_is_private_and_removed(own_server: RedisServer) -> None:
    d = own_server.directory
    assert (d.stat().st_mode & 0o777) == 0o700
    assert ((d / "redis.conf").stat().st_mode & 0o777) == 0o600
    own_server.close()
    assert not d.exists() and not own_server.running()


def test_missing_redis_server_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    with pytest.raises(StoreStartError, match="apt-get install redis-server"):
        RedisServer().start()


def test_cli_prints_a_redacted_url_and_stops_on_sigterm() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "kv_offload.testing.redis_server", "--password", "cli-secret-pw"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("redis://***@127.0.0.1:") and "cli-secret-pw" not in first
        url = first.strip().replace("***", ":cli-secret-pw")
        RedisStore(url, {}, timeout_s=TIMEOUT_S).close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        with pytest.raises(StoreUnavailable):
            RedisStore(url, {}, timeout_s=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_exists_without_script_rights_falls_back_to_a_pipeline(server: RedisServer) -> None:
    """A deployment's ACL user may lack EVAL/EVALSHA: lookups still answer, key by key."""
    import redis

    admin = redis.Redis.from_url(server.url)
    admin.execute_command("ACL", "SETUSER", "noscript", "on", ">noscript-pw", "~*", "+get", "+set", "+exists",
                          "+unlink", "+ping", "+hello", "+client")  # fmt: skip
    held = _keys(3)
    full = RedisStore(server.url, {}, timeout_s=TIMEOUT_S)
    limited = RedisStore(f"redis://noscript@127.0.0.1:{server.port}/0", {}, timeout_s=TIMEOUT_S, password="noscript-pw")
    try:
        assert full.put(held[:2], _values(2, 4096)) == [True, True]
        assert full.exists(held) == [True, True, False] and full._script_ok  # one script call
        assert limited.exists(held) == [True, True, False]
        assert not limited._script_ok  # refused once (NOPERM), the pipeline from then on
        assert limited.exists(held[1:]) == [True, False]
    finally:
        full.close()
        limited.close()
        admin.execute_command("ACL", "DELUSER", "noscript")
        admin.close()
