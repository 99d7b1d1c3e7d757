# SPDX-License-Identifier: Apache-2.0
"""Content keys: stable across processes and hash seeds, separated by namespace and extra keys,
hashed once per block, and independent of vLLM's block hash."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kv_offload.keys import (
    DIGEST_BYTES,
    KEY_BYTES,
    KeyChain,
    Namespace,
    Unkeyable,
    chain_hash,
    encode_extra,
    model_fingerprint,
)

NS = Namespace(model="tiny-llama", fingerprint="00" * 16, kv_dtype="float32", block_size=4, page_format="hnd")
TOKENS = list(range(3, 15))

# Golden values: the key format is a promise to every tier, process and release (blocks on
# disk outlive the code that wrote them). Changing any of these means bumping FORMAT_VERSION.
GOLDEN_NAMESPACE = "3675a4257f7bac1e47df16c252f0ecfc"
GOLDEN_RANK1 = "83680e1be935ccf2755953605f691f36"
GOLDEN_KEYS = [
    "3675a4257f7bac1e47df16c252f0ecfc85e1a0d84463910c444e99fb0e5ccaf2",
    "3675a4257f7bac1e47df16c252f0ecfc3e7f4e01795ce76b1a49ab2ff861e108",
    "3675a4257f7bac1e47df16c252f0ecfc2483009ae6c4c459f4d57ee374092ba5",
]
GOLDEN_SALTED = "2393728aa33a75fcda7085bab5648a85"


def test_golden_values() -> None:
    assert NS.digest.hex() == GOLDEN_NAMESPACE
    assert NS.rank_digest(1).hex() == GOLDEN_RANK1
    keys = KeyChain(NS.digest, 4).keys(TOKENS, 3)
    assert [k.hex() for k in keys] == GOLDEN_KEYS
    assert chain_hash(NS.digest, [1, 2, 3, 4], ("cache_salt", "tenant-a")).hex() == GOLDEN_SALTED


def test_chain_matches_the_documented_formula() -> None:
    # An independent computation of the formula in kv_offload/keys.py's docstring.
    parent = NS.digest
    for i, key in enumerate(KeyChain(NS.digest, 4).keys(TOKENS, 3)):
        block = TOKENS[4 * i : 4 * i + 4]
        data = parent + struct.pack("<I", len(block)) + struct.pack(f"<{len(block)}I", *block)
        parent = hashlib.blake2b(data, digest_size=16).digest()
        assert key == NS.digest + parent and len(key) == KEY_BYTES


_CHILD = """
import json, sys
from kv_offload.keys import KeyChain, Namespace
ns = Namespace(model="tiny-llama", fingerprint="00" * 16, kv_dtype="float32", block_size=4, page_format="hnd")
print(json.dumps([k.hex() for k in KeyChain(ns.digest, 4).keys(list(range(3, 15)), 3)] + [hash("x")]))
"""


def test_keys_are_the_same_under_any_python_hash_seed() -> None:
    seen = []
    for seed in ("0", "1", "random", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env, check=True)
        seen.append(json.loads(out.stdout))
    assert all(s[:3] == GOLDEN_KEYS for s in seen)
    assert len({s[3] for s in seen}) > 1, "the seeds did change Python's own hash()"


@pytest.mark.parametrize(
    "change",
    [{"model": "other"}, {"fingerprint": "11" * 16}, {"kv_dtype": "bfloat16"}, {"block_size": 8},
     {"page_format": "cpu"}, {"revision": "main"}, {"tp_size": 2}, {"pp_size": 2}, {"kv_group": 1},
     {"format_version": 2}],
)  # fmt: skip
def test_every_namespace_field_separates_keys(change: dict[str, Any]) -> None:
    fields = {k: v for k, v in NS.describe().items() if k != "digest"}
    other = Namespace(**{**fields, **change})
    assert other.digest != NS.digest
    ours = KeyChain(NS.digest, 4).keys(TOKENS, 3)
    theirs = KeyChain(other.digest, 4).keys(TOKENS, 3)
    assert not set(ours) & set(theirs)
    assert Namespace(**fields).digest == NS.digest  # and the same fields give the same digest


def test_ranks_have_their_own_namespaces() -> None:
    assert len({NS.rank_digest(r) for r in range(8)} | {NS.digest}) == 9
    assert all(len(NS.rank_digest(r)) == DIGEST_BYTES for r in range(2))


def test_extra_keys_separate_the_blocks_they_affect_and_all_later_ones() -> None:
    def salted(salt: str) -> Any:
        # vLLM puts cache_salt into the first block's extra keys only; the chain carries it on.
        return lambda start, end, state: ((("cache_salt", salt),) if start == 0 else None, state)

    plain = KeyChain(NS.digest, 4).keys(TOKENS, 3)
    a = KeyChain(NS.digest, 4, salted("tenant-a")).keys(TOKENS, 3)
    b = KeyChain(NS.digest, 4, salted("tenant-b")).keys(TOKENS, 3)
    assert len({*plain, *a, *b}) == 9
    assert KeyChain(NS.digest, 4, salted("tenant-a")).keys(TOKENS, 3) == a

    def lora_from_block_1(start: int, end: int, state: Any) -> tuple[Any, Any]:
        return ((("lora", "adapter", "/adapters/a"),) if start >= 4 else None, state)

    mixed = KeyChain(NS.digest, 4, lora_from_block_1).keys(TOKENS, 3)
    assert mixed[0] == plain[0] and mixed[1] != plain[1] and mixed[2] != plain[2]


def test_what_cannot_be_keyed_is_never_keyed() -> None:
    def float_from_block_1(start: int, end: int, state: Any) -> tuple[Any, Any]:
        return ((("weight", 0.5),) if start >= 4 else None, state)

    chain = KeyChain(NS.digest, 4, float_from_block_1)
    keys = chain.keys(TOKENS, 3)
    assert len(keys) == 1 and chain.unkeyable and "float" in chain.unkeyable
    assert chain.keys(TOKENS + [1, 2, 3, 4], 4) == keys  # and the chain stays cut
    with pytest.raises(Unkeyable):
        encode_extra(object())
    with pytest.raises(Unkeyable):
        chain_hash(NS.digest, [1, -1, 2, 3])
    with pytest.raises(Unkeyable):
        chain_hash(NS.digest, [2**32, 1, 2, 3])


def test_encoding_is_unambiguous() -> None:
    values = [None, True, False, 0, 1, -1, 2**70, "", "a", b"a", ("a",), ["a"], ("a", "b"), (("a", "b"),), ("ab",)]
    encoded = [encode_extra(v) for v in values]
    # ("a",) and ["a"] encode alike on purpose (vLLM's extra keys mix both); nothing else collides.
    assert len(set(encoded)) == len(values) - 1
    assert encode_extra(("a",)) == encode_extra(["a"])


def test_each_block_is_hashed_once_as_tokens_grow() -> None:
    calls: list[int] = []

    def counting(start: int, end: int, state: Any) -> tuple[Any, Any]:
        calls.append(start)
        return None, state

    chain = KeyChain(NS.digest, 4, counting)
    tokens: list[int] = []
    for step in range(200):  # decode: one token a step
        tokens.append(step + 3)
        chain.keys(tokens, len(tokens) // 4)
    assert calls == [4 * i for i in range(50)]
    assert chain.keys(tokens, 50) == KeyChain(NS.digest, 4).keys(tokens, 50)


def _checkpoint(path: Path, seed: int, size: int = 3 << 20) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"hidden_size": 64}))
    header = json.dumps({"w": {"dtype": "F32", "shape": [size // 4], "data_offsets": [0, size]}}).encode()
    data = np.random.default_rng(seed).standard_normal(size // 4).astype(np.float32).tobytes()
    (path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def test_model_fingerprint_tells_weights_apart_without_reading_them(tmp_path: Path) -> None:
    a = _checkpoint(tmp_path / "a", seed=1)
    b = _checkpoint(tmp_path / "b", seed=2)  # same config and shapes, other weights
    copy = _checkpoint(tmp_path / "copy", seed=1)
    assert model_fingerprint(str(a)) != model_fingerprint(str(b))
    assert model_fingerprint(str(a)) == model_fingerprint(str(copy))  # content, not location
    # Weights past the sampled ranges are not read: a change there is not seen (documented).
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[len(data) // 4] ^= 0xFF
    (copy / "model.safetensors").write_bytes(bytes(data))
    assert model_fingerprint(str(a)) == model_fingerprint(str(copy))
    (copy / "config.json").write_text(json.dumps({"hidden_size": 65}))
    assert model_fingerprint(str(a)) != model_fingerprint(str(copy))
    assert model_fingerprint("org/model", "v1") != model_fingerprint("org/model", "v2")
