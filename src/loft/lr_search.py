"""Choosing a learning rate by a short search: successive halving over the lattice ``1e-4 * 2**k``.

:func:`find_lr` is the one implementation behind ``loft finetune --lr auto`` / ``loft compare
--lr auto`` and :func:`loft.integrations.find_lr_with_trainer`; it knows nothing of models or
data. The caller gives ``train_and_score(lr, steps)``: train a fresh copy of the model for
``steps`` steps at learning rate ``lr`` (the run's own recipe, its schedule compressed to those
steps), score it on a validation split carved from the training data (:func:`split_indices`),
and return ``{"metric": higher is better or None, "loss": lower is better}``.

The search (:func:`plan_search`):

* **rates**: ``points`` consecutive rates of the lattice, centred on the lattice point nearest
  the method's default (7 points: from 1/8 to 8 times it);
* **rungs**: every rate trains ``s`` steps; the better half (rounded up) trains again, from the
  start, for ``2 s`` steps; and so on until two rates are left, the last rung. Its better rate
  is the choice. 7 points: 7 trials of ``s`` steps, 4 of ``2 s``, 2 of ``4 s``;
* **budget**: ``s`` is the largest whole number of steps for which all the trials' steps stay
  within ``budget`` (a fraction) of the run's steps; a budget too small for 1-step trials is
  refused (:class:`SearchTooSmall`);
* **ranking**: by the metric, ties by the lower loss; by the loss alone when the caller gives no
  metric; a non-finite value ranks last; equal trials by their distance from the default, then
  the lower rate. So the result is as deterministic as ``train_and_score`` is;
* **the floor** (optional, :class:`Floor`): what a model that learned nothing scores on the
  validation split, e.g. always answering its most frequent label (:meth:`Floor.majority`), plus
  that split's sampling noise. When the best trial of the last rung does not score above it, the
  trials were too short to tell the rates apart (a fresh classification head can stay at chance
  for tens of steps) and their ranking is noise: the search keeps the default rate
  (:attr:`LRSearch.kept_default`) instead of choosing at random;
* **the gain** (optional, ``min_gain``, rule 3): a rate other than the default's lattice point
  is chosen only when its trial in the last rung beats that point's trial there by at least
  ``min_gain`` (e.g. 0.01, one point of accuracy); otherwise the search keeps the default. One
  trial of each rate, at one seed, on a validation split of a few hundred examples, cannot tell
  smaller differences from noise, and a higher rate that wins its trial may still be unstable at
  another seed. Off (0) in :func:`find_lr` unless asked; ``--lr auto`` and
  :func:`loft.integrations.find_lr_with_trainer` ask for :data:`MIN_GAIN`.
* **the cap** (optional, ``cap``, rule 4; needs a floor): a trial *collapsed* when it scores at
  or below the floor although a lower rate's trial in the same rung scores above it (a rate too
  high for the run, as opposed to one too low to have learned yet). No rate at or above the
  lowest collapsed rate is chosen: the choice is the best trial below it in the last rung, or in
  the latest rung that has one; where the search keeps the default and the default is itself at
  or above the cap, it keeps the rate just below the cap instead. Off in :func:`find_lr` unless
  asked; ``--lr auto`` and :func:`loft.integrations.find_lr_with_trainer` ask for it wherever
  they have a floor. Together with the gain it is rule 4, :data:`AUTO_RULE`.

Finished trials can be handed back (``done``: an :class:`LRSearch`, e.g. from
:meth:`LRSearch.from_dict` of a saved record) so that an interrupted search continues where it
stopped. Standard library only.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "AUTO_RULE",
    "CAP_RULE",
    "Floor",
    "GAIN_RULE",
    "LRSearch",
    "MIN_GAIN",
    "Rung",
    "SearchPlan",
    "SearchTooSmall",
    "Trial",
    "find_lr",
    "lattice",
    "lattice_index",
    "plan_search",
    "search_units",
    "split_indices",
]

#: what every record says the search is
METHOD = "successive halving over the lattice 1e-4 * 2**k"
#: how the trials become a choice (in every record: records of an earlier rule chose differently). Rule 1
#: was the best trial of the last rung, whatever it scored; rule 2 adds the floor; rule 3 (a search with a
#: ``min_gain``, :data:`GAIN_RULE`) adds the gain a move away from the default must show; rule 4 (a search
#: with ``cap``, :data:`CAP_RULE`) adds the cap, with or without the gain. A search's own rule is
#: :attr:`LRSearch.rule`; this is the rule of a search without ``min_gain`` or ``cap`` (``--lr auto``'s until
#: rule 4 was adopted).
RULE = 2
GAIN_RULE = 3
CAP_RULE = 4
#: the rule of ``--lr auto`` and :func:`loft.integrations.find_lr_with_trainer` (where they have a floor): rule 4,
#: the gain :data:`MIN_GAIN` and the cap. Adopted because its pre-registered test (benchmarks/lr_defaults.py,
#: arm ``auto_cap``, docs/results.md section 5) met the target on every pair it ran on.
AUTO_RULE = CAP_RULE
#: the gain ``--lr auto`` asks of a move from the default (rule 3's ``min_gain``): one point of validation
#: accuracy, the evidence's own tolerance
MIN_GAIN = 0.01
#: the default number of lattice points (1/8 to 8 times the default rate)
POINTS = 7
#: the default budget: at most this fraction of the run's steps
BUDGET = 0.25


def lattice(k: int) -> float:
    """The k-th learning rate of the lattice ``1e-4 * 2**k``, to 3 significant digits (so that a
    rate written to JSON and read back is the same number): ..., 5e-5, 1e-4, 2e-4, 4e-4, 8e-4, 1.6e-3 ..."""
    return float(f"{1e-4 * 2.0 ** k:.3g}")


def lattice_index(lr: float) -> int:
    """The index of the lattice point nearest ``lr`` (on a log scale)."""
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"a learning rate must be > 0 and finite, got {lr}")
    return round(math.log2(lr / 1e-4))


class SearchTooSmall(ValueError):
    """The budget does not pay for the smallest search (1-step trials); the message says why."""

    def __init__(self, message: str, needed_steps: int) -> None:
        super().__init__(message)
        self.needed_steps = needed_steps  # training steps of the smallest search


@dataclass(frozen=True)
class Rung:
    """One round of the search: ``trials`` rates, each trained ``steps`` steps."""

    trials: int
    steps: int


def _rung_sizes(points: int) -> list[int]:
    """Rates per rung: ``points``, then half of the previous (rounded up), down to 2 (7 -> 4 -> 2)."""
    sizes = [points]
    while sizes[-1] > 2:
        sizes.append(math.ceil(sizes[-1] / 2))
    return sizes


def search_units(points: int = POINTS) -> int:
    """Training steps of the smallest search over ``points`` rates (1-step trials at rung 0):
    ``sum(trials * 2**rung)``, e.g. 7 + 4 x 2 + 2 x 4 = 23 for 7 points."""
    return sum(n * 2**i for i, n in enumerate(_rung_sizes(points)))


@dataclass(frozen=True)
class SearchPlan:
    """What a search will do, fixed before it starts: its rates, rungs and budget."""

    default_lr: float
    indices: tuple[int, ...]  # lattice indices of the rates, ascending
    rungs: tuple[Rung, ...]
    run_steps: int  # the steps of the run whose learning rate is searched
    budget: float  # at most this fraction of run_steps

    @property
    def lrs(self) -> list[float]:
        return [lattice(k) for k in self.indices]

    @property
    def budget_steps(self) -> int:
        """The most training steps the search may take."""
        return math.floor(self.budget * self.run_steps + 1e-9)

    @property
    def steps(self) -> int:
        """The training steps the search takes (all trials): at most :attr:`budget_steps`."""
        return sum(r.trials * r.steps for r in self.rungs)

    @property
    def trials(self) -> int:
        return sum(r.trials for r in self.rungs)

    def describe(self) -> str:
        """One line: what the search runs and costs."""
        lrs = self.lrs
        rungs = " -> ".join(str(r.trials) for r in self.rungs)
        steps = ", ".join(str(r.steps) for r in self.rungs)
        return (f"{len(lrs)} learning rates {lrs[0]:g} ... {lrs[-1]:g} around {self.default_lr:g}, successive halving "
                f"{rungs} trials of {steps} steps: {self.trials} trials, {self.steps} training steps "
                f"({100 * self.steps / self.run_steps:.0f}% of the run's {self.run_steps}; budget "
                f"{100 * self.budget:g}% = {self.budget_steps})")

    def as_dict(self) -> dict[str, Any]:
        return {"default_lr": self.default_lr, "lrs": self.lrs, "rungs": [r.__dict__.copy() for r in self.rungs],
                "run_steps": self.run_steps, "budget": self.budget, "budget_steps": self.budget_steps,
                "steps": self.steps}


def plan_search(default_lr: float, run_steps: int, budget: float = BUDGET, points: int = POINTS) -> SearchPlan:
    """The search for a run of ``run_steps`` steps whose usual rate is ``default_lr``:
    ``points`` lattice rates around it, trials as long as ``budget`` (a fraction of
    ``run_steps``) allows. Raises :class:`SearchTooSmall` when 1-step trials exceed the budget,
    ``ValueError`` for arguments out of range."""
    if not isinstance(points, int) or points < 2:
        raise ValueError(f"a search needs at least 2 learning rates, got points={points!r}")
    if not isinstance(run_steps, int) or run_steps < 1:
        raise ValueError(f"run_steps must be a positive integer, got {run_steps!r}")
    if not (budget > 0 and math.isfinite(budget)):
        raise ValueError(f"the budget must be a fraction > 0 of the run's steps, got {budget!r}")
    centre = lattice_index(default_lr)
    first = centre - (points - 1) // 2
    indices = tuple(range(first, first + points))
    units = search_units(points)
    allowed = math.floor(budget * run_steps + 1e-9)
    s = allowed // units
    if s < 1:
        raise SearchTooSmall(
            f"a search over {points} learning rates takes at least {units} training steps (trials of 1, 2, 4 ... steps), "
            f"but the budget, {100 * budget:g}% of the run's {run_steps} steps, is {allowed}", units)
    rungs = tuple(Rung(n, s * 2**i) for i, n in enumerate(_rung_sizes(points)))
    return SearchPlan(default_lr=default_lr, indices=indices, rungs=rungs, run_steps=run_steps, budget=budget)


@dataclass(frozen=True)
class Trial:
    """One trained and scored rate: its rung, rate, steps, the caller's score, and the seconds
    ``train_and_score`` took (not part of the decision)."""

    rung: int
    lr: float
    steps: int
    metric: float | None
    loss: float
    seconds: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"rung": self.rung, "lr": self.lr, "steps": self.steps, "metric": self.metric, "loss": self.loss,
                "seconds": self.seconds}


def _finite(x: float | None) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


@dataclass(frozen=True)
class Floor:
    """The metric a trial must beat for the search to trust its ranking: ``metric``, what a model
    that learned nothing scores on the validation split, plus ``margin``, the split's sampling
    noise there; ``what`` says in words what ``metric`` is."""

    metric: float
    margin: float
    what: str

    @property
    def threshold(self) -> float:
        """A trial is trusted when its metric is above this: ``metric + margin``."""
        return self.metric + self.margin

    @classmethod
    def majority(cls, answers: Sequence[Any]) -> Floor:
        """The accuracy of always giving the most frequent of ``answers`` (the validation split's
        reference answers, any hashable values), with a margin of two standard errors of a
        proportion, ``2 sqrt(p (1 - p) / n)`` (0.045 at p = 0.5 on 500 examples)."""
        if not answers:
            raise ValueError("a floor needs at least one validation answer")
        return cls.of_majority(max(Counter(answers).values()), len(answers))

    @classmethod
    def of_majority(cls, count: int, n: int) -> Floor:
        """:meth:`majority` from its counts: ``count`` of the ``n`` validation answers are the most
        frequent one."""
        if not 0 < count <= n:
            raise ValueError(f"the most frequent answer's count must be in 1..{n} (the number of answers), not {count}")
        p = count / n
        return cls(metric=p, margin=2 * math.sqrt(p * (1 - p) / n),
                   what=f"always giving the most frequent answer of the {n} validation examples")

    def as_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "margin": self.margin, "threshold": self.threshold, "what": self.what}

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> Floor:
        return cls(float(record["metric"]), float(record["margin"]), str(record["what"]))


@dataclass
class LRSearch:
    """A search and its trials so far: :attr:`lr` is its choice once :attr:`complete`; ``floor``
    (optional) what its best trial must beat to be chosen; ``min_gain`` (0: off) how much a trial
    must beat the default's in the last rung for its rate to be chosen instead (rule 3); ``cap``
    whether rates at or above a collapsed trial's are never chosen (rule 4, :attr:`cap_lr`)."""

    plan: SearchPlan
    trials: list[Trial] = field(default_factory=list)
    floor: Floor | None = None
    min_gain: float = 0.0
    cap: bool = False

    @property
    def rule(self) -> int:
        """The rule the choice follows: :data:`CAP_RULE` with ``cap``, :data:`GAIN_RULE` with a
        ``min_gain``, else :data:`RULE`."""
        return CAP_RULE if self.cap else GAIN_RULE if self.min_gain > 0 else RULE

    def rank_key(self, trial: Trial) -> tuple:
        """Higher is better: the metric (non-finite last), ties by the lower loss (non-finite
        last), then the rate nearer the default, then the lower rate."""
        metric = trial.metric if _finite(trial.metric) else -math.inf
        loss = -trial.loss if _finite(trial.loss) else -math.inf
        centre = lattice_index(self.plan.default_lr)
        return metric, loss, -abs(lattice_index(trial.lr) - centre), -trial.lr

    def rung_trials(self, rung: int) -> list[Trial]:
        return [t for t in self.trials if t.rung == rung]

    def rates_of(self, rung: int) -> list[float] | None:
        """The rates rung ``rung`` trains (ascending); ``None`` while the rung before is unfinished."""
        if rung == 0:
            return self.plan.lrs
        before = self.rung_trials(rung - 1)
        if len(before) < self.plan.rungs[rung - 1].trials:
            return None
        best = sorted(before, key=self.rank_key, reverse=True)[: self.plan.rungs[rung].trials]
        return sorted(t.lr for t in best)

    @property
    def complete(self) -> bool:
        last = len(self.plan.rungs) - 1
        return len(self.rung_trials(last)) == self.plan.rungs[last].trials

    def _above_floor(self, trial: Trial) -> bool:
        return self.floor is not None and _finite(trial.metric) and trial.metric > self.floor.threshold

    @property
    def cap_lr(self) -> float | None:
        """With ``cap``: the lowest rate whose trial collapsed (scored at or below the floor while a
        lower rate's trial of its rung scored above it), in any rung so far; else ``None``."""
        if not self.cap or self.floor is None:
            return None
        collapsed = [t.lr for i in range(len(self.plan.rungs)) for t in self.rung_trials(i) if not self._above_floor(t)
                     and any(u.lr < t.lr and self._above_floor(u) for u in self.rung_trials(i))]
        return min(collapsed, default=None)

    @property
    def best(self) -> Trial | None:
        """The chosen trial: the best of the last rung (``None`` until the search is complete);
        under a cap (:attr:`cap_lr`), the best below it of the latest rung that has one."""
        if not self.complete:
            return None
        cap = self.cap_lr
        for i in reversed(range(len(self.plan.rungs))):
            allowed = [t for t in self.rung_trials(i) if cap is None or t.lr < cap]
            if allowed:
                return max(allowed, key=self.rank_key)
        return None  # unreachable: a cap needs a lower rate's trial in its rung

    @property
    def fallback_lr(self) -> float:
        """The rate a search keeps instead of choosing: the default, or under a cap at or below it
        the lattice rate just below the cap."""
        cap = self.cap_lr
        if cap is None or self.plan.default_lr < cap:
            return self.plan.default_lr
        return lattice(lattice_index(cap) - 1)

    @property
    def kept_because(self) -> str | None:
        """Why the search keeps the default rate: ``"floor"`` (its best trial did not score above
        the floor), ``"gain"`` (the best trial's rate is not the default's lattice point and beat
        that point's trial in the last rung by less than ``min_gain``), or ``None`` (it does not
        keep it, or is not complete). Neither applies without a metric."""
        best = self.best
        if best is None or best.metric is None:
            return None
        if self.floor is not None and not (_finite(best.metric) and best.metric > self.floor.threshold):
            return "floor"
        if self.min_gain > 0:
            centre = lattice_index(self.plan.default_lr)
            at_default = [t for t in self.rung_trials(best.rung) if lattice_index(t.lr) == centre and _finite(t.metric)]
            if self.cap_lr is not None and self.plan.default_lr >= self.cap_lr:
                at_default = []  # the default is capped: no gain over it is asked
            gain = best.metric - at_default[0].metric if at_default else math.inf
            if lattice_index(best.lr) != centre and gain < self.min_gain - 1e-9:  # a gain of exactly min_gain moves
                return "gain"
        return None

    @property
    def kept_default(self) -> bool | None:
        """Whether the search keeps the default rate (:attr:`kept_because` says why; ``None``
        until complete; ``False`` without a floor and a ``min_gain``, or without a metric)."""
        if self.best is None:
            return None
        return self.kept_because is not None

    @property
    def lr(self) -> float | None:
        """The chosen learning rate (``None`` until the search is complete): the best trial's, or
        where :attr:`kept_default` the plan's default (:attr:`fallback_lr` under a cap at or below it)."""
        best = self.best
        if best is None:
            return None
        return self.fallback_lr if self.kept_default else best.lr

    @property
    def scored_by(self) -> str:
        has_metric = any(t.metric is not None for t in self.trials)
        return "the metric, ties by the lower loss" if has_metric or not self.trials else "the loss (no metric given)"

    @property
    def steps_done(self) -> int:
        return sum(t.steps for t in self.trials)

    def as_dict(self) -> dict[str, Any]:
        """The record of the search (what ``lr_search.json`` holds); :meth:`from_dict` reads it back."""
        best = self.best
        return {"search": METHOD, "rule": self.rule, **self.plan.as_dict(),
                "trials": [t.as_dict() for t in self.trials],
                "complete": self.complete, "lr": self.lr, "best_lr": None if best is None else best.lr,
                "kept_default": self.kept_default, "kept_because": self.kept_because, "min_gain": self.min_gain,
                "cap": self.cap, "cap_lr": self.cap_lr,
                "floor": None if self.floor is None else self.floor.as_dict(),
                "scored_by": self.scored_by, "seconds": round(sum(t.seconds or 0.0 for t in self.trials), 1)}

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> LRSearch:
        """A search from its record (:meth:`as_dict`); ``ValueError`` for a record that is not one."""
        try:
            plan = SearchPlan(default_lr=float(record["default_lr"]),
                              indices=tuple(lattice_index(float(x)) for x in record["lrs"]),
                              rungs=tuple(Rung(int(r["trials"]), int(r["steps"])) for r in record["rungs"]),
                              run_steps=int(record["run_steps"]), budget=float(record["budget"]))
            trials = [Trial(int(t["rung"]), float(t["lr"]), int(t["steps"]),
                            None if t["metric"] is None else float(t["metric"]), float(t["loss"]), t.get("seconds"))
                      for t in record["trials"]]
            floor = None if record.get("floor") is None else Floor.from_dict(record["floor"])
            min_gain = float(record.get("min_gain") or 0.0)
            cap = bool(record.get("cap", False))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a learning-rate search record ({type(e).__name__}: {e})") from None
        return cls(plan, trials, floor, min_gain, cap)


def _score(result: Any, lr: float, steps: int) -> tuple[float | None, float]:
    """``train_and_score``'s answer as ``(metric, loss)``."""
    if not isinstance(result, Mapping) or "loss" not in result:
        raise TypeError(f"train_and_score({lr:g}, {steps}) must return a mapping with 'loss' (lower is better) and "
                        f"optionally 'metric' (higher is better), got {result!r}")
    metric = result.get("metric")
    return (None if metric is None else float(metric)), float(result["loss"])


def find_lr(
    train_and_score: Callable[[float, int], Mapping[str, float | None]],
    *,
    default_lr: float,
    run_steps: int,
    budget: float = BUDGET,
    points: int = POINTS,
    done: LRSearch | None = None,
    on_trial: Callable[[LRSearch], None] | None = None,
    floor: Floor | None = None,
    min_gain: float = 0.0,
    cap: bool = False,
) -> LRSearch:
    """Search a learning rate by successive halving (the module's docstring): returns the
    :class:`LRSearch`, whose ``lr`` is the choice and whose ``as_dict()`` is its record.

    ``train_and_score(lr, steps)`` trains a fresh model ``steps`` steps at ``lr`` and returns
    ``{"metric": float | None, "loss": float}`` on a validation split (never the test data).
    ``done``: a search of the same plan interrupted earlier; its trials are reused, not rerun
    (``ValueError`` when it was planned differently). ``on_trial(search)`` runs after every new
    trial (save the record there to make the search resumable). ``floor``: what the best trial's
    metric must beat to be chosen (:class:`Floor`); below it the search keeps ``default_lr``.
    ``min_gain`` (rule 3; 0: off): how much the best trial of the last rung must beat the trial
    of the default's lattice point there, when both ran, for its rate to be chosen; else the
    search keeps ``default_lr``. ``cap`` (rule 4; needs ``floor``): never choose a rate at or
    above the lowest one whose trial collapsed (:attr:`LRSearch.cap_lr`). ``done``'s trials are
    reused whatever its floor, gain and cap were: they decide, they train nothing."""
    if not (min_gain >= 0 and math.isfinite(min_gain)):
        raise ValueError(f"min_gain must be >= 0 and finite, got {min_gain!r}")
    plan = plan_search(default_lr, run_steps, budget, points)
    if done is not None and done.plan != plan:
        raise ValueError(f"the saved search was planned differently ({done.plan.describe()}) from this one "
                         f"({plan.describe()}); start a new record")
    if cap and floor is None:
        raise ValueError("cap needs a floor: a collapse is a trial at or below the floor")
    search = LRSearch(plan, [], floor, min_gain, cap)
    earlier = {(t.rung, t.lr, t.steps): t for t in (done.trials if done is not None else [])}
    for i, rung in enumerate(plan.rungs):
        rates = search.rates_of(i)
        assert rates is not None  # the rung before is complete
        for lr in rates:
            trial = earlier.get((i, lr, rung.steps))
            if trial is None:
                t0 = time.perf_counter()
                metric, loss = _score(train_and_score(lr, rung.steps), lr, rung.steps)
                trial = Trial(i, lr, rung.steps, metric, loss, round(time.perf_counter() - t0, 2))
                search.trials.append(trial)
                if on_trial is not None:
                    on_trial(search)
            else:
                search.trials.append(trial)
    return search


def split_indices(n: int, fraction: float, most: int, seed: int,
                  labels: Sequence[Any] | None = None) -> tuple[list[int], list[int]]:
    """``(train, validation)`` indices of ``n`` examples (each list ascending): a validation split
    of ``min(most, round(fraction * n))`` examples drawn with ``random.Random(seed)``. With
    ``labels`` (a classification's), a validation example whose label no training example has
    goes back to training, so that a trial never meets a class it could not learn."""
    n_val = min(most, round(fraction * n))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val, train = order[:n_val], order[n_val:]
    if labels is not None:
        seen = {labels[i] for i in train}
        back = [i for i in val if labels[i] not in seen]
        val = [i for i in val if labels[i] in seen]
        train += back
    return sorted(train), sorted(val)
