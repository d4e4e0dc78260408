"""Bad input to ``loft finetune`` / ``loft compare``: a clear message, exit status 2, no
traceback, and nothing in an output directory lost."""

from __future__ import annotations

import json

import pytest
from _tiny import make_bert, mc_records, sentiment_records, write_jsonl

from loft.app.cli import main


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return make_bert(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def train(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("d") / "train.jsonl", sentiment_records(40))


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def fails(capsys, *args, code=2):
    """Run ``loft``; assert it exits with ``code`` without a traceback; return stderr."""
    assert main([str(a) for a in args]) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("loft: error:")
    return err


def test_unknown_model_lists_builtin_names(capsys, train, tmp_path):
    err = fails(capsys, "finetune", "--model", "no-such-model", "--data", train, "-o", tmp_path / "o")
    assert "Unknown model 'no-such-model'" in err and "minilm-l6" in err and "smollm2-135m" in err
    assert not (tmp_path / "o").exists()


def test_model_folder_without_config(capsys, train, tmp_path):
    (tmp_path / "empty_model").mkdir()
    err = fails(capsys, "finetune", "--model", tmp_path / "empty_model", "--data", train)
    assert "no config.json" in err


def test_missing_data_file(capsys, tmp_path):
    err = fails(capsys, "finetune", "--data", tmp_path / "nope.jsonl")
    assert "nope.jsonl" in err and "does not exist" in err and "movie_sentiment" in err


def test_malformed_jsonl_names_file_and_line(capsys, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "good", "label": 1}\n{"text": "bad", "label": 0}\n{"text": "oops", "label": \n')
    err = fails(capsys, "finetune", "--data", path)
    assert f"{path}, line 3: not valid JSON" in err


def test_missing_field_names_line(capsys, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "good", "label": 1}\n{"text": "bad"}\n')
    err = fails(capsys, "finetune", "--data", path, "--eval-data", path)
    assert "line 2: missing field 'label'" in err


def test_unknown_fields(capsys, tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"sentence": "a", "y": 1}])
    err = fails(capsys, "finetune", "--data", path)
    assert "line 1" in err and '"text"' in err and '"question"' in err


def test_csv_with_wrong_column_count(capsys, tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("text,label\ngood movie,1\nbad,movie,0\n")
    err = fails(capsys, "finetune", "--data", path)
    assert f"{path}, line 3" in err and "columns" in err


def test_labels_not_matching(capsys, train, tmp_path):
    eval_path = write_jsonl(tmp_path / "eval.jsonl", [{"text": "good", "label": 1}, {"text": "meh", "label": 7}])
    err = fails(capsys, "finetune", "--data", train, "--eval-data", eval_path)
    assert "Labels do not match" in err and "[7]" in err and "line 2" in err


def test_eval_data_for_another_task(capsys, train, tmp_path):
    eval_path = write_jsonl(tmp_path / "mc.jsonl", mc_records(3))
    err = fails(capsys, "finetune", "--data", train, "--eval-data", eval_path)
    assert "classification" in err and "multiple-choice" in err


def test_answer_out_of_range(capsys, tmp_path):
    records = mc_records(4)
    records[2]["answer"] = 5
    err = fails(capsys, "finetune", "--data", write_jsonl(tmp_path / "mc.jsonl", records))
    assert "line 3" in err and "'answer'" in err


def test_target_modules_matching_nothing_lists_names(capsys, bert, train, tmp_path):
    err = fails(capsys, "finetune", "--model", bert, "--data", train, "--target-modules", "q_proj", "-o", tmp_path / "o")
    assert "'q_proj' matches no linear layer" in err
    for name in ("query", "key", "value", "dense"):
        assert name in err
    assert not (tmp_path / "o").exists()  # nothing written for a run that cannot start


def test_rank_between_a_layers_sides_is_refused(capsys, bert, train, tmp_path):
    # the tiny BERT's intermediate layers are 32 -> 64: a rank in (32, 64) is refused for them
    err = fails(capsys, "finetune", "--model", bert, "--data", train, "--rank", "48", "-o", tmp_path / "o")
    assert "--rank 48 does not fit layer" in err and "intermediate" in err
    assert "--rank 32 or lower" in err and "--rank 64" in err
    assert not (tmp_path / "o").exists()


def test_rank_at_or_above_every_layers_larger_side_is_accepted(bert):
    """r >= max(m, n) is exactly full fine-tuning of a layer with LoFT: not refused."""
    from transformers import AutoModelForSequenceClassification

    from loft.app.finetune import resolve_targets

    model = AutoModelForSequenceClassification.from_pretrained(bert, num_labels=2)
    targets = resolve_targets(model, None, 64, set())
    assert "bert.encoder.layer.0.intermediate.dense" in targets and len(targets) >= 12
    assert len(resolve_targets(model, ["query"], 32, set())) == 2


def test_rank_above_every_layers_larger_side_is_refused(capsys, bert, train, tmp_path):
    """Above max(m, n) a rank adds only memory: refused, naming the rank that is already exact."""
    err = fails(capsys, "finetune", "--model", bert, "--data", train, "--rank", "1000000", "-o", tmp_path / "o")
    assert "--rank 1000000 is larger than any adapted layer needs" in err and "--rank 64 or lower" in err
    err = fails(capsys, "finetune", "--model", bert, "--data", train, "--rank", "40", "--target-modules", "query",
                "-o", tmp_path / "o")
    assert "--rank 32 or lower" in err
    assert not (tmp_path / "o").exists()


def test_output_dir_with_other_run_is_refused_unless_overwrite(capsys, bert, train, tmp_path):
    out = tmp_path / "o"
    base = ["finetune", "--model", bert, "--data", train, "-o", out, "--max-steps", "2", "-b", "8", "--quiet"]
    assert main([str(a) for a in base]) == 0
    metrics = (out / "metrics.json").read_text()
    err = fails(capsys, *base, "--rank", "2")
    assert "already holds a different run" in err and "rank: 4 there, 2 now" in err and "--overwrite" in err
    assert (out / "metrics.json").read_text() == metrics  # untouched
    assert main([str(a) for a in [*base, "--rank", "2", "--overwrite"]]) == 0
    assert json.loads((out / "metrics.json").read_text())["rank"] == 2


def test_foreign_folder_is_refused(capsys, bert, train, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    err = fails(capsys, "finetune", "--model", bert, "--data", train, "-o", out, "--max-steps", "1")
    assert "holds no loft run" in err
    assert (out / "notes.txt").read_text() == "precious"


def test_resume_without_checkpoint(capsys, bert, train, tmp_path):
    err = fails(capsys, "finetune", "--model", bert, "--data", train, "-o", tmp_path / "new", "--resume")
    assert "Nothing to resume" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "qlora"], "Unknown --method 'qlora'"),
        (["--rank", "0"], "--rank must be a positive integer"),
        (["--max-steps", "5", "--epochs", "1"], "not both"),
        (["--lr", "-1"], "--lr must be > 0"),
    ],
)
def test_bad_options(capsys, train, args, message):
    assert message in fails(capsys, "finetune", "--data", train, *args)


def test_compare_bad_method(capsys, train):
    assert "unknown adapter method 'qlora'" in fails(capsys, "compare", "--data", train, "--methods", "loft,qlora")


def test_click_usage_error_exit_code(capsys):
    assert main(["finetune", "--rank", "abc"]) == 2
    assert "Traceback" not in capsys.readouterr().err
