"""Run many :func:`loft.app.finetune.finetune` jobs, each in its own process, and keep their results.

Used by ``real_tasks.py`` and ``lr_defaults.py``. Each run is a dict of :class:`loft.app.finetune.FinetuneConfig` fields;
its result (the run's ``metrics.json`` minus the loss curve's bulk, which eval examples it got
right as a string of 0 and 1 (``eval_correct``, from the run's ``predictions.jsonl``), plus the process's peak
resident memory from ``os.wait4`` and the :func:`_provenance.provenance` of the run: commit, library
versions, threads, machine load at its start) is appended to a JSONL file, so an interrupted sweep
continues where it stopped and a finished run is never repeated. Runs go ``jobs`` at a time,
each with ``threads`` torch threads (on 2 cores: 2 jobs x 1 thread beats 1 x 2 for these
small models). To stop a sweep without losing the runs under way, send its process SIGUSR1
(``pkill -USR1 -f "benchmarks/lr_defaults.py tune"``): it starts no new run, waits for the
running ones, keeps their results and exits (:data:`DRAINED`); the same command continues.

Also: :func:`carve_validation` splits a built-in training set into train / validation files
once (fixed seed), so learning rates are chosen on data the test split never sees.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _provenance import provenance

#: the repository root: data paths in the results are relative to it, and runs start there
REPO = Path(__file__).resolve().parents[1]

KEEP = ("eval_accuracy", "eval_loss", "eval_accuracy_before", "eval_loss_before", "train_loss", "train_loss_last", "steps", "train_seconds", "seconds",
        "trainable_params", "num_train", "num_eval", "lr", "head_lr", "loss_curve", "quantization", "base_model_mb",
        "peak_memory_mb", "load_peak_memory_mb", "peak_memory_kind", "eval_correct", "lr_search", "lr_search_trials")


def key(run: dict[str, Any]) -> str:
    """Identity of a run (its settings, sorted)."""
    return json.dumps(run, sort_keys=True)


def _sources(data: str) -> tuple[Path, Path]:
    """The training file ``data`` names (built in, or a path relative to the repository) and its
    test split (``test.jsonl`` beside a file)."""
    from loft.app.data import BUILTIN_DATASETS, builtin_path

    if data in BUILTIN_DATASETS:
        return builtin_path(data, "train"), builtin_path(data, "test")
    source = REPO / data
    return source, source.with_name("test.jsonl")


def split_paths(data: str, folder: Path) -> tuple[str, str, str]:
    """The (train, val, test) paths, relative to the repository, that :func:`carve_validation`
    returns for ``data`` and ``folder``, named without reading or writing anything (the result
    files name runs by them, so a report can without the data)."""
    test = _sources(data)[1]
    return tuple(str(p.resolve().relative_to(REPO)) for p in (folder / "train.jsonl", folder / "val.jsonl", test))


def validation_split(lines: list[str], n_val: int, seed: int = 1234) -> tuple[list[str], list[str]]:
    """``lines`` (a training file's) as (train, validation): ``n_val`` of them, drawn with ``seed``,
    for validation; each part in the file's order."""
    order = list(range(len(lines)))
    random.Random(seed).shuffle(order)
    return [lines[i] for i in sorted(order[n_val:])], [lines[i] for i in sorted(order[:n_val])]


def carve_validation(data: str, n_val: int, folder: Path, seed: int = 1234) -> tuple[str, str, str]:
    """Split built-in ``data``'s train file (or the file ``data``, a path relative to the repository
    whose test split is ``test.jsonl`` beside it) into ``folder/train.jsonl`` and ``folder/val.jsonl``
    (``n_val`` records, :func:`validation_split`); return (train, val, test) paths relative to the
    repository root (:func:`split_paths`: the result files name them; a user's checkout lives elsewhere).

    A process carves each (source, ``n_val``, ``folder``, ``seed``) once while both files stay in
    place: a benchmark names the splits in every run's settings, and each carving reads and
    shuffles the whole training file."""
    source = _sources(data)[0]
    key = (str(source.resolve()), n_val, str(folder.resolve()), seed)
    files = (folder / "train.jsonl", folder / "val.jsonl")
    if key in _CARVED and all(path.is_file() for path in files):
        return _CARVED[key]
    folder.mkdir(parents=True, exist_ok=True)
    parts = validation_split(source.read_text().splitlines(), n_val, seed)
    for path, part in zip(files, parts):
        text = "\n".join(part) + "\n"
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
    _CARVED[key] = split_paths(data, folder)
    return _CARVED[key]


#: what :func:`carve_validation` has carved in this process, by its arguments
_CARVED: dict[tuple[str, int, str, int], tuple[str, str, str]] = {}


def load_results(path: Path) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            out[key(rec["run"])] = rec
    return out


def _launch(run: dict[str, Any], threads: int) -> tuple[subprocess.Popen, Path, float]:
    """Start one run in a child process (``threads`` torch threads) writing into a fresh folder."""
    out = Path(tempfile.mkdtemp(prefix="loft-sweep-"))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, __file__, json.dumps(run), str(out)]
    log = open(out / "log.txt", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    return proc, out, time.perf_counter()


#: the exit status of a sweep drained by SIGUSR1 (its running runs finished and kept, the rest not started)
DRAINED = 75
_draining = False


def _drain(signum: int, frame: Any) -> None:
    global _draining
    if not _draining:
        print("SIGUSR1: starting no new run; waiting for the running ones (their results are kept)", flush=True)
    _draining = True


def run_all(runs: list[dict[str, Any]], results: Path, *, jobs: int = 2, threads: int = 1) -> dict[str, dict]:
    """Run every run not yet in ``results`` (JSONL); return all results by :func:`key`. SIGUSR1
    drains it: no new run starts, the running ones finish and are kept, then ``SystemExit``
    (:data:`DRAINED`)."""
    done = load_results(results)
    todo = [r for r in runs if key(r) not in done]
    results.parent.mkdir(parents=True, exist_ok=True)
    running: dict[int, tuple[dict, subprocess.Popen, Path, float]] = {}
    total, finished = len(todo), 0
    previous = signal.signal(signal.SIGUSR1, _drain)
    try:
        _run(todo, running, results, done, jobs, threads, total, finished)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    if _draining:
        raise SystemExit(DRAINED)
    return done


def _run(todo: list[dict[str, Any]], running: dict, results: Path, done: dict[str, dict], jobs: int, threads: int,
         total: int, finished: int) -> None:
    """:func:`run_all`'s loop: start runs while there are free jobs (unless draining), keep each
    result as its process ends."""
    while (todo and not _draining) or running:
        while todo and len(running) < jobs and not _draining:
            run = todo.pop(0)
            origin = provenance(threads, jobs)
            proc, out, t0 = _launch(run, threads)
            running[proc.pid] = (run, proc, out, t0, origin)
        pid, status, usage = os.wait4(-1, 0)
        if pid not in running:
            continue
        run, proc, out, t0, origin = running.pop(pid)
        proc.returncode = os.waitstatus_to_exitcode(status)
        finished += 1
        metrics_file = out / "metrics.json"
        if proc.returncode != 0 or not metrics_file.is_file():
            tail = (out / "log.txt").read_text()[-3000:]
            raise RuntimeError(f"run {run} failed (exit {proc.returncode}):\n{tail}")
        metrics = json.loads(metrics_file.read_text())
        rec = {"run": run, **{k: metrics.get(k) for k in KEEP},
               "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "wall_seconds": round(time.perf_counter() - t0, 1),
               "threads": threads, "jobs": jobs, "provenance": origin}
        with results.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        done[key(run)] = rec
        shutil.rmtree(out, ignore_errors=True)
        short = {k: v for k, v in run.items() if k not in ("data", "eval_data", "model")}
        print(f"[{finished}/{total}] {short}: acc {rec['eval_accuracy']:.4f} loss {rec['eval_loss']:.4f} "
              f"train {rec['train_seconds']} s, peak {rec['peak_rss_mib']} MiB", flush=True)


#: a run's settings that are not ``FinetuneConfig``'s but part of its identity, and what of the run's
#: ``metrics.json`` each must equal: the learning-rate search's rule and centre (its default rate)
IDENTITY_ONLY = {"lr_search_rule": "rule", "lr_search_centre": "default_lr"}


def check_identity(identity: dict[str, Any], metrics: dict[str, Any]) -> None:
    """Refuse a run whose identity-only settings (:data:`IDENTITY_ONLY`) say something other than
    what it did (a result filed under the wrong identity would be reused as if it were that run)."""
    search = metrics.get("lr_search") or {}
    for key, value in identity.items():
        if search.get(IDENTITY_ONLY[key]) != value:
            raise SystemExit(f"the run's {key} is {value!r} but its search says {IDENTITY_ONLY[key]} = "
                             f"{search.get(IDENTITY_ONLY[key])!r}: fix the protocol's run_of")


def settings_of(run: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A run's ``FinetuneConfig`` settings and its identity-only ones (:data:`IDENTITY_ONLY`). A
    searched run's gain and cap are what it names: absent, they are off (the search's rule 2), as
    they were when the first searched runs ran, whatever ``--lr auto``'s default is now."""
    settings = dict(run)
    identity = {k: settings.pop(k) for k in IDENTITY_ONLY if k in settings}
    if settings.get("lr") == "auto":
        settings.setdefault("lr_search_min_gain", 0.0)
        settings.setdefault("lr_search_cap", False)
    return settings, identity


def _one(run_json: str, out: str) -> None:
    """Child process: one finetune run into ``out`` (no progress bars, no checkpoints)."""
    import torch

    from loft.app.finetune import FinetuneConfig, finetune

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    settings, identity = settings_of(json.loads(run_json))
    cfg = FinetuneConfig(**settings, output_dir=str(Path(out) / "run"), save_steps=10**9)
    metrics = finetune(cfg, overwrite=True, progress=False)
    check_identity(identity, metrics)
    search = Path(out) / "run" / "lr_search.json"
    if search.is_file():  # every trial (rate, steps, validation accuracy and loss): other rules can be read off them
        metrics["lr_search_trials"] = json.loads(search.read_text())["trials"]
    predictions = Path(out) / "run" / "predictions.jsonl"
    if predictions.is_file():  # which eval examples the run got right, for bootstraps over examples
        metrics["eval_correct"] = "".join("1" if json.loads(line)["correct"] else "0"
                                          for line in predictions.read_text().splitlines())
    (Path(out) / "metrics.json").write_text(json.dumps(metrics))


if __name__ == "__main__":
    _one(sys.argv[1], sys.argv[2])
