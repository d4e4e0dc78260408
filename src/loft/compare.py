"""``loft compare``: one data set, seed and step budget; several methods and ranks.

Each run is a :func:`loft.finetune.finetune` into ``<output_dir>/<method>-r<rank>`` (``full``
for full fine-tuning). The results go to ``compare.md`` / ``compare.csv`` (one row per run)
and ``compare.png`` (accuracy against rank per method, and every loss curve).

Under ``torchrun`` / ``accelerate launch`` every process runs the same plan; the main process
(rank 0) checks the folder, writes the table and the plot, and prints.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import time
from pathlib import Path
from typing import Any

from .errors import LoftUsageError
from .finetune import DEFAULT_LR, METHODS, FinetuneConfig, finetune
from .launch import barrier, init_processes, is_main_process, launched_processes, on_main_process

__all__ = ["parse_lrs", "run_compare"]

COLUMNS = ("method", "rank", "eval_accuracy", "train_loss", "lr", "head_lr", "trainable_params", "steps", "train_seconds")


def parse_lrs(text: str | None) -> dict[str, float]:
    """``"loft=5e-4,lora=2e-3"`` (or one number for every method) -> ``{method: lr}``."""
    if not text:
        return {}
    out: dict[str, float] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, value = part.partition("=")
        try:
            if not sep:
                return {m: float(part) for m in METHODS}
            if name.strip() not in METHODS:
                raise LoftUsageError(f"--lr {part!r}: unknown method {name.strip()!r} (methods: {', '.join(METHODS)}).")
            out[name.strip()] = float(value)
        except ValueError:
            raise LoftUsageError(f"--lr {part!r}: expected method=number, e.g. loft=5e-4.") from None
    return out


def _table(rows: list[dict[str, Any]]) -> tuple[str, str]:
    """Markdown and CSV text of the result rows."""
    def fmt(key: str, value: Any) -> str:
        if value is None:
            return "-"
        if key in ("eval_accuracy", "train_loss"):
            return f"{value:.4f}"
        if key in ("lr", "head_lr"):
            return f"{value:g}"
        if key == "trainable_params":
            return f"{value:,}"
        return str(value)

    md = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(fmt(k, r.get(k)) for k in COLUMNS) + " |" for r in rows]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return "\n".join(md) + "\n", buf.getvalue()


def _prepare_folder(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty folder unless ``overwrite``; create it (main process only)."""
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise LoftUsageError(
                f"Output directory {str(out)!r} is not empty; nothing was changed. Choose another --output-dir "
                "or pass --overwrite to replace it."
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def run_compare(
    *,
    methods: list[str],
    ranks: list[int],
    full: bool = True,
    output_dir: str = "runs/compare",
    overwrite: bool = False,
    progress: bool = True,
    lrs: dict[str, float] | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Run every (method, rank) pair plus full fine-tuning; write the table and the plot.

    ``settings`` are :class:`FinetuneConfig` fields shared by every run (model, data, steps ...).
    """
    from .plots import plot_compare

    bad = [m for m in methods if m not in METHODS or m == "full"]
    if bad:
        raise LoftUsageError(f"--methods: unknown adapter method {bad[0]!r}; choose from loft, lora, dora (full: --full).")
    if not ranks or any(r < 1 for r in ranks):
        raise LoftUsageError(f"--ranks must be positive integers, got {ranks}.")
    if not methods and not full:
        raise LoftUsageError("Nothing to compare: give --methods or --full.")
    lrs = lrs or {}
    out = Path(output_dir)
    plan = [(m, r) for m in methods for r in ranks] + ([("full", ranks[0])] if full else [])
    # Check the shared settings (data, model, targets, ranks) once, before any run starts.
    processes = launched_processes()
    for method, rank in plan:
        FinetuneConfig(method=method, rank=rank, lr=lrs.get(method), **settings).check(processes)
    init_processes()
    on_main_process(_prepare_folder, out, overwrite)
    main = is_main_process()
    progress = progress and main
    t0 = time.perf_counter()
    rows, curves = [], {}
    for i, (method, rank) in enumerate(plan, 1):
        name = "full" if method == "full" else f"{method}-r{rank}"
        if progress:
            print(f"[{i}/{len(plan)}] {name}", flush=True)
        cfg = FinetuneConfig(method=method, rank=rank, lr=lrs.get(method, DEFAULT_LR[method]),
                             output_dir=str(out / name), eval_before=False, **settings)
        metrics = finetune(cfg, progress=progress)
        rows.append({k: metrics.get(k) for k in COLUMNS})
        curves[name] = metrics["loss_curve"]
    seconds = time.perf_counter() - t0
    markdown, csv_text = _table(rows)
    if main:
        (out / "compare.md").write_text(markdown)
        (out / "compare.csv").write_text(csv_text)
        data_name = Path(str(settings.get("data", "movie_sentiment"))).stem
        plot_compare(rows, curves, out / "compare.png", f"{data_name}: same data, seed and steps")
        (out / "compare.json").write_text(json.dumps({"rows": rows, "seconds": round(seconds, 1), "settings": {k: v for k, v in settings.items()}, "lrs": lrs}, indent=2, default=str))
    barrier()
    return {"rows": rows, "markdown": markdown, "csv": csv_text, "seconds": seconds}
