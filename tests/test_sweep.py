"""benchmarks/_sweep.py: a sweep drained by SIGUSR1 keeps the runs under way and starts no other;
the same sweep then continues without repeating them (child processes that only write a result)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import _sweep  # noqa: E402

WRITE = ("import json, sys, time; time.sleep(0.5); "
         "open(sys.argv[1] + '/metrics.json', 'w').write(json.dumps({'eval_accuracy': 0.5, 'eval_loss': 0.7, "
         "'train_seconds': 1.0}))")


def fake_launches(monkeypatch, drain_at: int | None) -> list[dict]:
    """Replace a run's process by one that writes a result after half a second; the ``drain_at``-th
    launch (1-based) sends this process SIGUSR1, as ``pkill -USR1`` would."""
    started: list[dict] = []

    def launch(run, threads):
        started.append(run)
        if len(started) == drain_at:
            os.kill(os.getpid(), signal.SIGUSR1)
        out = Path(tempfile.mkdtemp(prefix="loft-sweep-test-"))
        (out / "log.txt").write_text("")
        return subprocess.Popen([sys.executable, "-c", WRITE, str(out)]), out, time.perf_counter()

    monkeypatch.setattr(_sweep, "_launch", launch)
    monkeypatch.setattr(_sweep, "provenance", lambda threads, jobs: {"commit": "test"})
    monkeypatch.setattr(_sweep, "_draining", False)
    return started


def test_sigusr1_drains_a_sweep_and_the_same_sweep_continues(monkeypatch, tmp_path, capsys):
    runs = [{"lr": lr} for lr in (1e-4, 2e-4, 4e-4, 8e-4, 1.6e-3)]
    results = tmp_path / "results.jsonl"
    started = fake_launches(monkeypatch, drain_at=2)
    with pytest.raises(SystemExit) as stopped:
        _sweep.run_all(runs, results, jobs=2)
    assert stopped.value.code == _sweep.DRAINED
    assert started == runs[:2]  # the signal came with the second launch: nothing started after it
    kept = [json.loads(line)["run"] for line in results.read_text().splitlines()]
    assert sorted(r["lr"] for r in kept) == [1e-4, 2e-4]  # both runs under way finished and were kept
    assert "starting no new run" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGUSR1) is not _sweep._drain  # the handler is put back
    started = fake_launches(monkeypatch, drain_at=None)
    done = _sweep.run_all(runs, results, jobs=2)
    assert started == runs[2:] and len(done) == 5  # the same sweep continues; nothing runs twice
    assert len(results.read_text().splitlines()) == 5
