"""The learning-rate search (loft/lr_search.py, ``loft.find_lr``): its plan and budget, successive
halving's choices, ranking, resuming, determinism and the validation split, on synthetic scores
(no model)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

import loft
from loft import lr_search

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_lattice_is_the_benchmarks_lattice():
    import _protocol

    assert [lr_search.lattice(k) for k in range(-3, 6)] == [1.25e-5, 2.5e-5, 5e-5, 1e-4, 2e-4, 4e-4, 8e-4, 1.6e-3, 3.2e-3]
    assert _protocol.lattice is lr_search.lattice  # one definition
    assert [lr_search.lattice_index(x) for x in (2e-4, 2.5e-4, 1e-3, 8e-3, 1e-4)] == [1, 1, 3, 6, 0]
    with pytest.raises(ValueError, match="> 0 and finite"):
        lr_search.lattice_index(0.0)


@pytest.mark.parametrize("points", [2, 3, 5, 7, 8])
def test_the_plan_spends_at_most_the_budget_with_the_longest_trials_it_can(points):
    for run_steps in (23, 40, 100, 399, 400, 1000, 7777):
        for budget in (0.1, 0.25, 0.5, 1.0, 3.0):
            allowed = math.floor(budget * run_steps + 1e-9)
            units = lr_search.search_units(points)
            if allowed < units:
                with pytest.raises(lr_search.SearchTooSmall) as e:
                    lr_search.plan_search(2e-4, run_steps, budget, points)
                assert e.value.needed_steps == units
                continue
            plan = lr_search.plan_search(2e-4, run_steps, budget, points)
            sizes = [r.trials for r in plan.rungs]
            assert sizes[0] == points and sizes[-1] == min(2, points)
            assert all(b == math.ceil(a / 2) for a, b in zip(sizes, sizes[1:]))  # the better half, rounded up
            s = plan.rungs[0].steps
            assert [r.steps for r in plan.rungs] == [s * 2**i for i in range(len(plan.rungs))]
            assert plan.steps <= plan.budget_steps == allowed  # within the budget ...
            assert (s + 1) * units > allowed  # ... with the longest first trials it allows
            assert plan.steps == s * units and plan.trials == sum(sizes)


def test_the_rates_are_lattice_points_around_the_default():
    plan = lr_search.plan_search(2e-4, 400)
    assert plan.lrs == [2.5e-5, 5e-5, 1e-4, 2e-4, 4e-4, 8e-4, 1.6e-3]  # 1/8 to 8 times the default
    assert [(r.trials, r.steps) for r in plan.rungs] == [(7, 4), (4, 8), (2, 16)]
    assert plan.steps == 92 and plan.budget_steps == 100
    assert "92 training steps (23% of the run's 400; budget 25% = 100)" in plan.describe()
    assert lr_search.plan_search(2.5e-4, 400).lrs == plan.lrs  # LoRA+'s default: the nearest lattice point
    assert lr_search.plan_search(2e-3, 400, points=5).lrs == [4e-4, 8e-4, 1.6e-3, 3.2e-3, 6.4e-3]
    with pytest.raises(lr_search.SearchTooSmall, match="at least 23 training steps .* is 10"):
        lr_search.plan_search(2e-4, 40)
    for bad in (dict(points=1), dict(budget=0.0), dict(budget=math.nan), dict(run_steps=0)):
        with pytest.raises(ValueError):
            lr_search.plan_search(**{"default_lr": 2e-4, "run_steps": 400, **bad})


class Objective:
    """Synthetic validation scores: accuracy peaks at lattice index ``peak`` (horizon ``steps``
    moves the peak by ``drift`` per doubling: the short-horizon bias), a rate above ``diverge``
    diverges (loss NaN); every call is counted."""

    def __init__(self, peak: float, drift: float = 0.0, diverge: int | None = None, metric: bool = True) -> None:
        self.peak, self.drift, self.diverge, self.metric = peak, drift, diverge, metric
        self.calls: list[tuple[float, int]] = []

    def __call__(self, lr: float, steps: int) -> dict:
        self.calls.append((lr, steps))
        k = lr_search.lattice_index(lr)
        centre = self.peak + self.drift * math.log2(steps)
        acc = 0.9 - 0.03 * abs(k - centre) + 0.001 * math.log2(steps)
        loss = 0.3 + 0.05 * abs(k - centre)
        if self.diverge is not None and k > self.diverge:
            return {"metric": 0.5 if self.metric else None, "loss": math.nan}
        return {"metric": acc if self.metric else None, "loss": loss}


def test_successive_halving_finds_the_peak_and_trains_the_better_half_longer():
    f = Objective(peak=3)  # 8e-4 on the lattice, 4x the default
    search = loft.find_lr(f, default_lr=2e-4, run_steps=400)
    assert search.complete and search.lr == 8e-4
    plan = search.plan
    assert len(f.calls) == plan.trials and sum(s for _, s in f.calls) == plan.steps == search.steps_done
    rung0 = [lr for lr, s in f.calls if s == 4]
    rung1 = [lr for lr, s in f.calls if s == 8]
    rung2 = [lr for lr, s in f.calls if s == 16]
    assert rung0 == plan.lrs  # every rate, ascending
    # the 4 best of rung 0 (distance 0, 1, 1, 2 from the peak: 8e-4, 4e-4 and 1.6e-3, then 2e-4)
    assert sorted(rung1) == [2e-4, 4e-4, 8e-4, 1.6e-3]
    assert sorted(rung2) == [4e-4, 8e-4]  # ties (4e-4, 1.6e-3: one step away) go to the rate nearer the default
    assert search.best.steps == 16 and search.best.rung == 2


def test_ranking_metric_then_loss_then_distance_to_the_default_non_finite_last():
    plan = lr_search.plan_search(2e-4, 400)
    s = lr_search.LRSearch(plan)
    key = s.rank_key
    t = lr_search.Trial
    assert key(t(0, 4e-4, 4, 0.8, 0.9)) > key(t(0, 8e-4, 4, 0.7, 0.1))  # the metric first
    assert key(t(0, 4e-4, 4, 0.8, 0.3)) > key(t(0, 8e-4, 4, 0.8, 0.4))  # ties by the lower loss
    assert key(t(0, 4e-4, 4, 0.8, 0.3)) > key(t(0, 8e-4, 4, 0.8, 0.3))  # then nearer the default (2e-4): 1 step, 2
    assert key(t(0, 1e-4, 4, 0.8, 0.3)) > key(t(0, 4e-4, 4, 0.8, 0.3))  # equally near (one step each): the lower
    assert key(t(0, 4e-4, 4, 0.1, 5.0)) > key(t(0, 8e-4, 4, math.nan, 0.1))  # a NaN metric ranks last
    assert key(t(0, 4e-4, 4, 0.5, 5.0)) > key(t(0, 8e-4, 4, 0.5, math.inf))  # an infinite loss too
    assert key(t(0, 4e-4, 4, None, 0.3)) > key(t(0, 8e-4, 4, None, 0.4))  # no metric: the loss alone


def test_a_diverging_rate_loses_and_a_loss_only_search_chooses_by_loss():
    f = Objective(peak=3, diverge=2)  # 8e-4 and above diverge: the best finite rate is 4e-4
    assert loft.find_lr(f, default_lr=2e-4, run_steps=400).lr == 4e-4
    g = Objective(peak=-1, metric=False)  # 5e-5, chosen by the loss alone
    search = loft.find_lr(g, default_lr=2e-4, run_steps=400)
    assert search.lr == 5e-5 and search.scored_by == "the loss (no metric given)"
    with pytest.raises(TypeError, match="must return a mapping with 'loss'"):
        loft.find_lr(lambda lr, steps: 0.5, default_lr=2e-4, run_steps=400)


def test_an_interrupted_search_resumes_from_its_record_and_chooses_the_same():
    full = loft.find_lr(Objective(peak=2.6, drift=0.3), default_lr=2e-4, run_steps=1000)
    saved: list[str] = []

    class Stop(Exception):
        pass

    f = Objective(peak=2.6, drift=0.3)

    def stopping(lr, steps):
        if len(f.calls) == 9:  # during rung 1
            raise Stop
        return f(lr, steps)

    with pytest.raises(Stop):
        loft.find_lr(stopping, default_lr=2e-4, run_steps=1000, on_trial=lambda s: saved.append(json.dumps(s.as_dict())))
    record = json.loads(saved[-1])
    assert len(record["trials"]) == 9 and not record["complete"] and record["lr"] is None
    g = Objective(peak=2.6, drift=0.3)
    done = lr_search.LRSearch.from_dict(record)
    resumed = loft.find_lr(g, default_lr=2e-4, run_steps=1000, done=done)
    assert len(g.calls) == full.plan.trials - 9  # only the trials not yet run
    strip = lambda d: {**d, "seconds": None, "trials": [{**t, "seconds": None} for t in d["trials"]]}  # noqa: E731
    assert strip(resumed.as_dict()) == strip(full.as_dict())  # the same trials, the same choice
    with pytest.raises(ValueError, match="planned differently"):
        loft.find_lr(g, default_lr=2e-4, run_steps=500, done=done)
    with pytest.raises(ValueError, match="not a learning-rate search record"):
        lr_search.LRSearch.from_dict({"trials": []})


def test_the_search_is_deterministic():
    a = loft.find_lr(Objective(peak=0.4, drift=-0.2), default_lr=2e-3, run_steps=777, budget=0.3)
    b = loft.find_lr(Objective(peak=0.4, drift=-0.2), default_lr=2e-3, run_steps=777, budget=0.3)
    assert [(t.rung, t.lr, t.steps, t.metric, t.loss) for t in a.trials] == \
        [(t.rung, t.lr, t.steps, t.metric, t.loss) for t in b.trials]
    assert a.lr == b.lr


def test_validation_split():
    train, val = lr_search.split_indices(1000, 0.1, 500, seed=3)
    assert len(val) == 100 and len(train) == 900 and sorted(train + val) == list(range(1000))
    assert train == sorted(train) and val == sorted(val)
    assert lr_search.split_indices(1000, 0.1, 500, seed=3) == (train, val)  # deterministic for a seed
    assert lr_search.split_indices(1000, 0.1, 500, seed=4)[1] != val
    assert len(lr_search.split_indices(20000, 0.1, 500, seed=0)[1]) == 500  # at most `most`
    labels = ["a"] * 98 + ["rare", "rare2"]
    for seed in range(40):  # a label only the validation split would have goes back to training
        train, val = lr_search.split_indices(100, 0.1, 500, seed, labels)
        assert {labels[i] for i in val} <= {labels[i] for i in train}
        assert sorted(train + val) == list(range(100))


# ----------------------------------------------------------------------------- the floor
def test_the_majority_floor_is_the_most_frequent_answers_share_plus_two_standard_errors():
    floor = lr_search.Floor.majority([0, 1, 1, 0, 1] * 100)  # 500 answers, 60% ones
    assert floor.metric == pytest.approx(0.6) and floor.margin == pytest.approx(2 * math.sqrt(0.6 * 0.4 / 500))
    assert floor.threshold == pytest.approx(0.6 + 0.0438178, abs=1e-6) and "500 validation examples" in floor.what
    assert lr_search.Floor.majority(["b", "a", "b"]).metric == pytest.approx(2 / 3)
    assert lr_search.Floor.majority([3] * 7).margin == 0.0  # one answer: the floor is 1, nothing beats it
    with pytest.raises(ValueError, match="at least one"):
        lr_search.Floor.majority([])
    # the same floor from the counts alone (a protocol pins them, so its reports need no data)
    assert lr_search.Floor.of_majority(300, 500) == floor
    for count in (0, 501):
        with pytest.raises(ValueError, match=f"count must be in 1..500 .*not {count}"):
            lr_search.Floor.of_majority(count, 500)


class AtChance:
    """Trials that never leave chance: accuracy 0.5 plus noise that makes 8e-4 the best, and a
    loss that falls with the rate (as a few steps' loss does)."""

    def __call__(self, lr: float, steps: int) -> dict[str, float]:
        k = lr_search.lattice_index(lr)
        return {"metric": 0.5 + (0.02 if k == 3 else 0.0), "loss": 0.7 - 0.001 * k}


def test_a_search_whose_best_trial_is_not_above_the_floor_keeps_the_default():
    floor = lr_search.Floor(0.5, 0.045, "always the majority answer")
    search = loft.find_lr(AtChance(), default_lr=4e-4, run_steps=400, floor=floor)
    assert search.best.lr == 8e-4 and search.best.metric == pytest.approx(0.52)  # at chance: not above 0.545
    assert search.kept_default is True and search.lr == 4e-4
    record = search.as_dict()
    assert record["lr"] == 4e-4 and record["best_lr"] == 8e-4 and record["kept_default"] is True
    assert record["rule"] == lr_search.RULE and record["floor"]["threshold"] == pytest.approx(0.545)
    back = lr_search.LRSearch.from_dict(json.loads(json.dumps(record)))
    assert back.floor == floor and back.lr == 4e-4 and back.kept_default
    # the default is kept as given, off the lattice too (LoRA+'s 2.5e-4 searches around 2e-4)
    assert loft.find_lr(AtChance(), default_lr=2.5e-4, run_steps=400, floor=floor).lr == 2.5e-4
    # the same trials without a floor: the best trial, whatever it scored (rule 1)
    bare = loft.find_lr(AtChance(), default_lr=4e-4, run_steps=400)
    assert bare.lr == 8e-4 and bare.kept_default is False and bare.as_dict()["floor"] is None


def test_a_best_trial_above_the_floor_is_chosen_and_a_loss_only_search_ignores_the_floor():
    floor = lr_search.Floor(0.5, 0.045, "always the majority answer")
    search = loft.find_lr(Objective(peak=3), default_lr=2e-4, run_steps=400, floor=floor)  # accuracies near 0.9
    assert search.lr == 8e-4 and search.kept_default is False
    just_above = lr_search.Floor(0.9 + 0.001 * 4 - 0.0005, 0.0, "just below the best")  # best: 0.9 + 0.001 log2(16)
    assert loft.find_lr(Objective(peak=3), default_lr=2e-4, run_steps=400, floor=just_above).lr == 8e-4
    at = lr_search.Floor(0.9 + 0.001 * 4, 0.0, "the best's own score")  # not above: kept
    assert loft.find_lr(Objective(peak=3), default_lr=2e-4, run_steps=400, floor=at).lr == 2e-4
    no_metric = loft.find_lr(Objective(peak=-1, metric=False), default_lr=2e-4, run_steps=400, floor=floor)
    assert no_metric.lr == 5e-5 and no_metric.kept_default is False
    assert lr_search.LRSearch(search.plan, [], floor).kept_default is None  # not complete: no decision yet


class Local:
    """Three rates' trials (half the default 4e-4, the default, twice it), scored ``scores[rate]``
    in every rung, with a loss that falls with the rate."""

    def __init__(self, scores: dict[float, float]) -> None:
        self.scores = scores

    def __call__(self, lr: float, steps: int) -> dict[str, float]:
        return {"metric": self.scores[lr], "loss": 0.5 - 0.01 * lr_search.lattice_index(lr)}


def test_rule_3_moves_from_the_default_only_on_a_gain_of_min_gain_in_the_last_rung():
    floor = lr_search.Floor(0.5, 0.045, "always the majority answer")
    search = dict(default_lr=4e-4, run_steps=100, budget=3.0, points=3, floor=floor)
    # twice the default beats it by 0.004 in the last rung (movie sentiment's LoFT searches): kept under rule 3
    small = loft.find_lr(Local({2e-4: 0.80, 4e-4: 0.818, 8e-4: 0.822}), min_gain=0.01, **search)
    assert small.best.lr == 8e-4 and small.lr == 4e-4 and small.kept_default and small.kept_because == "gain"
    assert small.rule == lr_search.GAIN_RULE == 3
    record = small.as_dict()
    assert record["rule"] == 3 and record["min_gain"] == 0.01 and record["kept_because"] == "gain"
    back = lr_search.LRSearch.from_dict(json.loads(json.dumps(record)))
    assert back.min_gain == 0.01 and back.lr == 4e-4 and back.kept_because == "gain"
    # the same trials under rule 2 (no gain asked): the best trial
    rule2 = loft.find_lr(Local({2e-4: 0.80, 4e-4: 0.818, 8e-4: 0.822}), **search)
    assert rule2.lr == 8e-4 and rule2.rule == lr_search.RULE == 2 and not rule2.kept_default
    assert rule2.as_dict()["min_gain"] == 0.0 and rule2.kept_because is None
    # a gain of at least min_gain moves (up or down), exactly min_gain included
    assert loft.find_lr(Local({2e-4: 0.60, 4e-4: 0.68, 8e-4: 0.69}), min_gain=0.01, **search).lr == 8e-4
    assert 0.69 - 0.68 < 0.01  # in floating point: five more of 500 examples right is still a gain of 0.01
    assert loft.find_lr(Local({2e-4: 0.8305, 4e-4: 0.8205, 8e-4: 0.70}), min_gain=0.01, **search).lr == 2e-4
    # the default's rate lost in an earlier rung: nothing in the last rung to compare with, the best is chosen
    gone = loft.find_lr(Local({2e-4: 0.70, 4e-4: 0.60, 8e-4: 0.72}), min_gain=0.01, **search)
    assert gone.lr == 8e-4 and gone.kept_because is None
    # the floor still comes first; the default's own trial winning keeps it, for no reason to record
    low = loft.find_lr(Local({2e-4: 0.50, 4e-4: 0.51, 8e-4: 0.52}), min_gain=0.01, **search)
    assert low.lr == 4e-4 and low.kept_because == "floor"
    own = loft.find_lr(Local({2e-4: 0.80, 4e-4: 0.83, 8e-4: 0.82}), min_gain=0.01, **search)
    assert own.lr == 4e-4 and own.kept_because is None and own.kept_default is False
    # off the lattice (LoRA's 2e-3 searches around 1.6e-3): the default's lattice point's trial is the one compared
    lora = dict(search, default_lr=2e-3)
    scores = {8e-4: 0.70, 1.6e-3: 0.80, 3.2e-3: 0.805}
    assert loft.find_lr(Local(scores), min_gain=0.01, **lora).lr == 2e-3
    with pytest.raises(ValueError, match="min_gain"):
        loft.find_lr(Local(scores), min_gain=-0.01, **lora)


class ByRung:
    """Trials scored ``scores[(rate, steps)]`` (each rung its own), a loss that falls with the rate."""

    def __init__(self, scores: dict[tuple[float, int], float]) -> None:
        self.scores = scores

    def __call__(self, lr: float, steps: int) -> dict[str, float]:
        return {"metric": self.scores[(lr, steps)], "loss": 0.5 - 0.01 * lr_search.lattice_index(lr)}


def test_rule_4_never_chooses_a_rate_at_or_above_one_whose_trial_collapsed():
    floor = lr_search.Floor(0.5, 0.045, "always the majority answer")
    search = dict(default_lr=4e-4, run_steps=100, budget=3.0, points=3, floor=floor)  # trials of 42, then 84 steps
    # LoFT's seed 23 on movie sentiment (auto_gain): the default's 42-step trial collapsed (0.49) while half of it
    # learned (0.716); twice it went on to win the last rung, and its run collapsed
    seed23 = ByRung({(2e-4, 42): 0.716, (4e-4, 42): 0.49, (8e-4, 42): 0.69, (2e-4, 84): 0.80, (8e-4, 84): 0.82})
    for gain in (0.0, 0.01):  # rules 2 and 3 take twice the default (under rule 3 the default left no trial to beat)
        assert loft.find_lr(seed23, min_gain=gain, **search).lr == 8e-4
    capped = loft.find_lr(seed23, cap=True, **search)
    assert capped.cap_lr == 4e-4 and capped.best.lr == 2e-4 and capped.lr == 2e-4 and not capped.kept_default
    assert capped.rule == lr_search.CAP_RULE == 4
    record = capped.as_dict()
    assert record["rule"] == 4 and record["cap"] is True and record["cap_lr"] == 4e-4 and record["lr"] == 2e-4
    back = lr_search.LRSearch.from_dict(json.loads(json.dumps(record)))
    assert back.cap and back.cap_lr == 4e-4 and back.lr == 2e-4
    assert loft.find_lr(seed23, cap=True, min_gain=0.01, **search).lr == 2e-4  # the default is capped: no gain asked
    # a low rate still at chance is slow, not collapsed: nothing is capped
    slow = loft.find_lr(ByRung({(2e-4, 42): 0.50, (4e-4, 42): 0.70, (8e-4, 42): 0.72, (4e-4, 84): 0.80,
                                (8e-4, 84): 0.82}), cap=True, **search)
    assert slow.cap_lr is None and slow.lr == 8e-4
    # a collapse in the first rung caps the rates above it that went on to win (7 rates, 1-2-4... step trials)
    wide = dict(search, budget=0.25, points=7)
    plan = lr_search.plan_search(4e-4, 100, 0.25, 7)
    scores = {(lr, r.steps): 0.6 + 0.01 * i for i, lr in enumerate(plan.lrs) for r in plan.rungs}
    scores[(1.6e-3, plan.rungs[0].steps)] = 0.3  # collapsed; 3.2e-3 above it scores best in every rung
    assert loft.find_lr(ByRung(scores), **wide).lr == 3.2e-3
    capped = loft.find_lr(ByRung(scores), cap=True, **wide)
    assert capped.cap_lr == 1.6e-3 and capped.lr == 8e-4  # the best of the last rung below the cap
    with pytest.raises(ValueError, match="cap needs a floor"):
        loft.find_lr(seed23, cap=True, **dict(search, floor=None))


def test_under_rule_4_a_search_that_keeps_its_capped_default_keeps_the_rate_below_the_cap():
    floor = lr_search.Floor(0.5, 0.045, "always the majority answer")
    plan = lr_search.plan_search(4e-4, 100, 3.0, 3)
    trials = [lr_search.Trial(0, 2e-4, 42, 0.70, 0.5), lr_search.Trial(0, 4e-4, 42, 0.49, 0.6),
              lr_search.Trial(0, 8e-4, 42, 0.60, 0.6),
              lr_search.Trial(1, 2e-4, 84, 0.50, 0.5), lr_search.Trial(1, 8e-4, 84, 0.70, 0.4)]
    search = lr_search.LRSearch(plan, trials, floor, cap=True)
    # below the cap, the last rung's best (2e-4) is not above the floor: kept, but the default is capped
    assert search.cap_lr == 4e-4 and search.best.lr == 2e-4 and search.kept_because == "floor"
    assert search.fallback_lr == 2e-4 and search.lr == 2e-4
    assert lr_search.LRSearch(plan, trials, floor).lr == 8e-4  # rule 2: twice the default, which beat the floor
    assert lr_search.LRSearch(plan, trials[:3], floor, cap=True).lr is None  # incomplete: no choice yet


def test_a_finished_search_resumed_with_a_gain_decides_again_without_training():
    floor = lr_search.Floor(0.5, 0.045, "always the majority answer")
    search = dict(default_lr=4e-4, run_steps=100, budget=3.0, points=3, floor=floor)
    done = loft.find_lr(Local({2e-4: 0.80, 4e-4: 0.818, 8e-4: 0.822}), **search)
    calls = []
    again = loft.find_lr(lambda lr, s: calls.append(lr) or {"metric": 0.0, "loss": 1.0}, done=done, min_gain=0.01,
                         **search)
    assert calls == [] and again.lr == 4e-4 and again.kept_because == "gain"


def test_a_record_of_the_first_rule_resumes_and_the_floor_decides_again():
    first = loft.find_lr(AtChance(), default_lr=4e-4, run_steps=400).as_dict()
    old = {k: v for k, v in first.items() if k not in ("rule", "floor", "kept_default", "best_lr")}  # rule 1's record
    done = lr_search.LRSearch.from_dict(old)
    assert done.floor is None and done.lr == 8e-4
    calls = []
    floor = lr_search.Floor(0.5, 0.045, "always the majority answer")
    again = loft.find_lr(lambda lr, s: calls.append(lr) or AtChance()(lr, s), default_lr=4e-4, run_steps=400,
                         done=done, floor=floor)
    assert calls == [] and again.lr == 4e-4 and again.kept_default  # no trial reran; the floor decided
