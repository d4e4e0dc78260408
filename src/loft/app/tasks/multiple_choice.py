"""Multiple-choice QA with a causal LM: ``{"question", "choices", "answer"}`` records.

Training: the language-model loss on the correct answer only, after the prompt
``"Question: <question>\\nAnswer:"``. Evaluation: the summed log-likelihood of each choice
after the same prompt; the most likely choice is the prediction.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import DataCollatorForSeq2Seq

from ..errors import LoftUsageError
from .base import PREDICTIONS_FILE, CausalLMTask, label_logprob_sums, prediction_lines

__all__ = ["MultipleChoiceTask", "prompt"]


def prompt(question: str) -> str:
    """The text before an answer."""
    return f"Question: {question}\nAnswer:"


def _check(record: dict[str, Any], path: str | Path) -> tuple[str, list[str], int]:
    line = record.get("_line", "?")
    where = f"{path}, line {line}"
    for key in ("question", "choices", "answer"):
        if key not in record:
            raise LoftUsageError(
                f"{where}: missing field {key!r} (multiple-choice records are "
                '{"question": ..., "choices": [...], "answer": index}).'
            )
    question, choices, answer = record["question"], record["choices"], record["answer"]
    if not isinstance(question, str) or not question.strip():
        raise LoftUsageError(f"{where}: 'question' must be a non-empty string.")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
        raise LoftUsageError(f"{where}: 'choices' must be a list of two or more non-empty strings, got {choices!r}.")
    if isinstance(answer, str) and answer in choices:
        answer = choices.index(answer)
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise LoftUsageError(
            f"{where}: 'answer' must be the index of the correct choice (0..{len(choices) - 1}) "
            f"or its text, got {answer!r}."
        )
    return question, choices, answer


@dataclass
class MultipleChoiceTask(CausalLMTask):
    """Validated multiple-choice data and everything task-specific about training on it."""

    train_items: list[tuple[str, list[str], int]]
    eval_items: list[tuple[str, list[str], int]]

    kind = "multiple_choice"
    default_model = "smollm2-135m"
    default_max_length = 128
    label_names: list[str] | None = None

    @classmethod
    def from_records(cls, train: list[dict], train_path: str | Path, eval_: list[dict], eval_path: str | Path):
        return cls([_check(r, train_path) for r in train], [_check(r, eval_path) for r in eval_])

    def eval_answers(self) -> list[int]:
        """The index of each eval question's correct choice."""
        return [answer for _, _, answer in self.eval_items]

    @staticmethod
    def _example(tokenizer, question: str, choice: str, max_length: int) -> dict[str, list[int]]:
        """Prompt + `` choice`` token ids, with labels -100 on the prompt (cut from the left if long)."""
        head = tokenizer(prompt(question))["input_ids"]
        tail = tokenizer(" " + choice.strip(), add_special_tokens=False)["input_ids"][: max_length - 1]
        head = head[-(max_length - len(tail)) :]
        ids = head + tail
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * len(head) + tail}

    def train_dataset(self, tokenizer, max_length: int) -> list[dict[str, Any]]:
        return [self._example(tokenizer, q, c[a], max_length) for q, c, a in self.train_items]

    @staticmethod
    def collator(tokenizer):
        return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)

    @torch.no_grad()
    def evaluate(self, trainer, tokenizer, max_length: int) -> dict[str, float]:
        """Accuracy: the choice with the highest summed log-likelihood; eval_loss: mean NLL per
        token of the correct answers.

        Sequences go in batches of similar length (less padding), and where the model supports
        a boolean ``logits_to_keep`` (transformers 5 causal LMs) the vocabulary projection is
        computed only at the answer positions instead of at every token.
        """
        model = trainer.model
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        collate = self.collator(tokenizer)
        flat = [(i, j, self._example(tokenizer, q, c, max_length)) for i, (q, cs, _) in enumerate(self.eval_items) for j, c in enumerate(cs)]
        flat.sort(key=lambda t: len(t[2]["input_ids"]))
        scores: dict[tuple[int, int], tuple[float, int]] = {}
        batch_size = trainer.args.per_device_eval_batch_size
        sliced = True  # try logits at the answer positions only; fall back to every position
        for start in range(0, len(flat), batch_size):
            chunk = flat[start : start + batch_size]
            batch = {k: v.to(device) for k, v in collate([ex for _, _, ex in chunk]).items()}
            sums, counts, sliced = label_logprob_sums(model, batch, sliced)
            for (i, j, _), s, n in zip(chunk, sums.tolist(), counts.tolist()):
                scores[(i, j)] = (s, n)
        model.train(was_training)
        correct, nll, tokens, predictions = 0, 0.0, 0, []
        for i, (_, choices, answer) in enumerate(self.eval_items):
            best = max(range(len(choices)), key=lambda j: scores[(i, j)][0])
            predictions.append(best)
            correct += best == answer
            s, n = scores[(i, answer)]
            nll, tokens = nll - s, tokens + n
        return {"eval_accuracy": correct / len(self.eval_items), "eval_loss": nll / max(tokens, 1),
                "predictions": predictions}

    def result_files(self, before: dict[str, Any] | None, after: dict[str, Any]) -> dict[str, str]:
        """``predictions.jsonl``: per eval example, in order, the index of the right choice, the
        chosen one after training and whether they agree."""
        return {PREDICTIONS_FILE: prediction_lines([answer for _, _, answer in self.eval_items],
                                                   after.get("predictions", []))}
