"""QLoRA: PEFT LoRA on a bitsandbytes 4-bit (nf4) or 8-bit base, trained with LoFTAdamW on the
CPU (bitsandbytes >= 0.50 runs its quantised layers there). A tiny Llama made from a config,
saved and loaded back through transformers' ``BitsAndBytesConfig``; nothing is downloaded."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

TARGETS = ["q_proj", "v_proj", "down_proj"]
LAYERS = 2


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    # hidden sizes are multiples of bitsandbytes' 4-bit block size (64): its CPU kernels need that
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("bits", [4, 8])
def test_loft_trains_a_quantised_base_and_the_adapter_reloads_on_the_full_precision_base(base_folder, tmp_path, bits):
    import bitsandbytes as bnb
    import peft
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    import loft

    if bits == 4:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        layer_type = bnb.nn.Linear4bit
    else:
        quant = BitsAndBytesConfig(load_in_8bit=True)
        layer_type = bnb.nn.Linear8bitLt
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LlamaForCausalLM.from_pretrained(base_folder, quantization_config=quant, device_map="cpu", dtype=torch.float32)
        assert isinstance(model.model.layers[0].self_attn.q_proj, layer_type)
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
        opt = loft.LoFTAdamW(model, lr=1e-2, max_grad_norm=1.0)
        assert len(opt.pairs) == LAYERS * len(TARGETS)
        assert all(type(p.A).__name__ == "Parameter" and p.A.dtype == torch.float32 for p in opt.pairs)
        ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
        losses = []
        for _ in range(8):
            opt.zero_grad()
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
            opt.step()
            losses.append(float(out.loss.detach()))
        assert losses[-1] < losses[0] - 0.1, losses
        trained = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        model.save_pretrained(tmp_path / "adapter")
        # the adapter on the full-precision base
        base = LlamaForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
        reloaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter")
    loaded = {n: p.detach() for n, p in reloaded.named_parameters() if "lora_" in n}
    assert len(loaded) == len(trained) == 2 * LAYERS * len(TARGETS)
    for name, value in trained.items():
        assert torch.equal(loaded[name], value), name
    with torch.no_grad():
        full_loss = float(reloaded(input_ids=ids, labels=ids).loss)
    # the quantisation error moves the loss a little; the trained adapter still helps on the full base
    assert full_loss < losses[0] - 0.05, (full_loss, losses)
