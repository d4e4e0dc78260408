"""A run's output directory: what it holds, and what a run may do with it.

:func:`check_output_dir` decides, reading only, whether a run starts anew, replaces a run
(``--overwrite``), reruns a finished one or resumes an interrupted one (``--resume``), and
refuses a folder it must not use; :func:`apply_output_plan` then makes the folder ready. The
checkpoint helpers find the newest complete checkpoint (a kill can leave a damaged one).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import LoftUsageError

__all__ = [
    "CHECKPOINTS",
    "CONFIG_FILE",
    "EVAL_BEFORE_FILE",
    "METRICS_FILE",
    "PROGRESS_FILE",
    "STAGING",
    "OutputPlan",
    "apply_output_plan",
    "check_output_dir",
    "checkpoint_damage",
    "default_output_dir",
    "run_name",
]

CONFIG_FILE = "run_config.json"
METRICS_FILE = "metrics.json"
CHECKPOINTS = "checkpoints"
EVAL_BEFORE_FILE = "eval_before.json"
#: Where files are written before they are renamed into place (result files; in checkpoints/: checkpoints).
STAGING = ".incoming"
#: In each checkpoint: the per-step training losses and training seconds so far (metrics after --resume).
PROGRESS_FILE = "loft_progress.json"


def run_name(method: str, rank: int) -> str:
    """``loft-r4``; ``full`` for full fine-tuning (which has no rank)."""
    return "full" if method == "full" else f"{method}-r{rank}"


def default_output_dir(cfg: Any) -> Path:
    """``--output-dir``, or ``runs/<data>-<method>-r<rank>``."""
    return Path(cfg.output_dir or Path("runs") / f"{Path(cfg.data).stem}-{run_name(cfg.method, cfg.rank)}")


def _checkpoints(out: Path) -> list[Path]:
    """Published checkpoint folders, newest first (``.incoming`` holds ones being written)."""
    folder = out / CHECKPOINTS
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]), reverse=True)


def _latest_checkpoint(out: Path) -> Path | None:
    found = _checkpoints(out)
    return found[0] if found else None


def _damage(path: Path) -> str | None:
    """Why the file ``path`` cannot be loaded (truncated, not valid ...), or ``None``."""
    import zipfile

    try:
        if path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix == ".safetensors":
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    return "truncated"
                n = int.from_bytes(head, "little")
                header = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if path.stat().st_size < 8 + n + end:
                return "truncated"
        elif path.suffix in (".pt", ".pth", ".bin"):
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
            if bad is not None:
                return f"damaged entry {bad}"
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile, EOFError) as e:
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else 'unreadable'}"
    return None


def checkpoint_damage(checkpoint: Path) -> str | None:
    """The first file of ``checkpoint`` that cannot be loaded, and why; ``None`` when complete."""
    if not (checkpoint / "trainer_state.json").is_file():
        return "trainer_state.json is missing"
    for path in sorted(checkpoint.iterdir()):
        if path.is_file():
            why = _damage(path)
            if why:
                return f"{path.name}: {why}"
    return None


def _complete_checkpoint(out: Path) -> Path | None:
    """The newest checkpoint whose every file loads; a clear error when all are damaged."""
    found = _checkpoints(out)
    damaged = []
    for checkpoint in found:
        why = checkpoint_damage(checkpoint)
        if why is None:
            if damaged:
                print(f"Skipping damaged {damaged[0]}; resuming from {checkpoint.name}.", flush=True)
            return checkpoint
        damaged.append(f"{checkpoint.name} ({why})")
    if damaged:
        raise LoftUsageError(
            f"Cannot resume the run in {str(out)!r}: its checkpoint is damaged: {damaged[0]}. Nothing was changed. "
            "Start the run again with --overwrite."
        )
    return None


def _read_run_config(out: Path) -> dict[str, Any]:
    path = out / CONFIG_FILE
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(saved, dict) or not isinstance(saved.get("settings"), dict):
            raise ValueError("no 'settings'")
        return saved
    except (OSError, ValueError) as e:
        raise LoftUsageError(
            f"{path} is damaged ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}); nothing was "
            "changed. Start the run again with --overwrite (or choose another --output-dir)."
        ) from None


def _check_writable(out: Path) -> None:
    """Refuse an output directory this process cannot write, before anything is written."""
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise LoftUsageError(f"Cannot create --output-dir {str(out)!r}: {str(probe)!r} is a file.")
    problem = None
    if probe != out:  # the folder does not exist yet: ask, without creating anything next to it
        if not os.access(probe, os.W_OK | os.X_OK):
            problem = "permission denied"
    else:  # the run's own folder: try writing a file there (catches read-only file systems too)
        try:
            fd, name = tempfile.mkstemp(prefix=".loft-write-test-", dir=probe)
            os.close(fd)
            os.unlink(name)
        except OSError as e:
            problem = e.strerror or str(e)
    if problem:
        raise LoftUsageError(
            f"Cannot write to --output-dir {str(out)!r} ({str(probe)!r}: {problem}); nothing was written. "
            "Choose a folder you can write to."
        )


@dataclass(frozen=True)
class OutputPlan:
    """What a run does with its output directory: ``new``, ``overwrite``, ``rerun`` (a finished
    run of the same settings, kept until the new result is complete) or ``resume``."""

    action: str
    checkpoint: Path | None = None
    existed: bool = False  # the folder existed before this run


def is_new_output_dir(out: Path, *, overwrite: bool, resume: bool, holds: str) -> bool:
    """The checks every output folder gets (a run's or a comparison's, which ``holds`` names),
    reading only: whether ``out`` is missing or empty, and then writable. Refuses contradicting
    flags, a file, and ``--resume`` with nothing to resume."""
    if overwrite and resume:
        raise LoftUsageError("--overwrite and --resume contradict each other; pass one of them.")
    if out.exists() and not out.is_dir():
        raise LoftUsageError(f"--output-dir {str(out)!r} is a file; give a folder.")
    if out.exists() and any(out.iterdir()):
        return False
    if resume:
        raise LoftUsageError(f"Nothing to resume: {str(out)!r} holds no {holds}. Run without --resume.")
    _check_writable(out)
    return True


def check_output_dir(out: Path, identity: dict[str, Any], *, overwrite: bool, resume: bool) -> OutputPlan:
    """Decide what this run does with ``out``, reading only: refuse (``LoftUsageError``) a folder
    the run must not use. Nothing is written here."""
    if is_new_output_dir(out, overwrite=overwrite, resume=resume, holds="run"):
        return OutputPlan("new", existed=out.exists())
    if not (out / CONFIG_FILE).is_file():
        if overwrite:
            raise LoftUsageError(
                f"Output directory {str(out)!r} holds no loft run (no {CONFIG_FILE}); --overwrite only replaces a loft "
                "run, so nothing was changed. Choose another --output-dir or empty that folder yourself."
            )
        raise LoftUsageError(
            f"Output directory {str(out)!r} is not empty and holds no loft run; nothing was changed. "
            "Choose another --output-dir."
        )
    _check_writable(out)
    if overwrite:
        return OutputPlan("overwrite", existed=True)
    saved = _read_run_config(out)["settings"]
    diffs = [f"{k}: {saved.get(k)!r} there, {v!r} now" for k, v in identity.items() if saved.get(k) != v]
    if diffs:
        raise LoftUsageError(
            f"Output directory {str(out)!r} already holds a different run ({'; '.join(diffs[:4])}). Nothing was "
            "changed. Choose another --output-dir, or pass --overwrite to replace that run."
        )
    finished = (out / METRICS_FILE).is_file()
    if resume:
        checkpoint = _complete_checkpoint(out)
        if checkpoint is None:
            if finished:
                raise LoftUsageError(f"The run in {str(out)!r} already finished (metrics.json); nothing to resume.")
            raise LoftUsageError(
                f"No checkpoint in {str(out / CHECKPOINTS)!r} to resume from; start again with --overwrite."
            )
        return OutputPlan("resume", checkpoint, existed=True)
    if not finished:
        hint = "continue it with --resume" if _latest_checkpoint(out) is not None else "it left no checkpoint"
        raise LoftUsageError(
            f"Output directory {str(out)!r} holds an unfinished run of these settings ({hint}), or pass --overwrite "
            "to start again."
        )
    return OutputPlan("rerun", existed=True)


def apply_output_plan(out: Path, plan: OutputPlan) -> None:
    """Make ``out`` ready (main process). A finished run being rerun keeps its results until the
    new ones are complete; only leftovers of an earlier interrupted attempt are removed."""
    if plan.action == "overwrite":
        print(f"Replacing the run in {out} (--overwrite).", flush=True)
        shutil.rmtree(out)
    elif plan.action == "rerun":
        print(f"Rerunning the finished run in {out}; its results stay until the new ones are complete.", flush=True)
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
        shutil.rmtree(out / STAGING, ignore_errors=True)
        (out / EVAL_BEFORE_FILE).unlink(missing_ok=True)
    elif plan.action == "resume":
        shutil.rmtree(out / CHECKPOINTS / STAGING, ignore_errors=True)  # a checkpoint a kill left half-written
        shutil.rmtree(out / STAGING, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
