"""``loft finetune`` / ``loft compare`` under ``torchrun`` or ``accelerate launch``.

Every process runs the same command; ``transformers.Trainer`` does the data parallelism (DDP).
What must happen once (the output-folder checks, ``run_config.json``, ``metrics.json``, plots,
adapter files, console output) happens on the main process (rank 0); the other ranks wait for it
and get its result, or its error, so that they stop with the same message instead of hanging.

With one process (no ``WORLD_SIZE`` in the environment, or ``WORLD_SIZE=1``) every helper here is
a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from .errors import LoftUsageError, OutputWriteError

__all__ = [
    "any_rank",
    "barrier",
    "cpu_processes",
    "init_processes",
    "is_main_process",
    "launched_processes",
    "on_main_process",
    "shutdown_processes",
    "world_size",
]

T = TypeVar("T")


def launched_processes() -> int:
    """Number of processes the launcher started (``WORLD_SIZE``, set by torchrun and by
    ``accelerate launch`` for multi-process runs); 1 when not launched that way."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _has_accelerator() -> bool:
    acc = getattr(torch, "accelerator", None)
    if acc is not None and hasattr(acc, "is_available"):
        return bool(acc.is_available())
    return torch.cuda.is_available()


def cpu_processes() -> bool:
    """Several processes on a machine without GPUs: Trainer must be told to use the CPU (and
    gloo), or accelerate would give every process a run of its own."""
    return launched_processes() > 1 and not _has_accelerator()


def _group_running() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init_processes() -> None:
    """Join the process group the launcher set up (does nothing with one process).

    Uses accelerate's ``PartialState``, as ``TrainingArguments`` does later, so the Trainer finds
    the group already running. Safe to call more than once.
    """
    if launched_processes() <= 1 or _group_running():
        return
    from accelerate import PartialState

    cpu = cpu_processes()
    PartialState(cpu=cpu, **({"backend": "gloo"} if cpu else {}))


def shutdown_processes() -> None:
    """Leave the process group before the interpreter exits (no-op with one process): tearing
    gloo down at exit instead can abort a process that has finished its work."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    """Processes in the running group (1 when none is running)."""
    return torch.distributed.get_world_size() if _group_running() else 1


def is_main_process() -> bool:
    """Rank 0 of the running group; before the group starts, ``RANK`` from the launcher."""
    if _group_running():
        return torch.distributed.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def barrier() -> None:
    """Wait for every process (no-op with one)."""
    if _group_running():
        torch.distributed.barrier()


def on_main_process(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn`` on rank 0 only and give every rank its result (picklable).

    When ``fn`` raises on rank 0, rank 0 re-raises it and the other ranks raise the same
    :class:`LoftUsageError` or :class:`OutputWriteError` (or a ``RuntimeError`` naming rank 0's
    error), so no rank is left waiting. A collective: every rank must call it at the same point.
    """
    if not _group_running():
        return fn(*args, **kwargs)
    box: list[Any] = [None]
    error: BaseException | None = None
    if torch.distributed.get_rank() == 0:
        try:
            box[0] = ("ok", fn(*args, **kwargs))
        except Exception as e:  # every rank must still reach the broadcast below
            error = e
            kind = "usage" if isinstance(e, LoftUsageError) else "write" if isinstance(e, OutputWriteError) else "other"
            box[0] = (kind, f"{type(e).__name__}: {e}" if kind == "other" else str(e))
    torch.distributed.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    kind, value = box[0]
    if kind == "usage":
        raise LoftUsageError(value)
    if kind == "write":
        raise OutputWriteError(value)
    if kind == "other":
        raise RuntimeError(f"The main process (rank 0) failed: {value}")
    return value


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """``True`` on every rank when ``flag`` is true on at least one (no-op with one process)."""
    if not _group_running():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())
