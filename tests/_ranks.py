"""Helpers for the multi-process tests: a free local port; one spawn of a worker module's
``worker(rank, world, port, scenarios, folder)`` over several CPU processes (:func:`run_ranks`);
and the body those workers share (:func:`serve_scenarios`): one gloo process group per launch
that runs every scenario in turn, since starting the processes (importing torch) costs more than
the scenarios themselves."""

from __future__ import annotations

import datetime
import os
import socket
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker: Callable, world: int, scenarios: list[str], folder: Path, deadline: float | None = None) -> list[dict]:
    """Every rank's results (``folder/rank{r}.pt``: scenario -> result); a scenario that raised on
    a rank left ``{"error": traceback}``, which fails the calling test here with that traceback.
    ``deadline``: seconds after which ranks still running are killed and the test fails (a rank
    that waits forever)."""
    context = mp.start_processes(worker, args=(world, free_port(), scenarios, str(folder)), nprocs=world, join=False,
                                 start_method="spawn")
    t0 = time.monotonic()
    while not context.join(timeout=1):
        if deadline is not None and time.monotonic() - t0 > deadline:
            for p in context.processes:
                p.kill()
            raise AssertionError(f"the ranks of {scenarios} still ran after {deadline} s (a rank waits forever)")
    results = [torch.load(Path(folder) / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for r, result in enumerate(results):
        for name, value in result.items():
            assert "error" not in value, f"rank {r}, {name}:\n{value['error']}"
    return results


def serve_scenarios(rank: int, world: int, port: int, scenarios: list[str], out_dir: str,
                    run_one: Callable[[str], dict], timeout_s: float = 60) -> None:
    """A worker process's whole life: join the gloo group (127.0.0.1:``port``, one torch thread),
    run ``run_one(scenario)`` for each scenario with a barrier after each, save
    ``{scenario: result}`` to ``out_dir/rank{rank}.pt`` and leave. A scenario that raises is
    saved as ``{"error": traceback}`` (which :func:`run_ranks` reports) and ends the loop."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    results: dict[str, object] = {}
    try:
        for scenario in scenarios:
            try:
                results[scenario] = run_one(scenario)
            except Exception:  # reported to the test, which fails with it
                results[scenario] = {"error": traceback.format_exc()}
                raise
            dist.barrier()
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        try:
            dist.barrier()  # neither rank tears the group down while the other still uses it
            dist.destroy_process_group()
        finally:
            # Leave without the interpreter's teardown: gloo's background threads can abort the
            # process there ("terminate called without an active exception", seen once in CI after
            # the results were saved), which would fail the test for a reason unrelated to LoFT.
            os._exit(0)
