"""Helpers for the multi-process tests: a free local port, and one spawn of a worker module's
``worker(rank, world, port, scenarios, folder)`` over several CPU processes."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker: Callable, world: int, scenarios: list[str], folder: Path) -> list[dict]:
    """Every rank's results (``folder/rank{r}.pt``: scenario -> result); a scenario that raised on
    a rank left ``{"error": traceback}``, which fails the calling test here with that traceback."""
    mp.start_processes(worker, args=(world, free_port(), scenarios, str(folder)), nprocs=world, join=True, start_method="spawn")
    results = [torch.load(Path(folder) / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for r, result in enumerate(results):
        for name, value in result.items():
            assert "error" not in value, f"rank {r}, {name}:\n{value['error']}"
    return results
