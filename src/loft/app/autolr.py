"""``--lr auto``: a run's learning rate chosen by a short search before it trains.

The search is :func:`loft.find_lr` (successive halving over the lattice ``1e-4 * 2**k`` around the
method's default, docs/workflow.md "--lr auto"); this module gives it its trials. Each trial is a
short run of the same settings (:func:`loft.app.finetune.finetune`, handed in as ``run``: same
model, method, rank, layers, batch, seed and schedule, compressed to the trial's steps) on the
training data minus a validation split carved from it, scored on that split: accuracy, ties by
loss (loss alone where the task has no accuracy: instruction data with long answers). The eval
data (``--eval-data``, the built-in test split or the 10% held out) is never seen. The run itself
then trains on all its training data at the chosen rate, exactly as ``--lr <that rate>`` would.

The floor (:class:`loft.lr_search.Floor`): where the task scores accuracy, the best trial must
beat always giving the validation split's most frequent answer by two standard errors; otherwise
the trials did not learn enough to be ranked (short trials with a fresh classification head stay
at chance) and the run keeps the method's default rate, and says so.

What the run folder holds while it searches::

    lr_search.json       the search so far (its plan, budget, validation split, every finished
                         trial), rewritten after each trial; complete, with the chosen rate, at the end
    lr_search.png        validation accuracy (or loss) against the learning rate, one line per rung
    lr_search/           scratch, removed when the search is complete: train.jsonl and val.jsonl (the
                         split) and trial-<lr>-<steps>/, the run folder of the trial under way

Ctrl-C or SIGTERM during a trial saves that trial's checkpoint (as in any run); ``--resume`` keeps
every finished trial, resumes that one and runs the rest, and chooses what an uninterrupted search
chooses (every trial is a deterministic run of its settings).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path
from collections.abc import Callable
from typing import Any

from .. import lr_search as core
from .atomic import atomic_write, write_failure, write_json, write_text
from .config import AUTO_LR, FinetuneConfig
from .errors import LoftUsageError, OutputWriteError, RunInterrupted, Terminated
from .launch import barrier, is_main_process
from .rundir import LR_SEARCH_DIR, LR_SEARCH_FILE, latest_checkpoint

__all__ = ["LR_SEARCH_PLOT", "MIN_VALIDATION", "VAL_FRACTION", "VAL_MOST", "plan_lr_search", "search_lr", "summary",
           "validation_size"]

#: the plot of the search, beside lr_search.json
LR_SEARCH_PLOT = "lr_search.png"
#: the validation split: this fraction of the training examples ...
VAL_FRACTION = 0.1
#: ... at most this many per task (each trial evaluates all of it: generation and per-choice
#: scoring cost more than a classifier's forward pass) ...
VAL_MOST = {"classification": 500, "multiple_choice": 200, "instruction": 200}
#: ... and at least this many (fewer training examples: the search is refused)
MIN_VALIDATION = 10


def validation_size(kind: str, num_train: int) -> int:
    """Examples of the validation split carved from ``num_train`` training examples."""
    return min(VAL_MOST[kind], round(VAL_FRACTION * num_train))


def plan_lr_search(cfg: FinetuneConfig, kind: str, num_train: int, run_steps: int,
                   default: float) -> core.SearchPlan | None:
    """The search ``--lr auto`` will make for a run of ``run_steps`` steps on ``num_train``
    examples of a ``kind`` task whose default rate is ``default`` (``None`` without ``--lr auto``).
    Refuses, before anything is written, data too small to carve a validation split from and a
    budget too small for the search."""
    if cfg.lr != AUTO_LR:
        return None
    if validation_size(kind, num_train) < MIN_VALIDATION:
        need = math.ceil((MIN_VALIDATION - 0.5) / VAL_FRACTION)
        raise LoftUsageError(
            f"--lr auto scores its trials on {100 * VAL_FRACTION:g}% of the training examples, carved out, and needs at "
            f"least {MIN_VALIDATION} there: give at least {need} training examples (this data has {num_train}), or "
            "give --lr a number."
        )
    try:
        return core.plan_search(default, run_steps, cfg.lr_search_budget, cfg.lr_search_points)
    except core.SearchTooSmall as e:
        fraction = math.ceil(100 * e.needed_steps / run_steps) / 100
        raise LoftUsageError(
            f"--lr auto: {e}. Give --lr-search-budget {fraction:g} (or more), or at least "
            f"{math.ceil(e.needed_steps / cfg.lr_search_budget)} steps (--max-steps), or give --lr a number."
        ) from None


# ----------------------------------------------------------------------------- the record
def _read_record(out: Path, plan: core.SearchPlan, validation: dict[str, Any]) -> core.LRSearch | None:
    """The search an earlier attempt left in ``out`` when it is this one (same plan and split)."""
    try:
        record = json.loads((out / LR_SEARCH_FILE).read_text(encoding="utf-8"))
        done = core.LRSearch.from_dict(record)
    except (OSError, ValueError):
        return None
    if done.plan != plan or record.get("validation", {}).get("indices") != validation["indices"]:
        return None
    return done


def _record(search: core.LRSearch, cfg: FinetuneConfig, validation: dict[str, Any]) -> dict[str, Any]:
    """What ``lr_search.json`` holds: the search's own record and what it ran on."""
    return {**search.as_dict(), "method": cfg.method, "rank": None if cfg.method == "full" else cfg.rank,
            "seed": cfg.seed, "metric": "eval_accuracy", "loss": "eval_loss", "validation": validation}


def _write(path: Path, write: Callable[[], None]) -> None:
    try:
        write()
    except Exception as e:
        why = write_failure(e, path.parent)
        if why is None:
            raise
        raise OutputWriteError(f"{why} while writing {path.name}") from None


def summary(search: core.LRSearch, validation: dict[str, Any]) -> dict[str, Any]:
    """The search in ``metrics.json`` (``lr_search``): the choice and its cost (details in lr_search.json)."""
    best = search.best
    return {"lr": search.lr, "rule": search.rule, "kept_default": search.kept_default,
            "kept_because": search.kept_because, "min_gain": search.min_gain, "cap_lr": search.cap_lr,
            "best_lr": best.lr if best else None,
            "floor": None if search.floor is None else search.floor.threshold,
            "default_lr": search.plan.default_lr, "lrs": search.plan.lrs,
            "trials": len(search.trials), "steps": search.steps_done, "budget_steps": search.plan.budget_steps,
            "budget": search.plan.budget, "run_steps": search.plan.run_steps,
            "val_accuracy": best.metric if best else None, "val_loss": best.loss if best else None,
            "validation_examples": validation["examples"], "seconds": search.as_dict()["seconds"],
            "record": LR_SEARCH_FILE}


# ----------------------------------------------------------------------------- the split
def _split(cfg: FinetuneConfig, kind: str
           ) -> tuple[list[dict[str, Any]], list[int], dict[str, Any], core.Floor | None]:
    """The run's training records, the indices the trials train on, the validation split's
    description for the record (its indices among the records), drawn with ``--seed`` so that
    every attempt of the run carves the same split, and the search's floor on that split
    (``None`` where the task scores no accuracy)."""
    from .load import split_data
    from .tasks import make_task

    data = split_data(cfg)
    records = data.train_records
    labels = [r.get("label") for r in records] if kind == "classification" else None
    train, val = core.split_indices(len(records), VAL_FRACTION, VAL_MOST[kind], cfg.seed, labels)
    answers = make_task([records[i] for i in train], data.train_path, [records[i] for i in val],
                        data.train_path).eval_answers()
    floor = core.Floor.majority(answers) if answers else None
    return records, train, {"examples": len(val), "of": len(records), "seed": cfg.seed, "fraction": VAL_FRACTION,
                            "from": "the run's training examples (never its eval data)", "indices": val}, floor


def _write_split(scratch: Path, records: list[dict[str, Any]], train: list[int], val: list[int]) -> None:
    """``scratch/train.jsonl`` and ``scratch/val.jsonl``, the trials' data (main process)."""
    scratch.mkdir(parents=True, exist_ok=True)
    for name, idx in (("train.jsonl", train), ("val.jsonl", val)):
        text = "".join(json.dumps({k: v for k, v in records[i].items() if k != "_line"}, ensure_ascii=False) + "\n"
                       for i in idx)
        _write(scratch / name, lambda name=name, text=text: write_text(scratch / name, text))


def _trial_dir(scratch: Path, lr: float, steps: int) -> Path:
    return scratch / f"trial-{lr:g}-{steps}"


# ----------------------------------------------------------------------------- the search
def search_lr(cfg: FinetuneConfig, plan: core.SearchPlan, *, out: Path, kind: str, model: str, progress: bool,
              run: Callable[..., dict[str, Any]]) -> tuple[core.LRSearch, dict[str, Any]]:
    """Run (or continue, or read back) the search ``plan`` of run ``cfg`` whose folder is ``out``
    (ready and locked); ``run`` is :func:`loft.app.finetune.finetune`. Returns the complete
    search and the ``metrics.json`` summary. A Ctrl-C / SIGTERM in a trial is raised again as a
    ``KeyboardInterrupt`` / ``Terminated`` once the trial has kept its checkpoint."""
    from tqdm.auto import tqdm

    scratch = out / LR_SEARCH_DIR
    records, train, validation, floor = _split(cfg, kind)
    done = _read_record(out, plan, validation)
    finished = done is not None and done.complete
    main = is_main_process()
    if main and not finished:
        _write_split(scratch, records, train, validation["indices"])
    del records
    barrier()  # the split is written before any rank trains on it
    if main:
        print(_announcement(cfg, plan, validation, done, floor), flush=True)
    bar = tqdm(total=plan.steps, initial=done.steps_done if done else 0, desc="lr search", unit="step",
               dynamic_ncols=True, disable=not (progress and main) or finished)

    def train_and_score(lr: float, steps: int) -> dict[str, float | None]:
        folder = _trial_dir(scratch, lr, steps)
        bar.set_postfix(lr=f"{lr:g}", steps=steps)
        trial = dataclasses.replace(
            cfg, model=model, data=str(scratch / "train.jsonl"), eval_data=str(scratch / "val.jsonl"), lr=lr,
            max_steps=steps, epochs=None, max_eval=None, output_dir=str(folder), eval_before=False, lr_trial=True)
        resume = latest_checkpoint(folder) is not None
        try:
            metrics = run(trial, resume=resume, overwrite=not resume, progress=False, callbacks=[_bar_callback(bar)])
        except RunInterrupted as e:  # its checkpoint is kept: --resume continues the trial
            raise (Terminated() if e.exit_code == 143 else KeyboardInterrupt()) from None
        return {"metric": metrics["eval_accuracy"], "loss": metrics["eval_loss"]}

    def keep(search: core.LRSearch) -> None:
        """After each trial: the record rewritten, the trial's folder removed (main process)."""
        if main:
            last = search.trials[-1]
            _write(out / LR_SEARCH_FILE, lambda: write_json(out / LR_SEARCH_FILE, _record(search, cfg, validation)))
            shutil.rmtree(_trial_dir(scratch, last.lr, last.steps), ignore_errors=True)
        barrier()

    try:
        search = core.find_lr(train_and_score, default_lr=plan.default_lr, run_steps=plan.run_steps,
                              budget=plan.budget, points=len(plan.indices), done=done, on_trial=keep, floor=floor,
                              **_checks(cfg, floor))
    finally:
        bar.close()
    if main:
        _finish(out, search, _record(search, cfg, validation), announce=not finished)
    barrier()
    return search, summary(search, validation)


def _checks(cfg: FinetuneConfig, floor: core.Floor | None) -> dict[str, Any]:
    """The gain and the cap the search asks for (``find_lr``'s ``min_gain`` and ``cap``): the run's,
    where the task scores accuracy (it then has a floor: ``Task.eval_answers``); neither where the
    trials are ranked by their loss alone."""
    if floor is None:
        return {"min_gain": 0.0, "cap": False}
    return {"min_gain": cfg.lr_search_min_gain, "cap": cfg.lr_search_cap}


def _announcement(cfg: FinetuneConfig, plan: core.SearchPlan, validation: dict[str, Any],
                  done: core.LRSearch | None, floor: core.Floor | None) -> str:
    """The line printed before the search: what it runs and costs (or that it is already done)."""
    checks = _checks(cfg, floor)
    if done is not None and done.complete:
        done = dataclasses.replace(done, floor=floor, **checks)
        return f"Learning rate {done.lr:g}: the search an earlier attempt of this run finished ({LR_SEARCH_FILE})."
    trusted = ("" if floor is None else
               f" A choice must score above {floor.threshold:.3f} ({floor.what}: {floor.metric:.3f}, plus "
               f"{floor.margin:.3f} of noise), or the default {plan.default_lr:g} is kept.")
    if checks["min_gain"]:
        trusted += (f" A rate other than the default's must beat the default's trial in the last rung by at least "
                    f"{checks['min_gain']:g}, or the default is kept.")
    if checks["cap"]:
        trusted += (" No rate is chosen at or above one whose trial falls to the floor while a lower rate's "
                    "learned (a collapse).")
    return (f"Learning-rate search (--lr auto, {cfg.method}): {plan.describe()}; {plan.trials} evaluations on "
            f"{validation['examples']} validation examples carved from the {validation['of']} training examples."
            + trusted
            + (f" Continuing: {len(done.trials)} trials done." if done is not None and done.trials else ""))


def _bar_callback(bar: Any) -> Any:
    """A Trainer callback that moves the search's bar by every step of a trial (a resumed trial's
    earlier steps at its start)."""
    from transformers import TrainerCallback

    class Bar(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs: Any):
            self.last = 0
            self.on_step_end(args, state, control)

        def on_step_end(self, args, state, control, **kwargs: Any):
            bar.update(state.global_step - self.last)
            self.last = state.global_step

    return Bar()


def _finish(out: Path, search: core.LRSearch, record: dict[str, Any], announce: bool) -> None:
    """The complete record and its plot (main process), the scratch folder removed; the choice
    printed (``announce``: a search this attempt finished)."""
    if announce or not (out / LR_SEARCH_PLOT).is_file():
        _write(out / LR_SEARCH_FILE, lambda: write_json(out / LR_SEARCH_FILE, record))
        _write(out / LR_SEARCH_PLOT, lambda: atomic_write(out / LR_SEARCH_PLOT, lambda tmp: _plot(record, tmp)))
    shutil.rmtree(out / LR_SEARCH_DIR, ignore_errors=True)
    if announce:
        print(_choice_line(search), flush=True)


def _choice_line(search: core.LRSearch) -> str:
    """What the run prints once its search is complete: the rate chosen and why, or that the
    default is kept because no trial beat the floor."""
    best = search.best
    score = (f"validation accuracy {best.metric:.4f}, " if best.metric is not None else "") + f"loss {best.loss:.4f}"
    cost = f"{len(search.trials)} trials, {search.steps_done} steps, {search.as_dict()['seconds']:.0f} s"
    capped = ("" if search.cap_lr is None else
              f" Rates from {search.cap_lr:g} up were not chosen: that rate's trial collapsed to the floor while a lower "
              "rate's learned.")
    return _choice_without_cap(search, score, cost) + capped


def _choice_without_cap(search: core.LRSearch, score: str, cost: str) -> str:
    best = search.best
    kept = "the default" if search.lr == search.plan.default_lr else "the rate below the cap, the default's capped"
    if search.kept_because == "gain":
        return (f"Learning rate {search.lr:g} ({kept}) kept: the best trial, {best.lr:g} ({score} at {best.steps} "
                f"steps), beat the default's by less than {search.min_gain:g} ({cost}). {LR_SEARCH_FILE}, "
                f"{LR_SEARCH_PLOT}.")
    if search.kept_default:
        floor = search.floor
        return (f"Learning rate {search.lr:g} ({kept}) kept: no trial scored above {floor.threshold:.3f} "
                f"({floor.what}, plus noise); the best, {best.lr:g}, reached {score} at {best.steps} steps, so "
                f"the trials were too short to tell the rates apart ({cost}). A larger --lr-search-budget gives "
                f"longer trials, but on the tasks measured their choices leaned too high (docs/workflow.md); or give "
                f"--lr a number. {LR_SEARCH_FILE}, {LR_SEARCH_PLOT}.")
    return f"Learning rate {search.lr:g} chosen ({score} at {best.steps} steps; {cost}); {LR_SEARCH_FILE}, {LR_SEARCH_PLOT}."


def _plot(record: dict[str, Any], path: Path) -> None:
    from .plots import plot_lr_search

    plot_lr_search(record, path, f"--lr auto: {record['method']}")
