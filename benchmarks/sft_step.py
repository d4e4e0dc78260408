"""LoFT's whole training step against LoRA + AdamW's on a real instruction-tuning run on CPU: short
sequences, where the forward and backward are cheap and the optimizer's step weighs more than at
the 4 x 512 tokens of ``benchmarks/perf.py``.

    .venv/bin/python benchmarks/sft_step.py                 # writes benchmarks/results/sft_step.json
    .venv/bin/python benchmarks/sft_step.py --report-only   # its table in docs/performance.md

Each method's run is what ``loft finetune --model smollm2-135m --data social_iqa_sft --rank R
--batch-size 8 --max-length 128`` builds (SmolLM2-135M, the seven projections of its 30 layers:
210 pairs; the compact LM head of ``benchmarks/sft_head.py``), one thread. Both runs are built
at once and step on the same batches of the training order, each on its own trajectory (nothing is
restored between steps): one sample is one batch, stepped by both methods in alternating order,
and timed in two parts, ``Trainer.training_step`` (forward, loss, backward) and
``optimizer.step()`` with ``zero_grad``. The table gives the medians of each part and the median
(quartiles) of the per-batch ratios of the whole step, LoFT over LoRA.
"""

from __future__ import annotations

import argparse
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
from sft_head import build  # noqa: E402  (the run loft finetune builds, ready to step)

OUT = REPO / "benchmarks" / "results" / "sft_step.json"
PAGE = REPO / "docs" / "performance.md"
BEGIN, END = "<!-- sft_step.py table: begin -->", "<!-- sft_step.py table: end -->"
METHODS = ("loft", "lora")
BATCH, MAX_LENGTH = 8, 128  # sft_head.build's


def one_step(trainer, batch) -> tuple[float, float]:
    """Seconds of ``training_step`` (forward, loss, backward) and of the optimizer's step with
    ``zero_grad``, on ``batch``."""
    start = time.perf_counter()
    trainer.training_step(trainer.model, dict(batch))
    middle = time.perf_counter()
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return middle - start, time.perf_counter() - middle


def _quartiles(values: list[float]) -> list[float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return [round(q[0], 3), round(statistics.median(values), 3), round(q[2], 3)]


def measure(rank: int, samples: int, folder: Path) -> dict:
    """One row: both methods at ``rank`` on the same ``samples`` batches (after one warm-up batch)."""
    trainers = {m: build(m, folder, rank) for m in METHODS}
    batches = iter(trainers["loft"][1])  # the same training order for both (seed 0)
    parts: dict[str, dict[str, list[float]]] = {m: {"forward_backward": [], "optimizer": []} for m in METHODS}
    pairs = sum(1 for n, _ in trainers["loft"][0].model.named_modules() if n.endswith(".lora_A"))
    warm = next(batches)
    for m in METHODS:  # allocations, the optimizer's state
        one_step(trainers[m][0], warm)
    for i in range(samples):
        batch = next(batches)
        for m in METHODS if i % 2 == 0 else METHODS[::-1]:
            fb, opt = one_step(trainers[m][0], batch)
            parts[m]["forward_backward"].append(fb)
            parts[m]["optimizer"].append(opt)
    whole = {m: [a + b for a, b in zip(p["forward_backward"], p["optimizer"])] for m, p in parts.items()}
    ratios = [a / b for a, b in zip(whole["loft"], whole["lora"])]
    return {"rank": rank, "pairs": pairs, "samples": samples,
            "seconds": {m: {"whole": _quartiles(whole[m]), **{k: _quartiles(v) for k, v in parts[m].items()}}
                        for m in METHODS},
            "ratio_loft_over_lora": _quartiles(ratios)}


def table(result: dict) -> str:
    """The Markdown the page shows between its markers, from a result file only."""
    p = result["provenance"]
    v = p["versions"]
    lines = [f"Measured by `{result['benchmark']}` at commit `{p['commit']}`: torch {v['torch']}, transformers "
             f"{v['transformers']}, peft {v['peft']}; {p['cpus']} CPUs, {p['threads']} thread, 1-minute load "
             f"{p['load_1min']} at the end. {result['model']} on `{result['data']}`, batch {result['batch_size']}, "
             f"`--max-length {result['max_length']}`. Seconds: median (quartiles) over the batches; the ratio: median "
             "(quartiles) of the per-batch ratios of the whole step.", "",
             "| rank | pairs | batches | LoFT whole step s | LoRA + AdamW whole step s | LoFT / LoRA | "
             "forward + backward s, LoFT / LoRA | optimizer step s, LoFT / LoRA |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]

    def q(values: list[float], digits: int = 2) -> str:
        return f"{values[1]:.{digits}f} ({values[0]:.{digits}f}-{values[2]:.{digits}f})"

    for row in result["rows"]:
        s = row["seconds"]
        lines.append(f"| {row['rank']} | {row['pairs']} | {row['samples']} | {q(s['loft']['whole'])} | "
                     f"{q(s['lora']['whole'])} | {q(row['ratio_loft_over_lora'], 3)}x | "
                     f"{s['loft']['forward_backward'][1]:.2f} / {s['lora']['forward_backward'][1]:.2f} | "
                     f"{s['loft']['optimizer'][1]:.3f} / {s['lora']['optimizer'][1]:.3f} |")
    return "\n".join(lines)


def render(result: dict, page: Path = PAGE) -> None:
    """Put :func:`table` between the page's markers, leaving the rest of the page as it is."""
    replace_section(page, BEGIN, END, table(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="4,16", help="comma-separated LoRA ranks, one row each")
    parser.add_argument("--samples", type=int, default=15, help="batches per rank (after one warm-up batch)")
    result_options(parser, OUT)
    args = parser.parse_args()
    if args.report_only:
        render(json.loads(args.out.read_text()))
        return
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="loft-sft-step-") as tmp:
        for rank in (int(r) for r in args.ranks.split(",")):
            rows.append(measure(rank, args.samples, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    result = {"benchmark": "benchmarks/sft_step.py", "model": "smollm2-135m", "data": "social_iqa_sft",
              "batch_size": BATCH, "max_length": MAX_LENGTH, "rows": rows, "provenance": provenance(args.threads)}
    keep_result(result, args.out, OUT, render)


if __name__ == "__main__":
    main()
