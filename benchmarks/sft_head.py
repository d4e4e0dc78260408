"""An instruction-tuning training step on CPU with TRL's fused LM head scoring every position (TRL's
own CPU path) against scoring only the completion's positions (what ``loft finetune`` does,
``loft.integrations.library_internals.fused_head_scores_labelled_positions_only``).

    .venv/bin/python benchmarks/sft_head.py                 # writes benchmarks/results/sft_head.json
    .venv/bin/python benchmarks/sft_head.py --report-only   # its table in docs/performance.md

The run is what ``loft finetune --model smollm2-135m --data social_iqa_sft --batch-size 8
--max-length 128`` builds (SmolLM2-135M, rank 4 on the seven projections; LoFT, LoRA and full
fine-tuning), one thread. One sample is one whole optimizer step (``Trainer.training_step``: the
forward, the loss, the backward; then ``optimizer.step()`` and ``zero_grad``) on one batch of the
run's (sample i: the training order's batch i + 1; batch 0 warms up), each path once, in
alternating order, and the table gives medians and the median of
the per-pair ratios. The loss of the two paths is compared on every pair: the parameters move between
samples, so each pair starts from a different point, but both paths of a pair start from the same
one (before each path's step the trainable parameters and the optimizer's state are restored from
a copy taken at the pair's start, for both paths alike: a first version restored them before the
second path only, and full fine-tuning's step after the copy ran twice as slow whichever path
it was).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _pages import keep_result, replace_section, result_options  # noqa: E402
from _provenance import REPO, provenance  # noqa: E402

from loft.app.finetune import FinetuneConfig, build_run, plan_run, prepare_folder  # noqa: E402
from loft.app.status import RunStatus  # noqa: E402
from loft.integrations import library_internals  # noqa: E402

OUT = REPO / "benchmarks" / "results" / "sft_head.json"
PAGE = REPO / "docs" / "performance.md"
BEGIN, END = "<!-- sft_head.py table: begin -->", "<!-- sft_head.py table: end -->"


def build(method: str, folder: Path, rank: int = 4):
    """The trainer ``loft finetune`` builds for ``method`` at ``rank`` on social_iqa_sft (batch 8,
    ``--max-length 128``, seed 0), ready to step, and its training batches."""
    cfg = FinetuneConfig(model="smollm2-135m", data="social_iqa_sft", method=method, rank=rank, batch_size=8,
                         max_length=128, max_steps=100, seed=0, output_dir=str(folder / f"{method}-r{rank}"))
    status = RunStatus(cfg, progress=False)
    plan, inputs = plan_run(cfg, overwrite=False, resume=False, status=status)
    built = build_run(plan, inputs, prepare_folder(plan, status), callbacks=None, status=status)
    trainer = built.trainer
    trainer.create_optimizer_and_scheduler(num_training_steps=100)
    trainer.current_gradient_accumulation_steps = 1  # what the training loop sets before a step
    trainer.loft_setup(None)  # what loft finetune does before training
    return trainer, trainer.get_train_dataloader()


def one_step(trainer, batch, compact: bool) -> tuple[float, float]:
    """Seconds of one optimizer step on ``batch``, and its loss; TRL's own CPU path unless ``compact``."""
    saved = library_internals.fused_head_scores_labelled_positions_only
    if not compact:
        library_internals.fused_head_scores_labelled_positions_only = contextlib.nullcontext
    try:
        start = time.perf_counter()
        loss = trainer.training_step(trainer.model, dict(batch))
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
    finally:
        library_internals.fused_head_scores_labelled_positions_only = saved
    return seconds, float(loss)


def measure(method: str, samples: int, folder: Path) -> dict:
    trainer, loader = build(method, folder)
    batches = iter(loader)
    model = trainer.model
    trainable = [p for p in model.parameters() if p.requires_grad]
    times = {"every_position": [], "completion_only": []}
    losses, labelled, positions = [], [], []
    one_step(trainer, next(batches), True)  # warm-up (allocations, the optimizer's state)
    for i in range(samples):
        batch = next(batches)
        labelled.append(int((batch["labels"][:, 1:] != -100).sum()))
        positions.append(batch["labels"][:, 1:].numel())
        start = [p.detach().clone() for p in trainable]
        state = copy.deepcopy(trainer.optimizer.state_dict())
        order = (False, True) if i % 2 == 0 else (True, False)
        pair = {}
        for compact in order:  # both paths of a pair start from the same parameters and optimizer state,
            with torch.no_grad():  # restored the same way before each (the first path's too: symmetric)
                for p, s in zip(trainable, start):
                    p.copy_(s)
            trainer.optimizer.load_state_dict(state)
            seconds, loss = one_step(trainer, batch, compact)
            times["completion_only" if compact else "every_position"].append(seconds)
            pair[compact] = loss
        losses.append(abs(pair[True] - pair[False]) / abs(pair[False]))
    ratios = [a / b for a, b in zip(times["every_position"], times["completion_only"])]
    return {"method": method, "samples": samples, "labelled_positions": labelled, "positions": positions,
            "median_seconds": {k: round(statistics.median(v), 3) for k, v in times.items()},
            "median_ratio_every_over_completion": round(statistics.median(ratios), 3),
            "ratios": [round(r, 3) for r in ratios],
            "max_relative_loss_difference": max(losses)}


def table(result: dict) -> str:
    """The Markdown the page shows between its markers, from a result file only."""
    p = result["provenance"]
    v = p["versions"]
    lines = [f"Measured by `{result['benchmark']}` at commit `{p['commit']}`: torch {v['torch']}, transformers "
             f"{v['transformers']}, peft {v['peft']}; {p['cpus']} CPUs, {p['threads']} thread, 1-minute load "
             f"{p['load_1min']} at the end. {result['model']} on `{result['data']}`, rank {result['rank']}, batch "
             f"{result['batch_size']}, `--max-length {result['max_length']}`. Seconds: medians of one whole optimizer "
             "step per batch, the two paths alternating; the ratio: median (min-max) of the per-batch ratios. Each step "
             "follows a restore of the parameters and the optimizer's state (for both paths alike), which costs some "
             "optimizers more than others: compare the two paths within a row, not the rows.", "",
             "| method | next-token positions per batch (median) | of them labelled | every position s "
             "| completion only s | ratio | largest relative loss difference |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in result["rows"]:
        t = row["median_seconds"]
        lines.append(f"| {row['method']} | {statistics.median(row['positions']):.0f} | "
                     f"{statistics.median(row['labelled_positions']):.0f} | {t['every_position']:.2f} | "
                     f"{t['completion_only']:.2f} | {row['median_ratio_every_over_completion']:.2f}x "
                     f"({min(row['ratios']):.2f}-{max(row['ratios']):.2f}) | "
                     f"{row['max_relative_loss_difference']:.1g} |")
    return "\n".join(lines)


def render(result: dict, page: Path = PAGE) -> None:
    """Put :func:`table` between the page's markers, leaving the rest of the page as it is."""
    replace_section(page, BEGIN, END, table(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="loft,lora,full")
    parser.add_argument("--samples", type=int, default=6)
    result_options(parser, OUT)
    args = parser.parse_args()
    if args.report_only:
        render(json.loads(args.out.read_text()))
        return
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="loft-sft-head-") as tmp:
        for method in args.methods.split(","):
            rows.append(measure(method, args.samples, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    result = {"benchmark": "benchmarks/sft_head.py", "model": "smollm2-135m", "data": "social_iqa_sft", "rank": 4,
              "batch_size": 8, "max_length": 128, "rows": rows, "provenance": provenance(args.threads)}
    keep_result(result, args.out, OUT, render)


if __name__ == "__main__":
    main()
