"""``loft federate`` refuses bad input clearly (exit 2, one message, nothing written), before
starting Flower. The run itself: tests/test_flower.py."""

from __future__ import annotations

import pytest
from _tiny import make_bert, mc_records, sentiment_records, write_jsonl

from loft.app.cli import main
from loft.app.federated import FederateConfig
from loft.app.federated.config import parse_split


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("fedcli")
    return (make_bert(d / "bert"), write_jsonl(d / "train.jsonl", sentiment_records(12)),
            write_jsonl(d / "test.jsonl", sentiment_records(8, seed=1)), write_jsonl(d / "mc.jsonl", mc_records(12)))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "dora"], "Unknown --method 'dora' for loft federate"),
        (["--aggregator", "median"], "Unknown --aggregator 'median'"),
        (["--residual", "keep"], "Unknown --residual 'keep'"),
        (["--state", "maybe"], "--state takes 'keep' or 'reset'"),
        (["--clients", "0"], "--clients must be >= 1"),
        (["--rounds", "0"], "--rounds must be >= 1"),
        (["--local-steps", "0"], "--local-steps must be >= 1"),
        (["--split", "dirichlet:-1"], "--split 'dirichlet:-1' is neither 'even' nor a Dirichlet concentration"),
        (["--split", "skewed"], "--split 'skewed' is neither"),
        (["--method", "full", "--aggregator", "product"], "--method full has no factors to aggregate"),
        (["--method", "ffa", "--aggregator", "alternating"], "--method ffa (FFA-LoRA) trains only B"),
        (["--aggregator", "fedavg", "--residual", "fold"], "--residual fold applies to --aggregator product only"),
        (["--lr", "-1"], "--lr must be > 0"),
        (["--method", "lora", "--aggregator", "alternating", "--state", "keep"], "needs --method loft"),
        (["--clients", "13"], "Cannot split 12 training examples over --clients 13"),
        (["--split", "dirichlet:0.1", "--clients", "13"], "Cannot split 12 training examples over --clients 13"),
        (["--rank", "40"], "--rank 40 does not fit layer"),
    ],
)
def test_federate_refuses_bad_options(tiny, tmp_path, capsys, args, message):
    bert, train, test, _ = tiny
    out = tmp_path / "out"
    code = main(["federate", "--model", str(bert), "--data", str(train), "--eval-data", str(test), "--output-dir",
                 str(out), "--quiet", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("loft: error: ") and message in err, err
    assert "Traceback" not in err
    assert not out.exists()


def test_federate_refuses_data_it_does_not_train(tiny, tmp_path, capsys):
    bert, _, _, mc = tiny
    code = main(["federate", "--model", str(bert), "--data", str(mc), "--output-dir", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "multiple-choice data" in err and "loft federate trains classification data" in err
    assert not (tmp_path / "o").exists()


def test_federate_refuses_a_folder_that_is_not_a_run(tiny, tmp_path, capsys):
    bert, train, test, _ = tiny
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code = main(["federate", "--model", str(bert), "--data", str(train), "--eval-data", str(test), "--output-dir",
                 str(out), "--quiet"])
    assert code == 2 and "is not empty and holds no loft run" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_split_and_defaults():
    assert parse_split("even") is None and parse_split("dirichlet:0.1") == 0.1 and parse_split("1.0") == 1.0
    cfg = FederateConfig()
    assert (cfg.aggregator_name, cfg.keep_state) == ("product", True)
    lora = FederateConfig(method="lora")
    assert (lora.aggregator_name, lora.keep_state, lora.method_lr) == ("fedavg", False, 2e-3)
    assert FederateConfig(method="ffa").finetune_config().method == "lora"
    assert FederateConfig.from_json(FederateConfig(split="dirichlet:0.1", clients=8).to_json()) == FederateConfig(
        split="dirichlet:0.1", clients=8)


# ----------------------------------------------------------------------------- benchmarks/federated.py's report
def _bench_module():
    import importlib.util
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "benchmarks"))
    spec = importlib.util.spec_from_file_location("federated_bench", root / "benchmarks" / "federated.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record(bench, arm, seed, accs, split="even"):
    run = bench.run_of(arm, 4, split, 4, seed, len(accs) - 1)
    rounds = [{"round": i, "eval_accuracy": a, "aggregation_error": 0.1 * (i > 0), "bytes_up": [1024] * 4}
              for i, a in enumerate(accs)]
    return {"run": run, "lr": bench.LRS[run["method"]], "eval_accuracy": accs[-1], "best_eval_accuracy": max(accs[1:]),
            "rounds": rounds,
            "client_examples": [10, 10, 10, 10], "client_labels": [{"0": 5, "1": 5}] * 4,
            "flwr_version": "1.42.0", "ray_version": "2.55.1", "wall_seconds": 60.0 * (2 + seed),
            "provenance": {"commit": "abc", "versions": {"torch": "2.13.0"}, "load_1min": 1.5 + seed, "cpus": 2}}


def test_federated_report_comes_from_the_results_file_with_verdicts(tmp_path, monkeypatch):
    import json

    bench = _bench_module()
    monkeypatch.setattr(bench, "RESULTS", tmp_path / "r.jsonl")
    monkeypatch.setattr(bench, "REPORT", tmp_path / "docs" / "results" / "r.md")
    monkeypatch.setattr(bench, "FIGURE", tmp_path / "docs" / "figures" / "r.png")
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    recs = [_record(bench, "loft-keep", s, [0.5, 0.7, 0.81 + 0.01 * s]) for s in range(3)]
    recs += [_record(bench, "loft-reset", s, [0.5, 0.6, 0.70 + 0.003 * s]) for s in range(3)]  # clearly worse
    recs += [_record(bench, "lora-fedavg", s, [0.5, 0.7, 0.82 - 0.01 * s + 0.004 * (s == 1)]) for s in range(3)]
    recs += [_record(bench, "loft-fedavg", 0, [0.5, 0.6, 0.75], split="dirichlet:0.1"),
             _record(bench, "loft-keep", 0, [0.5, 0.6, 0.78], split="dirichlet:0.1")]
    # the rankless reference: LoFT is compared with it within its setting, and LoRA is clearly behind it
    recs += [_record(bench, "full", s, [0.5, 0.7, a]) for s, a in enumerate([0.85, 0.845, 0.83])]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    bench.report()
    text = (tmp_path / "docs" / "results" / "r.md").read_text()
    assert "14 runs" in text and "`abc` (14)" in text
    # the claims with several seeds are one family for Holm's correction (5 here: the 1-seed claim is left out)
    assert "| 4 clients, even, r=4, 2 rounds: loft-keep beats loft-reset (3 seeds) |" in text
    assert "Holm p (5 claims)" in text

    def cells(claim):  # claim, test, verdict, Holm p, verdict after Holm, 90% interval, level within the margin
        return next(x for x in text.splitlines() if f": {claim} (" in x and "even" in x).strip("| ").split(" | ")

    assert cells("loft-keep beats loft-reset")[2] == "holds" and cells("loft-keep beats loft-reset")[4] == "holds"
    assert cells("loft-keep beats lora-fedavg")[2] == "inconclusive"
    assert cells("loft-keep beats full")[1].startswith("-0.022 ") and cells("loft-keep beats full")[2] == "inconclusive"
    assert cells("loft-keep beats full")[6] == "not shown"  # no difference found is not "level"
    lora_full = cells("lora-fedavg beats full")
    raw = bench.paired([0.82, 0.814, 0.80], [0.85, 0.845, 0.83]).p
    assert lora_full[2] == "does not hold" and raw < float(lora_full[3]) <= 5 * raw * 1.01  # Holm: up to 5 x p
    assert lora_full[4] == "does not hold"
    assert not any("beats full" in x for x in text.splitlines() if "dirichlet" in x)  # no reference there
    dirichlet = next(x for x in text.splitlines() if "dirichlet:0.1" in x and "beats loft-fedavg" in x)
    assert dirichlet == "| 4 clients, dirichlet:0.1, r=4, 2 rounds: loft-keep beats loft-fedavg | +0.030 (1 seed) |"
    # wall times from the results file: 2, 3 and 4 minutes by seed, loads 1.5 to 3.5
    assert "1-minute load average at a run's start ranging 1.5-3.5 on 2 cores): 2.0 to 4.0 minutes" in text
    keep_row = next(x for x in text.splitlines() if x.startswith("| 4 | even | 4 | 2 | loft-keep | 3 |"))
    assert "0.820 +- 0.006" in keep_row and "| 2.0 (3/3) |" in keep_row  # rounds to 0.80: round 2 for every seed
    assert "4 clients, even, seed 0: 10 (0: 5, 1: 5), 10 (0: 5, 1: 5)" in text
    assert (tmp_path / "docs" / "figures" / "r.png").stat().st_size > 0


def test_federated_results_at_another_learning_rate_are_refused(tmp_path, monkeypatch):
    """A result line whose learning rate is not the one the benchmark runs its method at (LRS)
    cannot be pooled with the others: loading the results file stops with a message."""
    import json

    bench = _bench_module()
    monkeypatch.setattr(bench, "RESULTS", tmp_path / "r.jsonl")
    good, odd = _record(bench, "loft-keep", 0, [0.5, 0.8]), _record(bench, "lora-fedavg", 0, [0.5, 0.8])
    (tmp_path / "r.jsonl").write_text(json.dumps(good) + "\n")
    assert len(bench.load()) == 1
    odd["lr"] = bench.LRS["lora"] / 2
    (tmp_path / "r.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(odd) + "\n")
    with pytest.raises(SystemExit, match="a lora run at lr 0.001, but LRS gives 0.002"):
        bench.load()
