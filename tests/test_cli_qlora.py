"""``loft finetune --load-in-4bit / --load-in-8bit`` (QLoRA) end to end on tiny models, on the
CPU (bitsandbytes >= 0.50): the base's linear layers are quantized, the adapter trains and
reloads with PEFT on the full-precision base, peak memory is reported, bad combinations are
refused. Nothing is downloaded."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from _tiny import make_bert, sentiment_records, write_jsonl

bnb = pytest.importorskip("bitsandbytes")

from peft import PeftModel, get_peft_model_state_dict  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback  # noqa: E402

from loft.app.cli import main  # noqa: E402
from loft.app.finetune import FinetuneConfig, finetune  # noqa: E402

LAYER = {4: bnb.nn.Linear4bit, 8: bnb.nn.Linear8bitLt}


class _Layers(TrainerCallback):
    """Records the class of every adapted layer's base and of the head when training starts."""

    def __init__(self) -> None:
        self.bases: set[type] = set()
        self.head: list[type] = []

    def on_train_begin(self, args, state, control, model=None, **kw):
        for name, module in model.named_modules():
            if hasattr(module, "base_layer") and hasattr(module, "lora_A"):
                self.bases.add(type(module.base_layer))
            if name.endswith("modules_to_save.default"):
                self.head.append(type(module))


def _nll(model, ids):
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


@pytest.mark.parametrize("bits,method", [(4, "loft"), (4, "lora"), (4, "dora"), (8, "loft")])
def test_quantized_base_trains_and_the_adapter_reloads_on_the_full_precision_base(bits, method, llama, mc_data, tmp_path):
    out = tmp_path / "run"
    layers = _Layers()
    cfg = FinetuneConfig(model=str(llama), data=str(mc_data[0]), eval_data=str(mc_data[1]), method=method, rank=2,
                         max_steps=8, batch_size=8, lr=5e-3, output_dir=str(out), **{f"load_in_{bits}bit": True})
    m = finetune(cfg, progress=False, callbacks=[layers])
    assert layers.bases == {LAYER[bits]}  # every adapted layer sits on a quantized base layer
    assert m["quantization"] == f"{bits}bit" and m["steps"] == 8
    assert m["eval_loss"] < m["eval_loss_before"] - 0.05, m  # the adapter learns on the quantized base
    full = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)
    assert m["base_model_mb"] < full.get_memory_footprint() / 2**20
    assert m["peak_memory_mb"] > 0 and m["load_peak_memory_mb"] > 0 and m["peak_memory_kind"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] == (method == "dora") and config["r"] == 2
    # the saved adapter, on the full-precision base
    ids = torch.randint(4, 30, (4, 12), generator=torch.Generator().manual_seed(0))
    bare = _nll(full, ids)
    reloaded = PeftModel.from_pretrained(full, out)
    saved = load_file(out / "adapter_model.safetensors")
    loaded = get_peft_model_state_dict(reloaded)
    assert saved.keys() == loaded.keys() and saved
    for key, value in saved.items():
        assert torch.equal(loaded[key].detach(), value), key
    assert _nll(reloaded, ids) != bare  # the adapter changes the full-precision model


def test_classifier_head_stays_full_precision_and_trains(tmp_path):
    bert = make_bert(tmp_path / "bert")
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_records(32))
    layers = _Layers()
    out = tmp_path / "run"
    m = finetune(FinetuneConfig(model=str(bert), data=str(train), eval_data=str(train), rank=2, max_steps=3,
                                batch_size=8, load_in_4bit=True, eval_before=False, output_dir=str(out)),
                 progress=False, callbacks=[layers])
    assert layers.bases == {bnb.nn.Linear4bit} and layers.head == [torch.nn.Linear]
    assert m["fresh_modules"] == ["classifier"] and m["head_lr"] is not None
    base = AutoModelForSequenceClassification.from_pretrained(bert, num_labels=2)
    reloaded = PeftModel.from_pretrained(base, out)
    saved = load_file(out / "adapter_model.safetensors")
    loaded = get_peft_model_state_dict(reloaded)
    head = [k for k in saved if "classifier" in k]
    assert head and saved.keys() == loaded.keys()
    assert all(torch.equal(loaded[k].detach(), saved[k]) for k in saved)


def test_cli_prints_peak_memory_and_compare_leaves_full_out(llama, mc_data, tmp_path, capsys):
    args = ["--model", llama, "--data", mc_data[0], "--eval-data", mc_data[1], "--max-steps", "2", "-b", "8", "--quiet",
            "--load-in-4bit"]
    assert main(["finetune", *map(str, args), "--rank", "2", "-o", str(tmp_path / "one")]) == 0
    printed = capsys.readouterr().out
    assert "Peak memory" in printed and "4-bit base" in printed
    assert main(["compare", *map(str, args), "--methods", "loft,lora", "--ranks", "2", "-o", str(tmp_path / "cmp")]) == 0
    assert "Full fine-tuning left out" in capsys.readouterr().out
    rows = list(csv.DictReader((tmp_path / "cmp" / "compare.csv").open()))
    assert [r["method"] for r in rows] == ["loft", "lora"] and all(float(r["peak_memory_mb"]) > 0 for r in rows)


class _CtrlCAt(TrainerCallback):
    """A real Ctrl-C (SIGINT to this process) at the end of step ``step``; records the dtypes of
    the trainable parameters at every step."""

    def __init__(self, step: int | None = None) -> None:
        self.step, self.dtypes = step, set()

    def on_step_end(self, args, state, control, model=None, **kw):
        self.dtypes |= {p.dtype for p in model.parameters() if p.requires_grad}
        if state.global_step == self.step:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGINT)


def test_instruction_tuning_on_a_4bit_base_trains_a_float32_adapter_and_resumes_bit_exactly(llama, mc_data, tmp_path):
    """TRL's SFTTrainer casts a quantized model's adapter to bfloat16; a resumed run reloads it in
    float32 (PEFT's load_adapter), so --resume was not bit-exact (issue 32). The adapter is float32
    throughout, and an interrupted, resumed run ends exactly where the uninterrupted one does."""
    from loft.app.errors import RunInterrupted

    records = [json.loads(line) for line in mc_data[0].read_text().splitlines()]
    data = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": r["question"], "completion": " " + r["choices"][r["answer"]]}
                                               for r in records])

    def config(out):
        return FinetuneConfig(model=str(llama), data=str(data), rank=2, max_steps=5, batch_size=8, lr=5e-3,
                              load_in_4bit=True, eval_before=False, output_dir=str(out))

    watch = _CtrlCAt()
    straight = finetune(config(tmp_path / "straight"), progress=False, callbacks=[watch])
    assert watch.dtypes == {torch.float32}
    with pytest.raises(RunInterrupted):
        finetune(config(tmp_path / "run"), progress=False, callbacks=[_CtrlCAt(2)])  # checkpoint-3
    resumed = finetune(config(tmp_path / "run"), resume=True, progress=False)
    assert resumed["resumed_from"].endswith("checkpoint-3")
    assert resumed["loss_curve"] == straight["loss_curve"] and resumed["train_loss"] == straight["train_loss"]
    a, b = load_file(tmp_path / "straight" / "adapter_model.safetensors"), load_file(tmp_path / "run" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == torch.float32 for k in a)


# ----------------------------------------------------------------------------- bad input
def _fails(capsys, *args):
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("loft: error:") and "Traceback" not in err
    return err


@pytest.mark.parametrize("extra,message", [
    (["--load-in-4bit", "--load-in-8bit"], "not both"),
    (["--load-in-4bit", "--method", "full"], "--method full cannot train a quantized base"),
    (["--load-in-8bit", "--method", "pissa"], "--method pissa cannot start from a quantized base"),
])
def test_bad_combinations_are_refused_before_anything_is_written(extra, message, capsys, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_records(20))
    err = _fails(capsys, "finetune", "--data", data, "-o", tmp_path / "o", *extra)
    assert message in err
    assert not (tmp_path / "o").exists()


def test_missing_bitsandbytes_names_the_extra(capsys, tmp_path, monkeypatch):
    import importlib.util

    from loft.app import config

    real = importlib.util.find_spec
    monkeypatch.setattr(config.importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_records(20))
    err = _fails(capsys, "finetune", "--data", data, "-o", tmp_path / "o", "--load-in-4bit")
    assert "bitsandbytes" in err and "torch-loft[qlora]" in err
    assert not (tmp_path / "o").exists()


def test_a_model_with_nothing_to_quantize_is_refused(capsys, tmp_path, monkeypatch):
    from loft.app import quantize

    monkeypatch.setattr(quantize, "quantized_layers", lambda model: [])  # e.g. every linear layer tied or fresh
    bert = make_bert(tmp_path / "bert")
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_records(20))
    err = _fails(capsys, "finetune", "--model", bert, "--data", data, "-o", tmp_path / "o", "--load-in-8bit")
    assert "--load-in-8bit" in err and "no linear layer that bitsandbytes can quantize" in err and "Drop" in err
    assert not (tmp_path / "o").exists()
