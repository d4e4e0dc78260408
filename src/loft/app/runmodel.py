"""Load the causal LM a finished ``loft finetune`` run trained: what ``loft generate`` and
``loft merge`` start from.

A run folder of instruction or multiple-choice data holds either a PEFT adapter
(``adapter_config.json``, methods loft / lora / dora; its base model is the run's ``--model``)
or, for ``--method full``, the whole model. :func:`load_run` checks the folder and refuses,
with a message saying why, anything else: a folder that is not a finished loft run, a
classification run (a sequence classifier with a fresh head, which does not generate text).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import LoftUsageError
from .rundir import CONFIG_FILE, METRICS_FILE, file_damage

__all__ = ["PROMPT_FORMAT_FILE", "RunModel", "check_run_dir", "load_run"]

#: written by instruction runs: the training data's format, how ``loft generate`` wraps a prompt
PROMPT_FORMAT_FILE = "prompt_format.json"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class RunModel:
    """A run's model, ready to generate, and what is known about the run."""

    model: Any  # PeftModel (adapter runs) or the causal LM (full runs), in eval mode
    tokenizer: Any
    adapter: bool  # a PEFT adapter on a base model (False: --method full)
    base_path: str | None  # the base model's folder or hub id (adapter runs)
    method: str
    task: str
    prompt_format: str  # chat | prompt_completion | alpaca | multiple_choice


@dataclass(frozen=True)
class RunInfo:
    """What :func:`check_run_dir` read from a run folder (nothing loaded yet)."""

    folder: Path
    metrics: dict[str, Any]
    adapter: bool
    base_path: str | None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(value, dict):
            raise ValueError("not a JSON object")
        return value
    except (OSError, ValueError) as e:
        raise LoftUsageError(f"{path} is damaged or unreadable ({type(e).__name__}); rerun the run with --overwrite.") from None


def check_run_dir(run_dir: str | Path, command: str) -> RunInfo:
    """Check that ``run_dir`` is a finished loft run of a causal LM (reading only)."""
    folder = Path(run_dir).expanduser()
    if not folder.is_dir():
        raise LoftUsageError(f"Run folder {str(run_dir)!r} does not exist; give the --output-dir of a finished loft "
                             "finetune run.")
    if not (folder / METRICS_FILE).is_file():
        if (folder / CONFIG_FILE).is_file():
            raise LoftUsageError(f"The run in {str(folder)!r} has not finished (no {METRICS_FILE}); finish it with "
                                 f"loft finetune ... --resume, then run loft {command} again.")
        raise LoftUsageError(f"{str(folder)!r} is not a loft run folder (no {METRICS_FILE}); give the --output-dir of a "
                             "finished loft finetune run.")
    metrics = _read_json(folder / METRICS_FILE)
    task = metrics.get("task")
    if task == "classification":
        raise LoftUsageError(
            f"The run in {str(folder)!r} trained a text classifier (a sequence-classification head), which does not "
            f"generate text; loft {command} needs a causal-LM run (instruction or multiple-choice data)."
        )
    adapter = (folder / ADAPTER_CONFIG).is_file()
    if not adapter and not (folder / "config.json").is_file():
        raise LoftUsageError(f"{str(folder)!r} holds neither an adapter ({ADAPTER_CONFIG}) nor a model (config.json); "
                             "the run's files are incomplete. Rerun it with --overwrite.")
    for path in sorted(folder.iterdir()):  # a truncated weight file (a full disk, a copy cut short) would crash loading
        if path.suffix in (".safetensors", ".bin", ".pt") and path.is_file():
            why = file_damage(path)
            if why:
                raise LoftUsageError(
                    f"{path.name} in the run {str(folder)!r} is damaged ({why}); the run's files are incomplete. Rerun "
                    "the run with --overwrite (or restore that file from a copy)."
                )
    base = None
    if adapter:
        task_type = _read_json(folder / ADAPTER_CONFIG).get("task_type")
        if task_type != "CAUSAL_LM":
            raise LoftUsageError(f"The adapter in {str(folder)!r} is for task type {task_type!r}, not a causal LM "
                                 f"(CAUSAL_LM); loft {command} needs a causal-LM adapter run.")
        base = _base_model(folder, metrics)
    return RunInfo(folder, metrics, adapter, base)


def _base_model(folder: Path, metrics: dict[str, Any]) -> str:
    """The base model of an adapter run: a built-in name is resolved again (its converted
    folder may have been removed from the cache); otherwise the folder the run used."""
    from .models import BUILTIN_MODELS, resolve_model

    spec = metrics.get("model")
    if spec in BUILTIN_MODELS:
        return resolve_model(spec)
    path = metrics.get("model_path") or spec
    if not path:
        raise LoftUsageError(f"{folder / METRICS_FILE} names no base model; rerun the run with --overwrite.")
    if not Path(path).expanduser().is_dir() and (str(path).startswith(("/", ".", "~")) or Path(path).exists()):
        raise LoftUsageError(f"The run's base model {path!r} is gone; put it back (or a copy at that path) to use "
                             f"the adapter in {str(folder)!r}.")
    return str(path)


def load_run(run_dir: str | Path, command: str) -> RunModel:
    """The run's model (base + adapter, or the whole fine-tuned model) and tokenizer, float32,
    in eval mode, on the GPU when torch sees one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = check_run_dir(run_dir, command)
    folder = info.folder
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        if info.adapter:
            from peft import PeftModel

            base = AutoModelForCausalLM.from_pretrained(info.base_path, dtype=torch.float32)
            model = PeftModel.from_pretrained(base, folder)
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    except Exception as e:  # OSError, ValueError; safetensors' SafetensorError for a damaged file
        if not isinstance(e, (OSError, ValueError)) and type(e).__name__ != "SafetensorError":
            raise
        raise LoftUsageError(f"Could not load the run in {str(folder)!r}: {' '.join(str(e).split())}") from None
    if torch.cuda.is_available():
        model.to("cuda")
    model.eval()
    fmt = "multiple_choice" if info.metrics.get("task") == "multiple_choice" else "prompt_completion"
    if (folder / PROMPT_FORMAT_FILE).is_file():
        fmt = _read_json(folder / PROMPT_FORMAT_FILE).get("format", fmt)
    return RunModel(model=model, tokenizer=tokenizer, adapter=info.adapter, base_path=info.base_path,
                    method=info.metrics.get("method", "?"), task=info.metrics.get("task", "?"), prompt_format=fmt)
