"""One ``loft federate`` run: check, load, split, simulate, record.

:func:`federate` checks every input before anything is written (the options, the data, the
model, the split, the output folder, with ``loft finetune``'s own checks), then runs Flower's
simulation engine (``flwr.simulation.run_simulation``, its Ray backend: one actor per CPU, each
serving clients in turn) with the ``ServerApp`` of :mod:`.server` in this process and the
``ClientApp`` of :mod:`.client` in the actors, and writes into the output folder:

* ``run_config.json``: the settings (as ``loft finetune`` does);
* ``rounds.jsonl``: one line per round (round 0: the evaluation before training), written into
  ``.incoming/rounds.jsonl`` as each round finishes and moved in with the other results;
* ``metrics.json``: every round, the split and a summary (moved in last: a run is finished when
  it is there);
* ``accuracy.png``: accuracy and aggregation error per round.

As with ``loft finetune``, a rerun of a finished run (same settings) keeps its results until the
new ones are complete, and the folder's lock (:mod:`loft.app.runlock`) keeps a second process out
while a run writes it.

Offline: Flower's telemetry (``FLWR_TELEMETRY_ENABLED=0``) and Ray's usage statistics
(``RAY_USAGE_STATS_ENABLED=0``) are off, nothing is installed at run time, Ray keeps its files
in a temporary folder removed afterwards, and the run waits until every process Ray started has
ended (:func:`leftover_processes`; ones still there after :data:`PROCESS_WAIT_S` are killed).

Interrupted (Ctrl-C, SIGTERM) during the simulation, the run cleans up the same way: the
ServerApp's thread stops waiting for replies, Ray is shut down, its processes are waited for (and
killed if need be) and its temporary folder removed. Ctrl-C and SIGTERM then raise
:class:`~loft.app.errors.RunInterrupted` (``loft`` exits with status 130, or 143 = 128 + 15 for
SIGTERM), with one line on stderr; ``rounds.jsonl`` keeps the rounds that finished (a rerun of a
finished run keeps that run's results instead). loft starts Ray itself (:func:`_start_ray`) so that it can put its own SIGTERM handler
back after ``ray.init``.
"""

from __future__ import annotations

import os

os.environ["FLWR_TELEMETRY_ENABLED"] = "0"  # read when flwr is imported
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

import json  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
import warnings  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

from ... import __version__  # noqa: E402
from ... import federated as fed  # noqa: E402
from ..atomic import replace_files, write_failure, write_json  # noqa: E402
from ..errors import LoftUsageError, OutputWriteError, RunInterrupted, Terminated, interruption  # noqa: E402
from ..rundir import (  # noqa: E402
    CONFIG_FILE,
    METRICS_FILE,
    STAGING,
    OutputPlan,
    apply_output_plan,
    check_output_dir,
    take_output_dir,
)
from .config import FederateConfig  # noqa: E402

__all__ = ["PROCESS_WAIT_S", "ROUNDS_FILE", "Terminated", "federate", "leftover_processes"]

ROUNDS_FILE = "rounds.jsonl"
PLOT_FILE = "accuracy.png"
#: seconds to wait for Ray's processes to end after the simulation
PROCESS_WAIT_S = 30.0
#: the environment variable that marks every process of one run (Ray's processes inherit it)
RUN_MARKER = "LOFT_FEDERATE_RUN"
#: the marker of the last run this process started (tests look for its processes)
LAST_RUN_MARKER: str | None = None


def _raise_terminated(signum: int, frame: Any) -> None:
    _FLOWER_MUTE.tearing_down.set()
    raise Terminated


def _raise_interrupt(signum: int, frame: Any) -> None:
    _FLOWER_MUTE.tearing_down.set()
    raise KeyboardInterrupt


def leftover_processes(marker: str, variable: str = RUN_MARKER) -> list[int]:
    """Pids of live processes (not zombies) whose environment has ``variable=marker`` (by default
    ``LOFT_FEDERATE_RUN=marker``), other than this one (Linux ``/proc``; an empty list elsewhere)."""
    needle = f"{variable}={marker}".encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        pid = int(entry.name)
        if pid == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(pid)
        except OSError:
            continue
    return found


def _end_processes(marker: str) -> list[int]:
    """Wait for the run's other processes to end; kill (by pid) those still there after
    :data:`PROCESS_WAIT_S`. Returns the pids that had to be killed."""
    deadline = time.monotonic() + PROCESS_WAIT_S
    while (pids := leftover_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return pids


class _MuteWhileTearingDown(logging.Filter):
    """Drops Flower's log records from the moment a simulation is interrupted (Ctrl-C, SIGTERM) or
    ends: Flower's own clean-up ends the Ray actors, and its threads still waiting on a client
    then report that as an error with a traceback (whenever a client was training at Ctrl-C)."""

    def __init__(self) -> None:
        super().__init__()
        self.tearing_down = threading.Event()

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.tearing_down.is_set()


_FLOWER_MUTE = _MuteWhileTearingDown()


def _quiet_flower() -> None:
    """Flower and Ray say only errors (call after importing flwr, whose logger module sets its own
    level when imported): Flower's notice that ``run_simulation`` is deprecated, Ray's "Started a
    local Ray instance" and the like are nothing a user of ``loft federate`` can act on. Ray prints
    what its actors write without colour codes unless stderr is a terminal."""
    logger = logging.getLogger("flwr")
    logger.setLevel(logging.ERROR)
    if _FLOWER_MUTE not in logger.filters:
        logger.addFilter(_FLOWER_MUTE)
    _FLOWER_MUTE.tearing_down.clear()
    warnings.filterwarnings("ignore", message=".*RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO.*")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not sys.stderr.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


def federate(cfg: FederateConfig, *, overwrite: bool = False, progress: bool = True,
             on_round: Callable[[dict[str, Any], dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run ``cfg`` and return what ``metrics.json`` holds. ``on_round(record, detail)`` (tests) is
    called for every round, see :func:`.server.make_server_app`."""
    from .bench import build_bench

    cfg.check()
    out = cfg.default_output_dir()
    plan = check_output_dir(out, cfg.identity(), overwrite=overwrite, resume=False)
    t_start = time.perf_counter()
    bench = build_bench(cfg)  # the server's model: the global state, evaluated each round
    labels = list(bench.task.train_labels)
    if len(labels) < cfg.clients:
        raise LoftUsageError(f"Cannot split {len(labels)} training examples over --clients {cfg.clients}: every client "
                             f"needs at least one. Give --clients {len(labels)} or fewer, or more training data.")
    try:
        split = fed.dirichlet_split(labels, cfg.clients, cfg.alpha, cfg.seed)
    except ValueError as e:
        raise LoftUsageError(f"--split {cfg.split} over --clients {cfg.clients}: {e}") from None

    # every input is checked: only now touch the output folder (its lock held until the run ends)
    lock = take_output_dir(out, plan.snapshot)
    try:
        return _run(cfg, out, plan, bench, split, labels, t_start, progress, on_round)
    finally:
        if lock is not None:
            lock.release()


def _run(cfg: FederateConfig, out: Path, plan: OutputPlan, bench: Any, split: list[list[int]], labels: list[int],
         t_start: float, progress: bool, on_round: Callable | None) -> dict[str, Any]:
    """The run in its locked output folder: the simulation, then the results moved in."""
    staging = out / STAGING
    try:
        apply_output_plan(out, plan)
        write_json(out / CONFIG_FILE, {"settings": cfg.identity(), "command": "federate", "loft_version": __version__})
        staging.mkdir()
        (staging / ROUNDS_FILE).write_text("", encoding="utf-8")
    except OSError as e:
        raise OutputWriteError(f"Could not write to {str(out)!r}: {write_failure(e, out)}.") from None
    rounds: list[dict[str, Any]] = []

    def record(rec: dict[str, Any], detail: dict[str, Any]) -> None:
        rounds.append(rec)
        try:
            with open(staging / ROUNDS_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
        except OSError:  # a full disk: the rounds are kept in memory and written whole at the end
            pass
        if progress:
            acc = f"accuracy {rec['eval_accuracy']:.4f}, loss {rec['eval_loss']:.4f}"
            if rec["round"] == 0:
                print(f"round 0/{cfg.rounds} (before training): {acc}", flush=True)
            else:
                print(f"round {rec['round']}/{cfg.rounds}: {acc}, train loss {rec['train_loss']:.4f}, aggregation "
                      f"error {rec['aggregation_error']:.2e}, {max(rec['bytes_up']) / 1024:,.1f} KiB up per client, "
                      f"{rec['seconds']:.0f} s", flush=True)
        if on_round is not None:
            on_round(rec, detail)

    try:
        seconds, killed = _simulate(cfg, bench, split, record)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (Terminated)
        what, code = interruption(e)
        raise RunInterrupted(_interrupted(what, cfg, out, plan, rounds), exit_code=code) from None
    if len(rounds) != cfg.rounds + 1:
        raise RuntimeError(f"the simulation ended after {len(rounds) - 1} of {cfg.rounds} rounds")
    metrics = _metrics(cfg, bench, split, labels, rounds, seconds, time.perf_counter() - t_start, killed)
    try:
        _write_results(cfg, out, staging, rounds, metrics)
    except Exception as e:
        why = write_failure(e, out)
        if why is None:
            raise
        for name in (PLOT_FILE, METRICS_FILE):  # the partial files: they would keep the disk full
            (staging / name).unlink(missing_ok=True)
        raise OutputWriteError(f"{why} while writing the results into {str(out)!r}. {_keep_rounds(out, plan)} Make "
                               "room on that file system first.") from None
    return metrics


def _write_results(cfg: FederateConfig, out: Path, staging: Path, rounds: list[dict[str, Any]],
                   metrics: dict[str, Any]) -> None:
    """Every round, the plot and ``metrics.json`` into ``staging``, then moved into ``out``
    (``metrics.json``, which marks the run finished, last)."""
    from ..plots import plot_rounds

    (staging / ROUNDS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rounds), encoding="utf-8")
    name = f"{cfg.method}-r{cfg.rank}" if cfg.method != "full" else "full"
    plot_rounds({name: rounds}, staging / PLOT_FILE,
                f"{name}, {cfg.aggregator_name}, {cfg.clients} clients, split {cfg.split}")
    write_json(staging / METRICS_FILE, metrics)
    (out / METRICS_FILE).unlink(missing_ok=True)  # a crash among the moves leaves an unfinished run, not a mix
    replace_files(staging, out, last=METRICS_FILE)


def _interrupted(what: str, cfg: FederateConfig, out: Path, plan: OutputPlan, rounds: list[dict[str, Any]]) -> str:
    """What an interruption says, after keeping what it can (:func:`_keep_rounds`)."""
    done = max(len(rounds) - 1, 0)
    where = f"{what} after {done} of {cfg.rounds} rounds; Ray's processes and temporary files were removed."
    return f"{where} {_keep_rounds(out, plan)}"


def _keep_rounds(out: Path, plan: OutputPlan) -> str:
    """Keep what a stopped run can: the finished rounds of a new run go to ``rounds.jsonl``; a
    rerun leaves the finished run's results as they were. Returns the sentence that says so."""
    staged = out / STAGING / ROUNDS_FILE
    if plan.action == "rerun":
        return (f"The finished run in {out} is unchanged (this attempt's rounds are in {staged} until the next run); "
                "there is no --resume.")
    try:
        os.replace(staged, out / ROUNDS_FILE)
        shutil.rmtree(out / STAGING, ignore_errors=True)
    except OSError:
        return f"{staged} holds the finished rounds; there is no --resume: run the same command again."
    return f"{out / ROUNDS_FILE} holds the finished rounds; there is no --resume: run the same command again."


def _simulate(cfg: FederateConfig, bench: Any, split: list[list[int]], record: Callable) -> tuple[float, list[int]]:
    """Run the federation in Flower's simulation engine; returns (seconds, pids that had to be killed).

    Cleans up (Ray shut down, its processes ended, its folder removed) however it ends; SIGTERM
    raises :class:`Terminated` (from loft's handler, or from the one ``ray.init`` installs, which
    calls ``sys.exit(SIGTERM)``), and the previous SIGTERM handler is put back afterwards."""
    from flwr.simulation import run_simulation

    from .client import THREADS_VAR
    from .client import app as client_app
    from .server import make_server_app

    _quiet_flower()

    marker = uuid.uuid4().hex
    parallel = cfg.parallel or max(1, min(cfg.clients, os.cpu_count() or 1))
    ray_dir = tempfile.mkdtemp(prefix="loft-ray-")
    saved_env = {k: os.environ.get(k) for k in (RUN_MARKER, THREADS_VAR, "PYTHONPATH")}
    os.environ[RUN_MARKER] = marker  # inherited by every process Ray starts
    os.environ[THREADS_VAR] = "1"  # one CPU per actor (client_resources below)
    global LAST_RUN_MARKER
    LAST_RUN_MARKER = marker
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0},
               "init_args": {"num_cpus": parallel, "num_gpus": 0, "object_store_memory": 128 * 2**20,
                             "_temp_dir": ray_dir, "include_dashboard": False, "logging_level": logging.ERROR}}
    stop = threading.Event()  # tells the ServerApp's thread to stop waiting for replies
    on_main = threading.current_thread() is threading.main_thread()
    previous_term = signal.getsignal(signal.SIGTERM)
    if previous_term is None:  # set outside Python: put back the default
        previous_term = signal.SIG_DFL
    previous_int = signal.getsignal(signal.SIGINT)
    # Python's Ctrl-C (not one ignored, as in a background job, nor a caller's own handler)
    own_int = on_main and previous_int is signal.default_int_handler
    if on_main:
        signal.signal(signal.SIGTERM, _raise_terminated)
    if own_int:
        signal.signal(signal.SIGINT, _raise_interrupt)
    start = time.perf_counter()
    try:
        _start_ray(backend["init_args"])
        if on_main:  # ray.init replaced the SIGTERM handler, in Python and in C (Ray's failure-signal handler)
            signal.signal(signal.SIGTERM, _raise_terminated)
        run_simulation(server_app=make_server_app(bench, split, on_round=record, stop=stop), client_app=client_app,
                       num_supernodes=cfg.clients, backend_config=backend)
    except SystemExit as e:  # ray.init's SIGTERM handler
        if e.code != signal.SIGTERM:
            raise
        raise Terminated from None
    finally:
        stop.set()
        _FLOWER_MUTE.tearing_down.set()  # cleared by the next run's _quiet_flower
        try:
            for key, value in saved_env.items():  # Flower's Ray backend sets PYTHONPATH in this process
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            _shutdown_ray()
            killed = _end_processes(marker)
        finally:
            shutil.rmtree(ray_dir, ignore_errors=True)
            if on_main:
                signal.signal(signal.SIGTERM, previous_term)
            if own_int:
                signal.signal(signal.SIGINT, previous_int)
    return time.perf_counter() - start, killed


def _start_ray(init_args: dict[str, Any]) -> None:
    """``ray.init`` as Flower's Ray backend would call it (which then finds Ray started and uses
    it): so that loft can put its own SIGTERM handler back afterwards. Ray's failure-signal
    handler, which ``ray.init`` installs for SIGTERM too, can abort the process when SIGTERM
    arrives during the simulation (exit status 134, Ray's folder left behind)."""
    import ray

    if ray.is_initialized():  # started by the caller: Flower's backend uses it as it is
        return
    pythonpath = os.pathsep.join(sys.path)  # what Flower's backend passes its actors
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **init_args)


def _shutdown_ray() -> None:
    """``ray.shutdown()`` if Ray is still up (Flower shuts it down when the simulation ends, but
    not when it is interrupted while Ray starts)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _metrics(cfg: FederateConfig, bench: Any, split: list[list[int]], labels: list[int], rounds: list[dict[str, Any]],
             sim_seconds: float, seconds: float, killed: list[int]) -> dict[str, Any]:
    import flwr
    import ray
    import torch

    last = rounds[-1]
    trained = rounds[1:]
    return {
        "eval_accuracy": last["eval_accuracy"],
        "eval_loss": last["eval_loss"],
        "eval_accuracy_before": rounds[0]["eval_accuracy"],
        "eval_loss_before": rounds[0]["eval_loss"],
        "best_eval_accuracy": max(r["eval_accuracy"] for r in trained),
        "rounds": rounds,
        "bytes_up_total": sum(sum(r["bytes_up"]) for r in trained),
        "bytes_down_total": sum(r["bytes_down"] * cfg.clients for r in trained),
        "method": cfg.method,
        "aggregator": cfg.aggregator_name,
        "residual": cfg.residual if cfg.aggregator_name == "product" else None,
        "state": "keep" if cfg.keep_state else "reset",
        "rank": None if cfg.method == "full" else cfg.rank,
        "clients": cfg.clients,
        "local_steps": cfg.local_steps,
        "split": cfg.split,
        "client_examples": [len(s) for s in split],
        "client_labels": [dict(sorted(Counter(str(bench.task.label_names[labels[i]]) for i in s).items())) for s in split],
        "lr": cfg.method_lr,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "model": cfg.model or bench.task.default_model,
        "data": cfg.data,
        "num_train": bench.task.num_train,
        "num_eval": bench.task.num_eval,
        "simulation_seconds": round(sim_seconds, 2),
        "seconds": round(seconds, 2),
        "processes_killed": len(killed),
        "loft_version": __version__,
        "torch_version": torch.__version__,
        "flwr_version": flwr.__version__,
        "ray_version": ray.__version__,
    }
