"""What a finished run leaves: :class:`RunMetrics` (the keys of ``metrics.json``) and the result
files, written beside the folder's content and moved in last (:func:`save_results`)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .atomic import replace_files, write_failure
from .errors import OutputWriteError
from .rundir import CHECKPOINTS, EVAL_BEFORE_FILE, METRICS_FILE, STAGING

@dataclass
class RunMetrics:
    """The metrics of one run: what ``metrics.json`` holds (same keys, same order) and what
    :func:`finetune` returns (as a dict)."""

    eval_accuracy: float
    eval_loss: float
    eval_accuracy_before: float | None
    eval_loss_before: float | None
    eval_perplexity: float | None  # instruction data: exp(eval_loss), per completion token
    eval_perplexity_before: float | None
    train_loss: float
    train_loss_last: float | None
    steps: int
    epochs: float
    train_seconds: float
    seconds: float | None
    train_examples_per_second: float
    resumed_from: str | None
    task: str
    method: str
    rank: int | None
    lr: float
    head_lr: float | None
    model: str
    model_path: str
    data: str
    eval_data: str
    num_train: int
    num_eval: int
    batch_size: int
    processes: int
    max_length: int
    seed: int
    trainable_params: int
    total_params: int
    fresh_modules: list[str]
    labels: list[str] | None
    loss_curve: list[tuple[int, float]]
    loft_version: str
    torch_threads: int
    quantization: str | None  # "4bit", "8bit" (--load-in-4bit / --load-in-8bit) or None
    base_model_mb: float  # the base model's weights and buffers as loaded (get_memory_footprint), MiB
    peak_memory_mb: float  # peak memory of this attempt once the model was loaded (loft/app/memory.py), MiB
    load_peak_memory_mb: float | None  # peak memory while loading the data and the model, MiB
    peak_memory_kind: str  # what peak_memory_mb measures: peak RSS (CPU) or torch.cuda.max_memory_allocated
    lr_search: dict[str, Any] | None = None  # --lr auto: the chosen rate and what the search cost (lr_search.json)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def eval_summary(metrics: dict[str, Any]) -> str:
    """``accuracy 0.8125`` (and ``perplexity 3.21`` where the task measures it)."""
    parts = []
    if metrics.get("eval_accuracy") is not None:
        parts.append(f"accuracy {metrics['eval_accuracy']:.4f}")
    if metrics.get("eval_perplexity") is not None:
        parts.append(f"perplexity {metrics['eval_perplexity']:.3f}")
    return ", ".join(parts) or f"loss {metrics['eval_loss']:.4f}"


def save_results(out: Path, model, tokenizer, metrics: RunMetrics, title: str, t_start: float,
                  extra: dict[str, str] | None = None, weights: dict[str, torch.Tensor] | None = None,
                  save=None) -> None:
    """Write the result files beside the folder's current content (``.incoming/``), then move
    them in, ``metrics.json`` (which marks the run as finished) last; then drop the checkpoints.

    ``save(model, folder)`` writes the model or adapter (default ``model.save_pretrained``; PiSSA
    converts its adapter, :class:`loft.app.methods.PissaStart`). Until the moves start, an earlier finished run's files are untouched; its ``metrics.json``
    goes first, so a crash among the moves leaves an unfinished run whose final checkpoint
    ``--resume`` turns into the results again.
    """
    staging = out / STAGING
    try:
        _write_results(out, staging, model, tokenizer, metrics, title, t_start, extra, weights, save)
    except Exception as e:
        why = write_failure(e, out)
        if why is None:
            raise
        shutil.rmtree(staging, ignore_errors=True)  # the partial files: they would keep the disk full
        raise OutputWriteError(f"{why} while writing the results into {str(out)!r} (the partial files were "
                               "removed)") from None
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    (out / EVAL_BEFORE_FILE).unlink(missing_ok=True)


def _write_results(out: Path, staging: Path, model, tokenizer, metrics: RunMetrics, title: str, t_start: float,
                   extra: dict[str, str] | None, weights: dict[str, torch.Tensor] | None, save) -> None:
    """:func:`save_results`'s writing: into ``staging``, then moved into ``out``."""
    from .plots import plot_loss_curve

    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    if save is not None:  # PiSSA: PEFT's conversion to an adapter of the original base
        save(model, staging)
    elif weights is not None:  # --fsdp: the whole values gathered from the shards (the model's own are DTensors)
        model.save_pretrained(staging, state_dict=weights)
    else:
        model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    plot_loss_curve(metrics.loss_curve, staging / "loss_curve.png", title)
    for name, text in (extra or {}).items():  # the task's own files (samples.jsonl)
        (staging / name).write_text(text, encoding="utf-8")
    metrics.seconds = round(time.perf_counter() - t_start, 1)
    (staging / METRICS_FILE).write_text(json.dumps(metrics.as_dict(), indent=2))
    (out / METRICS_FILE).unlink(missing_ok=True)
    replace_files(staging, out, last=METRICS_FILE)
