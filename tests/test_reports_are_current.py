"""Every generated page of the docs is what its command renders from the committed result files.

The project's standard: every number in the docs comes from a committed result file or one
command that reproduces it, and tables are regenerated, never retyped. For each page (or marked
section of a page) that a benchmark renders from a file under ``benchmarks/results/``, the test
renders it again from the committed file and compares it, byte for byte, with the committed
page; a failure names the command that regenerates the page. Nothing is written into the docs:
the report pages come from the scripts' ``page`` / ``report_*`` functions, which return text,
and the sections of docs/performance.md are rendered into a copy of the page under ``tmp_path``.
The reports of ``app_methods.py`` and the ``evidence*.py`` scripts carve the movie-sentiment
validation split from the vendored training file into ``benchmarks/results/sentiment/`` (an
ignored folder) as their commands do; the evidence report reads its majority class from there.
Figures (PNG) are not compared.

Left out, and why:

* ``docs/results/lr_defaults.md``: tests/test_lr_defaults.py already checks it
  (``test_the_committed_report_is_what_the_committed_results_render``).
* ``docs/results/matrix_factorization.md``: ``benchmarks/matrix_factorization.py`` writes it at
  the end of the whole run (about 20 minutes here) and has no report-only mode; its losses at
  steps 50 and 150 and its wall time are in no committed file
  (``benchmarks/results/matrix_factorization.json`` keeps the final losses, steps to target and
  best rates).
* ``docs/results/rank_regimes.md``: ``benchmarks/rank_regimes.py`` computes it (about 30 s) and
  writes no result file; the page names the commit it ran at.
* ``docs/benchmark_results.md`` (``benchmarks/optimizer_cost.py``): written from the
  measurements themselves, with no result file to render it from.
* ``docs/archive/real_*.md``: kept unchanged as archived (docs/archive/README.md); today
  ``benchmarks/real_tasks.py <task> --report-only`` still renders them byte for byte from
  ``benchmarks/archive/<task>.jsonl`` copied to ``benchmarks/results/<task>.jsonl``, but the
  archive is not meant to follow later changes of that script.

:func:`test_every_generated_page_is_checked_or_left_out_on_purpose` keeps these lists honest: a
new page under docs/results/, or a new marked section in a page, fails it until it is added here.
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

PY = ".venv/bin/python"


def _bench(name: str) -> ModuleType:
    """benchmarks/<name>.py, imported as the scripts import each other (by name)."""
    return importlib.import_module(name)


def _dry_sweep(results: Path):
    """A sweep over a committed results file that runs nothing (what a ``report`` stage reads)."""
    return _bench("_protocol").Sweep(results, 1, 1, dry=True)


# ----------------------------------------------------------------------------- renderers
# Each returns a function of tmp_path that returns the page as its command would write it.
def _app_methods(what: str) -> Callable[[Path], str]:
    """app_methods.py's ``lrs`` or ``memory`` report, from its results file."""
    def render(tmp_path: Path) -> str:
        app, sweep = _bench("app_methods"), _bench("_sweep")
        _, results = app.lr_runs() if what == "lrs" else app.memory_runs()
        return (app.report_lrs if what == "lrs" else app.report_memory)(sweep.load_results(results))
    return render


def _results_page(name: str) -> Callable[[Path], str]:
    """Scripts whose ``page`` takes the result lines (authors_lm, federated)."""
    def render(tmp_path: Path) -> str:
        bench = _bench(name)
        return bench.page(list(bench.load().values()))
    return render


def _staged_page(name: str) -> Callable[[Path], str]:
    """Scripts whose ``page`` takes what their stages make of the results (evidence_rank1, evidence_siqa)."""
    def render(tmp_path: Path) -> str:
        bench = _bench(name)
        return bench.page(*bench.report_inputs(_dry_sweep(bench.RESULTS)))
    return render


def _evidence(protocol: str) -> Callable[[Path], str]:
    """evidence.py's report of ``protocol`` (v1 or v2), from that protocol's results file."""
    def render(tmp_path: Path) -> str:
        evidence = _bench("evidence")
        p = evidence.PROTOCOLS[protocol]
        return evidence.page(*evidence.report_inputs(_dry_sweep(p.results), p), p)
    return render


def _performance_section(name: str) -> Callable[[Path], str]:
    """docs/performance.md with the section of benchmarks/<name>.py rendered into a copy of it."""
    def render(tmp_path: Path) -> str:
        bench = _bench(name)
        copy = tmp_path / "performance.md"
        shutil.copyfile(ROOT / "docs" / "performance.md", copy)
        if name == "perf":
            bench.write_report(json.loads(bench.RESULTS.read_text()), copy)
        else:
            bench.render(json.loads(bench.OUT.read_text()), copy)
        return copy.read_text()
    return render


@dataclass(frozen=True)
class Page:
    """A generated page: the committed file, the command that regenerates it, what renders it
    again (from tmp_path) and, for a section of a page, the benchmark whose ``BEGIN`` / ``END``
    markers delimit the part compared."""

    path: str
    command: str
    render: Callable[[Path], str]
    section: str | None = None

    def compared(self, text: str) -> str:
        """The part of ``text`` (the page's) this check compares: all of it, or its section."""
        if self.section is None:
            return text
        bench = _bench(self.section)
        assert bench.BEGIN in text and bench.END in text, f"{self.path} has lost the markers of {self.section}.py"
        return text.partition(bench.BEGIN)[2].partition(bench.END)[0]


PAGES = {
    "app_lrs": Page("docs/results/app_lrs.md", "benchmarks/app_methods.py lrs --report-only", _app_methods("lrs")),
    "app_memory": Page("docs/results/app_memory.md", "benchmarks/app_methods.py memory --report-only",
                       _app_methods("memory")),
    "authors_lm": Page("docs/results/authors_lm.md", "benchmarks/authors_lm.py report", _results_page("authors_lm")),
    "federated_sentiment": Page("docs/results/federated_sentiment.md", "benchmarks/federated.py report",
                                _results_page("federated")),
    "evidence_rank1": Page("docs/results/evidence_rank1.md", "benchmarks/evidence_rank1.py report",
                           _staged_page("evidence_rank1")),
    "evidence_siqa": Page("docs/results/evidence_siqa.md", "benchmarks/evidence_siqa.py report",
                          _staged_page("evidence_siqa")),
    "evidence_sentiment": Page("docs/results/evidence_sentiment.md", "benchmarks/evidence.py report --protocol v1",
                               _evidence("v1")),
    "evidence_sentiment_v2": Page("docs/results/evidence_sentiment_v2.md",
                                  "benchmarks/evidence.py report --protocol v2", _evidence("v2")),
    "performance.md:perf.py": Page("docs/performance.md", "benchmarks/perf.py --report-only",
                                   _performance_section("perf"), "perf"),
    "performance.md:sft_head.py": Page("docs/performance.md", "benchmarks/sft_head.py --report-only",
                                       _performance_section("sft_head"), "sft_head"),
    "performance.md:sft_step.py": Page("docs/performance.md", "benchmarks/sft_step.py --report-only",
                                       _performance_section("sft_step"), "sft_step"),
}

#: generated pages under docs/results/ that this module leaves out (its docstring says why)
LEFT_OUT = {"docs/results/lr_defaults.md", "docs/results/matrix_factorization.md", "docs/results/rank_regimes.md"}


@pytest.mark.parametrize("case", list(PAGES))
def test_the_committed_page_is_what_the_committed_results_render(case, tmp_path):
    page = PAGES[case]
    started = time.perf_counter()
    rendered = page.compared(page.render(tmp_path))
    print(f"{case}: rendered in {time.perf_counter() - started:.1f} s")
    where = f"{page.path} ({page.section}.py's section)" if page.section else page.path
    assert rendered == page.compared((ROOT / page.path).read_text()), (
        f"{where} is not what the committed results render: run `{PY} {page.command}` and commit the page")


def test_every_generated_page_is_checked_or_left_out_on_purpose():
    """Every Markdown page of docs/results/ and every marked section (``<!-- NAME: begin -->``) of
    the docs and the README has a case above or is left out on purpose."""
    pages = {str(p.relative_to(ROOT)) for p in (ROOT / "docs" / "results").glob("*.md")}
    checked = {page.path for page in PAGES.values()}
    assert pages - checked - LEFT_OUT == set(), "a generated page without a check: add it to PAGES or LEFT_OUT"
    assert LEFT_OUT <= pages, "LEFT_OUT names a page that is gone"
    sections = set()
    for doc in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        sections |= {f"{doc.name}:{name.split()[0]}" for name in re.findall(r"<!-- (.+?): begin -->", doc.read_text())}
    assert sections == {case for case in PAGES if ":" in case}, "a marked section without a check: add it to PAGES"
