"""Instruction tuning of a causal LM with TRL's ``SFTTrainer``: chat, prompt/completion and
Alpaca records.

Formats (one per file, read from the first record's fields):

- **chat** ``{"messages": [{"role": ..., "content": ...}, ...]}`` whose last message is the
  assistant's: rendered with the tokenizer's chat template; the last assistant message is the
  completion, everything before it (system, user and earlier assistant turns) the prompt.
- **prompt/completion** ``{"prompt": ..., "completion": ...}``: plain text, the completion
  follows the prompt as given (TRL appends the end-of-sequence token).
- **Alpaca** ``{"instruction": ..., "input": ..., "output": ...}`` (``input`` optional): the
  prompt is Alpaca's template (:data:`ALPACA_PROMPT`, also what the LLM-Adapters commonsense
  experiments use), the completion is ``output``.

Every format becomes a TRL *prompt-completion* example (conversational for chat), trained with
``completion_only_loss=True``: the loss covers the completion tokens only (TRL builds ``labels``
with -100 on the prompt). Evaluation (:meth:`InstructionTask.evaluate`): the mean negative
log-likelihood per completion token of the eval data and its exponential (perplexity); when
every reference answer is short (:data:`SHORT_ANSWER_WORDS` words or fewer), the exact-match
accuracy of greedy generations, scored like the LLM-Adapters commonsense protocol: the first
answer of the eval set's answer set found in the normalised generation is the prediction
(:func:`first_answer`). The first :data:`NUM_SAMPLES` generations go to ``samples.jsonl``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import LoftUsageError
from .base import PREDICTIONS_FILE, CausalLMTask, label_logprob_sums, prediction_lines

__all__ = [
    "ALPACA_PROMPT",
    "FORMATS",
    "InstructionTask",
    "detect_format",
    "first_answer",
    "stop_ids",
    "token_ids",
    "normalize_answer",
]

#: format name -> the fields that identify it
FORMATS: dict[str, tuple[str, ...]] = {
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
}
_SHOWN = {"chat": '{"messages": [...]}', "prompt_completion": '{"prompt", "completion"}',
          "alpaca": '{"instruction", "input", "output"}'}

#: Alpaca's prompt (Taori et al. 2023), with and without an input
ALPACA_PROMPT = {
    "input": "Below is an instruction that describes a task, paired with an input that provides further context. "
             "Write a response that appropriately completes the request.\n\n"
             "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
    "no_input": "Below is an instruction that describes a task. Write a response that appropriately completes the "
                "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n",
}
ROLES = ("system", "user", "assistant", "tool")

#: a reference answer of at most this many words (after normalisation) is "short": exact match is scored
SHORT_ANSWER_WORDS = 3
#: new tokens generated for the exact-match score; and for the samples of long answers
ANSWER_TOKENS = 16
SAMPLE_TOKENS = 64
#: generations written to samples.jsonl
NUM_SAMPLES = 8
SAMPLES_FILE = "samples.jsonl"


# ----------------------------------------------------------------------------- records
@dataclass(frozen=True)
class Example:
    """One instruction example as TRL takes it: ``prompt`` and ``completion`` are strings, or
    lists of chat messages (``conversational``); ``reference`` is the completion's text."""

    prompt: str | list[dict[str, str]]
    completion: str | list[dict[str, str]]
    reference: str
    line: int | str

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)

    def as_row(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "completion": self.completion}


def detect_format(record: dict[str, Any]) -> str | None:
    """``"chat"``, ``"prompt_completion"``, ``"alpaca"`` from a record's fields, or ``None``."""
    keys = set(record) - {"_line"}
    for name, fields in FORMATS.items():
        if set(fields) <= keys:
            return name
    return None


def _text(record: dict[str, Any], key: str, where: str, fmt: str, *, optional: bool = False) -> str:
    if optional and record.get(key) in (None, ""):
        return ""
    value = record.get(key)
    if key not in record:
        raise LoftUsageError(f"{where}: missing field {key!r} ({fmt} records are {_SHOWN[fmt]}).")
    if not isinstance(value, str) or not value.strip():
        raise LoftUsageError(f"{where}: {key!r} must be a non-empty string, got {_short(value)}.")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _messages(record: dict[str, Any], where: str) -> list[dict[str, str]]:
    messages = record.get("messages")
    if not isinstance(messages, list) or len(messages) < 2:
        raise LoftUsageError(
            f"{where}: 'messages' must be a list of two or more messages "
            '[{"role": "user", "content": ...}, ..., {"role": "assistant", "content": ...}], '
            f"got {_short(messages)}."
        )
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise LoftUsageError(
                f'{where}: message {i} must be {{"role": ..., "content": "..."}} with string values, got {_short(m)}.'
            )
        if m["role"] not in ROLES:
            raise LoftUsageError(f"{where}: message {i} has role {m['role']!r}; roles are {', '.join(ROLES)}.")
        clean.append({"role": m["role"], "content": m["content"]})
    if clean[-1]["role"] != "assistant" or not clean[-1]["content"].strip():
        raise LoftUsageError(
            f"{where}: the last message must be the assistant's answer (non-empty), which the model is trained to "
            f"give; got role {clean[-1]['role']!r}."
        )
    return clean


def _check(record: dict[str, Any], path: str | Path, fmt: str) -> Example:
    line = record.get("_line", "?")
    where = f"{path}, line {line}"
    found = detect_format(record)
    if found is not None and found != fmt:
        raise LoftUsageError(
            f"{where}: a {found.replace('_', '/')} record, but the file starts with {fmt.replace('_', '/')} records "
            f"{_SHOWN[fmt]}; use one format per file."
        )
    if fmt == "chat":
        if "messages" not in record:
            raise LoftUsageError(f"{where}: missing field 'messages' (chat records are {_SHOWN['chat']}).")
        messages = _messages(record, where)
        return Example(messages[:-1], messages[-1:], messages[-1]["content"], line)
    if fmt == "prompt_completion":
        prompt = _text(record, "prompt", where, fmt)
        completion = _text(record, "completion", where, fmt)
        return Example(prompt, completion, completion, line)
    instruction = _text(record, "instruction", where, fmt)
    output = _text(record, "output", where, fmt)
    extra = record.get("input")
    if extra is not None and not isinstance(extra, str):
        raise LoftUsageError(f"{where}: 'input' must be a string (or absent), got {_short(extra)}.")
    prompt = ALPACA_PROMPT["input" if extra and extra.strip() else "no_input"].format(instruction=instruction,
                                                                                       input=extra or "")
    return Example(prompt, output, output, line)


def read_examples(records: list[dict[str, Any]], path: str | Path) -> tuple[str, list[Example]]:
    """The file's format (from its first record) and every record checked against it."""
    fmt = detect_format(records[0])
    if fmt is None:  # detect_task only sends instruction data here
        raise LoftUsageError(f"{path}: no instruction format matches the first record.")
    return fmt, [_check(r, path, fmt) for r in records]


# ----------------------------------------------------------------------------- scoring
def normalize_answer(text: str) -> str:
    """Lower case, punctuation to spaces, single spaces: ``" (B)."`` -> ``"b"``."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def first_answer(generation: str, answers: set[str]) -> str | None:
    """The answer of ``answers`` (normalised, see :func:`normalize_answer`) that starts first in
    the normalised ``generation``, matching whole words (the longer one when two start at the
    same word); ``None`` when none occurs."""
    words = normalize_answer(generation).split()
    split = sorted(((a, a.split()) for a in answers if a), key=lambda t: -len(t[1]))
    for i in range(len(words)):
        for answer, answer_words in split:
            if words[i : i + len(answer_words)] == answer_words:
                return answer
    return None


# ----------------------------------------------------------------------------- the task
_LOFT_SFT: dict[str, type] = {}


def _sft_classes() -> tuple[type, type]:
    """TRL's ``SFTTrainer`` and ``with_loft`` of it (made once), their LM head scoring only the
    completion's positions."""
    try:
        from trl import SFTTrainer
    except ImportError:
        raise LoftUsageError(
            "Instruction data is trained with TRL's SFTTrainer; install it: pip install 'torch-loft[app]' "
            "(or pip install 'trl>=1.16')."
        ) from None
    from ...integrations import library_internals, with_loft

    if "loft" not in _LOFT_SFT:

        class CompletionHeadSFTTrainer(SFTTrainer):
            """``SFTTrainer`` whose LM head scores only the completion's positions on every device
            (TRL does so on CUDA / XPU only): the same loss and gradients, a faster step on CPU
            (``library_internals.fused_head_scores_labelled_positions_only``)."""

            def compute_loss(self, *args, **kwargs):
                with library_internals.fused_head_scores_labelled_positions_only():
                    return super().compute_loss(*args, **kwargs)

        _LOFT_SFT["plain"] = CompletionHeadSFTTrainer
        _LOFT_SFT["loft"] = with_loft(CompletionHeadSFTTrainer)
    return _LOFT_SFT["plain"], _LOFT_SFT["loft"]


def token_ids(encoded: Any) -> list[int]:
    """``input_ids`` from what a tokenizer call or ``apply_chat_template`` returns."""
    if isinstance(encoded, dict) or hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    return list(encoded)


def prompt_ids(tokenizer: Any, example: Example) -> list[int]:
    """The prompt's token ids as TRL tokenizes them (the chat template with the generation
    prompt for conversations)."""
    if example.conversational:
        return token_ids(tokenizer.apply_chat_template(example.prompt, add_generation_prompt=True, tokenize=True))
    return token_ids(tokenizer(example.prompt))


@dataclass
class InstructionTask(CausalLMTask):
    """Validated instruction data and everything task-specific about training on it."""

    train_items: list[Example]
    eval_items: list[Example]
    train_format: str
    eval_format: str

    kind = "instruction"
    default_model = "smollm2-135m"
    default_max_length = 256
    label_names: list[str] | None = None

    @classmethod
    def from_records(cls, train: list[dict], train_path: str | Path, eval_: list[dict], eval_path: str | Path):
        train_format, train_items = read_examples(train, train_path)
        eval_format, eval_items = read_examples(eval_, eval_path)
        return cls(train_items, eval_items, train_format, eval_format)

    @property
    def short_answers(self) -> bool:
        """Whether every eval reference is a short answer (exact match is scored)."""
        return all(0 < len(normalize_answer(e.reference).split()) <= SHORT_ANSWER_WORDS for e in self.eval_items)

    def eval_answers(self) -> list[str] | None:
        """The normalised references where exact match is scored (every one short), else ``None``."""
        return [normalize_answer(e.reference) for e in self.eval_items] if self.short_answers else None

    # ------------------------------------------------------------------ model and tokenizer
    def check_inputs(self, tokenizer, max_length: int, max_positions: int | None = None) -> None:
        """Chat data needs a chat template; every prompt must leave room for completion tokens
        within ``max_length`` (TRL would otherwise drop the example); the advice given stays
        within the model's ``max_positions``."""
        if tokenizer.eos_token is None:
            raise LoftUsageError("The model's tokenizer has no end-of-sequence token; instruction tuning needs one "
                                 "(the model learns to stop with it).")
        for name, fmt in (("--data", self.train_format), ("--eval-data", self.eval_format)):
            if fmt == "chat" and not getattr(tokenizer, "chat_template", None):
                raise LoftUsageError(
                    f"{name} holds chat records ({_SHOWN['chat']}) but the model's tokenizer has no chat template to "
                    'render them. Use a chat model, or give {"prompt", "completion"} records.'
                )
        for name, items in (("training", self.train_items), ("eval", self.eval_items)):
            too_long = [(e, n) for e in items if (n := len(prompt_ids(tokenizer, e))) >= max_length]
            if too_long:
                e, n = too_long[0]
                longest = max(n for _, n in too_long)
                if max_positions is None or longest + 32 <= max_positions:
                    advice = f"Give --max-length {longest + 32} or more, or shorten those prompts."
                elif longest < max_positions and max_length < max_positions:
                    advice = (f"Give --max-length {max_positions} (the most this model takes), or shorten those "
                              "prompts.")
                else:
                    advice = (f"This model takes at most {max_positions} tokens, so shorten those prompts (the longest "
                              f"has {longest} tokens) or use a model with a longer context.")
                raise LoftUsageError(
                    f"{len(too_long)} {name} record(s) have prompts of --max-length {max_length} tokens or more (first: "
                    f"line {e.line}, {n} tokens), which leaves no completion token to train or score. {advice}"
                )

    # ------------------------------------------------------------------ training
    def train_dataset(self, tokenizer, max_length: int):
        from datasets import Dataset

        return Dataset.from_list([e.as_row() for e in self.train_items])

    def eval_dataset(self):
        from datasets import Dataset

        return Dataset.from_list([e.as_row() for e in self.eval_items])

    @staticmethod
    def collator(tokenizer):
        return None  # SFTTrainer's own (pads, keeps the -100 labels on the prompt)

    def training_arguments(self, args, max_length: int):
        """``args`` as TRL's ``SFTConfig`` (what SFTTrainer does with plain ``TrainingArguments``)
        with the completion-only loss and ``max_length``."""
        from trl import SFTConfig

        values = args.to_dict()
        values["hub_token"] = args.hub_token  # to_dict hides it
        return SFTConfig(**values, max_length=max_length, completion_only_loss=True, assistant_only_loss=False,
                         packing=False, dataset_num_proc=None)

    def trainer_class(self, loft: bool) -> type:
        plain, with_loft = _sft_classes()
        return with_loft if loft else plain

    def trainer_inputs(self, tokenizer, max_length: int) -> dict[str, Any]:
        """SFTTrainer tokenizes both sets itself (the eval set is what :meth:`evaluate` scores)."""
        import datasets

        datasets.disable_progress_bars()
        return {"train_dataset": self.train_dataset(tokenizer, max_length), "eval_dataset": self.eval_dataset(),
                "data_collator": None}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, trainer, tokenizer, max_length: int) -> dict[str, Any]:
        """``eval_loss`` (mean NLL per completion token), ``eval_perplexity`` (its exponential),
        ``eval_accuracy`` (exact match of greedy generations; ``None`` unless every reference is
        short) and ``samples`` (the first :data:`NUM_SAMPLES` generations)."""
        model = trainer.model
        was_training = model.training
        model.eval()
        try:
            rows = trainer.eval_dataset
            if len(rows) != len(self.eval_items):
                raise LoftUsageError(
                    f"SFTTrainer kept {len(rows)} of the {len(self.eval_items)} eval examples; every eval prompt needs "
                    "room for completion tokens within --max-length."
                )
            encoded = [(list(r["input_ids"]), list(r["labels"])) for r in rows]
            nll, tokens = _completion_nll(model, encoded, trainer.data_collator, batch_size=8)
            loss = nll / max(tokens, 1)
            prompts = [ids[: next(i for i, label in enumerate(labels) if label != -100)] for ids, labels in encoded]
            short = self.short_answers
            n_gen = len(prompts) if short else min(NUM_SAMPLES, len(prompts))
            generations = _generate(model, tokenizer, prompts[:n_gen], ANSWER_TOKENS if short else SAMPLE_TOKENS,
                                    batch_size=trainer.args.per_device_eval_batch_size)
        finally:
            model.train(was_training)
        accuracy, predictions = None, None
        answers = [None] * n_gen
        if short:
            references = [normalize_answer(e.reference) for e in self.eval_items]
            answers = [first_answer(g, set(references)) for g in generations]
            predictions = list(zip(references, answers))
            accuracy = sum(a == r for r, a in predictions) / len(self.eval_items)
        samples = [
            {"prompt": e.prompt, "reference": e.reference, "generation": g, **({"answer": a} if short else {})}
            for e, g, a in list(zip(self.eval_items, generations, answers))[:NUM_SAMPLES]
        ]
        return {"eval_accuracy": accuracy, "eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0)),
                "samples": samples, **({"predictions": predictions} if predictions is not None else {})}

    def result_files(self, before: dict[str, Any] | None, after: dict[str, Any]) -> dict[str, str]:
        """``samples.jsonl`` (prompt, reference, and the generation before and after training),
        ``prompt_format.json`` (the training data's format, for ``loft generate``) and, where every
        reference is short (exact match is scored), ``predictions.jsonl``: per eval example, in
        order, the normalised reference (``label``), the answer read from the generation after
        training (``prediction``, ``null`` when none) and whether they agree."""
        earlier = (before or {}).get("samples") or []
        lines = []
        for i, s in enumerate(after.get("samples", [])):
            row = {"prompt": s["prompt"], "reference": s["reference"],
                   "before": earlier[i]["generation"] if i < len(earlier) else None, "after": s["generation"]}
            if "answer" in s:
                row["answer_before"] = earlier[i].get("answer") if i < len(earlier) else None
                row["answer_after"] = s["answer"]
            lines.append(json.dumps(row, ensure_ascii=False))
        from ..runmodel import PROMPT_FORMAT_FILE

        files = {SAMPLES_FILE: "".join(line + "\n" for line in lines),
                 PROMPT_FORMAT_FILE: json.dumps({"format": self.train_format}) + "\n"}
        if after.get("predictions") is not None:
            references, answers = zip(*after["predictions"]) if after["predictions"] else ((), ())
            files[PREDICTIONS_FILE] = prediction_lines(list(references), list(answers))
        return files


def _completion_nll(model, encoded: list[tuple[list[int], list[int]]], collate, batch_size: int) -> tuple[float, int]:
    """Summed negative log-likelihood of the label tokens (labels != -100) and their count.

    ``encoded``: ``(input_ids, labels)`` per example, labels -100 on the prompt; batches of
    similar length, padded by ``collate`` (SFTTrainer's collator: ``input_ids``,
    ``attention_mask``, ``labels`` of shape ``(B, T)``), the vocabulary projected at the
    completion's positions only (:func:`~loft.app.tasks.base.label_logprob_sums`).
    """
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    nll, tokens, sliced = 0.0, 0, True
    for start in range(0, len(order), batch_size):
        chunk = [{"input_ids": encoded[i][0], "labels": encoded[i][1]} for i in order[start : start + batch_size]]
        batch = {k: v.to(device) for k, v in collate(chunk).items() if k in ("input_ids", "attention_mask", "labels")}
        sums, counts, sliced = label_logprob_sums(model, batch, sliced)
        nll -= float(sums.sum())
        tokens += int(counts.sum())
    return nll, tokens


def _generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy completions of the prompts (token id lists), left-padded in batches of similar
    length; the new tokens decoded without special tokens."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop = stop_ids(model, tokenizer)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, eos_token_id=stop)
    out: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            n = len(prompts[i])
            ids[row, width - n :] = torch.tensor(prompts[i])
            mask[row, width - n :] = 1
        generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
        for row, i in enumerate(chunk):
            out[i] = tokenizer.decode(generated[row, width:], skip_special_tokens=True).strip()
    return out


def stop_ids(model, tokenizer) -> list[int]:
    """Token ids that end a generation: the tokenizer's end-of-sequence token and the model's."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    return sorted(ids)
