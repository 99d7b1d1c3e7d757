# SPDX-License-Identifier: Apache-2.0
"""NUMA placement of a memory region (Linux): ``mbind`` before the first touch."""

from __future__ import annotations

import ctypes
import os
import platform

__all__ = ["numa_nodes", "bind_to_node", "node_cpus"]

_MPOL_BIND = 2
_MPOL_MF_MOVE = 1 << 1
_SYS_MBIND = {"x86_64": 237, "aarch64": 235}


def numa_nodes() -> list[int]:
    """Online NUMA nodes (``[0]`` where the kernel exposes none)."""
    path = "/sys/devices/system/node"
    try:
        names = os.listdir(path)
    except OSError:
        return [0]
    nodes = sorted(int(n[4:]) for n in names if n.startswith("node") and n[4:].isdigit())
    return nodes or [0]


def node_cpus(node: int) -> list[int]:
    """CPUs of ``node`` (all CPUs where the kernel exposes no NUMA topology)."""
    try:
        with open(f"/sys/devices/system/node/node{node}/cpulist") as f:
            spec = f.read().strip()
    except OSError:
        return sorted(os.sched_getaffinity(0))
    cpus: list[int] = []
    for part in spec.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            cpus.extend(range(int(lo), int(hi) + 1))
        elif part:
            cpus.append(int(part))
    return cpus


def bind_to_node(address: int, length: int, node: int) -> None:
    """Bind ``[address, address+length)`` (page aligned) to NUMA ``node``.

    Raises ``ValueError`` for a node that does not exist and ``OSError`` when the kernel
    refuses. Pages already touched are moved (``MPOL_MF_MOVE``).
    """
    if node not in numa_nodes():
        raise ValueError(f"numa_node {node} does not exist; nodes on this machine: {numa_nodes()}")
    nr = _SYS_MBIND.get(platform.machine())
    if nr is None:
        raise OSError(f"NUMA binding is not supported on {platform.machine()}")
    maxnode = max(64, node + 1)
    mask = (ctypes.c_ulong * (maxnode // 64 + 1))()
    mask[node // 64] = 1 << (node % 64)
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.syscall(
        ctypes.c_long(nr),
        ctypes.c_void_p(address),
        ctypes.c_ulong(length),
        ctypes.c_int(_MPOL_BIND),
        mask,
        ctypes.c_ulong(maxnode + 1),
        ctypes.c_uint(_MPOL_MF_MOVE),
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mbind to NUMA node {node} failed: {os.strerror(err)}")
