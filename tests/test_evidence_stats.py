"""The rules that turn evidence runs into verdicts (benchmarks/_stats.py) and the protocols of
benchmarks/evidence.py and evidence_siqa.py (grids grow past an edge optimum, the deciding
stability runs first, the default learning rate's rule), on synthetic results."""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import _stats  # noqa: E402
import evidence  # noqa: E402
from _protocol import Sweep  # noqa: E402


def test_interval_covers_the_mean_about_95_percent_of_the_time():
    rng = random.Random(0)
    trials, covered = 2000, 0
    for _ in range(trials):
        s = _stats.summarize([rng.gauss(0.8, 0.01) for _ in range(5)])
        covered += s.lo <= 0.8 <= s.hi
    assert 0.93 < covered / trials < 0.97
    s = _stats.summarize([0.80, 0.81, 0.79])
    assert s.n == 3 and s.mean == pytest.approx(0.80) and s.lo < 0.80 < s.hi
    assert s.se == pytest.approx(0.01 / 3 ** 0.5)


def test_paired_verdicts():
    rng = random.Random(1)
    base = [rng.gauss(0.8, 0.02) for _ in range(5)]  # seed effects shared by both methods
    better = [b + 0.01 + rng.gauss(0, 0.002) for b in base]
    assert _stats.paired(better, base).verdict == "better"
    assert _stats.claim_verdict(_stats.paired(better, base)) == "holds"
    assert _stats.paired(base, better).verdict == "worse"
    assert _stats.claim_verdict(_stats.paired(base, better)) == "does not hold"
    # pairing matters: the same shift hidden in seed noise is not significant unpaired
    noisy = [b + 0.01 + rng.gauss(0, 0.03) for b in base]
    t = _stats.paired(noisy, base)
    assert t.verdict == "inconclusive" and t.p >= _stats.ALPHA and t.lo < 0 < t.hi
    same = _stats.paired(base, list(base))
    assert same.p == 1.0 and same.verdict == "inconclusive"


def test_holm_adjusts_each_p_by_its_place_in_the_family():
    # by hand: sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> monotone 0.06
    assert _stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert _stats.holm([0.3, 0.9]) == pytest.approx([0.6, 0.9])
    assert _stats.holm([0.6, 0.9]) == [1.0, 1.0]  # capped at 1; 0.9 x 1 is raised to the 1.0 before it
    assert _stats.holm([0.02]) == [0.02] and _stats.holm([]) == []
    rng = random.Random(3)
    ps = [rng.random() ** 3 for _ in range(12)]
    adjusted = _stats.holm(ps)
    assert all(p <= q <= min(1.0, len(ps) * p) for p, q in zip(ps, adjusted))  # between raw and Bonferroni
    by_p = [q for _, q in sorted(zip(ps, adjusted))]
    assert by_p == sorted(by_p)  # the order of the raw p values is kept


def test_claim_rows_give_the_claim_alone_and_after_holm():
    rng = random.Random(2)
    base = [rng.gauss(0.8, 0.02) for _ in range(5)]
    clear = _stats.paired([b + 0.02 + rng.gauss(0, 0.001) for b in base], base)
    marginal = next(t for t in (_stats.paired([b + 0.01 + rng.gauss(0, 0.006) for b in base], base)
                                for _ in range(1000)) if 0.025 < t.p < 0.045)
    level = _stats.paired([b + rng.gauss(0, 0.01) for b in base], base)
    rows = _stats.claim_rows([("a beats b", clear), ("c beats b", marginal), ("d beats b", level)])
    assert rows[0].startswith("Verdict: the claim alone") and rows[1] == ""
    assert rows[2].startswith("| claim |") and "Holm p (3 claims)" in rows[2] and rows[3] == "|---|---|---|---|---|"
    cells = [row.strip("| ").split(" | ") for row in rows[4:]]
    assert [c[0] for c in cells] == ["a beats b", "c beats b", "d beats b"]
    assert cells[0][2:] == ["holds", f"{3 * clear.p:.3g}", "holds"]
    # significant alone, not once three claims share the 5%: second smallest, so its adjusted p is 2 x p
    assert cells[1][2] == "holds" and float(cells[1][3]) == pytest.approx(2 * marginal.p, rel=1e-3)
    assert cells[1][4] == "inconclusive"
    assert cells[2][4] == "inconclusive"


def test_paired_refuses_unpaired_input():
    with pytest.raises(ValueError, match="same seeds"):
        _stats.paired([0.8, 0.81], [0.8])
    with pytest.raises(ValueError, match="two seeds"):
        _stats.paired([0.8], [0.7])


def test_edge_to_extend():
    grid = [1e-4, 2e-4, 4e-4]
    assert _stats.edge_to_extend(grid, [(0.7, 0), (0.8, 0), (0.75, 0)]) == 0
    assert _stats.edge_to_extend(grid, [(0.8, 0), (0.7, 0), (0.6, 0)]) == -1
    assert _stats.edge_to_extend(grid, [(0.6, 0), (0.7, 0), (0.8, 0)]) == 1
    assert _stats.edge_to_extend(grid, [(0.8, -0.5), (0.8, -0.4), (0.7, 0)]) == 0  # ties: lower loss wins
    with pytest.raises(ValueError):
        _stats.edge_to_extend(list(reversed(grid)), [(0.7, 0)] * 3)


class FakeSweep:
    """Synthetic results: validation accuracy peaks at the lattice index ``peak[method]``."""

    def __init__(self, peak: dict[str, int]) -> None:
        self.peak, self.asked = peak, []

    def get(self, runs, partial=False):
        self.asked += runs
        out = {}
        for run in runs:
            k = round(math.log2(run["lr"] / 1e-4))
            acc = 0.8 - 0.02 * abs(k - self.peak[run["method"]])
            out[evidence._sweep.key(run)] = {"run": run, "eval_accuracy": acc, "eval_loss": 1 - acc}
        return out


@pytest.fixture
def fake_splits(monkeypatch):
    monkeypatch.setattr(evidence, "splits", lambda: ("train.jsonl", "val.jsonl", "test.jsonl"))


def test_tuning_grids_are_equal_and_grow_until_the_optimum_is_inside(fake_splits):
    centre = {m: c for m, (_, c) in evidence.METHODS.items()}
    peak = dict(centre, lora=centre["lora"] + 3, dora=centre["dora"] - 2, loft=centre["loft"] + 20)
    sweep = FakeSweep(peak)
    tuned = evidence.tune(sweep)
    assert set(tuned) == set(evidence.arms())
    for (method, rank), t in tuned.items():
        assert t["grid"] == list(range(t["grid"][0], t["grid"][-1] + 1))  # consecutive lattice points
        grown = len(t["grid"]) - evidence.GRID_POINTS
        assert 0 <= grown <= evidence.MAX_EXTENSIONS
        if method == "loft":  # the peak is out of reach: the report must say so
            assert not t["inside"] and grown == evidence.MAX_EXTENSIONS
        else:
            assert t["inside"] and t["chosen"] == peak[method]
            assert t["grid"][0] < t["chosen"] < t["grid"][-1]
    assert {len(t["grid"]) for (m, _), t in tuned.items() if m in ("rslora", "loraplus")} == {evidence.GRID_POINTS}
    # every run of the protocol is on validation at seed 0, with repository-relative paths
    assert all(r["seed"] == 0 and r["eval_data"] == "val.jsonl" and r["eval_before"] for r in sweep.asked)


def test_final_runs_every_seed_on_test_at_the_chosen_rate(fake_splits):
    sweep = FakeSweep({m: c for m, (_, c) in evidence.METHODS.items()})
    tuned = evidence.tune(sweep)
    finals = evidence.final(sweep, tuned)
    for arm, recs in finals.items():
        assert [r["run"]["seed"] for r in recs] == list(evidence.SEEDS)
        assert {r["run"]["eval_data"] for r in recs} == {"test.jsonl"}
        assert {r["run"]["lr"] for r in recs} == {evidence.lattice(tuned[arm]["chosen"])}


def dry_sweep(have, folder):
    """A dry :class:`Sweep` over a results file holding only ``have`` (as a report sees a stage under way)."""
    path = folder / "results.jsonl"
    path.write_text("".join(json.dumps(rec) + "\n" for rec in have.values()))
    return Sweep(path, jobs=1, threads=1, dry=True)


def test_final_runs_the_claims_arms_first_with_seeds_innermost(fake_splits):
    sweep = FakeSweep({m: c for m, (_, c) in evidence.METHODS.items()})
    tuned = evidence.tune(sweep)
    sweep.asked = []
    evidence.final(sweep, tuned)
    arms = [(r["method"], r["rank"]) for r in sweep.asked[::len(evidence.SEEDS)]]
    assert [r["seed"] for r in sweep.asked] == list(evidence.SEEDS) * len(evidence.arms())
    assert arms[:7] == [("loft", 1), ("loft", 4), ("loft", 16), ("lora", 1), ("lora", 4), ("lora", 16), ("full", 1)]
    assert [a[0] for a in arms[7:10]] == ["dora"] * 3


def test_a_report_under_way_shows_only_settled_arms(fake_splits, tmp_path):
    centre = {m: c for m, (_, c) in evidence.METHODS.items()}
    full = FakeSweep(dict(centre, lora=centre["lora"] + 3))  # lora's grids must grow twice
    tuned = evidence.tune(full)
    finals = evidence.final(full, tuned)
    key = evidence._sweep.key
    have = full.get(list(full.asked))  # every run of both stages
    # dora r=4 misses a run of its first grid; lora r=1 has its first grid but not the extension it
    # needs (its optimum is on the edge); loft r=16 misses one final seed
    del have[key(evidence.run_of("dora", 4, tuned[("dora", 4)]["grid"][2], 0, "val"))]
    del have[key(evidence.run_of("lora", 1, tuned[("lora", 1)]["grid"][-1], 0, "val"))]
    del have[key(evidence.run_of("loft", 16, tuned[("loft", 16)]["chosen"], 3, "test"))]
    dry = dry_sweep(have, tmp_path)
    assert evidence.tune(dry) == {} and evidence.final(dry, tuned) == {}
    settled = evidence.tune(dry, partial=True)
    assert set(settled) == set(evidence.arms()) - {("dora", 4), ("lora", 1)}
    assert all(settled[arm] == tuned[arm] for arm in settled)  # a settled arm is what the whole stage gives
    done = evidence.final(dry, settled, partial=True)
    assert set(done) == set(settled) - {("loft", 16)}
    assert all(done[arm] == finals[arm] for arm in done)
    assert "still to run: lora r=1, dora r=4" in evidence._progress("settled", settled)[0]
    assert evidence._progress("settled", tuned) == []


def test_collapse_rule():
    assert evidence.collapsed({"eval_accuracy": 0.52}, chance=0.5)
    assert not evidence.collapsed({"eval_accuracy": 0.70}, chance=0.5)


def test_method_rows_bold_only_an_arm_better_than_every_other_of_its_rank():
    seeds = [0.0, 0.01, -0.01, 0.02, -0.02]
    values = {("loft", 4): [0.80 + d for d in seeds], ("lora", 4): [0.70 + 1.1 * d for d in seeds],
              ("loft", 16): [0.80 + d for d in seeds], ("lora", 16): [0.80 + 1.1 * d + 0.001 for d in seeds]}
    rows = _stats.method_rows(values, ["loft", "lora", "dora"], [1, 4, 16])
    loft, lora, dora = (row.split(" | ") for row in rows)
    assert loft[0] == "| loft" and loft[1] == "" and loft[2].startswith("**0.800") and not loft[3].startswith("**")
    assert not any(cell.startswith("**") for cell in lora + dora)  # worse at r=4, a tie at r=16
    assert dora[1:] == ["", "", " |"]  # every dora arm missing
    assert not any("**" in row for row in _stats.method_rows(values, ["loft", "lora"], [1, 4, 16], bold=False))


def _decide(accs):
    """Deciding runs: {arm: {k: records}} from {arm: {k: per-seed accuracies}}."""
    return {arm: {k: [{"eval_accuracy": a} for a in xs] for k, xs in by_k.items()} for arm, by_k in accs.items()}


def test_default_learning_rate_is_the_best_rate_where_no_loft_seed_collapsed(fake_splits, monkeypatch):
    monkeypatch.setattr(evidence, "majority_share", lambda path: 0.5)
    ks = list(evidence.DECIDING[1])
    good, best, dead = [0.80] * 5, [0.82] * 5, [0.81, 0.81, 0.81, 0.81, 0.50]
    accs = {("loft", 4): dict.fromkeys(ks, good), ("loft", 16): dict.fromkeys(ks, good),
            ("full", 0): dict.fromkeys(ks, dead)}
    accs[("loft", 4)] = {**accs[("loft", 4)], ks[2]: best}
    accs[("loft", 16)] = {**accs[("loft", 16)], ks[2]: best}
    assert evidence.choose_default(_decide(accs)) == ks[2]  # full fine-tuning's collapses do not count
    accs[("loft", 16)][ks[2]] = dead  # one LoFT seed collapses there: the next best safe rate
    assert evidence.choose_default(_decide(accs)) in set(ks) - {ks[2]}
    accs[("loft", 4)][ks[1]] = [0.81] * 5
    assert evidence.choose_default(_decide(accs)) == ks[1]


def test_stability_runs_the_deciding_runs_first_at_every_seed(fake_splits):
    sweep = FakeSweep({m: c for m, (_, c) in evidence.METHODS.items()})
    evidence.stability(sweep)
    n = len(evidence.DECIDING[0]) * len(evidence.DECIDING[1]) * len(evidence.SEEDS)
    first, rest = sweep.asked[:n], sweep.asked[n:]
    def key(r):  # ((method, rank), lattice index)
        return (r["method"], 0 if r["method"] == "full" else r["rank"]), round(math.log2(r["lr"] / 1e-4))

    assert all(key(r)[0] in evidence.DECIDING[0] and key(r)[1] in evidence.DECIDING[1] for r in first)
    assert {r["seed"] for r in first} == set(evidence.SEEDS)
    assert not any(key(r)[0] in evidence.DECIDING[0] and key(r)[1] in evidence.DECIDING[1] for r in rest)
    assert len(sweep.asked) == len(evidence.STABILITY_ARMS) * len(evidence.STABILITY_GRID) * len(evidence.SEEDS)


def test_siqa_protocol_tunes_at_rank_4_and_runs_every_rank_at_its_methods_rate(monkeypatch):
    import evidence_siqa as siqa

    monkeypatch.setattr(siqa, "splits", lambda: ("train.jsonl", "val.jsonl", "test.jsonl"))
    centre = {m: c for m, (_, c) in siqa.METHODS.items()}
    peak = dict(centre, loft=centre["loft"] + 1, full=centre["full"] + 5)  # LoFT's optimum on the grid's top edge
    sweep = FakeSweep(peak)
    tuned = siqa.tune(sweep)
    assert tuned["loft"]["inside"] and tuned["loft"]["chosen"] == peak["loft"] and len(tuned["loft"]["grid"]) == 4
    assert not tuned["full"]["inside"] and len(tuned["full"]["grid"]) == siqa.GRID_POINTS + siqa.MAX_EXTENSIONS
    assert tuned["lora"]["inside"] and len(tuned["lora"]["grid"]) == siqa.GRID_POINTS
    assert all(r["rank"] == siqa.TUNE_RANK or r["method"] == "full" for r in sweep.asked)
    assert all(r["eval_data"] == "val.jsonl" and r["seed"] == 0 and "eval_before" not in r for r in sweep.asked)
    assert all(r["target_modules"] == siqa.PROJECTIONS for r in sweep.asked)
    finals = siqa.final(sweep, tuned)
    assert set(finals) == {(m, r) for m in ("loft", "lora") for r in siqa.RANKS} | {("full", 0)}
    for (method, rank), recs in finals.items():
        assert [r["run"]["seed"] for r in recs] == list(siqa.SEEDS)
        assert {r["run"]["lr"] for r in recs} == {siqa.lattice(tuned[method]["chosen"])}
        assert all(r["run"]["eval_data"] == "test.jsonl" for r in recs)
        assert all(r["run"].get("eval_before", False) == (method == "full") for r in recs)
        assert method == "full" or {r["run"]["rank"] for r in recs} == {rank}


# ----------------------------------------------------------------------------- the bootstrap over seeds and examples
def _bernoulli_runs(rng, seeds, examples, p, shift=None):
    """Per seed, which examples a run got right: each example has its own difficulty (shared by
    every seed and arm) and each seed its own draw."""
    return ["".join("1" if rng.random() < min(1.0, p[j] + (shift or 0.0)) else "0" for j in range(examples))
            for _ in range(seeds)]


def test_bootstrap_interval_covers_the_true_difference_about_95_percent_of_the_time():
    rng = random.Random(5)
    covered, trials = 0, 120
    for _ in range(trials):
        difficulty = [rng.random() for _ in range(300)]  # a fresh eval set each trial: its sampling error counts
        a = _bernoulli_runs(rng, 4, 300, difficulty)
        b = _bernoulli_runs(rng, 4, 300, difficulty)
        t = _stats.paired_bootstrap(a, b, n_boot=400, seed=rng.randrange(10**6))
        covered += t.lo <= 0.0 <= t.hi  # both arms have the same expected accuracy
    assert 0.88 <= covered / trials <= 1.0


def test_bootstrap_includes_the_eval_sets_sampling_error_that_the_t_test_leaves_out():
    # a is right on 20 more of 2,000 examples than b, the same 20 at every seed: no seed variance
    base = "1" * 1500 + "0" * 500
    better = "1" * 1520 + "0" * 480
    a, b = [better] * 5, [base] * 5
    t_test = _stats.paired([x.count("1") / 2000 for x in a], [x.count("1") / 2000 for x in b])
    assert t_test.lo == t_test.hi == pytest.approx(0.01)  # the t test sees no uncertainty at all
    boot = _stats.paired_bootstrap(a, b, n_boot=2000, seed=1)
    assert boot.diff == pytest.approx(0.01) and boot.verdict == "better"
    # 20 discordant examples of 2,000: the difference's standard error is about sqrt(20) / 2000
    assert boot.hi - boot.lo == pytest.approx(2 * 1.96 * 20 ** 0.5 / 2000, rel=0.25)
    assert boot.lo90 > boot.lo and boot.hi90 < boot.hi
    assert not boot.within(0.005) and boot.within(0.02)


def test_bootstrap_refuses_runs_on_different_examples_or_seeds():
    with pytest.raises(ValueError, match="same seeds"):
        _stats.paired_bootstrap(["01", "10"], ["01"])
    with pytest.raises(ValueError, match="same eval examples"):
        _stats.paired_bootstrap(["01", "10"], ["011", "101"])
    with pytest.raises(ValueError, match="same eval examples"):
        _stats.paired_bootstrap(["01", "101"], ["01", "10"])


def test_rank1_plan_verdicts_and_holm_over_the_primary_family(monkeypatch):
    import evidence_rank1 as plan

    monkeypatch.setattr(plan, "splits", lambda: ("train.jsonl", "val.jsonl", "test.jsonl"))
    # tuning seeds never appear in the finals, and every run is one epoch
    assert not set(plan.TUNE_SEEDS) & set(plan.FINAL_SEEDS) and len(plan.FINAL_SEEDS) == 10
    run = plan.run_of("loft", 3, plan.TUNE_SEEDS[0], "val")
    assert run["epochs"] == 1.0 and "max_steps" not in run and run["eval_data"] == "val.jsonl"
    rng = random.Random(2)
    difficulty = [0.4 + 0.5 * rng.random() for _ in range(2000)]
    same = _bernoulli_runs(rng, 10, 2000, difficulty)
    finals = {
        "loft": [{"eval_correct": c, "eval_accuracy": c.count("1") / 2000} for c in same],
        "full": [{"eval_correct": c, "eval_accuracy": c.count("1") / 2000} for c in same],  # identical to LoFT
        "lora": [{"eval_correct": c, "eval_accuracy": c.count("1") / 2000}
                 for c in _bernoulli_runs(rng, 10, 2000, difficulty, shift=-0.05)],  # 5 points worse
    }
    rows = {(r["a"], r["b"]): r for r in plan.analyse(finals)}
    assert set(rows) == {("loft", "full"), ("loft", "lora"), ("lora", "full")}  # DoRA has not run: left out
    assert rows[("loft", "full")]["verdict"] == "equivalent within +-0.5 points"
    assert rows[("loft", "lora")]["verdict"] == "LoFT r1 better"
    assert rows[("lora", "full")]["verdict"] == "full fine-tuning better"
    # Holm only over a complete primary family; a secondary comparison uses its own p
    assert all(r["p_used"] == r["test"].p for r in rows.values())
    finals["dora"] = finals["lora"]
    rows = {(r["a"], r["b"]): r for r in plan.analyse(finals)}
    primary = [rows[pair] for pair in plan.PRIMARY]
    assert [r["p_used"] for r in primary] == pytest.approx(_stats.holm([r["test"].p for r in primary]))
    assert rows[("dora", "full")]["p_used"] == rows[("dora", "full")]["test"].p


def test_rank1_tuning_scores_a_point_by_its_mean_over_the_tuning_seeds(monkeypatch):
    import evidence_rank1 as plan

    monkeypatch.setattr(plan, "splits", lambda: ("train.jsonl", "val.jsonl", "test.jsonl"))

    class TwoSeeds(FakeSweep):
        def get(self, runs, partial=False):
            self.asked += runs
            out = {}
            for run in runs:
                k = round(math.log2(run["lr"] / 1e-4))
                first = plan.ARMS[run["method"]][1][1]  # seed 100 peaks on the grid's second point by a little,
                peak = first if run["seed"] == plan.TUNE_SEEDS[0] else first + 1  # seed 101 on the third by a lot
                acc = 0.8 - (0.01 if run["seed"] == plan.TUNE_SEEDS[0] else 0.05) * abs(k - peak)
                out[plan._sweep.key(run)] = {"run": run, "eval_accuracy": acc, "eval_loss": 1 - acc}
            return out

    sweep = TwoSeeds({})
    tuned = plan.tune(sweep)
    for arm, (_, grid) in plan.ARMS.items():
        assert tuned[arm]["chosen"] == grid[2] and tuned[arm]["grid"] == grid and tuned[arm]["inside"]
        assert all(len(point) == len(plan.TUNE_SEEDS) for point in tuned[arm]["records"])
    assert {r["seed"] for r in sweep.asked} == set(plan.TUNE_SEEDS)
    finals = plan.final(sweep, tuned)
    assert all([r["run"]["seed"] for r in recs] == list(plan.FINAL_SEEDS) for recs in finals.values())
