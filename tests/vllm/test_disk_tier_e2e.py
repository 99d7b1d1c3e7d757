# SPDX-License-Identifier: Apache-2.0
"""The disk tier on real vLLM, one engine per process (``disk_child.py``), fp32 greedy.

(a) restart: a new process with another ``PYTHONHASHSEED`` and ``--prefix-caching-hash-algo``
gets the prefixes from disk, with the outputs of vLLM alone; (b) two processes sharing one
directory at the same time get each other's blocks; (c) another model with the same geometry,
and another ``cache_salt``, get nothing; (d) corrupted files are misses, outputs unchanged;
(e) a directory that turns read-only mid-run: every request completes, correctly.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import BLOCK, documents

pytestmark = pytest.mark.vllm

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "disk_child.py")
DOCS = documents(4, 600, seed=21)
FULL = (600 // BLOCK) * BLOCK  # tokens of each document in full blocks


def turn(q: int, docs: list[list[int]] = DOCS) -> list[list[int]]:
    return [d + [30 + q, 31] for d in docs]


def child(spec: dict[str, Any], seed: str = "0", wait: bool = True) -> Any:
    env = dict(os.environ, PYTHONHASHSEED=seed)
    cmd = [sys.executable, CHILD, json.dumps(spec)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    return finish(proc) if wait else proc


def finish(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=600)
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"child failed ({proc.returncode}):\n{out[-4000:]}"
    return json.loads(lines[-1][len("RESULT ") :])  # type: ignore[no-any-return]


def tokens(result: dict[str, Any], part: str = "outputs") -> list[list[int]]:
    return [t for t, _ in result[part]]


def cached(result: dict[str, Any], part: str = "outputs") -> list[int]:
    return [c for _, c in result[part]]


@pytest.fixture(scope="module")
def runs(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    disk = str(tmp_path_factory.mktemp("disk") / "kv")
    base = {"model": str(tiny_model), "max_tokens": 8}
    out: dict[str, Any] = {"disk": disk, "model": str(tiny_model)}
    out["baseline"] = child({**base, "prompts": turn(0) + turn(1), "disk": None})
    out["first"] = child({**base, "prompts": turn(0), "disk": disk}, seed="0")
    out["restart"] = child({**base, "prompts": turn(1), "disk": disk, "hash_algo": "xxhash"}, seed="12345")
    return out


def test_restart_with_another_hash_seed_and_algo_gets_prefixes_from_disk(runs: dict[str, Any]) -> None:
    base, first, again = runs["baseline"], runs["first"], runs["restart"]
    assert tokens(first) == tokens(base)[:4]
    assert tokens(again) == tokens(base)[4:], "outputs differ from vLLM alone"
    assert all(c == 0 for c in cached(first))  # nothing anywhere at first
    assert all(c >= FULL for c in cached(again)), cached(again)  # every full block from disk
    assert again["totals"]["disk_hit_tokens"] >= 4 * FULL
    assert again["totals"]["promoted_blocks"] >= 4 * (FULL // BLOCK)
    assert first["totals"]["written_back_blocks"] >= 4 * (FULL // BLOCK)
    assert again["namespace"] == first["namespace"]


def test_another_model_or_cache_salt_gets_nothing(runs: dict[str, Any], tiny_model: Path, tmp_path: Path) -> None:
    from kv_offload.testing.tiny_model import build_tiny_llama

    other = build_tiny_llama(tmp_path / "other", seed=7)  # same geometry, other weights
    spec = {"max_tokens": 8, "prompts": turn(1), "disk": runs["disk"]}
    result = child({**spec, "model": str(other)})
    assert result["namespace"] != runs["first"]["namespace"]
    assert result["totals"].get("disk_hit_tokens", 0) == 0 and all(c == 0 for c in cached(result))
    salted = {**spec, "model": str(tiny_model), "prompts": turn(2)}
    a = child({**salted, "cache_salt": "tenant-a"})
    b = child({**salted, "cache_salt": "tenant-b"})
    assert a["totals"].get("disk_hit_tokens", 0) == 0  # salted keys differ from the plain ones
    assert b["totals"].get("disk_hit_tokens", 0) == 0, "tenant b read tenant a's blocks"
    assert tokens(a) == tokens(b)  # the same model and prompts: the same tokens


def test_corrupted_files_are_misses_and_outputs_do_not_change(runs: dict[str, Any], tmp_path: Path) -> None:
    disk = str(tmp_path / "kv")
    shutil.copytree(runs["disk"], disk)
    bodies = glob.glob(os.path.join(disk, "**", "*.dat"), recursive=True)
    assert bodies
    for path in bodies:  # flip a byte in every 8 KiB of every stored body
        with open(path, "r+b") as f:
            data = bytearray(f.read())
            for i in range(100, len(data), 8192):
                data[i] ^= 0x5A
            f.seek(0)
            f.write(data)
    result = child({"model": runs["model"], "max_tokens": 8, "prompts": turn(1), "disk": disk})
    assert tokens(result) == tokens(runs["baseline"])[4:], "a corrupted block changed the output"
    assert result["totals"]["failed_promotes"] >= 1
    assert result["totals"].get("promoted_blocks", 0) == 0, "a corrupted block was loaded"


def test_two_processes_share_one_directory_at_the_same_time(runs: dict[str, Any], tmp_path: Path) -> None:
    disk = str(tmp_path / "kv")
    mine, theirs = DOCS[:2], DOCS[2:]
    common = {"model": runs["model"], "max_tokens": 8, "disk": disk}
    a_done, b_done = str(tmp_path / "a-done"), str(tmp_path / "b-done")
    a = child({**common, "prompts": turn(0, mine), "barrier": a_done, "wait_for": b_done,
               "then_prompts": turn(1, theirs)}, seed="1", wait=False)  # fmt: skip
    b = child({**common, "prompts": turn(0, theirs), "barrier": b_done, "wait_for": a_done,
               "then_prompts": turn(1, mine)}, seed="2", wait=False)  # fmt: skip
    ra, rb = finish(a), finish(b)
    # Each got the other's documents from the shared directory, while both were running.
    assert all(c >= FULL for c in cached(ra, "then")), cached(ra, "then")
    assert all(c >= FULL for c in cached(rb, "then")), cached(rb, "then")
    assert ra["totals"]["disk_hit_tokens"] >= 2 * FULL and rb["totals"]["disk_hit_tokens"] >= 2 * FULL
    base = tokens(runs["baseline"])
    assert tokens(ra, "then") == base[4 + 2 : 4 + 4] and tokens(rb, "then") == base[4 : 4 + 2]


def test_a_vanished_or_full_disk_loses_no_request(runs: dict[str, Any], tmp_path: Path) -> None:
    # Mid-run: the directory is removed under the running server after two documents.
    disk = str(tmp_path / "kv")
    spec = {"model": runs["model"], "max_tokens": 8, "disk": disk, "prompts": turn(0), "vanish_after": 2}
    gone = child(spec)
    assert tokens(gone) == tokens(runs["baseline"])[:4], "a request lost or changed when the disk went away"
    assert gone["totals"]["written_back_blocks"] >= 2 * (FULL // BLOCK)  # before it went
    assert gone["totals"]["failed_writebacks"] >= 1  # after: counted, and serving went on
    # A disk that is full from the start: a 1 MiB tmpfs under a 16 MiB tier.
    mount = tmp_path / "full"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)]).returncode != 0:
        return  # not root here: the vanished directory above is the fault this run checks
    try:
        full = child({**spec, "disk": str(mount / "kv"), "disk_bytes": "16MiB", "vanish_after": None})
    finally:
        subprocess.run(["umount", "-l", str(mount)])
    assert tokens(full) == tokens(runs["baseline"])[:4]
    assert full["totals"].get("written_back_blocks", 0) == 0 and full["totals"]["failed_writebacks"] >= 1
