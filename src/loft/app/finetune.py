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
main process (rank 0) touches the output directory and prints (see :mod:`loft.app.launch`).
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

from .. import __version__
from .atomic import publish_dir, replace_files, write_failure, write_json
from .data import BUILTIN_DATASETS, read_records, resolve_data
from .config import (  # noqa: F401  (FinetuneConfig and the defaults are used from here too)
    DEFAULT_HEAD_LR,
    DEFAULT_LR,
    DEFAULT_MAX_STEPS,
    METHODS,
    FinetuneConfig,
    check_batch_split,
)
from .errors import LoftUsageError, OutputWriteError, RunInterrupted, Terminated, interruption
from .launch import (
    any_rank,
    barrier,
    cpu_processes,
    init_processes,
    is_main_process,
    launched_processes,
    on_main_process,
)
from ..linalg import rank_regime
from .memory import start_peak_memory
from .methods import PissaStart, lora_options, make_optimizer
from .models import resolve_model
from .runlock import RunLock
from .signals import sigterm_as_interrupt
from .rundir import (  # noqa: F401  (re-exported: compare and the tests use them from here)
    CHECKPOINTS,
    CONFIG_FILE,
    EVAL_BEFORE_FILE,
    METRICS_FILE,
    PROGRESS_FILE,
    STAGING,
    OutputPlan,
    _checkpoints,
    _damage,
    _latest_checkpoint,
    _read_run_config,
    apply_output_plan,
    check_output_dir,
    checkpoint_damage,
    default_output_dir,
    run_name,
    take_output_dir,
)
from .tasks import Task

__all__ = [
    "DEFAULT_HEAD_LR",
    "DEFAULT_LR",
    "METHODS",
    "FinetuneConfig",
    "RunMetrics",
    "RunPlan",
    "build_run",
    "finetune",
    "plan_run",
    "save_run",
    "train_run",
]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- model set-up
def _linear_modules(model: nn.Module, exclude: set[str]) -> dict[str, nn.Module]:
    """Linear layers LoRA can target (not the fresh head, not the output embedding)."""
    from ..integrations.library_internals import linear_layer_types

    kinds = linear_layer_types()
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = {}
    for name, module in model.named_modules():
        if not isinstance(module, kinds) or module is out_emb:
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
    if requested is not None and not requested:
        raise LoftUsageError(
            "--target-modules names no layer (empty); give layer names such as "
            f"{', '.join(sorted({n.rsplit('.', 1)[-1] for n in linears})[:4])}, or leave the option out for all of them."
        )
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
    largest = max(max(_layer_shape(linears[name])) for name in targets)
    if rank > largest:  # rank max(m, n) is already exact; more only costs memory (r^2 per column)
        raise LoftUsageError(
            f"--rank {rank} is larger than any adapted layer needs: the largest side of the targeted layers is "
            f"{largest}, and at --rank {largest} LoFT is already exactly full fine-tuning of every layer it adapts. "
            f"Use --rank {largest} or lower."
        )
    return targets


def _fresh_modules(missing_keys: list[str]) -> list[str]:
    """Module names of freshly initialised parameters (e.g. ``classifier``)."""
    return sorted({k.rsplit(".", 1)[0] for k in missing_keys if "." in k})


def _start_run(
    out: Path, cfg: FinetuneConfig, plan: OutputPlan, *, model_path: str, world: int, status: RunStatus
) -> tuple[str | None, dict[str, float] | None, dict[str, Any] | None]:
    """Take the folder's lock (held until the run ends, ``status.lock``) and make ``out`` ready
    (main process only): ``(checkpoint to resume from, saved eval-before metrics, saved training
    progress)``."""
    if plan.action == "resume":
        started = _read_run_config(out).get("processes", 1)
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
    before = json.loads(state_file.read_text()) if state_file.is_file() and not _damage(state_file) else None
    progress_file = plan.checkpoint / PROGRESS_FILE
    progress = json.loads(progress_file.read_text()) if progress_file.is_file() else None
    return str(plan.checkpoint), before, progress


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


def _write_eval_before(out: Path, before: dict[str, Any]) -> None:
    """Keep the evaluation before training (main process): a resumed run does not repeat it."""
    try:
        write_json(out / EVAL_BEFORE_FILE, before)
    except OSError as e:
        raise OutputWriteError(f"{write_failure(e, out)} while writing {EVAL_BEFORE_FILE}") from None


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


def eval_summary(metrics: dict[str, Any]) -> str:
    """``accuracy 0.8125`` (and ``perplexity 3.21`` where the task measures it)."""
    parts = []
    if metrics.get("eval_accuracy") is not None:
        parts.append(f"accuracy {metrics['eval_accuracy']:.4f}")
    if metrics.get("eval_perplexity") is not None:
        parts.append(f"perplexity {metrics['eval_perplexity']:.3f}")
    return ", ".join(parts) or f"loss {metrics['eval_loss']:.4f}"


def _one_line(e: BaseException) -> str:
    """An exception's whole message on one line (never cut mid-sentence)."""
    text = " ".join(str(e).split())
    return text or type(e).__name__


def _load_model(task, model_path: str, spec: str, quantization: str | None = None):
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError) as e:
        raise LoftUsageError(f"Could not load model {spec!r} ({model_path}): {_one_line(e)}") from None
    _check_architecture(task, config, spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError, TypeError) as e:
        raise LoftUsageError(f"Could not load the tokenizer of model {spec!r} ({model_path}): {_one_line(e)}") from None
    if quantization is not None:  # QLoRA: see loft/app/quantize.py
        from .quantize import load_quantized

        model, missing = load_quantized(task, model_path, spec, 4 if quantization == "4bit" else 8)
    else:
        try:
            model, missing = task.load_model(model_path, dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise LoftUsageError(f"Could not load model {spec!r} ({model_path}): {_one_line(e)}") from None
    task.prepare_tokenizer(tokenizer)
    task.prepare_model(model, tokenizer)
    return model, tokenizer, missing


def _check_architecture(task, config, spec: str) -> None:
    """Refuse an encoder (BERT, RoBERTa ...) for multiple choice or instruction data, which need a causal LM."""
    if task.kind == "classification":
        return
    from ..integrations.library_internals import is_encoder_model_type

    model_type = getattr(config, "model_type", None)
    if is_encoder_model_type(config):
        raise LoftUsageError(
            f"Model {spec!r} is an encoder ({model_type}); {task.kind.replace('_', '-')} data needs a causal (decoder) "
            "language model such as smollm2-135m or any Llama / GPT-style model. Encoders suit text classification "
            "({\"text\", \"label\"} data)."
        )


def _check_max_length(model: nn.Module, max_length: int, spec: str) -> None:
    """Refuse a --max-length beyond the positions the model has (an index error on long texts)."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if isinstance(positions, int) and max_length > positions:
        raise LoftUsageError(
            f"--max-length {max_length} is more than model {spec!r} can take ({positions} positions). "
            f"Give --max-length {positions} or less."
        )


def _apply_method(cfg: FinetuneConfig, task: Task, model: nn.Module, fresh: list[str], targets: list[str] | None):
    """Wrap ``model`` for the method (``targets``: the layers to adapt, ``None`` for full
    fine-tuning); return the model to train."""
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha if cfg.alpha is not None else 2 * cfg.rank,
        lora_dropout=0.0,
        target_modules=targets,
        modules_to_save=list(fresh) or None,
        **lora_options(cfg.method),  # dora, rslora, pissa (loft/app/methods.py)
        task_type="SEQ_CLS" if task.kind == "classification" else "CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def _fsdp_args(cfg: FinetuneConfig, model: nn.Module) -> dict[str, Any]:
    """Trainer's FSDP2 arguments for ``--fsdp``: ``fully_shard`` on each transformer block (the
    class of the layers of the model's ``nn.ModuleList`` stacks; Accelerate adds the input
    embeddings and the output head), then on the root. Checkpoints are Accelerate's DCP folders
    (``SHARDED_STATE_DICT``): its ``FULL_STATE_DICT`` resume hangs on CPU processes (Accelerate
    1.15's ``load_fsdp_model`` broadcasts the model on one rank only)."""
    if not cfg.fsdp:
        return {}
    blocks = sorted({type(m[0]).__name__ for m in model.modules()
                     if isinstance(m, nn.ModuleList) and len(m) > 1 and len({type(c) for c in m}) == 1})
    config: dict[str, Any] = {"version": 2, "reshard_after_forward": True, "state_dict_type": "SHARDED_STATE_DICT"}
    if blocks:
        config["transformer_layer_cls_to_wrap"] = blocks
    return {"fsdp": "full_shard auto_wrap" if blocks else "full_shard", "fsdp_config": config}


def _training_args(cfg: FinetuneConfig, out: Path, max_steps: int, lr: float, processes: int = 1,
                   fsdp: dict[str, Any] | None = None):
    from transformers import TrainingArguments

    cpu = cpu_processes()  # several processes, no GPU: DDP (or FSDP2, --fsdp) on the CPU over gloo
    return TrainingArguments(
        **(fsdp or {}),
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


class _RunTrainerMixin:
    """What ``loft finetune`` adds to ``transformers.Trainer``:

    - the training loss of every step, kept (averaged over the processes) in each checkpoint, so
      that after ``--resume`` ``metrics.json`` describes the whole run as if uninterrupted;
    - checkpoints written into ``checkpoints/.incoming/`` and renamed into place once complete,
      so a kill at any moment leaves the previous checkpoint intact (``--resume`` uses it).
    """

    #: builds the optimizer inside the Trainer (``--fsdp`` with lora / full: Trainer refuses a
    #: pre-built optimizer under FSDP); ``None``: the Trainer's own (LoFTTrainer's LoFTAdamW)
    _loft_optimizer_factory: Any = None

    def create_accelerator_and_postprocess(self) -> None:
        from ..integrations.trainer import use_fsdp_on_cpu

        super().create_accelerator_and_postprocess()
        use_fsdp_on_cpu(self)  # --fsdp on CPU processes: FSDP2 over gloo (see library_internals.fsdp_on_cpu)

    def create_optimizer(self, model=None):
        if self._loft_optimizer_factory is not None and self.optimizer is None:
            self.optimizer = self._loft_optimizer_factory(self.model if model is None else model)
        return super().create_optimizer(model)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Trainer's, except under FSDP2 (``--fsdp``): the whole trainable values gathered by every
        rank, written by rank 0 (Accelerate's ``get_state_dict`` hands DTensors to PEFT on CPU
        processes)."""
        if not getattr(self, "is_fsdp_enabled", False):
            return super().save_model(output_dir, _internal_call)
        weights = _full_trainable_state(self.model)  # a collective
        self._save(output_dir or self.args.output_dir, state_dict=weights)

    def _loft_setup(self, progress: dict[str, Any] | None) -> None:
        self._loft_prior_losses = list((progress or {}).get("losses", []))
        self._loft_prior_seconds = float((progress or {}).get("train_seconds", 0.0))
        self._loft_step_losses: dict[int, torch.Tensor] = {}
        self._loft_t0 = time.perf_counter()

    # Trainer's batch fetch before each optimizer step (library_internals.BATCH_SAMPLES_HOOK)
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Trainer's, except when the run already took its last step: a resume from the checkpoint
        written after the final step (an interruption during the final evaluation or while saving)
        would otherwise train step ``max_steps + 1`` (transformers 5.25 checks the step count only
        after a step). No batch then, and training stops before any step."""
        if self.state.global_step >= self.state.max_steps:
            self.control.should_training_stop = True
            return [], None
        return super().get_batch_samples(epoch_iterator, num_batches, device)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        step = self.state.global_step + 1
        value = loss.detach().float().reshape(())
        prev = self._loft_step_losses.get(step)
        self._loft_step_losses[step] = value if prev is None else prev + value
        return loss

    def loft_progress(self) -> dict[str, Any]:
        """Per-step losses of the whole run so far and its training seconds (a collective)."""
        steps = sorted(self._loft_step_losses)
        values: list[float] = []
        if steps:
            t = torch.stack([self._loft_step_losses[s] for s in steps])
            if _group_running():
                torch.distributed.all_reduce(t)
                t = t / torch.distributed.get_world_size()
            values = t.tolist()
        losses = self._loft_prior_losses[: (steps[0] - 1) if steps else None] + values
        seconds = self._loft_prior_seconds + time.perf_counter() - self._loft_t0
        return {"losses": losses, "train_seconds": seconds}

    # Trainer's private checkpoint hook (library_internals.SAVE_CHECKPOINT_HOOK)
    def _save_checkpoint(self, model, trial):
        from ..integrations.library_internals import checkpoint_folder_name, saving_checkpoints_into

        root = Path(self.args.output_dir)
        name = checkpoint_folder_name(self.state.global_step)
        staging = root / STAGING
        if self.args.should_save:
            shutil.rmtree(staging / name, ignore_errors=True)
        barrier()
        failed = None
        try:
            with saving_checkpoints_into(self, staging):
                super()._save_checkpoint(model, trial)
        except Exception as e:  # a full disk ...: every rank learns of it below, none is left waiting
            failed = write_failure(e, staging)
            if failed is None:
                raise
        progress = self.loft_progress()
        if self.args.should_save and failed is None:
            try:
                write_json(staging / name / PROGRESS_FILE, progress)
            except OSError as e:
                failed = write_failure(e, staging)
        if any_rank(failed is not None, self.args.device):
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)  # the partial checkpoint would keep the disk full
            raise OutputWriteError(f"{failed or 'another process could not write its part'} while writing {name} "
                                   f"into {str(root)!r} (its partial files were removed)")
        barrier()  # every process has written its files (rng_state_<rank>.pth) before the rename
        if self.args.should_save:
            publish_dir(staging / name, root / name)
            try:
                staging.rmdir()  # only when empty
            except OSError:
                pass
            for old in _checkpoints(root.parent):
                if old.name != name:
                    shutil.rmtree(old, ignore_errors=True)
        barrier()


_TRAINER_CLASSES: dict[type, type] = {}


def _trainer_class(base: type) -> type:
    """``base`` (Trainer or LoFTTrainer) with :class:`_RunTrainerMixin`."""
    if base not in _TRAINER_CLASSES:
        _TRAINER_CLASSES[base] = type(f"Run{base.__name__}", (_RunTrainerMixin, base), {})
    return _TRAINER_CLASSES[base]


def _group_running() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _loss_curve(losses: list[float], every: int) -> list[tuple[int, float]]:
    """Mean loss of every ``every`` steps (and of the steps after the last full window)."""
    curve, start = [], 0
    for step in range(1, len(losses) + 1):
        if step % every == 0 or step == len(losses):
            window = losses[start:step]
            curve.append((step, sum(window) / len(window)))
            start = step
    return curve


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

    Four steps: :func:`plan_run` (check every input, decide everything; nothing written),
    :func:`build_run` (prepare the output directory, build the Trainer), :func:`train_run`
    (evaluate before, train) and :func:`save_run` (evaluate after, write the results).

    Raises :class:`LoftUsageError` for bad input (before anything is written) and
    :class:`RunInterrupted` when Ctrl-C stopped the run (its message says what was kept).
    """
    status = RunStatus(cfg, progress)
    inputs = None
    try:
        with sigterm_as_interrupt():  # SIGTERM: as Ctrl-C (a checkpoint during training), exit status 143
            plan, inputs = plan_run(cfg, overwrite=overwrite, resume=resume, status=status)
            built = build_run(plan, inputs, callbacks=callbacks, status=status)
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


# ----------------------------------------------------------------------------- typed pieces
@dataclass
class LoadedInputs:
    """The data and model of a run, loaded and checked (nothing written): what
    :func:`prepare_inputs` returns."""

    task: Task
    train_path: str
    eval_note: str
    spec: str  # --model as given (or the task's default)
    model_path: str  # the folder it resolved to
    max_length: int
    model: nn.Module
    tokenizer: Any
    fresh: list[str]  # modules of freshly initialised parameters (the head)
    base_model_mb: float = 0.0  # the loaded base model's weights and buffers (quantized or not)


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


@dataclass
class TrainedRun:
    """What :func:`train_run` produced."""

    before: dict[str, float] | None
    training_loss: float  # Trainer's mean loss of this attempt's steps


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

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def prepare_inputs(cfg: FinetuneConfig, processes: int = 1) -> LoadedInputs:
    """Check every input of a run without writing anything: the data, the model, ``--max-length``.
    Returns what :func:`plan_run` builds on."""
    cfg.check(processes)
    _quiet_libraries()
    task, train_path, eval_note = _load_data(cfg)
    spec = cfg.model or task.default_model
    model_path = resolve_model(spec)
    max_length = cfg.max_length or task.default_max_length
    from transformers import set_seed

    set_seed(cfg.seed)  # the fresh head starts the same for every method
    model, tokenizer, missing = _load_model(task, model_path, spec, cfg.quantization)
    _check_max_length(model, max_length, spec)
    positions = getattr(model.config, "max_position_embeddings", None)
    task.check_inputs(tokenizer, max_length, positions if isinstance(positions, int) else None)
    fresh = _fresh_modules(missing)
    return LoadedInputs(task=task, train_path=train_path, eval_note=eval_note, spec=spec, model_path=model_path,
                        max_length=max_length, model=model, tokenizer=tokenizer, fresh=fresh,
                        base_model_mb=round(model.get_memory_footprint() / 2**20, 1))


# ----------------------------------------------------------------------------- the four steps
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
    method_lr = cfg.lr if cfg.lr is not None else DEFAULT_LR[cfg.method]
    head_lr = cfg.head_lr if cfg.head_lr is not None else DEFAULT_HEAD_LR
    steps_per_epoch = math.ceil(task.num_train / (cfg.batch_size * cfg.grad_accum))
    if cfg.max_steps is not None:
        max_steps = cfg.max_steps
    elif cfg.epochs is not None:
        max_steps = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    else:
        max_steps = DEFAULT_MAX_STEPS
    targets = None if cfg.method == "full" else resolve_targets(loaded.model, cfg.target_modules, cfg.rank, set(loaded.fresh))
    model = _apply_method(cfg, task, loaded.model, loaded.fresh, targets)
    args = _training_args(cfg, out, max_steps, method_lr, processes, _fsdp_args(cfg, loaded.model))
    args = task.training_arguments(args, loaded.max_length)  # TRL's SFTConfig for instruction data
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
    )
    return plan, RunInputs(task=task, model=model, tokenizer=loaded.tokenizer, args=args, pissa=pissa)


def build_run(plan: RunPlan, inputs: RunInputs, *, callbacks: list[Any] | None, status: RunStatus) -> BuiltRun:
    """Make the output directory ready (rank 0; the others wait) and build the Trainer."""
    from transformers import PrinterCallback

    from ..integrations.library_internals import loss_is_per_process_mean
    from .callbacks import InterruptCallback, ProgressBar

    cfg, model = plan.cfg, inputs.model
    # only now, with every input checked, touch the output directory
    status.phase = "preparing the output directory"
    if not plan.main:  # rank 0 sets it once it holds the folder's lock
        status.output = plan.output
    checkpoint, before, saved_progress = on_main_process(
        _start_run, plan.out, cfg, plan.output, model_path=plan.model_path, world=plan.world, status=status
    )
    has_head = any(plan.is_head(n) for n, p in model.named_parameters() if p.requires_grad)

    def build_optimizer(m: nn.Module) -> torch.optim.Optimizer:
        """AdamW, or PEFT's LoRA+ / LoRA-FA optimizers (LoRA-FA freezes A): loft/app/methods.py."""
        return make_optimizer(cfg.method, m, lr=plan.method_lr, head_lr=plan.head_lr,
                              weight_decay=cfg.weight_decay, is_head=plan.is_head)

    trainable, total = _count(model)
    interrupt = InterruptCallback()
    common = dict(
        model=model,
        args=inputs.args,
        **inputs.task.trainer_inputs(inputs.tokenizer, plan.max_length),
        processing_class=inputs.tokenizer,
        callbacks=[ProgressBar(plan.batch_size, plan.name, plan.progress), interrupt, *(callbacks or [])],
    )
    if cfg.method == "loft":
        trainer = _trainer_class(inputs.task.trainer_class(loft=True))(
            **common, loft_options={"head_lr": plan.head_lr} if has_head else {})
    else:
        trainer_class = _trainer_class(inputs.task.trainer_class(loft=False))
        if cfg.fsdp:  # Trainer refuses a pre-built optimizer under FSDP: it builds this one before sharding
            trainer = trainer_class(**common)
            trainer._loft_optimizer_factory = build_optimizer
        else:
            trainer = trainer_class(**common, optimizers=(build_optimizer(model), None))
    trainer.remove_callback(PrinterCallback)
    if cfg.quantization is not None:  # TRL's SFTTrainer casts a quantized model's adapter to bfloat16
        from .quantize import keep_adapter_float32

        keep_adapter_float32(model)
    if plan.task_kind == "classification":
        # sequence classifiers average their loss over neither accumulation steps nor processes
        loss_is_per_process_mean(trainer)
    return BuiltRun(trainer=trainer, interrupt=interrupt, checkpoint=checkpoint, before=before,
                    progress=saved_progress, has_head=has_head, trainable_params=trainable, total_params=total)


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
    trainer._loft_setup(built.progress)
    try:
        result = trainer.train(resume_from_checkpoint=built.checkpoint)
    finally:
        built.interrupt.restore()
    barrier()  # rank 0 has finished writing the last checkpoint before any rank moves on or exits
    if built.interrupt.interrupted:
        saved = _latest_checkpoint(plan.out)
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
    curve = _loss_curve(losses, inputs.args.logging_steps)
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
    )
    status.phase = "saving the results"
    weights = _full_trainable_state(inputs.model) if cfg.fsdp else None  # a collective: every rank
    save = inputs.pissa.save if inputs.pissa is not None else None
    # rank 0 writes; a failed write (a full disk) stops every rank with its message
    on_main_process(_save_results, plan.out, inputs.model, inputs.tokenizer, metrics,
                    f"{plan.name} on {Path(cfg.data).stem}", status.t_start, task.result_files(trained.before, after),
                    weights, save)
    barrier()  # the run's files are complete before any rank returns
    metrics.seconds = round(time.perf_counter() - status.t_start, 1)
    return metrics


class RunStatus:
    """How far one run of :func:`finetune` got: what an interruption reports and undoes."""

    def __init__(self, cfg: FinetuneConfig, progress: bool = True) -> None:
        self.cfg = cfg
        self.out = default_output_dir(cfg)
        self.t_start = time.perf_counter()
        self.progress = progress
        self.phase = "starting"
        self.output: OutputPlan | None = None  # set once the output directory is touched
        self.main = True
        self.memory = start_peak_memory()  # the run's peak memory (metrics.json: peak_memory_mb)
        self.load_peak_mb: float | None = None
        self.lock: RunLock | None = None  # the output folder's lock (main process), held until the run ends

    def release(self) -> None:
        """Let other processes use the output folder (the end of the run, however it ends)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # -------------------------------------------------------------- interruptions
    def checkpoint_kept(self) -> str | None:
        if self.output is None:
            return None
        found = _latest_checkpoint(self.out)
        return str(found) if found else None

    def interrupted(self, signal: BaseException | None = None) -> str:
        """The one line printed when Ctrl-C or SIGTERM (``signal``: the ``KeyboardInterrupt`` or
        ``Terminated`` it raised) stops the run outside the training steps (or a second one
        aborts them): what was kept, and how to go on."""
        what = interruption(signal)[0]
        phase = self.phase
        if phase == "training":
            phase += " (second SIGTERM)" if isinstance(signal, Terminated) else " (second Ctrl-C)"
        return self._stopped(f"{what} while {phase}")

    def write_failed(self, detail: str) -> str:
        """The one line printed when the system refused a write into the output folder (``detail``:
        which write and why, e.g. a full disk): what was kept, and how to go on."""
        line = self._stopped(f"Could not write the run's files: {detail}")
        return f"{line} Make room on that file system (or fix it) first."

    def _stopped(self, where: str) -> str:
        """``where`` and what the stopped run kept; a new run that reached no checkpoint leaves its
        output folder as it found it."""
        if self.output is None:
            return f"{where}; nothing was written (the output directory {str(self.out)!r} is unchanged)."
        checkpoint = _latest_checkpoint(self.out) if self.out.is_dir() else None
        if checkpoint is not None:
            kept = f"checkpoint {checkpoint} is kept; continue with the same command plus --resume"
            if self.output.action == "rerun":
                kept += f" (the earlier finished results in {self.out} are unchanged until the rerun completes)"
            return f"{where}; {kept}."
        if self.output.action == "rerun":
            return f"{where}; the finished run in {self.out} is unchanged."
        if self.output.action == "resume":
            return f"{where}; the run in {self.out} is unchanged; continue with --resume."
        if self.main:  # a new run that never reached a checkpoint: leave the folder as it was
            for name in (CONFIG_FILE, EVAL_BEFORE_FILE, STAGING, CHECKPOINTS):
                path = self.out / name
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            self.release()
            if not self.output.existed and self.out.is_dir() and not any(self.out.iterdir()):
                self.out.rmdir()
        if self.output.action == "overwrite":
            return f"{where}; nothing was kept (--overwrite had removed the previous run in {self.out})."
        if self.output.action == "restart":
            return f"{where}; nothing was kept (no checkpoint yet); run the same command again."
        return f"{where}; nothing was kept (no checkpoint yet), {str(self.out)!r} is as before."


def _full_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole values of an FSDP2-sharded model's parameters (trainable ones, and all of
    them for full fine-tuning), on the CPU of rank 0 (empty on the others). A collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    frozen = any(not p.requires_grad for p in model.parameters())
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=frozen)
    return get_model_state_dict(model, options=options)


def _save_results(out: Path, model, tokenizer, metrics: RunMetrics, title: str, t_start: float,
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
    """:func:`_save_results`'s writing: into ``staging``, then moved into ``out``."""
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
