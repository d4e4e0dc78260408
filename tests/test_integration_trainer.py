"""LoFT under transformers.Trainer: optimizer, clipping, accumulation, schedules, checkpoints."""

from __future__ import annotations

import pytest
import torch
from _tiny import make_bert, sentiment_records
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

import loft
from loft.integrations import LoFTTrainer, with_loft
from loft.integrations import trainer as trainer_module


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_bert(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def dataset(base):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    records = sentiment_records(64)
    enc = tok([r["text"] for r in records], padding="max_length", max_length=12, truncation=True)
    return [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": r["label"]}
            for i, r in enumerate(records)]


def peft_model(base, seed=0):
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], modules_to_save=["classifier"])
    return get_peft_model(model, config)


def targs(tmp_path, **kw):
    defaults = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, learning_rate=5e-3, max_steps=6,
                    report_to="none", disable_tqdm=True, save_strategy="no", logging_steps=1, seed=0,
                    use_cpu=True, dataloader_pin_memory=False)
    defaults.update(kw)
    return TrainingArguments(**defaults)


def trainable_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_trainer_builds_loft_and_learns(base, dataset, tmp_path):
    model = peft_model(base)
    trainer = LoFTTrainer(model=model, args=targs(tmp_path, max_steps=20), train_dataset=dataset,
                          loft_options={"head_lr": 2e-2})
    trainer.train()
    opt = trainer.loft_optimizer
    assert isinstance(opt, loft.LoFTAdamW)
    assert len(opt.pairs) == 4  # query + value in 2 layers
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    # the head trains at its own learning rate, the schedule scales both groups alike
    head = {id(p) for n, p in model.named_parameters() if "modules_to_save" in n and p.requires_grad}
    lrs = {("head" if id(g["params"][0]) in head else "pairs"): g["lr"] for g in opt.param_groups}
    assert set(lrs) == {"head", "pairs"}


def test_clipping_is_loft_not_trainer(base, dataset, tmp_path, monkeypatch):
    calls = []
    real = trainer_module.clip_grad_norm_
    monkeypatch.setattr(trainer_module, "clip_grad_norm_", lambda opt, m: calls.append(m) or real(opt, m))
    model = peft_model(base)
    trainer = LoFTTrainer(model=model, args=targs(tmp_path, max_steps=3, max_grad_norm=0.5), train_dataset=dataset)
    plain = []
    original = trainer.accelerator.clip_grad_norm_
    trainer.accelerator.clip_grad_norm_ = lambda params, max_norm, *a, **k: plain.append(max_norm) or original(params, max_norm, *a, **k)
    trainer.train()
    assert calls == [0.5, 0.5, 0.5]
    assert plain == []  # Trainer's own clipping never ran
    norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert len(norms) == 3 and all(n > 0 for n in norms)


def test_clipping_off_with_zero(base, dataset, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(trainer_module, "clip_grad_norm_", lambda *a: calls.append(a))
    trainer = LoFTTrainer(model=peft_model(base), args=targs(tmp_path, max_steps=2, max_grad_norm=0.0), train_dataset=dataset)
    trainer.train()
    assert calls == []


def test_gradient_accumulation_matches_big_batch(base, dataset, tmp_path):
    m1, m2 = peft_model(base), peft_model(base)
    LoFTTrainer(model=m1, args=targs(tmp_path / "a", per_device_train_batch_size=8, max_steps=4), train_dataset=dataset).train()
    accumulating = LoFTTrainer(model=m2, args=targs(tmp_path / "b", per_device_train_batch_size=4,
                                                    gradient_accumulation_steps=2, max_steps=4), train_dataset=dataset)
    # transformers' Trainer takes a model whose forward has **kwargs to average its own loss over
    # accumulation; sequence classifiers do not, so say so (docs/workflow.md, "Trainer")
    accumulating.loss_is_scaled_for_ga = False
    accumulating.train()
    s1, s2 = trainable_state(m1), trainable_state(m2)
    assert s1.keys() == s2.keys()
    for name in s1:  # float32 sums in another order, amplified by the r x r solves of early steps
        assert float((s1[name] - s2[name]).norm()) <= 5e-3 * float(s1[name].norm()) + 1e-7, name
    # and it trained: the factors moved away from PEFT's zero-initialised B
    assert any(float(s1[n].abs().max()) > 0 for n in s1 if "lora_B" in n)


def test_scheduler_scales_both_groups(base, dataset, tmp_path):
    seen = []

    class Spy(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kw):
            seen.append([g["lr"] for g in optimizer.param_groups])

    trainer = LoFTTrainer(model=peft_model(base), args=targs(tmp_path, max_steps=5, lr_scheduler_type="linear",
                                                              learning_rate=1e-3), train_dataset=dataset,
                          loft_options={"head_lr": 4e-3}, callbacks=[Spy()])
    trainer.train()
    assert len(seen) == 5
    firsts = [sorted(lrs) for lrs in seen]
    assert all(abs(hi / lo - 4.0) < 1e-9 for lo, hi in firsts[:-1])
    assert firsts[0][0] == pytest.approx(1e-3 * 4 / 5) and firsts[-1][0] == 0.0  # linear decay to zero


def test_checkpoint_resume_is_exact(base, dataset, tmp_path):
    full = peft_model(base)
    LoFTTrainer(model=full, args=targs(tmp_path / "full", max_steps=6), train_dataset=dataset).train()

    first = peft_model(base)
    args = targs(tmp_path / "ckpt", max_steps=6, save_strategy="steps", save_steps=3)

    class StopAt3(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:
                control.should_training_stop = True

    LoFTTrainer(model=first, args=args, train_dataset=dataset, callbacks=[StopAt3()]).train()
    checkpoint = tmp_path / "ckpt" / "checkpoint-3"
    assert (checkpoint / "optimizer.pt").is_file() and (checkpoint / "scheduler.pt").is_file()
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert any("exp_avg_sq" in st for st in saved["state"].values())

    resumed = peft_model(base, seed=123)  # different head init: everything must come from the checkpoint
    trainer = LoFTTrainer(model=resumed, args=args, train_dataset=dataset)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 6
    a, b = trainable_state(full), trainable_state(resumed)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7, msg=name)


def test_with_loft_subclass_and_refusals(base, dataset, tmp_path):
    class MyTrainer(Trainer):
        pass

    cls = with_loft(MyTrainer)
    assert issubclass(cls, MyTrainer) and cls.__name__ == "LoFTMyTrainer"
    trainer = cls(model=peft_model(base), args=targs(tmp_path, max_steps=1), train_dataset=dataset)
    trainer.train()
    assert isinstance(trainer.loft_optimizer, loft.LoFTAdamW)
    model = peft_model(base)
    with pytest.raises(ValueError, match="loft_options"):
        LoFTTrainer(model=model, args=targs(tmp_path), train_dataset=dataset,
                    optimizers=(torch.optim.AdamW(model.parameters()), None))
    with pytest.raises(ValueError, match="TrainingArguments"):
        LoFTTrainer(model=model, args=targs(tmp_path), train_dataset=dataset, loft_options={"max_grad_norm": 1.0})
