"""``--lr auto`` (loft/app/autolr.py): ``loft finetune`` and ``loft compare`` search the learning
rate on a validation split carved from the training data, within a stated budget, resumably and
deterministically; and ``loft.integrations.find_lr_with_trainer`` does it for a Trainer user.
Tiny models from configs; a few steps each."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from _tiny import sentiment_files, make_llama, sentiment_records, write_jsonl
from safetensors.torch import load_file
from transformers import TrainerCallback

import loft.app.finetune
from loft import lr_search
from loft.app.cli import main
from loft.app.compare import _how_searched, run_compare
from loft.app.config import default_lr
from loft.app.errors import LoftUsageError, RunInterrupted
from loft.app.finetune import FinetuneConfig, finetune
from loft.app.rundir import CONFIG_FILE, LR_SEARCH_FILE, check_output_dir


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """120 training reviews, 24 eval reviews (other texts: seed 1)."""
    return sentiment_files(tmp_path_factory.mktemp("data"), 120, 24)


pytestmark = pytest.mark.usefixtures("offline")


def lines(path) -> list[str]:
    return path.read_text().splitlines()


def config(bert, data, out, **kw) -> FinetuneConfig:
    """LoFT at rank 2, 40 steps of batch 8, --lr auto over 3 rates (trials of 1, 2 steps: 5 trials)."""
    settings = dict(model=str(bert), data=str(data[0]), eval_data=str(data[1]), output_dir=str(out), rank=2,
                    max_steps=40, batch_size=8, head_lr=1e-2, lr="auto", lr_search_budget=0.2, lr_search_points=3)
    return FinetuneConfig(**{**settings, **kw})


def spy_on_trials(monkeypatch) -> list[FinetuneConfig]:
    """Record the settings of every run :func:`finetune` starts (the trials among them)."""
    seen: list[FinetuneConfig] = []
    original = loft.app.finetune.finetune

    def spy(cfg, **kwargs):
        seen.append(cfg)
        return original(cfg, **kwargs)

    monkeypatch.setattr(loft.app.finetune, "finetune", spy)
    return seen


def test_finetune_lr_auto_states_its_budget_searches_on_training_data_and_trains_as_lr_would(
        bert, data, tmp_path, monkeypatch, capsys):
    trials = spy_on_trials(monkeypatch)
    out = tmp_path / "auto"
    args = ["finetune", "--model", bert, "--data", data[0], "--eval-data", data[1], "-o", out, "--max-steps", 40,
            "-b", 8, "--head-lr", "1e-2", "--rank", 2, "--lr", "auto", "--lr-search-budget", "0.6", "--quiet"]
    assert main([str(a) for a in args]) == 0
    printed = capsys.readouterr().out
    # the budget is stated before the search starts: 7 rates, 7 -> 4 -> 2 trials of 1, 2, 4 steps, 23 of 24 steps
    default = default_lr("loft", "classification")
    lowest, highest = (lr_search.lattice(lr_search.lattice_index(default) + d) for d in (-3, 3))  # 1/8 and 8 times it
    stated = printed.index(f"7 learning rates {lowest:g} ... {highest:g} around {default:g}, successive halving 7 -> 4 "
                           "-> 2 trials of 1, 2, 4 steps: 13 trials, 23 training steps (58% of the run's 40; budget 60% = 24)")
    assert stated < printed.index("Learning rate ") and "12 validation examples carved from the 120 training" in printed
    record = json.loads((out / LR_SEARCH_FILE).read_text())
    m = json.loads((out / "metrics.json").read_text())
    assert record["complete"] and record["lr"] in record["lrs"] and m["lr"] == record["lr"]
    assert m["lr_search"]["lr"] == record["lr"] and m["lr_search"]["trials"] == len(record["trials"]) == 13
    assert m["lr_search"]["steps"] == sum(t["steps"] for t in record["trials"]) == 23 <= m["lr_search"]["budget_steps"]
    assert (out / "lr_search.png").stat().st_size > 1000 and not (out / "lr_search").exists()  # scratch removed
    # 13 trials, each a short run on the training examples minus the validation split, scored on that split
    run, *trials = trials  # the run, then the trials it started
    assert run.lr == "auto" and not run.lr_trial and len(trials) == 13 and all(t.lr_trial for t in trials)
    assert [(t.lr, t.max_steps) for t in trials] == [(t["lr"], t["steps"]) for t in record["trials"]]
    assert record["validation"]["examples"] == len(record["validation"]["indices"]) == 12
    assert record["validation"]["of"] == 120 and set(record["validation"]["indices"]) <= set(range(120))
    assert all(t.data.endswith("lr_search/train.jsonl") and t.eval_data.endswith("lr_search/val.jsonl") for t in trials)
    assert all(t.rank == 2 and t.batch_size == 8 and t.head_lr == 1e-2 and t.seed == 0 for t in trials)
    # the run itself: exactly the run --lr <chosen> makes (all training data, the chosen rate)
    same = tmp_path / "explicit"
    explicit = ["finetune", "--model", bert, "--data", data[0], "--eval-data", data[1], "-o", same, "--max-steps", 40,
                "-b", 8, "--head-lr", "1e-2", "--rank", 2, "--lr", record["lr"], "--quiet"]
    assert main([str(a) for a in explicit]) == 0
    m2 = json.loads((same / "metrics.json").read_text())
    assert m2["lr_search"] is None and m2["eval_loss"] == m["eval_loss"] and m2["num_train"] == m["num_train"] == 120
    a, b = load_file(out / "adapter_model.safetensors"), load_file(same / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_the_trials_eval_data_are_carved_from_training_never_the_eval_data(bert, data, tmp_path, monkeypatch):
    seen: list[tuple[list[str], list[str]]] = []
    original = loft.app.finetune.finetune

    def spy(cfg, **kwargs):
        if cfg.lr_trial:
            seen.append((lines(Path(cfg.data)), lines(Path(cfg.eval_data))))
        return original(cfg, **kwargs)

    monkeypatch.setattr(loft.app.finetune, "finetune", spy)
    finetune(config(bert, data, tmp_path / "run"), progress=False)
    train, test = lines(data[0]), lines(data[1])
    assert len(seen) == 5
    for t, v in seen:
        assert len(v) == 12 and len(t) == 108 and sorted(t + v) == sorted(train)  # a split of the training file
        assert not set(v) & (set(test) - set(train))  # nothing of the eval file


def fake_trials(monkeypatch, accuracy) -> list[float]:
    """Trials that do not train: each returns ``accuracy(lr)`` (loss 0.7); the run itself trains."""
    original = loft.app.finetune.finetune
    rates: list[float] = []

    def fake(cfg, **kwargs):
        if not cfg.lr_trial:
            return original(cfg, **kwargs)
        rates.append(cfg.lr)
        return {"eval_accuracy": accuracy(cfg.lr), "eval_loss": 0.7}

    monkeypatch.setattr(loft.app.finetune, "finetune", fake)
    return rates


@pytest.mark.parametrize("best", [0.55, 1.0])
def test_the_default_is_kept_unless_the_best_trial_beats_the_majority_answer(bert, data, tmp_path, monkeypatch,
                                                                               capsys, best):
    default = default_lr("loft", "classification")
    high = lr_search.lattice(lr_search.lattice_index(default) + 1)
    rates = fake_trials(monkeypatch, lambda lr: best if lr == high else 0.5)
    out = tmp_path / "run"
    metrics = finetune(config(bert, data, out), progress=False)
    printed = capsys.readouterr().out
    record = json.loads((out / LR_SEARCH_FILE).read_text())
    assert len(rates) == 5 and record["best_lr"] == high and record["rule"] == lr_search.AUTO_RULE
    # the floor: always the most frequent label of the 12 validation examples, plus two standard errors
    labels = [json.loads(line)["label"] for line in lines(data[0])]
    floor = lr_search.Floor.majority([labels[i] for i in record["validation"]["indices"]])
    assert record["floor"]["threshold"] == pytest.approx(floor.threshold) and 0.5 <= floor.metric < floor.threshold
    assert f"must score above {floor.threshold:.3f}" in printed  # stated before the search
    kept = best <= floor.threshold
    assert kept == (best == 0.55) and record["kept_default"] is kept
    assert metrics["lr"] == record["lr"] == (default if kept else high)
    assert metrics["lr_search"]["kept_default"] is kept and metrics["lr_search"]["best_lr"] == high
    if kept:
        assert f"Learning rate {default:g} (the default) kept: no trial scored above {floor.threshold:.3f}" in printed
        assert "--lr-search-budget" in printed
    else:
        assert f"Learning rate {high:g} chosen (validation accuracy 1.0000" in printed


@pytest.mark.parametrize("high_scores", [0.905, 0.95])
def test_rule_3_keeps_the_default_unless_another_rate_gains_min_gain(bert, data, tmp_path, monkeypatch, capsys,
                                                                     high_scores):
    default = default_lr("loft", "classification")
    high = lr_search.lattice(lr_search.lattice_index(default) + 1)
    fake_trials(monkeypatch, lambda lr: high_scores if lr == high else 0.9 if lr == default else 0.6)
    out = tmp_path / "run"
    metrics = finetune(config(bert, data, out, lr_search_min_gain=0.01, lr_search_cap=False), progress=False)
    printed = capsys.readouterr().out
    record = json.loads((out / LR_SEARCH_FILE).read_text())
    kept = high_scores < 0.91
    assert record["rule"] == metrics["lr_search"]["rule"] == 3 and record["min_gain"] == 0.01
    assert record["best_lr"] == high and metrics["lr"] == (default if kept else high)
    assert metrics["lr_search"]["kept_because"] == ("gain" if kept else None)
    assert "must beat the default's trial in the last rung by at least 0.01" in printed  # stated before the search
    assert (f"Learning rate {default:g} (the default) kept: the best trial, {high:g}" in printed) is kept
    # the gain is part of the run's identity: the same folder with another gain is another run
    rule2 = dict(lr_search_min_gain=0.0, lr_search_cap=False)
    assert config(bert, data, out, **rule2).identity() != config(bert, data, out, lr_search_min_gain=0.01).identity()
    assert "lr_search_min_gain" not in config(bert, data, out, **rule2).identity()  # rule 2's runs keep their identity


def test_rule_4_never_chooses_a_rate_at_or_above_a_collapsed_trials(bert, data, tmp_path, monkeypatch, capsys):
    default = default_lr("loft", "classification")
    low, high = (lr_search.lattice(lr_search.lattice_index(default) + d) for d in (-1, 1))
    # the default's trial falls to chance while half of it learns; twice it wins (LoFT's seed 23, movie sentiment)
    fake_trials(monkeypatch, lambda lr: 0.3 if lr == default else 1.0 if lr == high else 0.97)
    rule2 = dict(lr_search_min_gain=0.0, lr_search_cap=False)
    metrics = finetune(config(bert, data, tmp_path / "rule2", **rule2), progress=False)
    assert metrics["lr"] == high and metrics["lr_search"]["cap_lr"] is None and metrics["lr_search"]["rule"] == 2
    out = tmp_path / "run"
    metrics = finetune(config(bert, data, out), progress=False)  # --lr auto's rule: 4
    printed = capsys.readouterr().out
    record = json.loads((out / LR_SEARCH_FILE).read_text())
    assert record["rule"] == metrics["lr_search"]["rule"] == 4 and record["cap"] is True
    assert record["cap_lr"] == metrics["lr_search"]["cap_lr"] == default and metrics["lr"] == record["lr"] == low
    assert "No rate is chosen at or above one whose trial falls to the floor" in printed  # stated before the search
    assert f"Learning rate {low:g} chosen" in printed and f"Rates from {default:g} up were not chosen" in printed
    assert "lr_search_cap" not in config(bert, data, out, **rule2).identity()  # earlier runs keep their identity
    assert {k: config(bert, data, out).identity()[k] for k in ("lr_search_cap", "lr_search_min_gain")} == {
        "lr_search_cap": True, "lr_search_min_gain": lr_search.MIN_GAIN}
    # a folder of an earlier version's --lr auto run (rule 2: no gain, no cap) is another run, and says why
    earlier = tmp_path / "earlier"
    finetune(config(bert, data, earlier, **rule2), progress=False)
    with pytest.raises(LoftUsageError, match=r"lr_search_min_gain: off \(rule 2, the --lr auto of earlier versions\) "
                                             r"there, 0.01 now; lr_search_cap: off .* there, True now"):
        check_output_dir(earlier, config(bert, data, earlier).identity(), overwrite=False, resume=True)
    # and the other way: a rule-4 run's folder is not continued under rule 2, whose identity leaves both out
    with pytest.raises(LoftUsageError, match=r"lr_search_min_gain: 0.01 there, off .* now; lr_search_cap: True there"):
        check_output_dir(out, config(bert, data, out, **rule2).identity(), overwrite=False, resume=True)
    quantized = tmp_path / "quantized"  # the same for any setting left out where off: a 4-bit run's folder
    quantized.mkdir()
    settings = config(bert, data, quantized, lr=1e-3).identity()
    (quantized / CONFIG_FILE).write_text(json.dumps({"settings": {**settings, "load_in_4bit": True}}))
    with pytest.raises(LoftUsageError, match=r"load_in_4bit: True there, the default now"):
        check_output_dir(quantized, settings, overwrite=False, resume=True)
    # a run at a given rate has no search settings in its identity, whatever they are
    fixed = config(bert, data, out, lr=1e-3).identity()
    assert fixed == config(bert, data, out, lr=1e-3, **rule2).identity() and not any("lr_search" in k for k in fixed)


def test_the_gain_and_the_cap_apply_where_the_task_scores_accuracy(bert, data, tmp_path):
    from loft.app.autolr import _checks

    floor = lr_search.Floor.majority([0, 0, 1])
    assert _checks(config(bert, data, tmp_path), floor) == {"min_gain": lr_search.MIN_GAIN, "cap": True}
    assert _checks(config(bert, data, tmp_path), None) == {"min_gain": 0.0, "cap": False}  # ranked by the loss alone
    rule2 = config(bert, data, tmp_path, lr_search_min_gain=0.0, lr_search_cap=False)
    assert _checks(rule2, floor) == {"min_gain": 0.0, "cap": False}


class CtrlCInTrial(TrainerCallback):
    """Ctrl-C (SIGINT to this process) at the end of step 1."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)  # the handler runs at the next bytecode boundary


def test_ctrl_c_in_a_trial_then_resume_chooses_what_an_uninterrupted_search_chooses(bert, data, tmp_path, monkeypatch):
    original = loft.app.finetune.finetune
    count = {"trials": 0}

    def interrupt_fourth_trial(cfg, **kwargs):
        if cfg.lr_trial:
            count["trials"] += 1
            if count["trials"] == 4:  # the first trial of the second rung (2 steps): stopped after its step 1
                kwargs["callbacks"] = [*kwargs.get("callbacks", []), CtrlCInTrial()]
        return original(cfg, **kwargs)

    out = tmp_path / "interrupted"
    with monkeypatch.context() as m:
        m.setattr(loft.app.finetune, "finetune", interrupt_fourth_trial)
        with pytest.raises(RunInterrupted) as info:
            finetune(config(bert, data, out), progress=False)
    assert info.value.exit_code == 130
    assert "searching the learning rate" in str(info.value) and "search so far is kept" in str(info.value)
    assert "--resume" in str(info.value)
    kept = json.loads((out / LR_SEARCH_FILE).read_text())
    assert len(kept["trials"]) == 3 and not kept["complete"] and (out / CONFIG_FILE).is_file()
    assert list((out / "lr_search").glob("trial-*/checkpoints/checkpoint-*"))  # the interrupted trial's checkpoint
    # a plain rerun does not throw the search away
    with pytest.raises(LoftUsageError, match="holds an unfinished run of these settings.*--resume"):
        finetune(config(bert, data, out), progress=False)
    resumed = finetune(config(bert, data, out), resume=True, progress=False)
    straight = finetune(config(bert, data, tmp_path / "straight"), progress=False)
    a, b = (json.loads((d / LR_SEARCH_FILE).read_text()) for d in (out, tmp_path / "straight"))
    assert [(t["lr"], t["steps"]) for t in a["trials"]] == [(t["lr"], t["steps"]) for t in b["trials"]]
    for ta, tb in zip(a["trials"], b["trials"]):
        assert ta["metric"] == tb["metric"] and ta["loss"] == pytest.approx(tb["loss"], rel=1e-6)
    assert resumed["lr"] == straight["lr"] == a["lr"] == b["lr"]
    assert resumed["eval_loss"] == pytest.approx(straight["eval_loss"], rel=1e-6)


def test_ctrl_c_before_the_first_trial_has_a_checkpoint_leaves_the_folder_as_it_was(bert, data, tmp_path, monkeypatch):
    def ctrl_c_at_once(cfg, **kwargs):
        raise KeyboardInterrupt  # as a Ctrl-C while the first trial loads its model

    monkeypatch.setattr(loft.app.finetune, "finetune", ctrl_c_at_once)
    out = tmp_path / "run"
    with pytest.raises(RunInterrupted) as info:
        finetune(config(bert, data, out), progress=False)
    assert "nothing was kept" in str(info.value) and not out.exists()  # the split it had written is gone too


def test_a_resumed_run_whose_search_is_complete_does_not_search_again(bert, data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = config(bert, data, out)
    with pytest.raises(RunInterrupted):  # Ctrl-C in the run itself (its callbacks are not the trials'), at step 1
        finetune(cfg, progress=False, callbacks=[CtrlCInTrial()])
    record = (out / LR_SEARCH_FILE).read_text()
    trials = spy_on_trials(monkeypatch)
    metrics = finetune(cfg, resume=True, progress=False)
    assert trials == []  # no trial ran again
    assert json.loads(record)["complete"] and metrics["lr"] == json.loads(record)["lr"]
    assert metrics["resumed_from"] and metrics["steps"] == 40 and metrics["lr_search"]["trials"] == 5


def test_search_progress_makes_an_unfinished_run_one_to_resume(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    identity = {"x": 1}
    (out / CONFIG_FILE).write_text(json.dumps({"settings": identity}))
    (out / LR_SEARCH_FILE).write_text(json.dumps({"trials": []}))
    assert check_output_dir(out, identity, overwrite=False, resume=False).action == "restart"  # nothing to lose
    (out / LR_SEARCH_FILE).write_text(json.dumps({"trials": [{"lr": 1e-4}]}))
    plan = check_output_dir(out, identity, overwrite=False, resume=True)
    assert (plan.action, plan.checkpoint) == ("resume", None)
    with pytest.raises(LoftUsageError, match="unfinished run .* --resume"):
        check_output_dir(out, identity, overwrite=False, resume=False)
    (out / LR_SEARCH_FILE).unlink()
    (out / "lr_search" / "trial-0.0001-2" / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    assert check_output_dir(out, identity, overwrite=False, resume=True).action == "resume"  # a trial's checkpoint


@pytest.mark.parametrize("extra, message", [
    (["--max-steps", "10"], "--lr auto: a search over 7 learning rates takes at least 23 training steps (trials of 1, "
                            "2, 4 ... steps), but the budget, 25% of the run's 10 steps, is 2. Give --lr-search-budget "
                            "2.3 (or more), or at least 92 steps (--max-steps), or give --lr a number."),
    (["--max-steps", "100", "--lr-search-budget", "0"], "--lr-search-budget must be a fraction > 0"),
    (["--max-steps", "100", "--lr-search-budget", "nan"], "--lr-search-budget must be a fraction > 0"),
])
def test_a_budget_too_small_is_refused_before_anything_is_written(bert, data, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    args = ["finetune", "--model", bert, "--data", data[0], "--eval-data", data[1], "-o", out, "--lr", "auto", *extra]
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not out.exists()


def test_too_little_data_or_a_bad_lr_is_refused(bert, tmp_path, capsys):
    small = write_jsonl(tmp_path / "small.jsonl", sentiment_records(60))
    args = ["finetune", "--model", bert, "--data", small, "-o", tmp_path / "run", "--max-steps", "200"]
    assert main([str(a) for a in [*args, "--lr", "auto"]]) == 2
    err = capsys.readouterr().err
    assert "--lr auto scores its trials on 10% of the training examples" in err and "at least 95 training" in err
    assert "(this data has 54)" in err  # 60 minus the 10% held out as eval data
    assert main([str(a) for a in [*args, "--lr", "fast"]]) == 2
    assert "--lr takes a number (e.g. 2e-4) or auto, got 'fast'." in capsys.readouterr().err
    assert main(["federate", "--lr", "auto"]) == 2
    assert "--lr auto (a learning-rate search) is for loft finetune and loft compare" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_compare_lr_auto_searches_each_methods_own_rate(bert, data, tmp_path):
    out = tmp_path / "cmp"
    result = run_compare(methods=["loft", "lora"], ranks=[2], full=False, lrs={"loft": "auto", "lora": "auto"},
                         output_dir=str(out), progress=False, model=str(bert), data=str(data[0]),
                         eval_data=str(data[1]), max_steps=40, batch_size=8, lr_search_budget=0.2, lr_search_points=3)
    rows = {r["method"]: r for r in result["rows"]}
    for method, default in ((m, default_lr(m, "classification")) for m in ("loft", "lora")):
        record = json.loads((out / f"{method}-r2" / LR_SEARCH_FILE).read_text())
        assert record["default_lr"] == default and record["lrs"] == [lr_search.lattice(lr_search.lattice_index(default) + d)
                                                                     for d in (-1, 0, 1)]
        assert rows[method]["lr"] == record["lr"] and record["method"] == method
        # the table says how each rate came about: chosen by the search, or the default kept (the floor, the gain)
        assert rows[method]["lr_search"] == ("default kept" if record["kept_default"] else "chosen")
    # a kept default that a collapse capped: the rate below the cap, said as such
    capped = {"lr_search": {"kept_default": True, "lr": 2e-4, "default_lr": 4e-4, "cap_lr": 4e-4}}
    assert _how_searched(capped) == "below the cap" and _how_searched({"lr_search": None}) is None
    assert json.loads((out / "compare_config.json").read_text())["lrs"] == {"loft": "auto", "lora": "auto"}
    header = result["markdown"].splitlines()[0]
    assert header.endswith("| lr_search |") and "lr_search" in result["csv"].splitlines()[0]


# ----------------------------------------------------------------------------- the Trainer entry
def _token_rows(n: int, seed: int) -> list[dict]:
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        ids = [rng.randrange(5, 40) for _ in range(8)]
        rows.append({"input_ids": ids, "attention_mask": [1] * 8, "labels": ids})
    return rows


def test_find_lr_with_trainer_searches_resumes_from_its_record_and_leaves_eval_data_alone(tmp_path):
    import peft
    import transformers

    from loft.integrations import LoFTTrainer, find_lr_with_trainer

    folder = make_llama(tmp_path / "llama")
    built = {"n": 0}

    def model_init(fail_after=None):
        def make():
            built["n"] += 1
            if fail_after is not None and built["n"] > fail_after:
                raise KeyboardInterrupt  # as a Ctrl-C during the third trial's set-up
            base = transformers.AutoModelForCausalLM.from_pretrained(folder)
            return peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
        return make

    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), learning_rate=2e-4, max_steps=20,
                                          per_device_train_batch_size=4, report_to="none", use_cpu=True, seed=3)
    train = _token_rows(60, 0)
    common = dict(trainer_class=LoFTTrainer, budget=0.5, points=3, progress=False,
                  data_collator=transformers.default_data_collator)
    record = tmp_path / "lr_search.json"
    with pytest.raises(KeyboardInterrupt):
        find_lr_with_trainer(model_init(fail_after=2), args, train, record=record, **common)
    assert len(json.loads(record.read_text())["trials"]) == 2
    built["n"] = 0
    resumed = find_lr_with_trainer(model_init(), args, train, record=record, **common)
    assert built["n"] == resumed.plan.trials - 2  # only the trials the record did not have
    built["n"] = 0
    straight = find_lr_with_trainer(model_init(), args, train, **common)
    assert built["n"] == straight.plan.trials == 5 and straight.plan.lrs == [1e-4, 2e-4, 4e-4]
    assert resumed.lr == straight.lr in straight.plan.lrs
    assert [(t.lr, t.steps) for t in resumed.trials] == [(t.lr, t.steps) for t in straight.trials]
    assert [t.loss for t in resumed.trials] == pytest.approx([t.loss for t in straight.trials], rel=1e-6)
    assert json.loads(record.read_text())["lr"] == resumed.lr and args.learning_rate == 2e-4  # args untouched
    built["n"] = 0  # rule 3 on the finished record: no trial reruns; ranked by the loss alone, the gain never applies
    again = find_lr_with_trainer(model_init(), args, train, record=record, min_gain=0.01, **common)
    assert built["n"] == 0 and again.min_gain == 0.01 and again.lr == resumed.lr and again.kept_because is None
    assert json.loads(record.read_text())["rule"] == lr_search.GAIN_RULE
    with pytest.raises(ValueError, match="cap tells a collapsed trial by the floor that label_key sets"):
        find_lr_with_trainer(model_init(), args, train, record=record, cap=True, **common)  # no floor here
    with pytest.raises(ValueError, match="do not pass eval_dataset"):
        find_lr_with_trainer(model_init(), args, train, eval_dataset=train, **common)
    with pytest.raises(lr_search.SearchTooSmall):
        find_lr_with_trainer(model_init(), args, train, **{**common, "budget": 0.1})


def test_find_lr_with_trainer_label_key_sets_the_majority_floor(tmp_path):
    import torch
    import transformers

    from loft.integrations import find_lr_with_trainer
    from loft.integrations.lr_search import _floor

    rows = [{"input_ids": [1, 2], "labels": torch.tensor(i % 3 == 0)} for i in range(30)]  # 0-d tensors
    floor = _floor(rows, "labels")
    assert floor == lr_search.Floor.majority([False] * 20 + [True] * 10) and floor.metric == pytest.approx(2 / 3)
    with pytest.raises(TypeError, match="token-level labels have no majority answer"):
        _floor([{"labels": [1, 2, 3]}], "labels")
    with pytest.raises(KeyError, match="has no such field"):
        _floor([{"label": 1}], "labels")
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), learning_rate=2e-4, max_steps=20,
                                          report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="pass metric"):  # refused before any trial (model_init is never called)
        find_lr_with_trainer(lambda: 1 / 0, args, _token_rows(60, 0), label_key="labels", progress=False)



def test_find_lr_with_trainer_hands_its_floor_gain_and_cap_to_the_search(tmp_path, monkeypatch):
    import transformers

    import loft.integrations.lr_search as integration
    from loft.integrations import find_lr_with_trainer

    seen = {}
    monkeypatch.setattr(integration, "find_lr", lambda score, **kw: seen.update(kw) or "searched")
    rows = [{"input_ids": [1, 2], "labels": i % 3} for i in range(40)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), learning_rate=2e-4, max_steps=100,
                                          report_to="none", use_cpu=True, seed=1)
    got = find_lr_with_trainer(lambda: 1 / 0, args, rows, metric="eval_accuracy", label_key="labels", min_gain=0.01,
                               cap=True, progress=False)
    assert got == "searched" and seen["cap"] is True and seen["min_gain"] == 0.01
    assert seen["floor"].what.endswith("4 validation examples") and seen["default_lr"] == 2e-4
    # by default --lr auto's rule (4) as far as the metric and the floor allow; 0 and False: rule 2
    find_lr_with_trainer(lambda: 1 / 0, args, rows, metric="eval_accuracy", label_key="labels", progress=False)
    assert (seen["min_gain"], seen["cap"]) == (lr_search.MIN_GAIN, True) and lr_search.AUTO_RULE == 4
    find_lr_with_trainer(lambda: 1 / 0, args, rows, metric="eval_accuracy", progress=False)  # no floor: no cap
    assert (seen["min_gain"], seen["cap"], seen["floor"]) == (lr_search.MIN_GAIN, False, None)
    find_lr_with_trainer(lambda: 1 / 0, args, rows, progress=False)  # ranked by the loss: no gain either
    assert (seen["min_gain"], seen["cap"]) == (0.0, False)
    find_lr_with_trainer(lambda: 1 / 0, args, rows, metric="eval_accuracy", label_key="labels", min_gain=0, cap=False,
                         progress=False)
    assert (seen["min_gain"], seen["cap"]) == (0, False)
