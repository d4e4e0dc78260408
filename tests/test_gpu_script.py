"""``benchmarks/gpu.sh`` on a machine without a GPU says so and exits cleanly (issue 14, item 5)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: gpu.sh would run the benchmark")
def test_gpu_script_without_a_gpu_says_so_and_exits_0():
    env = dict(os.environ, PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="")
    results = ROOT / "benchmarks" / "results"
    before = {p.name: p.stat().st_mtime_ns for p in results.iterdir()} if results.exists() else {}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh")], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "no CUDA GPU here" in done.stdout
    after = {p.name: p.stat().st_mtime_ns for p in results.iterdir()} if results.exists() else {}
    assert after == before  # nothing written
