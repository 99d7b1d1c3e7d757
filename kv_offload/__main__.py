# SPDX-License-Identifier: Apache-2.0
"""``python -m kv_offload disk|remote ...``: the lower tiers' command lines (see
kv_offload.tiers.disk.cli and kv_offload.tiers.remote.cli)."""

from __future__ import annotations

import sys

_USAGE = (
    "usage: python -m kv_offload disk list|verify|purge --path DIR [--namespace HEX]\n"
    "       python -m kv_offload remote list|show (--url URL [--prefix P] | --remote JSON) [--namespace HEX]"
)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("disk", "remote"):
        print(_USAGE, file=sys.stderr)
        return 2
    if argv[0] == "disk":
        from kv_offload.tiers.disk.cli import main as disk_main

        return disk_main(argv[1:])
    from kv_offload.tiers.remote.cli import main as remote_main

    return remote_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
