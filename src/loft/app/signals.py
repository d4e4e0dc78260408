"""SIGTERM handled as Ctrl-C.

``kill``, ``docker stop``, systemd and Slurm's time limit stop a process with SIGTERM, whose
default action ends Python at once: no message, no checkpoint, a half-written output folder.
While :func:`sigterm_as_interrupt` is active, SIGTERM raises :class:`~loft.app.errors.Terminated`
(a ``KeyboardInterrupt``) instead, so every place that handles Ctrl-C handles it too; during
training :class:`loft.app.callbacks.InterruptCallback` turns it into "checkpoint after this step,
then stop", as for a first Ctrl-C. A process that ignores SIGTERM, or a program that installed
its own handler, is left alone.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .errors import Terminated

__all__ = ["ours_or_default", "raise_terminated", "sigterm_as_interrupt"]


def raise_terminated(signum: int, frame: Any) -> None:
    """The SIGTERM handler outside training: stop like Ctrl-C does."""
    raise Terminated


def ours_or_default(handler: Any) -> bool:
    """Whether a SIGTERM handler is the default action (or one set outside Python) or loft's own:
    the ones loft may replace."""
    return handler in (signal.SIG_DFL, None, raise_terminated)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises :class:`Terminated` (main thread only; the previous handler
    is put back on exit)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if not ours_or_default(previous) or previous is raise_terminated:
        yield
        return
    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
