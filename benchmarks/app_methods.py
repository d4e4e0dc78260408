"""Two short measurements behind ``loft finetune``'s newer options (docs/workflow.md quotes them):

    .venv/bin/python benchmarks/app_methods.py lrs       # default learning rates of loraplus, lorafa, pissa, rslora
    .venv/bin/python benchmarks/app_methods.py memory    # peak memory with --load-in-4bit / --load-in-8bit
    .venv/bin/python benchmarks/app_methods.py lrs --report-only

``lrs``: MiniLM-L6 + movie sentiment at rank 4 (``lora_alpha = 2 r``), 100 steps at batch 16,
seed 0, scored on the validation split that ``real_tasks.py sentiment`` carves (1000 records,
seed 1234); each new method at a small learning-rate grid, plain LoRA at its default beside them.
Grid points 4x apart, extended while the best one sat on an edge (LoRA+ and PiSSA down, LoRA-FA up; rsLoRA both ways). One
seed and a small grid: a default, not a tuned verdict.

``memory``: the same run on a full-precision, a 4-bit and an 8-bit base: LoFT at rank 4 on
SmolLM2-135M + Social IQa (q_proj, v_proj; 3 steps at batch 8, 16 eval questions: memory peaks in
the first steps, so a reduced budget measures it) and on MiniLM-L6 + movie sentiment (every
linear layer; 20 steps, 200 eval examples). Records the run's ``peak_memory_mb`` (peak RSS of the
run on the CPU), ``base_model_mb`` (the loaded base's weights and buffers) and the process's peak
RSS from ``os.wait4``.

Each run is its own process (benchmarks/_sweep.py); results go to
``benchmarks/results/app_<name>.jsonl`` (a rerun skips finished runs) and the report to
``docs/results/app_<name>.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _sweep  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

LR_GRID = {"lora": [2e-3], "loraplus": [6.25e-5, 2.5e-4, 1e-3], "lorafa": [2e-3, 8e-3, 3.2e-2], "pissa": [1.25e-4, 5e-4, 2e-3],
           "rslora": [1.25e-4, 5e-4, 2e-3, 8e-3]}

MEMORY_SETUPS = {
    "smollm2-135m + social_iqa": {"model": "smollm2-135m", "data": "social_iqa", "max_steps": 3, "batch_size": 8,
                                  "max_eval": 16, "target_modules": ["q_proj", "v_proj"]},
    "minilm-l6 + movie_sentiment": {"model": "minilm-l6", "data": "movie_sentiment", "max_steps": 20,
                                    "batch_size": 16, "max_eval": 200},
}
BASES = {"float32": {}, "4-bit": {"load_in_4bit": True}, "8-bit": {"load_in_8bit": True}}


def lr_runs() -> tuple[list[dict[str, Any]], Path]:
    train, val, _ = _sweep.carve_validation("movie_sentiment", 1000, ROOT / "benchmarks" / "results" / "sentiment")
    runs = [{"model": "minilm-l6", "data": train, "eval_data": val, "method": method, "rank": 4, "lr": lr, "seed": 0,
             "eval_before": False, "max_steps": 100, "batch_size": 16}
            for method, lrs in LR_GRID.items() for lr in lrs]
    return runs, ROOT / "benchmarks" / "results" / "app_lrs.jsonl"


def _memory_run(setup: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    # lr 5e-4: loft finetune's default when these runs were made (it is in each run's identity, so
    # that a later change of the default does not change what a rerun measures)
    return {**setup, **base, "method": "loft", "rank": 4, "lr": 5e-4, "seed": 0, "eval_before": False}


def memory_runs() -> tuple[list[dict[str, Any]], Path]:
    runs = [_memory_run(setup, base) for setup in MEMORY_SETUPS.values() for base in BASES.values()]
    return runs, ROOT / "benchmarks" / "results" / "app_memory.jsonl"


def _header(results: dict[str, dict], command: str) -> list[str]:
    any_rec = next(iter(results.values()))
    origin = any_rec["provenance"]
    v = origin["versions"]
    commits = ", ".join(dict.fromkeys(rec["provenance"]["commit"] for rec in results.values()))
    loads = [rec["provenance"]["load_1min"] for rec in results.values()]
    return [f"Produced by `.venv/bin/python benchmarks/app_methods.py {command}` (raw results: "
            f"`benchmarks/results/app_{command}.jsonl`), commit(s) {commits}, torch {v['torch']}, transformers "
            f"{v['transformers']}, peft {v['peft']}; {origin['cpus']} CPU cores, {any_rec['jobs']} runs at a time with "
            f"{any_rec['threads']} thread each, machine load {min(loads)}-{max(loads)} at the runs' starts (a shared "
            "machine: seconds are upper bounds).", ""]


def report_lrs(results: dict[str, dict]) -> str:
    lines = ["# Default learning rates of loraplus, lorafa, pissa and rslora", ""] + _header(results, "lrs")
    lines += ["MiniLM-L6 + movie sentiment, rank 4, `lora_alpha = 8`, 100 steps at batch 16, seed 0, head lr 2e-3; "
              "accuracy on the 1000-example validation split (standard error about 1.2 points; one seed).", "",
              "| method | lr | val accuracy | val loss | train loss | trainable params | train s |", "|---|---|---|---|---|---|---|"]
    runs, _ = lr_runs()
    for run in runs:
        rec = results.get(_sweep.key(run))
        if rec is None:
            lines.append(f"| {run['method']} | {run['lr']:g} | not run yet | | | | |")
            continue
        lines.append(f"| {run['method']} | {run['lr']:g} | {rec['eval_accuracy']:.4f} | {rec['eval_loss']:.4f} | "
                     f"{rec['train_loss']:.4f} | {rec['trainable_params']:,} | {rec['train_seconds']} |")
    return "\n".join(lines) + "\n"


def report_memory(results: dict[str, dict]) -> str:
    lines = ["# Peak memory of a run on a full-precision, 4-bit and 8-bit base", ""] + _header(results, "memory")
    lines += ["LoFT at rank 4, seed 0, on the CPU. `train peak`: the run's peak resident memory once the model is "
              "loaded, training and evaluating (`peak_memory_mb` in metrics.json); `load peak`: while loading the data "
              "and the model (`load_peak_memory_mb`); both count the interpreter and libraries too. `base weights`: the "
              "loaded base model's weights and buffers (`base_model_mb`); `process peak`: the whole process's peak RSS "
              "(`os.wait4`).", ""]
    for name, setup in MEMORY_SETUPS.items():
        steps = f"{setup['max_steps']} steps at batch {setup['batch_size']}, {setup['max_eval']} eval examples"
        targets = ", ".join(setup.get("target_modules", [])) or "every linear layer"
        lines += ["", f"## {name} ({targets}; {steps})", "",
                  "| base | train peak MiB | load peak MiB | base weights MiB | process peak MiB | eval accuracy | train loss "
                  "| train s |",
                  "|---|---|---|---|---|---|---|---|"]
        for base, extra in BASES.items():
            rec = results[_sweep.key(_memory_run(setup, extra))]
            lines.append(f"| {base} | {rec['peak_memory_mb']:,.0f} | {rec['load_peak_memory_mb']:,.0f} | "
                         f"{rec['base_model_mb']:,.1f} | {rec['peak_rss_mib']:,.0f} | "
                         f"{rec['eval_accuracy']:.4f} | {rec['train_loss']:.4f} | {rec['train_seconds']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["lrs", "memory"])
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    ap.add_argument("--report-only", action="store_true", help="write the report from finished results")
    args = ap.parse_args()
    runs, path = lr_runs() if args.what == "lrs" else memory_runs()
    t0 = time.perf_counter()
    if args.report_only:
        results = _sweep.load_results(path)
    else:
        results = _sweep.run_all(runs, path, jobs=args.jobs, threads=args.threads)
    text = (report_lrs if args.what == "lrs" else report_memory)(results)
    out = ROOT / "docs" / "results" / f"app_{args.what}.md"
    out.write_text(text)
    print(f"wrote {out} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
