"""Issue 32: long jobs on shared machines. Interruptions after the last step, run folders in use
by another process, SIGTERM, a full disk, damaged adapters, reruns of ``loft federate``.

Every run is the tiny BERT of ``_tiny.py`` for a few steps; signals are real (sent to this
process or to a subprocess); a full disk is simulated by a writer that raises
``OSError(ENOSPC)`` at a chosen file (this machine cannot mount a small file system).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from _tiny import make_bert, sentiment_records, write_jsonl
from safetensors.torch import load_file
from transformers import TrainerCallback

import loft.app.compare
import loft.app.finetune
from loft.app.cli import main
from loft.app.errors import RunInterrupted
from loft.app.finetune import FinetuneConfig, finetune

STEPS = 3


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return make_bert(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return write_jsonl(d / "train.jsonl", sentiment_records(40)), write_jsonl(d / "test.jsonl", sentiment_records(8, seed=1))


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def args(bert, data, out, *extra):
    return [str(a) for a in ("finetune", "--model", bert, "--data", data[0], "--eval-data", data[1], "-o", out,
                             "--max-steps", STEPS, "-b", 8, "--lr", "5e-3", "--quiet", *extra)]


def config(bert, data, out, **kw):
    return FinetuneConfig(model=str(bert), data=str(data[0]), eval_data=str(data[1]), output_dir=str(out),
                          max_steps=STEPS, batch_size=8, lr=5e-3, **kw)


def adapter(out):
    return load_file(str(Path(out) / "adapter_model.safetensors"))


def same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def one_line(capsys, argv, status):
    """Run ``loft``; assert ``status`` and one line on stderr, no traceback; return that line."""
    assert main([str(a) for a in argv]) == status
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("loft: "), err
    return err


@pytest.fixture(scope="module")
def straight(bert, data, tmp_path_factory):
    """The uninterrupted run the others are compared with."""
    out = tmp_path_factory.mktemp("straight") / "run"
    return out, finetune(config(bert, data, out), progress=False)


def ctrl_c_in_evaluation(monkeypatch, which: int):
    """A Ctrl-C (KeyboardInterrupt) at the start of the ``which``-th evaluation of the process."""
    from loft.app.tasks.classification import ClassificationTask

    evaluate, calls = ClassificationTask.evaluate, []

    def patched(self, *a, **kw):
        calls.append(1)
        if len(calls) == which:
            raise KeyboardInterrupt
        return evaluate(self, *a, **kw)

    monkeypatch.setattr(ClassificationTask, "evaluate", patched)


# ----------------------------------------------------------------------------- 1. resume after the last step
def test_resume_of_a_run_interrupted_after_its_last_step_trains_no_extra_step(monkeypatch, straight, bert, data,
                                                                             tmp_path):
    """Ctrl-C during the final evaluation keeps the checkpoint of the last step; --resume evaluates
    and saves without training step N+1: metrics and adapter as the uninterrupted run's."""
    out = tmp_path / "run"
    ctrl_c_in_evaluation(monkeypatch, 2)  # the evaluation after training
    with pytest.raises(RunInterrupted, match="evaluating after training"):
        finetune(config(bert, data, out), progress=False)
    assert (out / "checkpoints" / f"checkpoint-{STEPS}").is_dir()
    monkeypatch.undo()
    resumed = finetune(config(bert, data, out), resume=True, progress=False)
    reference = straight[1]
    assert resumed["resumed_from"].endswith(f"checkpoint-{STEPS}")
    for key in ("steps", "epochs", "train_loss", "train_loss_last", "loss_curve", "eval_loss", "eval_accuracy"):
        assert resumed[key] == reference[key], key
    assert same_tensors(adapter(out), adapter(straight[0]))
