"""Pre-registered: does LoFT at rank 1 close the gap to full fine-tuning? (issue 31, item 7)

    .venv/bin/python benchmarks/evidence_rank1.py plan     # runs done / to do (nothing runs)
    .venv/bin/python benchmarks/evidence_rank1.py tune     # stage 1: each arm's learning rate
    .venv/bin/python benchmarks/evidence_rank1.py final    # stage 2: 10 fresh seeds on the test split
    .venv/bin/python benchmarks/evidence_rank1.py report   # docs/results/evidence_rank1.md, from the JSONL only

This docstring is the plan. It and the analysis below (:func:`analyse`, on
``benchmarks/_stats.paired_bootstrap``) were committed before the first run; the report is written
whichever way the result falls.

**Why this experiment.** In ``evidence.py`` (100 steps, seed 0 both tuned and tested) the only
gaps to full fine-tuning that reached p < 0.05 were LoFT's at ranks 1 and 4, and neither survived
Holm's correction. Rank 1 is where LoFT's claim ("behaves like full fine-tuning") is hardest.
This experiment asks that question alone, with a longer run, tuning seeds that never appear in
the finals, twice the final seeds, and a test that includes the test set's own sampling error.

**Set-up.** MiniLM-L6 (the built-in ``minilm-l6``) on movie sentiment: train on the 7,043
snippets left after carving the 1,000-snippet validation split (seed 1234, the split of
``evidence.py``), **one epoch** (441 steps of batch 16), every linear layer adapted, a fresh
head at learning rate 2e-3 (every arm), warm-up 6%, no weight decay, gradient clipping at 1.0,
64 tokens: ``loft finetune``'s defaults but for the epoch.

**Arms.** LoFT r=1; LoRA r=1 (alpha 2r = 2); DoRA r=1 (alpha 2); full fine-tuning.

**Stage 1, tuning** (validation split, seeds :data:`TUNE_SEEDS`): each arm on
:data:`GRID_POINTS` consecutive points of the lattice ``1e-4 * 2**k`` (:data:`ARMS`): the two
middle points are each arm's rank-1 optimum at 100 steps in ``evidence.py`` and the point below
it (a run 4.4 times longer may want a lower rate). A point's score is the mean validation accuracy over the
tuning seeds (ties: lower mean loss). Where the best point is on a grid's edge, the grid grows
one point past it, at most :data:`MAX_EXTENSIONS` times. The chosen rate is the best point.

**Stage 2, finals** (test split, 2,000 snippets, seeds :data:`FINAL_SEEDS`, none used before
in this project's evidence): each arm at its chosen rate. Each run records which test snippets
it got right.

**Analysis, fixed now.**

* Per arm: mean test accuracy over the 10 seeds, with the 95% interval of a bootstrap over seeds
  and test snippets.
* The primary family (Holm's step-down correction over its three tests): LoFT - full, LoFT -
  LoRA, LoFT - DoRA. Secondary, reported beside it without entering the family: LoRA - full,
  DoRA - full.
* Each comparison: :func:`_stats.paired_bootstrap` with :data:`N_BOOT` replicates (seed
  :data:`BOOT_SEED`): seeds resampled with their pairs kept, test snippets resampled with one draw
  shared by every seed and both arms. The difference, its 95% and 90% intervals, a two-sided p.
* Equivalence margin: **+-0.5 points of accuracy** (:data:`MARGIN`), by two one-sided tests at
  5% (the 90% interval inside +-0.005).
* Verdict of a comparison ``a - b`` (:func:`verdict`): "a better" / "b better" when the
  Holm-adjusted p (the p itself for a secondary comparison) is below 0.05; "equivalent within
  +-0.5 points" when the 90% interval lies inside the margin (a significant difference inside
  the margin is reported as both); otherwise "inconclusive". The paired t test across seeds (the
  test ``evidence.py`` used) is reported beside it, for comparison, and decides nothing.
* What would change the docs: LoFT - full "equivalent" supports "LoFT behaves like full
  fine-tuning at rank 1" on this task; "full better" confirms the low-rank gap; "inconclusive"
  says this budget cannot tell, and results.md says so.

Runs are their own processes (``_sweep.py``), two at a time with one thread each, niced by the
caller; results go to ``benchmarks/results/evidence_rank1.jsonl`` and a rerun skips finished runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _sweep  # noqa: E402
from _protocol import Sweep, lattice, provenance_line, tune_grids  # noqa: E402
from _stats import ALPHA, Bootstrap, holm, paired, paired_bootstrap, summarize  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAME = "evidence_rank1"
RESULTS = ROOT / "benchmarks" / "results" / f"{NAME}.jsonl"
REPORT = ROOT / "docs" / "results" / f"{NAME}.md"

MODEL, DATA, N_VAL = "minilm-l6", "movie_sentiment", 1000
COMMON = {"epochs": 1.0, "batch_size": 16, "eval_before": False}
TUNE_SEEDS = (100, 101)
FINAL_SEEDS = tuple(range(200, 210))
GRID_POINTS, MAX_EXTENSIONS = 4, 2
#: the arms: run settings and the first grid (lattice indices), whose two middle points are
#: evidence.py's rank-1 optimum at 100 steps (LoFT 8e-4, LoRA 6.4e-3, DoRA 3.2e-3, full 1e-4)
#: and the point below it
ARMS: dict[str, tuple[dict[str, Any], list[int]]] = {
    "loft": ({"method": "loft", "rank": 1}, [1, 2, 3, 4]),
    "lora": ({"method": "lora", "rank": 1, "alpha": 2.0}, [4, 5, 6, 7]),
    "dora": ({"method": "dora", "rank": 1, "alpha": 2.0}, [3, 4, 5, 6]),
    "full": ({"method": "full", "rank": 1}, [-2, -1, 0, 1]),
}
PRIMARY = (("loft", "full"), ("loft", "lora"), ("loft", "dora"))
SECONDARY = (("lora", "full"), ("dora", "full"))
MARGIN = 0.005
N_BOOT, BOOT_SEED = 10000, 0
LABEL = {"loft": "LoFT r1", "lora": "LoRA r1", "dora": "DoRA r1", "full": "full fine-tuning"}


def splits() -> tuple[str, str, str]:
    """(train, validation, test) paths relative to the repository: the split of evidence.py."""
    return _sweep.carve_validation(DATA, N_VAL, ROOT / "benchmarks" / "results" / "sentiment")


def run_of(arm: str, k: int, seed: int, split: str) -> dict[str, Any]:
    train, val, test = splits()
    return {"model": MODEL, "data": train, "eval_data": {"val": val, "test": test}[split], **ARMS[arm][0],
            "lr": lattice(k), "seed": seed, **COMMON}


def tune(sweep: Sweep, partial: bool = False) -> dict[str, dict[str, Any]]:
    """Stage 1: every arm's grid at the tuning seeds, grown past an edge optimum."""
    return tune_grids(sweep, {arm: list(grid) for arm, (_, grid) in ARMS.items()},
                      lambda arm, k: [run_of(arm, k, s, "val") for s in TUNE_SEEDS],
                      GRID_POINTS + MAX_EXTENSIONS, order=list(ARMS).index, partial=partial)


def final(sweep: Sweep, tuned: dict[str, dict[str, Any]], partial: bool = False) -> dict[str, list[dict[str, Any]]]:
    """Stage 2: each tuned arm at its chosen rate, every final seed, on test (records in seed order)."""
    runs = {arm: [run_of(arm, tuned[arm]["chosen"], s, "test") for s in FINAL_SEEDS] for arm in ARMS if arm in tuned}
    res = sweep.get([r for rs in runs.values() for r in rs], partial)
    if res is None:
        return {}
    return {arm: [res[_sweep.key(r)] for r in rs] for arm, rs in runs.items() if all(_sweep.key(r) in res for r in rs)}


# ----------------------------------------------------------------------------- the analysis
def verdict(test: Bootstrap, p: float, a: str, b: str) -> str:
    """The pre-registered verdict of ``a - b`` (``p``: Holm-adjusted in the primary family)."""
    words = []
    if p < ALPHA:
        words.append(f"{LABEL[a] if test.diff > 0 else LABEL[b]} better")
    if test.within(MARGIN):
        words.append(f"equivalent within +-{MARGIN * 100:g} points")
    return " and ".join(words) if words else "inconclusive"


def analyse(finals: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Every comparison of the plan whose two arms have run: the bootstrap, Holm over the primary
    family, the verdict, and the t test across seeds beside it."""
    rows = []
    for family, pairs in (("primary", PRIMARY), ("secondary", SECONDARY)):
        done = [(a, b) for a, b in pairs if a in finals and b in finals]
        tests = [paired_bootstrap([r["eval_correct"] for r in finals[a]], [r["eval_correct"] for r in finals[b]],
                                  N_BOOT, BOOT_SEED) for a, b in done]
        ps = holm([t.p for t in tests]) if family == "primary" and len(done) == len(pairs) else [t.p for t in tests]
        for (a, b), t, p in zip(done, tests, ps):
            acc = [[r["eval_accuracy"] for r in finals[x]] for x in (a, b)]
            rows.append({"family": family, "a": a, "b": b, "test": t, "p_used": p, "verdict": verdict(t, p, a, b),
                         "t_test": paired(*acc)})
    return rows


# ----------------------------------------------------------------------------- report
def page(tuned: dict[str, dict[str, Any]], finals: dict[str, list[dict[str, Any]]]) -> str:
    """The report's Markdown from the settled tuning and the finals (:func:`report_inputs`); nothing
    is written."""
    lines = ["# Pre-registered: LoFT at rank 1 against full fine-tuning, LoRA and DoRA (MiniLM-L6, movie sentiment)", "",
             "Generated by `.venv/bin/python benchmarks/evidence_rank1.py report` from "
             f"`benchmarks/results/{NAME}.jsonl` only. The plan and this analysis are the script's docstring and code, "
             "committed before the first run. "
             f"Every run: `{json.dumps(COMMON)}`, every linear layer adapted, head learning rate 2e-3.", ""]
    lines += [provenance_line(list(_sweep.load_results(RESULTS).values())), ""]
    if tuned:
        lines += [f"## 1. Learning rates (validation, mean over tuning seeds {list(TUNE_SEEDS)})", "",
                  "| arm | grid (lr: mean val accuracy) | chosen | optimum inside the grid |", "|---|---|---|---|"]
        for arm in ARMS:
            if arm not in tuned:
                continue
            t = tuned[arm]
            cells = ", ".join(f"{lattice(k):g}: {sum(r['eval_accuracy'] for r in rs) / len(rs):.3f}"
                              for k, rs in zip(t["grid"], t["records"]))
            lines.append(f"| {LABEL[arm]} | {cells} | {lattice(t['chosen']):g} | "
                         f"{'yes' if t['inside'] else 'no (out of extensions)'} |")
        missing = [LABEL[a] for a in ARMS if a not in tuned]
        lines += ["", *([f"**In progress:** still tuning {', '.join(missing)}.", ""] if missing else [])]
    if finals:
        lines += [f"## 2. Test accuracy, {len(FINAL_SEEDS)} seeds {FINAL_SEEDS[0]}-{FINAL_SEEDS[-1]}", "",
                  "Mean over seeds; the 95% interval is the bootstrap's over seeds and the 2,000 test snippets; "
                  "beside it the seeds' own spread (mean +- standard error across seeds).", "",
                  "| arm | lr | accuracy [95% interval, seeds and snippets] | across seeds only |", "|---|---|---|---|"]
        for arm in ARMS:
            if arm in finals:
                corr = [r["eval_correct"] for r in finals[arm]]
                zero = ["0" * len(corr[0])] * len(corr)  # against an arm that gets nothing right: the accuracy itself
                b = paired_bootstrap(corr, zero, N_BOOT, BOOT_SEED)
                lines.append(f"| {LABEL[arm]} | {lattice(tuned[arm]['chosen']):g} | {b.diff:.4f} [{b.lo:.4f}, {b.hi:.4f}] | "
                             f"{summarize([r['eval_accuracy'] for r in finals[arm]]).fmt(4)} |")
        missing = [LABEL[a] for a in ARMS if a not in finals]
        lines += ["", *([f"**In progress:** finals still to run for {', '.join(missing)}; no verdict is final.", ""]
                        if missing else [])]
        lines += ["## 3. Comparisons (the pre-registered analysis)", "",
                  f"Paired bootstrap over seeds and test snippets ({N_BOOT} replicates). Primary family: Holm's "
                  f"correction over its {len(PRIMARY)} tests; secondary comparisons use their own p. Equivalence: the "
                  f"90% interval inside +-{MARGIN:g} ({MARGIN * 100:g} points). The t test across seeds, which "
                  "ignores the test set's sampling error, is shown for comparison only.", "",
                  "| family | comparison | difference [95%] (90%), p | p used | verdict | t test across seeds |",
                  "|---|---|---|---|---|---|"]
        for row in analyse(finals):
            lines.append(f"| {row['family']} | {LABEL[row['a']]} - {LABEL[row['b']]} | {row['test'].fmt()} | "
                         f"{row['p_used']:.3g} | {row['verdict']} | {row['t_test'].fmt()} |")
        lines.append("")
    return "\n".join(lines)


def report(tuned: dict[str, dict[str, Any]], finals: dict[str, list[dict[str, Any]]]) -> None:
    """Write :func:`page` to :data:`REPORT`."""
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(page(tuned, finals))
    print(f"wrote {REPORT.relative_to(ROOT)}")


def report_inputs(sweep: Sweep) -> tuple[dict[str, dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """What ``report`` reads from a dry ``sweep`` of the results file: the arms settled so far and
    their finals run so far."""
    tuned = tune(sweep, True)
    return tuned, final(sweep, tuned, True) if tuned else {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("stage", choices=("plan", "tune", "final", "report"))
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    args = ap.parse_args()
    dry = args.stage in ("plan", "report")
    sweep = Sweep(RESULTS, args.jobs, args.threads, dry=dry)
    t0 = time.perf_counter()
    if args.stage == "plan":
        tuned = tune(sweep)
        n_tune = len(ARMS) * GRID_POINTS * len(TUNE_SEEDS)
        print(f"{len(sweep.results())} runs done; {n_tune} tuning runs before extensions (at most "
              f"{len(ARMS) * MAX_EXTENSIONS * len(TUNE_SEEDS)} more), {len(ARMS) * len(FINAL_SEEDS)} finals; tuning "
              f"complete: " + ("yes" if tuned else f"no ({len(sweep.missing)} runs missing now)"))
        return
    if args.stage == "report":
        report(*report_inputs(sweep))
        return
    tuned = tune(sweep)
    if args.stage == "final" and tuned:
        final(sweep, tuned)
    print(f"stage {args.stage} finished in {(time.perf_counter() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
