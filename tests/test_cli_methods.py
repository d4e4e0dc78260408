"""PEFT's optimizer-side peers of LoFT as methods of ``loft finetune`` / ``loft compare``:
``loraplus`` (create_loraplus_optimizer), ``lorafa`` (create_lorafa_optimizer), ``pissa``
(init_lora_weights="pissa_niter_16") and ``rslora`` (use_rslora=True). Tiny models built from
configs; nothing is downloaded."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import signal
from pathlib import Path

import pytest
import torch
from _tiny import make_bert, mc_records, sentiment_records, write_jsonl
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    TrainerCallback,
)

from loft.app.cli import main
from loft.app.config import ADAPTER_METHODS, DEFAULT_LR, METHODS
from loft.app.errors import RunInterrupted
from loft.app.finetune import FinetuneConfig, finetune
from loft.app.methods import LORAPLUS_LR_RATIO, lora_options, make_optimizer
from loft.app.tasks.multiple_choice import MultipleChoiceTask

NEW = ["loraplus", "lorafa", "pissa", "rslora"]


def test_every_method_has_a_default_learning_rate():
    assert set(DEFAULT_LR) == set(METHODS) and set(NEW) <= set(ADAPTER_METHODS)
    assert all(v > 0 for v in DEFAULT_LR.values())


def test_the_peers_table_of_the_docs_gives_the_defaults_the_app_uses():
    text = (Path(__file__).resolve().parents[1] / "docs" / "workflow.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| .* \| ([0-9.e-]+) \|$", text, flags=re.M))
    assert set(NEW) <= set(rows)
    assert {m: float(rows[m]) for m in NEW} == {m: DEFAULT_LR[m] for m in NEW}


# ----------------------------------------------------------------------------- the optimizer each method gets
def _classifier(method: str):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                     num_labels=2)
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value", "dense"], modules_to_save=["classifier"],
                      task_type="SEQ_CLS", **lora_options(method))
    return get_peft_model(BertForSequenceClassification(cfg), lora)


@pytest.mark.parametrize("method", ["lora", *NEW])
def test_the_head_gets_its_own_group_and_learning_rate(method):
    model = _classifier(method)
    opt = make_optimizer(method, model, lr=1e-3, head_lr=7e-3, weight_decay=0.0, is_head=lambda n: "modules_to_save" in n)
    names = {id(p): n for n, p in model.named_parameters()}
    where = {}
    for i, group in enumerate(opt.param_groups):
        for p in group["params"]:
            assert id(p) not in where, f"{names[id(p)]} in two groups"
            where[id(p)] = i
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(id(p) in where for n, p in model.named_parameters() if p.requires_grad)
    head = [p for n, p in model.named_parameters() if "modules_to_save" in n]
    (head_group,) = {where[id(p)] for p in head}
    assert opt.param_groups[head_group]["lr"] == 7e-3
    assert {names[id(p)] for p in opt.param_groups[head_group]["params"]} == {n for n, _ in model.named_parameters()
                                                                              if "modules_to_save" in n}
    lr_of = {n: opt.param_groups[where[id(p)]]["lr"] for n, p in model.named_parameters() if id(p) in where}
    a = [lr for n, lr in lr_of.items() if "lora_A" in n]
    b = [lr for n, lr in lr_of.items() if "lora_B" in n]
    if method == "loraplus":  # B learns LORAPLUS_LR_RATIO times faster than A
        assert set(a) == {1e-3} and b == [pytest.approx(1e-3 * LORAPLUS_LR_RATIO)] * len(b) and b
    else:
        assert set(b) == {1e-3}
    if method == "lorafa":  # LoRA-FA freezes A
        assert not any("lora_A" in n for n in trainable) and any("lora_B" in n for n in trainable)
    else:
        assert set(a) == {1e-3}


def _tiny_lm():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("method", NEW)
def test_each_method_lowers_the_loss_of_a_fixed_batch(method):
    base = _tiny_lm()
    original = {n: m.weight.detach().clone() for n, m in base.named_modules() if n.endswith(("q_proj", "v_proj"))}
    torch.manual_seed(1)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **lora_options(method)))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    start = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    if method == "rslora":  # rank-stabilised scale alpha / sqrt(r)
        assert layer.scaling["default"] == pytest.approx(8 / math.sqrt(4))
    else:
        assert layer.scaling["default"] == pytest.approx(8 / 4)
    if method == "pissa":  # the principal part moved from the base weight into the adapter
        w = original["model.layers.0.self_attn.q_proj"]
        residual = layer.base_layer.weight.detach()
        assert (residual - w).norm() > 0.1 * w.norm()
        ba = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        torch.testing.assert_close(residual + layer.scaling["default"] * ba.detach(), w, atol=1e-5, rtol=1e-5)
    opt = make_optimizer(method, model, lr=1e-2, head_lr=1e-2, weight_decay=0.0, is_head=lambda n: False)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(10):
        opt.zero_grad()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss))
    assert losses[-1] < losses[0] - 0.1, losses
    end = {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}
    for name in start:
        moved = not torch.equal(start[name], end[name])
        assert moved == (method != "lorafa" or "lora_B" in name), name  # LoRA-FA: A stays where it started


# ----------------------------------------------------------------------------- loft finetune end to end
class _CtrlC(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # what a real Ctrl-C does


def _eval_on(model, tok_dir, n=8):
    tok = AutoTokenizer.from_pretrained(tok_dir)
    task = MultipleChoiceTask.from_records([], "-", [dict(r, _line=i) for i, r in enumerate(mc_records(n, seed=1))], "-")
    task.prepare_tokenizer(tok)

    class FakeTrainer:
        class args:
            per_device_eval_batch_size = 8

    FakeTrainer.model = model
    return task.evaluate(FakeTrainer, tok, 128)


@pytest.mark.parametrize("method", NEW)
def test_method_trains_resumes_exactly_and_its_adapter_reloads_on_the_original_base(method, llama, mc_data, tmp_path):
    common = dict(model=str(llama), data=str(mc_data[0]), eval_data=str(mc_data[1]), method=method, rank=2,
                  max_steps=8, batch_size=8, lr=5e-3)
    straight = finetune(FinetuneConfig(output_dir=str(tmp_path / "straight"), **common), progress=False)
    assert straight["method"] == method and straight["lr"] == 5e-3 and straight["steps"] == 8
    assert straight["eval_loss"] < straight["eval_loss_before"] - 0.05, straight
    config = json.loads((tmp_path / "straight" / "adapter_config.json").read_text())
    assert config["use_rslora"] == (method == "rslora")
    # PiSSA's adapter is saved converted (PEFT): rank 2r, for the unmodified base
    assert config["r"] == (4 if method == "pissa" else 2) and config["init_lora_weights"] is True
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama), tmp_path / "straight")
    again = _eval_on(reloaded, tmp_path / "straight")
    assert again["eval_loss"] == pytest.approx(straight["eval_loss"], rel=1e-4, abs=1e-5)
    assert again["eval_accuracy"] == pytest.approx(straight["eval_accuracy"])

    # Ctrl-C after step 3, --resume: the optimizer's state (LoRA-FA's, LoRA+'s groups) comes back
    out = tmp_path / "interrupted"
    with pytest.raises(RunInterrupted):
        finetune(FinetuneConfig(output_dir=str(out), **common), progress=False, callbacks=[_CtrlC()])
    resumed = finetune(FinetuneConfig(output_dir=str(out), **common), resume=True, progress=False)
    assert resumed["resumed_from"] and resumed["steps"] == 8
    a = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    b = load_file(out / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed["eval_loss"] == straight["eval_loss"]


def test_compare_runs_the_new_methods(llama, mc_data, tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", "--model", str(llama), "--data", str(mc_data[0]), "--eval-data", str(mc_data[1]),
                 "--methods", "loraplus,lorafa,rslora", "--ranks", "2", "--no-full", "--max-steps", "2", "-b", "8",
                 "--quiet", "-o", str(out)]) == 0
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert [r["method"] for r in rows] == ["loraplus", "lorafa", "rslora"]
    assert [float(r["lr"]) for r in rows] == [DEFAULT_LR[m] for m in ("loraplus", "lorafa", "rslora")]
    assert all(float(r["peak_memory_mb"]) > 0 for r in rows)


# ----------------------------------------------------------------------------- bad input
def _fails(capsys, *args):
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("loft: error:") and "Traceback" not in err
    return err


def test_unknown_methods_name_the_choices(capsys, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_records(20))
    err = _fails(capsys, "finetune", "--method", "qlora", "--data", data, "-o", tmp_path / "o")
    assert all(m in err for m in METHODS)
    err = _fails(capsys, "compare", "--methods", "loft,full", "--data", data, "-o", tmp_path / "c")
    assert "'full'" in err and all(m in err for m in ADAPTER_METHODS) and "--full" in err
    err = _fails(capsys, "compare", "--lr", "pisa=1e-3", "--data", data, "-o", tmp_path / "c")
    assert "pisa" in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "c").exists()


def test_lr_per_method_accepts_the_new_methods():
    from loft.app.compare import parse_lrs

    assert parse_lrs("loraplus=1e-4,lorafa=2e-3,pissa=3e-4,rslora=5e-4") == {
        "loraplus": 1e-4, "lorafa": 2e-3, "pissa": 3e-4, "rslora": 5e-4}


def test_classifier_head_trains_with_every_new_method(tmp_path):
    # the head (modules_to_save) of a classifier is trained by each method's optimizer, at head_lr
    bert = make_bert(tmp_path / "bert")
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_records(16))
    seen = {}

    class Spy(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
            head = {id(p) for n, p in model.named_parameters() if "modules_to_save" in n}
            seen["head_lr"] = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups if g["params"] and all(id(p) in head for p in g["params"])]
            self.before = {n: p.detach().clone() for n, p in model.named_parameters() if "modules_to_save" in n}

        def on_train_end(self, args, state, control, model=None, **kw):
            seen["moved"] = all(not torch.equal(self.before[n], p) for n, p in model.named_parameters() if n in self.before)

    for method in NEW:
        seen.clear()
        finetune(FinetuneConfig(model=str(bert), data=str(train), eval_data=str(train), method=method, rank=2,
                                max_steps=2, batch_size=8, head_lr=7e-3, eval_before=False,
                                output_dir=str(tmp_path / method)), progress=False, callbacks=[Spy()])
        assert seen["head_lr"] == [7e-3] and seen["moved"], (method, seen)
