"""The error type of the fine-tuning workflow.

Everything the user can get wrong (a model name, a data file, an option) raises
:class:`LoftUsageError` with a message that says what was wrong and what to do; the command
line prints the message (no traceback) and exits with status 2.
"""

from __future__ import annotations

__all__ = ["LoftUsageError", "RunInterrupted"]


class LoftUsageError(Exception):
    """Bad input: a message for the user, printed without a traceback by ``loft``."""


class RunInterrupted(Exception):
    """Training stopped by Ctrl-C after a checkpoint was written (``--resume`` continues)."""

    def __init__(self, message: str, checkpoint: str | None = None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint
