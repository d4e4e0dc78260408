"""Deciding a run before anything is written: :func:`plan_run` and the :class:`RunPlan` it returns."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .autolr import plan_lr_search
from .config import (AUTO_LR, DEFAULT_HEAD_LR, DEFAULT_MAX_STEPS, FinetuneConfig, check_batch_split, default_lr,
                     default_lr_note)
from .errors import LoftUsageError
from .launch import init_processes, is_main_process, launched_processes, on_main_process
from .load import apply_method, prepare_inputs, resolve_targets
from .methods import PissaStart
from .rundir import OutputPlan, check_output_dir, run_name
from .status import RunStatus
from .tasks import Task
from .trainer import fsdp_args, training_args

@dataclass(frozen=True)
class RunPlan:
    """Everything decided about a run before anything is written: from the options, the data,
    the model and the output directory's state."""

    cfg: FinetuneConfig
    out: Path
    name: str  # loft-r4, full ...
    main: bool  # this process writes and prints (rank 0)
    progress: bool  # progress bars and lines (main process only)
    processes: int  # launched (WORLD_SIZE)
    world: int  # processes Trainer trains on
    task_kind: str
    data: str  # the training file
    eval_note: str  # where the eval data comes from
    model_spec: str
    model_path: str
    max_length: int
    fresh: tuple[str, ...]
    targets: tuple[str, ...] | None  # adapted layers (None: full fine-tuning)
    method_lr: float
    head_lr: float
    steps_per_epoch: int
    max_steps: int
    batch_size: int  # examples per optimizer step, all processes together
    output: OutputPlan  # new / overwrite / rerun / resume (and the checkpoint)
    base_model_mb: float = 0.0  # the base model's weights and buffers, as loaded
    lr_search: Any = None  # --lr auto: the search to make (loft.lr_search.SearchPlan); method_lr is its centre until then
    lr_summary: dict[str, Any] | None = None  # --lr auto: the search made (metrics.json's lr_search)

    def is_head(self, name: str) -> bool:
        """Whether parameter ``name`` belongs to the fresh head (trained at ``head_lr``)."""
        if self.cfg.method == "full":
            return any(name == f or name.startswith(f + ".") for f in self.fresh)
        return "modules_to_save" in name


@dataclass
class RunInputs:
    """What :func:`plan_run` loaded and built to check the run: the task, the model wrapped
    for the method, the tokenizer and Trainer's arguments."""

    task: Task
    model: nn.Module
    tokenizer: Any
    args: Any  # transformers.TrainingArguments
    pissa: PissaStart | None = None  # --method pissa (main process): the initial adapter


def _check_world(args: Any, processes: int, cfg: FinetuneConfig) -> int:
    """The number of processes Trainer trains on; refuse a launch it does not see as one run."""
    world = args.world_size
    if processes > 1 and world != processes:
        raise LoftUsageError(
            f"{processes} processes were launched (WORLD_SIZE={processes}) but transformers.Trainer runs on "
            f"{world}, so each process would train alone. Supported: torchrun or accelerate launch with DDP on "
            "GPUs (one per process) or on the CPU (gloo)."
        )
    if world != processes:  # a launcher that does not set WORLD_SIZE (e.g. mpirun): split here
        check_batch_split(cfg.batch_size, world)
        args.per_device_train_batch_size = cfg.batch_size // world
    return world


def _examples_per_step(cfg: FinetuneConfig, num_train: int, main: bool) -> int:
    """Examples per optimizer step: ``--batch-size`` (times the accumulation steps), or all the
    training examples when there are fewer (every step takes them all; said once, so that the
    examples per second count only examples that exist)."""
    batch = cfg.batch_size * cfg.grad_accum
    if batch <= num_train:
        return batch
    if main:
        print(f"Note: --batch-size {cfg.batch_size} is more than the {num_train} training examples; every step "
              f"takes all {num_train}.", flush=True)
    return num_train


def run_steps(cfg: FinetuneConfig, num_train: int) -> tuple[int, int]:
    """``(optimizer steps per epoch, steps of the run)`` on ``num_train`` training examples:
    ``--max-steps``, or ``--epochs`` over the data, or :data:`DEFAULT_MAX_STEPS`."""
    steps_per_epoch = math.ceil(num_train / (cfg.batch_size * cfg.grad_accum))
    if cfg.max_steps is not None:
        return steps_per_epoch, cfg.max_steps
    if cfg.epochs is not None:
        return steps_per_epoch, max(1, math.ceil(cfg.epochs * steps_per_epoch))
    return steps_per_epoch, DEFAULT_MAX_STEPS


def plan_run(cfg: FinetuneConfig, *, overwrite: bool, resume: bool, status: RunStatus) -> tuple[RunPlan, RunInputs]:
    """Check every input and decide the run, writing nothing: join the other processes, load
    the data and the model, resolve the layers to adapt and wrap the model for the method,
    compute the steps and learning rates, and decide (rank 0) what happens to the output
    directory (``LoftUsageError`` when the run must not use it)."""
    out = status.out
    processes = launched_processes()
    cfg.check(processes)
    status.phase = "joining the other processes"
    init_processes()  # joins torchrun's / accelerate's process group (no-op for one process)
    main = status.main = is_main_process()
    status.phase = "loading the data and the model"
    loaded = prepare_inputs(cfg, processes)
    status.load_peak_mb = status.memory.read()  # loading the model; from here on, training and evaluating
    status.memory.restart()
    task = loaded.task
    default = default_lr(cfg.method, task.kind)
    note = default_lr_note(task.kind, [cfg.method]) if cfg.lr is None and main else None
    if note:
        print(note, flush=True)
    method_lr = default if cfg.lr is None or cfg.lr == AUTO_LR else cfg.lr  # --lr auto: the search's centre, for now
    head_lr = cfg.head_lr if cfg.head_lr is not None else DEFAULT_HEAD_LR
    steps_per_epoch, max_steps = run_steps(cfg, task.num_train)
    lr_search = plan_lr_search(cfg, task.kind, task.num_train, max_steps, default)  # None without --lr auto
    targets = None if cfg.method == "full" else resolve_targets(loaded.model, cfg.target_modules, cfg.rank, set(loaded.fresh))
    model = apply_method(cfg, task, loaded.model, loaded.fresh, targets)
    args = training_args(cfg, out, max_steps, method_lr, processes, fsdp_args(cfg, loaded.model))
    args = task.training_arguments(args, loaded.max_length)  # TRL's SFTConfig for instruction data
    if cfg.lr_trial:  # a trial of a learning-rate search: a checkpoint only when interrupted (to resume it)
        args.set_save(strategy="no")
    world = _check_world(args, processes, cfg)
    output = on_main_process(check_output_dir, out, cfg.identity(), overwrite=overwrite, resume=resume)
    # PiSSA: its initial adapter (untrained), to convert the trained one for the original base when saving
    pissa = PissaStart(model) if cfg.method == "pissa" and main else None
    plan = RunPlan(
        cfg=cfg, out=out, name=run_name(cfg.method, cfg.rank), main=main, progress=status.progress and main,
        processes=processes, world=world, task_kind=task.kind, data=loaded.train_path, eval_note=loaded.eval_note,
        model_spec=loaded.spec, model_path=loaded.model_path, max_length=loaded.max_length,
        fresh=tuple(loaded.fresh), targets=None if targets is None else tuple(targets), method_lr=method_lr,
        head_lr=head_lr, steps_per_epoch=steps_per_epoch, max_steps=max_steps,
        batch_size=_examples_per_step(cfg, task.num_train, main), output=output, base_model_mb=loaded.base_model_mb,
        lr_search=lr_search,
    )
    return plan, RunInputs(task=task, model=model, tokenizer=loaded.tokenizer, args=args, pissa=pissa)
