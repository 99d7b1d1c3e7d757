# SPDX-License-Identifier: Apache-2.0
"""``ManagedProcess.kill`` returns only once the process is gone.

Found by the soak (tests/vllm/test_soak.py): ``kill()`` waited 5 s for a SIGKILLed 1 GB
redis-server, gave up silently while it was still exiting, and the ``start()`` right after
saw it "running" and started nothing: the remote tier never reconnected, and the isolation
check's Redis stage found no Redis.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kv_offload.testing.store_process import ManagedProcess


def _sleeper(tmp_path: Path) -> ManagedProcess:
    proc = ManagedProcess(tmp_path / "sleeper.log")
    proc.spawn([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(600)"])
    return proc


def test_kill_returns_with_the_process_gone_and_a_new_one_can_start(tmp_path: Path) -> None:
    proc = _sleeper(tmp_path)
    first = proc.pid
    assert proc.running()
    proc.kill()
    assert not proc.running() and proc.exit_code() == -9
    proc.spawn([sys.executable, "-c", "import time; time.sleep(600)"])  # refused while the old one runs
    assert proc.running() and proc.pid != first
    proc.kill()
    assert not proc.running()


def test_a_process_that_outlives_the_wait_is_an_error_not_a_silent_return(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proc = _sleeper(tmp_path)
    assert proc._proc is not None
    popen = proc._proc

    def slow_exit(timeout: float | None = None) -> int:
        raise subprocess.TimeoutExpired(popen.args, timeout or 0.0)  # exiting slower than the wait

    monkeypatch.setattr(popen, "wait", slow_exit)
    with pytest.raises(RuntimeError, match=rf"pid {popen.pid} still running 0.5 s after SIGKILL"):
        proc.kill(wait_s=0.5)
    monkeypatch.undo()
    popen.wait(10)  # SIGKILL was sent: it does go
    assert not proc.running()
