"""Trainer callbacks of the command line: a progress bar and Ctrl-C / SIGTERM handling."""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

from tqdm.auto import tqdm
from transformers import TrainerCallback

from .errors import Terminated
from .launch import any_rank, is_main_process
from .signals import ours_or_default

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
    """The first Ctrl-C (or SIGTERM: ``kill``, ``docker stop``, a Slurm time limit) asks Trainer to
    save a checkpoint at the end of the current step and stop; a second one aborts at once (the
    last periodic checkpoint remains). A process that inherited SIGINT (or SIGTERM) ignored
    (started in the background, with nohup) keeps it ignored; a SIGTERM handler of the program's
    own is left in place.

    On several processes (torchrun forwards Ctrl-C and SIGTERM to every worker, each at its own
    moment) the ranks agree at the end of every step: when any rank has seen a signal, all of
    them save the same step's checkpoint and stop together (one all-reduce of a flag per step).
    """

    def __init__(self) -> None:
        self.interrupted = False
        self.signal: int | None = None  # the first signal this process received (None: another rank's)
        self._previous: dict[int, Any] = {}
        self._presses = 0

    def request_stop(self, signum: int | None = None) -> None:
        """What Ctrl-C (``signum`` SIGINT) or SIGTERM does (tests call it directly)."""
        self.interrupted = True
        if self.signal is None:
            self.signal = signum

    @property
    def terminated(self) -> bool:
        """Whether SIGTERM stopped this process's training."""
        return self.signal == signal.SIGTERM

    def _handler(self, signum, frame):  # pragma: no cover - exercised by a real signal
        # count this process's own signals: a stop agreed with the other ranks is not a first press
        self._presses += 1
        if self._presses > 1:
            raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        self.request_stop(signum)
        if is_main_process():
            what = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
            print(f"\n{what}: saving a checkpoint after this step ({what} again to abort without it) ...", flush=True)

    def on_train_begin(self, args, state, control, **kwargs: Any):
        if threading.current_thread() is not threading.main_thread():
            return
        # a process started with Ctrl-C ignored (a background job, nohup) keeps ignoring it
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._handler)
        if ours_or_default(signal.getsignal(signal.SIGTERM)):
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handler)

    def on_step_end(self, args, state, control, **kwargs: Any):
        self.interrupted = any_rank(self.interrupted, args.device)
        if self.interrupted:
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs: Any):
        self.restore()

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
        self._previous = {}
