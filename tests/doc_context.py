"""The names the documentation's Python examples use without defining them (tests/doc_examples.py
lists them), built from configs: a tiny Llama, LoRA on it, a few rows of tokens; or, for a block
that loads ``"path/to/model"``, the tiny BERT and batches of the built-in movie reviews. Used in
this process and in the torchrun workers of tests/doc_torchrun.py (there a ``model`` that comes
with its ``optimizer`` is sharded with FSDP2, and the optimizer is a LoFTAdamW of the shards)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

#: where the tiny BERT's folder is (a test session makes it; the examples' "path/to/model")
TINY_BERT_ENV = "LOFT_DOC_TINY_BERT"
ROWS, LENGTH, VOCAB = 8, 8, 32


def build_model():
    """A 2-layer, hidden-32 transformers Llama causal LM from a config (random weights, seed 0)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def peft_model():
    import peft

    return peft.get_peft_model(build_model(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))


class Tokens(torch.utils.data.Dataset):
    """``ROWS`` rows of random token ids, each its own labels (a causal LM's data)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, VOCAB, (ROWS, LENGTH), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def review_batches(tokenizer_folder: str, n: int = 2, size: int = 4) -> list[dict[str, torch.Tensor]]:
    """``n`` batches of the built-in movie reviews, tokenized for a sequence classifier."""
    from transformers import AutoTokenizer

    from loft.app.data import builtin_path, read_records

    records = read_records(builtin_path("movie_sentiment", "train"))[: n * size]
    tok = AutoTokenizer.from_pretrained(tokenizer_folder)
    out = []
    for k in range(n):
        part = records[k * size:(k + 1) * size]
        batch = tok([r["text"] for r in part], padding=True, truncation=True, max_length=32, return_tensors="pt")
        batch["labels"] = torch.tensor([int(r["label"]) for r in part])
        out.append(dict(batch))
    return out


def _sharded_model():
    from torch.distributed.fsdp import fully_shard

    model = peft_model()
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _stepped_optimizer(model):
    import loft

    optimizer = loft.LoFTAdamW(model, lr=1e-3)
    batch = next(iter(torch.utils.data.DataLoader(Tokens(), batch_size=4)))
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return optimizer


def provide(names: set[str], code: str, folder: Path, distributed: bool) -> dict[str, Any]:
    """Values for ``names`` (the block's free names; unknown ones are left out, so the block's own
    NameError names them). ``folder``: a scratch folder; ``distributed``: under torchrun."""
    out: dict[str, Any] = {}
    classifier = "path/to/model" in code
    makers: dict[str, Callable[[], Any]] = {
        "build_model": lambda: build_model,
        "peft_model": peft_model,
        "ds": Tokens,
        "folder": lambda: str(folder),
    }
    if classifier:
        makers["loader"] = lambda: review_batches(os.environ[TINY_BERT_ENV])
    else:
        makers["loader"] = lambda: torch.utils.data.DataLoader(Tokens(), batch_size=4)
    if "model" in names or "optimizer" in names:  # sharded under torchrun when it comes with its optimizer
        model = _sharded_model() if distributed and "optimizer" in names else peft_model()
        out["model"] = model
        if "optimizer" in names:
            out["optimizer"] = _stepped_optimizer(model)
    for name in names:
        if name in makers and name not in out:
            out[name] = makers[name]()
    return out


def substitute(code: str) -> str:
    """The block's code with its placeholder paths replaced (``"path/to/model"``: the tiny BERT)."""
    return code.replace('"path/to/model"', repr(os.environ[TINY_BERT_ENV])) if "path/to/model" in code else code
