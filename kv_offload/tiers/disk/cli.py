# SPDX-License-Identifier: Apache-2.0
"""``python -m kv_offload disk list|verify|purge --path DIR [--namespace HEX]``.

``list``: namespaces with their block counts, bytes and label (what they hold). ``verify``: read every block and check
its checksum; prints each corrupt block and exits 1 if there was one. ``purge``: remove one
namespace's blocks (segments no live process owns are deleted; in a segment a live process
owns, every entry is cleared under the slot locks, so that process sees misses).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from kv_offload.tiers.disk.files import AlignedBuffer, DiskTierError, check_directory, check_stat, open_private_subdir
from kv_offload.tiers.disk.format import NAMESPACE_DIR_RE, parse_segment_name
from kv_offload.tiers.disk.label import read_label, remove_label, summary
from kv_offload.tiers.disk.segment import ReadResult, Segment, UnsafeSegmentFile

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kv_offload disk", description=__doc__.split("\n\n")[1])
    p.add_argument("command", choices=["list", "verify", "purge"])
    p.add_argument("--path", required=True, help="the disk tier's directory")
    p.add_argument("--namespace", help="a namespace digest in hex (32 digits); purge needs it")
    return p


@contextmanager
def _segments(root_fd: int, ns_hex: str) -> Iterator[tuple[int, list[Segment]]]:
    ns_fd = open_private_subdir(root_fd, ns_hex, f"namespace directory {ns_hex}", create=False)
    segs: list[Segment] = []
    try:
        for name in sorted(os.listdir(ns_fd)):
            stem, _, ext = name.rpartition(".")
            if ext == "idx" and parse_segment_name(stem):
                try:  # each file is checked on its descriptor: regular, ours, one link
                    seg = Segment.open(ns_fd, stem, direct=False, create=False)
                except UnsafeSegmentFile as e:
                    print(f"skipping segment {ns_hex}/{stem}: {e}", file=sys.stderr)
                    continue
                segs.append(seg)
        yield ns_fd, segs
    finally:
        for seg in segs:
            seg.close()
        os.close(ns_fd)


def _valid(seg: Segment, ns: bytes) -> list[tuple[int, bytes]]:
    if seg.header is None or seg.header.namespace != ns:
        return []
    return [
        (slot, e.key) for slot, e in enumerate(seg.entries())
        if e is not None and e.namespace == ns and e.length == seg.header.block_bytes
    ]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_directory(args.path, follow=True)
        if args.namespace is not None and not NAMESPACE_DIR_RE.match(args.namespace.lower()):
            raise DiskTierError(f"--namespace must be 32 hex digits, got {args.namespace!r}")
        if args.command == "purge" and args.namespace is None:
            raise DiskTierError("purge needs --namespace")
        root_fd = os.open(args.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            check_stat(os.fstat(root_fd), f"disk tier directory {args.path!r}")  # what we opened
            names = sorted(n for n in os.listdir(root_fd) if NAMESPACE_DIR_RE.match(n))
            if args.namespace is not None:
                names = [n for n in names if n == args.namespace.lower()]
                if not names:
                    raise DiskTierError(f"no namespace {args.namespace.lower()} under {args.path!r}")
            return {"list": _list, "verify": _verify, "purge": _purge}[args.command](root_fd, names)
        finally:
            os.close(root_fd)
    except (DiskTierError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _list(root_fd: int, names: list[str]) -> int:
    print(f"{'namespace':32}  {'blocks':>8}  {'bytes':>14}  {'segments':>8}  holds (the directory's label)")
    for ns_hex in names:
        with _segments(root_fd, ns_hex) as (ns_fd, segs):
            blocks = nbytes = 0
            for seg in segs:
                n = len(_valid(seg, bytes.fromhex(ns_hex)))
                blocks += n
                nbytes += n * (seg.header.block_bytes if seg.header else 0)
            print(f"{ns_hex:32}  {blocks:>8}  {nbytes:>14}  {len(segs):>8}  {summary(read_label(ns_fd))}")
    return 0


def _verify(root_fd: int, names: list[str]) -> int:
    checked = corrupt = 0
    for ns_hex in names:
        ns = bytes.fromhex(ns_hex)
        with _segments(root_fd, ns_hex) as (_, segs):
            for seg in segs:
                if seg.header is None:
                    continue
                buf = AlignedBuffer(seg.header.block_bytes)
                try:
                    for slot, key in _valid(seg, ns):
                        res = seg.read(slot, key, ns, buf.view, buf)
                        checked += res is not ReadResult.MISS
                        if res is ReadResult.CORRUPT:
                            corrupt += 1
                            print(f"CORRUPT namespace={ns_hex} segment={seg.stem} slot={slot} key={key.hex()}")
                finally:
                    buf.close()
    print(f"verified {checked} blocks: {checked - corrupt} ok, {corrupt} corrupt")
    return 1 if corrupt else 0


def _purge(root_fd: int, names: list[str]) -> int:
    for ns_hex in names:
        deleted = cleared = 0
        with _segments(root_fd, ns_hex) as (ns_fd, segs):
            for seg in segs:
                if seg.try_claim():
                    if not seg.still_linked():  # another purge removed or replaced it meanwhile
                        continue
                    # .idx first: whoever opened the segment before sees it gone once it holds
                    # the lock (still_linked), and no .dat is ever recreated for a live .idx
                    os.unlink(seg.stem + ".idx", dir_fd=ns_fd)
                    if seg.dat_fd >= 0:
                        os.unlink(seg.stem + ".dat", dir_fd=ns_fd)
                    deleted += 1
                else:
                    cleared += sum(seg.clear(slot, None) for slot in range(seg.slots))
            if deleted and not cleared:
                remove_label(ns_fd)  # the label goes with the last segment (a live owner writes it again)
        if deleted and not cleared:
            try:
                os.rmdir(ns_hex, dir_fd=root_fd)
            except OSError:
                pass  # something else lives there; leave it
        print(f"purged {ns_hex}: {deleted} segments deleted, {cleared} blocks cleared in segments in use")
    return 0
