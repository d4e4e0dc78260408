"""``loft`` with one Ctrl-C pressed during training, for the multi-process tests.

Run as ``torchrun --nproc_per_node 2 tests/ctrl_c_cli.py finetune ...`` with
``LOFT_TEST_CTRL_C_STEP=N``: when step N ends, rank 0 sends SIGINT to its parent, the torchrun
launcher, which is what a terminal's Ctrl-C does (torchrun starts its workers in sessions of their
own, so the terminal reaches torchrun only, and torchrun forwards SIGINT to every worker). Rank 0
then waits a few seconds, so the signal reaches every worker before training could finish.
With ``LOFT_TEST_SIGNAL=SIGTERM`` it sends SIGTERM instead (what ``kill``, ``docker stop`` or a
Slurm time limit sends the launcher, which also forwards it to every worker).
"""

from __future__ import annotations

import os
import signal
import sys
import time

from transformers import TrainerCallback

import loft.app.finetune
from loft.app.cli import main

STEP = int(os.environ["LOFT_TEST_CTRL_C_STEP"])
SIGNAL = getattr(signal, os.environ.get("LOFT_TEST_SIGNAL", "SIGINT"))


class CtrlCToLauncher(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == STEP and state.is_world_process_zero:
            os.kill(os.getppid(), SIGNAL)
            time.sleep(3)


_finetune = loft.app.finetune.finetune


def finetune_with_ctrl_c(cfg, **kwargs):
    kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), CtrlCToLauncher()]
    return _finetune(cfg, **kwargs)


loft.app.finetune.finetune = finetune_with_ctrl_c  # loft.app.cli imports it when the command runs

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
