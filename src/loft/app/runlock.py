"""One process at a time in an output folder: an OS lock on ``<folder>/.loft.lock``.

A run (``loft finetune``, ``loft federate``) or a comparison (``loft compare``, on its own
folder; each of its runs locks its run folder) takes the lock before it changes anything in its
output folder and keeps it until it ends. The lock is ``fcntl.flock`` on the lock file: the
operating system releases it when the process ends, however it ends (``kill -9``, a crash,
a machine reboot), so a lock file left behind never blocks anyone; only a live process does.
The lock file holds the holder's pid, host and command line, for the message that refuses a
second process. Under ``torchrun`` / ``accelerate launch`` rank 0 holds it for every rank.

:func:`folder_in_use` only reads (the output-folder checks, before anything is written);
:meth:`RunLock.acquire` takes the lock (it creates the folder and the lock file) and checks
once more, since another process may have taken the folder since the check.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
from pathlib import Path

from .errors import LoftUsageError

__all__ = ["LOCK_FILE", "RunLock", "folder_in_use", "in_use_error", "listing"]

LOCK_FILE = ".loft.lock"

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock (the folder checks still apply)
    fcntl = None


def listing(folder: Path) -> list[Path]:
    """What ``folder`` holds, leaving out the lock file (a stale one says nothing about the folder)."""
    return [p for p in folder.iterdir() if p.name != LOCK_FILE]


def _holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 65536).decode("utf-8", "replace")
        value = json.loads(text)
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


def folder_in_use(folder: Path) -> dict | None:
    """What is known of the live process (other than this one) that holds ``folder``'s lock:
    ``{"pid", "host", "command"}`` as far as it wrote them; ``None`` when no process holds it.
    Reads only (a missing lock file is not created)."""
    if fcntl is None:
        return None
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None
            holder = _holder(fd)
            if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
                return None  # this process holds it (another file handle of its own)
            return holder
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def in_use_error(folder: Path, holder: dict, flag: str = "--output-dir") -> LoftUsageError:
    """The refusal for a folder another live process is writing: who, and what to do."""
    pid = holder.get("pid")
    who = f"process {pid}" if pid else "another process"
    if holder.get("host") and holder.get("host") != socket.gethostname():
        who += f" on {holder['host']}"
    command = f" ({holder['command']})" if holder.get("command") else ""
    stop = f"stop it (kill {pid} stops it as Ctrl-C does, keeping what it finished)" if pid else "stop it"
    return LoftUsageError(
        f"{flag} {str(folder)!r} is in use: loft {who} is writing to it now{command}. Nothing was changed. Wait "
        f"for it to finish, {stop}, or choose another {flag}."
    )


def _command() -> str:
    args = [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv and sys.argv[0] else []
    text = " ".join(args)
    return text if len(text) <= 300 else text[:297] + "..."


class RunLock:
    """The lock of one output folder, held by this process until :meth:`release`."""

    def __init__(self, folder: Path, fd: int) -> None:
        self.folder = folder
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, folder: str | Path, flag: str = "--output-dir") -> RunLock | None:
        """Take ``folder``'s lock (creating the folder and the lock file), or raise
        :class:`LoftUsageError` naming the process that holds it. ``None`` where the platform
        has no ``flock``."""
        folder = Path(folder)
        if fcntl is None:  # pragma: no cover
            return None
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / LOCK_FILE
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _holder(fd)
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise in_use_error(folder, holder, flag) from None
                raise
            # the previous holder removes the file when it releases: lock the file that is there now
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": _command()}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        return cls(folder, fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Remove the lock file and release the lock (idempotent)."""
        if self._fd is None:
            return
        try:
            (self.folder / LOCK_FILE).unlink(missing_ok=True)
        except OSError:
            pass
        os.close(self._fd)  # closing the last handle releases the flock
        self._fd = None
