# SPDX-License-Identifier: Apache-2.0
"""scripts/gpu_check.sh on a machine without CUDA: the GPU stages are recorded as skipped.

Runs only the two GPU stages (KVO_CHECK_STAGES), so no build and no benchmark: the
environment probe, the private copy of the tree, pytest's collection of the ``gpu`` tests
(all skip) and results.json. About ten seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the GPU stages would really run"),
    pytest.mark.skipif(shutil.which("bash") is None or shutil.which("tar") is None, reason="needs bash and tar"),
]


def test_cpu_only_run_records_gpu_stages_as_skipped(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, KVO_CHECK_STAGES="gpu_tests,gpu_bench", TMPDIR=str(tmp_path))
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(out)],
        env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no CUDA device" in proc.stdout

    result = json.loads((out / "results.json").read_text())
    assert result["complete"] is True
    assert result["environment"]["cuda_available"] is False
    stages = {s["name"]: s for s in result["stages"]}
    assert list(stages) == ["build", "gpu_tests", "gpu_bench", "cpu_attention"]
    for name in ("build", "cpu_attention"):
        assert stages[name]["status"] == "skipped"
        assert "not selected" in stages[name]["note"]
    for name in ("gpu_tests", "gpu_bench"):
        assert stages[name]["status"] == "skipped", stages[name]
        assert "no CUDA device" in stages[name]["note"]
    # The gpu tests were collected (so they import) and every one skipped.
    assert result["pytest"]["tests"] > 0
    assert result["pytest"]["skipped"] == result["pytest"]["tests"]
    assert result["bench_gpu_transfer"] is None
    # Flat, and no more than the 8 files a remote runner brings back.
    files = sorted(p.name for p in out.iterdir())
    assert all((out / f).is_file() for f in files) and len(files) <= 8, files
    # The private copy of the tree is removed at the end.
    assert not any(p.name.startswith("kvo_gpu_check.") for p in tmp_path.iterdir())
