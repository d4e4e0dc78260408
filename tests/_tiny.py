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


def sentiment_files(folder: Path, n_train: int, n_test: int) -> tuple[Path, Path]:
    """``folder/train.jsonl`` (``n_train`` reviews) and ``folder/test.jsonl`` (``n_test`` other
    reviews: seed 1), for ``--data`` and ``--eval-data``."""
    return (write_jsonl(folder / "train.jsonl", sentiment_records(n_train)),
            write_jsonl(folder / "test.jsonl", sentiment_records(n_test, seed=1)))


def make_llama_gguf(folder: Path, seed: int = 0) -> tuple[Path, LlamaForCausalLM]:
    """A 2-layer, hidden-32 Llama written as an unquantized (float32) GGUF file ``folder/tiny.gguf``
    with the ``gguf`` package (llama.cpp's tensor names, q/k rows permuted as its converter does),
    and the model it holds (to compare with what transformers loads from it)."""
    import gguf
    import numpy as np

    torch.manual_seed(seed)
    heads, hidden, layers, vocab = 2, 32, 2, 40
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=64,
                         tie_word_embeddings=False, rms_norm_eps=1e-6)
    model = LlamaForCausalLM(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(64)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"t{i}" for i in range(vocab)])
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types([1] * vocab)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(layers):
        names.update({f"model.layers.{i}.{hf}.weight": f"blk.{i}.{gg}.weight" for hf, gg in parts.items()})
    state = model.state_dict()
    for hf, gg in names.items():
        t = state[hf]
        if gg.endswith(("attn_q.weight", "attn_k.weight")):  # llama.cpp's rotary layout
            t = t.reshape(heads, 2, t.shape[0] // heads // 2, t.shape[1]).swapaxes(1, 2).reshape(t.shape)
        writer.add_tensor(gg, t.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, model


def count_fused_head_rows(monkeypatch) -> list[int]:
    """Spy on TRL's fused LM head (``trl.trainer.utils``): the returned list gets, per call, the
    number of hidden-state rows it projects (every position, or only the labelled ones)."""
    from trl.trainer import utils

    rows: list[int] = []
    fused = utils._ChunkedLogProbFunction

    class Spy:
        @staticmethod
        def apply(hidden, *args):
            rows.append(hidden.shape[0])
            return fused.apply(hidden, *args)

    monkeypatch.setattr(utils, "_ChunkedLogProbFunction", Spy)
    return rows
