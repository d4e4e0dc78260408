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

Under ``torchrun`` / ``accelerate launch`` every process runs :func:`finetune`; Trainer trains
with DDP, ``batch_size`` is the global batch (split evenly over the processes), and only the
main process (rank 0) touches the output directory and prints (see :mod:`loft.launch`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .data import BUILTIN_DATASETS, read_records, resolve_data
from .errors import LoftUsageError, RunInterrupted
from .launch import (
    barrier,
    cpu_processes,
    init_processes,
    is_main_process,
    launched_processes,
    on_main_process,
)
from .linalg import rank_regime
from .models import resolve_model

__all__ = ["DEFAULT_HEAD_LR", "DEFAULT_LR", "METHODS", "FinetuneConfig", "finetune"]

METHODS = ("loft", "lora", "dora", "full")

#: Default learning rate per method (MiniLM-L6 on movie_sentiment; see docs/workflow.md).
DEFAULT_LR = {"loft": 5e-4, "lora": 2e-3, "dora": 2e-3, "full": 1e-4}
#: Default learning rate of fresh head parameters, the same for every method (docs/workflow.md).
DEFAULT_HEAD_LR = 2e-3
#: Steps of the default run (and of each ``loft compare`` run) when neither steps nor epochs are given.
DEFAULT_MAX_STEPS = 400
CONFIG_FILE = "run_config.json"
METRICS_FILE = "metrics.json"
CHECKPOINTS = "checkpoints"
EVAL_BEFORE_FILE = "eval_before.json"

log = logging.getLogger(__name__)


@dataclass
class FinetuneConfig:
    """Settings of one run (the options of ``loft finetune``). ``None`` means "the default"."""

    model: str | None = None
    data: str = "movie_sentiment"
    eval_data: str | None = None
    method: str = "loft"
    rank: int = 4
    alpha: float | None = None
    target_modules: list[str] | None = None
    max_steps: int | None = None
    epochs: float | None = None
    lr: float | None = None
    head_lr: float | None = None
    batch_size: int = 16
    max_length: int | None = None
    max_eval: int | None = None
    seed: int = 0
    output_dir: str | None = None
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    grad_accum: int = 1
    save_steps: int = 200
    logging_steps: int = 10
    eval_before: bool = True

    def check(self, processes: int = 1) -> None:
        """Refuse impossible settings with a clear message (``processes``: data-parallel processes)."""
        if self.method not in METHODS:
            raise LoftUsageError(f"Unknown --method {self.method!r}; choose one of: {', '.join(METHODS)}.")
        if self.rank < 1:
            raise LoftUsageError(f"--rank must be a positive integer, got {self.rank}.")
        if self.max_steps is not None and self.epochs is not None:
            raise LoftUsageError("Give --max-steps or --epochs, not both.")
        if self.max_steps is not None and self.max_steps < 1:
            raise LoftUsageError(f"--max-steps must be >= 1, got {self.max_steps}.")
        if self.epochs is not None and not self.epochs > 0:
            raise LoftUsageError(f"--epochs must be > 0, got {self.epochs}.")
        for name in ("lr", "head_lr"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise LoftUsageError(f"--{name.replace('_', '-')} must be > 0, got {value}.")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise LoftUsageError("--batch-size and --grad-accum must be >= 1.")
        check_batch_split(self.batch_size, processes)
        if self.max_length is not None and self.max_length < 8:
            raise LoftUsageError(f"--max-length must be >= 8, got {self.max_length}.")
        if self.max_eval is not None and self.max_eval < 1:
            raise LoftUsageError(f"--max-eval must be >= 1, got {self.max_eval}.")

    def identity(self) -> dict[str, Any]:
        """The settings that make a run what it is (compared when an output dir is reused)."""
        d = dataclasses.asdict(self)
        for key in ("output_dir", "save_steps", "logging_steps"):
            d.pop(key)
        return d


def check_batch_split(batch_size: int, processes: int) -> None:
    """``--batch-size`` is the global batch; refuse one that ``processes`` cannot share evenly."""
    if processes > 1 and batch_size % processes:
        lower = batch_size // processes * processes
        choices = " or ".join(str(b) for b in (lower, lower + processes) if b > 0)
        raise LoftUsageError(
            f"--batch-size {batch_size} cannot be split evenly over {processes} processes: --batch-size is the "
            f"global batch (examples per optimizer step, all processes together), each process takes "
            f"--batch-size / {processes}. Give a multiple of {processes}, e.g. {choices}."
        )


# ----------------------------------------------------------------------------- output dir
def _latest_checkpoint(out: Path) -> Path | None:
    folder = out / CHECKPOINTS
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return max(found, key=lambda p: int(p.name.split("-")[-1])) if found else None


def prepare_output_dir(out: Path, identity: dict[str, Any], *, overwrite: bool, resume: bool) -> Path | None:
    """Make ``out`` ready for this run; return the checkpoint to resume from (or ``None``).

    A folder holding another run (or anything else) is refused unless ``overwrite``; a folder
    holding an interrupted run of these settings needs ``resume`` (or ``overwrite``); a
    finished run of the very same settings is replaced (the rerun reproduces it).
    """
    if overwrite and resume:
        raise LoftUsageError("--overwrite and --resume contradict each other; pass one of them.")
    if out.exists() and not out.is_dir():
        raise LoftUsageError(f"--output-dir {str(out)!r} is a file; give a folder.")
    if not out.exists() or not any(out.iterdir()):
        if resume:
            raise LoftUsageError(f"Nothing to resume: {str(out)!r} holds no run. Run without --resume.")
        out.mkdir(parents=True, exist_ok=True)
        return None
    if overwrite:
        shutil.rmtree(out)
        out.mkdir(parents=True)
        return None
    config_path = out / CONFIG_FILE
    if not config_path.is_file():
        raise LoftUsageError(
            f"Output directory {str(out)!r} is not empty and holds no loft run; nothing was changed. "
            "Choose another --output-dir or pass --overwrite to replace its contents."
        )
    saved = json.loads(config_path.read_text()).get("settings", {})
    diffs = [f"{k}: {saved.get(k)!r} there, {v!r} now" for k, v in identity.items() if saved.get(k) != v]
    checkpoint = _latest_checkpoint(out)
    finished = (out / METRICS_FILE).is_file()
    if diffs:
        raise LoftUsageError(
            f"Output directory {str(out)!r} already holds a different run ({'; '.join(diffs[:4])}). Nothing was "
            "changed. Choose another --output-dir, or pass --overwrite to replace that run."
        )
    if resume:
        if finished:
            raise LoftUsageError(f"The run in {str(out)!r} already finished (metrics.json); nothing to resume.")
        if checkpoint is None:
            raise LoftUsageError(
                f"No checkpoint in {str(out / CHECKPOINTS)!r} to resume from; start again with --overwrite."
            )
        return checkpoint
    if not finished:
        hint = "continue it with --resume" if checkpoint is not None else "it left no checkpoint"
        raise LoftUsageError(
            f"Output directory {str(out)!r} holds an unfinished run of these settings ({hint}), or pass --overwrite "
            "to start again."
        )
    print(f"Replacing the finished run with the same settings in {out}.", flush=True)
    shutil.rmtree(out)
    out.mkdir(parents=True)
    return None


# ----------------------------------------------------------------------------- model set-up
def _linear_modules(model: nn.Module, exclude: set[str]) -> dict[str, nn.Module]:
    """Linear layers LoRA can target (not the fresh head, not the output embedding)."""
    from transformers.pytorch_utils import Conv1D

    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, Conv1D)) or module is out_emb:
            continue
        if any(name == e or name.startswith(e + ".") for e in exclude):
            continue
        found[name] = module
    return found


def _layer_shape(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.weight.shape[0], module.weight.shape[1]  # transformers Conv1D stores (in, out)


def resolve_targets(model: nn.Module, requested: list[str] | None, rank: int, fresh: set[str]) -> list[str]:
    """Full names of the linear layers to adapt; clear errors for names that match nothing and
    for a rank that does not fit a layer (see :func:`loft.linalg.rank_regime`)."""
    linears = _linear_modules(model, fresh)
    if not linears:
        raise LoftUsageError("The model has no linear layers that LoRA can adapt.")
    if requested is None or requested == ["all-linear"]:
        targets = list(linears)
    else:
        targets = []
        leaf_names = sorted({n.rsplit(".", 1)[-1] for n in linears})
        for want in requested:
            hits = [n for n in linears if n == want or n.endswith("." + want)]
            if not hits:
                raise LoftUsageError(
                    f"--target-modules {want!r} matches no linear layer of the model. Linear layer names: "
                    f"{', '.join(leaf_names)} (or a full name such as {next(iter(linears))!r}, or 'all-linear')."
                )
            targets += [h for h in hits if h not in targets]
    for name in targets:
        d_in, d_out = _layer_shape(linears[name])
        if rank_regime(d_out, d_in, rank) == "between":  # see loft.linalg.rank_regime
            raise LoftUsageError(
                f"--rank {rank} does not fit layer {name!r} ({d_in} -> {d_out}): a rank between "
                f"{min(d_in, d_out)} and {max(d_in, d_out)} adds no expressiveness (the update has rank at most "
                f"{min(d_in, d_out)}) and makes LoFT's step depend on rounding. Use --rank {min(d_in, d_out)} or "
                f"lower, --rank {max(d_in, d_out)} (exactly full fine-tuning of that layer with LoFT), or leave "
                "that layer out of --target-modules."
            )
    return targets


def _fresh_modules(missing_keys: list[str]) -> list[str]:
    """Module names of freshly initialised parameters (e.g. ``classifier``)."""
    return sorted({k.rsplit(".", 1)[0] for k in missing_keys if "." in k})


def _param_groups(model: nn.Module, lr: float, head_lr: float, is_head) -> list[dict[str, Any]]:
    body = [p for n, p in model.named_parameters() if p.requires_grad and not is_head(n)]
    head = [p for n, p in model.named_parameters() if p.requires_grad and is_head(n)]
    groups = [{"params": body, "lr": lr}]
    if head:
        groups.append({"params": head, "lr": head_lr})
    return groups


def _start_run(
    out: Path, cfg: FinetuneConfig, *, model_path: str, world: int, overwrite: bool, resume: bool
) -> tuple[str | None, dict[str, float] | None]:
    """Prepare ``out`` (main process only): ``(checkpoint to resume from, saved eval-before metrics)``."""
    checkpoint = prepare_output_dir(out, cfg.identity(), overwrite=overwrite, resume=resume)
    if checkpoint is None:
        (out / CONFIG_FILE).write_text(json.dumps(
            {"settings": cfg.identity(), "processes": world, "model_path": model_path, "loft_version": __version__},
            indent=2,
        ))
        return None, None
    started = json.loads((out / CONFIG_FILE).read_text()).get("processes", 1)
    if started != world:
        raise LoftUsageError(
            f"The run in {str(out)!r} was started on {started} process(es); resume it on {started} (now {world}), "
            "so that every process finds its own saved random state. Nothing was changed."
        )
    state_file = out / EVAL_BEFORE_FILE
    return str(checkpoint), (json.loads(state_file.read_text()) if state_file.is_file() else None)


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


# ----------------------------------------------------------------------------- the run
def _quiet_libraries() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("peft").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", category=FutureWarning)


def _load_data(cfg: FinetuneConfig):
    from .tasks import make_task

    train_path = resolve_data(cfg.data, "train")
    train_records = read_records(train_path)
    if cfg.eval_data is not None:
        eval_path = resolve_data(cfg.eval_data, "test")
        eval_records = read_records(eval_path)
        eval_note = str(cfg.eval_data)
    elif cfg.data in BUILTIN_DATASETS:
        eval_path = resolve_data(cfg.data, "test")
        eval_records = read_records(eval_path)
        eval_note = f"{cfg.data} (built-in test split)"
    else:  # hold out 10% of the training file
        make_task(train_records, train_path, train_records, train_path)  # check every record first
        if len(train_records) < 10:
            raise LoftUsageError(f"{train_path}: {len(train_records)} records; give --eval-data or at least 10 records.")
        shuffled = train_records[:]
        random.Random(cfg.seed).shuffle(shuffled)
        n_eval = max(1, len(shuffled) // 10)
        eval_records, train_records = shuffled[:n_eval], shuffled[n_eval:]
        eval_path = train_path
        eval_note = f"10% of {train_path} held out (seed {cfg.seed})"
    task = make_task(train_records, train_path, eval_records, eval_path)
    task.limit_eval(cfg.max_eval)
    return task, str(train_path), eval_note


def _load_model(task, model_path: str, spec: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        model, missing = task.load_model(model_path, dtype=torch.float32)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LoftUsageError(f"Could not load model {spec!r} ({model_path}): {first}") from None
    task.prepare_tokenizer(tokenizer)
    task.prepare_model(model, tokenizer)
    return model, tokenizer, missing


def _apply_method(cfg: FinetuneConfig, task, model: nn.Module, fresh: list[str]):
    """Wrap ``model`` for the method; return ``(model, is_head(name) predicate)``."""
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model, lambda n: any(n == f or n.startswith(f + ".") for f in fresh)
    from peft import LoraConfig, get_peft_model

    targets = resolve_targets(model, cfg.target_modules, cfg.rank, set(fresh))
    lora = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha if cfg.alpha is not None else 2 * cfg.rank,
        lora_dropout=0.0,
        target_modules=targets,
        modules_to_save=list(fresh) or None,
        use_dora=cfg.method == "dora",
        task_type="SEQ_CLS" if task.kind == "classification" else "CAUSAL_LM",
    )
    return get_peft_model(model, lora), lambda n: "modules_to_save" in n


def _training_args(cfg: FinetuneConfig, out: Path, max_steps: int, lr: float, processes: int = 1):
    from transformers import TrainingArguments

    cpu = cpu_processes()  # several processes, no GPU: DDP on the CPU over gloo
    return TrainingArguments(
        output_dir=str(out / CHECKPOINTS),
        max_steps=max_steps,
        per_device_train_batch_size=cfg.batch_size // processes,
        per_device_eval_batch_size=max(32, cfg.batch_size),
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=lr,
        weight_decay=cfg.weight_decay,
        lr_scheduler_type="linear",
        warmup_steps=int(round(cfg.warmup_ratio * max_steps)),
        max_grad_norm=cfg.max_grad_norm,
        logging_steps=max(1, min(cfg.logging_steps, max_steps // 10)),
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=1,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        dataloader_pin_memory=False,
        use_cpu=cpu,
        ddp_backend="gloo" if cpu else None,
    )


def _train_after_evaluation(trainer: Any) -> None:
    """Let ``trainer.train()`` wrap the model in DDP after a ``Trainer.predict`` before training.

    On several processes ``Trainer.predict`` before ``train()`` prepares the model for evaluation
    only (no DDP wrapper), and accelerate marks it as prepared (transformers 5.24, accelerate
    1.15); ``train()`` then skips the DDP wrapper and each process trains alone on its share of
    every batch, gradients never averaged. Clear that mark (and accelerate's record of the model)
    so that ``train()`` prepares it for training. tests/test_cli_distributed.py compares a
    2-process run with a 1-process run and fails without this.
    """
    model = trainer.model
    if trainer.args.world_size <= 1 or trainer.model_wrapped is not model:
        return
    if getattr(model, "_is_accelerate_prepared", False):
        model._is_accelerate_prepared = False
        prepared = getattr(trainer.accelerator, "_models", None)
        if isinstance(prepared, list):
            prepared[:] = [m for m in prepared if m is not model]


def _count(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def finetune(
    cfg: FinetuneConfig,
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    callbacks: list[Any] | None = None,
) -> dict[str, Any]:
    """Run one fine-tuning job; return its metrics (also written to ``metrics.json``).

    Raises :class:`LoftUsageError` for bad input (before anything is written) and
    :class:`RunInterrupted` when Ctrl-C stopped training after saving a checkpoint.
    """
    from transformers import PrinterCallback, Trainer, set_seed

    from .callbacks import InterruptCallback, ProgressBar
    from .integrations import LoFTTrainer
    from .plots import plot_loss_curve

    t_start = time.perf_counter()
    processes = launched_processes()
    cfg.check(processes)
    init_processes()  # joins torchrun's / accelerate's process group (no-op for one process)
    main = is_main_process()
    progress = progress and main
    _quiet_libraries()
    task, train_path, eval_note = _load_data(cfg)
    spec = cfg.model or task.default_model
    model_path = resolve_model(spec)
    method_lr = cfg.lr if cfg.lr is not None else DEFAULT_LR[cfg.method]
    head_lr = cfg.head_lr if cfg.head_lr is not None else DEFAULT_HEAD_LR
    max_length = cfg.max_length or task.default_max_length
    steps_per_epoch = math.ceil(task.num_train / (cfg.batch_size * cfg.grad_accum))
    if cfg.max_steps is not None:
        max_steps = cfg.max_steps
    elif cfg.epochs is not None:
        max_steps = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    else:
        max_steps = DEFAULT_MAX_STEPS
    set_seed(cfg.seed)  # the fresh head starts the same for every method
    model, tokenizer, missing = _load_model(task, model_path, spec)
    fresh = _fresh_modules(missing)
    model, is_head = _apply_method(cfg, task, model, fresh)

    out = Path(cfg.output_dir or Path("runs") / f"{Path(cfg.data).stem}-{cfg.method}-r{cfg.rank}")
    args = _training_args(cfg, out, max_steps, method_lr, processes)
    world = _check_world(args, processes, cfg)

    # only now, with every input checked, touch the output directory (rank 0; the others wait)
    checkpoint, before = on_main_process(
        _start_run, out, cfg, model_path=model_path, world=world, overwrite=overwrite, resume=resume
    )
    has_head = any(is_head(n) for n, p in model.named_parameters() if p.requires_grad)
    trainable, total = _count(model)

    interrupt = InterruptCallback()
    common = dict(
        model=model,
        args=args,
        train_dataset=task.train_dataset(tokenizer, max_length),
        data_collator=task.collator(tokenizer),
        processing_class=tokenizer,
        callbacks=[ProgressBar(cfg.batch_size * cfg.grad_accum, f"{cfg.method} r{cfg.rank}", progress), interrupt,
                   *(callbacks or [])],
    )
    if cfg.method == "loft":
        trainer = LoFTTrainer(**common, loft_options={"head_lr": head_lr} if has_head else {})
    else:
        optimizer = torch.optim.AdamW(_param_groups(model, method_lr, head_lr, is_head), lr=method_lr,
                                      weight_decay=cfg.weight_decay)
        trainer = Trainer(**common, optimizers=(optimizer, None))
    trainer.remove_callback(PrinterCallback)
    if task.kind == "classification":
        # sequence classifiers take **kwargs but do not average their loss over accumulation steps
        trainer.loss_is_scaled_for_ga = False
        # ... nor over the processes' examples: with num_items_in_batch Trainer would multiply their
        # per-process mean loss by the number of processes (DDP then averages): N times the gradient
        trainer.model_accepts_loss_kwargs = False

    state_file = out / EVAL_BEFORE_FILE
    if before is None and cfg.eval_before:  # every rank evaluates (Trainer.predict is a collective)
        before = task.evaluate(trainer, tokenizer, max_length)
        _train_after_evaluation(trainer)
        if main:
            state_file.write_text(json.dumps(before))
        if progress:
            print(f"accuracy before training: {before['eval_accuracy']:.4f} on {len(getattr(task, 'eval_texts', getattr(task, 'eval_items', [])))} eval examples", flush=True)

    t_train = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    finally:
        interrupt.restore()
    train_seconds = time.perf_counter() - t_train
    barrier()  # rank 0 has finished writing the last checkpoint before any rank moves on or exits
    if interrupt.interrupted:
        saved = _latest_checkpoint(out)
        raise RunInterrupted(
            f"Interrupted at step {trainer.state.global_step}/{max_steps}; checkpoint saved in {saved}. "
            f"Continue with the same command plus --resume.",
            str(saved) if saved else None,
        )

    after = task.evaluate(trainer, tokenizer, max_length)
    curve = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    n_eval = len(getattr(task, "eval_texts", None) or getattr(task, "eval_items", []))
    metrics: dict[str, Any] = {
        "eval_accuracy": after["eval_accuracy"],
        "eval_loss": after["eval_loss"],
        "eval_accuracy_before": (before or {}).get("eval_accuracy"),
        "eval_loss_before": (before or {}).get("eval_loss"),
        "train_loss": result.training_loss,
        "train_loss_last": curve[-1][1] if curve else None,
        "steps": trainer.state.global_step,
        "epochs": round(trainer.state.global_step / steps_per_epoch, 3),
        "train_seconds": round(train_seconds, 1),
        "seconds": round(time.perf_counter() - t_start, 1),
        "train_examples_per_second": round(result.metrics.get("train_samples_per_second", 0.0), 2),
        "resumed_from": str(checkpoint) if checkpoint else None,
        "task": task.kind,
        "method": cfg.method,
        "rank": cfg.rank if cfg.method != "full" else None,
        "lr": method_lr,
        "head_lr": head_lr if has_head else None,
        "model": spec,
        "model_path": model_path,
        "data": train_path,
        "eval_data": eval_note,
        "num_train": task.num_train,
        "num_eval": n_eval,
        "batch_size": cfg.batch_size * cfg.grad_accum,
        "processes": world,
        "max_length": max_length,
        "seed": cfg.seed,
        "trainable_params": trainable,
        "total_params": total,
        "fresh_modules": fresh,
        "labels": task.label_names,
        "loss_curve": curve,
        "loft_version": __version__,
        "torch_threads": torch.get_num_threads(),
    }
    if main:
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        plot_loss_curve(curve, out / "loss_curve.png", f"{cfg.method} r{cfg.rank} on {Path(cfg.data).stem}")
        (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
        state_file.unlink(missing_ok=True)
    barrier()  # the run's files are complete before any rank returns
    return metrics
