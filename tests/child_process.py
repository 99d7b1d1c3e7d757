# SPDX-License-Identifier: Apache-2.0
"""Run hostile inputs in a child interpreter, so a crash fails one test instead of killing pytest.

``run_child(body)`` runs ``body`` in a fresh ``python -c`` with tests/ importable and
``report(fn)`` defined (one line saying how ``fn()`` ended); ``child_reports(proc)`` asserts the
child exited cleanly, never by a signal, and returns those lines; ``assert_clean(proc, text)``
asserts the same and that the child printed ``text``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

__all__ = ["TESTS", "run_child", "child_reports", "assert_clean"]

TESTS = os.path.dirname(os.path.abspath(__file__))

# Prepended to every child's code: `report(fn)` prints one line saying how fn() ended.
_CHILD_PRELUDE = """
import sys
sys.path.insert(0, {tests!r})
def report(fn):
    try:
        fn()
    except Exception as e:
        print("RAISED", type(e).__name__, str(e).replace("\\n", " "), flush=True)
    else:
        print("RETURNED", flush=True)
"""


def run_child(body: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``body`` in a fresh interpreter with tests/ importable and ``report`` defined."""
    code = _CHILD_PRELUDE.format(tests=TESTS) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)


def child_reports(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """The child's ``report`` lines, after asserting it exited cleanly (not by a signal)."""
    how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
    tail = f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, f"child ended with {how}\n{tail}"
    return [ln for ln in proc.stdout.splitlines() if ln.startswith(("RAISED", "RETURNED"))]


def assert_clean(proc: subprocess.CompletedProcess[str], expect: str) -> None:
    """The child exited with status 0 (not by a signal) and printed ``expect``."""
    assert proc.returncode >= 0, f"child killed by signal {-proc.returncode}\n{proc.stderr}"
    assert proc.returncode == 0, proc.stderr
    assert expect in proc.stdout, proc.stdout + proc.stderr
