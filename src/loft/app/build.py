"""Building a planned run: the output folder made ready (its lock taken, its settings written) and
the Trainer built (:func:`build_run`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from .atomic import write_failure, write_json
from .config import FinetuneConfig
from .errors import LoftUsageError
from .launch import on_main_process
from .methods import make_optimizer
from .plan import RunInputs, RunPlan
from .rundir import (
    CONFIG_FILE,
    EVAL_BEFORE_FILE,
    PROGRESS_FILE,
    OutputPlan,
    apply_output_plan,
    file_damage,
    read_run_config,
    take_output_dir,
)
from .status import RunStatus
from .trainer import count_params, trainer_class

__all__ = ["BuiltRun", "RunFolder", "build_run", "prepare_folder", "start_run"]

def start_run(
    out: Path, cfg: FinetuneConfig, plan: OutputPlan, *, model_path: str, world: int, status: RunStatus
) -> tuple[str | None, dict[str, float] | None, dict[str, Any] | None]:
    """Take the folder's lock (held until the run ends, ``status.lock``) and make ``out`` ready
    (main process only): ``(checkpoint to resume from, saved eval-before metrics, saved training
    progress)``."""
    if plan.action == "resume":
        started = read_run_config(out).get("processes", 1)
        if started != world:
            raise LoftUsageError(
                f"The run in {str(out)!r} was started on {started} process(es); resume it on {started} (now {world}), "
                "so that every process finds its own saved random state. Nothing was changed."
            )
    try:
        status.lock = take_output_dir(out, plan.snapshot)
        status.output = plan
        apply_output_plan(out, plan)
        if plan.checkpoint is None:
            write_json(out / CONFIG_FILE, {"settings": cfg.identity(), "processes": world, "model_path": model_path,
                                           "loft_version": __version__})
            return None, None, None
    except OSError as e:  # nothing of this run written yet: refused like an unwritable --output-dir
        if plan.action == "new":
            (out / CONFIG_FILE).unlink(missing_ok=True)
            status.release()
            if not plan.existed and out.is_dir() and not any(out.iterdir()):
                out.rmdir()
        raise LoftUsageError(f"Cannot write to --output-dir {str(out)!r}: {write_failure(e, out)}.") from None
    state_file = out / EVAL_BEFORE_FILE
    before = json.loads(state_file.read_text()) if state_file.is_file() and not file_damage(state_file) else None
    progress_file = plan.checkpoint / PROGRESS_FILE
    progress = json.loads(progress_file.read_text()) if progress_file.is_file() else None
    return str(plan.checkpoint), before, progress


@dataclass
class RunFolder:
    """What the output directory held when :func:`prepare_folder` made it ready."""

    checkpoint: str | None  # to resume from
    before: dict[str, float] | None  # eval metrics before training, saved by an earlier attempt
    progress: dict[str, Any] | None  # training progress saved in the checkpoint


def prepare_folder(plan: RunPlan, status: RunStatus) -> RunFolder:
    """Make the output directory ready (rank 0, which takes its lock; the others wait): only now,
    with every input checked, is it touched."""
    status.phase = "preparing the output directory"
    if not plan.main:  # rank 0 sets it once it holds the folder's lock
        status.output = plan.output
    checkpoint, before, progress = on_main_process(
        start_run, plan.out, plan.cfg, plan.output, model_path=plan.model_path, world=plan.world, status=status
    )
    return RunFolder(checkpoint, before, progress)


@dataclass
class BuiltRun:
    """What :func:`build_run` made: the Trainer and what the output directory held."""

    trainer: Any
    interrupt: Any  # the InterruptCallback
    checkpoint: str | None  # resumed from
    before: dict[str, float] | None  # eval metrics before training, saved by an earlier attempt
    progress: dict[str, Any] | None  # training progress saved in the checkpoint
    has_head: bool
    trainable_params: int
    total_params: int


def build_run(plan: RunPlan, inputs: RunInputs, folder: RunFolder, *, callbacks: list[Any] | None,
              status: RunStatus) -> BuiltRun:
    """Build the Trainer of a run whose output directory :func:`prepare_folder` made ready."""
    from transformers import PrinterCallback

    from .callbacks import InterruptCallback, ProgressBar

    cfg, model = plan.cfg, inputs.model
    checkpoint, before, saved_progress = folder.checkpoint, folder.before, folder.progress
    status.phase = "building the trainer"
    has_head = any(plan.is_head(n) for n, p in model.named_parameters() if p.requires_grad)

    def build_optimizer(m: nn.Module) -> torch.optim.Optimizer:
        """AdamW, or PEFT's LoRA+ / LoRA-FA optimizers (LoRA-FA freezes A): loft/app/methods.py."""
        return make_optimizer(cfg.method, m, lr=plan.method_lr, head_lr=plan.head_lr,
                              weight_decay=cfg.weight_decay, is_head=plan.is_head)

    trainable, total = count_params(model)
    interrupt = InterruptCallback()
    common = dict(
        model=model,
        args=inputs.args,
        **inputs.task.trainer_inputs(inputs.tokenizer, plan.max_length),
        processing_class=inputs.tokenizer,
        callbacks=[ProgressBar(plan.batch_size, plan.name, plan.progress), interrupt, *(callbacks or [])],
    )
    # sequence classifiers average their loss over neither accumulation steps nor processes
    mean_loss = plan.task_kind == "classification"
    if cfg.method == "loft":
        trainer = trainer_class(inputs.task.trainer_class(loft=True), per_process_mean_loss=mean_loss)(
            **common, loft_options={"head_lr": plan.head_lr} if has_head else {})
    else:
        cls = trainer_class(inputs.task.trainer_class(loft=False), per_process_mean_loss=mean_loss)
        if cfg.fsdp:  # Trainer refuses a pre-built optimizer under FSDP: it builds this one before sharding
            trainer = cls(**common)
            trainer.optimizer_factory = build_optimizer
        else:
            trainer = cls(**common, optimizers=(build_optimizer(model), None))
    trainer.remove_callback(PrinterCallback)
    if cfg.quantization is not None:  # TRL's SFTTrainer casts a quantized model's adapter to bfloat16
        from .quantize import keep_adapter_float32

        keep_adapter_float32(model)
    return BuiltRun(trainer=trainer, interrupt=interrupt, checkpoint=checkpoint, before=before,
                    progress=saved_progress, has_head=has_head, trainable_params=trainable, total_params=total)
