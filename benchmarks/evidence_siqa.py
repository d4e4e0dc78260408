"""Evidence on a causal LM: SmolLM2-135M + Social IQa, all seven projections, ranks 1, 4 and 16,
three seeds, full fine-tuning included (issue 15, item 6), at a reduced budget.

    .venv/bin/python benchmarks/evidence_siqa.py plan     # runs done / to do (nothing runs)
    .venv/bin/python benchmarks/evidence_siqa.py run      # tune, then the finals (resumable)
    .venv/bin/python benchmarks/evidence_siqa.py report   # docs/results/evidence_siqa.md, from the JSONL only

Every run: ``COMMON`` (80 steps of batch 8, about 0.5 epoch of the 1,254 training questions,
every ``q/k/v/o/gate/up/down_proj`` adapted), scored as multiple choice (the answer with the
lowest loss). What the budget of 2 CPU cores cut, against the sentiment protocol
(``benchmarks/evidence.py``):

1. **Tune** at rank 4 only, seed 0, on the validation split (200 questions carved once from the
   training file, seed 1234): ``GRID_POINTS`` consecutive learning rates of the lattice
   ``1e-4 * 2**k`` per method (LoFT; LoRA with alpha = 2r; full fine-tuning), grown one point
   past an edge optimum at most ``MAX_EXTENSIONS`` times. LoFT has no alpha and LoRA's scale
   alpha / r = 2 is the same at every rank, so the rank-4 rate is reused at ranks 1 and 16. DoRA,
   rsLoRA and the optimizer-side peers are left out.
2. **Final**: LoFT and LoRA at ranks 1, 4 and 16 and full fine-tuning, ``SEEDS`` each, on the
   test split (500 questions). Mean, standard error, 95% interval, paired t tests across seeds
   (each claim alone, and with Holm's correction over the table).
   Every run also scores the untrained model first (``loft finetune``'s default ``eval_before``);
   that accuracy does not depend on the seed or the method (LoRA's B starts at zero), and the
   report takes it from the full fine-tuning finals, which name ``eval_before`` in their settings.

Every run is its own process (``_sweep.py``), two at a time with one thread each; results go to
``benchmarks/results/evidence_siqa.jsonl`` with their provenance, and a rerun skips finished runs.
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
from _protocol import Sweep, accuracies as _accs, lattice, provenance_line, tune_grids  # noqa: E402
from _stats import ALPHA, claim_rows, method_rows, paired, summarize  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAME = "evidence_siqa"
RESULTS = ROOT / "benchmarks" / "results" / f"{NAME}.jsonl"
REPORT = ROOT / "docs" / "results" / f"{NAME}.md"

MODEL, DATA, N_VAL = "smollm2-135m", "social_iqa", 200
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
COMMON = {"max_steps": 80, "batch_size": 8, "target_modules": PROJECTIONS}
TUNE_RANK, RANKS, SEEDS = 4, (1, 4, 16), (0, 1, 2)
GRID_POINTS, MAX_EXTENSIONS = 3, 1
#: each method's run settings at rank r, and the lattice index its grid is centred on
METHODS = {
    "loft": (lambda r: {"method": "loft", "rank": r}, 2),  # 4e-4 (3e-4 was best with q/v only)
    "lora": (lambda r: {"method": "lora", "rank": r, "alpha": float(2 * r)}, 4),  # 1.6e-3
    "full": (lambda r: {"method": "full", "rank": 1}, -2),  # 2.5e-5
}


def splits() -> tuple[str, str, str]:
    """(train, validation, test) paths relative to the repository (carved once)."""
    return _sweep.carve_validation(DATA, N_VAL, ROOT / "benchmarks" / "results" / NAME)


def run_of(method: str, rank: int, k: int, seed: int, split: str) -> dict[str, Any]:
    train, val, test = splits()
    settings, _ = METHODS[method]
    run = {"model": MODEL, "data": train, "eval_data": val if split == "val" else test, **settings(rank),
           "lr": lattice(k), "seed": seed, **COMMON}
    if method == "full" and split == "test":
        run["eval_before"] = True
    return run


def tune(sweep: Sweep) -> dict[str, dict[str, Any]]:
    """Each method's grid at rank 4 (grown past an edge optimum), its records and chosen index;
    the slow full fine-tuning runs first, so that the two jobs finish together."""
    grids = {m: list(range(c - GRID_POINTS // 2, c + GRID_POINTS // 2 + 1)) for m, (_, c) in METHODS.items()}
    return tune_grids(sweep, grids, lambda m, k: run_of(m, TUNE_RANK, k, 0, "val"), GRID_POINTS + MAX_EXTENSIONS,
                      order=lambda m: (m != "full", m))


def arms() -> list[tuple[str, int]]:
    return [(m, r) for m in METHODS if m != "full" for r in RANKS] + [("full", 0)]


def final(sweep: Sweep, tuned: dict[str, dict[str, Any]]) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """Every arm at its method's chosen rate, every seed, on test (records in seed order); seeds
    outermost, so that an interrupted stage has whole seeds."""
    runs = {arm: [run_of(arm[0], arm[1], tuned[arm[0]]["chosen"], s, "test") for s in SEEDS] for arm in arms()}
    res = sweep.get([rs[i] for i in range(len(SEEDS)) for rs in runs.values()])
    if res is None:
        return {}
    return {arm: [res[_sweep.key(r)] for r in rs] for arm, rs in runs.items()}


def _label(arm: tuple[str, int]) -> str:
    return "full fine-tuning" if arm[0] == "full" else f"{arm[0]} r={arm[1]}"


def page(tuned: dict[str, dict[str, Any]], finals: dict[tuple[str, int], list[dict[str, Any]]]) -> str:
    """The report's Markdown from the tuning and the finals (:func:`report_inputs`); nothing is
    written."""
    lines = [f"# Evidence: SmolLM2-135M + Social IQa, all seven projections, {len(SEEDS)} seeds (reduced budget)", "",
             "Generated by `.venv/bin/python benchmarks/evidence_siqa.py report` from "
             f"`benchmarks/results/{NAME}.jsonl` "
             "only; the protocol and what the budget cut are in the script's docstring. Settings of every run: "
             f"`{json.dumps(COMMON)}`.", "",
             provenance_line(list(_sweep.load_results(RESULTS).values())), ""]
    if tuned:
        lines += [f"## 1. Learning rate per method at rank {TUNE_RANK} (validation, seed 0)", "",
                  "| method | grid (lr: val accuracy) | chosen | optimum inside the grid |", "|---|---|---|---|"]
        for m, t in tuned.items():
            cells = ", ".join(f"{lattice(k):g}: {r['eval_accuracy']:.3f}" for k, r in zip(t["grid"], t["records"]))
            inside = "yes" if t["inside"] else "no (out of extensions)"
            lines.append(f"| {m} | {cells} | {lattice(t['chosen']):g} | {inside} |")
        lines.append("")
    if finals:
        full = finals[("full", 0)]
        n_test = full[0].get("num_eval") or 500
        acc = sum(r["eval_accuracy"] for rs in finals.values() for r in rs) / sum(len(rs) for rs in finals.values())
        lines += [f"## 2. Test accuracy, {len(SEEDS)} seeds", "",
                  "Mean +- standard error [95% interval] over seeds: the seeds' spread only. The test set's own "
                  f"sampling error (one run's accuracy on {n_test} questions: about "
                  f"{100 * (acc * (1 - acc) / n_test) ** 0.5:.1f} points) is in neither these intervals nor the t tests "
                  "below; the runs did not record which questions they got right, so no bootstrap over questions can "
                  "be made. Train s: mean training time of a run (two runs at a time, one thread each). Bold: better "
                  f"than the other method at that rank in a paired t test (p < {ALPHA}), after Holm's correction over "
                  "every cell of the table.", "",
                  "| method | " + " | ".join(f"r={r}" for r in RANKS) + " |", "|---|" + "---|" * len(RANKS)]
        lines += method_rows({arm: _accs(rs) for arm, rs in finals.items()}, ["loft", "lora"], RANKS)
        lines.append(f"| full fine-tuning | {summarize(_accs(full)).fmt()} |" + " |" * (len(RANKS) - 1))
        before = [r["eval_accuracy_before"] for r in full if r.get("eval_accuracy_before") is not None]
        lines.append(f"| untrained | {summarize(before).fmt() if len(set(before)) > 1 else f'{before[0]:.3f}'} |"
                     + " |" * (len(RANKS) - 1))
        lines += ["", "| arm | train s | peak RSS MiB | trainable params |", "|---|---|---|---|"]
        for arm, rs in finals.items():
            lines.append(f"| {_label(arm)} | {sum(r['train_seconds'] for r in rs) / len(rs):.0f} | "
                         f"{sum(r['peak_rss_mib'] for r in rs) / len(rs):.0f} | {rs[0]['trainable_params']:,} |")
        lines += ["", "### Claims (paired t tests across seeds)", ""]
        claims = [(("loft", 4), ("lora", 16))] + [(("loft", r), ("lora", r)) for r in RANKS]
        claims += [(("loft", r), ("full", 0)) for r in RANKS] + [(("lora", r), ("full", 0)) for r in RANKS]
        lines += claim_rows([(f"{_label(a)} beats {_label(b)}", paired(_accs(finals[a]), _accs(finals[b])))
                             for a, b in claims])
        lines.append("")
    return "\n".join(lines)


def report(tuned: dict[str, dict[str, Any]], finals: dict[tuple[str, int], list[dict[str, Any]]]) -> None:
    """Write :func:`page` to :data:`REPORT`."""
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(page(tuned, finals))
    print(f"wrote {REPORT.relative_to(ROOT)}")


def report_inputs(sweep: Sweep) -> tuple[dict[str, dict[str, Any]], dict[tuple[str, int], list[dict[str, Any]]]]:
    """Every stage's view of ``sweep``'s results (running the missing runs unless it is dry): the
    tuning, and the finals once the tuning is complete."""
    tuned = tune(sweep)
    return tuned, final(sweep, tuned) if tuned else {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("stage", choices=("plan", "run", "report"))
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    args = ap.parse_args()
    sweep = Sweep(RESULTS, args.jobs, args.threads, dry=args.stage != "run")
    t0 = time.perf_counter()
    tuned, finals = report_inputs(sweep)
    if args.stage == "plan":
        done = len(_sweep.load_results(RESULTS)) if RESULTS.exists() else 0
        print(f"{done} runs done; tuning {'complete' if tuned else 'incomplete'}; {len(sweep.missing)} runs missing in the "
              f"next stage; about {len(METHODS) * GRID_POINTS + len(arms()) * len(SEEDS)} in all before extensions")
    elif args.stage == "report":
        report(tuned, finals)
    else:
        print(f"finished in {(time.perf_counter() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
