"""Tiny randomly initialised models, tokenizers and data sets for the workflow tests
(built offline from configs; nothing is downloaded)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

POSITIVE = ["good", "great", "fine", "lovely", "superb", "fun"]
NEGATIVE = ["bad", "awful", "dull", "boring", "poor", "weak"]
FILLER = ["the", "movie", "film", "was", "plot", "very", "acting", "really", "story", "quite"]
MC_WORDS = ["question", "answer", "who", "what", "why", "happy", "sad", "angry", "calm", "kai", "jan", "went", "home",
            "felt", "will", "want", "to", "sleep", "eat", "run", "help", "others", "yes", "no"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "</s>"]


def _tokenizer(kind: str) -> PreTrainedTokenizerFast:
    words = sorted(set(POSITIVE + NEGATIVE + FILLER + MC_WORDS + [":", "?", ".", ","]))
    vocab = {tok: i for i, tok in enumerate(SPECIALS + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    if kind == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
        )
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                       cls_token="[CLS]", sep_token="[SEP]")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>")


def make_bert(folder: Path, seed: int = 0) -> Path:
    """A 2-layer, hidden-32 BERT encoder (no head) and its tokenizer in ``folder``."""
    torch.manual_seed(seed)
    tok = _tokenizer("bert")
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, pad_token_id=0)
    BertModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def make_llama(folder: Path, seed: int = 0) -> Path:
    """A 2-layer, hidden-32 Llama causal LM and its tokenizer in ``folder``."""
    torch.manual_seed(seed)
    tok = _tokenizer("llama")
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=tok.eos_token_id, bos_token_id=None, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def sentiment_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = rng.sample(FILLER, 4) + [rng.choice(POSITIVE if label else NEGATIVE)]
        rng.shuffle(words)
        out.append({"text": " ".join(words), "label": label})
    return out


def mc_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    moods = ["happy", "sad", "angry", "calm"]
    out = []
    for _ in range(n):
        who = rng.choice(["kai", "jan"])
        choices = rng.sample(moods, 3)
        answer = rng.randrange(3)
        out.append({"question": f"{who} felt {choices[answer]} . what will {who} want ?",
                    "choices": [f"{c}" for c in choices], "answer": answer})
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
