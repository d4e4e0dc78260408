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
import os
import random
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from .atomic import publish_dir, replace_files, write_json
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
from ..linalg import rank_regime
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
#: Where files are written before they are renamed into place (result files; in checkpoints/: checkpoints).
STAGING = ".incoming"
#: In each checkpoint: the per-step training losses and training seconds so far (metrics after --resume).
PROGRESS_FILE = "loft_progress.json"

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
        if self.epochs is not None and not math.isfinite(self.epochs):
            raise LoftUsageError(f"--epochs must be a finite number, got {self.epochs}.")
        for name in ("lr", "head_lr"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise LoftUsageError(f"--{name.replace('_', '-')} must be > 0 and finite, got {value}.")
        if not 0 <= self.seed < 2**32:
            raise LoftUsageError(f"--seed must be between 0 and {2**32 - 1}, got {self.seed}.")
        if self.batch_size < 1:
            raise LoftUsageError(f"--batch-size must be >= 1, got {self.batch_size}.")
        if self.grad_accum < 1:
            raise LoftUsageError(f"FinetuneConfig.grad_accum must be >= 1, got {self.grad_accum}.")
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
def run_name(method: str, rank: int) -> str:
    """``loft-r4``; ``full`` for full fine-tuning (which has no rank)."""
    return "full" if method == "full" else f"{method}-r{rank}"


def default_output_dir(cfg: "FinetuneConfig") -> Path:
    return Path(cfg.output_dir or Path("runs") / f"{Path(cfg.data).stem}-{run_name(cfg.method, cfg.rank)}")


def _checkpoints(out: Path) -> list[Path]:
    """Published checkpoint folders, newest first (``.incoming`` holds ones being written)."""
    folder = out / CHECKPOINTS
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]), reverse=True)


def _latest_checkpoint(out: Path) -> Path | None:
    found = _checkpoints(out)
    return found[0] if found else None


def _damage(path: Path) -> str | None:
    """Why the file ``path`` cannot be loaded (truncated, not valid ...), or ``None``."""
    import zipfile

    try:
        if path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix == ".safetensors":
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    return "truncated"
                n = int.from_bytes(head, "little")
                header = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if path.stat().st_size < 8 + n + end:
                return "truncated"
        elif path.suffix in (".pt", ".pth", ".bin"):
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
            if bad is not None:
                return f"damaged entry {bad}"
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile, EOFError) as e:
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else 'unreadable'}"
    return None


def checkpoint_damage(checkpoint: Path) -> str | None:
    """The first file of ``checkpoint`` that cannot be loaded, and why; ``None`` when complete."""
    if not (checkpoint / "trainer_state.json").is_file():
        return "trainer_state.json is missing"
    for path in sorted(checkpoint.iterdir()):
        if path.is_file():
            why = _damage(path)
            if why:
                return f"{path.name}: {why}"
    return None


def _complete_checkpoint(out: Path) -> Path | None:
    """The newest checkpoint whose every file loads; a clear error when all are damaged."""
    found = _checkpoints(out)
    damaged = []
    for checkpoint in found:
        why = checkpoint_damage(checkpoint)
        if why is None:
            if damaged:
                print(f"Skipping damaged {damaged[0]}; resuming from {checkpoint.name}.", flush=True)
            return checkpoint
        damaged.append(f"{checkpoint.name} ({why})")
    if damaged:
        raise LoftUsageError(
            f"Cannot resume the run in {str(out)!r}: its checkpoint is damaged: {damaged[0]}. Nothing was changed. "
            "Start the run again with --overwrite."
        )
    return None


def _read_run_config(out: Path) -> dict[str, Any]:
    path = out / CONFIG_FILE
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(saved, dict) or not isinstance(saved.get("settings"), dict):
            raise ValueError("no 'settings'")
        return saved
    except (OSError, ValueError) as e:
        raise LoftUsageError(
            f"{path} is damaged ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}); nothing was "
            "changed. Start the run again with --overwrite (or choose another --output-dir)."
        ) from None


def _check_writable(out: Path) -> None:
    """Refuse an output directory this process cannot write, before anything is written."""
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise LoftUsageError(f"Cannot create --output-dir {str(out)!r}: {str(probe)!r} is a file.")
    problem = None
    if probe != out:  # the folder does not exist yet: ask, without creating anything next to it
        if not os.access(probe, os.W_OK | os.X_OK):
            problem = "permission denied"
    else:  # the run's own folder: try writing a file there (catches read-only file systems too)
        try:
            fd, name = tempfile.mkstemp(prefix=".loft-write-test-", dir=probe)
            os.close(fd)
            os.unlink(name)
        except OSError as e:
            problem = e.strerror or str(e)
    if problem:
        raise LoftUsageError(
            f"Cannot write to --output-dir {str(out)!r} ({str(probe)!r}: {problem}); nothing was written. "
            "Choose a folder you can write to."
        )


@dataclass
class OutputPlan:
    """What a run does with its output directory: ``new``, ``overwrite``, ``rerun`` (a finished
    run of the same settings, kept until the new result is complete) or ``resume``."""

    action: str
    checkpoint: Path | None = None
    existed: bool = False  # the folder existed before this run


def check_output_dir(out: Path, identity: dict[str, Any], *, overwrite: bool, resume: bool) -> OutputPlan:
    """Decide what this run does with ``out``, reading only: refuse (``LoftUsageError``) a folder
    the run must not use. Nothing is written here."""
    if overwrite and resume:
        raise LoftUsageError("--overwrite and --resume contradict each other; pass one of them.")
    if out.exists() and not out.is_dir():
        raise LoftUsageError(f"--output-dir {str(out)!r} is a file; give a folder.")
    if not out.exists() or not any(out.iterdir()):
        if resume:
            raise LoftUsageError(f"Nothing to resume: {str(out)!r} holds no run. Run without --resume.")
        _check_writable(out)
        return OutputPlan("new", existed=out.exists())
    if not (out / CONFIG_FILE).is_file():
        if overwrite:
            raise LoftUsageError(
                f"Output directory {str(out)!r} holds no loft run (no {CONFIG_FILE}); --overwrite only replaces a loft "
                "run, so nothing was changed. Choose another --output-dir or empty that folder yourself."
            )
        raise LoftUsageError(
            f"Output directory {str(out)!r} is not empty and holds no loft run; nothing was changed. "
            "Choose another --output-dir."
        )
    _check_writable(out)
    if overwrite:
        return OutputPlan("overwrite", existed=True)
    saved = _read_run_config(out)["settings"]
    diffs = [f"{k}: {saved.get(k)!r} there, {v!r} now" for k, v in identity.items() if saved.get(k) != v]
    if diffs:
        raise LoftUsageError(
            f"Output directory {str(out)!r} already holds a different run ({'; '.join(diffs[:4])}). Nothing was "
            "changed. Choose another --output-dir, or pass --overwrite to replace that run."
        )
    finished = (out / METRICS_FILE).is_file()
    if resume:
        checkpoint = _complete_checkpoint(out)
        if checkpoint is None:
            if finished:
                raise LoftUsageError(f"The run in {str(out)!r} already finished (metrics.json); nothing to resume.")
            raise LoftUsageError(
                f"No checkpoint in {str(out / CHECKPOINTS)!r} to resume from; start again with --overwrite."
            )
        return OutputPlan("resume", checkpoint, existed=True)
    if not finished:
        hint = "continue it with --resume" if _latest_checkpoint(out) is not None else "it left no checkpoint"
        raise LoftUsageError(
            f"Output directory {str(out)!r} holds an unfinished run of these settings ({hint}), or pass --overwrite "
            "to start again."
        )
    return OutputPlan("rerun", existed=True)


def prepare_output_dir(out: Path, identity: dict[str, Any], *, overwrite: bool, resume: bool) -> Path | None:
    """Check ``out`` and make it ready for this run; return the checkpoint to resume from."""
    plan = check_output_dir(out, identity, overwrite=overwrite, resume=resume)
    _apply_plan(out, plan)
    return plan.checkpoint


def _apply_plan(out: Path, plan: OutputPlan) -> None:
    """Make ``out`` ready (main process). A finished run being rerun keeps its results until the
    new ones are complete; only leftovers of an earlier interrupted attempt are removed."""
    if plan.action == "overwrite":
        print(f"Replacing the run in {out} (--overwrite).", flush=True)
        shutil.rmtree(out)
    elif plan.action == "rerun":
        print(f"Rerunning the finished run in {out}; its results stay until the new ones are complete.", flush=True)
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
        shutil.rmtree(out / STAGING, ignore_errors=True)
        (out / EVAL_BEFORE_FILE).unlink(missing_ok=True)
    elif plan.action == "resume":
        shutil.rmtree(out / CHECKPOINTS / STAGING, ignore_errors=True)  # a checkpoint a kill left half-written
        shutil.rmtree(out / STAGING, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


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


def _param_groups(model: nn.Module, lr: float, head_lr: float, is_head) -> list[dict[str, Any]]:
    body = [p for n, p in model.named_parameters() if p.requires_grad and not is_head(n)]
    head = [p for n, p in model.named_parameters() if p.requires_grad and is_head(n)]
    groups = [{"params": body, "lr": lr}]
    if head:
        groups.append({"params": head, "lr": head_lr})
    return groups


def _start_run(
    out: Path, cfg: FinetuneConfig, plan: OutputPlan, *, model_path: str, world: int
) -> tuple[str | None, dict[str, float] | None, dict[str, Any] | None]:
    """Make ``out`` ready (main process only): ``(checkpoint to resume from, saved eval-before
    metrics, saved training progress)``."""
    if plan.action == "resume":
        started = _read_run_config(out).get("processes", 1)
        if started != world:
            raise LoftUsageError(
                f"The run in {str(out)!r} was started on {started} process(es); resume it on {started} (now {world}), "
                "so that every process finds its own saved random state. Nothing was changed."
            )
    try:
        _apply_plan(out, plan)
        if plan.checkpoint is None:
            write_json(out / CONFIG_FILE, {"settings": cfg.identity(), "processes": world, "model_path": model_path,
                                           "loft_version": __version__})
            return None, None, None
    except OSError as e:
        raise LoftUsageError(f"Cannot write to --output-dir {str(out)!r}: {e.strerror or e}.") from None
    state_file = out / EVAL_BEFORE_FILE
    before = json.loads(state_file.read_text()) if state_file.is_file() and not _damage(state_file) else None
    progress_file = plan.checkpoint / PROGRESS_FILE
    progress = json.loads(progress_file.read_text()) if progress_file.is_file() else None
    return str(plan.checkpoint), before, progress


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


def _one_line(e: BaseException) -> str:
    """An exception's whole message on one line (never cut mid-sentence)."""
    text = " ".join(str(e).split())
    return text or type(e).__name__


def _load_model(task, model_path: str, spec: str):
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
    try:
        model, missing = task.load_model(model_path, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise LoftUsageError(f"Could not load model {spec!r} ({model_path}): {_one_line(e)}") from None
    task.prepare_tokenizer(tokenizer)
    task.prepare_model(model, tokenizer)
    return model, tokenizer, missing


def _check_architecture(task, config, spec: str) -> None:
    """Refuse an encoder (BERT, RoBERTa ...) for multiple choice, which needs a causal LM."""
    if task.kind != "multiple_choice":
        return
    from ..integrations.library_internals import is_encoder_model_type

    model_type = getattr(config, "model_type", None)
    if is_encoder_model_type(config):
        raise LoftUsageError(
            f"Model {spec!r} is an encoder ({model_type}); multiple-choice data needs a causal (decoder) language "
            "model such as smollm2-135m or any Llama / GPT-style model. Encoders suit text classification "
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


class _RunTrainerMixin:
    """What ``loft finetune`` adds to ``transformers.Trainer``:

    - the training loss of every step, kept (averaged over the processes) in each checkpoint, so
      that after ``--resume`` ``metrics.json`` describes the whole run as if uninterrupted;
    - checkpoints written into ``checkpoints/.incoming/`` and renamed into place once complete,
      so a kill at any moment leaves the previous checkpoint intact (``--resume`` uses it).
    """

    def _loft_setup(self, progress: dict[str, Any] | None) -> None:
        self._loft_prior_losses = list((progress or {}).get("losses", []))
        self._loft_prior_seconds = float((progress or {}).get("train_seconds", 0.0))
        self._loft_step_losses: dict[int, torch.Tensor] = {}
        self._loft_t0 = time.perf_counter()

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
        with saving_checkpoints_into(self, staging):
            super()._save_checkpoint(model, trial)
        progress = self.loft_progress()
        barrier()  # every process has written its files (rng_state_<rank>.pth) before the rename
        if self.args.should_save:
            write_json(staging / name / PROGRESS_FILE, progress)
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

    Raises :class:`LoftUsageError` for bad input (before anything is written) and
    :class:`RunInterrupted` when Ctrl-C stopped the run (its message says what was kept).
    """
    run = _Run(cfg)
    try:
        return run.execute(overwrite=overwrite, resume=resume, progress=progress, callbacks=callbacks)
    except KeyboardInterrupt:
        raise RunInterrupted(run.interrupted(), run.checkpoint_kept()) from None


def prepare_inputs(cfg: FinetuneConfig, processes: int = 1) -> dict[str, Any]:
    """Check every input of a run without writing anything: the data, the model, the method's
    layers and ranks, ``--max-length``. Returns what :func:`finetune` builds on."""
    cfg.check(processes)
    _quiet_libraries()
    task, train_path, eval_note = _load_data(cfg)
    spec = cfg.model or task.default_model
    model_path = resolve_model(spec)
    max_length = cfg.max_length or task.default_max_length
    from transformers import set_seed

    set_seed(cfg.seed)  # the fresh head starts the same for every method
    model, tokenizer, missing = _load_model(task, model_path, spec)
    _check_max_length(model, max_length, spec)
    fresh = _fresh_modules(missing)
    return dict(task=task, train_path=train_path, eval_note=eval_note, spec=spec, model_path=model_path,
                max_length=max_length, model=model, tokenizer=tokenizer, fresh=fresh)


class _Run:
    """One run of :func:`finetune`, with what an interruption needs to report."""

    def __init__(self, cfg: FinetuneConfig) -> None:
        self.cfg = cfg
        self.out = default_output_dir(cfg)
        self.phase = "starting"
        self.plan: OutputPlan | None = None  # set once the output directory is touched
        self.main = True

    # -------------------------------------------------------------- interruptions
    def checkpoint_kept(self) -> str | None:
        if self.plan is None:
            return None
        found = _latest_checkpoint(self.out)
        return str(found) if found else None

    def interrupted(self) -> str:
        """The one line printed when Ctrl-C stops the run outside the training steps (or a
        second Ctrl-C aborts them): what was kept, and how to go on."""
        where = f"Interrupted while {self.phase}"
        if self.plan is None:
            return f"{where}; nothing was written (the output directory {str(self.out)!r} is unchanged)."
        checkpoint = _latest_checkpoint(self.out) if self.out.is_dir() else None
        if checkpoint is not None:
            kept = f"checkpoint {checkpoint} is kept; continue with the same command plus --resume"
            if self.plan.action == "rerun":
                kept += f" (the earlier finished results in {self.out} are unchanged until the rerun completes)"
            return f"{where}; {kept}."
        if self.plan.action == "rerun":
            return f"{where}; the finished run in {self.out} is unchanged."
        if self.plan.action == "resume":
            return f"{where}; the run in {self.out} is unchanged; continue with --resume."
        if self.main:  # a new run that never reached a checkpoint: leave the folder as it was
            for name in (CONFIG_FILE, EVAL_BEFORE_FILE, STAGING, CHECKPOINTS):
                path = self.out / name
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            if not self.plan.existed and self.out.is_dir() and not any(self.out.iterdir()):
                self.out.rmdir()
        if self.plan.action == "overwrite":
            return f"{where}; nothing was kept (--overwrite had removed the previous run in {self.out})."
        return f"{where}; nothing was kept (no checkpoint yet), {str(self.out)!r} is as before."

    # -------------------------------------------------------------- the run
    def execute(self, *, overwrite: bool, resume: bool, progress: bool, callbacks: list[Any] | None) -> dict[str, Any]:
        from transformers import PrinterCallback, Trainer

        from ..integrations import LoFTTrainer
        from ..integrations.library_internals import let_train_wrap_for_ddp, loss_is_per_process_mean
        from .callbacks import InterruptCallback, ProgressBar

        cfg, out = self.cfg, self.out
        t_start = time.perf_counter()
        processes = launched_processes()
        cfg.check(processes)
        self.phase = "joining the other processes"
        init_processes()  # joins torchrun's / accelerate's process group (no-op for one process)
        main = self.main = is_main_process()
        progress = progress and main
        self.phase = "loading the data and the model"
        inputs = prepare_inputs(cfg, processes)
        task, model, tokenizer, fresh = inputs["task"], inputs["model"], inputs["tokenizer"], inputs["fresh"]
        spec, model_path, max_length = inputs["spec"], inputs["model_path"], inputs["max_length"]
        method_lr = cfg.lr if cfg.lr is not None else DEFAULT_LR[cfg.method]
        head_lr = cfg.head_lr if cfg.head_lr is not None else DEFAULT_HEAD_LR
        steps_per_epoch = math.ceil(task.num_train / (cfg.batch_size * cfg.grad_accum))
        if cfg.max_steps is not None:
            max_steps = cfg.max_steps
        elif cfg.epochs is not None:
            max_steps = max(1, math.ceil(cfg.epochs * steps_per_epoch))
        else:
            max_steps = DEFAULT_MAX_STEPS
        model, is_head = _apply_method(cfg, task, model, fresh)
        args = _training_args(cfg, out, max_steps, method_lr, processes)
        world = _check_world(args, processes, cfg)
        plan = on_main_process(check_output_dir, out, cfg.identity(), overwrite=overwrite, resume=resume)

        # only now, with every input checked, touch the output directory (rank 0; the others wait)
        self.phase = "preparing the output directory"
        self.plan = plan
        checkpoint, before, saved_progress = on_main_process(
            _start_run, out, cfg, plan, model_path=model_path, world=world
        )
        has_head = any(is_head(n) for n, p in model.named_parameters() if p.requires_grad)
        trainable, total = _count(model)
        name = run_name(cfg.method, cfg.rank)

        interrupt = InterruptCallback()
        common = dict(
            model=model,
            args=args,
            train_dataset=task.train_dataset(tokenizer, max_length),
            data_collator=task.collator(tokenizer),
            processing_class=tokenizer,
            callbacks=[ProgressBar(cfg.batch_size * cfg.grad_accum, name, progress), interrupt, *(callbacks or [])],
        )
        if cfg.method == "loft":
            trainer = _trainer_class(LoFTTrainer)(**common, loft_options={"head_lr": head_lr} if has_head else {})
        else:
            optimizer = torch.optim.AdamW(_param_groups(model, method_lr, head_lr, is_head), lr=method_lr,
                                          weight_decay=cfg.weight_decay)
            trainer = _trainer_class(Trainer)(**common, optimizers=(optimizer, None))
        trainer.remove_callback(PrinterCallback)
        if task.kind == "classification":
            # sequence classifiers average their loss over neither accumulation steps nor processes
            loss_is_per_process_mean(trainer)

        state_file = out / EVAL_BEFORE_FILE
        if before is None and cfg.eval_before:  # every rank evaluates (Trainer.predict is a collective)
            self.phase = "evaluating before training"
            before = task.evaluate(trainer, tokenizer, max_length)
            let_train_wrap_for_ddp(trainer)  # see loft.integrations.library_internals
            if main:
                write_json(state_file, before)
            if progress:
                print(f"accuracy before training: {before['eval_accuracy']:.4f} on {len(getattr(task, 'eval_texts', getattr(task, 'eval_items', [])))} eval examples", flush=True)

        self.phase = "training (second Ctrl-C)"
        trainer._loft_setup(saved_progress)
        try:
            result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        finally:
            interrupt.restore()
        barrier()  # rank 0 has finished writing the last checkpoint before any rank moves on or exits
        if interrupt.interrupted:
            saved = _latest_checkpoint(out)
            raise RunInterrupted(
                f"Interrupted at step {trainer.state.global_step}/{max_steps}; checkpoint saved in {saved}. "
                f"Continue with the same command plus --resume.",
                str(saved) if saved else None,
            )

        self.phase = "evaluating after training"
        whole = trainer.loft_progress()  # the whole run, also when it was resumed
        losses, train_seconds = whole["losses"], whole["train_seconds"]
        after = task.evaluate(trainer, tokenizer, max_length)
        curve = _loss_curve(losses, args.logging_steps)
        n_eval = len(getattr(task, "eval_texts", None) or getattr(task, "eval_items", []))
        steps = trainer.state.global_step
        metrics: dict[str, Any] = {
            "eval_accuracy": after["eval_accuracy"],
            "eval_loss": after["eval_loss"],
            "eval_accuracy_before": (before or {}).get("eval_accuracy"),
            "eval_loss_before": (before or {}).get("eval_loss"),
            "train_loss": sum(losses) / len(losses) if losses else result.training_loss,
            "train_loss_last": curve[-1][1] if curve else None,
            "steps": steps,
            "epochs": round(steps / steps_per_epoch, 3),
            "train_seconds": round(train_seconds, 1),
            "seconds": None,
            "train_examples_per_second": round(steps * cfg.batch_size * cfg.grad_accum / max(train_seconds, 1e-9), 2),
            "resumed_from": str(checkpoint) if checkpoint else None,
            "task": task.kind,
            "method": cfg.method,
            "rank": cfg.rank if cfg.method != "full" else None,
            "lr": method_lr,
            "head_lr": head_lr if has_head else None,
            "model": spec,
            "model_path": model_path,
            "data": inputs["train_path"],
            "eval_data": inputs["eval_note"],
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
        self.phase = "saving the results"
        if main:
            try:
                _save_results(out, model, tokenizer, metrics, curve, f"{name} on {Path(cfg.data).stem}", t_start)
            except OSError as e:
                raise LoftUsageError(
                    f"Could not write the results to {str(out)!r}: {e.strerror or e}. The last checkpoint is kept: free "
                    "space or fix permissions, then rerun the same command with --resume."
                ) from None
        barrier()  # the run's files are complete before any rank returns
        metrics["seconds"] = round(time.perf_counter() - t_start, 1)
        return metrics


def _save_results(out: Path, model, tokenizer, metrics: dict[str, Any], curve, title: str, t_start: float) -> None:
    """Write the result files beside the folder's current content (``.incoming/``), then move
    them in, ``metrics.json`` (which marks the run as finished) last; then drop the checkpoints.

    Until the moves start, an earlier finished run's files are untouched; its ``metrics.json``
    goes first, so a crash among the moves leaves an unfinished run whose final checkpoint
    ``--resume`` turns into the results again.
    """
    from .plots import plot_loss_curve

    staging = out / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    plot_loss_curve(curve, staging / "loss_curve.png", title)
    metrics["seconds"] = round(time.perf_counter() - t_start, 1)
    (staging / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    (out / METRICS_FILE).unlink(missing_ok=True)
    replace_files(staging, out, last=METRICS_FILE)
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    (out / EVAL_BEFORE_FILE).unlink(missing_ok=True)
