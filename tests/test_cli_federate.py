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
