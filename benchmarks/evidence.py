"""Evidence a skeptical reviewer accepts: per-rank tuning, five seeds, paired tests, stability.

    .venv/bin/python benchmarks/evidence.py plan        # protocol v2: runs done / to do, time estimate (nothing runs)
    .venv/bin/python benchmarks/evidence.py tune        # stage 1 (v2): learning rate per method and rank
    .venv/bin/python benchmarks/evidence.py final       # stage 2 (v2): 5 seeds on the test split
    .venv/bin/python benchmarks/evidence.py stability   # stage 3 (v1's file): collapse to chance per learning rate
    .venv/bin/python benchmarks/evidence.py default     # stage 4 (v1's file): the default run at the old and the chosen lr
    .venv/bin/python benchmarks/evidence.py report      # both reports, from the JSONL files only
    .venv/bin/python benchmarks/evidence.py plan --protocol v1   # (or tune / final / report) the first protocol

**Two versions of stages 1-2** (:data:`PROTOCOLS`), each with its own results file and report;
the lines of one are never mixed with the other's:

* ``v1`` (``benchmarks/results/evidence_sentiment.jsonl``, ``docs/results/evidence_sentiment.md``,
  complete): tuning at seed 0, finals at seeds 0-4, claims by paired t tests across seeds. Two
  weaknesses an independent recomputation found (issue 31): the tuning seed is also a final seed
  (a rate chosen on seed 0 suits seed 0: it is the best of the five final seeds in most arms, and
  the report counts how many), and a t test across seeds leaves out the test set's own sampling
  error (about 0.9 points of accuracy on 2,000 snippets), which is as large as most differences
  between the arms.
* ``v2`` (``benchmarks/results/evidence_sentiment_v2.jsonl``, ``docs/results/evidence_sentiment_v2.md``):
  the same task, arms and grids, tuned at seeds ``V2.tune_seeds`` (a grid point's score is the
  mean over them), finals at seeds ``V2.final_seeds``, none of which tunes anything. Every final
  records which test snippets it got right (``eval_correct``), and every verdict is a paired
  bootstrap over seeds and test snippets (``_stats.paired_bootstrap``), with Holm's correction over
  the claims table and an equivalence verdict at +-0.5 points. Tuning runs skip the untrained
  evaluation (finals keep it, for the untrained row).

Stages 3-4 (stability, default) are v1's and stay in v1's file: neither chooses a rate on a seed
that a final reuses.

MiniLM-L6 on movie sentiment, every linear layer adapted, 100 steps of batch 16, one fresh head
(learning rate 2e-3 for every method: not tuned, to keep the budget). Protocol:

1. **Tune** on the validation split (1,000 snippets carved once from the training file, seed
   1234), at the protocol's tuning seeds (v1: seed 0), for every method at every rank
   (``RANKS``) and full fine-tuning once: a grid of
   ``GRID_POINTS`` learning rates, consecutive points of one lattice (``1e-4 * 2**k``) centred on
   the method's usual range. Where the best point lies on a grid's edge the grid grows one point
   past that edge, up to ``MAX_EXTENSIONS`` times, so every optimum ends inside its grid (or the
   report says it does not). Choice: highest accuracy, ties by lower loss.
2. **Final**: each (method, rank) at its chosen learning rate, at the protocol's final seeds (v1:
   ``SEEDS``; seed: data order, head and adapter initialisation) on the test split (2,000
   snippets). Mean, standard error, 95% interval; each claim is a paired test (v1: t across
   seeds; v2: bootstrap over seeds and snippets), and says "inconclusive" where p >= 0.05; a
   second verdict applies Holm's correction over all the claims of the table, and a third says
   whether the 90% interval of the difference lies within +-0.5 points (equivalence).
   Arms run in ``FINAL_ORDER``: LoFT, LoRA, full fine-tuning and DoRA (the paper's claims) first.
3. **Stability**: LoFT at ranks 4 and 16, LoRA at ranks 4 and 16 and full fine-tuning on one
   shared learning-rate grid, ``SEEDS`` each, on the validation split: the fraction of seeds that
   collapse to chance (accuracy within ``COLLAPSE_MARGIN`` of the majority class), as a figure.
   Its runs around LoFT's and full fine-tuning's collapse edge (``DECIDING``) go first.
4. **Default**: ``loft finetune``'s default learning rate is chosen from stage 3's deciding runs
   (:func:`choose_default`: the best mean accuracy among the rates where no LoFT seed
   collapsed); the default run (400 steps, whole test split) then runs at the old default and
   at the chosen rate, ``DEFAULT_SEEDS`` each.

Every run is its own process (``_sweep.py``), two at a time with one thread each; every result
line records its settings, accuracies before and after training (the untrained baseline of that
seed), losses, time, peak memory and provenance (commit, versions, threads, load). Results go to
the protocol's file (stages 3-4: v1's); a rerun skips finished runs, so each stage can
be stopped and restarted. Stages are independent except that ``final`` needs ``tune``. A report
written while a stage is under way shows the arms that stage has settled and names the others
(no entry is bold until every arm of the finals has run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _sweep  # noqa: E402
from _protocol import Sweep, accuracies as _accs, lattice, provenance_line, tune_grids  # noqa: E402
from _stats import (ALPHA, claim_rows, claim_verdict, method_rows, paired, paired_bootstrap, summarize,  # noqa: E402
                    untrained)

ROOT = Path(__file__).resolve().parents[1]
NAME = "evidence_sentiment"
FIGURE = ROOT / "docs" / "figures" / f"{NAME}_stability.png"

MODEL, DATA, N_VAL = "minilm-l6", "movie_sentiment", 1000
COMMON = {"max_steps": 100, "batch_size": 16, "eval_before": True}
RANKS = (1, 4, 16)
SEEDS = (0, 1, 2, 3, 4)
GRID_POINTS = 5
MAX_EXTENSIONS = 3
COLLAPSE_MARGIN = 0.05
#: replicates of every bootstrap of a v2 report (and the seed of their draws)
N_BOOT, BOOT_SEED = 10000, 0


@dataclass(frozen=True)
class Protocol:
    """One version of stages 1-2: its files, its tuning and final seeds, and its test."""

    name: str
    stem: str  # of the results file (benchmarks/results/) and the report (docs/results/)
    tune_seeds: tuple[int, ...]
    final_seeds: tuple[int, ...]
    bootstrap: bool  # verdicts by a paired bootstrap over seeds and test snippets (else t tests across seeds)
    tune_eval_before: bool  # tuning runs also score the untrained model

    @property
    def results(self) -> Path:
        return ROOT / "benchmarks" / "results" / f"{self.stem}.jsonl"

    @property
    def report(self) -> Path:
        return ROOT / "docs" / "results" / f"{self.stem}.md"


V1 = Protocol("v1", NAME, (0,), SEEDS, bootstrap=False, tune_eval_before=True)
V2 = Protocol("v2", f"{NAME}_v2", (10, 11), (20, 21, 22, 23, 24), bootstrap=True, tune_eval_before=False)
PROTOCOLS = {p.name: p for p in (V1, V2)}


#: Each method: its run settings at rank r, and the lattice index its tuning grid is centred on.
#: LoRA-family alphas are 2r (the common practice); rsLoRA uses its own scaling (alpha / sqrt r).
METHODS: dict[str, tuple[Callable[[int], dict[str, Any]], int]] = {
    "loft": (lambda r: {"method": "loft", "rank": r}, 1),
    "lora": (lambda r: {"method": "lora", "rank": r, "alpha": float(2 * r)}, 4),
    "rslora": (lambda r: {"method": "rslora", "rank": r, "alpha": float(2 * r)}, 4),
    "dora": (lambda r: {"method": "dora", "rank": r, "alpha": float(2 * r)}, 4),
    "loraplus": (lambda r: {"method": "loraplus", "rank": r, "alpha": float(2 * r)}, 2),
    "lorafa": (lambda r: {"method": "lorafa", "rank": r, "alpha": float(2 * r)}, 4),
    "pissa": (lambda r: {"method": "pissa", "rank": r, "alpha": float(2 * r)}, 2),
    "full": (lambda r: {"method": "full", "rank": 1}, -1),
}
#: stage 2's order of methods: those of the paper's claims (LoFT against LoRA, DoRA and full
#: fine-tuning) first, then PEFT's optimizer-side peers
FINAL_ORDER = ("loft", "lora", "full", "dora", "rslora", "loraplus", "lorafa", "pissa")
#: stage 3's arms (method, rank) and its shared grid (lattice indices)
STABILITY_ARMS = (("loft", 4), ("loft", 16), ("lora", 4), ("lora", 16), ("full", 0))
STABILITY_GRID = tuple(range(-1, 7))  # 5e-5 ... 6.4e-3
#: run first, at every seed: the arms and learning rates (2e-4 ... 1.6e-3) around LoFT's and full
#: fine-tuning's collapse edge, which decide ``loft finetune``'s default learning rate
DECIDING = ({("loft", 4), ("loft", 16), ("full", 0)}, range(1, 5))
#: stage 4: ``loft finetune``'s default run (400 steps, the whole training and test sets) at the
#: old default learning rate and at the one the deciding runs choose (:func:`choose_default`),
#: ``DEFAULT_SEEDS`` each
OLD_DEFAULT_LR, DEFAULT_SEEDS = 5e-4, (0, 1, 2)


def splits() -> tuple[str, str, str]:
    """(train, validation, test) paths relative to the repository (carved once)."""
    return _sweep.carve_validation(DATA, N_VAL, ROOT / "benchmarks" / "results" / "sentiment")


def run_of(method: str, rank: int, k: int, seed: int, eval_split: str, eval_before: bool = True) -> dict[str, Any]:
    """One run's settings: ``method`` at ``rank`` (ignored by full), learning rate ``lattice(k)``
    (``eval_before``: also score the untrained model first, as every v1 run does)."""
    train, val, test = splits()
    settings, _ = METHODS[method]
    return {"model": MODEL, "data": train, "eval_data": {"val": val, "test": test}[eval_split],
            **settings(rank), "lr": lattice(k), "seed": seed, **COMMON, "eval_before": eval_before}


def default_run_of(lr: float, seed: int) -> dict[str, Any]:
    """``loft finetune`` with no options but ``lr`` and ``seed`` (its defaults spelled out, so that
    the run's identity does not change if a default does)."""
    return {"model": MODEL, "data": DATA, "method": "loft", "rank": 4, "max_steps": 400, "batch_size": 16,
            "lr": lr, "seed": seed, "eval_before": True}


def arms() -> list[tuple[str, int]]:
    """Every (method, rank) of the comparison; full fine-tuning once, with rank 0."""
    return [(m, r) for m in METHODS if m != "full" for r in RANKS] + [("full", 0)]


def first_grids() -> dict[tuple[str, int], list[int]]:
    """Every arm's first tuning grid: ``GRID_POINTS`` lattice indices centred on its method's."""
    return {arm: list(range(METHODS[arm[0]][1] - GRID_POINTS // 2, METHODS[arm[0]][1] + GRID_POINTS // 2 + 1))
            for arm in arms()}


def tune_runs(arm: tuple[str, int], k: int, protocol: Protocol) -> dict[str, Any] | list[dict[str, Any]]:
    """A grid point's run (one tuning seed, as in v1) or runs (one per tuning seed)."""
    runs = [run_of(arm[0], arm[1], k, s, "val", protocol.tune_eval_before) for s in protocol.tune_seeds]
    return runs[0] if len(runs) == 1 else runs


def tune(sweep: Sweep, partial: bool = False, protocol: Protocol = V1) -> dict[tuple[str, int], dict[str, Any]]:
    """Stage 1: every arm's grid at the protocol's tuning seeds, grown past an edge optimum; returns
    per arm its grid (lattice indices), the records (per point: one record, or a list over the
    tuning seeds), the chosen index and whether the optimum is inside the grid (with a dry
    ``sweep`` and ``partial``: the arms settled so far)."""
    return tune_grids(sweep, first_grids(), lambda arm, k: tune_runs(arm, k, protocol), GRID_POINTS + MAX_EXTENSIONS,
                      partial=partial)


def final(sweep: Sweep, tuned: dict[tuple[str, int], dict[str, Any]],
          partial: bool = False, protocol: Protocol = V1) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """Stage 2: every arm at its chosen learning rate, every final seed of the protocol, on test
    (records in seed order). Arms run in :data:`FINAL_ORDER`, seeds innermost, so an interrupted
    stage has whole arms for the main claims first; with a dry ``sweep`` and ``partial`` only the
    arms with every seed are returned."""
    runs = {arm: [run_of(arm[0], arm[1], tuned[arm]["chosen"], s, "test") for s in protocol.final_seeds]
            for arm in sorted(tuned, key=lambda a: (FINAL_ORDER.index(a[0]), a[1]))}
    res = sweep.get([r for rs in runs.values() for r in rs], partial)
    if res is None:
        return {}
    return {arm: [res[_sweep.key(r)] for r in rs] for arm, rs in runs.items() if all(_sweep.key(r) in res for r in rs)}


def stability(sweep: Sweep) -> dict[tuple[str, int], dict[int, list[dict[str, Any]]]]:
    """Stage 3: the shared grid x seeds for each stability arm, on validation."""
    runs = {(arm, k): [run_of(arm[0], arm[1], k, s, "val") for s in SEEDS] for arm in STABILITY_ARMS
            for k in STABILITY_GRID}
    # the deciding runs first, then the others; seeds outermost in each, so that an interrupted
    # stage still has every learning rate at a few seeds
    order = [rs[i] for first in (True, False) for i in range(len(SEEDS)) for (arm, k), rs in runs.items()
             if (arm in DECIDING[0] and k in DECIDING[1]) == first]
    res = sweep.get(order)
    if res is None:
        return {}
    out: dict[tuple[str, int], dict[int, list[dict[str, Any]]]] = {}
    for (arm, k), rs in runs.items():
        out.setdefault(arm, {})[k] = [res[_sweep.key(r)] for r in rs]
    return out


def choose_default(decide: dict[tuple[str, int], dict[int, list[dict[str, Any]]]]) -> int:
    """The lattice index of ``loft finetune``'s default learning rate: among the deciding rates at
    which no seed of either LoFT arm collapsed, the one with the best mean validation accuracy
    over both arms and all seeds."""
    chance = majority_share(splits()[1])
    loft = [arm for arm in decide if arm[0] == "loft"]
    safe = [k for k in DECIDING[1] if not any(collapsed(r, chance) for arm in loft for r in decide[arm][k])]
    if not safe:
        raise SystemExit("every deciding learning rate collapsed at some seed: widen DECIDING")
    return max(safe, key=lambda k: summarize([a for arm in loft for a in _accs(decide[arm][k])]).mean)


def default_runs(sweep: Sweep, chosen: float) -> dict[float, list[dict[str, Any]]]:
    """Stage 4: the default run at the old default and at ``chosen``, every seed (seeds outermost)."""
    runs = {lr: [default_run_of(lr, s) for s in DEFAULT_SEEDS] for lr in (OLD_DEFAULT_LR, chosen)}
    res = sweep.get([rs[i] for i in range(len(DEFAULT_SEEDS)) for rs in runs.values()])
    if res is None:
        return {}
    return {lr: [res[_sweep.key(r)] for r in rs] for lr, rs in runs.items()}


def deciding(sweep: Sweep) -> dict[tuple[str, int], dict[int, list[dict[str, Any]]]]:
    """Stage 3's deciding runs (:data:`DECIDING`), when they are complete (never runs anything)."""
    have = sweep.results()
    out: dict[tuple[str, int], dict[int, list[dict[str, Any]]]] = {}
    for arm in sorted(DECIDING[0]):
        for k in DECIDING[1]:
            keys = [_sweep.key(run_of(arm[0], arm[1], k, s, "val")) for s in SEEDS]
            if any(key not in have for key in keys):
                return {}
            out.setdefault(arm, {})[k] = [have[key] for key in keys]
    return out


# ----------------------------------------------------------------------------- report
def majority_share(path: str) -> float:
    """The share of the most common label in a JSONL split: the accuracy of a collapsed model."""
    labels = Counter(json.loads(line)["label"] for line in (ROOT / path).read_text().splitlines() if line.strip())
    return max(labels.values()) / sum(labels.values())


def collapsed(rec: dict[str, Any], chance: float) -> bool:
    """A run that ends at chance: accuracy within :data:`COLLAPSE_MARGIN` of the majority class."""
    return rec["eval_accuracy"] <= chance + COLLAPSE_MARGIN


def _label(arm: tuple[str, int]) -> str:
    return arm[0] if arm[0] == "full" else f"{arm[0]} r={arm[1]}"


def _progress(what: str, done: dict[tuple[str, int], Any], protocol: Protocol = V1) -> list[str]:
    """A report paragraph (its line, then a blank) naming the arms a stage has not finished; none
    once every arm has."""
    todo = [arm for arm in arms() if arm not in done]
    if not todo:
        return []
    return [f"**In progress:** {len(done)} of {len(arms())} arms {what} so far; still to run: "
            + ", ".join(_label(arm) for arm in todo)
            + f" (`benchmarks/evidence.py plan --protocol {protocol.name}` counts the runs).", ""]


def _point_accuracy(recs: dict[str, Any] | list[dict[str, Any]]) -> float:
    """A tuning grid point's validation accuracy: its run's, or the mean over its tuning seeds."""
    recs = recs if isinstance(recs, list) else [recs]
    return statistics.fmean(r["eval_accuracy"] for r in recs)


def best_seed_count(finals: dict[tuple[str, int], list[dict[str, Any]]], seed: int) -> int:
    """In how many arms ``seed``'s final is the best (or tied best) of the arm's seeds: a rate
    tuned on ``seed`` suits that seed, so a protocol whose tuning seed is also a final seed shows
    it here (by chance alone: about one arm in as many as there are seeds)."""
    return sum(max(r["eval_accuracy"] for r in rs) == next(r["eval_accuracy"] for r in rs if r["run"]["seed"] == seed)
               for rs in finals.values() if any(r["run"]["seed"] == seed for r in rs))


def first_collapse(by_k: dict[int, list[dict[str, Any]]], chance: float) -> int | None:
    """The lattice index of the first rate, at or above the arm's best rate (highest mean
    accuracy), at which a seed collapsed; ``None`` when none did. Rates below the best are left
    out: there a "collapse" is a run that has not yet left chance, not one that diverged."""
    ks = sorted(by_k)
    best = max(ks, key=lambda k: statistics.fmean(_accs(by_k[k])))
    return next((k for k in ks if k >= best and any(collapsed(r, chance) for r in by_k[k])), None)


_BOOTSTRAPS: dict[tuple[tuple[str, ...], tuple[str, ...], int], Any] = {}


def _bootstrap(a: list[str], b: list[str]) -> Any:
    """:func:`_stats.paired_bootstrap` of two arms' ``eval_correct`` (:data:`N_BOOT` replicates),
    each pair once per process (a report asks for some pairs twice: in the table and the claims)."""
    key = (tuple(a), tuple(b), N_BOOT)
    if key not in _BOOTSTRAPS:
        _BOOTSTRAPS[key] = paired_bootstrap(a, b, N_BOOT, BOOT_SEED)
    return _BOOTSTRAPS[key]


def _bootstrap_cell(correct: list[str]) -> str:
    """An arm's mean accuracy and the 95% interval of a bootstrap over its seeds and the test
    snippets (against an arm that gets nothing right, the difference is the accuracy itself)."""
    b = _bootstrap(correct, ["0" * len(correct[0])] * len(correct))
    return f"{b.diff:.3f} [{b.lo:.3f}, {b.hi:.3f}]"


def _tuning_section(tuned: dict[tuple[str, int], dict[str, Any]], protocol: Protocol) -> list[str]:
    seeds = protocol.tune_seeds
    what = f"seed {seeds[0]}" if len(seeds) == 1 else f"mean over tuning seeds {', '.join(map(str, seeds))}"
    lines = [f"## 1. Learning rate per method and rank (validation, {what})", "",
             "| method | rank | grid (lr: val accuracy) | chosen | optimum inside the grid |", "|---|---|---|---|---|"]
    for arm, t in sorted(tuned.items()):
        cells = ", ".join(f"{lattice(k):g}: {_point_accuracy(r):.3f}" for k, r in zip(t["grid"], t["records"]))
        lines.append(f"| {arm[0]} | {arm[1] or '-'} | {cells} | {lattice(t['chosen']):g} | "
                     f"{'yes' if t['inside'] else 'no (out of extensions)'} |")
    return lines + ["", *_progress("settled", tuned, protocol)]


def _finals_section(finals, protocol: Protocol) -> list[str]:  # noqa: ANN001
    chance = majority_share(splits()[2])
    complete = len(finals) == len(arms())
    seeds = protocol.final_seeds
    n_test = next(iter(finals.values()))[0]["num_eval"] or 2000
    mean_acc = statistics.fmean(r["eval_accuracy"] for rs in finals.values() for r in rs)
    one_run = (mean_acc * (1 - mean_acc) / n_test) ** 0.5
    if protocol.bootstrap:
        values = {arm: [r["eval_correct"] for r in rs] for arm, rs in finals.items()}
        test, fmt = _bootstrap, _bootstrap_cell
        cells = (f"Mean accuracy over the {len(seeds)} seeds [95% interval of a bootstrap over seeds and the "
                 f"{n_test:,} test snippets]")
        kind = "paired bootstraps over seeds and test snippets"
    else:
        values = {arm: _accs(rs) for arm, rs in finals.items()}
        test, fmt = paired, None
        cells = (f"Mean +- standard error [95% interval] over the {len(seeds)} seeds: the seeds' spread only. The test "
                 f"set's own sampling error (one run's accuracy on {n_test:,} snippets: about "
                 f"{100 * one_run:.1f} points) is not in these intervals nor in the t tests below")
        kind = "paired t tests across seeds"
    lines = [f"## 2. Test accuracy, {len(seeds)} seeds ({', '.join(map(str, seeds))})", "",
             f"{cells}; untrained: the untrained model's accuracy, one value per seed (every arm of a seed scores "
             f"the same untrained model). Bold: better than every other method at that rank in {kind} (p < {ALPHA} "
             "against each), after Holm's correction over every cell of the table.", "",
             "| method | " + " | ".join(f"r={r}" for r in RANKS) + " |", "|---|" + "---|" * len(RANKS)]
    lines += method_rows({arm: v for arm, v in values.items() if arm[0] != "full"}, [m for m in METHODS if m != "full"],
                         RANKS, bold=complete, test=test, fmt=fmt)
    if ("full", 0) in finals:
        cell = fmt(values[("full", 0)]) if fmt else summarize(values[("full", 0)]).fmt()
        lines.append(f"| full fine-tuning | {cell} |" + " |" * (len(RANKS) - 1))
    before = untrained([r for rs in finals.values() for r in rs])
    if before:
        lines.append(f"| untrained | {summarize(before).fmt()} |" + " |" * (len(RANKS) - 1))
    lines += ["", f"Majority class of the test split: {chance:.3f}.", ""]
    shared = [s for s in protocol.tune_seeds if s in seeds]
    if shared:
        lines += [f"**The tuning seed is also a final seed** (protocol {protocol.name}): seed {shared[0]}'s final is "
                  f"the best of the {len(seeds)} seeds in {best_seed_count(finals, shared[0])} of {len(finals)} arms "
                  f"(by chance alone about {len(finals) / len(seeds):.0f}): a rate tuned on a seed suits that seed, so "
                  "the finals favour each arm's own tuning. Protocol v2 tunes on seeds that no final uses.", ""]
    lines += _progress("with every seed", finals, protocol)
    if not complete:
        lines += ["No entry is bold until every arm has run: bold compares an arm with every other of its rank.", ""]
    lines += [f"### Claims ({kind})", ""]
    claims = [(("loft", 4), ("lora", 16))]
    claims += [(("loft", r), (m, r)) for r in RANKS for m in METHODS if m not in ("loft", "full")]
    claims += [(("loft", r), ("full", 0)) for r in RANKS]
    lines += claim_rows([(f"{_label(a)} beats {_label(b)}", test(values[a], values[b]))
                         for a, b in claims if a in finals and b in finals])
    return lines + [""]


def _stability_section(stab) -> list[str]:  # noqa: ANN001
    chance = majority_share(splits()[1])
    lines = [f"## 3. Stability: collapse to chance per learning rate ({len(SEEDS)} seeds, validation)", "",
             f"A run collapses when its accuracy is at most the majority class ({chance:.3f}) + {COLLAPSE_MARGIN}. "
             "Cells: collapsed seeds / seeds (mean accuracy). Last column: the first rate, at or above the arm's best "
             "rate (highest mean accuracy), at which a seed collapsed (below the best rate a 'collapse' is a run that "
             "has not yet left chance).", "",
             "| arm | " + " | ".join(f"{lattice(k):g}" for k in STABILITY_GRID) + " | first collapse at or above the best rate |",
             "|---|" + "---|" * (len(STABILITY_GRID) + 1)]
    for arm, by_k in stab.items():
        cells = []
        for k in STABILITY_GRID:
            rs = by_k[k]
            cells.append(f"{sum(collapsed(r, chance) for r in rs)}/{len(rs)} ({summarize(_accs(rs)).mean:.3f})")
        first = first_collapse(by_k, chance)
        lines.append(f"| {_label(arm)} | " + " | ".join(cells) + f" | {'none' if first is None else f'{lattice(first):g}'} |")
    return lines + ["", f"![stability](../figures/{FIGURE.name})", ""]


def _stability_figure(stab) -> None:  # noqa: ANN001
    """:data:`FIGURE`: the share of seeds collapsed per learning rate, one line per arm."""
    chance = majority_share(splits()[1])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for arm, by_k in stab.items():
        fracs = [sum(collapsed(r, chance) for r in by_k[k]) / len(by_k[k]) for k in STABILITY_GRID]
        ax.plot([lattice(k) for k in STABILITY_GRID], fracs, marker="o", label=_label(arm),
                ls="--" if arm[0] == "full" else "-")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"fraction of {len(SEEDS)} seeds collapsed")
    ax.set_title("MiniLM-L6 + movie sentiment, 100 steps")
    ax.legend()
    fig.tight_layout()
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURE, dpi=120)


def _default_section(decide, defaults) -> list[str]:  # noqa: ANN001
    chance = majority_share(splits()[1])
    k = choose_default(decide)
    lines = ["## 4. `loft finetune`'s default learning rate", "",
             f"Stage 3's deciding runs ({len(SEEDS)} seeds, validation, 100 steps): collapsed seeds / seeds "
             "(mean accuracy). The default is the rate, among those where no seed of either LoFT arm collapsed, "
             "with the best mean accuracy over both arms and all seeds "
             f"(`choose_default`): **{lattice(k):g}**.", "",
             "| arm | " + " | ".join(f"{lattice(j):g}" for j in DECIDING[1]) + " |",
             "|---|" + "---|" * len(DECIDING[1])]
    for arm, by_k in decide.items():
        lines.append(f"| {_label(arm)} | " + " | ".join(
            f"{sum(collapsed(r, chance) for r in by_k[j])}/{len(by_k[j])} ({summarize(_accs(by_k[j])).mean:.3f})"
            for j in DECIDING[1]) + " |")
    lines.append("")
    if defaults:
        old, new = defaults[OLD_DEFAULT_LR], defaults[lattice(k)]
        lines += ["The default run (`loft finetune` with only `--lr` and `--seed` given: LoFT at rank 4, 400 "
                  f"steps of batch 16, the whole 2,000-snippet test split), seeds {list(DEFAULT_SEEDS)}:", "",
                  "| lr | accuracy before | accuracy after | per seed | train s (mean) |", "|---|---|---|---|---|"]
        for lr, rs in ((OLD_DEFAULT_LR, old), (lattice(k), new)):
            lines.append(f"| {lr:g}{' (old default)' if lr == OLD_DEFAULT_LR else ''} | "
                         f"{summarize([r['eval_accuracy_before'] for r in rs]).mean:.3f} | "
                         f"{summarize(_accs(rs)).fmt()} | "
                         + " ".join(f"{a:.3f}" for a in _accs(rs))
                         + f" | {sum(r['train_seconds'] for r in rs) / len(rs):.0f} |")
        t = paired(_accs(new), _accs(old))
        lines += ["", f"{lattice(k):g} against {OLD_DEFAULT_LR:g}, paired across seeds (t test): {t.fmt()}: "
                  f"{claim_verdict(t)}.", ""]
    return lines


def page(tuned, finals, stab, decide, defaults, protocol: Protocol = V1) -> str:  # noqa: ANN001 (the stage outputs)
    """The protocol's report (its Markdown) from the stage outputs (:func:`report_inputs`), which
    come from its results file only; nothing is written."""
    seeds = protocol.final_seeds
    if protocol.bootstrap:
        about = (f"**Protocol {protocol.name}:** tuned at seeds {', '.join(map(str, protocol.tune_seeds))} (never a "
                 f"final seed), finals at seeds {', '.join(map(str, seeds))}; every verdict is a paired bootstrap over "
                 "seeds and test snippets, so the test set's own sampling error is in it. The stability stage and "
                 "`loft finetune`'s default are protocol v1's ([evidence_sentiment.md](evidence_sentiment.md)).")
    else:
        about = (f"**Protocol {protocol.name}:** tuned at seed {protocol.tune_seeds[0]}, which is also a final seed; "
                 "every verdict is a t test across seeds, which leaves out the test set's own sampling error. "
                 f"Protocol v2 ([{V2.report.name}]({V2.report.name}), `benchmarks/evidence.py plan`) repeats stages "
                 "1-2 without either weakness.")
    lines = [f"# Evidence: MiniLM-L6 + movie sentiment, tuned per rank, {len(seeds)} seeds (protocol {protocol.name})", "",
             f"Generated by `.venv/bin/python benchmarks/evidence.py report --protocol {protocol.name}` from "
             f"`benchmarks/results/{protocol.results.name}` only (the protocol is in the script's docstring). "
             f"Settings of every run: `{json.dumps({k: v for k, v in COMMON.items() if k != 'eval_before'})}`, every "
             "linear layer adapted, head learning rate 2e-3.", "", about, ""]
    lines += [provenance_line(list(_sweep.load_results(protocol.results).values())), ""]
    if tuned:
        lines += _tuning_section(tuned, protocol)
    if finals:
        lines += _finals_section(finals, protocol)
    if stab:
        lines += _stability_section(stab)
    if decide:
        lines += _default_section(decide, defaults)
    return "\n".join(lines)


def report(tuned, finals, stab, decide, defaults, protocol: Protocol = V1) -> None:  # noqa: ANN001 (the stage outputs)
    """Write the protocol's report (``protocol.report``, :func:`page`) and, with stage 3's runs, its
    figure (:data:`FIGURE`)."""
    text = page(tuned, finals, stab, decide, defaults, protocol)
    if stab:
        _stability_figure(stab)
    protocol.report.parent.mkdir(parents=True, exist_ok=True)
    protocol.report.write_text(text)
    print(f"wrote {protocol.report.relative_to(ROOT)}")


def report_inputs(sweep: Sweep, protocol: Protocol) -> tuple[dict, dict, dict, dict, dict]:
    """What ``report`` reads from a dry ``sweep`` of the protocol's results file: the settled
    tuning, the finals, and (v1 only) the stability, deciding and default runs."""
    tuned = tune(sweep, True, protocol)
    finals = final(sweep, tuned, True, protocol) if tuned else {}
    stab = stability(sweep) if protocol is V1 else {}
    decide = deciding(sweep) if protocol is V1 else {}
    defaults = default_runs(sweep, lattice(choose_default(decide))) if decide else {}
    return tuned, finals, stab, decide, defaults


# ----------------------------------------------------------------------------- plan
def run_seconds(path: Path) -> dict[tuple[str, str], float]:
    """The median ``seconds`` (a run's whole time in its process) of the 100-step runs in a
    results file, by (method, eval split file name): what :func:`plan_lines` estimates with."""
    by: dict[tuple[str, str], list[float]] = {}
    for rec in _sweep.load_results(path).values():
        run = rec["run"]
        if run.get("max_steps") == COMMON["max_steps"] and rec.get("seconds"):
            by.setdefault((run["method"], Path(run["eval_data"]).name), []).append(rec["seconds"])
    return {k: statistics.median(v) for k, v in by.items()}


def plan_lines(protocol: Protocol, sweep: Sweep, seconds: dict[tuple[str, str], float]) -> list[str]:
    """What ``plan`` prints: the runs the protocol's stages 1-2 have, still need (exactly, for
    the grids as they stand and the finals) and may still need (grids that grow), and the time
    they take at ``sweep.jobs`` runs at a time, from ``seconds`` (:func:`run_seconds`)."""
    have = sweep.results()
    n_seeds = len(protocol.tune_seeds)
    settled = tune(sweep, partial=True, protocol=protocol)
    sweep.missing = []
    tuned = tune(sweep, protocol=protocol)
    todo = list(sweep.missing)  # the tuning runs of the grids as they stand (none once tuning is settled)
    unsettled = [arm for arm in arms() if arm not in settled]
    grow = []  # runs that grids not yet settled may still add: at most GRID_POINTS + MAX_EXTENSIONS points an arm
    for arm in unsettled:
        first = first_grids()[arm]
        window = [r for k in range(first[0] - MAX_EXTENSIONS, first[-1] + MAX_EXTENSIONS + 1)
                  for r in (tune_runs(arm, k, protocol) if n_seeds > 1 else [tune_runs(arm, k, protocol)])]
        possible = [r for r in window if _sweep.key(r) not in have and r not in todo]
        grow += possible[:max(0, (GRID_POINTS + MAX_EXTENSIONS) * n_seeds - (len(window) - len(possible)))]
    if tuned:
        sweep.missing = []
        final(sweep, tuned, protocol=protocol)
        finals_todo = list(sweep.missing)
        finals_line = f"finals: {len(finals_todo)} of {len(arms()) * len(protocol.final_seeds)} runs to run"
    else:  # the finals' rates are not known yet: their runs stand in at each arm's first grid's centre
        finals_todo = [run_of(m, r, METHODS[m][1], s, "test") for m, r in arms() for s in protocol.final_seeds]
        finals_line = (f"finals: {len(finals_todo)} runs ({len(arms())} arms x {len(protocol.final_seeds)} seeds "
                       f"{', '.join(map(str, protocol.final_seeds))}), all to run once tuning is settled")

    def hours(runs: list[dict[str, Any]]) -> float:
        missing = {(r["method"], Path(r["eval_data"]).name) for r in runs} - set(seconds)
        if missing:
            raise SystemExit(f"no committed run time for {sorted(missing)} in {V1.results.name}: cannot estimate")
        return sum(seconds[(r["method"], Path(r["eval_data"]).name)] for r in runs) / 3600

    least, most = todo + finals_todo, todo + finals_todo + grow
    return [
        f"protocol {protocol.name} ({protocol.results.relative_to(ROOT)}): {len(have)} runs done",
        f"tuning ({len(arms())} arms, seeds {', '.join(map(str, protocol.tune_seeds))}): "
        + ("settled" if tuned else
           f"{len(todo)} runs to run in the grids as they stand ({len(arms()) - len(unsettled)} of {len(arms())} arms "
           f"settled); grids that grow past an edge add {n_seeds} run(s) a point: at most {len(grow)} more"),
        finals_line,
        f"to run: {len(least)} runs" + (f" (at most {len(most)} if every unsettled grid grows to its limit)"
                                          if len(most) > len(least) else ""),
        f"time: about {hours(least):.1f} h of run time" + (f" ({hours(most):.1f} h)" if len(most) > len(least) else "")
        + f", {hours(least) / sweep.jobs:.1f} h" + (f" ({hours(most) / sweep.jobs:.1f} h)" if len(most) > len(least) else "")
        + f" of wall time at {sweep.jobs} runs at a time (each run: the median `seconds` of the committed "
        f"{V1.results.name} runs of its method and split, which ran two at a time with one thread each"
        + ("; v1's tuning runs also scored the untrained model, which these skip: an overestimate)"
           if not protocol.tune_eval_before else ")"),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("stage", choices=("plan", "tune", "final", "stability", "default", "report"))
    ap.add_argument("--protocol", choices=tuple(PROTOCOLS), default=None,
                    help="v1 or v2 (default: v2 for plan / tune / final, both for report, v1 for stability / default)")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    args = ap.parse_args()
    if args.stage in ("stability", "default") and args.protocol == "v2":
        raise SystemExit(f"the {args.stage} stage is protocol v1's (its runs are in {V1.results.name}); "
                         "leave out --protocol")
    dry = args.stage in ("plan", "report")
    t0 = time.perf_counter()
    if args.stage == "plan":
        protocol = PROTOCOLS[args.protocol or "v2"]
        sweep = Sweep(protocol.results, args.jobs, args.threads, dry=True)
        print("\n".join(plan_lines(protocol, sweep, run_seconds(V1.results))))
        return
    if args.stage == "report":
        for protocol in ([PROTOCOLS[args.protocol]] if args.protocol else [V1, V2]):
            if not protocol.results.is_file():
                print(f"protocol {protocol.name}: no results yet ({protocol.results.relative_to(ROOT)}), no report")
                continue
            sweep = Sweep(protocol.results, args.jobs, args.threads, dry=True)
            report(*report_inputs(sweep, protocol), protocol)
        return
    protocol = V1 if args.stage in ("stability", "default") else PROTOCOLS[args.protocol or "v2"]
    sweep = Sweep(protocol.results, args.jobs, args.threads, dry=dry)
    if args.stage in ("tune", "final"):
        tuned = tune(sweep, protocol=protocol)
        if args.stage == "final":
            final(sweep, tuned, protocol=protocol)
    elif args.stage == "stability":
        stability(sweep)
    else:
        decide = deciding(sweep)
        if not decide:
            raise SystemExit("the deciding runs of the stability stage are not complete: run the stability stage first")
        default_runs(sweep, lattice(choose_default(decide)))
    print(f"stage {args.stage} ({protocol.name}) finished in {(time.perf_counter() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
