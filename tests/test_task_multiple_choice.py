"""Multiple-choice scoring: the batched, answer-positions-only evaluation equals scoring each
(question, choice) sequence alone with the full logits."""

from __future__ import annotations

import random

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from _tiny import make_llama
from loft.app.tasks.multiple_choice import MultipleChoiceTask


def _records(n: int, seed: int) -> list[dict]:
    """Questions and answers of different lengths (so batches need padding)."""
    rng = random.Random(seed)
    words = ["kai", "jan", "went", "home", "felt", "happy", "sad", "calm", "will", "want", "to", "help", "others"]
    out = []
    for i in range(n):
        question = " ".join(rng.choice(words) for _ in range(rng.randint(2, 12))) + " ?"
        choices = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 5))) for _ in range(3)]
        out.append({"question": question, "choices": choices, "answer": rng.randrange(3), "_line": i})
    return out


def _one_at_a_time(model, tok, task: MultipleChoiceTask, max_length: int) -> dict[str, float]:
    """Straightforward scoring: each sequence alone, log_softmax over every position."""
    correct, nll, tokens = 0, 0.0, 0
    for question, choices, answer in task.eval_items:
        scores = []
        for choice in choices:
            ex = task._example(tok, question, choice, max_length)
            ids = torch.tensor([ex["input_ids"]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
            picked = [(t, tok_id) for t, (tok_id, lab) in enumerate(zip(ex["input_ids"], ex["labels"])) if lab != -100]
            scores.append((sum(logp[t - 1, tok_id].item() for t, tok_id in picked), len(picked)))
        correct += max(range(len(choices)), key=lambda j: scores[j][0]) == answer
        nll -= scores[answer][0]
        tokens += scores[answer][1]
    return {"eval_accuracy": correct / len(task.eval_items), "eval_loss": nll / tokens}


class _Trainer:
    def __init__(self, model, batch_size):
        self.model = model
        self.args = type("args", (), {"per_device_eval_batch_size": batch_size})


class _NoLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward does not take ``logits_to_keep`` (older models / versions)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, input_ids, attention_mask=None):
        self.calls += 1
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_llama(tmp_path_factory.mktemp("llama"), seed=3)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    task = MultipleChoiceTask.from_records([], "-", _records(20, seed=5), "-")
    task.prepare_tokenizer(tok)
    return model, tok, task


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_batched_scoring_equals_one_sequence_at_a_time(tiny, batch_size):
    model, tok, task = tiny
    ref = _one_at_a_time(model, tok, task, 128)
    got = task.evaluate(_Trainer(model, batch_size), tok, 128)
    assert got["eval_accuracy"] == ref["eval_accuracy"]
    assert got["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-5)
    # a short max_length cuts prompts from the left; still the same scores
    ref = _one_at_a_time(model, tok, task, 12)
    got = task.evaluate(_Trainer(model, batch_size), tok, 12)
    assert got["eval_accuracy"] == ref["eval_accuracy"]
    assert got["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-5)


def test_scoring_under_peft_and_without_logits_to_keep(tiny):
    model, tok, task = tiny
    torch.manual_seed(0)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(model.name_or_path), LoraConfig(
        r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    ref = _one_at_a_time(peft_model, tok, task, 128)
    got = task.evaluate(_Trainer(peft_model, 8), tok, 128)
    assert got["eval_accuracy"] == ref["eval_accuracy"]
    assert got["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-5)
    plain = _NoLogitsToKeep(model)
    got = task.evaluate(_Trainer(plain, 8), tok, 128)
    ref = _one_at_a_time(model, tok, task, 128)
    assert got["eval_accuracy"] == ref["eval_accuracy"]
    assert got["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-5)
    n_batches = -(-sum(len(c) for _, c, _ in task.eval_items) // 8)
    assert plain.calls == n_batches  # the try with logits_to_keep was refused at the call; then the fallback only


def test_vocabulary_projection_only_at_answer_tokens(tiny):
    model, tok, task = tiny
    rows = []
    handle = model.lm_head.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[:-1].numel()))
    try:
        task.evaluate(_Trainer(model, 8), tok, 128)
    finally:
        handle.remove()
    answer_tokens = sum(
        sum(lab != -100 for lab in task._example(tok, q, c, 128)["labels"]) for q, cs, _ in task.eval_items for c in cs
    )
    assert sum(rows) == answer_tokens
