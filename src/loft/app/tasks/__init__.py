"""The tasks of ``loft finetune``: text classification, multiple-choice QA and instruction
tuning.

:func:`make_task` picks the task from the fields of the training data (``text``/``label``,
``question``/``choices``/``answer``, or an instruction format: ``messages``,
``prompt``/``completion``, ``instruction``/``output``), checks every record and returns a task
object that knows how to build its model, encode examples and evaluate.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import LoftUsageError
from .base import Task
from .classification import ClassificationTask
from .instruction import FORMATS as INSTRUCTION_FORMATS
from .instruction import InstructionTask
from .multiple_choice import MultipleChoiceTask

__all__ = ["ClassificationTask", "InstructionTask", "MultipleChoiceTask", "Task", "detect_task", "make_task"]

_FIELDS = {
    "classification": ("text", "label"),
    "multiple_choice": ("question", "choices", "answer"),
}
_CLASSES = {"classification": ClassificationTask, "multiple_choice": MultipleChoiceTask,
            "instruction": InstructionTask}


def detect_task(records: list[dict[str, Any]], path: str | Path) -> str:
    """``"classification"``, ``"multiple_choice"`` or ``"instruction"`` from the first record's fields."""
    first = records[0]
    keys = set(first) - {"_line"}
    candidates = [(task, fields) for task, fields in _FIELDS.items()]
    candidates += [("instruction", fields) for fields in INSTRUCTION_FORMATS.values()]
    matches = [(task, fields) for task, fields in candidates if set(fields) <= keys]
    if matches:
        task, fields = matches[0]
        other = next(((t, f) for t, f in matches if t != task), None)
        if other is not None:
            _note_once(path, f"Note: the records of {path} have the fields of {_named(task, fields)} and of "
                             f"{_named(*other)}; reading them as {task.replace('_', '-')}. Remove the "
                             f"{', '.join(repr(f) for f in fields)} fields to train on them as {other[0]} data.")
        return task
    expected = " or ".join("{" + ", ".join(f'"{f}"' for f in fields) + "}" for _, fields in candidates)
    raise LoftUsageError(
        f"{path}, line {first.get('_line', 1)}: fields {sorted(keys)} match no task; expected {expected}."
    )


_NOTED: set[str] = set()


def _named(task: str, fields: tuple[str, ...]) -> str:
    return f"{task.replace('_', '-')} data ({{{', '.join(fields)}}})"


def _note_once(path: str | Path, text: str) -> None:
    """Print ``text`` once per file, on the main process only (``RANK`` 0 or unset)."""
    if str(path) in _NOTED or os.environ.get("RANK", "0") != "0":
        return
    _NOTED.add(str(path))
    print(text, flush=True)


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
    return _CLASSES[kind].from_records(train_records, train_path, eval_records, eval_path)
