"""Evidence a skeptical reviewer accepts: per-rank tuning, five seeds, paired tests, stability.

    .venv/bin/python benchmarks/evidence.py plan        # runs per stage: done / to do (nothing runs)
    .venv/bin/python benchmarks/evidence.py tune        # stage 1: learning rate per method and rank
    .venv/bin/python benchmarks/evidence.py final       # stage 2: 5 seeds on the test split
    .venv/bin/python benchmarks/evidence.py stability   # stage 3: collapse to chance per learning rate
    .venv/bin/python benchmarks/evidence.py default     # stage 4: the default run at the old and the chosen lr
    .venv/bin/python benchmarks/evidence.py report      # docs/results/evidence_sentiment.md, from the JSONL only

MiniLM-L6 on movie sentiment, every linear layer adapted, 100 steps of batch 16, one fresh head
(learning rate 2e-3 for every method: not tuned, to keep the budget). Protocol:

1. **Tune** on the validation split (1,000 snippets carved once from the training file, seed
   1234), seed 0, for every method at every rank (``RANKS``) and full fine-tuning once: a grid of
   ``GRID_POINTS`` learning rates, consecutive points of one lattice (``1e-4 * 2**k``) centred on
   the method's usual range. Where the best point lies on a grid's edge the grid grows one point
   past that edge, up to ``MAX_EXTENSIONS`` times, so every optimum ends inside its grid (or the
   report says it does not). Choice: highest accuracy, ties by lower loss.
2. **Final**: each (method, rank) at its chosen learning rate, ``SEEDS`` (seed: data order, head
   and adapter initialisation) on the test split (2,000 snippets). Mean, standard error, 95%
   interval; each claim is a paired t test across seeds, and says "inconclusive" where p >= 0.05;
   a second verdict applies Holm's correction over all the claims of the table.
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
``benchmarks/results/evidence_sentiment.jsonl``; a rerun skips finished runs, so each stage can
be stopped and restarted. Stages are independent except that ``final`` needs ``tune``. A report
written while a stage is under way shows the arms that stage has settled and names the others
(no entry is bold until every arm of the finals has run).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _sweep  # noqa: E402
from _protocol import Sweep, accuracies as _accs, lattice, provenance_line, tune_grids  # noqa: E402
from _stats import ALPHA, claim_rows, claim_verdict, method_rows, paired, summarize  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAME = "evidence_sentiment"
RESULTS = ROOT / "benchmarks" / "results" / f"{NAME}.jsonl"
REPORT = ROOT / "docs" / "results" / f"{NAME}.md"
FIGURE = ROOT / "docs" / "figures" / f"{NAME}_stability.png"

MODEL, DATA, N_VAL = "minilm-l6", "movie_sentiment", 1000
COMMON = {"max_steps": 100, "batch_size": 16, "eval_before": True}
RANKS = (1, 4, 16)
SEEDS = (0, 1, 2, 3, 4)
GRID_POINTS = 5
MAX_EXTENSIONS = 3
COLLAPSE_MARGIN = 0.05


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


def run_of(method: str, rank: int, k: int, seed: int, eval_split: str) -> dict[str, Any]:
    """One run's settings: ``method`` at ``rank`` (ignored by full), learning rate ``lattice(k)``."""
    train, val, test = splits()
    settings, _ = METHODS[method]
    return {"model": MODEL, "data": train, "eval_data": {"val": val, "test": test}[eval_split],
            **settings(rank), "lr": lattice(k), "seed": seed, **COMMON}


def default_run_of(lr: float, seed: int) -> dict[str, Any]:
    """``loft finetune`` with no options but ``lr`` and ``seed`` (its defaults spelled out, so that
    the run's identity does not change if a default does)."""
    return {"model": MODEL, "data": DATA, "method": "loft", "rank": 4, "max_steps": 400, "batch_size": 16,
            "lr": lr, "seed": seed, "eval_before": True}


def arms() -> list[tuple[str, int]]:
    """Every (method, rank) of the comparison; full fine-tuning once, with rank 0."""
    return [(m, r) for m in METHODS if m != "full" for r in RANKS] + [("full", 0)]


def tune(sweep: Sweep, partial: bool = False) -> dict[tuple[str, int], dict[str, Any]]:
    """Stage 1: every arm's grid, grown past an edge optimum; returns per arm its grid (lattice
    indices), the records, the chosen index and whether the optimum is inside the grid (with a dry
    ``sweep`` and ``partial``: the arms settled so far)."""
    grids = {arm: list(range(METHODS[arm[0]][1] - GRID_POINTS // 2, METHODS[arm[0]][1] + GRID_POINTS // 2 + 1))
             for arm in arms()}
    return tune_grids(sweep, grids, lambda arm, k: run_of(arm[0], arm[1], k, 0, "val"), GRID_POINTS + MAX_EXTENSIONS,
                      partial=partial)


def final(sweep: Sweep, tuned: dict[tuple[str, int], dict[str, Any]],
          partial: bool = False) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """Stage 2: every arm at its chosen learning rate, every seed, on test (records in seed order).
    Arms run in :data:`FINAL_ORDER`, seeds innermost, so an interrupted stage has whole arms for the
    main claims first; with a dry ``sweep`` and ``partial`` only the arms with every seed are returned."""
    runs = {arm: [run_of(arm[0], arm[1], tuned[arm]["chosen"], s, "test") for s in SEEDS]
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


def _progress(what: str, done: dict[tuple[str, int], Any]) -> list[str]:
    """A report paragraph (its line, then a blank) naming the arms a stage has not finished; none
    once every arm has."""
    todo = [arm for arm in arms() if arm not in done]
    if not todo:
        return []
    return [f"**In progress:** {len(done)} of {len(arms())} arms {what} so far; still to run: "
            + ", ".join(_label(arm) for arm in todo) + " (`benchmarks/evidence.py plan` counts the runs).", ""]


def report(tuned, finals, stab, decide, defaults) -> None:  # noqa: ANN001 (the stage outputs above)
    lines = [f"# Evidence: MiniLM-L6 + movie sentiment, tuned per rank, {len(SEEDS)} seeds", "",
             "Generated by `.venv/bin/python benchmarks/evidence.py report` from "
             f"`benchmarks/results/{NAME}.jsonl` only (the protocol is in the script's docstring). "
             f"Settings of every run: `{json.dumps(COMMON)}`, every linear layer adapted, head learning rate 2e-3.", ""]
    lines += [provenance_line(list(_sweep.load_results(RESULTS).values())), ""]
    if tuned:
        lines += ["## 1. Learning rate per method and rank (validation, seed 0)", "",
                  "| method | rank | grid (lr: val accuracy) | chosen | optimum inside the grid |", "|---|---|---|---|---|"]
        for arm, t in sorted(tuned.items()):
            cells = ", ".join(f"{lattice(k):g}: {r['eval_accuracy']:.3f}" for k, r in zip(t["grid"], t["records"]))
            lines.append(f"| {arm[0]} | {arm[1] or '-'} | {cells} | {lattice(t['chosen']):g} | "
                         f"{'yes' if t['inside'] else 'no (out of extensions)'} |")
        lines += ["", *_progress("settled", tuned)]
    if finals:
        chance = majority_share(splits()[2])
        lines += [f"## 2. Test accuracy, {len(SEEDS)} seeds", "",
                  "Mean +- standard error [95% interval]; untrained: the same seeds' accuracy before training. "
                  f"Bold: better than every other method at that rank in paired t tests (p < {ALPHA}).", "",
                  "| method | " + " | ".join(f"r={r}" for r in RANKS) + " |", "|---|" + "---|" * len(RANKS)]
        complete = len(finals) == len(arms())
        lines += method_rows({arm: _accs(rs) for arm, rs in finals.items()}, [m for m in METHODS if m != "full"], RANKS,
                             bold=complete)
        if ("full", 0) in finals:
            lines.append(f"| full fine-tuning | {summarize(_accs(finals[('full', 0)])).fmt()} |" + " |" * (len(RANKS) - 1))
        before = [r["eval_accuracy_before"] for rs in finals.values() for r in rs if r.get("eval_accuracy_before") is not None]
        if before:
            lines.append(f"| untrained | {summarize(before).fmt()} |" + " |" * (len(RANKS) - 1))
        lines += ["", f"Majority class of the test split: {chance:.3f}.", "", *_progress("with every seed", finals)]
        if not complete:
            lines += ["No entry is bold until every arm has run: bold compares an arm with every other of its rank.", ""]
        lines += ["### Claims (paired t tests across seeds)", ""]
        claims = [(("loft", 4), ("lora", 16))]
        claims += [(("loft", r), (m, r)) for r in RANKS for m in METHODS if m not in ("loft", "full")]
        claims += [(("loft", r), ("full", 0)) for r in RANKS]
        lines += claim_rows([(f"{_label(a)} beats {_label(b)}", paired(_accs(finals[a]), _accs(finals[b])))
                             for a, b in claims if a in finals and b in finals])
        lines.append("")
    if stab:
        chance = majority_share(splits()[1])
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        lines += [f"## 3. Stability: collapse to chance per learning rate ({len(SEEDS)} seeds, validation)", "",
                  f"A run collapses when its accuracy is at most the majority class ({chance:.3f}) + {COLLAPSE_MARGIN}. "
                  "Cells: collapsed seeds / seeds (mean accuracy).", "",
                  "| arm | " + " | ".join(f"{lattice(k):g}" for k in STABILITY_GRID) + " |",
                  "|---|" + "---|" * len(STABILITY_GRID)]
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for arm, by_k in stab.items():
            fracs = []
            cells = []
            for k in STABILITY_GRID:
                rs = by_k[k]
                n = sum(collapsed(r, chance) for r in rs)
                fracs.append(n / len(rs))
                cells.append(f"{n}/{len(rs)} ({summarize(_accs(rs)).mean:.3f})")
            lines.append(f"| {_label(arm)} | " + " | ".join(cells) + " |")
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
        lines += ["", f"![stability](../figures/{FIGURE.name})", ""]
    if decide:
        chance = majority_share(splits()[1])
        k = choose_default(decide)
        lines += ["## 4. `loft finetune`'s default learning rate", "",
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
            lines += ["", f"{lattice(k):g} against {OLD_DEFAULT_LR:g}, paired across seeds: {t.fmt()}: "
                      f"{claim_verdict(t)}.", ""]
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text("\n".join(lines))
    print(f"wrote {REPORT.relative_to(ROOT)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("stage", choices=("plan", "tune", "final", "stability", "default", "report"))
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    args = ap.parse_args()
    dry = args.stage in ("plan", "report")
    sweep = Sweep(RESULTS, args.jobs, args.threads, dry=dry)
    t0 = time.perf_counter()
    if args.stage == "plan":
        total = len(arms()) * GRID_POINTS + len(arms()) * len(SEEDS) + len(STABILITY_ARMS) * len(STABILITY_GRID) * len(SEEDS)
        done = len(sweep.results())
        tuned = tune(sweep)
        stability(sweep)
        print(f"{done} runs done; about {total} in all before grid extensions (tune {len(arms()) * GRID_POINTS}, "
              f"final {len(arms()) * len(SEEDS)}, stability {len(STABILITY_ARMS) * len(STABILITY_GRID) * len(SEEDS)}, "
              "some shared); tuning complete: " + ("yes" if tuned else f"no ({len(sweep.missing)} runs missing now)"))
        return
    partial = args.stage == "report"  # a report shows what is settled; a stage runs what is missing
    tuned = tune(sweep, partial) if args.stage in ("tune", "final", "report") else {}
    finals = final(sweep, tuned, partial) if args.stage in ("final", "report") and tuned else {}
    stab = stability(sweep) if args.stage in ("stability", "report") else {}
    decide = deciding(sweep) if args.stage in ("default", "report") else {}
    if args.stage == "default" and not decide:
        raise SystemExit("the deciding runs of the stability stage are not complete: run the stability stage first")
    defaults = default_runs(sweep, lattice(choose_default(decide))) if decide else {}
    if args.stage == "report":
        report(tuned, finals, stab, decide, defaults)
    else:
        print(f"stage {args.stage} finished in {(time.perf_counter() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
