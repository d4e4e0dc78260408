"""The peak memory of one run, for ``metrics.json`` and the summary line: while loading the
model (``load_peak_memory_mb``), and from then on, training and evaluating (``peak_memory_mb``).

On a GPU: ``torch.cuda.max_memory_allocated`` (tensors torch allocated on this process's GPU,
reset when the run starts). On the CPU: the process's peak resident set size (``VmHWM``), reset
when the run starts where Linux allows it (``/proc/self/clear_refs``), so that the second run of
a ``loft compare`` is not charged with the first one's peak; elsewhere the process's peak since
it started (``getrusage``). Resident memory counts everything the process holds: the Python
interpreter and libraries (a few hundred MiB), the data, and, while loading, the pages of the
model file being read (mapped: a quantized load reads the whole full-precision file), besides
the weights, activations and optimizer state. So the loading peak can exceed the training peak,
and on the CPU a quantized base saves less resident memory than its smaller weights suggest.
"""

from __future__ import annotations

import gc
import resource
import sys
from pathlib import Path

import torch

__all__ = ["PeakMemory", "start_peak_memory"]

_MIB = 2**20


class PeakMemory:
    """Measures the peak memory from its creation (:func:`start_peak_memory`) to :meth:`read`;
    :meth:`restart` starts again (a run: once its model is loaded)."""

    def __init__(self) -> None:
        self.cuda = torch.cuda.is_available()
        self.restart()

    def restart(self) -> None:
        """Measure from now on (collects garbage first)."""
        gc.collect()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.kind = "torch.cuda.max_memory_allocated"
        elif _reset_peak_rss():
            self.kind = "peak RSS"
        else:
            self.kind = "peak RSS of the process since it started"

    def read(self) -> float:
        """Peak memory in MiB since the start."""
        if self.cuda:
            return round(torch.cuda.max_memory_allocated() / _MIB, 1)
        hwm = _status_kib("VmHWM")
        if hwm is not None:
            return round(hwm / 1024, 1)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return round(peak / (_MIB if sys.platform == "darwin" else 1024), 1)


def start_peak_memory() -> PeakMemory:
    """Start measuring a run's peak memory (collects garbage first)."""
    return PeakMemory()


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux >= 4.0); whether it worked."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None
