"""The scenarios of tests/test_fsdp2_setups.py (run by tests/owner_worker.py's workers as
``setups:<scenario>``, in the 2-rank launch of conftest.fsdp_two_ranks): the other ways users
shard with FSDP2, each compared with one process (gloo, CPU, float64 unless stated).

* ``no_reshard``: ``fully_shard(..., reshard_after_forward=False)``;
* ``bf16``: ``MixedPrecisionPolicy(param_dtype=torch.bfloat16)`` (float32 shards);
* ``accumulate``: gradient accumulation, 2 micro-batches a step, gradient sync off for the first
  (``set_requires_gradient_sync``), and ``accumulate_synced``: the same with every micro-batch
  reduce-scattered;
* ``checkpoint_wrapper``: activation checkpointing by torch's ``apply_activation_checkpointing``
  (``checkpoint_wrapper``) on the LoRA layers, then ``fully_shard``;
* ``hf_checkpointing``: a tiny transformers Llama with ``gradient_checkpointing_enable()``,
  ``fully_shard`` on each decoder layer and the root (no ``mesh=``);
* ``trainer``: ``LoFTTrainer`` with ``TrainingArguments(fsdp="full_shard", fsdp_config={"version": 2,
  ...})`` on the tiny Llama, as users configure Trainer's FSDP2, with its checkpoints; then a fresh
  trainer resumed from the first checkpoint.
"""

from __future__ import annotations

import copy
import os

import torch
from owner_worker import STEPS, build_model, data, loss_fn, make_optimizer, shard, train, trainable

import loft

OUT_DIR = ""
#: the tiny Llama's batch: rows of token ids, all of one length (no padding)
LLAMA_ROWS, LLAMA_LENGTH, LLAMA_VOCAB = 8, 6, 24
WRAPPED = "_checkpoint_wrapped_module."


def build_llama(dtype: torch.dtype = torch.float64):
    """A 2-layer, hidden-16 transformers Llama from a config (random weights, seed 0), with PEFT
    LoRA (r = 2, random B) on q_proj and v_proj."""
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=LLAMA_VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                         tie_word_embeddings=False)
    base = LlamaForCausalLM(config).to(dtype)
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return peft.get_peft_model(base, cfg, autocast_adapter_dtype=False)


def llama_data() -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, LLAMA_VOCAB, (LLAMA_ROWS, LLAMA_LENGTH), generator=g)


def llama_optimizer(model):
    return loft.LoFTAdamW(model, lr=1e-2, weight_decay=0.01, max_grad_norm=0.5)


def llama_train(model, opt, ids) -> None:
    for _ in range(STEPS):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()


def llama_reference() -> dict[str, torch.Tensor]:
    """One process, no sharding, no checkpointing, the whole batch every step."""
    model = build_llama()
    llama_train(model, llama_optimizer(model), llama_data())
    return trainable(model)


def bf16_reference(world: int, reduce_dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """One process running FSDP2's ``MixedPrecisionPolicy(param_dtype=torch.bfloat16)`` by hand:
    float32 parameters and LoFT state; each step, for each rank's rows, a bfloat16 copy of the
    model (inputs cast to bfloat16, as FSDP2 casts them) computes the gradient, and the ranks'
    bfloat16 gradients are averaged and rounded to ``reduce_dtype`` (the reduce-scatter in the
    policy's reduce dtype, bfloat16 by default) before the float32 step."""
    model = build_model(torch.float32)
    opt, sched = make_optimizer(model)
    x, y = data(torch.float32)
    rows = [slice(r * len(x) // world, (r + 1) * len(x) // world) for r in range(world)]
    params = dict(model.named_parameters())
    for _ in range(STEPS):
        opt.zero_grad()
        grads: dict[str, list[torch.Tensor]] = {}
        for part in rows:
            low = copy.deepcopy(model).to(torch.bfloat16)
            loss_fn(low, x[part].to(torch.bfloat16), y[part]).backward()
            for name, p in low.named_parameters():
                if p.grad is not None:
                    grads.setdefault(name, []).append(p.grad.float())
        for name, parts in grads.items():
            params[name].grad = (sum(parts) / world).to(reduce_dtype).float()
        opt.step()
        sched.step()
    return trainable(model)


def run(scenario: str, rank: int, world: int, xs, ys) -> dict[str, object]:
    out: dict[str, object] = {}
    if scenario == "no_reshard":
        model = shard(build_model(), world, mesh=False, reshard_after_forward=False)
        opt, sched = make_optimizer(model)
        train(model, opt, sched, xs, ys)
    elif scenario == "bf16":
        from torch.distributed.fsdp import MixedPrecisionPolicy

        model = shard(build_model(torch.float32), world, MixedPrecisionPolicy(param_dtype=torch.bfloat16), mesh=False)
        opt, sched = make_optimizer(model)
        losses = []
        for _ in range(STEPS):
            opt.zero_grad()
            loss = loss_fn(model, xs.float(), ys.float())
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        out["losses"] = losses
        out["dtypes"] = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad})
        out["state_dtypes"] = sorted({str(t.dtype) for b in opt.batch_states() for s in b.sides for t in vars(s).values()})
    elif scenario in ("accumulate", "accumulate_synced"):
        model = shard(build_model(), world, mesh=False)
        opt, sched = make_optimizer(model)
        half = xs.shape[0] // 2
        for _ in range(STEPS):
            opt.zero_grad()
            if scenario == "accumulate":
                model.set_requires_gradient_sync(False)  # FSDP2's no_sync: no reduce-scatter for this micro-batch
            (loss_fn(model, xs[:half], ys[:half]) / 2).backward()
            model.set_requires_gradient_sync(True)
            (loss_fn(model, xs[half:], ys[half:]) / 2).backward()
            opt.step()
            sched.step()
    elif scenario == "checkpoint_wrapper":
        from owner_worker import LORA_LAYERS
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing, checkpoint_wrapper
        from torch.distributed.fsdp import fully_shard

        model = build_model()
        layers = {model.base_model.model[i] for i in LORA_LAYERS}
        apply_activation_checkpointing(model, checkpoint_wrapper_fn=checkpoint_wrapper, check_fn=lambda m: m in layers)
        wrapped = [m for m in model.modules() if type(m).__name__ == "CheckpointWrapper"]
        out["wrapped"] = len(wrapped)
        for m in wrapped:
            fully_shard(m)
        fully_shard(model)
        opt, sched = make_optimizer(model)
        train(model, opt, sched, xs, ys)
        out["params"] = {k.replace(WRAPPED, ""): v for k, v in trainable(model).items()}
        return out
    elif scenario == "hf_checkpointing":
        from torch.distributed.fsdp import fully_shard

        model = build_llama()
        model.gradient_checkpointing_enable()
        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        out["checkpointing"] = model.base_model.model.model.gradient_checkpointing
        ids = llama_data()
        part = slice(rank * LLAMA_ROWS // world, (rank + 1) * LLAMA_ROWS // world)
        opt = llama_optimizer(model)
        llama_train(model, opt, ids[part])
        out["owner_distributor"] = type(opt.distributor).__name__
    elif scenario == "trainer":  # 6 steps (a checkpoint at 3), then a fresh trainer resumed from it
        folder = os.path.join(OUT_DIR, "trainer")
        out["params"], out["sharded"] = trainer_run(folder, fsdp=True)
        out["resumed"], _ = trainer_run(os.path.join(OUT_DIR, "trainer-resumed"), fsdp=True,
                                        resume=os.path.join(folder, f"checkpoint-{STEPS // 2}"))
        out["checkpoint"] = sorted(os.listdir(os.path.join(folder, f"checkpoint-{STEPS // 2}")))
        return out
    else:
        raise ValueError(scenario)
    out["params"] = trainable(model)
    return out


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def trainer_run(out_dir: str, fsdp: bool, resume: str | None = None) -> tuple[dict[str, torch.Tensor], bool]:
    """``LoFTTrainer`` on the tiny Llama for STEPS steps of the global batch (LLAMA_ROWS rows),
    Trainer's default schedule and checkpoints (every STEPS // 2 steps): with ``fsdp`` (2
    processes), Trainer's FSDP2 as users configure it (its default FULL_STATE_DICT checkpoints), 4
    rows per process; without (one process), 2 accumulated micro-batches of 4. ``resume``: a
    checkpoint folder to continue from. The trained adapter, gathered whole, and whether LoFT
    stepped sharded factors with owners."""
    from transformers import TrainingArguments

    from loft.integrations import LoFTTrainer

    fsdp_args = dict(fsdp="full_shard", fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})
    args = TrainingArguments(
        output_dir=out_dir, max_steps=STEPS, per_device_train_batch_size=LLAMA_ROWS // 2,
        gradient_accumulation_steps=1 if fsdp else 2, learning_rate=1e-2, weight_decay=0.01, max_grad_norm=0.5,
        save_steps=STEPS // 2, logging_strategy="no", report_to=[], use_cpu=True, seed=0, data_seed=0,
        disable_tqdm=True, **(fsdp_args if fsdp else {}),
    )
    model = build_llama()
    trainer = LoFTTrainer(model=model, args=args, train_dataset=_Tokens(llama_data()))
    trainer.train(resume_from_checkpoint=resume)
    optimizer = trainer.loft_optimizer  # (trainer.optimizer holds it inside Accelerate's wrapper)
    sharded = type(optimizer.distributor).__name__ == "FSDP2Owners" and all(
        hasattr(p, "device_mesh") for p in optimizer.param_groups[0]["params"])
    return trainable(trainer.model), sharded
