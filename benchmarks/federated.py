"""Federated evidence (issue 18): LoFT's kept state and product aggregation against the usual
federated LoRA, on Flower's simulation engine.

    .venv/bin/python benchmarks/federated.py plan            # runs done / to do per subset (nothing runs)
    .venv/bin/python benchmarks/federated.py run --subset small   # what fits a 2-core machine (resumable)
    .venv/bin/python benchmarks/federated.py run --subset full    # the whole grid below
    .venv/bin/python benchmarks/federated.py report          # docs/results/federated_sentiment.md, from the JSONL only

MiniLM-L6 on movie sentiment (the built-in training file, 8,043 snippets, split over the clients;
accuracy on the first ``MAX_EVAL`` snippets of the test split after every round), every linear
layer adapted, a fresh head averaged like the adapters, batch 16, gradients clipped to norm 1,
each method at the learning rate ``LRS`` gives it (``loft finetune``'s defaults when the runs
began; tuned centrally, not for federated training). Every client trains in every round.

The full grid: 4 and 8 clients; Dirichlet(0.1), Dirichlet(1.0) and even splits; ranks 1, 4 and
16; ``ROUNDS`` rounds of ``LOCAL_STEPS`` local steps; ``SEEDS``; the arms

* ``loft-keep``: LoFT, product aggregation (residual dropped), each client's LoFT state kept
  across rounds (calibrated into the new factors' basis at its next step);
* ``loft-reset``: the same with the state reset every round;
* ``loft-fedavg``: LoFT, FedAvg of the factors (state kept);
* ``lora-fedavg``: LoRA (AdamW), FedAvg of the factors, state reset (FlowerTune / OpenFedLLM);
* ``ffa``: FFA-LoRA (A frozen, AdamW on B), FedAvg of B;
* ``full``: full fine-tuning, FedAvg of every weight (the reference; no rank).

``--subset small`` runs 4 clients, the even and Dirichlet(0.1) splits, rank 4,
``SMALL_ROUNDS`` rounds of ``LOCAL_STEPS`` steps: first the arms loft-keep, loft-reset,
lora-fedavg and loft-fedavg (seed 0, then seeds 1 and 2), then the references ffa and full
(seeds 0, 1, 2): docs/federated.md says what was cut.

Each run is ``loft federate`` in its own process (one at a time; its Ray actors take the CPUs);
its ``metrics.json`` (every round: accuracy, loss, aggregation error, bytes per client) goes
into ``benchmarks/results/federated_sentiment.jsonl`` with the run's settings and provenance
(commit, versions, threads, load). A rerun skips finished runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _provenance import provenance  # noqa: E402
from _stats import claim_rows, paired, summarize  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAME = "federated_sentiment"
RESULTS = ROOT / "benchmarks" / "results" / f"{NAME}.jsonl"
REPORT = ROOT / "docs" / "results" / f"{NAME}.md"
FIGURE = ROOT / "docs" / "figures" / f"{NAME}.png"

MODEL, DATA, MAX_EVAL = "minilm-l6", "movie_sentiment", 500
ROUNDS, LOCAL_STEPS, SMALL_ROUNDS = 20, 10, 5
CLIENTS = (4, 8)
SPLITS = ("dirichlet:0.1", "dirichlet:1.0", "even")
RANKS = (1, 4, 16)
SEEDS = (0, 1, 2)
#: arm -> the loft federate options that make it
ARMS: dict[str, dict[str, Any]] = {
    "loft-keep": {"method": "loft", "aggregator": "product", "state": "keep"},
    "loft-reset": {"method": "loft", "aggregator": "product", "state": "reset"},
    "loft-fedavg": {"method": "loft", "aggregator": "fedavg", "state": "keep"},
    "lora-fedavg": {"method": "lora", "aggregator": "fedavg", "state": "reset"},
    "ffa": {"method": "ffa", "aggregator": "fedavg", "state": "reset"},
    "full": {"method": "full", "aggregator": "fedavg", "state": "reset"},
}
SMALL_ARMS = ("loft-keep", "loft-reset", "lora-fedavg", "loft-fedavg")
#: run after SMALL_ARMS in the small subset (added once those were done, so they come last)
SMALL_REFERENCES = ("ffa", "full")
#: every run's learning rate per method: ``loft finetune``'s defaults when these runs began (tuned
#: centrally, not for federated training; FFA-LoRA takes LoRA's), passed explicitly so that a
#: later change of those defaults does not change what a resumed grid runs
LRS = {"loft": 5e-4, "lora": 2e-3, "ffa": 2e-3, "full": 1e-4}
#: the accuracy whose first round the report gives ("rounds to target")
TARGET = 0.80


def run_of(arm: str, clients: int, split: str, rank: int, seed: int, rounds: int) -> dict[str, Any]:
    """One run's settings (what identifies it in the JSONL)."""
    return {"arm": arm, **ARMS[arm], "rank": 0 if arm == "full" else rank, "clients": clients, "split": split,
            "rounds": rounds, "local_steps": LOCAL_STEPS, "seed": seed, "model": MODEL, "data": DATA,
            "max_eval": MAX_EVAL, "batch_size": 16}


def runs(subset: str) -> list[dict[str, Any]]:
    """The runs of a subset, in the order they run (seed-major: every arm once before any repeat)."""
    if subset == "small":
        return [run_of(arm, 4, split, 4, seed, SMALL_ROUNDS) for arms in (SMALL_ARMS, SMALL_REFERENCES)
                for seed in SEEDS for split in ("even", "dirichlet:0.1") for arm in arms]
    out = []
    for seed in SEEDS:
        for clients in CLIENTS:
            for split in SPLITS:
                out.append(run_of("full", clients, split, 0, seed, ROUNDS))
                for rank in RANKS:
                    out += [run_of(arm, clients, split, rank, seed, ROUNDS) for arm in ARMS if arm != "full"]
    return out


def key(run: dict[str, Any]) -> str:
    return json.dumps(run, sort_keys=True)


def load() -> dict[str, dict[str, Any]]:
    if not RESULTS.is_file():
        return {}
    out = {key(r["run"]): r for r in map(json.loads, RESULTS.read_text().splitlines()) if r}
    for r in out.values():
        method = r["run"]["method"]
        if r["lr"] != LRS[method]:
            raise SystemExit(f"{RESULTS.name}: a {method} run at lr {r['lr']:g}, but LRS gives {LRS[method]:g}: "
                             "runs at other rates cannot be pooled; move that file aside")
    return out


def _command(run: dict[str, Any], out: Path) -> list[str]:
    args = [sys.executable, "-m", "loft.app", "federate", "--model", run["model"], "--data", run["data"],
            "--method", run["method"], "--aggregator", run["aggregator"], "--state", run["state"],
            "--clients", str(run["clients"]), "--split", run["split"], "--rounds", str(run["rounds"]),
            "--local-steps", str(run["local_steps"]), "--seed", str(run["seed"]), "--max-eval", str(run["max_eval"]),
            "--batch-size", str(run["batch_size"]), "--lr", str(LRS[run["method"]]), "--output-dir", str(out),
            "--quiet"]
    if run["rank"]:
        args += ["--rank", str(run["rank"])]
    return args


def execute(todo: list[dict[str, Any]]) -> None:
    """Run each run in its own process, one at a time, appending its result line."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    for i, run in enumerate(todo, 1):
        folder = Path(tempfile.mkdtemp(prefix="loft-fedbench-"))
        origin = provenance(threads=1, jobs=1)
        t0 = time.perf_counter()
        proc = subprocess.run(_command(run, folder / "run"), cwd=ROOT, env=env, capture_output=True, text=True)
        metrics_file = folder / "run" / "metrics.json"
        if proc.returncode != 0 or not metrics_file.is_file():
            raise RuntimeError(f"run {run} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
        metrics = json.loads(metrics_file.read_text())
        for drop in ("model", "data"):  # the run's own settings say these, without machine paths
            metrics.pop(drop, None)
        rec = {"run": run, **metrics, "wall_seconds": round(time.perf_counter() - t0, 1), "provenance": origin}
        with RESULTS.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        print(f"[{i}/{len(todo)}] {run['arm']} {run['split']} r={run['rank']} seed {run['seed']}: accuracy "
              f"{rec['eval_accuracy_before']:.3f} -> {rec['eval_accuracy']:.3f} in {rec['wall_seconds']:.0f} s", flush=True)


# ----------------------------------------------------------------------------- the report
def _rounds_to(rec: dict[str, Any], target: float) -> int | None:
    return next((r["round"] for r in rec["rounds"] if r["eval_accuracy"] >= target), None)


def _cell(values: list[float], digits: int = 3) -> str:
    s = summarize(values)
    return s.fmt(digits)


def _groups(recs: list[dict[str, Any]]) -> dict[tuple, dict[str, dict[int, dict[str, Any]]]]:
    """The result lines by setting (clients, split, rank (``None`` for full fine-tuning), rounds),
    then arm, then seed."""
    groups: dict[tuple, dict[str, dict[int, dict[str, Any]]]] = defaultdict(lambda: defaultdict(dict))
    for r in recs:
        run = r["run"]
        groups[(run["clients"], run["split"], run["rank"] if run["arm"] != "full" else None, run["rounds"])][run["arm"]][
            run["seed"]] = r
    return groups


def page(recs: list[dict[str, Any]]) -> str:
    """docs/results/federated_sentiment.md's Markdown from the result lines ``recs`` (the JSONL's);
    nothing is written (the figure it shows is :func:`_figure`'s)."""
    lines = ["# Federated LoFT: MiniLM-L6 + movie sentiment on Flower", "",
             "Generated by `.venv/bin/python benchmarks/federated.py report` from "
             f"`benchmarks/results/{NAME}.jsonl` only (the protocol is in the script's docstring).", ""]
    if not recs:
        return "\n".join(lines + ["No runs yet.", ""])
    commits = Counter(r["provenance"]["commit"] for r in recs)
    libs = Counter(json.dumps(r["provenance"]["versions"], sort_keys=True) for r in recs)
    lines += [f"{len(recs)} runs; commits: " + ", ".join(f"`{c}` ({n})" for c, n in commits.most_common())
              + "; library versions: " + "; ".join(f"{v} ({n})" for v, n in libs.most_common())
              + f"; flwr {recs[0]['flwr_version']}, ray {recs[0]['ray_version']}.", ""]
    groups = _groups(recs)
    lines += ["## Final accuracy, rounds to target, aggregation error, bytes", "",
              f"Accuracy on the first {MAX_EVAL} test snippets after the last round (mean +- standard error [95% "
              f"interval] over seeds; one seed: its value); rounds to {TARGET:.2f}: the first round at or above it "
              "(mean over the seeds that reach it; '-' none); aggregation error: `||mean_k B_k A_k - B A||_F / "
              "||mean_k B_k A_k||_F`, mean over layers and rounds; bytes: sent by one client per round (the "
              "trained factors and the head).", "",
              "| clients | split | rank | rounds | arm | seeds | final accuracy | best round's accuracy | rounds to "
              f"{TARGET:.2f} | aggregation error | KiB up per client per round |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    tests, one_seed = [], []
    for (clients, split, rank, rounds), arms in sorted(groups.items(), key=lambda kv: str(kv[0])):
        for arm in ARMS:
            if arm not in arms:
                continue
            by_seed = arms[arm]
            finals = [by_seed[s]["eval_accuracy"] for s in sorted(by_seed)]
            best = [by_seed[s]["best_eval_accuracy"] for s in sorted(by_seed)]
            reach = [t for t in (_rounds_to(by_seed[s], TARGET) for s in sorted(by_seed)) if t is not None]
            errs = [x["aggregation_error"] for s in by_seed for x in by_seed[s]["rounds"][1:]]
            up = [sum(x["bytes_up"]) / len(x["bytes_up"]) for s in by_seed for x in by_seed[s]["rounds"][1:]]
            lines.append(
                f"| {clients} | {split} | {rank or '-'} | {rounds} | {arm} | {len(by_seed)} | {_cell(finals)} | "
                f"{_cell(best)} | {(f'{sum(reach) / len(reach):.1f} ({len(reach)}/{len(by_seed)})' if reach else '-')} | "
                f"{sum(errs) / len(errs):.2e} | {sum(up) / len(up) / 1024:,.1f} |")
        reference = groups.get((clients, split, None, rounds), {}).get("full")  # full fine-tuning has no rank
        more_tests, more_single = _claims(clients, split, rank, rounds,
                                          {**arms, "full": reference} if reference and rank else arms)
        tests += more_tests
        one_seed += more_single
    lines += ["", "Accuracy per round (mean over seeds; round 0: before training):", "",
              "| clients | split | rank | arm | accuracy by round |", "|---|---|---|---|---|"]
    for (clients, split, rank, rounds), arms in sorted(groups.items(), key=lambda kv: str(kv[0])):
        for arm, by_seed in arms.items():
            per_round = [sum(by_seed[s]["rounds"][i]["eval_accuracy"] for s in by_seed) / len(by_seed)
                         for i in range(rounds + 1)]
            lines.append(f"| {clients} | {split} | {rank or '-'} | {arm} | {' '.join(f'{a:.3f}' for a in per_round)} |")
    splits = {}
    for r in recs:
        splits.setdefault((r["run"]["clients"], r["run"]["split"], r["run"]["seed"]), (r["client_examples"], r["client_labels"]))
    lines += ["", "Training examples (and labels) per client, by clients, split and seed: " + "; ".join(
        f"{c} clients, {sp}, seed {sd}: " + ", ".join(f"{n} ({', '.join(f'{k}: {v}' for k, v in lab.items())})"
                                                     for n, lab in zip(*splits[(c, sp, sd)]))
        for c, sp, sd in sorted(splits)) + "."]
    lines += ["", *_wall_times(recs)]
    lines += ["", "## Claims", "",
              "Final accuracy, paired over seeds (same seed: same split, head, batches). Every claim with at least two "
              f"seeds is one of the family of {len(tests)} that Holm's correction runs over. The accuracy is on "
              f"{MAX_EVAL} test snippets, whose own sampling error (about "
              f"{100 * (0.75 * 0.25 / MAX_EVAL) ** 0.5:.0f} points for one run at 0.75) no t test across seeds "
              "includes; the runs do not record which snippets they got right.", ""]
    if tests:
        lines += claim_rows(tests)
    if one_seed:
        lines += ["", "With one seed there is no estimate of the noise and no verdict:", "",
                  "| claim | final accuracy difference |", "|---|---|", *one_seed]
    lines.append("")
    lines += [f"![accuracy per round](../figures/{FIGURE.name})", ""]
    return "\n".join(lines)


def report() -> None:
    """Write docs/results/federated_sentiment.md (:func:`page`) and its figure from the JSONL only."""
    recs = list(load().values())
    text = page(recs)
    if recs:
        _figure(_groups(recs))
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(text)
    if recs:
        print(f"wrote {REPORT.relative_to(ROOT)} and {FIGURE.relative_to(ROOT)}")


CLAIMS = (("loft-keep", "loft-reset"), ("loft-keep", "loft-fedavg"), ("loft-keep", "lora-fedavg"),
          ("loft-keep", "ffa"), ("loft-reset", "lora-fedavg"), ("loft-keep", "full"), ("lora-fedavg", "full"))


def _claims(clients: int, split: str, rank: int | None, rounds: int,
            arms: dict[str, dict[int, dict]]) -> tuple[list[tuple[str, Any]], list[str]]:
    """The :data:`CLAIMS` of one setting: ``(claim, paired t test)`` where two or more seeds have
    both arms, and a table row with the difference alone where one seed has."""
    tests, single = [], []
    setting = f"{clients} clients, {split}, r={rank}, {rounds} rounds"
    for a, b in CLAIMS:
        if a not in arms or b not in arms:
            continue
        seeds = sorted(set(arms[a]) & set(arms[b]))
        xs, ys = [arms[a][s]["eval_accuracy"] for s in seeds], [arms[b][s]["eval_accuracy"] for s in seeds]
        if len(seeds) < 2:
            diff = xs[0] - ys[0] if seeds else float("nan")
            single.append(f"| {setting}: {a} beats {b} | {diff:+.3f} (1 seed) |")
            continue
        tests.append((f"{setting}: {a} beats {b} ({len(seeds)} seeds)", paired(xs, ys)))
    return tests, single


def _wall_times(recs: list[dict[str, Any]]) -> list[str]:
    """A paragraph on the runs' wall times (``wall_seconds``: one run at a time), by arm, with the
    machine's load at their start (the 1-minute load average of their provenance)."""
    minutes = sorted(r["wall_seconds"] / 60 for r in recs)
    loads = [r["provenance"]["load_1min"] for r in recs if r["provenance"].get("load_1min") is not None]
    by_arm: dict[str, list[float]] = defaultdict(list)
    for r in recs:
        by_arm[r["run"]["arm"]].append(r["wall_seconds"] / 60)
    arms = "; ".join(f"{arm} {min(v):.1f}-{max(v):.1f} (median {statistics.median(v):.1f})"
                     for arm, v in by_arm.items())
    return [f"Wall time of a run (`wall_seconds`, one run at a time; the machine was shared with other work, the "
            f"1-minute load average at a run's start ranging {min(loads):.1f}-{max(loads):.1f} on {recs[0]['provenance'].get('cpus')} "
            f"cores): {minutes[0]:.1f} to {minutes[-1]:.1f} minutes, median {statistics.median(minutes):.1f}; by arm "
            f"(minutes): {arms}." if loads else
            f"Wall time of a run (`wall_seconds`): {minutes[0]:.1f} to {minutes[-1]:.1f} minutes."]


def _figure(groups) -> None:  # noqa: ANN001
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted(groups, key=str)
    fig, axes = plt.subplots(1, len(settings), figsize=(5.5 * len(settings), 4), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        for arm, by_seed in groups[setting].items():
            rounds = [r["round"] for r in next(iter(by_seed.values()))["rounds"]]
            mean = [sum(by_seed[s]["rounds"][i]["eval_accuracy"] for s in by_seed) / len(by_seed)
                    for i in range(len(rounds))]
            ax.plot(rounds, mean, marker=".", label=f"{arm} ({len(by_seed)} seed{'s' if len(by_seed) > 1 else ''})",
                    ls="--" if arm in ("lora-fedavg", "ffa", "full") else "-")
        clients, split, rank, _ = setting
        ax.set_title(f"{clients} clients, {split}, r={rank}")
        ax.set_xlabel("round")
        ax.set_ylabel(f"accuracy (first {MAX_EVAL} test snippets)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURE, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("stage", choices=("plan", "run", "report"))
    ap.add_argument("--subset", choices=("small", "full"), default="small")
    ap.add_argument("--seeds", type=int, default=len(SEEDS), help="run only the first N seeds (default all)")
    args = ap.parse_args()
    if args.stage == "report":
        report()
        return
    done = load()
    wanted = [r for r in runs(args.subset) if r["seed"] in SEEDS[: args.seeds]]
    todo = [r for r in wanted if key(r) not in done]
    print(f"{args.subset}: {len(wanted) - len(todo)} of {len(wanted)} runs done, {len(todo)} to do")
    if args.stage == "run":
        execute(todo)


if __name__ == "__main__":
    main()
