"""One fine-tuning run: data + model + method -> trained adapter, metrics and a loss curve.

:func:`finetune` is what ``loft finetune`` runs (and ``loft compare`` runs several times). The
training loop is ``transformers.Trainer`` (:class:`loft.integrations.LoFTTrainer` for LoFT);
LoRA / DoRA layers are PEFT's.

Output directory::

    run_config.json               the settings (a rerun with other settings is refused)
    adapter_config.json           PEFT adapter (loft / lora / dora) ...
    adapter_model.safetensors     ... loads with PeftModel.from_pretrained(base, dir)
    model.safetensors, config.json  (--method full: the whole model instead)
    tokenizer files
    metrics.json                  accuracy before / after, losses, learning rates, timings
    loss_curve.png
    checkpoints/checkpoint-N      while training (Ctrl-C or --save-steps); removed at the end
    lr_search.json, lr_search.png (--lr auto: the learning-rate search, loft/app/autolr.py)

Under ``torchrun`` / ``accelerate launch`` every process runs :func:`finetune`; Trainer trains
with DDP, ``batch_size`` is the global batch (split evenly over the processes), and only the
main process (rank 0) touches the output directory and prints (see :mod:`loft.app.launch`).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from .atomic import write_failure, write_json
from .autolr import search_lr
from .config import DEFAULT_HEAD_LR, DEFAULT_LR, METHODS, FinetuneConfig
from .errors import OutputWriteError, RunInterrupted, Terminated, interruption
from .launch import barrier, on_main_process
from .build import BuiltRun, build_run, prepare_folder
from .plan import RunInputs, RunPlan, plan_run
from .results import RunMetrics, eval_summary, save_results
from .rundir import (
    EVAL_BEFORE_FILE,
    latest_checkpoint,
)
from .signals import sigterm_as_interrupt
from .status import RunStatus
from .trainer import full_trainable_state, loss_curve

__all__ = [
    "DEFAULT_HEAD_LR",
    "DEFAULT_LR",
    "METHODS",
    "FinetuneConfig",
    "RunMetrics",
    "RunPlan",
    "build_run",
    "choose_lr",
    "finetune",
    "plan_run",
    "prepare_folder",
    "save_run",
    "train_run",
]



def _write_eval_before(out: Path, before: dict[str, Any]) -> None:
    """Keep the evaluation before training (main process): a resumed run does not repeat it."""
    try:
        write_json(out / EVAL_BEFORE_FILE, before)
    except OSError as e:
        raise OutputWriteError(f"{write_failure(e, out)} while writing {EVAL_BEFORE_FILE}") from None


def finetune(
    cfg: FinetuneConfig,
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    callbacks: list[Any] | None = None,
) -> dict[str, Any]:
    """Run one fine-tuning job; return its metrics (also written to ``metrics.json``).

    The steps: :func:`plan_run` (check every input, decide everything; nothing written),
    :func:`prepare_folder` (the output directory made ready), with ``--lr auto`` :func:`choose_lr`
    (the learning-rate search), :func:`build_run` (the Trainer), :func:`train_run` (evaluate
    before, train) and :func:`save_run` (evaluate after, write the results).

    Raises :class:`LoftUsageError` for bad input (before anything is written) and
    :class:`RunInterrupted` when Ctrl-C stopped the run (its message says what was kept).
    """
    status = RunStatus(cfg, progress)
    inputs = None
    try:
        with sigterm_as_interrupt():  # SIGTERM: as Ctrl-C (a checkpoint during training), exit status 143
            plan, inputs = plan_run(cfg, overwrite=overwrite, resume=resume, status=status)
            folder = prepare_folder(plan, status)
            if plan.lr_search is not None:
                plan = choose_lr(plan, inputs, status=status)
            built = build_run(plan, inputs, folder, callbacks=callbacks, status=status)
            trained = train_run(plan, inputs, built, status=status)
            return save_run(plan, inputs, built, trained, status=status).as_dict()
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM outside the training steps, or a second one in them
        raise RunInterrupted(status.interrupted(e), status.checkpoint_kept(), interruption(e)[1]) from None
    except OutputWriteError as e:  # a full disk ...: the partial files are removed, what was complete is kept
        raise OutputWriteError(status.write_failed(str(e))) from None
    finally:
        status.release()
        if inputs is not None and inputs.pissa is not None:
            inputs.pissa.close()




def choose_lr(plan: RunPlan, inputs: RunInputs, *, status: RunStatus) -> RunPlan:
    """``--lr auto``: search the learning rate (loft/app/autolr.py; each trial a short
    :func:`finetune` of its own), or read back the search an earlier attempt finished; return the
    plan at the chosen rate (the Trainer's arguments set to it)."""
    status.phase = "searching the learning rate (--lr auto)"
    search, summary = search_lr(plan.cfg, plan.lr_search, out=plan.out, kind=plan.task_kind, model=plan.model_spec,
                                progress=status.progress, run=finetune)
    status.memory.restart()  # the run's peak memory: its own training and evaluations, not the trials'
    inputs.args.learning_rate = search.lr
    return dataclasses.replace(plan, method_lr=search.lr, lr_summary=summary)


@dataclass
class TrainedRun:
    """What :func:`train_run` produced."""

    before: dict[str, float] | None
    training_loss: float  # Trainer's mean loss of this attempt's steps




def train_run(plan: RunPlan, inputs: RunInputs, built: BuiltRun, *, status: RunStatus) -> TrainedRun:
    """Evaluate before training (unless an earlier attempt did), then train; a first Ctrl-C
    saves a checkpoint and raises :class:`RunInterrupted`."""
    from ..integrations.library_internals import let_train_wrap_for_ddp

    trainer, task, before = built.trainer, inputs.task, built.before
    # every rank evaluates (Trainer.predict is a collective). Not with --fsdp: Trainer (5.24) evaluates an FSDP2
    # model before training by accelerator.prepare(model) alone, which Accelerate (1.15) refuses for FSDP2
    if before is None and plan.cfg.eval_before and not plan.cfg.fsdp:
        status.phase = "evaluating before training"
        before = task.evaluate(trainer, inputs.tokenizer, plan.max_length)
        let_train_wrap_for_ddp(trainer)  # see loft.integrations.library_internals
        on_main_process(_write_eval_before, plan.out, before)
        if plan.progress:
            print(f"before training: {eval_summary(before)} on {task.num_eval} eval examples", flush=True)

    status.phase = "training"
    trainer.loft_setup(built.progress)
    try:
        result = trainer.train(resume_from_checkpoint=built.checkpoint)
    finally:
        built.interrupt.restore()
    barrier()  # rank 0 has finished writing the last checkpoint before any rank moves on or exits
    if built.interrupt.interrupted:
        saved = latest_checkpoint(plan.out)
        what, code = interruption(Terminated() if built.interrupt.terminated else None)
        raise RunInterrupted(
            f"{what} at step {trainer.state.global_step}/{plan.max_steps}; checkpoint saved in {saved}. "
            f"Continue with the same command plus --resume.",
            str(saved) if saved else None,
            code,
        )
    return TrainedRun(before=before, training_loss=result.training_loss)


def save_run(plan: RunPlan, inputs: RunInputs, built: BuiltRun, trained: TrainedRun, *,
             status: RunStatus) -> RunMetrics:
    """Evaluate after training, then write the results (rank 0): model or adapter, tokenizer,
    ``loss_curve.png`` and ``metrics.json`` last."""
    cfg, trainer, task = plan.cfg, built.trainer, inputs.task
    status.phase = "evaluating after training"
    whole = trainer.loft_progress()  # the whole run, also when it was resumed
    losses, train_seconds = whole["losses"], whole["train_seconds"]
    after = task.evaluate(trainer, inputs.tokenizer, plan.max_length)
    peak_memory_mb = status.memory.read()  # of this attempt, after loading: training and both evaluations
    curve = loss_curve(losses, inputs.args.logging_steps)
    steps = trainer.state.global_step
    before = trained.before or {}
    metrics = RunMetrics(
        eval_accuracy=after["eval_accuracy"],
        eval_loss=after["eval_loss"],
        eval_accuracy_before=before.get("eval_accuracy"),
        eval_loss_before=before.get("eval_loss"),
        eval_perplexity=after.get("eval_perplexity"),
        eval_perplexity_before=before.get("eval_perplexity"),
        train_loss=sum(losses) / len(losses) if losses else trained.training_loss,
        train_loss_last=curve[-1][1] if curve else None,
        steps=steps,
        epochs=round(steps / plan.steps_per_epoch, 3),
        train_seconds=round(train_seconds, 1),
        seconds=None,
        train_examples_per_second=round(steps * plan.batch_size / max(train_seconds, 1e-9), 2),
        resumed_from=built.checkpoint,
        task=plan.task_kind,
        method=cfg.method,
        rank=cfg.rank if cfg.method != "full" else None,
        lr=plan.method_lr,
        head_lr=plan.head_lr if built.has_head else None,
        model=plan.model_spec,
        model_path=plan.model_path,
        data=plan.data,
        eval_data=plan.eval_note,
        num_train=task.num_train,
        num_eval=task.num_eval,
        batch_size=plan.batch_size,
        processes=plan.world,
        max_length=plan.max_length,
        seed=cfg.seed,
        trainable_params=built.trainable_params,
        total_params=built.total_params,
        fresh_modules=list(plan.fresh),
        labels=task.label_names,
        loss_curve=curve,
        loft_version=__version__,
        torch_threads=torch.get_num_threads(),
        quantization=cfg.quantization,
        base_model_mb=plan.base_model_mb,
        peak_memory_mb=peak_memory_mb,
        load_peak_memory_mb=status.load_peak_mb,
        peak_memory_kind=status.memory.kind,
        lr_search=plan.lr_summary,
    )
    if cfg.lr_trial:  # a trial of a learning-rate search: its metrics are all it leaves (autolr.py)
        metrics.seconds = round(time.perf_counter() - status.t_start, 1)
        return metrics
    status.phase = "saving the results"
    weights = full_trainable_state(inputs.model) if cfg.fsdp else None  # a collective: every rank
    save = inputs.pissa.save if inputs.pissa is not None else None
    # rank 0 writes; a failed write (a full disk) stops every rank with its message
    on_main_process(save_results, plan.out, inputs.model, inputs.tokenizer, metrics,
                    f"{plan.name} on {Path(cfg.data).stem}", status.t_start, task.result_files(trained.before, after),
                    weights, save)
    barrier()  # the run's files are complete before any rank returns
    metrics.seconds = round(time.perf_counter() - status.t_start, 1)
    return metrics
