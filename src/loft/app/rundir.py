"""A run's output directory: what it holds, and what a run may do with it.

:func:`check_output_dir` decides, reading only, whether a run starts anew, replaces a run
(``--overwrite``), reruns a finished one or resumes an interrupted one (``--resume``), and
refuses a folder it must not use (also one another live process is writing: see
:mod:`loft.app.runlock`); :func:`take_output_dir` then takes the folder's lock and
:func:`apply_output_plan` makes the folder ready. The checkpoint helpers find the newest complete
checkpoint (a kill can leave a damaged one).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import LoftUsageError
from .runlock import RunLock, folder_in_use, in_use_error, listing

__all__ = [
    "CHECKPOINTS",
    "CONFIG_FILE",
    "EVAL_BEFORE_FILE",
    "LR_SEARCH_DIR",
    "LR_SEARCH_FILE",
    "METRICS_FILE",
    "PROGRESS_FILE",
    "STAGING",
    "OutputPlan",
    "apply_output_plan",
    "check_output_dir",
    "check_writable",
    "checkpoint_damage",
    "checkpoint_name",
    "checkpoints_in",
    "clear_folder",
    "default_output_dir",
    "file_damage",
    "latest_checkpoint",
    "read_run_config",
    "run_name",
    "folder_snapshot",
    "search_progress",
    "take_output_dir",
]

CONFIG_FILE = "run_config.json"
METRICS_FILE = "metrics.json"
CHECKPOINTS = "checkpoints"
EVAL_BEFORE_FILE = "eval_before.json"
#: Where files are written before they are renamed into place (result files; in checkpoints/: checkpoints).
STAGING = ".incoming"
#: In each checkpoint: the per-step training losses and training seconds so far (metrics after --resume).
PROGRESS_FILE = "loft_progress.json"
#: ``--lr auto``: the learning-rate search's record, and its scratch folder while it runs (loft/app/autolr.py)
LR_SEARCH_FILE = "lr_search.json"
LR_SEARCH_DIR = "lr_search"


def run_name(method: str, rank: int) -> str:
    """``loft-r4``; ``full`` for full fine-tuning (which has no rank)."""
    return "full" if method == "full" else f"{method}-r{rank}"


def default_output_dir(cfg: Any) -> Path:
    """``--output-dir``, or ``runs/<data>-<method>-r<rank>``."""
    return Path(cfg.output_dir or Path("runs") / f"{Path(cfg.data).stem}-{run_name(cfg.method, cfg.rank)}")


def checkpoint_name(step: int) -> str:
    """``checkpoint-<step>``: the folder name ``transformers.Trainer`` gives the checkpoint of a
    step (and ``resume_from_checkpoint=True`` looks for); tests/test_library_internals.py checks
    that a Trainer run writes exactly this name."""
    return f"checkpoint-{step}"


def checkpoints_in(out: Path) -> list[Path]:
    """Published checkpoint folders, newest first (``.incoming`` holds ones being written)."""
    folder = out / CHECKPOINTS
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]), reverse=True)


def latest_checkpoint(out: Path) -> Path | None:
    found = checkpoints_in(out)
    return found[0] if found else None


def search_progress(out: Path) -> bool:
    """Whether an unfinished run in ``out`` has a learning-rate search (``--lr auto``) to continue:
    finished trials in ``lr_search.json``, or a trial's checkpoint. Like a checkpoint, it makes the
    run one to ``--resume`` rather than to start again."""
    try:
        record = json.loads((out / LR_SEARCH_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = None
    if isinstance(record, dict) and record.get("trials"):
        return True
    scratch = out / LR_SEARCH_DIR
    return scratch.is_dir() and any(latest_checkpoint(d) is not None for d in scratch.iterdir() if d.is_dir())


def file_damage(path: Path) -> str | None:
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
            why = file_damage(path)
            if why:
                return f"{path.name}: {why}"
    return None


def _complete_checkpoint(out: Path) -> Path | None:
    """The newest checkpoint whose every file loads; a clear error when all are damaged."""
    found = checkpoints_in(out)
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


def read_run_config(out: Path) -> dict[str, Any]:
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


def check_writable(out: Path) -> None:
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
    run of the same settings, kept until the new result is complete), ``restart`` (an unfinished
    run of the same settings that left no checkpoint: started again) or ``resume``."""

    action: str
    checkpoint: Path | None = None
    existed: bool = False  # the folder existed before this run
    snapshot: tuple = ()  # what the folder held when checked (take_output_dir: unchanged since)


def folder_snapshot(out: Path) -> tuple:
    """The folder's entries and their modification times (the lock file left out)."""
    try:
        return tuple(sorted((p.name, p.stat().st_mtime_ns) for p in listing(out)))
    except OSError:
        return ()


def clear_folder(out: Path) -> None:
    """Remove everything in ``out`` except the lock file (held by this process)."""
    for path in listing(out):
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def take_output_dir(out: Path, snapshot: tuple, flag: str = "--output-dir") -> RunLock | None:
    """Take the lock of ``out`` (creating the folder) for this process, after its checks: refuses
    it when another live process holds it, or when the folder changed since it was checked
    (``snapshot``: another process used it meanwhile). Nothing is changed when it refuses."""
    existed = out.exists()
    lock = RunLock.acquire(out, flag)
    if folder_snapshot(out) != snapshot:
        if lock is not None:
            lock.release()
        if not existed:
            try:
                out.rmdir()
            except OSError:
                pass
        raise LoftUsageError(
            f"{flag} {str(out)!r} changed while this command was loading (another loft process used it); nothing "
            "was changed. Run the command again."
        )
    return lock


def is_new_output_dir(out: Path, *, overwrite: bool, resume: bool, holds: str) -> bool:
    """The checks every output folder gets (a run's or a comparison's, which ``holds`` names),
    reading only: whether ``out`` is missing or empty, and then writable. Refuses contradicting
    flags, a file, and ``--resume`` with nothing to resume."""
    if overwrite and resume:
        raise LoftUsageError("--overwrite and --resume contradict each other; pass one of them.")
    if out.exists() and not out.is_dir():
        raise LoftUsageError(f"--output-dir {str(out)!r} is a file; give a folder.")
    holder = folder_in_use(out) if out.is_dir() else None
    if holder is not None:
        raise in_use_error(out, holder)
    if out.exists() and listing(out):
        return False
    if resume:
        raise LoftUsageError(f"Nothing to resume: {str(out)!r} holds no {holds}. Run without --resume.")
    check_writable(out)
    return True


def check_output_dir(out: Path, identity: dict[str, Any], *, overwrite: bool, resume: bool) -> OutputPlan:
    """Decide what this run does with ``out``, reading only: refuse (``LoftUsageError``) a folder
    the run must not use. Nothing is written here."""
    plan = _decide(out, identity, overwrite=overwrite, resume=resume)
    return dataclasses.replace(plan, snapshot=folder_snapshot(out))


def _decide(out: Path, identity: dict[str, Any], *, overwrite: bool, resume: bool) -> OutputPlan:
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
    check_writable(out)
    if overwrite:
        return OutputPlan("overwrite", existed=True)
    from .config import ABSENT_WHEN_OFF

    saved = read_run_config(out)["settings"]
    # a setting the saved run has on and these settings leave out (off) differs too
    keys = [*identity, *(k for k in ABSENT_WHEN_OFF if k not in identity and saved.get(k))]
    diffs = [f"{k}: {_shown(k, saved.get(k), saved)} there, {_shown(k, identity.get(k), identity)} now"
             for k in keys if saved.get(k) != identity.get(k)]
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
            if search_progress(out):  # stopped in its learning-rate search (or before training): continue it
                return OutputPlan("resume", None, existed=True)
            return OutputPlan("restart", existed=True)  # stopped before its first checkpoint
        return OutputPlan("resume", checkpoint, existed=True)
    if not finished:
        if latest_checkpoint(out) is None and not search_progress(out):  # nothing to continue or lose
            return OutputPlan("restart", existed=True)
        raise LoftUsageError(
            f"Output directory {str(out)!r} holds an unfinished run of these settings; nothing was changed. Continue "
            "it with the same command plus --resume, or pass --overwrite to start it again."
        )
    return OutputPlan("rerun", existed=True)


def _shown(key: str, value: Any, settings: dict[str, Any]) -> str:
    """A setting as the difference message shows it: a default (``None``) as its effective value."""
    if value is not None:
        return repr(value)
    from .config import DEFAULT_HEAD_LR, DEFAULT_LR, DEFAULT_MAX_STEPS

    if key == "lr" and settings.get("method") in DEFAULT_LR:
        return f"{DEFAULT_LR[settings['method']]!r} (the default)"
    if key == "head_lr":
        return f"{DEFAULT_HEAD_LR!r} (the default)"
    if key == "max_steps" and settings.get("epochs") is None:
        return f"{DEFAULT_MAX_STEPS!r} (the default)"
    if key in ("lr_search_min_gain", "lr_search_cap"):  # absent: off, --lr auto's rule 2 (before rule 4)
        return "off (rule 2, the --lr auto of earlier versions)"
    return "the default"


def apply_output_plan(out: Path, plan: OutputPlan) -> None:
    """Make ``out`` ready (main process). A finished run being rerun keeps its results until the
    new ones are complete; only leftovers of an earlier interrupted attempt are removed."""
    if plan.action == "overwrite":
        print(f"Replacing the run in {out} (--overwrite).", flush=True)
        clear_folder(out)
    elif plan.action == "restart":
        print(f"The run in {out} stopped before its first checkpoint; starting it again.", flush=True)
        clear_folder(out)
    elif plan.action == "rerun":
        print(f"Rerunning the finished run in {out}; its results stay until the new ones are complete.", flush=True)
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
        shutil.rmtree(out / STAGING, ignore_errors=True)
        (out / EVAL_BEFORE_FILE).unlink(missing_ok=True)
    elif plan.action == "resume":
        shutil.rmtree(out / CHECKPOINTS / STAGING, ignore_errors=True)  # a checkpoint a kill left half-written
        shutil.rmtree(out / STAGING, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
