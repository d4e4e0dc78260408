"""Crash-safe writes of checkpoints and result files.

Every file ``loft`` keeps (``run_config.json``, ``metrics.json``, the adapter or model files,
plots, ``loft compare``'s table) and every Trainer checkpoint folder is first written under a
temporary name in the same folder, flushed to disk (``fsync``) and then renamed into place
(``os.replace``, atomic on POSIX file systems). A ``kill -9`` at any moment leaves the old file
or the new one, never half of one.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "fsync_tree", "publish_dir", "replace_files", "write_failure", "write_json", "write_text"]


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - a file system without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` to write a temporary file next to ``path``, then move it into place.

    ``write`` may use anything that writes to a path (``torch.save``, ``safetensors``,
    ``savefig``, ...). On any error the temporary file is removed and ``path`` is unchanged.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        _fsync_file(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def replace(src: Path, dst: Path) -> None:
    """``os.replace``: the moment a new file or folder takes the place of the old one (one
    function, so that the crash tests can stop a process exactly here)."""
    os.replace(src, dst)


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, obj: Any, **kwargs: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, **kwargs))


def fsync_tree(folder: str | Path) -> None:
    """Flush every file under ``folder`` (and the folders themselves) to disk."""
    folder = Path(folder)
    for root, _dirs, files in os.walk(folder):
        for name in files:
            _fsync_file(Path(root) / name)
        _fsync_dir(Path(root))


def _readable(folder: Path) -> None:
    """Mode 0644 for every plain file under ``folder``, as :func:`atomic_write` gives its files
    (some writers, safetensors among them, create theirs private: 0600)."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = Path(root) / name
            if not path.is_symlink():
                os.chmod(path, 0o644)


def publish_dir(staged: str | Path, target: str | Path) -> None:
    """Move the complete folder ``staged`` to ``target`` (replacing an existing ``target``).

    ``staged`` is flushed first (its files made 0644); the rename is atomic, so ``target`` is
    either absent, the old folder or the new one. (An old ``target`` is first renamed aside,
    then removed.)
    """
    staged, target = Path(staged), Path(target)
    _readable(staged)
    fsync_tree(staged)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    replace(staged, target)
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def replace_files(staged: str | Path, target: str | Path, last: str | None = None) -> None:
    """Move every file of the complete folder ``staged`` into ``target``, one atomic rename
    each, ``last`` (the file that marks the result as complete) after all the others. Files
    get mode 0644 (:func:`_readable`)."""
    staged, target = Path(staged), Path(target)
    _readable(staged)
    fsync_tree(staged)
    names = sorted(p.name for p in staged.iterdir())
    if last in names:
        names.remove(last)
        names.append(last)
    for name in names:
        src, dst = staged / name, target / name
        if src.is_dir():
            if dst.exists():
                shutil.rmtree(dst)
            replace(src, dst)
        else:
            replace(src, dst)
    _fsync_dir(target)
    shutil.rmtree(staged, ignore_errors=True)


#: free bytes below which a failed write is put down to a full disk (torch's writer does not say why)
_NEARLY_FULL = 1 << 20


def write_failure(e: BaseException, folder: str | Path) -> str | None:
    """Why writing into ``folder`` failed, when ``e`` is a failed write rather than a bug: ``"No
    space left on device"``, ``"Disk quota exceeded"``, ... ; ``None`` for any other error.

    The writers report it differently: Python's files and matplotlib raise ``OSError``;
    safetensors a ``SafetensorError`` naming the ``os error``; ``torch.save``'s zip writer a
    ``RuntimeError`` that names no cause (``unexpected pos ...``, ``iostream error``, seen on a
    full tmpfs), put down to a full disk when the file system has (almost) no space left.
    """
    if isinstance(e, OSError):
        return e.strerror or str(e) or type(e).__name__
    text = str(e)
    found = re.search(r"os error (\d+)", text)
    if found and type(e).__name__ == "SafetensorError":
        return os.strerror(int(found.group(1)))
    if not isinstance(e, RuntimeError):
        return None
    try:
        stat = os.statvfs(folder)
        if stat.f_bavail * stat.f_frsize < _NEARLY_FULL:
            return os.strerror(errno.ENOSPC)
    except OSError:
        pass
    if any(w in text for w in ("inline_container.cc", "PytorchStreamWriter", "iostream error")):
        return "torch could not write the file"
    return None
