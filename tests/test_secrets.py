# SPDX-License-Identifier: Apache-2.0
"""A store password never shows: not in the config's repr/str, not in an exception (its message,
its chain, its formatted traceback), not in a log record (DEBUG and up, every logger), not in
the tier's stats.

The password is given each way a deployment can (in the URL, ``password_env``,
``password_file``, with an ACL user in the URL) and is one with characters a URL must quote,
so both its plain and its quoted spelling are looked for. Against a real ``redis-server``
with ``requirepass``: the right password (a working tier writing and reading), a wrong one,
an unreachable store, and URLs that cannot be used.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from kv_offload.config import ConfigError, OffloadConfig, RemoteConfig
from kv_offload.testing.redis_server import RedisServer
from kv_offload.testing.store_process import free_port
from kv_offload.tiers.remote.lookup import RemoteIndex
from kv_offload.tiers.remote.redis_store import RedisStore
from kv_offload.tiers.remote.store import StoreUnavailable
from kv_offload.tiers.remote.tier import RemoteTier
from tests.remote_common import redis_server

SECRET = "Pw-7f3a:9/q@x#%Z"  # ':', '/', '@', '#', '%': quoted in a URL
WRONG = "Wr0ng-5ecret:b@d"
NS = bytes(range(16))
BLOCK = 4096


def spellings(secret: str) -> list[str]:
    return [secret, quote(secret, safe=""), quote(secret)]


def assert_hidden(text: str, *secrets: str) -> None:
    for secret in secrets:
        for s in spellings(secret):
            assert s not in text, f"a secret ({s[:3]}...) shows in: {text[:500]}"


def exception_text(exc: BaseException) -> str:
    """Everything an exception can show: repr, args, the formatted chain with tracebacks."""
    return "\n".join([repr(exc), str(exc.args), *traceback.format_exception(exc)])


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    yield from redis_server(password=SECRET)


@pytest.fixture(scope="module")
def acl_server() -> Iterator[RedisServer]:
    yield from redis_server(password=WRONG + "-default", user="kvo", user_password=SECRET)


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.DEBUG, logger="kv_offload"), caplog.at_level(logging.DEBUG):
        yield caplog


def assert_logs_hidden(caplog: pytest.LogCaptureFixture, *secrets: str) -> None:
    for record in caplog.records:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += exception_text(record.exc_info[1])
        assert_hidden(text + repr(record.args), *secrets)
    assert_hidden(caplog.text, *secrets)


def configs(url_host: str, password: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, user: str = "") -> dict[str, RemoteConfig]:
    """The same store with ``password`` given each way."""
    pw_file = tmp_path / "redis.pass"
    pw_file.write_text(password + "\n")
    pw_file.chmod(0o600)
    monkeypatch.setenv("KVO_TEST_REDIS_PASSWORD", password)
    base: dict[str, Any] = {"timeout_ms": 500, "reconnect_max_s": 1}
    userinfo = f"{quote(user, safe='')}:{quote(password, safe='')}@" if user else f":{quote(password, safe='')}@"
    plain = f"redis://{quote(user, safe='') + '@' if user else ''}{url_host}/0"
    return {
        "url": RemoteConfig.from_dict({"url": f"redis://{userinfo}{url_host}/0", **base}),
        "env": RemoteConfig.from_dict({"url": plain, "password_env": "KVO_TEST_REDIS_PASSWORD", **base}),
        "file": RemoteConfig.from_dict({"url": plain, "password_file": str(pw_file), **base}),
    }


WAYS = ["url", "env", "file"]


@pytest.mark.parametrize("way", WAYS)
def test_config_repr_and_str_hide_the_password(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, way: str) -> None:
    cfg = configs("127.0.0.1:6379", SECRET, tmp_path, monkeypatch, user="kvo")[way]
    assert cfg.password == SECRET or cfg.url_has_password  # the secret is really in there
    assert_hidden(repr(cfg) + str(cfg) + cfg.shown_url + f"{cfg!r:>10}" + repr([cfg]), SECRET)
    whole = OffloadConfig.from_dict({"cpu_bytes": "64MiB", "remote": {"url": f"redis://:{quote(SECRET, safe='')}@127.0.0.1/0"}})
    assert_hidden(repr(whole) + str(whole), SECRET)
    moon = RemoteConfig.from_dict({"url": f"mooncake://kvo:{quote(SECRET, safe='')}@127.0.0.1:50051"})
    assert_hidden(repr(moon) + str(moon) + moon.shown_url, SECRET)


@pytest.mark.parametrize("way", WAYS)
def test_a_working_tier_never_shows_the_password(
    server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logs: pytest.LogCaptureFixture, way: str
) -> None:  # fmt: skip
    cfg = configs(f"127.0.0.1:{server.port}", SECRET, tmp_path, monkeypatch)[way]
    with RemoteTier(cfg, NS, BLOCK) as tier:
        assert tier.connected
        body = memoryview(bytes(range(256)) * (BLOCK // 256))
        assert tier.write([(b"k" * 32, body)]) == [True]
        out = bytearray(BLOCK)
        assert tier.read([b"k" * 32], [memoryview(out)]) == [True] and out == body
        index = RemoteIndex(tier, budget_s=0.5)
        try:
            answer = index.contains([b"k" * 32])  # None: asked in the background; ask again
            for _ in range(500):
                if answer is not None:
                    break
                time.sleep(0.01)
                answer = index.contains([b"k" * 32])
            assert answer == [True]
        finally:
            index.close()
        assert_hidden(repr(tier) + str(dataclasses.asdict(tier.stats())) + repr(tier.stats()), SECRET)
        store = tier._store
        assert_hidden(repr(store) + str(store), SECRET)
    assert_logs_hidden(logs, SECRET)


@pytest.mark.parametrize("way", WAYS)
def test_a_wrong_password_fails_without_showing_either_password(
    server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logs: pytest.LogCaptureFixture, way: str
) -> None:  # fmt: skip
    cfg = configs(f"127.0.0.1:{server.port}", WRONG, tmp_path, monkeypatch)[way]
    with pytest.raises(StoreUnavailable, match="authentication failed") as info:
        RedisStore(cfg.url, cfg.options, timeout_s=0.5, password=cfg.password)
    assert_hidden(exception_text(info.value), WRONG, SECRET)
    with RemoteTier(cfg, NS, BLOCK) as tier:
        assert not tier.connected
        assert tier.write([(b"k" * 32, memoryview(bytes(BLOCK)))]) == [False]
        assert tier.read([b"k" * 32], [memoryview(bytearray(BLOCK))]) == [False]
        stats = tier.stats()
        assert stats.errors >= 1
        assert_hidden(repr(tier) + str(dataclasses.asdict(stats)), WRONG, SECRET)
    assert any("authentication failed" in r.getMessage() for r in logs.records)
    assert_logs_hidden(logs, WRONG, SECRET)


def test_an_acl_user_with_a_wrong_password(acl_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           logs: pytest.LogCaptureFixture) -> None:  # fmt: skip
    for way, cfg in configs(f"127.0.0.1:{acl_server.port}", WRONG, tmp_path, monkeypatch, user="kvo").items():
        with pytest.raises(StoreUnavailable, match="authentication failed") as info:
            RedisStore(cfg.url, cfg.options, timeout_s=0.5, password=cfg.password)
        assert_hidden(exception_text(info.value), WRONG, SECRET)
        right = configs(f"127.0.0.1:{acl_server.port}", SECRET, tmp_path, monkeypatch, user="kvo")[way]
        with RemoteTier(right, NS, BLOCK) as tier:
            assert tier.connected, way
    assert_logs_hidden(logs, WRONG, SECRET)


@pytest.mark.parametrize("way", WAYS)
def test_an_unreachable_store_never_shows_the_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logs: pytest.LogCaptureFixture, way: str
) -> None:  # fmt: skip
    cfg = configs(f"127.0.0.1:{free_port()}", SECRET, tmp_path, monkeypatch)[way]  # nothing listens there
    with pytest.raises(StoreUnavailable, match="cannot connect") as info:
        RedisStore(cfg.url, cfg.options, timeout_s=0.5, password=cfg.password)
    assert_hidden(exception_text(info.value), SECRET)
    with RemoteTier(cfg, NS, BLOCK) as tier:
        assert tier.contains([b"k" * 32]) == [False]
        assert_hidden(str(dataclasses.asdict(tier.stats())), SECRET)
    assert_logs_hidden(logs, SECRET)


BAD_URLS = [
    "redis://:{pw}@127.0.0.1:notaport/0",  # invalid port
    "redis://:{pw}@127.0.0.1:99999/0",  # port out of range
    "redis://:{pw}@/0",  # no host
    "redis://:{pw}@127.0.0.1:6379/0?db=1",  # query
    "redis://:{pw}@127.0.0.1:6379/zero",  # not a database number
    "redis://:{pw}@[::1/0",  # unclosed bracket
    "nosuchstore://:{pw}@127.0.0.1/0",  # unknown scheme
    "redis://:{pw}@127.0.0.1:6379/0\n",  # a control character
]


@pytest.mark.parametrize("template", BAD_URLS)
@pytest.mark.parametrize("quoted", [True, False], ids=["quoted", "raw"])
def test_an_unusable_url_is_refused_without_showing_the_password(
    template: str, quoted: bool, logs: pytest.LogCaptureFixture
) -> None:  # fmt: skip
    url = template.format(pw=quote(SECRET, safe="") if quoted else SECRET)
    errors: list[BaseException] = []
    try:
        cfg = RemoteConfig.from_dict({"url": url, "timeout_ms": 300})
    except ConfigError as exc:
        errors.append(exc)
    else:
        assert_hidden(repr(cfg) + cfg.shown_url, SECRET)
        try:
            RedisStore(cfg.url, cfg.options, timeout_s=0.3, password=cfg.password)
        except (ConfigError, StoreUnavailable, ValueError) as exc:
            errors.append(exc)
    try:  # the adapter given the URL directly, as a store of one's own might be
        RedisStore(url, {}, timeout_s=0.3)
    except (ConfigError, StoreUnavailable, ValueError) as exc:
        errors.append(exc)
    assert errors, f"{template} was accepted"
    for exc in errors:
        assert_hidden(exception_text(exc), SECRET)
    assert_logs_hidden(logs, SECRET)


def test_password_env_and_file_errors_name_the_source_not_the_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "bad.pass"
    bad.write_bytes(SECRET.encode() + b"\xff\xfe")  # not UTF-8: unreadable as a password
    with pytest.raises(ConfigError, match="password_file") as info:
        RemoteConfig.from_dict({"url": "redis://127.0.0.1/0", "password_file": str(bad)})
    assert_hidden(exception_text(info.value), SECRET)
    monkeypatch.setenv("KVO_TEST_REDIS_PASSWORD", SECRET)
    with pytest.raises(ConfigError, match="password_file") as info:
        RemoteConfig.from_dict({"url": "redis://127.0.0.1/0", "password_file": str(bad),
                                "password_env": "KVO_TEST_REDIS_PASSWORD"})  # fmt: skip
    assert_hidden(exception_text(info.value), SECRET)
