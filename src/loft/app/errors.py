"""The error types of the fine-tuning workflow.

Everything the user can get wrong (a model name, a data file, an option) raises
:class:`LoftUsageError` with a message that says what was wrong and what to do; the command
line prints the message (no traceback) and exits with status 2. A write into the output folder
that the system refuses (a full disk, a quota) raises :class:`OutputWriteError`: one line saying
what was kept, status 1. Ctrl-C and SIGTERM stop a run the same way (:class:`RunInterrupted`:
status 130, or 143 for SIGTERM).
"""

from __future__ import annotations

import signal

__all__ = ["LoftUsageError", "OutputWriteError", "RunInterrupted", "Terminated", "interruption"]


class LoftUsageError(Exception):
    """Bad input: a message for the user, printed without a traceback by ``loft``."""


class OutputWriteError(Exception):
    """The system refused a write into the output folder (no space left, a quota, an I/O error):
    the message says what could not be written and what was kept; ``loft`` exits with status 1."""


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (``kill``, ``docker stop``, systemd, a Slurm time limit): loft handles it
    where it handles Ctrl-C (:mod:`loft.app.signals`), so it is a ``KeyboardInterrupt``."""


def interruption(e: BaseException | None) -> tuple[str, int]:
    """What stopped the run, as messages say it, and the exit status: ``("Interrupted", 130)``
    for Ctrl-C, ``("Terminated (SIGTERM)", 143)`` for SIGTERM (128 + the signal's number)."""
    if isinstance(e, Terminated):
        return "Terminated (SIGTERM)", 128 + signal.SIGTERM
    return "Interrupted", 128 + signal.SIGINT


class RunInterrupted(Exception):
    """A run stopped by Ctrl-C or SIGTERM, after keeping what it could (a checkpoint: ``--resume``
    continues). ``exit_code``: 130 (Ctrl-C) or 143 (SIGTERM)."""

    def __init__(self, message: str, checkpoint: str | None = None, exit_code: int = 130) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint
        self.exit_code = exit_code
