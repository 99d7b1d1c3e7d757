# SPDX-License-Identifier: Apache-2.0
"""``python -m kv_offload disk ...``: the disk tier's command line (see kv_offload.tiers.disk.cli)."""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "disk":
        print("usage: python -m kv_offload disk list|verify|purge --path DIR [--namespace HEX]", file=sys.stderr)
        return 2
    from kv_offload.tiers.disk.cli import main as disk_main

    return disk_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
