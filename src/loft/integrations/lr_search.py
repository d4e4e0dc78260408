"""``find_lr_with_trainer``: the learning-rate search of ``loft finetune --lr auto`` for your own
``transformers.Trainer`` runs (the search itself is :func:`loft.find_lr`; this module trains and
scores its trials with a Trainer).

Each trial is a fresh model (``model_init()`` after ``transformers.set_seed(args.seed)``, so every
trial starts where the run starts) trained by ``trainer_class`` with a copy of the run's
``TrainingArguments`` in which only the learning rate and the steps differ (warm-up scaled to the
shorter run, no checkpoints, no evaluation during training), on the training data minus a
validation split carved from it, then scored by ``trainer.evaluate`` on that split.
"""

from __future__ import annotations

import copy
import gc
import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..lr_search import BUDGET, MIN_GAIN, POINTS, Floor, LRSearch, find_lr, plan_search, split_indices

__all__ = ["find_lr_with_trainer"]


def _subset(dataset: Any, indices: list[int]) -> Any:
    """``dataset.select(indices)`` (a 🤗 ``datasets.Dataset``), else a ``torch.utils.data.Subset``."""
    if hasattr(dataset, "select"):
        return dataset.select(indices)
    from torch.utils.data import Subset

    return Subset(dataset, indices)


def _run_steps(args: Any, n_train: int) -> int:
    """The optimizer steps of the run ``args`` describes on ``n_train`` examples."""
    if args.max_steps and args.max_steps > 0:
        return int(args.max_steps)
    per_step = args.train_batch_size * args.gradient_accumulation_steps * args.world_size
    return max(1, math.ceil(args.num_train_epochs * math.ceil(n_train / per_step)))


def _trial_args(args: Any, lr: float, steps: int, run_steps: int, output_dir: str) -> Any:
    """A copy of ``args`` for one trial: ``lr``, ``steps`` steps (an absolute warm-up scaled from
    ``run_steps`` to ``steps``), no checkpoints, no evaluation or reporting during training."""
    trial = copy.deepcopy(args)
    trial.learning_rate = lr
    trial.max_steps = steps
    if trial.warmup_steps >= 1:  # an absolute count (below 1 it is a ratio, which scales by itself)
        trial.warmup_steps = round(trial.warmup_steps * steps / run_steps)
    trial.output_dir = output_dir
    trial.set_save(strategy="no")
    trial.set_evaluate(strategy="no")
    trial.load_best_model_at_end = False
    trial.report_to = []
    trial.disable_tqdm = True
    return trial


def _floor(val_part: Any, label_key: str) -> Floor:
    """:meth:`Floor.majority` of the validation examples' ``label_key`` values (scalars: an int, a
    string, a 0-d tensor)."""
    answers = []
    for i in range(len(val_part)):
        row = val_part[i]
        if label_key not in row:
            raise KeyError(f"label_key={label_key!r}: validation example {i} has no such field (it has {sorted(row)})")
        value = row[label_key]
        if hasattr(value, "ndim") and getattr(value, "ndim") == 0:
            value = value.item()
        if not isinstance(value, (int, str, bool, float)):
            raise TypeError(f"label_key={label_key!r} must name one answer per example (an int or a string), got "
                            f"{type(value).__name__}; token-level labels have no majority answer: leave label_key out")
        answers.append(value)
    return Floor.majority(answers)


def _write_record(path: Path, search: LRSearch) -> None:
    """Write the search's record to ``path`` through a temporary file (a kill leaves the old one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(search.as_dict(), indent=2))
    os.replace(tmp, path)


def _trial_runner(model_init: Callable[[], Any], args: Any, trainer_class: type, train_part: Any, val_part: Any,
                  run_steps: int, metric: str | None, bar: Any, trainer_kwargs: dict[str, Any]
                  ) -> Callable[[float, int], dict[str, float | None]]:
    """``train_and_score(lr, steps)`` for :func:`loft.find_lr`: a fresh ``model_init()`` (after
    ``set_seed(args.seed)``) trained by ``trainer_class`` on ``train_part`` with the trial's copy of
    ``args``, then ``trainer.evaluate()`` on ``val_part``; every step advances ``bar``."""
    from transformers import TrainerCallback, set_seed

    class _Bar(TrainerCallback):
        def on_step_end(self, a, state, control, **kwargs):
            bar.update(1)

    def train_and_score(lr: float, steps: int) -> dict[str, float | None]:
        bar.set_postfix(lr=f"{lr:g}", steps=steps)
        with tempfile.TemporaryDirectory(prefix="loft-lr-trial-") as folder:
            set_seed(args.seed)
            trainer = trainer_class(model=model_init(), args=_trial_args(args, lr, steps, run_steps, folder),
                                    train_dataset=train_part, eval_dataset=val_part, **trainer_kwargs)
            trainer.add_callback(_Bar())
            trainer.train()
            scores = trainer.evaluate()
            del trainer
            gc.collect()
        if metric is not None and metric not in scores:
            raise KeyError(f"trainer.evaluate() gave no {metric!r} (it gave {sorted(scores)}); pass compute_metrics "
                           "that computes it, or metric=None to rank the trials by eval_loss")
        return {"metric": None if metric is None else scores[metric], "loss": scores["eval_loss"]}

    return train_and_score


def find_lr_with_trainer(
    model_init: Callable[[], Any],
    args: Any,
    train_dataset: Any,
    *,
    trainer_class: type | None = None,
    metric: str | None = None,
    val_fraction: float = 0.1,
    max_val: int = 500,
    budget: float = BUDGET,
    points: int = POINTS,
    record: str | Path | None = None,
    progress: bool = True,
    label_key: str | None = None,
    min_gain: float | None = None,
    cap: bool | None = None,
    **trainer_kwargs: Any,
) -> LRSearch:
    """Search the learning rate of the Trainer run ``args`` describes (:func:`loft.find_lr`).

    ``model_init()``: a fresh model (e.g. your ``get_peft_model(...)``), called once per trial
    after ``transformers.set_seed(args.seed)``. ``args``: the run's ``TrainingArguments``; its
    ``learning_rate`` is the centre of the search (7 lattice rates, 1/8 to 8 times it) and its
    steps (``max_steps``, or the epochs over ``train_dataset``) set the budget: the trials take at
    most ``budget`` of them. ``trainer_class``: :class:`loft.integrations.LoFTTrainer` by default
    (any Trainer class, e.g. ``with_loft(SFTTrainer)`` or ``transformers.Trainer`` for a baseline);
    ``trainer_kwargs`` go to it (``data_collator``, ``processing_class``, ``compute_metrics``,
    ``loft_options`` ...). ``metric``: the key of ``trainer.evaluate()``'s result that ranks the
    trials, higher is better (``"eval_accuracy"`` with a ``compute_metrics`` that gives it), ties by
    ``eval_loss``; ``None``: ``eval_loss`` alone. The validation split is ``val_fraction`` of
    ``train_dataset`` (at most ``max_val`` examples, drawn with ``args.seed``); your eval data is
    never used. ``record``: a JSON file that keeps the search as trials finish; an interrupted
    search given the same file continues from it. ``label_key``: the field of ``train_dataset``'s
    examples that holds each one's answer (a classifier's ``"labels"``, say; needs ``metric``): the
    search then keeps ``args.learning_rate`` unless its best trial's ``metric`` beats always giving
    the validation split's most frequent answer (:class:`loft.lr_search.Floor`); without it every
    search ends with its best trial, at chance or not. ``min_gain`` (0: off): a rate other than
    ``args.learning_rate``'s lattice point is chosen only when its last trial beats that point's by at
    least this much of ``metric`` (rule 3 of :mod:`loft.lr_search`); ``None``: ``loft.lr_search.MIN_GAIN``
    (0.01) with a ``metric``, else 0. ``cap`` (needs ``label_key``): never choose a rate at or above
    one whose trial fell to the floor while a lower rate's learned (rule 4); ``None``: on with a
    ``label_key``. So by default the search follows ``loft finetune --lr auto``'s rule
    (``loft.lr_search.AUTO_RULE``) as far as ``metric`` and ``label_key`` allow; ``min_gain=0,
    cap=False`` is rule 2.

    Returns the :class:`loft.lr_search.LRSearch`: ``.lr`` is the chosen rate (then train the run
    on the whole ``train_dataset`` with ``args.learning_rate = search.lr``), ``.as_dict()`` the record.
    """
    from tqdm.auto import tqdm

    if trainer_class is None:
        from .trainer import LoFTTrainer as trainer_class
    if "eval_dataset" in trainer_kwargs:
        raise ValueError("find_lr_with_trainer scores the trials on a split it carves from train_dataset; do not pass "
                         "eval_dataset (your eval data stays for the final run)")
    train_idx, val_idx = split_indices(len(train_dataset), val_fraction, max_val, args.seed)
    if not val_idx:
        raise ValueError(f"val_fraction={val_fraction} of {len(train_dataset)} examples leaves no validation split")
    train_part, val_part = _subset(train_dataset, train_idx), _subset(train_dataset, val_idx)
    if label_key is not None and metric is None:
        raise ValueError("label_key sets a floor for the metric: pass metric (e.g. 'eval_accuracy') too")
    if cap and label_key is None:
        raise ValueError("cap tells a collapsed trial by the floor that label_key sets: pass label_key too")
    min_gain = (MIN_GAIN if metric is not None else 0.0) if min_gain is None else min_gain
    cap = label_key is not None if cap is None else cap
    floor = _floor(val_part, label_key) if label_key is not None else None
    run_steps = _run_steps(args, len(train_dataset))
    path = Path(record) if record is not None else None
    done = LRSearch.from_dict(json.loads(path.read_text())) if path is not None and path.is_file() else None
    plan = plan_search(args.learning_rate, run_steps, budget, points)  # refuses a budget too small, before any trial
    if progress:
        print(f"Learning-rate search: {plan.describe()}; validation: {len(val_idx)} of the {len(train_dataset)} "
              "training examples.", flush=True)
    bar = tqdm(total=plan.steps, initial=done.steps_done if done is not None and done.plan == plan else 0,
               desc="lr search", unit="step", disable=not progress)

    train_and_score = _trial_runner(model_init, args, trainer_class, train_part, val_part, run_steps, metric, bar,
                                    trainer_kwargs)

    def save(search: LRSearch) -> None:
        if path is not None:
            _write_record(path, search)

    try:
        search = find_lr(train_and_score, default_lr=args.learning_rate, run_steps=run_steps, budget=budget,
                         points=points, done=done, on_trial=save, floor=floor, min_gain=min_gain, cap=cap)
    finally:
        bar.close()
    save(search)
    return search
