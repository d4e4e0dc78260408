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
    assert rows[0].startswith("Test: paired t test across seeds") and "sampling error" in rows[0] and rows[1] == ""
    assert rows[2].startswith("| claim |") and "Holm p (3 claims)" in rows[2] and rows[3] == "|" + "---|" * 7
    cells = [row.strip("| ").split(" | ") for row in rows[4:]]
    assert [c[0] for c in cells] == ["a beats b", "c beats b", "d beats b"]
    assert cells[0][2:5] == ["holds", f"{3 * clear.p:.3g}", "holds"]
    # significant alone, not once three claims share the 5%: second smallest, so its adjusted p is 2 x p
    assert cells[1][2] == "holds" and float(cells[1][3]) == pytest.approx(2 * marginal.p, rel=1e-3)
    assert cells[1][4] == "inconclusive"
    assert cells[2][4] == "inconclusive"
    # every row gives the 90% interval and whether it shows the two level (a 2-point gain is not level)
    assert cells[0][5] == clear.fmt90() and cells[0][6] == "not shown"
    # without a margin (a loss, where none was set in advance) the equivalence columns go, the rest stays
    bare = _stats.claim_rows([("a beats b", clear), ("c beats b", marginal), ("d beats b", level)], margin=None)
    assert "points" not in bare[0] and "level within" not in bare[2] and bare[3] == "|" + "---|" * 5
    assert [row.strip("| ").split(" | ") for row in bare[4:]] == [c[:5] for c in cells]


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


class SeedSweep(FakeSweep):
    """:class:`FakeSweep` whose accuracy also depends on the seed (so tuning seeds matter)."""

    def get(self, runs, partial=False):
        out = super().get(runs, partial)
        for rec in out.values():
            rec["eval_accuracy"] -= 0.001 * (rec["run"]["seed"] % 7)
        return out


def test_protocol_v2_tunes_on_seeds_no_final_uses(fake_splits):
    v1, v2 = evidence.V1, evidence.V2
    assert set(v1.tune_seeds) <= set(v1.final_seeds)  # the weakness v2 removes
    assert not set(v2.tune_seeds) & set(v2.final_seeds) and len(v2.tune_seeds) >= 2
    assert v2.results != v1.results and v2.report != v1.report  # the old lines stay as they are
    sweep = SeedSweep({m: c for m, (_, c) in evidence.METHODS.items()})
    tuned = evidence.tune(sweep, protocol=v2)
    assert {r["seed"] for r in sweep.asked} == set(v2.tune_seeds)
    assert all(r["eval_data"] == "val.jsonl" and r["eval_before"] is False for r in sweep.asked)
    for arm, t in tuned.items():  # a point's records: one per tuning seed
        assert all([r["run"]["seed"] for r in point] == list(v2.tune_seeds) for point in t["records"])
    sweep.asked = []
    finals = evidence.final(sweep, tuned, protocol=v2)
    assert {r["seed"] for r in sweep.asked} == set(v2.final_seeds)
    assert all(r["eval_data"] == "test.jsonl" and r["eval_before"] for r in sweep.asked)  # for the untrained row
    assert set(finals) == set(evidence.arms())
    # v1's runs keep their identity (the committed results file is looked up by it)
    assert evidence.tune_runs(("loft", 4), 1, v1) == {
        "model": "minilm-l6", "data": "train.jsonl", "eval_data": "val.jsonl", "method": "loft", "rank": 4,
        "lr": 2e-4, "seed": 0, "max_steps": 100, "batch_size": 16, "eval_before": True}


def test_plan_counts_the_runs_and_their_time(fake_splits, tmp_path):
    seconds = {(m, split): 100.0 for m in evidence.METHODS for split in ("val.jsonl", "test.jsonl")}
    dry = dry_sweep({}, tmp_path)
    dry.jobs = 2
    lines = evidence.plan_lines(evidence.V2, dry, seconds)
    n_arms, n_tune, n_final = len(evidence.arms()), len(evidence.V2.tune_seeds), len(evidence.V2.final_seeds)
    first = n_arms * evidence.GRID_POINTS * n_tune
    grow = n_arms * evidence.MAX_EXTENSIONS * n_tune
    assert lines[0].endswith(": 0 runs done")
    assert f"{first} runs to run in the grids as they stand" in lines[1] and f"at most {grow} more" in lines[1]
    assert lines[2].startswith(f"finals: {n_arms * n_final} runs")
    assert lines[3] == f"to run: {first + n_arms * n_final} runs (at most {first + grow + n_arms * n_final} if every " \
                       "unsettled grid grows to its limit)"
    hours = (first + n_arms * n_final) * 100 / 3600
    assert f"about {hours:.1f} h of run time" in lines[4] and f", {hours / 2:.1f} h (" in lines[4]
    # once every tuning run is there, the finals are counted exactly at the chosen rates
    full = SeedSweep({m: c for m, (_, c) in evidence.METHODS.items()})
    tuned = evidence.tune(full, protocol=evidence.V2)
    have = full.get(list(full.asked))
    done = dry_sweep(have, tmp_path)
    lines = evidence.plan_lines(evidence.V2, done, seconds)
    assert lines[1].endswith("settled") and lines[3] == f"to run: {n_arms * n_final} runs"
    evidence.final(full, tuned, protocol=evidence.V2)
    assert evidence.plan_lines(evidence.V2, dry_sweep(full.get(list(full.asked)), tmp_path), seconds)[3] == "to run: 0 runs"
    with pytest.raises(SystemExit, match="no committed run time"):
        evidence.plan_lines(evidence.V2, dry_sweep({}, tmp_path), {})


def _synthetic_finals(protocol, rng, gap):
    """Tuning and final records of every arm for ``protocol``: LoFT r=1 ``gap`` ahead of the
    rest on every test snippet's odds; each final knows which of 400 snippets it got right."""
    sweep = SeedSweep({m: c for m, (_, c) in evidence.METHODS.items()})
    tuned = evidence.tune(sweep, protocol=protocol)
    evidence.final(sweep, tuned, protocol=protocol)
    have = sweep.get(list(sweep.asked))
    difficulty = [0.5 + 0.4 * rng.random() for _ in range(400)]
    for rec in have.values():
        run = rec["run"]
        if run["eval_data"] == "test.jsonl":
            up = gap if (run["method"], run["rank"]) == ("loft", 1) else 0.0
            rec["eval_correct"] = "".join("1" if rng.random() < min(1.0, d + up) else "0" for d in difficulty)
            rec["eval_accuracy"] = rec["eval_correct"].count("1") / 400
            rec["num_eval"] = 400
            rec["eval_accuracy_before"] = 0.5 + 0.01 * (run["seed"] % 3)
    return have


def test_reports_say_which_protocol_and_test_each_table_comes_from(fake_splits, tmp_path, monkeypatch):
    monkeypatch.setattr(evidence, "ROOT", tmp_path)
    monkeypatch.setattr(evidence, "majority_share", lambda path: 0.5)
    monkeypatch.setattr(evidence, "N_BOOT", 1000)  # p >= 1 / 1001: enough to survive Holm over 22
    rng = random.Random(7)
    for protocol in (evidence.V1, evidence.V2):
        have = _synthetic_finals(protocol, rng, gap=0.2)
        protocol.results.parent.mkdir(parents=True, exist_ok=True)
        protocol.results.write_text("".join(json.dumps(rec) + "\n" for rec in have.values()))
        sweep = Sweep(protocol.results, 1, 1, dry=True)
        tuned = evidence.tune(sweep, True, protocol)
        finals = evidence.final(sweep, tuned, True, protocol)
        evidence.report(tuned, finals, {}, {}, {}, protocol)
    v1 = evidence.V1.report.read_text()
    v2 = evidence.V2.report.read_text()
    assert "(protocol v1)" in v1.splitlines()[0] and "(protocol v2)" in v2.splitlines()[0]
    assert "Claims (paired t tests across seeds)" in v1 and "Test: paired t test across seeds" in v1
    assert "Claims (paired bootstraps over seeds and test snippets)" in v2 and "Test: paired bootstrap" in v2
    # v1 counts the arms whose best final seed is the tuning seed; v2 has no tuning seed among its finals
    assert "**The tuning seed is also a final seed** (protocol v1): seed 0's final is the best" in v1
    assert "tuning seed is also a final seed" not in v2
    assert "validation, mean over tuning seeds 10, 11" in v2 and "validation, seed 0)" in v1
    # the untrained row: one value per seed (seeds 20-24: 0.52, 0.50, 0.51, 0.52, 0.50)
    untrained = next(x for x in v2.splitlines() if x.startswith("| untrained |"))
    assert untrained.startswith(f"| untrained | {_stats.summarize([0.52, 0.50, 0.51, 0.52, 0.50]).fmt()} |")
    claim = next(x for x in v2.splitlines() if x.startswith("| loft r=1 beats lora r=1 |")).strip("| ").split(" | ")
    assert claim[2] == "holds" and claim[4] == "holds" and claim[6] == "not shown"  # far ahead, after Holm
    level = next(x for x in v2.splitlines() if x.startswith("| loft r=4 beats lora r=4 |")).strip("| ").split(" | ")
    assert level[2] == "inconclusive"  # same odds: no difference found, and 400 snippets cannot show "level"
    table = v2.split("## 2.")[1]
    loft_row = next(x for x in table.splitlines() if x.startswith("| loft |")).split(" | ")
    assert loft_row[1].startswith("**") and not loft_row[2].startswith("**")  # LoFT r=1 bold, after Holm


def test_best_seed_count_and_first_collapse():
    recs = lambda accs: [{"run": {"seed": s}, "eval_accuracy": a} for s, a in enumerate(accs)]  # noqa: E731
    finals = {("a", 1): recs([0.8, 0.7, 0.75]), ("b", 1): recs([0.7, 0.8, 0.75]), ("c", 1): recs([0.8, 0.8, 0.7])}
    assert evidence.best_seed_count(finals, 0) == 2  # ties count
    by_k = {0: [{"eval_accuracy": 0.52}] * 2, 1: [{"eval_accuracy": 0.8}] * 2,  # slow start at rate 0
            2: [{"eval_accuracy": 0.81}, {"eval_accuracy": 0.7}], 3: [{"eval_accuracy": 0.8}, {"eval_accuracy": 0.5}]}
    assert evidence.first_collapse(by_k, chance=0.5) == 3  # not 0: below the best rate a run has not left chance
    assert evidence.first_collapse({k: v for k, v in by_k.items() if k < 3}, chance=0.5) is None


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


def test_a_bold_cell_must_survive_holm_over_every_cell_of_the_table():
    """The SmolLM2 report once bolded LoRA r16 on one t test (p = 0.015) that its own claims table
    called inconclusive after Holm: a bold cell is a verdict, so it is corrected like one."""
    rng = random.Random(4)
    base = [rng.gauss(0.40, 0.02) for _ in range(3)]
    ahead = next(v for v in ([b + 0.005 + rng.gauss(0, 0.0015) for b in base] for _ in range(5000))
                 if 0.01 < _stats.paired(v, base).p < 0.02)  # significant alone, as LoRA r16 was
    level = [[b + rng.gauss(0, 0.01) for b in base] for _ in range(2)]
    values = {("loft", 1): base, ("lora", 1): level[0], ("loft", 4): base, ("lora", 4): level[1],
              ("loft", 16): base, ("lora", 16): ahead}
    assert _stats.paired(ahead, base).verdict == "better"
    assert _stats.best_cells(values) == set()  # 6 cells: Holm multiplies its p by up to 6
    assert not any("**" in row for row in _stats.method_rows(values, ["loft", "lora"], [1, 4, 16]))
    clear = [b + 0.02 + rng.gauss(0, 0.0002) for b in base]  # p ~ 1e-4: survives
    assert _stats.best_cells({**values, ("lora", 16): clear}) == {("lora", 16)}
    # any paired test plugs in (a bootstrap over examples in protocol v2), each pair tested once
    calls = []

    def counting(a, b):
        calls.append((a, b))
        return _stats.paired(a, b)

    assert _stats.best_cells({**values, ("lora", 16): clear}, counting) == {("lora", 16)} and len(calls) == 3


def test_the_untrained_row_has_one_value_per_seed():
    # 22 arms x 5 seeds repeat each seed's untrained accuracy 22 times: pooled, they would look like 110 values
    per_seed = [0.5335, 0.4885, 0.5105, 0.4855, 0.5005]
    records = [{"run": {"seed": s, "method": m}, "eval_accuracy_before": a}
               for m in range(22) for s, a in enumerate(per_seed)] + [{"run": {"seed": 9}, "eval_accuracy_before": None}]
    assert _stats.untrained(records) == pytest.approx(per_seed)
    s = _stats.summarize(_stats.untrained(records))
    assert s.n == 5 and f"{s.mean:.3f} +- {s.se:.3f} [{s.lo:.3f}, {s.hi:.3f}]" == "0.504 +- 0.009 [0.480, 0.528]"
    assert _stats.summarize([r["eval_accuracy_before"] for r in records[:-1]]).se < 0.003  # the old, pooled row


def test_equivalence_needs_the_90_percent_interval_inside_the_margin():
    base = [0.80, 0.81, 0.79, 0.82, 0.78]
    tight = _stats.paired([b + 0.001 + e for b, e in zip(base, [0.0005, -0.0005, 0.0003, -0.0003, 0.0])], base)
    assert tight.lo90 > -_stats.EQUIVALENCE_MARGIN and tight.hi90 < _stats.EQUIVALENCE_MARGIN
    assert tight.within() and _stats.equivalence(tight) == "equivalent"
    # no difference found, but the interval is wide: not evidence that the two are level
    wide = _stats.paired([b + e for b, e in zip(base, [0.01, -0.012, 0.006, -0.004, 0.001])], base)
    assert wide.verdict == "inconclusive" and wide.lo90 < -0.005
    assert not wide.within() and _stats.equivalence(wide) == "not shown"
    # the 90% interval (t, 4 degrees of freedom) is narrower than the 95% one, around the same mean
    assert wide.lo < wide.lo90 < wide.diff < wide.hi90 < wide.hi
    d = [x - y for x, y in zip([b + e for b, e in zip(base, [0.01, -0.012, 0.006, -0.004, 0.001])], base)]
    half = 2.131846786 * _stats.summarize(d).se
    assert wide.hi90 - wide.diff == pytest.approx(half, rel=1e-6)
    # an interval just past the margin on one side is not equivalence, whatever the other side
    assert not _stats.Paired(5, 0.0, -0.01, 0.01, 0.9, -0.004, 0.0051).within()
    # a bootstrap's verdict follows the same rule, and claim_rows says which test it is
    boot = _stats.Bootstrap(5, 2000, 0.001, -0.004, 0.006, -0.003, 0.0045, 0.7)
    assert boot.within() and _stats.equivalence(boot) == "equivalent"
    rows = _stats.claim_rows([("a beats b", boot)])
    assert rows[0].startswith("Test: paired bootstrap over seeds and test examples")
    assert rows[4].strip("| ").split(" | ")[5:] == ["[-0.0030, +0.0045]", "equivalent"]


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


def test_the_stability_and_default_stages_refuse_protocol_v2(monkeypatch, capsys):
    for stage in ("stability", "default"):
        monkeypatch.setattr(sys, "argv", ["evidence.py", stage, "--protocol", "v2"])
        with pytest.raises(SystemExit, match=f"the {stage} stage is protocol v1's .*leave out --protocol"):
            evidence.main()


def test_the_bootstrap_replicates_are_those_of_the_float64_reference():
    """paired_bootstrap draws once per (examples, seeds, replicates, seed) and sums 0/1 differences
    in float32: the same replicates, bit for bit, as drawing each time and summing in float64."""
    import numpy as np

    rng = np.random.default_rng(3)
    a = ["".join(rng.choice(list("01"), 300)) for _ in range(3)]
    b = ["".join(rng.choice(list("01"), 300)) for _ in range(3)]
    d = _stats._correctness(a) - _stats._correctness(b)
    draws = np.random.default_rng(7)
    reference = []
    for start in range(0, 2500, 1000):
        k = min(1000, 2500 - start)
        weights = draws.multinomial(300, np.full(300, 1 / 300), size=k).astype(np.float64)
        pick = draws.integers(0, 3, size=(k, 3))
        reference.append(np.take_along_axis(weights @ d.T / 300, pick, axis=1).mean(1))
    counts, pick = _stats._bootstrap_draws(300, 3, 2500, 7)
    fast = np.take_along_axis(_stats._drawn_sums(counts, d) / 300, pick, axis=1).mean(1)
    assert np.array_equal(fast, np.concatenate(reference))
    halves = d / 2  # not 0/1 differences: float64 throughout
    assert np.array_equal(_stats._drawn_sums(counts, halves), counts.astype(np.float64) @ halves.T)
    assert _stats.paired_bootstrap(a, b, n_boot=2500, seed=7) == _stats.paired_bootstrap(a, b, n_boot=2500, seed=7)
