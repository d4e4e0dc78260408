"""Built-in data sets shipped with loft, and readers for the user's own files.

Built-in names (``--data movie_sentiment``) resolve to the vendored JSONL files next to this
module; see ``ATTRIBUTION.md`` for provenance and licenses. :func:`read_records` reads JSONL
or CSV and reports malformed input by file and line.
"""

from __future__ import annotations

import csv
import json
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import LoftUsageError

__all__ = ["BUILTIN_DATASETS", "builtin_path", "read_records", "resolve_data"]

#: built-in data set name -> (task, one-line description)
BUILTIN_DATASETS: dict[str, tuple[str, str]] = {
    "movie_sentiment": ("classification", "movie review snippets, positive / negative (8,043 train / 2,000 test)"),
    "social_iqa": ("multiple_choice", "Social IQa commonsense questions, 3 choices (1,454 train / 500 test)"),
}


def builtin_path(name: str, split: str) -> Path:
    """Path of the vendored ``split`` (``"train"`` or ``"test"``) file of built-in set ``name``."""
    return Path(str(resources.files(__name__) / name / f"{split}.jsonl"))


def resolve_data(spec: str, split: str = "train") -> Path:
    """A built-in data set name or a path to a JSONL / CSV file -> an existing file path."""
    if spec in BUILTIN_DATASETS:
        return builtin_path(spec, split)
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    names = ", ".join(BUILTIN_DATASETS)
    if path.is_dir():
        raise LoftUsageError(f"Data path {spec!r} is a folder; give a .jsonl or .csv file (or a built-in set: {names}).")
    raise LoftUsageError(f"Data file {spec!r} does not exist. Give a .jsonl or .csv file or a built-in set: {names}.")


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL (one JSON object per line) or CSV (header row) file into a list of dicts.

    Each record gets a ``"_line"`` key (its line number) so later checks can point at it.
    """
    path = Path(path)
    if not path.is_file():
        raise LoftUsageError(f"Data file {str(path)!r} does not exist.")
    if path.suffix.lower() == ".csv":
        records = _read_csv(path)
    else:
        records = _read_jsonl(path)
    if not records:
        raise LoftUsageError(f"{path}: the file holds no records.")
    return records


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                hint = " (CSV files need a .csv extension)" if n == 1 and "," in line and not line.lstrip().startswith("{") else ""
                raise LoftUsageError(f"{path}, line {n}: not valid JSON ({e.msg}, column {e.colno}){hint}.") from None
            if not isinstance(record, dict):
                raise LoftUsageError(f"{path}, line {n}: expected a JSON object {{...}}, got {type(record).__name__}.")
            record["_line"] = n
            records.append(record)
    return records


def _read_csv(path: Path) -> list[dict[str, Any]]:
    records = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise LoftUsageError(f"{path}: empty CSV file (expected a header row such as 'text,label').")
        for row in reader:
            n = reader.line_num
            if None in row or any(v is None for v in row.values()):
                raise LoftUsageError(
                    f"{path}, line {n}: {len(reader.fieldnames)} columns in the header "
                    f"({', '.join(reader.fieldnames)}) but a different number on this line."
                )
            record: dict[str, Any] = dict(row)
            record["_line"] = n
            records.append(record)
    return records
