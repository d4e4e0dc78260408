"""What ``loft finetune`` needs from a task: the :class:`Task` protocol.

:class:`~loft.app.tasks.classification.ClassificationTask`,
:class:`~loft.app.tasks.multiple_choice.MultipleChoiceTask` and
:class:`~loft.app.tasks.instruction.InstructionTask` subclass it explicitly: the members a run
uses are declared here, once, instead of being probed with ``getattr``. The Trainer-facing hooks
(:data:`DEFAULT_MEMBERS`: which Trainer class and arguments, the data keywords, a check before
anything is written, extra result files) have defaults that the first two tasks use as they are.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

__all__ = ["DEFAULT_MEMBERS", "PREDICTIONS_FILE", "CausalLMTask", "Task", "fresh_modules", "label_logprob_sums",
           "linear_layer_types", "prediction_lines"]

#: members with a working default (the Trainer-facing hooks); a task overrides what it changes
DEFAULT_MEMBERS = ("check_inputs", "training_arguments", "trainer_class", "trainer_inputs", "result_files")
#: the run folder's file of per-example predictions (classification, multiple choice)
PREDICTIONS_FILE = "predictions.jsonl"


def prediction_lines(answers: list[Any], predicted: list[Any], names: list[str] | None = None) -> str:
    """``predictions.jsonl``'s text: one line per eval example, ``{"label", "prediction",
    "correct"}`` (class names where ``names`` is given, else the values themselves: indices, or
    an instruction task's answers)."""
    import json

    def show(i: int) -> Any:
        return names[i] if names is not None else i

    return "".join(json.dumps({"label": show(a), "prediction": show(p), "correct": a == p}, ensure_ascii=False) + "\n"
                   for a, p in zip(answers, predicted))


def label_logprob_sums(model: Any, batch: dict[str, Any], sliced: bool = True) -> tuple[Any, Any, bool]:
    """Per sequence, the summed log-probability of its label tokens under a causal LM, and their count.

    ``batch``: ``input_ids``, ``attention_mask`` and ``labels``, each ``(B, T)`` on the model's
    device, ``labels`` -100 where a position is not a target. Returns ``(sums, counts, sliced)``:
    ``sums`` ``(B,)`` float32, ``counts`` ``(B,)``, and whether the vocabulary projection ran only at
    the target positions. With ``sliced`` it first asks the model for the logits there alone (a
    boolean ``logits_to_keep``, transformers 5 causal LMs, PEFT passes it on); a model that refuses
    it, or returns other shapes, is run again at every position and ``sliced`` comes back false, so
    a caller scoring many batches passes it on and asks once. The two paths agree to rounding.
    """
    import torch

    labels = batch["labels"][:, 1:]  # (B, T-1): logits at position t predict token t + 1
    mask = labels != -100
    rows = torch.arange(len(labels), device=labels.device)[:, None].expand_as(mask)[mask]  # (N,) sequence of each target
    targets = labels[mask]  # (N,)
    logits = None
    if sliced:
        keep = torch.cat([mask, torch.zeros_like(mask[:, :1])], dim=1)  # (B, T) bool
        try:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep)
            if out.logits.shape[:-1] == targets.shape:
                logits = out.logits.float()  # (N, V)
        except (TypeError, ValueError, IndexError, RuntimeError):
            pass
        sliced = logits is not None
    if logits is None:
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = full[:, :-1][mask].float()  # (N, V)
    token_logp = logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (N,)
    sums = torch.zeros(len(labels), dtype=token_logp.dtype, device=token_logp.device).index_add_(0, rows, token_logp)
    return sums, mask.sum(-1), sliced


def fresh_modules(missing_keys: list[str]) -> list[str]:
    """Module names of freshly initialised parameters (e.g. ``classifier``)."""
    return sorted({k.rsplit(".", 1)[0] for k in missing_keys if "." in k})


def linear_layer_types() -> tuple[type, ...]:
    """The layer classes LoRA adapts (and bitsandbytes quantizes): ``torch.nn.Linear`` and
    transformers' GPT-2 style ``Conv1D`` (weight stored as ``(in, out)``), which PEFT's LoRA also
    targets."""
    from torch import nn
    from transformers import Conv1D

    return nn.Linear, Conv1D


@runtime_checkable
class Task(Protocol):
    """Validated training and eval data plus everything task-specific about training on it."""

    #: ``"classification"``, ``"multiple_choice"`` or ``"instruction"`` (in metrics.json as ``task``)
    kind: ClassVar[str]
    #: built-in model name used when ``--model`` is not given
    default_model: ClassVar[str]
    #: ``--max-length`` when not given
    default_max_length: ClassVar[int]
    #: class names (classification), ``None`` for multiple choice
    label_names: list[str] | None

    @property
    def num_train(self) -> int:
        """Training examples."""
        ...

    @property
    def num_eval(self) -> int:
        """Eval examples (after :meth:`limit_eval`)."""
        ...

    def limit_eval(self, n: int | None) -> None:
        """Keep the first ``n`` eval examples (``None``: all)."""
        ...

    def load_model(self, path: str, **kwargs: Any) -> tuple[Any, list[str]]:
        """The pretrained model for this task and the names of its freshly initialised parameters."""
        ...

    def prepare_tokenizer(self, tokenizer: Any) -> None:
        """Give the tokenizer what the task needs (a pad token, the padding side)."""
        ...

    def prepare_model(self, model: Any, tokenizer: Any) -> None:
        """Match the model's config to the tokenizer (the pad token id)."""
        ...

    def train_dataset(self, tokenizer: Any, max_length: int) -> list[dict[str, Any]]:
        """Encoded training examples (what ``collator`` batches)."""
        ...

    def collator(self, tokenizer: Any) -> Any:
        """The ``data_collator`` for Trainer."""
        ...

    def evaluate(self, trainer: Any, tokenizer: Any, max_length: int) -> dict[str, float]:
        """``{"eval_accuracy", "eval_loss"}`` of ``trainer.model`` on the eval data (a collective
        on several processes: every rank calls it). A task may add keys (``eval_perplexity``)."""
        ...

    # ------------------------------------------------------------------ defaults a task may override
    def check_inputs(self, tokenizer: Any, max_length: int, max_positions: int | None = None) -> None:
        """Refuse data the model cannot train on (raise ``LoftUsageError``); runs before anything
        is written. ``max_positions``: the most tokens the model takes (``None``: unknown), for
        advice that the model accepts. Default: nothing to check."""

    def training_arguments(self, args: Any, max_length: int) -> Any:
        """The ``TrainingArguments`` the task's Trainer takes (default: ``args`` as they are)."""
        return args

    def trainer_class(self, loft: bool) -> type:
        """The Trainer class to train with: LoFT's (``loft=True``) or plain. Default:
        ``LoFTTrainer`` / ``transformers.Trainer``."""
        from transformers import Trainer

        from ...integrations import LoFTTrainer

        return LoFTTrainer if loft else Trainer

    def trainer_inputs(self, tokenizer: Any, max_length: int) -> dict[str, Any]:
        """The Trainer's data keyword arguments. Default: ``train_dataset`` and ``data_collator``."""
        return {"train_dataset": self.train_dataset(tokenizer, max_length), "data_collator": self.collator(tokenizer)}

    def result_files(self, before: dict[str, Any] | None, after: dict[str, Any]) -> dict[str, str]:
        """Extra files for the run folder, name -> text, from the evaluations before and after
        training. Default: none."""
        return {}

    def eval_answers(self) -> list[Any] | None:
        """The eval examples' reference answers as ``eval_accuracy`` compares them (one hashable
        value each: a label, a choice's index, a normalised answer), or ``None`` where no accuracy
        is scored. ``--lr auto`` takes its floor from them (``loft.lr_search.Floor.majority``).
        Default: ``None``."""
        return None


class CausalLMTask(Task):
    """What the tasks on a pretrained causal LM share (multiple choice, instruction data): their
    examples in ``train_items`` / ``eval_items``, the model as it is (nothing fresh) and right
    padding with the end-of-sequence token as pad."""

    train_items: list[Any]
    eval_items: list[Any]

    @property
    def num_train(self) -> int:
        return len(self.train_items)

    @property
    def num_eval(self) -> int:
        return len(self.eval_items)

    def limit_eval(self, n: int | None) -> None:
        if n is not None:
            self.eval_items = self.eval_items[:n]

    def load_model(self, path: str, **kwargs: Any):
        """The pretrained causal LM; nothing in it is fresh."""
        from transformers import AutoModelForCausalLM

        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
        return model, list(info.get("missing_keys", []))

    @staticmethod
    def prepare_tokenizer(tokenizer) -> None:
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        tokenizer.padding_side = "right"

    @staticmethod
    def prepare_model(model, tokenizer) -> None:
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id
