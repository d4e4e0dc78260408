"""``loft`` that stops in the middle of writing a checkpoint, for the kill -9 test.

Run as ``python tests/kill_cli.py finetune ...`` with ``LOFT_TEST_SLOW_WRITE=<marker file>``:
checkpoints are saved every 2 steps; while the checkpoint of step 4 is being written, the
``optimizer.pt`` write stops half way, the marker file appears and the process sleeps, so that the
test can ``kill -9`` it at exactly that moment (a checkpoint half on disk).
"""

from __future__ import annotations

import io
import os
import sys
import time
from pathlib import Path

import torch

import loft.app.finetune
from loft.app.cli import main

MARKER = Path(os.environ["LOFT_TEST_SLOW_WRITE"])
_save = torch.save


def slow_save(obj, f, *args, **kwargs):
    path = str(f)
    if "checkpoint-4" in path and path.endswith("optimizer.pt"):
        buf = io.BytesIO()
        _save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        with open(path, "wb") as out:
            out.write(data[: len(data) // 2])
            out.flush()
            os.fsync(out.fileno())
        MARKER.write_text(path)
        time.sleep(600)  # the test kills the process here
    return _save(obj, f, *args, **kwargs)


torch.save = slow_save
_finetune = loft.app.finetune.finetune


def finetune_saving_every_2_steps(cfg, **kwargs):
    cfg.save_steps = 2
    return _finetune(cfg, **kwargs)


loft.app.finetune.finetune = finetune_saving_every_2_steps  # loft.app.cli imports it when the command runs

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
