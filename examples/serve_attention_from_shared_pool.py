# SPDX-License-Identifier: Apache-2.0
"""One process fills a shared host pool; another serves decode attention from it, read-only.

    python examples/serve_attention_from_shared_pool.py [--dtype bfloat16] [--seqs 4] [--ctx 700]

The writer (this process) creates a shared pool whose header carries the KV geometry, stores
the blocks of a few sequences through an :class:`~kv_offload.manager.OffloadManager` (keyed by
chained block hashes), publishes the manager's index next to the pool, and computes the
expected outputs with the plain-torch reference. The reader (a fresh Python process) attaches
the pool read-only, resolves each sequence's block hashes through the published index, runs
the CPU attention kernel in place on the shared pages, and checks it against its own oracle
and the writer's expected outputs. Exit status 0 means every check passed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile

import torch

from kv_offload.attention import BlockIndex, PoolAttention
from kv_offload.attention.reference import decode_attention_ref, write_tokens
from kv_offload.attention.serving import index_path
from kv_offload.geometry import KVGeometry, PageFormat, dtype_from_name
from kv_offload.manager import OffloadManager
from kv_offload.policies.lru import LRUPolicy
from kv_offload.pool import HostPool, PoolSpec

NUM_Q_HEADS = 8
LAYER = 1


def block_hashes(seq: int, num_blocks: int) -> list[bytes]:
    """Chained hashes, as a prefix cache would key blocks (toy token ids: the sequence number)."""
    out, prev = [], b""
    for j in range(num_blocks):
        prev = hashlib.sha256(prev + f"seq{seq}-block{j}".encode()).digest()
        out.append(prev)
    return out


def write(args: argparse.Namespace, workdir: str) -> HostPool:
    geometry = KVGeometry(
        num_layers=2, num_kv_heads=2, head_size=64, block_size=16, dtype=dtype_from_name(args.dtype),
        page_format=PageFormat(args.format),
    )  # fmt: skip
    lens = [args.ctx - 37 * i for i in range(args.seqs)]
    nblocks = [-(-n // geometry.block_size) for n in lens]
    slots = sum(nblocks) + 8
    pool = HostPool(PoolSpec(
        capacity_bytes=slots * geometry.slot_bytes, slot_bytes=geometry.slot_bytes, shm_name=args.shm_name,
        metadata={"geometry": geometry.describe()},
    ))  # fmt: skip
    manager = OffloadManager(pool.num_slots, LRUPolicy(pool.num_slots), block_bytes=geometry.slot_bytes)
    gen = torch.Generator().manual_seed(0)
    for seq, (n, nb) in enumerate(zip(lens, nblocks)):
        keys = block_hashes(seq, nb)
        plan = manager.prepare_store(keys)
        assert plan is not None, "pool too small"
        for layer in range(geometry.num_layers):
            k = torch.randn(geometry.num_kv_heads, n, geometry.head_size, generator=gen).to(geometry.dtype)
            v = torch.randn(geometry.num_kv_heads, n, geometry.v_head_size, generator=gen).to(geometry.dtype)
            write_tokens(pool.tensor, list(plan.slots), k, v, geometry, layer)
        manager.complete_store(keys)
    BlockIndex.from_mapping(manager.index()).save(index_path(args.shm_name))
    # What the reader must get: the oracle over the writer's own view of the pool.
    query = torch.randn(len(lens), NUM_Q_HEADS, geometry.head_size, generator=gen).to(geometry.dtype)
    index = manager.index()
    table = torch.zeros(len(lens), max(nblocks), dtype=torch.int32)
    for seq, nb in enumerate(nblocks):
        table[seq, :nb] = torch.tensor([index[h] for h in block_hashes(seq, nb)], dtype=torch.int32)
    expected = decode_attention_ref(query, pool.tensor, table, torch.tensor(lens), geometry, LAYER)
    torch.save({"query": query, "lens": lens, "expected": expected}, os.path.join(workdir, "expected.pt"))
    return pool


def serve(args: argparse.Namespace, workdir: str) -> int:
    attn = PoolAttention.attach(args.shm_name)  # read-only mapping; geometry from the header
    assert attn.pool.readonly
    saved = torch.load(os.path.join(workdir, "expected.pt"))
    query, lens, expected = saved["query"], saved["lens"], saved["expected"]
    index = attn.load_index()
    bs = attn.geometry.block_size
    hashes = [block_hashes(seq, -(-n // bs)) for seq, n in enumerate(lens)]
    out = attn.decode_by_hashes(query, hashes, lens, index, layer=LAYER)
    slots = [index.resolve(h) for h in hashes]
    table = torch.zeros(len(lens), max(len(s) for s in slots), dtype=torch.int32)
    for i, s in enumerate(slots):
        table[i, : len(s)] = torch.tensor(s, dtype=torch.int32)
    oracle = decode_attention_ref(query, attn.pool.tensor, table, torch.tensor(lens), attn.geometry, LAYER)
    err_oracle = (out.float() - oracle).abs().max().item()
    err_writer = (out.float() - expected).abs().max().item()
    tol = 1e-5 if query.dtype == torch.float32 else 2e-2
    print(f"reader: {len(lens)} sequences, contexts {lens}, {attn.geometry.page_format.value} pages,"
          f" {query.dtype}: max |kernel - oracle| = {err_oracle:.2e}, max |kernel - writer's expected| ="
          f" {err_writer:.2e} (tolerance {tol:g})")
    attn.close()
    return 0 if err_oracle <= tol and err_writer <= tol else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--format", default="HND", choices=["HND", "NHD", "CPU"])
    parser.add_argument("--seqs", type=int, default=4)
    parser.add_argument("--ctx", type=int, default=700)
    parser.add_argument("--shm-name", default=f"attn-example-{os.getpid()}")
    parser.add_argument("--serve", metavar="WORKDIR", help=argparse.SUPPRESS)  # reader mode
    args = parser.parse_args()
    if args.serve:
        return serve(args, args.serve)
    with tempfile.TemporaryDirectory() as workdir:
        pool = write(args, workdir)
        try:
            cmd = [sys.executable, os.path.abspath(__file__), "--serve", workdir, "--shm-name", args.shm_name]
            rc = subprocess.run(cmd, check=False).returncode
        finally:
            os.unlink(index_path(args.shm_name))
            pool.close()
    print("OK" if rc == 0 else "FAILED")
    return rc


if __name__ == "__main__":
    sys.exit(main())
