# SPDX-License-Identifier: Apache-2.0
"""``python -m kv_offload remote list|show``: what the remote tier's namespaces hold.

``list``: every namespace under the key prefix that has a label, with what it holds (page
format, KV dtype, block size, rank, model): what a consumer of another page geometry names
in its ``imports`` config. ``show --namespace HEX``: one namespace's whole label.

The store is named as in the connector's config: ``--url`` (and ``--prefix``), or
``--remote JSON``, the config's whole ``remote`` section (for ``password_file``,
``password_env`` and the adapter's options). Stores that cannot list their keys (Mooncake
Store) answer ``show`` only.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from kv_offload.config import ConfigError, RemoteConfig
from kv_offload.tiers.disk.label import summary
from kv_offload.tiers.remote.label import label_pattern, labels, read_label
from kv_offload.tiers.remote.store import STORES, RemoteStore, StoreUnavailable

__all__ = ["build_parser", "main"]

_MAX_NAMESPACES = 10_000


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kv_offload remote", description=__doc__.split("\n\n")[1])
    p.add_argument("command", choices=["list", "show"])
    p.add_argument("--url", help="the store's URL (redis://HOST:PORT/DB, mooncake://HOST:PORT, ...)")
    p.add_argument("--prefix", help="the key prefix (default: the config's, 'kvo:')")
    p.add_argument("--remote", help="the config's 'remote' section as JSON (instead of --url)")
    p.add_argument("--namespace", help="a namespace digest in hex (32 digits); show needs it")
    return p


def _config(args: argparse.Namespace) -> RemoteConfig:
    raw: dict[str, Any] = {}
    if args.remote is not None:
        try:
            raw = json.loads(args.remote)
        except ValueError as exc:
            raise ConfigError("remote", f"--remote is not JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise ConfigError("remote", "--remote must be a JSON object")
    if args.url is not None:
        raw["url"] = args.url
    if args.prefix is not None:
        raw["prefix"] = args.prefix
    if "url" not in raw:
        raise ConfigError("remote.url", "give --url or --remote with a url")
    return RemoteConfig.from_dict(raw)


def _open(cfg: RemoteConfig) -> RemoteStore:
    adapter = STORES.resolve(cfg.scheme)
    return adapter(cfg.url, cfg.options, timeout_s=cfg.timeout_ms / 1000, password=cfg.password)


def _namespace(args: argparse.Namespace) -> bytes | None:
    if args.namespace is None:
        if args.command == "show":
            raise ConfigError("namespace", "show needs --namespace HEX")
        return None
    try:
        ns = bytes.fromhex(args.namespace)
    except ValueError:
        ns = b""
    if len(ns) != 16:
        raise ConfigError("namespace", f"{args.namespace[:64]!r} is not 32 hex digits")
    return ns


def _run(args: argparse.Namespace) -> int:
    cfg, ns = _config(args), _namespace(args)
    store = _open(cfg)
    try:
        if ns is not None and args.command == "show":
            label = read_label(store, cfg.prefix, ns)
            if label is None:
                print(f"namespace {ns.hex()}: no label under prefix {cfg.prefix!r}", file=sys.stderr)
                return 1
            print(json.dumps(label, sort_keys=True, indent=1))
            return 0
        try:
            names = store.scan(label_pattern(cfg.prefix), _MAX_NAMESPACES)
        except NotImplementedError:
            why = f"{cfg.scheme} stores cannot list their keys; use 'show --namespace HEX'"
            raise NotImplementedError(why) from None
        found = sorted(labels(store, cfg.prefix, names), key=lambda x: x[0])
        print(f"{'namespace':32}  holds (the namespace's label)")
        for digest, label in found:
            if ns is None or digest == ns:
                held = summary(label) if label is not None else "(label unreadable or not valid)"
                print(f"{digest.hex():32}  {held}")
        if len(names) >= _MAX_NAMESPACES:
            print(f"(stopped after {_MAX_NAMESPACES} namespaces)", file=sys.stderr)
        return 0
    finally:
        store.close()


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    try:
        return _run(args)
    except (ConfigError, ValueError, NotImplementedError) as exc:  # a bad argument or key; a store that cannot list
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except StoreUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
