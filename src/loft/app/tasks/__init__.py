"""The two tasks of ``loft finetune``: text classification and multiple-choice QA.

:func:`make_task` picks the task from the fields of the training data (``text``/``label`` or
``question``/``choices``/``answer``), checks every record and returns a task object that knows
how to build its model, encode examples and measure accuracy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import LoftUsageError
from .base import Task
from .classification import ClassificationTask
from .multiple_choice import MultipleChoiceTask

__all__ = ["ClassificationTask", "MultipleChoiceTask", "Task", "detect_task", "make_task"]

_FIELDS = {
    "classification": ("text", "label"),
    "multiple_choice": ("question", "choices", "answer"),
}


def detect_task(records: list[dict[str, Any]], path: str | Path) -> str:
    """``"classification"`` or ``"multiple_choice"`` from the first record's fields."""
    first = records[0]
    keys = set(first) - {"_line"}
    for task, fields in _FIELDS.items():
        if set(fields) <= keys:
            return task
    expected = " or ".join("{" + ", ".join(f'"{f}"' for f in fields) + "}" for fields in _FIELDS.values())
    raise LoftUsageError(
        f"{path}, line {first.get('_line', 1)}: fields {sorted(keys)} match no task; expected {expected}."
    )


def make_task(
    train_records: list[dict[str, Any]],
    train_path: str | Path,
    eval_records: list[dict[str, Any]],
    eval_path: str | Path,
) -> Task:
    """Check both record lists and build the task they describe."""
    kind = detect_task(train_records, train_path)
    eval_kind = detect_task(eval_records, eval_path)
    if eval_kind != kind:
        raise LoftUsageError(
            f"The training data ({train_path}) is {kind.replace('_', '-')} but the eval data ({eval_path}) "
            f"is {eval_kind.replace('_', '-')}; give eval data with the same fields."
        )
    cls = ClassificationTask if kind == "classification" else MultipleChoiceTask
    return cls.from_records(train_records, train_path, eval_records, eval_path)
