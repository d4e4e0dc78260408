"""``loft finetune`` / ``loft compare`` end to end on tiny models (no downloads)."""

from __future__ import annotations

import csv
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from _tiny import sentiment_files, mc_records
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

from loft.app.cli import main
from loft.app.errors import RunInterrupted
from loft.app.finetune import FinetuneConfig, finetune
from loft.app.tasks.multiple_choice import MultipleChoiceTask

FAST = ["--max-steps", "6", "--batch-size", "8", "--quiet", "--lr", "5e-3", "--head-lr", "1e-2"]


@pytest.fixture(scope="module")
def cls_data(tmp_path_factory):
    return sentiment_files(tmp_path_factory.mktemp("cls"), 48, 24)


def run(*args):
    return main([str(a) for a in args])


def eval_loss_classification(model, tok, path):
    records = [json.loads(line) for line in path.read_text().splitlines()]
    enc = tok([r["text"] for r in records], padding=True, truncation=True, max_length=64, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        logits = model(**enc).logits
    labels = torch.tensor([r["label"] for r in records])
    return float(torch.nn.functional.cross_entropy(logits, labels)), float((logits.argmax(-1) == labels).float().mean())


def test_finetune_classification_adapter_reloads_identically(bert, cls_data, tmp_path):
    out = tmp_path / "run"
    assert run("finetune", "--model", bert, "--data", cls_data[0], "--eval-data", cls_data[1], "-o", out, *FAST) == 0
    for name in ("adapter_config.json", "adapter_model.safetensors", "metrics.json", "loss_curve.png", "run_config.json"):
        assert (out / name).is_file(), name
    assert not (out / "checkpoints").exists()
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 6 and m["method"] == "loft" and m["rank"] == 4
    assert m["lr"] == 5e-3 and m["head_lr"] == 1e-2
    assert 0.0 <= m["eval_accuracy"] <= 1.0 and m["eval_accuracy_before"] is not None
    assert m["train_loss"] > 0 and m["seconds"] > 0 and len(m["loss_curve"]) >= 1
    # PeftModel.from_pretrained gives the outputs the run measured
    base = AutoModelForSequenceClassification.from_pretrained(bert, num_labels=2)
    model = PeftModel.from_pretrained(base, out)
    loss, acc = eval_loss_classification(model, AutoTokenizer.from_pretrained(out), cls_data[1])
    assert loss == pytest.approx(m["eval_loss"], rel=1e-5)
    assert acc == pytest.approx(m["eval_accuracy"])
    # predictions.jsonl: one line per eval example, in order, with the label names of metrics.json
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    labels = [json.loads(line)["label"] for line in Path(cls_data[1]).read_text().splitlines()]
    assert [r["label"] for r in rows] == [m["labels"][i] for i in labels]
    assert all(r["correct"] == (r["label"] == r["prediction"]) and r["prediction"] in m["labels"] for r in rows)
    assert sum(r["correct"] for r in rows) / len(rows) == pytest.approx(m["eval_accuracy"])


@pytest.mark.parametrize("method", ["lora", "dora", "full"])
def test_methods_use_two_learning_rates(method, bert, cls_data, tmp_path):
    seen = {}

    class Spy(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
            head = {id(p) for n, p in model.named_parameters() if "classifier" in n}
            for g in optimizer.param_groups:
                seen["head" if all(id(p) in head for p in g["params"]) else "body"] = g["lr"]

    cfg = FinetuneConfig(model=str(bert), data=str(cls_data[0]), eval_data=str(cls_data[1]), method=method, rank=2,
                         max_steps=3, batch_size=8, lr=1e-3, head_lr=7e-3, output_dir=str(tmp_path / method))
    m = finetune(cfg, progress=False, callbacks=[Spy()])
    assert seen == {"body": 1e-3, "head": 7e-3}
    assert (m["lr"], m["head_lr"]) == (1e-3, 7e-3)
    if method == "full":
        assert (tmp_path / method / "model.safetensors").is_file()
        assert not (tmp_path / method / "adapter_config.json").exists()
        reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / method)
        loss, _ = eval_loss_classification(reloaded, AutoTokenizer.from_pretrained(tmp_path / method), cls_data[1])
        assert loss == pytest.approx(m["eval_loss"], rel=1e-5)
    else:
        config = json.loads((tmp_path / method / "adapter_config.json").read_text())
        assert config["use_dora"] == (method == "dora") and config["r"] == 2


def test_finetune_multiple_choice_causal_lm(llama, mc_data, tmp_path):
    out = tmp_path / "mc"
    assert run("finetune", "--model", llama, "--data", mc_data[0], "--eval-data", mc_data[1], "-o", out,
               "--rank", "2", "--target-modules", "q_proj,v_proj", *FAST) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["task"] == "multiple_choice" and m["num_eval"] == 8 and m["head_lr"] is None
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted({t.rsplit(".", 1)[-1] for t in config["target_modules"]}) == ["q_proj", "v_proj"]
    # reload and score the choices again: same accuracy and answer log-likelihood
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama), out)
    tok = AutoTokenizer.from_pretrained(out)
    task = MultipleChoiceTask.from_records([], "-", [dict(r, _line=i) for i, r in enumerate(mc_records(8, seed=1))], "-")
    task.prepare_tokenizer(tok)

    class FakeTrainer:
        class args:
            per_device_eval_batch_size = 5

    FakeTrainer.model = model
    again = task.evaluate(FakeTrainer, tok, 128)
    assert again["eval_accuracy"] == pytest.approx(m["eval_accuracy"])
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in rows] == again["predictions"]
    assert [r["label"] for r in rows] == [r["answer"] for r in mc_records(8, seed=1)]
    assert again["eval_loss"] == pytest.approx(m["eval_loss"], rel=1e-5)


def test_ctrl_c_checkpoint_then_resume_matches_uninterrupted(bert, cls_data, tmp_path):
    common = dict(model=str(bert), data=str(cls_data[0]), eval_data=str(cls_data[1]), max_steps=8, batch_size=8,
                  lr=5e-3, eval_before=False)

    class CtrlC(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:
                os.kill(os.getpid(), signal.SIGINT)  # what a real Ctrl-C does

    out = tmp_path / "interrupted"
    with pytest.raises(RunInterrupted) as info:
        finetune(FinetuneConfig(output_dir=str(out), **common), progress=False, callbacks=[CtrlC()])
    assert "--resume" in str(info.value) and info.value.checkpoint
    assert not (out / "metrics.json").exists()
    # without --resume the unfinished run is not thrown away
    args = ["finetune", "--model", bert, "--data", cls_data[0], "--eval-data", cls_data[1], "-o", out,
            "--max-steps", "8", "-b", "8", "--lr", "5e-3", "--quiet"]
    assert run(*args) == 2
    resumed = finetune(FinetuneConfig(output_dir=str(out), **common), resume=True, progress=False)
    assert resumed["steps"] == 8 and resumed["resumed_from"].endswith(("checkpoint-3", "checkpoint-4"))
    straight = finetune(FinetuneConfig(output_dir=str(tmp_path / "straight"), **common), progress=False)
    assert resumed["eval_loss"] == pytest.approx(straight["eval_loss"], rel=1e-5)


def test_compare_writes_table_and_plot(bert, cls_data, tmp_path):
    out = tmp_path / "cmp"
    assert run("compare", "--model", bert, "--data", cls_data[0], "--eval-data", cls_data[1], "--methods", "loft,lora",
               "--ranks", "1,2", "--max-steps", "3", "-b", "8", "--quiet", "-o", out) == 0
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert [(r["method"], r["rank"]) for r in rows] == [("loft", "1"), ("loft", "2"), ("lora", "1"), ("lora", "2"), ("full", "")]
    assert all(0 <= float(r["eval_accuracy"]) <= 1 for r in rows)
    assert (out / "compare.png").stat().st_size > 1000
    assert (out / "compare.md").read_text().count("\n") == 2 + len(rows)
    assert "lr_search" not in rows[0]  # no --lr auto: no column saying how a rate was searched
    assert (out / "loft-r2" / "adapter_model.safetensors").is_file()
    # the same folder again is refused, nothing lost
    assert run("compare", "--model", bert, "--data", cls_data[0], "-o", out, "--quiet") == 2
    assert (out / "compare.csv").is_file()
