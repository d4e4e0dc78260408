"""``loft compare``: one data set, seed and step budget; several methods and ranks.

Each run is a :func:`loft.app.finetune.finetune` into ``<output_dir>/<method>-r<rank>`` (``full``
for full fine-tuning). The results go to ``compare.md`` / ``compare.csv`` (one row per run)
and ``compare.png`` (accuracy against rank per method, and every loss curve).

Under ``torchrun`` / ``accelerate launch`` every process runs the same plan; the main process
(rank 0) checks the folder, writes the table and the plot, and prints.
"""

from __future__ import annotations

import csv
import io
import json
import re
import time
from pathlib import Path
from typing import Any

from .atomic import atomic_write, write_failure, write_json, write_text
from .errors import LoftUsageError, OutputWriteError, RunInterrupted, interruption
from .autolr import plan_lr_search
from .config import (ADAPTER_METHODS, AUTO_LR, METHODS, FinetuneConfig, check_output_option, default_lr,
                     default_lr_note, parse_lr)
from .finetune import finetune
from .load import prepare_inputs, resolve_targets
from .plan import run_steps
from .rundir import (
    CHECKPOINTS,
    METRICS_FILE,
    check_writable,
    latest_checkpoint,
    search_progress,
    folder_snapshot,
    check_output_dir,
    clear_folder,
    is_new_output_dir,
    run_name,
    take_output_dir,
)
from .runlock import RunLock, listing
from .signals import sigterm_as_interrupt
from .launch import barrier, init_processes, is_main_process, launched_processes, on_main_process

__all__ = ["parse_lrs", "run_compare"]

COLUMNS = ("method", "rank", "eval_accuracy", "train_loss", "lr", "head_lr", "trainable_params", "steps", "train_seconds",
           "peak_memory_mb")
#: columns shown only when some run has a value: instruction data's perplexity; with --lr auto, how
#: each searched run got its rate (``chosen`` by its search, or ``default kept``: no trial beat the floor)
OPTIONAL_COLUMNS = ("eval_perplexity", "lr_search")


def parse_lrs(text: str | None) -> dict[str, float | str]:
    """``"loft=5e-4,lora=2e-3"`` (or one number, or ``auto``, for every method; ``lora=auto``: search
    that method's rate) -> ``{method: lr or "auto"}``."""
    if not text:
        return {}
    out: dict[str, float | str] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, value = part.partition("=")
        try:
            if not sep:
                return {m: parse_lr(part) for m in METHODS}
            if name.strip() not in METHODS:
                raise LoftUsageError(f"--lr {part!r}: unknown method {name.strip()!r} (methods: {', '.join(METHODS)}).")
            out[name.strip()] = parse_lr(value)
        except LoftUsageError:
            raise LoftUsageError(f"--lr {part!r}: expected method=number or method=auto, e.g. loft=5e-4.") from None
    return out


def _how_searched(metrics: dict[str, Any]) -> str | None:
    """The ``lr_search`` cell of a run: ``None`` (its rate was given), ``"chosen"`` (its search
    chose it), ``"default kept"`` (no trial beat the search's floor, or another rate's did not beat
    the default's by the gain: ``kept_because``) or ``"below the cap"`` (kept, and the default was
    at or above a collapsed trial's rate: the rate just below it)."""
    search = metrics.get("lr_search")
    if not search:
        return None
    if not search.get("kept_default"):
        return "chosen"
    return "default kept" if search.get("lr") == search.get("default_lr") else "below the cap"


def _table(rows: list[dict[str, Any]]) -> tuple[str, str]:
    """Markdown and CSV text of the result rows."""
    def fmt(key: str, value: Any) -> str:
        if value is None:
            return "-"
        if key in ("eval_accuracy", "train_loss"):
            return f"{value:.4f}"
        if key == "eval_perplexity":
            return f"{value:.3f}"
        if key in ("lr", "head_lr"):
            return f"{value:g}"
        if key == "trainable_params":
            return f"{value:,}"
        if key == "peak_memory_mb":
            return f"{value:,.0f}"
        return str(value)

    columns = COLUMNS + tuple(c for c in OPTIONAL_COLUMNS if any(r.get(c) is not None for r in rows))
    md = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(fmt(k, r.get(k)) for k in columns) + " |" for r in rows]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return "\n".join(md) + "\n", buf.getvalue()


COMPARE_CONFIG = "compare_config.json"


def _is_comparison(out: Path) -> bool:
    """Whether ``out`` holds a ``loft compare`` folder (its settings file, or an older table)."""
    return (out / COMPARE_CONFIG).is_file() or (out / "compare.json").is_file()


def _check_folder(out: Path, identity: dict[str, Any], runs: list[tuple[str, FinetuneConfig]], overwrite: bool,
                  resume: bool) -> tuple[dict[str, str], tuple]:
    """Decide, reading only, what happens to ``out`` and to each run's folder in it:
    ``({name: "new" | "done" | "resume" | "restart"}, what out holds now)``. Refuses a folder it
    must not use (another live process's too)."""
    states = _run_states(out, identity, runs, overwrite, resume)
    return states, folder_snapshot(out)  # after the checks (which probe each folder for writing)


def _run_states(out: Path, identity: dict[str, Any], runs: list[tuple[str, FinetuneConfig]], overwrite: bool,
                resume: bool) -> dict[str, str]:
    if is_new_output_dir(out, overwrite=overwrite, resume=resume, holds="comparison"):
        return {name: "new" for name, _ in runs}
    if not _is_comparison(out):
        raise LoftUsageError(
            f"Output directory {str(out)!r} is not empty and holds no loft comparison (no {COMPARE_CONFIG}); nothing "
            "was changed. Choose another --output-dir" + (" (--overwrite only replaces a loft comparison)." if overwrite else ".")
        )
    check_writable(out)
    if overwrite:
        return {name: "new" for name, _ in runs}
    if not resume:
        raise LoftUsageError(
            f"Output directory {str(out)!r} already holds a comparison; nothing was changed. Continue an interrupted "
            "one with --resume, replace it with --overwrite, or choose another --output-dir."
        )
    try:
        saved = json.loads((out / COMPARE_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LoftUsageError(f"{out / COMPARE_CONFIG} is missing or damaged ({type(e).__name__}); start again with --overwrite.") from None
    diffs = [f"{k}: {saved.get(k)!r} there, {v!r} now" for k, v in identity.items() if saved.get(k) != v]
    if diffs:
        raise LoftUsageError(
            f"Output directory {str(out)!r} holds a comparison with other settings ({'; '.join(diffs[:3])}); nothing was "
            "changed. Give the same options to --resume it, or pass --overwrite to replace it."
        )
    states = {}
    for name, cfg in runs:
        sub = out / name
        if not sub.is_dir() or not listing(sub):
            states[name] = "new"
        elif (sub / METRICS_FILE).is_file() and not (sub / CHECKPOINTS).exists():
            check_output_dir(sub, cfg.identity(), overwrite=False, resume=False)  # the same settings
            states[name] = "done"
        elif latest_checkpoint(sub) is not None or search_progress(sub):  # a checkpoint, or a search (--lr auto)
            check_output_dir(sub, cfg.identity(), overwrite=False, resume=True)  # refuses a damaged checkpoint
            states[name] = "resume"
        else:
            states[name] = "restart"  # interrupted before its first checkpoint
    return states


def _prepare_folder(out: Path, identity: dict[str, Any], overwrite: bool, snapshot: tuple, held: list[RunLock]) -> None:
    """Take ``out``'s lock (appended to ``held``; kept until the comparison ends), empty it for
    ``--overwrite`` and record the comparison's settings (main process only)."""
    try:
        lock = take_output_dir(out, snapshot)
        if lock is not None:
            held.append(lock)
        if overwrite and listing(out):
            print(f"Replacing the comparison in {out} (--overwrite).", flush=True)
            clear_folder(out)
        write_json(out / COMPARE_CONFIG, identity)
    except OSError as e:
        raise LoftUsageError(f"Cannot write to --output-dir {str(out)!r}: {e.strerror or e}.") from None


def _check_request(methods: list[str], ranks: list[int], full: bool, output_dir: str, settings: dict[str, Any]) -> bool:
    """Refuse a comparison that cannot run (unknown method, bad ranks, nothing to compare); whether
    full fine-tuning is in it (not on a quantized base: said even with ``--quiet``)."""
    check_output_option(output_dir, "runs/compare")
    bad = [m for m in methods if m not in ADAPTER_METHODS]
    if bad:
        raise LoftUsageError(
            f"--methods: unknown adapter method {bad[0]!r}; choose from {', '.join(ADAPTER_METHODS)} (full: --full)."
        )
    if full and (settings.get("load_in_4bit") or settings.get("load_in_8bit")):
        full = False  # a quantized base cannot be fully fine-tuned (FinetuneConfig.check_quantization)
        if is_main_process():  # printed even with --quiet: it changes what is compared
            print("Full fine-tuning left out: it cannot train a quantized base (--load-in-4bit / --load-in-8bit).")
    if not ranks or any(r < 1 for r in ranks):
        raise LoftUsageError(f"--ranks must be positive integers, got {ranks}.")
    if not methods and not full:
        raise LoftUsageError("Nothing to compare: give --methods or --full.")
    return full


def run_compare(
    *,
    methods: list[str],
    ranks: list[int],
    full: bool = True,
    output_dir: str = "runs/compare",
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    lrs: dict[str, float] | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Run every (method, rank) pair plus full fine-tuning; write the table and the plot.

    ``settings`` are :class:`FinetuneConfig` fields shared by every run (model, data, steps ...).
    Every input of every run (data, model, layers and ranks, options, the folder) is checked
    before anything is written or trained. ``resume`` keeps the runs an interrupted comparison
    finished, resumes the interrupted one from its checkpoint and runs the rest.
    """

    full = _check_request(methods, ranks, full, output_dir, settings)
    lrs = lrs or {}
    out = Path(output_dir)
    plan = list(dict.fromkeys([(m, r) for m in methods for r in ranks] + ([("full", ranks[0])] if full else [])))
    runs = [
        (run_name(m, r), FinetuneConfig(method=m, rank=r, lr=lrs.get(m), output_dir=str(out / run_name(m, r)),
                                        eval_before=False, **settings))
        for m, r in plan
    ]
    processes = launched_processes()
    for _, cfg in runs:
        cfg.check(processes)
    init_processes()
    # Every input of every run, before anything is written: data and model (loaded once), then
    # each run's layers and rank, its default learning rate (per task) or its search (--lr auto).
    inputs = prepare_inputs(runs[0][1], processes)
    task = inputs.task
    note = default_lr_note(task.kind, [cfg.method for _, cfg in runs if cfg.lr is None])
    if note and is_main_process():
        print(note, flush=True)
    for name, cfg in runs:
        if cfg.method != "full":
            resolve_targets(inputs.model, cfg.target_modules, cfg.rank, set(inputs.fresh))
        if cfg.lr is None:
            cfg.lr = default_lr(cfg.method, task.kind)
        plan_lr_search(cfg, task.kind, task.num_train, run_steps(cfg, task.num_train)[1], default_lr(cfg.method, task.kind))
    del inputs, task
    shared = {k: v for k, v in settings.items() if k != "lr_search_budget" or AUTO_LR in lrs.values()}
    identity = json.loads(json.dumps({"methods": methods, "ranks": ranks, "full": full, "lrs": lrs,
                                      "settings": shared}, default=str))
    states, snapshot = on_main_process(_check_folder, out, identity, runs, overwrite, resume)
    held: list[RunLock] = []
    try:
        with sigterm_as_interrupt():  # SIGTERM: as Ctrl-C
            on_main_process(_prepare_folder, out, identity, overwrite, snapshot, held)
            return _run_all(out, runs, states, settings, lrs, progress)
    except KeyboardInterrupt as e:  # between runs, or while writing the table (Ctrl-C or SIGTERM)
        what, code = interruption(e)
        done = sum((out / name / METRICS_FILE).is_file() for name, _ in runs)
        raise RunInterrupted(
            f"{what}; {done} of {len(runs)} runs in {out} finished and are kept. Continue the comparison with the "
            "same loft compare command plus --resume.", exit_code=code,
        ) from None
    finally:
        for lock in held:
            lock.release()


def _run_all(out: Path, runs, states: dict[str, str], settings: dict[str, Any], lrs: dict[str, float],
             progress: bool) -> dict[str, Any]:
    main = is_main_process()
    progress = progress and main
    t0 = time.perf_counter()
    rows, curves = [], {}
    for i, (name, cfg) in enumerate(runs, 1):
        state = states[name]
        if progress:
            print(f"[{i}/{len(runs)}] {name}" + {"done": " (finished earlier, kept)", "resume": " (resuming)"}.get(state, ""),
                  flush=True)
        if state == "done":
            metrics = json.loads((out / name / METRICS_FILE).read_text())
        else:
            try:
                metrics = finetune(cfg, resume=state == "resume", overwrite=state == "restart", progress=progress)
            except RunInterrupted as e:
                what = re.sub(r"[.;,]? *\(?[Cc]ontinue with the same command plus --resume\)?", "", str(e)).rstrip(". ")
                raise RunInterrupted(
                    f"Run {name}: {what}; {i - 1} of {len(runs)} runs finished and are kept. Continue the comparison "
                    "with the same loft compare command plus --resume.",
                    e.checkpoint,
                    e.exit_code,
                ) from None
        rows.append({**{k: metrics.get(k) for k in COLUMNS + OPTIONAL_COLUMNS}, "lr_search": _how_searched(metrics)})
        curves[name] = metrics["loss_curve"]
    seconds = time.perf_counter() - t0
    markdown, csv_text = _table(rows)
    on_main_process(_write_table, out, rows, curves, markdown, csv_text, seconds, settings, lrs)
    barrier()
    return {"rows": rows, "markdown": markdown, "csv": csv_text, "seconds": seconds}


def _write_table(out: Path, rows: list[dict[str, Any]], curves: dict[str, Any], markdown: str, csv_text: str,
                 seconds: float, settings: dict[str, Any], lrs: dict[str, float]) -> None:
    """The table, the plot and ``compare.json`` (main process); a failed write (a full disk)
    raises :class:`OutputWriteError` saying that the runs are kept."""
    from .plots import plot_compare

    try:
        write_text(out / "compare.md", markdown)
        write_text(out / "compare.csv", csv_text)
        data_name = Path(str(settings.get("data", "movie_sentiment"))).stem
        atomic_write(out / "compare.png", lambda tmp: plot_compare(rows, curves, tmp, f"{data_name}: same data, seed and steps"))
        write_json(out / "compare.json", {"rows": rows, "seconds": round(seconds, 1), "settings": {k: v for k, v in settings.items()}, "lrs": lrs}, default=str)
    except Exception as e:
        why = write_failure(e, out)
        if why is None:
            raise
        raise OutputWriteError(
            f"{why} while writing the comparison's table into {str(out)!r}; its {len(rows)} runs are complete and "
            "kept. Make room on that file system, then rerun the same loft compare command plus --resume."
        ) from None
