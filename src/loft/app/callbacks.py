"""Trainer callbacks of the command line: a progress bar and Ctrl-C handling."""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

from tqdm.auto import tqdm
from transformers import TrainerCallback

from .launch import any_rank, is_main_process

__all__ = ["InterruptCallback", "ProgressBar"]


class ProgressBar(TrainerCallback):
    """A tqdm bar over optimizer steps with loss, lr and examples/s (tqdm adds rate and ETA)."""

    def __init__(self, batch_size: int, desc: str = "train", enabled: bool = True) -> None:
        self.batch_size = batch_size
        self.desc = desc
        self.enabled = enabled
        self.bar: tqdm | None = None
        self._t0 = 0.0
        self._step0 = 0

    def on_train_begin(self, args, state, control, **kwargs: Any):
        self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self.desc, unit="step",
                        dynamic_ncols=True, disable=not self.enabled)
        self._t0, self._step0 = time.perf_counter(), state.global_step

    def on_step_end(self, args, state, control, **kwargs: Any):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs: Any):
        if self.bar is None or not logs or "loss" not in logs:
            return
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        rate = (state.global_step - self._step0) * self.batch_size / elapsed
        self.bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs.get('learning_rate', 0):.2e}", ex_s=f"{rate:.1f}")

    def on_train_end(self, args, state, control, **kwargs: Any):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class InterruptCallback(TrainerCallback):
    """The first Ctrl-C asks Trainer to save a checkpoint at the end of the current step and
    stop; a second Ctrl-C aborts at once (the last periodic checkpoint remains). A process that
    inherited SIGINT ignored (started in the background, with nohup) keeps it ignored.

    On several processes (torchrun forwards Ctrl-C to every worker, each at its own moment) the
    ranks agree at the end of every step: when any rank has seen Ctrl-C, all of them save the
    same step's checkpoint and stop together (one all-reduce of a flag per step).
    """

    def __init__(self) -> None:
        self.interrupted = False
        self._previous: Any = None
        self._presses = 0

    def request_stop(self) -> None:
        """What Ctrl-C does (tests call it directly)."""
        self.interrupted = True

    def _handler(self, signum, frame):  # pragma: no cover - exercised by a real Ctrl-C
        # count this process's own Ctrl-Cs: a stop agreed with the other ranks is not a first press
        self._presses += 1
        if self._presses > 1:
            raise KeyboardInterrupt
        self.request_stop()
        if is_main_process():
            print("\nCtrl-C: saving a checkpoint after this step (Ctrl-C again to abort without it) ...", flush=True)

    def on_train_begin(self, args, state, control, **kwargs: Any):
        # a process started with Ctrl-C ignored (a background job, nohup) keeps ignoring it
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            self._previous = signal.signal(signal.SIGINT, self._handler)

    def on_step_end(self, args, state, control, **kwargs: Any):
        self.interrupted = any_rank(self.interrupted, args.device)
        if self.interrupted:
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs: Any):
        self.restore()

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
