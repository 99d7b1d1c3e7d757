# SPDX-License-Identifier: Apache-2.0
"""Property fuzz of the config parser and the start-up checks with any JSON value for any key.

Each example is a ``kv_connector_extra_config`` with a sane ``cpu_bytes`` and one key (a real
one, or a made-up name) set to any JSON value: huge and negative integers, non-finite floats,
long or odd strings, nested lists and objects. ``OffloadConfig.from_dict`` must return a config
or raise :class:`ConfigError` naming that key; a config that parses then goes through
``check_components`` (backend, pool size against physical memory, policy), which may only raise
``ConfigError`` too. Never another exception, never a signal: it all runs in a child interpreter.
``KV_OFFLOAD_FUZZ_EXAMPLES`` sets the example count (default 400, a few seconds).
"""

from __future__ import annotations

import os

from child_process import child_reports, run_child

EXAMPLES = int(os.environ.get("KV_OFFLOAD_FUZZ_EXAMPLES", "400"))


def test_any_json_value_for_any_key_is_a_config_or_a_config_error() -> None:
    proc = run_child(f"""
        import dataclasses, json, math
        import torch
        from hypothesis import given, settings, HealthCheck, strategies as st
        from kv_offload.config import ConfigError, OffloadConfig
        from kv_offload.geometry import KVGeometry
        from kv_offload.vllm.worker import backend_spec
        from kv_offload.backends import BACKENDS
        from kv_offload.policies import POLICIES
        from kv_offload.registry import RegistryError

        KEYS = [f.name for f in dataclasses.fields(OffloadConfig)]
        GEOMETRY = KVGeometry(num_layers=2, num_kv_heads=2, head_size=64, block_size=16, dtype=torch.float16)
        # Integers too long for Python to print (over 4300 digits) come from a map: a strategy
        # that lists them would fail to print itself.
        ints = st.one_of(st.integers(), st.sampled_from([0, -1, 2**31, 2**32 + 1, 2**62, 2**64, 10**30]),
                         st.integers(4400, 5000).map(lambda e: (-1) ** e * 10**e))
        floats = st.one_of(st.floats(), st.sampled_from([math.nan, math.inf, -math.inf, 1e400, 2.0**62]))
        texts = st.one_of(st.text(max_size=40), st.sampled_from(["4GiB", "1" * 400 + "TiB", "x\\n", "../etc", "-1",
                                                                 "1e3", "nan", "16 EiB", "0.5KiB", "\\x00"]))
        scalars = st.one_of(st.none(), st.booleans(), ints, floats, texts)
        values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                              st.dictionaries(texts, inner, max_size=3)), max_leaves=6)
        seen = {{"parsed": 0, "refused": 0}}

        def start_up(cfg):
            # What the connector does with a parsed config before allocating anything.
            try:
                backend_cls = BACKENDS.resolve(cfg.backend, None)
            except RegistryError as exc:
                raise ConfigError("backend", str(exc)) from None
            backend = backend_cls(backend_spec(cfg, GEOMETRY, 1, 0))
            backend.num_slots()
            try:
                POLICIES.resolve(cfg.eviction_policy, None)
            except RegistryError as exc:
                raise ConfigError("eviction_policy", str(exc)) from None

        @settings(max_examples={EXAMPLES}, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(key=st.one_of(st.sampled_from(KEYS), texts), value=values,
               cpu=st.sampled_from([1 << 20, "64MiB", "1.5GiB"]))
        def check(key, value, cpu):
            raw = {{"cpu_bytes": cpu, key: value}}
            if key.endswith("_module_path"):
                return  # would import whatever module the text names; the registry tests cover it
            try:
                cfg = OffloadConfig.from_dict(raw)
                start_up(cfg)
            except ConfigError as exc:
                named = exc.key == key or exc.key.startswith(key + ".")
                assert named or exc.key in ("cpu_bytes", "backend", "eviction_policy", "backend_options"), (exc.key, key)
                assert len(str(exc)) < 2000
                seen["refused"] += 1
            else:
                seen["parsed"] += 1

        report(check)
        print("SEEN", json.dumps(seen), flush=True)
    """)
    lines = child_reports(proc)
    assert lines == ["RETURNED"], proc.stdout[-3000:] + proc.stderr[-3000:]
    seen = [ln for ln in proc.stdout.splitlines() if ln.startswith("SEEN")]
    assert seen and '"parsed": 0' not in seen[0] and '"refused": 0' not in seen[0], seen


def test_any_json_value_for_any_remote_key_is_a_config_or_a_config_error() -> None:
    """The ``remote`` section: a valid URL of each store, then one key (the section's own,
    each store's options, or a made-up name) set to any JSON value. A config, or a
    ConfigError naming ``remote.<key>`` (or ``remote.url``); never another exception."""
    proc = run_child(f"""
        import json, math, os
        from hypothesis import given, settings, HealthCheck, strategies as st
        from kv_offload.config import ConfigError, OffloadConfig, _REMOTE_KEYS
        from kv_offload.tiers.remote.redis_store import RedisStore

        KEYS = sorted(set(_REMOTE_KEYS) | set(RedisStore.OPTIONS))
        os.environ["KVO_FUZZ_PASSWORD"] = "pw"
        ints = st.one_of(st.integers(), st.sampled_from([0, -1, 2**31, 2**64, 10**30]))
        floats = st.one_of(st.floats(), st.sampled_from([math.nan, math.inf, 1e400]))
        texts = st.one_of(st.text(max_size=40), st.sampled_from(["redis://[::1", "redis://h:99999/0", "KVO_FUZZ_PASSWORD",
                                                                 "/dev/null", "/etc", "\\x00", "rediss://u:p@h/0", "64MiB"]))
        scalars = st.one_of(st.none(), st.booleans(), ints, floats, texts)
        values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                              st.dictionaries(texts, inner, max_size=3)), max_leaves=6)
        # Values a key takes when it is right, so that both outcomes are seen.
        good = st.sampled_from([1, 60, 1000, True, False, "kvo-test:", "KVO_FUZZ_PASSWORD", "/dev/null", "64MiB"])
        values = st.one_of(good, values)
        urls = st.sampled_from(["redis://127.0.0.1:6379/0", "rediss://u@127.0.0.1:6380/1", "valkey://h/0"])
        seen = {{"parsed": 0, "refused": 0}}

        @settings(max_examples={EXAMPLES}, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(url=urls, key=st.one_of(st.sampled_from(KEYS), texts), value=values)
        def check(url, key, value):
            raw = {{"cpu_bytes": "64MiB", "remote": {{"url": url, key: value}}}}
            try:
                cfg = OffloadConfig.from_dict(raw)
                assert "pw" not in repr(cfg.remote) or "pw" in url + str(value)
            except ConfigError as exc:
                assert exc.key.startswith("remote"), exc.key
                assert exc.key in ("remote", "remote.url", f"remote.{{key}}"[:47]) or exc.key.startswith(f"remote.{{key}}"[:40]), (exc.key, key)
                assert len(str(exc)) < 2000
                seen["refused"] += 1
            else:
                seen["parsed"] += 1

        report(check)
        print("SEEN", json.dumps(seen), flush=True)
    """)
    lines = child_reports(proc)
    assert lines == ["RETURNED"], proc.stdout[-3000:] + proc.stderr[-3000:]
    seen = [ln for ln in proc.stdout.splitlines() if ln.startswith("SEEN")]
    assert seen and '"parsed": 0' not in seen[0] and '"refused": 0' not in seen[0], seen
