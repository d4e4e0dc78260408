"""The vendored data sets, the readers and the built-in model names."""

from __future__ import annotations

import json

import pytest

from loft.app.data import BUILTIN_DATASETS, builtin_path, read_records, resolve_data
from loft.app.errors import LoftUsageError
from loft.app.models import BUILTIN_MODELS, resolve_model
from loft.app.tasks import make_task

COUNTS = {"movie_sentiment": (8043, 2000), "social_iqa": (1454, 500), "social_iqa_sft": (1454, 500)}


@pytest.mark.parametrize("name", sorted(BUILTIN_DATASETS))
def test_builtin_sets_are_vendored_and_valid(name):
    train, test = (read_records(builtin_path(name, s)) for s in ("train", "test"))
    assert (len(train), len(test)) == COUNTS[name]
    task = make_task(train, name, test, name)
    assert task.kind == BUILTIN_DATASETS[name][0]
    assert resolve_data(name) == builtin_path(name, "train")
    if task.kind == "classification":
        assert task.label_names == ["0", "1"]
        assert 0.3 < sum(task.train_labels) / len(task.train_labels) < 0.7
    elif task.kind == "multiple_choice":
        assert sum(len(c) == 3 for _, c, _ in task.eval_items) >= 498  # two items have 2 choices
    else:  # instruction: the letter of the right choice
        assert {e.reference for e in task.eval_items} == {" A", " B", " C"}


def test_attribution_ships_with_the_data():
    text = (builtin_path("movie_sentiment", "train").parent.parent / "ATTRIBUTION.md").read_text()
    for needle in ("Pang", "Hutto", "Social IQa", "CC-BY-4.0", "Apache-2.0", "canary"):
        assert needle in text


def test_csv_and_jsonl_read_the_same(tmp_path):
    (tmp_path / "a.csv").write_text('text,label\n"good, really",1\nbad,0\n')
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "good, really", "label": 1}) + "\n\n" + json.dumps({"text": "bad", "label": 0}) + "\n")
    csv_task = make_task(read_records(tmp_path / "a.csv"), "a.csv", read_records(tmp_path / "a.csv"), "a.csv")
    json_task = make_task(read_records(tmp_path / "a.jsonl"), "a", read_records(tmp_path / "a.jsonl"), "a")
    assert csv_task.train_texts == json_task.train_texts == ["good, really", "bad"]
    assert csv_task.train_labels == json_task.train_labels == [1, 0]


def test_string_labels_and_text_answers(tmp_path):
    train = [{"text": "x", "label": "pos", "_line": 1}, {"text": "y", "label": "neg", "_line": 2}]
    task = make_task(train, "t", train, "t")
    assert task.label_names == ["neg", "pos"] and task.train_labels == [1, 0]
    mc = [{"question": "q?", "choices": ["a", "b"], "answer": "b", "_line": 1}]
    assert make_task(mc, "m", mc, "m").train_items == [("q?", ["a", "b"], 1)]


def test_empty_file(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(LoftUsageError, match="no records"):
        read_records(tmp_path / "e.jsonl")


def test_unknown_model_message_lists_builtins(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LoftUsageError) as info:
        resolve_model("someone/some-model")
    for name in BUILTIN_MODELS:
        assert name in str(info.value)


def test_builtin_minilm_resolves_to_a_model_folder():  # scripts/setup.sh installs the package
    folder = resolve_model("minilm-l6")
    config = json.loads(open(f"{folder}/config.json").read())
    assert config["model_type"] == "bert" and config["hidden_size"] == 384
