"""Instruction tuning (``loft finetune`` on chat / prompt-completion / Alpaca data through TRL's
SFTTrainer), its evaluation, ``loft generate`` and ``loft merge``, on a tiny Llama built from a
config (no downloads)."""

from __future__ import annotations

import io
import json
import math
import random

import pytest
import torch
from _tiny import FILLER, MC_WORDS, count_fused_head_rows, make_llama, write_jsonl
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from loft import LoFTAdamW
from loft.app.cli import main
from loft.app.config import default_lr, default_lr_note
from loft.app.data import builtin_path, read_records
from loft.app.finetune import FinetuneConfig, build_run, finetune, plan_run, prepare_folder
from loft.app.status import RunStatus
from loft.app.tasks import InstructionTask, make_task
from loft.app.tasks.instruction import ALPACA_PROMPT, ANSWER_TOKENS, first_answer, normalize_answer
from loft.integrations import LoFTTrainerMixin

trl = pytest.importorskip("trl")

#: a chat template over words the tiny tokenizer knows ("user" / "assistant" become [UNK])
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}assistant : {% endif %}")
MOODS = ["happy", "sad", "angry", "calm"]
FAST = ["--max-steps", "3", "--batch-size", "4", "--quiet", "--lr", "1e-2"]


def run(*args) -> int:
    return main([str(a) for a in args])


def questions(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        who, mood = rng.choice(["kai", "jan"]), rng.choice(MOODS)
        out.append((f"{who} felt {mood} . what will {who} want ?", mood))
    return out


def word_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct prompts of random words the tiny tokenizer knows."""
    rng = random.Random(seed)
    return list(dict.fromkeys(" ".join(rng.sample(FILLER + MC_WORDS, 6)) for _ in range(n)))


def records(fmt: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` records of format ``fmt`` (the answer: the mood in the question)."""
    out = []
    for q, mood in questions(n, seed):
        if fmt == "chat":
            out.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": mood}]})
        elif fmt == "prompt_completion":
            out.append({"prompt": q, "completion": " " + mood})
        else:
            head, _, tail = q.partition(" . ")
            out.append({"instruction": tail, "input": head + " .", "output": mood})
    return out


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """Tiny Llama whose tokenizer has a chat template."""
    folder = make_llama(tmp_path_factory.mktemp("llama"))
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def plain_llama(tmp_path_factory):
    """Tiny Llama without a chat template."""
    return make_llama(tmp_path_factory.mktemp("plain_llama"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft_data")
    return {fmt: (write_jsonl(d / f"{fmt}_train.jsonl", records(fmt, 24)),
                  write_jsonl(d / f"{fmt}_test.jsonl", records(fmt, 6, seed=1)))
            for fmt in ("chat", "prompt_completion", "alpaca")}


@pytest.fixture(scope="module")
def loft_run(llama, data, tmp_path_factory):
    """A finished LoFT run on prompt/completion data (the adapter moved: high lr)."""
    out = tmp_path_factory.mktemp("runs") / "pc-loft"
    train, test = data["prompt_completion"]
    assert run("finetune", "--model", llama, "--data", train, "--eval-data", test, "-o", out, "--rank", "2", *FAST) == 0
    return out


def _plan_and_build(cfg: FinetuneConfig):
    status = RunStatus(cfg, progress=False)
    plan, inputs = plan_run(cfg, overwrite=False, resume=False, status=status)
    built = build_run(plan, inputs, prepare_folder(plan, status), callbacks=None, status=status)
    return plan, inputs, built


# ----------------------------------------------------------------------------- formats
def test_every_format_is_detected_and_becomes_prompt_completion(tmp_path):
    chat = records("chat", 2)
    task = make_task([{**r, "_line": i + 1} for i, r in enumerate(chat)], "c.jsonl", chat, "c.jsonl")
    assert isinstance(task, InstructionTask) and task.kind == "instruction" and task.train_format == "chat"
    first = task.train_items[0]
    assert first.prompt == chat[0]["messages"][:1] and first.completion == chat[0]["messages"][1:]
    assert first.conversational and first.reference == chat[0]["messages"][1]["content"]

    pc = records("prompt_completion", 2)
    task = make_task(pc, "p.jsonl", pc, "p.jsonl")
    assert task.train_format == "prompt_completion"
    assert (task.train_items[0].prompt, task.train_items[0].completion) == (pc[0]["prompt"], pc[0]["completion"])

    alpaca = records("alpaca", 1) + [{"instruction": "say yes", "output": "yes"}]
    task = make_task(alpaca, "a.jsonl", alpaca, "a.jsonl")
    assert task.train_format == "alpaca"
    with_input, without = task.train_items
    assert with_input.prompt == ALPACA_PROMPT["input"].format(instruction=alpaca[0]["instruction"], input=alpaca[0]["input"])
    assert "### Input:" in with_input.prompt and "### Input:" not in without.prompt
    assert without.prompt.endswith("### Instruction:\nsay yes\n\n### Response:\n") and without.completion == "yes"


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "a", "completion": "b"}, {"prompt": "a"}], "line 2: missing field 'completion'"),
    ([{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": ""}], "line 2: 'completion' must be a non-empty string"),
    ([{"prompt": "a", "completion": "b"}, {"instruction": "a", "output": "b"}], "line 2: a alpaca record, but the file starts with prompt/completion"),
    ([{"instruction": "a", "output": "b", "input": 3}], "line 1: 'input' must be a string"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], "line 1: 'messages' must be a list of two or more"),
    ([{"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]}], "line 1: the last message must be the assistant's"),
    ([{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}], "line 1: message 0 has role 'robot'"),
    ([{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}], "line 1: message 0 must be"),
])
def test_malformed_rows_are_refused_naming_the_line(capsys, llama, tmp_path, rows, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    out = tmp_path / "out"
    assert run("finetune", "--model", llama, "--data", path, "--eval-data", path, "-o", out, "-q") == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_chat_data_without_a_chat_template_is_refused(capsys, plain_llama, data, tmp_path):
    train, test = data["chat"]
    out = tmp_path / "out"
    assert run("finetune", "--model", plain_llama, "--data", train, "--eval-data", test, "-o", out, "-q") == 2
    assert "no chat template" in capsys.readouterr().err and not out.exists()


def test_prompts_that_fill_max_length_are_refused(capsys, llama, data, tmp_path):
    train, test = data["prompt_completion"]
    out = tmp_path / "out"
    assert run("finetune", "--model", llama, "--data", train, "--eval-data", test, "-o", out, "--max-length", "8", "-q") == 2
    err = capsys.readouterr().err
    assert "--max-length 8 tokens or more" in err and "line 1" in err and not out.exists()


@pytest.mark.parametrize("words, advice", [
    (240, "Give --max-length 256 (the most this model takes)"),
    (300, "This model takes at most 256 tokens, so shorten those prompts"),
])
def test_an_over_long_prompts_advice_stays_within_the_models_positions(capsys, llama, data, tmp_path, words, advice):
    """The tiny Llama takes 256 positions: never advise a --max-length it refuses (was: longest + 32)."""
    records = [{"prompt": "the " * (words if i == 3 else 5), "completion": " yes"} for i in range(12)]
    train = write_jsonl(tmp_path / "long.jsonl", records)
    out = tmp_path / "out"
    assert run("finetune", "--model", llama, "--data", train, "--eval-data", data["prompt_completion"][1], "-o", out,
               "--max-length", "128", "-q") == 2
    err = capsys.readouterr().err
    assert "line 4" in err and advice in err, err
    assert not out.exists()


def test_an_encoder_is_refused_for_instruction_data(capsys, data, tmp_path):
    from _tiny import make_bert

    bert = make_bert(tmp_path / "bert")
    train, test = data["prompt_completion"]
    assert run("finetune", "--model", bert, "--data", train, "--eval-data", test, "-o", tmp_path / "o", "-q") == 2
    assert "instruction data needs a causal" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the loss mask
@pytest.mark.parametrize("fmt", ["chat", "prompt_completion", "alpaca"])
def test_loss_covers_completion_tokens_only(fmt, llama, data, tmp_path, monkeypatch):
    """...and the LM head projects only the completion's positions (TRL does so on CUDA only), for
    LoFT and for the other methods' trainer (its base class)."""
    head_rows = count_fused_head_rows(monkeypatch)
    train, test = data[fmt]
    cfg = FinetuneConfig(model=str(llama), data=str(train), eval_data=str(test), max_steps=1, batch_size=4,
                         output_dir=str(tmp_path / "run"))
    plan, inputs, built = _plan_and_build(cfg)
    trainer, tok, task = built.trainer, inputs.tokenizer, inputs.task
    assert isinstance(trainer, trl.SFTTrainer) and isinstance(trainer, LoFTTrainerMixin)
    assert isinstance(trainer, task.trainer_class(loft=False))
    assert len(trainer.train_dataset) == task.num_train
    for row, example in zip(trainer.train_dataset, task.train_items):
        if fmt == "chat":
            prompt = tok.apply_chat_template(example.prompt, add_generation_prompt=True, tokenize=False)
            completion = example.completion[0]["content"] + " </s> "
        else:
            prompt, completion = example.prompt, example.completion + tok.eos_token
        prompt_ids = tok(prompt)["input_ids"]
        completion_ids = tok(completion, add_special_tokens=False)["input_ids"]
        n = len(prompt_ids)
        assert row["input_ids"] == prompt_ids + completion_ids
        assert row["labels"][:n] == [-100] * n  # the prompt is never a target
        assert row["labels"][n:] == completion_ids  # every completion token is, the end of sequence included
    # the loss SFTTrainer trains on is the mean cross-entropy of the completion tokens of the batch
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    model = trainer.model
    model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    targets = batch["labels"][:, 1:]
    per_token = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets.clamp(min=0), reduction="none")
    completion = targets != -100
    assert completion.sum() < (batch["attention_mask"][:, 1:] == 1).sum()  # prompt tokens exist and are left out
    assert head_rows == [int(completion.sum())]
    assert float(loss) == pytest.approx(float(per_token[completion].mean()), rel=1e-5)
    assert float(loss) != pytest.approx(float(per_token[batch["attention_mask"][:, 1:] == 1].mean()), rel=1e-3)


# ----------------------------------------------------------------------------- evaluation
def test_evaluation_matches_a_direct_computation(llama, tmp_path):
    """eval_loss / perplexity against per-example float64 NLL; exact match against unpadded
    greedy generation scored independently. The references are words the untrained model
    itself produces for half of the prompts, so the accuracy is neither 0 nor trivially 1."""
    tok = AutoTokenizer.from_pretrained(llama)
    base = AutoModelForCausalLM.from_pretrained(llama).eval()
    generated = {}
    for q in word_prompts(40, seed=3):
        ids = tok(q, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = base.generate(input_ids=ids, max_new_tokens=ANSWER_TOKENS, do_sample=False, pad_token_id=tok.eos_token_id)
        text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        if normalize_answer(text):
            generated[q] = text
            if len(generated) == 8:
                break
    assert len(generated) >= 6
    rows = []
    for i, (q, text) in enumerate(list(generated.items())[:8]):
        rows.append({"prompt": q, "completion": " " + (normalize_answer(text).split()[0] if i % 2 == 0 else "lovely")})
    path = write_jsonl(tmp_path / "eval.jsonl", rows)
    cfg = FinetuneConfig(model=str(llama), data=str(path), eval_data=str(path), max_steps=1, batch_size=4,
                         output_dir=str(tmp_path / "run"))
    plan, inputs, built = _plan_and_build(cfg)
    metrics = inputs.task.evaluate(built.trainer, inputs.tokenizer, plan.max_length)

    nll, count, correct = 0.0, 0, 0
    answers = {normalize_answer(r["completion"]) for r in rows}
    for r in rows:
        p = tok(r["prompt"])["input_ids"]
        c = tok(r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([p + c])
        with torch.no_grad():
            logits = base(input_ids=ids).logits[0].double()
        logp = torch.log_softmax(logits[len(p) - 1 : -1], dim=-1)
        nll -= float(logp.gather(1, torch.tensor(c)[:, None]).sum())
        count += len(c)
        correct += first_answer(generated[r["prompt"]], answers) == normalize_answer(r["completion"])
    assert metrics["eval_loss"] == pytest.approx(nll / count, rel=1e-5)
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert 0 < correct < len(rows)
    assert metrics["eval_accuracy"] == correct / len(rows)
    assert [s["generation"] for s in metrics["samples"]] == [generated[r["prompt"]] for r in rows]
    # the loss projects the vocabulary at the completion's tokens only (a boolean logits_to_keep)
    from loft.app.tasks.instruction import _completion_nll

    model, head_rows = built.trainer.model.eval(), []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, a, o: head_rows.append(a[0].shape[:-1].numel()))
    try:
        encoded = [(list(r["input_ids"]), list(r["labels"])) for r in built.trainer.eval_dataset]
        again, tokens = _completion_nll(model, encoded, built.trainer.data_collator, batch_size=4)
    finally:
        hook.remove()
    assert tokens == count and sum(head_rows) == count and len(head_rows) == 2
    assert again / tokens == pytest.approx(nll / count, rel=1e-5)


def test_long_references_get_no_exact_match(llama, tmp_path):
    rows = [{"prompt": q, "completion": f" {m} and then very {m} again"} for q, m in questions(6)]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    cfg = FinetuneConfig(model=str(llama), data=str(path), eval_data=str(path), max_steps=1, batch_size=4,
                         output_dir=str(tmp_path / "run"))
    plan, inputs, built = _plan_and_build(cfg)
    metrics = inputs.task.evaluate(built.trainer, inputs.tokenizer, plan.max_length)
    assert metrics["eval_accuracy"] is None and math.isfinite(metrics["eval_perplexity"])
    assert len(metrics["samples"]) == 6 and all("answer" not in s for s in metrics["samples"])


def test_first_answer_and_normalisation():
    assert normalize_answer("  (B).\n") == "b"
    assert normalize_answer("The Answer: New-York") == "the answer new york"
    answers = {"a", "b", "c"}
    assert first_answer("B. Nervous, not A", answers) == "b"
    assert first_answer("The answer is C", answers) == "c"
    assert first_answer("cab", answers) is None  # whole words only
    assert first_answer("new york city it is", {"new york", "new york city", "york"}) == "new york city"
    assert first_answer("", answers) is None


def test_run_writes_metrics_samples_and_prompt_format(loft_run):
    metrics = json.loads((loft_run / "metrics.json").read_text())
    assert metrics["task"] == "instruction" and metrics["method"] == "loft"
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    assert metrics["eval_perplexity_before"] == pytest.approx(math.exp(metrics["eval_loss_before"]))
    assert metrics["eval_accuracy"] is not None and metrics["num_eval"] == 6
    samples = [json.loads(line) for line in (loft_run / "samples.jsonl").read_text().splitlines()]
    test_rows = records("prompt_completion", 6, seed=1)
    assert [s["prompt"] for s in samples] == [r["prompt"] for r in test_rows]
    assert all({"reference", "before", "after", "answer_after"} <= set(s) for s in samples)
    assert json.loads((loft_run / "prompt_format.json").read_text()) == {"format": "prompt_completion"}
    assert (loft_run / "adapter_model.safetensors").is_file() and not (loft_run / "checkpoints").exists()
    # short answers: every eval example's answer, in order, as classification and multiple choice give theirs
    rows = [json.loads(line) for line in (loft_run / "predictions.jsonl").read_text().splitlines()]
    assert [r["label"] for r in rows] == [normalize_answer(r["completion"]) for r in test_rows]
    assert all(r["correct"] == (r["prediction"] == r["label"]) for r in rows)
    assert [r["prediction"] for r in rows][:len(samples)] == [s["answer_after"] for s in samples]
    assert sum(r["correct"] for r in rows) / len(rows) == pytest.approx(metrics["eval_accuracy"])


@pytest.mark.parametrize("method", ["lora", "dora", "full"])
def test_other_methods_train_on_instruction_data(method, llama, data, tmp_path):
    train, test = data["alpaca"]
    out = tmp_path / method
    metrics = finetune(FinetuneConfig(model=str(llama), data=str(train), eval_data=str(test), method=method, rank=2,
                                      max_steps=2, batch_size=4, output_dir=str(out)), progress=False)
    assert metrics["method"] == method and metrics["steps"] == 2 and math.isfinite(metrics["eval_perplexity"])
    assert (out / ("model.safetensors" if method == "full" else "adapter_model.safetensors")).is_file()
    assert json.loads((out / "prompt_format.json").read_text()) == {"format": "alpaca"}


def test_loft_trains_instruction_data_with_loftadamw(llama, data, tmp_path):
    train, test = data["chat"]
    cfg = FinetuneConfig(model=str(llama), data=str(train), eval_data=str(test), max_steps=1, batch_size=4,
                         output_dir=str(tmp_path / "run"))
    plan, inputs, built = _plan_and_build(cfg)
    built.trainer.create_optimizer()
    assert isinstance(built.trainer.optimizer, LoFTAdamW)


def test_a_run_at_a_default_learning_rate_not_measured_on_its_family_says_so(capsys, llama, data, tmp_path):
    from loft.app import config

    train, test = data["chat"]
    assert config.lr_measured("loft", "instruction")  # LoFT's instruction default is measured: no note for it
    copied = next(m for m in ("lora", "dora", "pissa", "rslora") if not config.lr_measured(m, "instruction"))
    for method, lr, said in ((copied, None, True), (copied, 1e-3, False), ("loft", None, False)):
        cfg = FinetuneConfig(model=str(llama), data=str(train), eval_data=str(test), method=method, rank=2,
                             max_steps=1, batch_size=4, lr=lr, output_dir=str(tmp_path / f"run-{method}-{lr}"))
        plan_run(cfg, overwrite=False, resume=False, status=RunStatus(cfg, progress=False))
        printed = capsys.readouterr().out
        note = (f"Note: the default learning rate ({method} {default_lr(method, 'instruction'):g}) was measured on "
                "classification tasks, not yet on instruction tasks")
        assert (note in printed) == said, (method, lr, printed)
        assert ("--lr auto" in printed) == said, (method, lr, printed)
    assert default_lr_note("classification", ["loft"]) is None  # measured there: nothing to say
    assert "(full 0.0002) was measured on classification tasks, not yet on multiple choice tasks" in default_lr_note(
        "multiple_choice", ["full"])
    assert default_lr_note("instruction", []) is None  # every rate given


def test_default_lr_note_names_only_the_copied_rates(monkeypatch):
    """Once some methods' defaults are measured on a family and others are still classification's
    copies, the note names the copies only, and says nothing when every method run is measured."""
    from loft.app import config

    sources = {f: dict(s) for f, s in config.DEFAULT_LR_SOURCES.items()}
    sources["instruction"]["loft"] = "measured on two instruction tasks"
    sources["instruction"]["lora"] = config._COPY  # classification's copy, as on a new family
    monkeypatch.setattr(config, "DEFAULT_LR_SOURCES", sources)
    assert config.lr_measured("loft", "instruction") and not config.lr_measured("lora", "instruction")
    assert default_lr_note("instruction", ["loft"]) is None
    note = default_lr_note("instruction", ["loft", "lora"])
    assert note.startswith(f"Note: the default learning rate (lora {default_lr('lora', 'instruction'):g}) was measured "
                           "on classification tasks, not yet on instruction tasks"), note
    assert "loft" not in note.split("(")[1].split(")")[0]
    assert "a comparison at them can favour whichever default suits this data" in note  # two methods compared


def test_compare_runs_on_instruction_data(capsys, llama, data, tmp_path):
    from loft.app.compare import run_compare

    train, test = data["prompt_completion"]
    result = run_compare(methods=["loft", "dora"], ranks=[2], full=False, lrs={"loft": 1e-3},
                         output_dir=str(tmp_path / "cmp"), overwrite=False, resume=False, progress=False,
                         model=str(llama), data=str(train), eval_data=str(test), max_steps=2, batch_size=4)
    # the note names the defaults taken (dora's, a copy of classification's), not a rate given (loft's)
    printed = capsys.readouterr().out
    assert f"Note: the default learning rate (dora {default_lr('dora', 'instruction'):g}) was measured on " in printed
    assert "(loft " not in printed
    assert [(r["method"], r["rank"]) for r in result["rows"]] == [("loft", 2), ("dora", 2)]
    assert all(r["eval_accuracy"] is not None and r["eval_perplexity"] > 1 for r in result["rows"])
    assert "eval_perplexity" in (tmp_path / "cmp" / "compare.csv").read_text().splitlines()[0]
    assert (tmp_path / "cmp" / "compare.png").is_file()


def test_compare_plot_takes_perplexity_when_no_run_has_an_accuracy(tmp_path):
    from loft.app.plots import plot_compare

    rows = [{"method": "loft", "rank": 2, "eval_accuracy": None, "eval_perplexity": 3.0},
            {"method": "full", "rank": None, "eval_accuracy": None, "eval_perplexity": 2.5}]
    plot_compare(rows, {"loft-r2": [(1, 2.0)], "full": [(1, 1.5)]}, tmp_path / "c.png", "long answers")
    assert (tmp_path / "c.png").stat().st_size > 1000


# ----------------------------------------------------------------------------- generate
def _peft(run_dir, llama):
    base = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)
    return PeftModel.from_pretrained(base, run_dir).eval()


def _greedy(model, tok, text: str, n: int) -> str:
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_generate_streams_the_greedy_completion_of_base_plus_adapter(capsys, monkeypatch, loft_run, llama, tmp_path):
    tok = AutoTokenizer.from_pretrained(loft_run)
    model = _peft(loft_run, llama)
    outputs = {p: _greedy(model, tok, p, 6).strip() for p in word_prompts(40, seed=5)}
    prompts = [p for p, text in outputs.items() if text][:2]  # prompts the fine-tuned model completes
    assert len(prompts) == 2
    expected = [outputs[p] for p in prompts]

    assert run("generate", loft_run, "--prompt", prompts[0], "--max-new-tokens", "6") == 0
    assert capsys.readouterr().out.strip() == expected[0]

    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(prompts[1] + "\n")
    assert run("generate", loft_run, "--prompt-file", prompt_file, "--max-new-tokens", "6") == 0
    assert capsys.readouterr().out.strip() == expected[1]

    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(prompts) + "\n"))  # no --prompt: one prompt per line
    assert run("generate", loft_run, "--max-new-tokens", "6") == 0
    assert [line.strip() for line in capsys.readouterr().out.strip().splitlines()] == expected


# ----------------------------------------------------------------------------- merge
def test_merged_model_computes_what_base_plus_adapter_computes(capsys, loft_run, llama, tmp_path):
    out = tmp_path / "merged"
    assert run("merge", loft_run, "-o", out) == 0
    assert not (out / "adapter_config.json").exists() and (out / "loft_merge.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    adapted = _peft(loft_run, llama)
    base = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok(["kai felt sad . what will kai want ?", "jan felt happy . what will jan want ?"], return_tensors="pt")
    with torch.no_grad():
        want = adapted(**ids).logits
        got = merged(**ids).logits
        plain = base(**ids).logits
    assert (want - plain).abs().max() > 1e-3  # the adapter changes the outputs ...
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # ... and the merged model computes the same
    for p in word_prompts(4, seed=5):
        assert _greedy(merged, tok, p, 6) == _greedy(adapted, tok, p, 6)

    # an earlier merge is replaced only with --overwrite
    assert run("merge", loft_run, "-o", out) == 2
    assert "already holds a merged model" in capsys.readouterr().err
    assert run("merge", loft_run, "-o", out, "--overwrite") == 0


def _fake_run(folder, task="instruction", adapter=True, finished=True, task_type="CAUSAL_LM"):
    folder.mkdir(parents=True)
    (folder / "run_config.json").write_text(json.dumps({"settings": {}}))
    if finished:
        (folder / "metrics.json").write_text(json.dumps({"task": task, "method": "loft", "model": "x"}))
    if adapter:
        (folder / "adapter_config.json").write_text(json.dumps({"task_type": task_type}))
    else:
        (folder / "config.json").write_text("{}")
    return folder


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("not_a_run", "is not a loft run folder"),
    ("unfinished", "has not finished"),
    ("classification", "trained a text classifier"),
    ("seq_cls_adapter", "not a causal LM"),
])
@pytest.mark.parametrize("command", ["generate", "merge"])
def test_generate_and_merge_refuse_a_folder_that_is_not_a_causal_lm_run(capsys, tmp_path, case, message, command):
    folder = tmp_path / "run"
    if case == "not_a_run":
        folder.mkdir()
        (folder / "notes.txt").write_text("x")
    elif case == "unfinished":
        _fake_run(folder, finished=False)
    elif case == "classification":
        _fake_run(folder, task="classification", task_type="SEQ_CLS")
    elif case == "seq_cls_adapter":
        _fake_run(folder, task_type="SEQ_CLS")
    args = ["--prompt", "hi"] if command == "generate" else ["-o", tmp_path / "merged"]
    assert run(command, folder, *args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "merged").exists()


def test_merge_refuses_a_full_run_and_foreign_or_overlapping_output_folders(capsys, loft_run, tmp_path):
    full = _fake_run(tmp_path / "full", adapter=False)
    assert run("merge", full, "-o", tmp_path / "m") == 2
    assert "already holds the whole model" in capsys.readouterr().err

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep me")
    assert run("merge", loft_run, "-o", foreign) == 2
    assert "is not empty" in capsys.readouterr().err
    assert run("merge", loft_run, "-o", foreign, "--overwrite") == 2
    assert "only replaces an earlier merge" in capsys.readouterr().err
    assert sorted(p.name for p in foreign.iterdir()) == ["mine.txt"]

    assert run("merge", loft_run, "-o", loft_run / "merged") == 2
    assert "overlaps the run folder" in capsys.readouterr().err
    assert not (loft_run / "merged").exists()


@pytest.mark.parametrize("command", ["generate", "merge"])
def test_generate_and_merge_refuse_a_truncated_adapter_in_one_line(capsys, loft_run, tmp_path, command):
    """A truncated adapter_model.safetensors (a full disk, a copy cut short): one line naming the
    file, status 2, nothing written (was: safetensors' traceback)."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(loft_run, run_dir)
    weights = run_dir / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    args = ["--prompt", "hi"] if command == "generate" else ["-o", tmp_path / "merged"]
    assert run(command, run_dir, *args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "adapter_model.safetensors in the run" in err and "is damaged (truncated)" in err and "--overwrite" in err
    assert not (tmp_path / "merged").exists()


def test_generate_refuses_bad_options(capsys, loft_run, tmp_path):
    assert run("generate", loft_run, "--prompt", "a", "--prompt-file", tmp_path / "p.txt") == 2
    assert "not both" in capsys.readouterr().err
    assert run("generate", loft_run, "--prompt-file", tmp_path / "missing.txt") == 2
    assert "does not exist" in capsys.readouterr().err
    assert run("generate", loft_run, "--prompt", "a", "--format", "xml") == 2
    assert "Unknown --format" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the built-in example
def test_builtin_social_iqa_sft_is_social_iqa_as_prompt_completion():
    from loft.app.data.derive import LETTERS, derived_text

    for split in ("train", "test"):
        assert builtin_path("social_iqa_sft", split).read_text(encoding="utf-8") == derived_text(split)
    source = read_records(builtin_path("social_iqa", "test"))
    derived = read_records(builtin_path("social_iqa_sft", "test"))
    task = make_task(derived, "train", derived, "test")
    assert task.kind == "instruction" and task.short_answers and task.num_eval == len(source) == 500
    for s, d in zip(source, derived):
        assert d["prompt"].startswith(f"Question: {s['question']}\nA. {s['choices'][0]}\n")
        assert d["prompt"].endswith("\nAnswer:") and d["completion"] == " " + LETTERS[s["answer"]]


def test_ctrl_c_then_resume_ends_where_an_uninterrupted_run_does(llama, data, tmp_path):
    import os
    import signal

    from safetensors.torch import load_file
    from transformers import TrainerCallback

    from loft.app.errors import RunInterrupted

    train, test = data["chat"]
    common = dict(model=str(llama), data=str(train), eval_data=str(test), max_steps=4, batch_size=4, lr=1e-2,
                  rank=2, eval_before=False, max_eval=2)

    class CtrlC(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:
                os.kill(os.getpid(), signal.SIGINT)  # what a real Ctrl-C does

    out = tmp_path / "interrupted"
    with pytest.raises(RunInterrupted):
        finetune(FinetuneConfig(output_dir=str(out), **common), progress=False, callbacks=[CtrlC()])
    resumed = finetune(FinetuneConfig(output_dir=str(out), **common), resume=True, progress=False)
    straight = finetune(FinetuneConfig(output_dir=str(tmp_path / "straight"), **common), progress=False)
    assert resumed["steps"] == 4 and resumed["resumed_from"]
    a, b = (load_file(str(d / "adapter_model.safetensors")) for d in (out, tmp_path / "straight"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert resumed["train_loss"] == pytest.approx(straight["train_loss"], rel=1e-5)
    assert (out / "samples.jsonl").is_file() and not (out / "checkpoints").exists()
