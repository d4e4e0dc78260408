"""Putting a benchmark's generated Markdown into a documentation page, between two marker comments
that the page holds, leaving the rest of the page as it is."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def replace_section(page: Path, begin: str, end: str, body: str) -> None:
    """Write ``body`` between ``begin`` and ``end`` (marker lines) in ``page``; ``SystemExit`` naming
    the markers when the page lacks them (nothing is written then)."""
    text = page.read_text()
    head, _, rest = text.partition(begin)
    _, found, tail = rest.partition(end)
    if not found:
        raise SystemExit(f"{page} has no '{begin}' ... '{end}' markers around the section to replace")
    page.write_text(f"{head}{begin}\n{body}\n{end}{tail}")


def result_options(parser: argparse.ArgumentParser, out: Path) -> None:
    """The options every benchmark that renders a page from its result file takes: ``--threads``,
    ``--out`` (the result file; its default is the committed one) and ``--report-only``."""
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=out)
    parser.add_argument("--report-only", action="store_true", help="re-render the page from --out")


def keep_result(result: dict[str, Any], out: Path, committed: Path, render: Callable[[dict[str, Any]], None]) -> None:
    """Write ``result`` to ``out``; render the page from it when ``out`` is the ``committed`` file
    (a result written elsewhere leaves the docs alone)."""
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    if out == committed:
        render(result)
