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
    "social_iqa_sft": ("instruction", "Social IQa as prompt/completion: question + lettered choices -> letter "
                       "(1,454 train / 500 test)"),
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
    try:
        if path.suffix.lower() == ".csv":
            records = _read_csv(path)
        else:
            records = _read_jsonl(path)
    except UnicodeDecodeError as e:
        raise LoftUsageError(
            f"{path}, line {_first_bad_line(path)}: not UTF-8 text ({e.reason}); save the file as UTF-8."
        ) from None
    except OSError as e:
        raise LoftUsageError(f"Cannot read data file {str(path)!r}: {e.strerror or e}.") from None
    if not records:
        raise LoftUsageError(f"{path}: the file holds no records.")
    return records


def _first_bad_line(path: Path) -> int | str:
    """The line number of the first byte of ``path`` that is not UTF-8."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        return data[: e.start].count(b"\n") + 1
    return "?"


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    # utf-8-sig: a byte-order mark at the start (as some editors write) is not part of the data;
    # newline="\n": JSON lines end at \n only (a stray \r inside a line is not a line break)
    with open(path, encoding="utf-8-sig", newline="\n") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            text = line.rstrip("\r\n")  # column numbers count within the line, not past its end
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                hint = " (CSV files need a .csv extension)" if n == 1 and "," in line and not line.lstrip().startswith("{") else ""
                raise LoftUsageError(f"{path}, line {n}: not valid JSON ({e.msg}, column {e.colno}){hint}.") from None
            except (ValueError, RecursionError) as e:  # e.g. an integer of thousands of digits, deep nesting
                raise LoftUsageError(f"{path}, line {n}: not usable JSON ({_short(e)}).") from None
            if not isinstance(record, dict):
                raise LoftUsageError(f"{path}, line {n}: expected a JSON object {{...}}, got {type(record).__name__}.")
            record["_line"] = n
            records.append(record)
    return records


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _read_csv(path: Path) -> list[dict[str, Any]]:
    records = []
    csv.field_size_limit(2**31 - 1)  # long texts are fine (the default stops at 128 KiB per field)
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        try:
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
        except csv.Error as e:
            raise LoftUsageError(f"{path}, line {reader.line_num}: not valid CSV ({_short(e)}).") from None
    return records
