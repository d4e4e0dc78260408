"""Where a result came from: the commit, the library versions, the threads and the machine load.

Every result line a benchmark writes carries :func:`provenance` so a reader can tell which code
produced it and on what; nothing in it names a path of the machine.
"""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
LIBRARIES = ("torch-loft", "torch", "transformers", "peft", "accelerate")


def commit() -> str:
    """The checked-out commit (short hash), with ``+dirty`` when tracked files under ``src/`` or
    ``benchmarks/`` differ from it (what the result depends on; not the result files under
    ``benchmarks/results/``, which runs append to while others run); ``unknown`` outside a git
    checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "src", "benchmarks",
                                ":(exclude)benchmarks/results"],
                               cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def versions() -> dict[str, str]:
    """Python and the installed versions of the libraries a result depends on."""
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def provenance(threads: int, jobs: int = 1) -> dict[str, Any]:
    """What a result line records about how it was made (no machine paths)."""
    return {"commit": commit(), "versions": versions(), "threads": threads, "jobs": jobs,
            "cpus": os.cpu_count(), "load_1min": round(os.getloadavg()[0], 2)}
