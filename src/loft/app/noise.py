"""Log lines and warnings of the libraries loft imports that a user can do nothing about.

bitsandbytes (installed for QLoRA, imported by ``import peft`` and by transformers' ``Trainer``
even without ``--load-in-4bit``) asks the ``kernels`` package, on CPUs with AVX512-BF16, for a
faster CPU 4-bit inference kernel from the Hugging Face hub. ``kernels`` then logs "Skipping
publisher trust check for 'kernels-community/...'" (offline), and bitsandbytes "Failed to load
CPU gemm_4bit_forward ..." when the kernel is not in the local cache or its publisher is not
trusted. Nothing is lost: bitsandbytes falls back to its own code, and loft's 4-bit runs do not
use that inference path at all (``keep_4bit_layers_trainable_on_cpu``). :func:`quiet_library_logs`
drops exactly those records, from those two loggers only (a filter: their other messages, and
the user's own logging, are untouched). It also ignores torch's DeprecationWarning about
``torch.jit.script_method``, which ``loft federate``'s Ray actors raise and Ray forwards. The
``loft`` command calls it first; so do the processes ``loft federate`` starts
(:mod:`loft.app.federated.client`).
"""

from __future__ import annotations

import logging
import warnings

__all__ = ["LIBRARY_NOISE", "quiet_library_logs"]

#: (logger, how its message starts) of each record dropped
LIBRARY_NOISE = (
    ("kernels._internals.hf_hub", "Skipping publisher trust check for 'kernels-community/"),
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),
)


class _Drop(logging.Filter):
    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


def quiet_library_logs() -> None:
    """Drop the records of :data:`LIBRARY_NOISE` (idempotent; call before the libraries load)."""
    # torch's notice that torch.jit.script_method is deprecated, raised in loft federate's Ray actors
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script_method` is deprecated", category=DeprecationWarning)
    for name, start in LIBRARY_NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) and f.start == start for f in logger.filters):
            logger.addFilter(_Drop(start))
