"""Built-in data sets derived from the vendored ones (provenance: ``ATTRIBUTION.md``).

``social_iqa_sft``: every Social IQa record of ``social_iqa`` (same train / test split) as a
prompt/completion instruction example, the question with its lettered choices as the prompt and
the letter of the right one as the completion::

    {"prompt": "Question: <question>\\nA. <choice 0>\\nB. <choice 1>\\nC. <choice 2>\\nAnswer:", "completion": " B"}

Regenerate with ``python -m loft.app.data.derive`` (a test checks the vendored files match).
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["LETTERS", "social_iqa_sft", "write_derived"]

LETTERS = "ABCDEFGH"


def social_iqa_sft(record: dict) -> dict[str, str]:
    """One ``{"question", "choices", "answer"}`` record as ``{"prompt", "completion"}``."""
    lines = [f"Question: {record['question']}"]
    lines += [f"{LETTERS[i]}. {choice}" for i, choice in enumerate(record["choices"])]
    return {"prompt": "\n".join(lines) + "\nAnswer:", "completion": f" {LETTERS[record['answer']]}"}


def derived_text(split: str) -> str:
    """The JSONL text of ``social_iqa_sft/<split>.jsonl`` built from ``social_iqa/<split>.jsonl``."""
    from . import builtin_path

    rows = [json.loads(line) for line in builtin_path("social_iqa", split).read_text(encoding="utf-8").splitlines()
            if line.strip()]
    return "".join(json.dumps(social_iqa_sft(r), ensure_ascii=False) + "\n" for r in rows)


def write_derived(folder: Path | None = None) -> None:
    """Write ``social_iqa_sft/{train,test}.jsonl`` (next to this module by default)."""
    folder = folder or Path(__file__).parent / "social_iqa_sft"
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        (folder / f"{split}.jsonl").write_text(derived_text(split), encoding="utf-8")


if __name__ == "__main__":
    write_derived()
