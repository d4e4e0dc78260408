"""Text classification with an encoder: ``{"text", "label"}`` records, a fresh classification
head (``AutoModelForSequenceClassification``), accuracy by the argmax of the logits."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

from ..errors import LoftUsageError
from .base import PREDICTIONS_FILE, Task, prediction_lines

__all__ = ["ClassificationTask"]

_INT = re.compile(r"^-?\d+$")


def _label_value(record: dict[str, Any], path: str | Path) -> int | str:
    line = record.get("_line", "?")
    value = record["label"]
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip():
        value = value.strip()
        return int(value) if _INT.match(value) else value
    raise LoftUsageError(
        f"{path}, line {line}: label {value!r} is not a class name or an integer class id."
    )


def _check_text(record: dict[str, Any], path: str | Path) -> str:
    text = record.get("text")
    if not isinstance(text, str) or not text.strip():
        raise LoftUsageError(f"{path}, line {record.get('_line', '?')}: 'text' must be a non-empty string, got {text!r}.")
    return text


def _check_fields(record: dict[str, Any], path: str | Path) -> None:
    missing = [k for k in ("text", "label") if k not in record]
    if missing:
        raise LoftUsageError(
            f"{path}, line {record.get('_line', '?')}: missing field {missing[0]!r} "
            "(classification records are {\"text\": ..., \"label\": ...})."
        )


@dataclass
class ClassificationTask(Task):
    """Validated classification data and everything task-specific about training on it."""

    train_texts: list[str]
    train_labels: list[int]
    eval_texts: list[str]
    eval_labels: list[int]
    label_names: list[str]

    kind = "classification"
    default_model = "minilm-l6"
    default_max_length = 64

    @classmethod
    def from_records(cls, train: list[dict], train_path: str | Path, eval_: list[dict], eval_path: str | Path):
        """Check every record; map labels to ids (sorted); refuse eval labels unseen in training.
        ``eval_path == train_path``: the eval records were held out of the training file."""
        parsed = []
        for records, path in ((train, train_path), (eval_, eval_path)):
            texts, labels = [], []
            for r in records:
                _check_fields(r, path)
                texts.append(_check_text(r, path))
                labels.append(_label_value(r, path))
            parsed.append((texts, labels))
        (train_texts, train_values), (eval_texts, eval_values) = parsed
        held_out = str(eval_path) == str(train_path)
        kinds = {type(v) for v in train_values + eval_values}
        if len(kinds) > 1:
            first = {}  # the first record of each kind of label: (file, line, label)
            for records, values, path in ((train, train_values, train_path), (eval_, eval_values, eval_path)):
                for r, v in zip(records, values):
                    first.setdefault(type(v), (str(path), r["_line"], v))
            (p1, l1, v1), (p2, l2, v2) = first[int], first[str]
            where = (f"{p1}: line {l1} has {v1!r}, line {l2} has {v2!r}" if p1 == p2 else
                     f"{p1}, line {l1} has {v1!r}; {p2}, line {l2} has {v2!r}")
            raise LoftUsageError(f"Labels mix integers and names ({where}); use one kind of label throughout.")
        classes = sorted(set(train_values))
        if len(classes) < 2:
            raise LoftUsageError(f"{train_path}: every record has label {classes[0]!r}; classification needs two or more classes.")
        unseen = sorted(set(eval_values) - set(classes))
        if unseen:
            line = next(r["_line"] for r, v in zip(eval_, eval_values) if v == unseen[0])
            if held_out:
                raise LoftUsageError(
                    f"{train_path}: every record with label(s) {unseen[:5]} (first at line {line}) fell into the 10% "
                    f"held out for evaluation, so training never sees that label. Give --eval-data (a separate eval "
                    f"file), or more records of that label."
                )
            raise LoftUsageError(
                f"Labels do not match: {eval_path} has label(s) {unseen[:5]} (first at line {line}) that the "
                f"training data {train_path} never uses (its labels: {classes[:20]})."
            )
        index = {c: i for i, c in enumerate(classes)}
        return cls(
            train_texts,
            [index[v] for v in train_values],
            eval_texts,
            [index[v] for v in eval_values],
            [str(c) for c in classes],
        )

    # -------------------------------------------------------------------- model and data
    @property
    def num_train(self) -> int:
        return len(self.train_texts)

    @property
    def num_eval(self) -> int:
        return len(self.eval_texts)

    def limit_eval(self, n: int | None) -> None:
        """Keep the first ``n`` eval examples (``None``: all)."""
        if n is not None:
            self.eval_texts, self.eval_labels = self.eval_texts[:n], self.eval_labels[:n]

    def eval_answers(self) -> list[int]:
        """The eval labels' ids."""
        return list(self.eval_labels)

    def load_model(self, path: str, **kwargs: Any):
        """The pretrained encoder with a fresh head; returns ``(model, names of fresh parameters)``."""
        n = len(self.label_names)
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=n,
            id2label=dict(enumerate(self.label_names)),
            label2id={name: i for i, name in enumerate(self.label_names)},
            output_loading_info=True,
            **kwargs,
        )
        return model, list(info.get("missing_keys", []))

    @staticmethod
    def prepare_tokenizer(tokenizer) -> None:
        """Give the tokenizer a pad token if it has none."""
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token

    @staticmethod
    def prepare_model(model, tokenizer) -> None:
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id

    def _encode(self, tokenizer, texts: list[str], labels: list[int], max_length: int) -> list[dict[str, Any]]:
        enc = tokenizer(texts, truncation=True, max_length=max_length)
        keys = list(enc.keys())
        return [{**{k: enc[k][i] for k in keys}, "labels": labels[i]} for i in range(len(texts))]

    def train_dataset(self, tokenizer, max_length: int) -> list[dict[str, Any]]:
        return self._encode(tokenizer, self.train_texts, self.train_labels, max_length)

    def eval_dataset(self, tokenizer, max_length: int) -> list[dict[str, Any]]:
        return self._encode(tokenizer, self.eval_texts, self.eval_labels, max_length)

    @staticmethod
    def collator(tokenizer):
        return DataCollatorWithPadding(tokenizer)

    @torch.no_grad()
    def evaluate(self, trainer, tokenizer, max_length: int) -> dict[str, float]:
        """Accuracy (and mean loss) of ``trainer.model`` on the eval data, via ``Trainer.predict``."""
        out = trainer.predict(self.eval_dataset(tokenizer, max_length), metric_key_prefix="eval")
        logits = out.predictions[0] if isinstance(out.predictions, tuple) else out.predictions
        labels = np.asarray(out.label_ids)
        accuracy = float((np.asarray(logits).argmax(-1) == labels).mean())
        # The mean cross-entropy over the examples, from the gathered logits. (Trainer's own
        # eval_loss averages per-batch means; on several processes, where accelerate pads the last
        # batches with repeated examples and then cuts them off, that weighting is off.)
        loss = torch.nn.functional.cross_entropy(torch.as_tensor(np.asarray(logits), dtype=torch.float32),
                                                 torch.as_tensor(labels, dtype=torch.long))
        return {"eval_accuracy": accuracy, "eval_loss": float(loss),
                "predictions": [int(i) for i in np.asarray(logits).argmax(-1)]}

    def result_files(self, before: dict[str, Any] | None, after: dict[str, Any]) -> dict[str, str]:
        """``predictions.jsonl``: per eval example, in the eval file's order, its label, the
        label predicted after training and whether they agree."""
        return {PREDICTIONS_FILE: prediction_lines(self.eval_labels, after.get("predictions", []), self.label_names)}
