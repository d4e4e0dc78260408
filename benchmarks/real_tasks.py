"""Real pretrained models on real data: alpha sensitivity, learning-rate tuning and rank sweeps.

    .venv/bin/python benchmarks/real_tasks.py sentiment    # MiniLM-L6 + movie sentiment
    .venv/bin/python benchmarks/real_tasks.py siqa         # SmolLM2-135M + Social IQa (reduced)
    .venv/bin/python benchmarks/real_tasks.py sentiment --report-only

Protocol (the same for every method):

1. A validation split is carved once from the training file (fixed seed 1234); the rest is the
   training data of every run. The test split is used only for the final rank sweep.
2. Tuning at rank 4, seed 0, scored on the validation split: a learning-rate grid per method;
   for LoRA the grid is crossed with ``lora_alpha`` in {r/4, r, 2r, 4r, 16r} (the alpha
   sensitivity experiment); LoFT is also run at every alpha at its chosen learning rate (it
   should not care); DoRA uses LoRA's chosen alpha / r; each method's fresh-head learning rate
   is tuned in a second pass (sentiment only: the causal LM has no fresh head).
3. Rank sweep on the test split with each method's chosen settings, several seeds (seed: data
   order, head and LoRA initialisation). Full fine-tuning has no rank; it is run once per seed.

The choice on the validation split: highest accuracy, ties broken by lower eval loss. Every
run is a separate process (peak resident memory per run from ``os.wait4``); results go to
``benchmarks/results/<task>.jsonl`` (a rerun skips finished runs), the report to
``docs/results/real_<task>.md`` and ``docs/figures/real_<task>.png``.

The first runs of both tasks recorded no commit or library versions; they, their reports and
figures are in ``benchmarks/archive/`` and ``docs/archive/`` and are no longer quoted as evidence
(``docs/archive/README.md``). A run now records its provenance (``_sweep.py``), so a rerun
starts new result files.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _sweep  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("loft", "lora", "dora", "full")
ALPHA_RATIOS = (0.25, 1, 2, 4, 16)

TASKS: dict[str, dict[str, Any]] = {
    "sentiment": {
        "title": "MiniLM-L6 + movie sentiment",
        "model": "minilm-l6",
        "data": "movie_sentiment",
        "n_val": 1000,
        "common": {"max_steps": 100, "batch_size": 16},
        "tune_rank": 4,
        "lr_grid": {"loft": [5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3], "lora": [5e-4, 2e-3, 8e-3], "dora": [5e-4, 2e-3, 8e-3],
                    "full": [3e-5, 1e-4, 3e-4]},
        "alpha_grid": True,
        "head_lr_grid": [1e-2],  # the default 2e-3 is in the first pass
        "ranks": [1, 2, 4, 8, 16],
        "seeds": [0, 1, 2],
    },
    "siqa": {
        "title": "SmolLM2-135M + Social IQa (reduced budget)",
        "model": "smollm2-135m",
        "data": "social_iqa",
        "n_val": 200,
        "common": {"max_steps": 80, "batch_size": 8, "target_modules": ["q_proj", "v_proj"]},
        "tune_rank": 4,
        "lr_grid": {"loft": [3e-5, 1e-4, 3e-4], "lora": [3e-4, 1e-3, 3e-3]},
        # full fine-tuning left out: one run (80 steps, 1 thread, shared machine) had not finished
        # after 17 minutes, more than this whole budget allows for five of them
        "alpha_grid": False,  # lora_alpha = 2r; DoRA takes LoRA's learning rate (stated in the report)
        "head_lr_grid": [],
        "ranks": [1, 4, 16],
        "seeds": [0],  # one seed: a run takes ~7 min here (1 thread, shared machine)
    },
}


def _run(task: dict, method: str, *, rank: int, lr: float, seed: int = 0, alpha: float | None = None,
         head_lr: float | None = None, data: str, eval_data: str) -> dict[str, Any]:
    run = {"model": task["model"], "data": data, "eval_data": eval_data, "method": method,
           "rank": rank if method != "full" else 1, "lr": lr, "seed": seed, "eval_before": False, **task["common"]}
    if alpha is not None and method != "full":
        run["alpha"] = float(alpha)  # one spelling per value: the run's identity is its JSON
    if head_lr is not None:
        run["head_lr"] = head_lr
    return run


def _best(records: list[dict]) -> dict:
    return max(records, key=lambda r: (r["eval_accuracy"], -r["eval_loss"]))


def plan_and_run(name: str, jobs: int, threads: int, report_only: bool) -> dict[str, Any]:
    task = TASKS[name]
    train, val, test = _sweep.carve_validation(task["data"], task["n_val"], ROOT / "benchmarks" / "results" / name)
    results_file = ROOT / "benchmarks" / "results" / f"{name}.jsonl"
    r0 = task["tune_rank"]
    on_val = {"data": train, "eval_data": val}

    def execute(runs: list[dict]) -> dict[str, dict]:
        if report_only:
            have = _sweep.load_results(results_file)
            missing = [r for r in runs if _sweep.key(r) not in have]
            if missing:
                raise SystemExit(f"--report-only: {len(missing)} runs of this stage are missing; run without it.")
            return have
        return _sweep.run_all(runs, results_file, jobs=jobs, threads=threads)

    # pass 1: learning rates (x alpha for LoRA) at rank r0, seed 0, on validation
    pass1 = []
    for method, grid in task["lr_grid"].items():
        for lr in grid:
            if method == "lora" and task["alpha_grid"]:
                pass1 += [_run(task, "lora", rank=r0, lr=lr, alpha=a * r0, **on_val) for a in ALPHA_RATIOS]
            elif method != "dora":
                pass1.append(_run(task, method, rank=r0, lr=lr, **on_val))
    # interleave methods so that machine load affects them alike
    pass1.sort(key=lambda r: (task["lr_grid"][r["method"]].index(r["lr"]), r["method"]))
    res = execute(pass1)
    chosen: dict[str, dict[str, Any]] = {}
    for method in task["lr_grid"]:
        if method == "dora":
            continue
        recs = [res[_sweep.key(r)] for r in pass1 if r["method"] == method]
        best = _best(recs)["run"]
        chosen[method] = {"lr": best["lr"], "alpha_ratio": best.get("alpha", 2 * r0) / r0}
    lora_ratio = chosen["lora"]["alpha_ratio"]

    # pass 2: DoRA's learning rate (at LoRA's alpha / r), LoFT at every alpha, head learning rates
    pass2 = []
    if "dora" in task["lr_grid"]:
        pass2 += [_run(task, "dora", rank=r0, lr=lr, alpha=lora_ratio * r0, **on_val) for lr in task["lr_grid"]["dora"]]
    else:
        chosen["dora"] = {"lr": chosen["lora"]["lr"], "alpha_ratio": lora_ratio}
    loft_alpha_runs = []
    if task["alpha_grid"]:
        loft_alpha_runs = [_run(task, "loft", rank=r0, lr=chosen["loft"]["lr"], alpha=a * r0, **on_val)
                           for a in ALPHA_RATIOS if a != 2]
        pass2 += loft_alpha_runs
    res = execute(pass2)
    if "dora" in task["lr_grid"]:
        best = _best([res[_sweep.key(r)] for r in pass2 if r["method"] == "dora"])["run"]
        chosen["dora"] = {"lr": best["lr"], "alpha_ratio": lora_ratio}
    pass3 = []
    for method in METHODS if task["head_lr_grid"] else ():
        c = chosen[method]
        alpha = c["alpha_ratio"] * r0 if method in ("lora", "dora") else None
        pass3 += [_run(task, method, rank=r0, lr=c["lr"], alpha=alpha, head_lr=h, **on_val) for h in task["head_lr_grid"]]
    res = execute(pass3)
    for method in METHODS if pass3 else ():
        c = chosen[method]
        alpha = c["alpha_ratio"] * r0 if method in ("lora", "dora") else None
        default = _run(task, method, rank=r0, lr=c["lr"], alpha=alpha, **on_val)
        cands = [res[_sweep.key(default)]] + [res[_sweep.key(r)] for r in pass3 if r["method"] == method]
        c["head_lr"] = _best(cands)["run"].get("head_lr")  # None: the default
    for c in chosen.values():
        c.setdefault("head_lr", None)

    # pass 3: rank sweep on test, several seeds
    sweep = []
    for seed in task["seeds"]:
        for rank in task["ranks"]:
            for method in ("loft", "lora", "dora"):
                c = chosen[method]
                alpha = c["alpha_ratio"] * rank if method != "loft" else None
                sweep.append(_run(task, method, rank=rank, lr=c["lr"], alpha=alpha, head_lr=c["head_lr"], seed=seed,
                                  data=train, eval_data=test))
        if "full" not in chosen:
            continue
        c = chosen["full"]
        sweep.append(_run(task, "full", rank=1, lr=c["lr"], head_lr=c["head_lr"], seed=seed, data=train, eval_data=test))
    res = execute(sweep)
    return {"task": task, "chosen": chosen, "pass1": pass1, "pass2": pass2, "pass3": pass3, "sweep": sweep,
            "loft_alpha_runs": loft_alpha_runs, "results": _sweep.load_results(results_file)}


# ----------------------------------------------------------------------------- report
def _fmt_lr(x: float | None) -> str:
    return "default" if x is None else f"{x:g}"


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def report(name: str, plan: dict[str, Any], elapsed: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task, chosen, res = plan["task"], plan["chosen"], plan["results"]
    r0 = task["tune_rank"]
    get = lambda run: res[_sweep.key(run)]  # noqa: E731
    lines = [f"# {task['title']}", "",
             f"Produced by `.venv/bin/python benchmarks/real_tasks.py {name}` (raw results: "
             f"`benchmarks/results/{name}.jsonl`). Settings common to every run: "
             + ", ".join(f"`{k}={v}`" for k, v in task["common"].items())
             + f"; validation split: {task['n_val']} records carved from the training file (seed 1234), "
             f"the rest ({get(plan['sweep'][0])['num_train']} records) is every run's training data. "
             "2 CPU cores, two runs at a time with one thread each: wall times are comparable only "
             "within this page.", ""]
    if elapsed:
        lines += [f"Wall time of the command that finished the results: {elapsed / 60:.0f} min.", ""]

    # alpha x lr grid
    lines += [f"## Tuning at rank {r0}, seed 0, on the validation split ({get(plan['pass1'][0])['num_eval']} examples)", ""]
    if task["alpha_grid"]:
        lrs = task["lr_grid"]["lora"]
        lines += ["LoRA + AdamW: validation accuracy for `lora_alpha` x learning rate.", "",
                  "| lora_alpha | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
                  "|---|" + "---|" * len(lrs)]
        for a in ALPHA_RATIOS:
            row = [get(_run(task, "lora", rank=r0, lr=lr, alpha=a * r0, data=plan["pass1"][0]["data"],
                            eval_data=plan["pass1"][0]["eval_data"]))["eval_accuracy"] for lr in lrs]
            lines.append(f"| {a * r0:g} ({a:g} r) | " + " | ".join(f"{x:.4f}" for x in row) + " |")
        loft_default = _run(task, "loft", rank=r0, lr=chosen["loft"]["lr"], data=plan["pass1"][0]["data"],
                            eval_data=plan["pass1"][0]["eval_data"])
        loft_rows = [(2 * r0, get(loft_default))] + [(r["alpha"], get(r)) for r in plan["loft_alpha_runs"]]
        loft_rows.sort(key=lambda t: t[0])
        accs = [m["eval_accuracy"] for _, m in loft_rows]
        losses = [m["eval_loss"] for _, m in loft_rows]
        lines += ["", f"LoFT at its chosen learning rate ({chosen['loft']['lr']:g}) and the same alphas: accuracy "
                  + ", ".join(f"{m['eval_accuracy']:.4f} (alpha {a:g})" for a, m in loft_rows)
                  + f"; spread {max(accs) - min(accs):.4f} in accuracy, {max(losses) - min(losses):.2e} in eval loss.", ""]
    lines += ["Learning-rate grid (validation accuracy; LoRA at its chosen alpha):", "",
              "| method | " + " | ".join(["lr", "val accuracy", "val loss"]) + " |", "|---|---|---|---|"]
    grid_runs = plan["pass1"] + [p for p in plan["pass2"] if p["method"] == "dora"]
    for r in sorted(grid_runs, key=lambda r: (METHODS.index(r["method"]), r["lr"])):
        if task["alpha_grid"] and r["method"] == "lora" and r["alpha"] != chosen["lora"]["alpha_ratio"] * r0:
            continue
        m = get(r)
        lines.append(f"| {r['method']} | {r['lr']:g} | {m['eval_accuracy']:.4f} | {m['eval_loss']:.4f} |")
    if plan["pass3"]:
        lines += ["", "Head learning rate at each method's chosen lr (validation accuracy; default 2e-3):", "",
                  "| method | " + " | ".join(["2e-3"] + [f"{h:g}" for h in task["head_lr_grid"]]) + " |",
                  "|---|" + "---|" * (1 + len(task["head_lr_grid"]))]
        for method in METHODS:
            c = chosen[method]
            alpha = c["alpha_ratio"] * r0 if method in ("lora", "dora") else None
            runs = [_run(task, method, rank=r0, lr=c["lr"], alpha=alpha, head_lr=h, data=plan["pass1"][0]["data"],
                         eval_data=plan["pass1"][0]["eval_data"]) for h in [None] + task["head_lr_grid"]]
            lines.append(f"| {method} | " + " | ".join(f"{get(r)['eval_accuracy']:.4f}" for r in runs) + " |")
    lines += ["", "Chosen: " + "; ".join(
        f"{m} lr {c['lr']:g}" + (f", alpha {c['alpha_ratio']:g} r" if m in ("lora", "dora") else "")
        + (f", head lr {_fmt_lr(c.get('head_lr'))}" if task["head_lr_grid"] else "") for m, c in chosen.items()) + ".", ""]

    # rank sweep
    n_test = get(plan["sweep"][0])["num_eval"]
    lines += [f"## Rank sweep on the test split ({n_test} examples), seeds {task['seeds']}", "",
              "Mean accuracy +- standard deviation over seeds; time and peak memory: mean per run.", "",
              "| method | rank | test accuracy | per seed | train s | peak RSS MiB | trainable params |",
              "|---|---|---|---|---|---|---|"]
    table: dict[tuple[str, int], list[dict]] = {}
    for r in plan["sweep"]:
        table.setdefault((r["method"], r["rank"] if r["method"] != "full" else 0), []).append(get(r))
    for (method, rank), recs in sorted(table.items(), key=lambda t: (METHODS.index(t[0][0]), t[0][1])):
        mean, sd = _mean_sd([m["eval_accuracy"] for m in recs])
        lines.append(f"| {method} | {rank or '-'} | {mean:.4f} +- {sd:.4f} | "
                     + " ".join(f"{m['eval_accuracy']:.3f}" for m in recs)
                     + f" | {statistics.fmean(m['train_seconds'] for m in recs):.0f} | "
                     f"{statistics.fmean(m['peak_rss_mib'] for m in recs):.0f} | {recs[0]['trainable_params']:,} |")
    lines.append("")
    out_md = ROOT / "docs" / "results" / f"real_{name}.md"
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text("\n".join(lines))

    fig, axes = plt.subplots(1, 2 if task["alpha_grid"] else 1, figsize=(11 if task["alpha_grid"] else 6, 4.2),
                             squeeze=False)
    ax = axes[0][0]
    for method, color in zip(("loft", "lora", "dora"), ("C0", "C1", "C2")):
        xs = task["ranks"]
        ms = [_mean_sd([m["eval_accuracy"] for m in table[(method, r)]]) for r in xs]
        ax.errorbar(xs, [m for m, _ in ms], yerr=[s for _, s in ms], marker="o", capsize=3, color=color, label=method)
    if ("full", 0) in table:
        fm, fs = _mean_sd([m["eval_accuracy"] for m in table[("full", 0)]])
        ax.axhline(fm, color="k", ls="--", label=f"full ({fm:.3f})")
        ax.axhspan(fm - fs, fm + fs, color="k", alpha=0.08)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rank")
    ax.set_ylabel(f"test accuracy (mean +- sd, {len(task['seeds'])} seeds)")
    ax.set_title(task["title"])
    ax.legend()
    if task["alpha_grid"]:
        ax = axes[0][1]
        data, ev = plan["pass1"][0]["data"], plan["pass1"][0]["eval_data"]
        for lr, ls in zip(task["lr_grid"]["lora"], (":", "-.", "-")):
            ys = [get(_run(task, "lora", rank=r0, lr=lr, alpha=a * r0, data=data, eval_data=ev))["eval_accuracy"]
                  for a in ALPHA_RATIOS]
            ax.plot([a * r0 for a in ALPHA_RATIOS], ys, marker="o", ls=ls, color="C1", label=f"LoRA lr {lr:g}")
        loft_pts = sorted([(2 * r0, get(_run(task, "loft", rank=r0, lr=chosen["loft"]["lr"], data=data, eval_data=ev)))]
                          + [(r["alpha"], get(r)) for r in plan["loft_alpha_runs"]], key=lambda t: t[0])
        ax.plot([a for a, _ in loft_pts], [m["eval_accuracy"] for _, m in loft_pts], marker="s", color="C0",
                label=f"LoFT lr {chosen['loft']['lr']:g}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"lora_alpha (rank {r0})")
        ax.set_ylabel("validation accuracy")
        ax.set_title("alpha sensitivity")
        ax.legend(fontsize=8)
    fig.tight_layout()
    out_png = ROOT / "docs" / "figures" / f"real_{name}.png"
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    print(f"wrote {out_md} and {out_png}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("task", choices=sorted(TASKS))
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    ap.add_argument("--report-only", action="store_true", help="write the report from finished results")
    args = ap.parse_args()
    t0 = time.perf_counter()
    plan = plan_and_run(args.task, args.jobs, args.threads, args.report_only)
    report(args.task, plan, 0.0 if args.report_only else time.perf_counter() - t0)


if __name__ == "__main__":
    main()
