"""Loading a run's inputs, checked before anything is written: the data, the model and its
tokenizer, the layers to adapt and the method's wrapping (:func:`prepare_inputs`)."""

from __future__ import annotations

import logging
import random
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..linalg import rank_regime
from .config import FinetuneConfig
from .data import BUILTIN_DATASETS, read_records, resolve_data
from .errors import LoftUsageError
from .methods import lora_options
from .models import resolve_model
from .tasks import Task
from .tasks.base import fresh_modules, linear_layer_types

def quiet_libraries() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("peft").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", category=FutureWarning)


@dataclass
class DataSplit:
    """A run's training and eval records (each with its ``_line``) and where they come from."""

    train_records: list[dict[str, Any]]
    train_path: Any  # Path
    eval_records: list[dict[str, Any]]
    eval_path: Any  # Path
    eval_note: str


def split_data(cfg: FinetuneConfig) -> DataSplit:
    """The run's training and eval records: ``--data`` and ``--eval-data``, the built-in test split,
    or 10% of ``--data`` held out (``--seed``). Every record is checked."""
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
    return DataSplit(train_records, train_path, eval_records, eval_path, eval_note)


def load_data(cfg: FinetuneConfig):
    """``(task, training file, where the eval data come from)`` of the run."""
    from .tasks import make_task

    split = split_data(cfg)
    task = make_task(split.train_records, split.train_path, split.eval_records, split.eval_path)
    task.limit_eval(cfg.max_eval)
    return task, str(split.train_path), split.eval_note


def one_line(e: BaseException) -> str:
    """An exception's whole message on one line (never cut mid-sentence)."""
    text = " ".join(str(e).split())
    return text or type(e).__name__


def load_model(task, model_path: str, spec: str, quantization: str | None = None):
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError) as e:
        raise LoftUsageError(f"Could not load model {spec!r} ({model_path}): {one_line(e)}") from None
    _check_architecture(task, config, spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError, TypeError) as e:
        raise LoftUsageError(f"Could not load the tokenizer of model {spec!r} ({model_path}): {one_line(e)}") from None
    if quantization is not None:  # QLoRA: see loft/app/quantize.py
        from .quantize import load_quantized

        model, missing = load_quantized(task, model_path, spec, 4 if quantization == "4bit" else 8)
    else:
        try:
            model, missing = task.load_model(model_path, dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise LoftUsageError(f"Could not load model {spec!r} ({model_path}): {one_line(e)}") from None
    task.prepare_tokenizer(tokenizer)
    task.prepare_model(model, tokenizer)
    return model, tokenizer, missing


def _check_architecture(task, config, spec: str) -> None:
    """Refuse an encoder (BERT, RoBERTa ...) for multiple choice or instruction data, which need a causal LM."""
    if task.kind == "classification":
        return
    model_type = getattr(config, "model_type", None)
    if is_encoder_config(config):
        raise LoftUsageError(
            f"Model {spec!r} is an encoder ({model_type}); {task.kind.replace('_', '-')} data needs a causal (decoder) "
            "language model such as smollm2-135m or any Llama / GPT-style model. Encoders suit text classification "
            "({\"text\", \"label\"} data)."
        )


def is_encoder_config(config: Any) -> bool:
    """Whether a model config is an encoder (BERT, RoBERTa ...) rather than a causal LM: its class
    has a masked-LM model (``transformers.MODEL_FOR_MASKED_LM_MAPPING``, the table behind
    ``AutoModelForMaskedLM``, keyed by config class) and it is not set up as a decoder."""
    from transformers import MODEL_FOR_MASKED_LM_MAPPING

    return type(config) in MODEL_FOR_MASKED_LM_MAPPING and not getattr(config, "is_decoder", False)


def check_max_length(model: nn.Module, max_length: int, spec: str) -> None:
    """Refuse a --max-length beyond the positions the model has (an index error on long texts)."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if isinstance(positions, int) and max_length > positions:
        raise LoftUsageError(
            f"--max-length {max_length} is more than model {spec!r} can take ({positions} positions). "
            f"Give --max-length {positions} or less."
        )


def _linear_modules(model: nn.Module, exclude: set[str]) -> dict[str, nn.Module]:
    """Linear layers LoRA can target (not the fresh head, not the output embedding)."""
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


def apply_method(cfg: FinetuneConfig, task: Task, model: nn.Module, fresh: list[str], targets: list[str] | None):
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


def prepare_inputs(cfg: FinetuneConfig, processes: int = 1) -> LoadedInputs:
    """Check every input of a run without writing anything: the data, the model, ``--max-length``.
    Returns what :func:`plan_run` builds on."""
    cfg.check(processes)
    quiet_libraries()
    task, train_path, eval_note = load_data(cfg)
    spec = cfg.model or task.default_model
    model_path = resolve_model(spec)
    max_length = cfg.max_length or task.default_max_length
    from transformers import set_seed

    set_seed(cfg.seed)  # the fresh head starts the same for every method
    model, tokenizer, missing = load_model(task, model_path, spec, cfg.quantization)
    check_max_length(model, max_length, spec)
    positions = getattr(model.config, "max_position_embeddings", None)
    task.check_inputs(tokenizer, max_length, positions if isinstance(positions, int) else None)
    fresh = fresh_modules(missing)
    return LoadedInputs(task=task, train_path=train_path, eval_note=eval_note, spec=spec, model_path=model_path,
                        max_length=max_length, model=model, tokenizer=tokenizer, fresh=fresh,
                        base_model_mb=round(model.get_memory_footprint() / 2**20, 1))
