# SPDX-License-Identifier: Apache-2.0
"""Remote tier throughput and lookup latency against the store's own client, same run.

For each store (a real ``redis-server`` with a password; a real Mooncake master with a
dedicated store process) and block size (256 KiB, 1 MiB, 4 MiB), ``--mib`` MiB of random
blocks are put and then got back, in batches of ``--batch-mib`` MiB:

- tier: :class:`~kv_offload.tiers.remote.tier.RemoteTier` ``write`` / ``read`` from and into
  the pool's memory (numpy buffers, touched first), values with their checked header,
  every body hashed on put and verified on get;
- baseline: the store's own client doing the same batched operations on the same bytes:
  redis-py (with hiredis) pipelining SET of prebuilt ``bytes`` values of the same length and
  GET returning them; Mooncake's ``batch_put_from`` / ``batch_get_into`` on registered buffers.

Tier and baseline alternate which goes first; each size runs ``--repeat`` times and the
medians are reported, with ratio = tier GB/s / baseline GB/s (goal >= 0.8).

Lookup latency: a prefix of 1,000 blocks is stored, then ``--lookups`` batched lookups of all
1,000 keys are timed through the tier (``contains``: one round trip) and through the store's
own client (pipelined EXISTS; ``batch_is_exist``); p50 and p99 in ms (goal p99 <= 5 ms).

    python benchmarks/bench_remote_tier.py --json [--out FILE] [--stores redis,mooncake]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from kv_offload.config import RemoteConfig
from kv_offload.tiers.remote.format import HEADER_BYTES, store_key
from kv_offload.tiers.remote.tier import RemoteTier

NS = bytes(range(16))
SIZES = [256 << 10, 1 << 20, 4 << 20]


def _keys(n: int, run: int) -> list[bytes]:
    return [run.to_bytes(4, "little") + i.to_bytes(28, "little") for i in range(n)]


class RedisKit:
    """A redis-server with a password, and redis-py as the baseline client."""

    name = "redis"

    def __init__(self) -> None:
        import redis

        from kv_offload.testing.redis_server import RedisServer

        self.server = RedisServer().start()
        self.url = self.server.url
        self.client = redis.Redis.from_url(self.url)

    def config(self) -> dict[str, Any]:
        return {"url": self.url}

    def base_put(self, names: list[str], values: list[bytes]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for name, value in zip(names, values):
            pipe.set(name, value)
        assert all(pipe.execute())

    def base_get(self, names: list[str], dst: np.ndarray) -> None:
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.get(name)
        values = pipe.execute()
        assert all(v is not None for v in values)

    def base_exists(self, names: list[str]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.exists(name)
        pipe.execute()

    def values(self, src: np.ndarray) -> list[bytes]:
        return [bytes(HEADER_BYTES) + src[i].tobytes() for i in range(src.shape[0])]

    def register(self, array: np.ndarray) -> None:
        pass

    def clear(self) -> None:
        self.client.flushdb()

    def close(self) -> None:
        self.client.close()
        self.server.close()


class MooncakeKit:
    """A Mooncake master and store process, and Mooncake's own client as the baseline."""

    name = "mooncake"

    def __init__(self, segment_bytes: int) -> None:
        from kv_offload.testing.mooncake_server import MooncakeServer
        from kv_offload.tiers.remote.mooncake_store import MooncakeStore

        self.server = MooncakeServer(segment_bytes=segment_bytes).start()
        self.url = self.server.url
        # The adapter's own client object is Mooncake's: the baseline calls it directly.
        self._adapter = MooncakeStore(self.url, MooncakeStore.check_options({}), timeout_s=10.0)
        self.client = self._adapter._client.handle
        self._registered: list[np.ndarray] = []

    def config(self) -> dict[str, Any]:
        return {"url": self.url, "timeout_ms": 10000}

    def register(self, array: np.ndarray) -> None:
        self._adapter.register_memory(memoryview(array.reshape(-1).data))
        self._registered.append(array)

    def values(self, src: np.ndarray) -> np.ndarray:
        return src  # the bodies in place (registered); the header is the tier's extra

    def base_put(self, names: list[str], values: np.ndarray) -> None:
        bs = values.shape[1]
        ptrs = [values[i].ctypes.data for i in range(len(names))]
        rc = self.client.batch_put_from(names, ptrs, [bs] * len(names))
        assert all(r == 0 for r in rc), rc

    def base_get(self, names: list[str], dst: np.ndarray) -> None:
        bs = dst.shape[1]
        ptrs = [dst[i].ctypes.data for i in range(len(names))]
        rc = self.client.batch_get_into(names, ptrs, [bs] * len(names))
        assert all(r == bs for r in rc), rc

    def base_exists(self, names: list[str]) -> None:
        self.client.batch_is_exist(names)

    def clear(self) -> None:
        self.client.remove_all(True)  # force: values read in the last seconds are leased

    def close(self) -> None:
        self._adapter.close()
        self.server.close()


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_size(kit: Any, bs: int, total: int, batch: int, repeat: int) -> dict[str, Any]:
    n = total // bs
    per_batch = max(1, batch // bs)
    rng = np.random.default_rng(bs)
    src = rng.integers(0, 256, size=(n, bs), dtype=np.uint8)
    dst = np.zeros_like(src)
    dst[:] = 1  # touched: pool slots are faulted in long before a read lands in them
    kit.register(src)
    kit.register(dst)
    values = kit.values(src)
    rows: dict[str, list[float]] = {"tier_put": [], "base_put": [], "tier_get": [], "base_get": []}
    config = RemoteConfig.from_dict(kit.config())
    with RemoteTier(config, NS, bs) as tier:
        tier.register_memory(memoryview(src.reshape(-1).data))
        tier.register_memory(memoryview(dst.reshape(-1).data))
        for r in range(repeat):
            keys = _keys(n, r + 1000 * bs.bit_length())  # never a key of another size or run
            names = [store_key("bench:", NS, k) for k in keys]
            spans = [(i, min(n, i + per_batch)) for i in range(0, n, per_batch)]

            def tier_put() -> None:
                for a, b in spans:
                    assert all(tier.write([(keys[i], memoryview(src[i])) for i in range(a, b)]))

            def tier_get() -> None:
                for a, b in spans:
                    assert all(tier.read(keys[a:b], [memoryview(dst[i]) for i in range(a, b)]))

            def base_put() -> None:
                for a, b in spans:
                    kit.base_put(names[a:b], values[a:b])

            def base_get() -> None:
                for a, b in spans:
                    kit.base_get(names[a:b], dst[a:b])

            order = [("tier", tier_put, tier_get), ("base", base_put, base_get)]
            if r % 2:
                order.reverse()
            for who, put, get in order:
                rows[f"{who}_put"].append(total / _timed(put) / 1e9)
                rows[f"{who}_get"].append(total / _timed(get) / 1e9)
                if who == "tier":
                    assert np.array_equal(dst, src), "the tier returned other bytes"
                kit.clear()  # the next one puts into an empty store, as this one did
    med = {k: statistics.median(v) for k, v in rows.items()}
    return {
        "store": kit.name, "block_bytes": bs, "blocks": n, **{f"{k}_gbps": round(v, 3) for k, v in med.items()},
        "put_ratio": round(med["tier_put"] / med["base_put"], 3), "get_ratio": round(med["tier_get"] / med["base_get"], 3),
    }  # fmt: skip


def bench_lookup(kit: Any, rounds: int) -> dict[str, Any]:
    bs = 4096
    n = 1000
    src = np.random.default_rng(0).integers(0, 256, size=(n, bs), dtype=np.uint8)
    kit.register(src)
    keys = _keys(n, 99)
    names = [store_key("kvo:", NS, k) for k in keys]
    with RemoteTier(RemoteConfig.from_dict(kit.config()), NS, bs) as tier:
        tier.register_memory(memoryview(src.reshape(-1).data))
        assert all(tier.write([(k, memoryview(src[i])) for i, k in enumerate(keys)]))
        tier_ms, base_ms = [], []
        for i in range(rounds):
            pair = [("tier", lambda: tier.contains(keys)), ("base", lambda: kit.base_exists(names))]
            for who, fn in pair if i % 2 == 0 else pair[::-1]:
                (tier_ms if who == "tier" else base_ms).append(_timed(fn) * 1e3)
        assert all(tier.contains(keys))
    kit.clear()

    def pct(v: list[float], q: float) -> float:
        return round(float(np.percentile(v, q)), 3)

    return {
        "store": kit.name, "prefix_blocks": n, "rounds": rounds,
        "tier_p50_ms": pct(tier_ms, 50), "tier_p99_ms": pct(tier_ms, 99),
        "base_p50_ms": pct(base_ms, 50), "base_p99_ms": pct(base_ms, 99),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print the results as JSON after the table")
    ap.add_argument("--out", help="write the JSON to this file")
    ap.add_argument("--stores", default="redis,mooncake", help="comma-separated: redis, mooncake")
    ap.add_argument("--mib", type=int, default=128, help="MiB put and got per block size")
    ap.add_argument("--batch-mib", type=int, default=32, help="MiB per batched call")
    ap.add_argument("--repeat", type=int, default=5, help="runs per block size; medians are reported")
    ap.add_argument("--lookups", type=int, default=500, help="timed lookups of the 1,000-block prefix")
    args = ap.parse_args()
    total, batch = args.mib << 20, args.batch_mib << 20
    results: dict[str, Any] = {
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
        "mib": args.mib, "batch_mib": args.batch_mib, "repeat": args.repeat, "throughput": [], "lookup": [],
    }  # fmt: skip
    print(f"{'store':9} {'block':>7} {'put GB/s':>9} {'client':>7} {'ratio':>6} {'get GB/s':>9} {'client':>7} {'ratio':>6}")
    for name in args.stores.split(","):
        kit = RedisKit() if name == "redis" else MooncakeKit(segment_bytes=3 * total + (256 << 20))
        try:
            for bs in SIZES:
                row = bench_size(kit, bs, total, batch, args.repeat)
                results["throughput"].append(row)
                print(f"{name:9} {bs >> 10:>5}Ki {row['tier_put_gbps']:>9.2f} {row['base_put_gbps']:>7.2f}"
                      f" {row['put_ratio']:>6.2f} {row['tier_get_gbps']:>9.2f} {row['base_get_gbps']:>7.2f}"
                      f" {row['get_ratio']:>6.2f}")  # fmt: skip
            lookup = bench_lookup(kit, args.lookups)
            results["lookup"].append(lookup)
        finally:
            kit.close()
    print(f"\n{'store':9} {'lookup of 1,000 blocks':>24} {'p50 ms':>7} {'p99 ms':>7}")
    for row in results["lookup"]:
        print(f"{row['store']:9} {'tier':>24} {row['tier_p50_ms']:>7.3f} {row['tier_p99_ms']:>7.3f}")
        print(f"{'':9} {'store client':>24} {row['base_p50_ms']:>7.3f} {row['base_p99_ms']:>7.3f}")
    text = json.dumps(results, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    if args.json:
        print(text)


if __name__ == "__main__":
    main()
