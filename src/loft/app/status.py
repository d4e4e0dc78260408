"""How far one run of ``loft finetune`` got (:class:`RunStatus`): what an interruption (Ctrl-C,
SIGTERM) or a failed write reports and undoes."""

from __future__ import annotations

import shutil
import time

from .config import FinetuneConfig
from .errors import Terminated, interruption
from .memory import start_peak_memory
from .rundir import (
    CHECKPOINTS,
    CONFIG_FILE,
    EVAL_BEFORE_FILE,
    LR_SEARCH_DIR,
    LR_SEARCH_FILE,
    STAGING,
    OutputPlan,
    default_output_dir,
    latest_checkpoint,
    search_progress,
)
from .runlock import RunLock

class RunStatus:
    """How far one run of :func:`finetune` got: what an interruption reports and undoes."""

    def __init__(self, cfg: FinetuneConfig, progress: bool = True) -> None:
        self.cfg = cfg
        self.out = default_output_dir(cfg)
        self.t_start = time.perf_counter()
        self.progress = progress
        self.phase = "starting"
        self.output: OutputPlan | None = None  # set once the output directory is touched
        self.main = True
        self.memory = start_peak_memory()  # the run's peak memory (metrics.json: peak_memory_mb)
        self.load_peak_mb: float | None = None
        self.lock: RunLock | None = None  # the output folder's lock (main process), held until the run ends

    def release(self) -> None:
        """Let other processes use the output folder (the end of the run, however it ends)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # -------------------------------------------------------------- interruptions
    def checkpoint_kept(self) -> str | None:
        if self.output is None:
            return None
        found = latest_checkpoint(self.out)
        return str(found) if found else None

    def interrupted(self, signal: BaseException | None = None) -> str:
        """The one line printed when Ctrl-C or SIGTERM (``signal``: the ``KeyboardInterrupt`` or
        ``Terminated`` it raised) stops the run outside the training steps (or a second one
        aborts them): what was kept, and how to go on."""
        what = interruption(signal)[0]
        phase = self.phase
        if phase == "training":
            phase += " (second SIGTERM)" if isinstance(signal, Terminated) else " (second Ctrl-C)"
        return self._stopped(f"{what} while {phase}")

    def write_failed(self, detail: str) -> str:
        """The one line printed when the system refused a write into the output folder (``detail``:
        which write and why, e.g. a full disk): what was kept, and how to go on."""
        line = self._stopped(f"Could not write the run's files: {detail}")
        return f"{line} Make room on that file system (or fix it) first."

    def _stopped(self, where: str) -> str:
        """``where`` and what the stopped run kept; a new run that reached no checkpoint leaves its
        output folder as it found it."""
        if self.output is None:
            return f"{where}; nothing was written (the output directory {str(self.out)!r} is unchanged)."
        checkpoint = latest_checkpoint(self.out) if self.out.is_dir() else None
        if checkpoint is not None:
            kept = f"checkpoint {checkpoint} is kept; continue with the same command plus --resume"
            if self.output.action == "rerun":
                kept += f" (the earlier finished results in {self.out} are unchanged until the rerun completes)"
            return f"{where}; {kept}."
        if self.output.action == "rerun":
            return f"{where}; the finished run in {self.out} is unchanged."
        if self.output.action == "resume":
            return f"{where}; the run in {self.out} is unchanged; continue with --resume."
        if self.out.is_dir() and search_progress(self.out):  # --lr auto: its finished trials are worth keeping
            return (f"{where}; the learning-rate search so far is kept ({self.out / LR_SEARCH_FILE}); continue with the "
                    "same command plus --resume.")
        if self.main:  # a new run that never reached a checkpoint: leave the folder as it was
            for name in (CONFIG_FILE, EVAL_BEFORE_FILE, STAGING, CHECKPOINTS, LR_SEARCH_DIR, LR_SEARCH_FILE):
                path = self.out / name
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            self.release()
            if not self.output.existed and self.out.is_dir() and not any(self.out.iterdir()):
                self.out.rmdir()
        if self.output.action == "overwrite":
            return f"{where}; nothing was kept (--overwrite had removed the previous run in {self.out})."
        if self.output.action == "restart":
            return f"{where}; nothing was kept (no checkpoint yet); run the same command again."
        return f"{where}; nothing was kept (no checkpoint yet), {str(self.out)!r} is as before."
