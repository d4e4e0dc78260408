"""The private or undocumented parts of transformers, Accelerate, PEFT and bitsandbytes that loft
relies on (loft/integrations/library_internals.py) still do, with the installed versions, what
loft needs, shown by what they do: tiny Trainer runs, the shared 2-process launch
(tests/internals_worker.py), a LoRA-FA step, a GGUF file. A failure names the library, its
version, the attribute and what to do; read the docstring of the matching function in
library_internals.py first. The last section checks the public APIs that replaced former
internals (docs/architecture.md, "Library internals", lists both)."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")

from _tiny import count_fused_head_rows
from internals_worker import Regressor, rows

from loft.integrations import library_internals as li

PIN = "or pin the last version that worked in pyproject.toml"


def _lib(name: str, attr: str, what: str, todo: str) -> str:
    """The assert message: library, installed version, attribute, what changed, what to do."""
    return f"{name} {metadata.version(name)}: {attr} {what}. {todo} (see loft/integrations/library_internals.py)."


def _args(folder: Path, **kwargs):
    from transformers import TrainingArguments

    settings = {"output_dir": str(folder), "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
                "learning_rate": 1e-2, "lr_scheduler_type": "constant", "logging_steps": 1, "save_strategy": "no",
                "report_to": [], "use_cpu": True, "disable_tqdm": True, "seed": 0, "data_seed": 0, **kwargs}
    return TrainingArguments(**settings)


def _quiet(trainer):
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


# ----------------------------------------------------------------------------- Trainer._clip_grad_norm
def test_clip_hook_runs_once_per_optimizer_step_instead_of_trainers_clipping_and_is_logged(tmp_path):
    """LoFTTrainer's clipping (CLIP_HOOK) runs once per optimizer step (3 steps of 2 accumulated
    micro-batches), Trainer's own clipping never runs, and the logged grad_norm is LoFT's."""
    import peft

    from loft.integrations import LoFTTrainer

    calls: list[float] = []

    class Probe(LoFTTrainer):
        def _clip_grad_norm(self, model):
            norm = super()._clip_grad_norm(model)
            calls.append(float(norm))
            return norm

    torch.manual_seed(0)
    model = peft.get_peft_model(Regressor(), peft.LoraConfig(r=2, target_modules=["lin"], init_lora_weights=False))
    trainer = _quiet(Probe(model=model, args=_args(tmp_path, max_steps=3, max_grad_norm=0.5), train_dataset=rows(16)))
    own: list[int] = []
    clip = trainer.accelerator.clip_grad_norm_
    trainer.accelerator.clip_grad_norm_ = lambda *a, **k: (own.append(1), clip(*a, **k))[1]
    trainer.train()
    where = f"Trainer.{li.CLIP_HOOK}"
    todo = ("Find where Trainer now clips and logs grad_norm, and override that in LoFTTrainerMixin "
            f"(loft/integrations/trainer.py), {PIN}")
    assert len(calls) == 3, _lib("transformers", where, f"ran {len(calls)} times in 3 optimizer steps, not once per step", todo)
    assert not own, _lib("transformers", "Trainer's clipping", "ran besides LoFT's (it clipped the factors' gradients too)", todo)
    logged = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert logged == pytest.approx(calls, rel=1e-6), _lib("transformers", where, f"returned {calls}, Trainer logged {logged}", todo)


def test_clip_hook_missing_says_what_to_do():
    from transformers import Trainer

    assert li.clip_hook_missing(Trainer) is None
    assert "no Trainer._clip_grad_norm hook" in li.clip_hook_missing(object)


# ----------------------------------------------------------------------------- Trainer._save_checkpoint, get_batch_samples
@pytest.fixture(scope="module")
def run_trainer(tmp_path_factory):
    """``loft finetune``'s Trainer (RunTrainerMixin over Trainer) on a tiny regressor: 4 steps of 2
    accumulated micro-batches, a checkpoint every 2 steps; then a fresh one resumed from the last
    checkpoint. What each hook saw and what the folders held when loft published a checkpoint."""
    from transformers import Trainer

    import loft.app.trainer as run_module

    seen = {"batches": 0, "saves": 0, "steps": 0, "published": []}

    class Probe(run_module.trainer_class(Trainer)):
        def get_batch_samples(self, epoch_iterator, num_batches, device):
            seen["batches"] += 1
            return super().get_batch_samples(epoch_iterator, num_batches, device)

        def _save_checkpoint(self, model, trial):
            seen["saves"] += 1
            return super()._save_checkpoint(model, trial)

        def training_step(self, model, inputs, num_items_in_batch=None):
            seen["steps"] += 1
            return super().training_step(model, inputs, num_items_in_batch)

    def publish(src: Path, dst: Path) -> None:
        seen["published"].append({"src": src, "dst": dst, "files": sorted(p.name for p in src.iterdir()),
                                  "dst_existed": dst.exists(), "root": sorted(p.name for p in dst.parent.iterdir())})
        publish_dir(src, dst)

    root = tmp_path_factory.mktemp("run")
    args = _args(root / "checkpoints", max_steps=4, save_strategy="steps", save_steps=2, save_total_limit=1)
    publish_dir = run_module.publish_dir
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_module, "publish_dir", publish)
        torch.manual_seed(0)
        first = _quiet(Probe(model=Regressor(), args=args, train_dataset=rows(32)))
        first.loft_setup(None)
        first.train()
        trained = first.model.lin.weight.detach().clone()
        first_seen = {k: (list(v) if isinstance(v, list) else v) for k, v in seen.items()}
        seen.update(batches=0, saves=0, steps=0, published=[])
        torch.manual_seed(1)
        again = _quiet(Probe(model=Regressor(), args=args, train_dataset=rows(32)))
        again.loft_setup(None)
        again.train(resume_from_checkpoint=str(root / "checkpoints" / "checkpoint-4"))
    return {"root": root, "first": first_seen, "resumed": dict(seen), "trained": trained,
            "resumed_weight": again.model.lin.weight.detach().clone(), "resumed_step": again.state.global_step}


def test_checkpoint_hook_writes_each_checkpoint_into_staging_then_loft_publishes_it(run_trainer):
    """SAVE_CHECKPOINT_HOOK with saving_checkpoints_into: Trainer calls the hook at every save step;
    inside it Trainer writes ``checkpoint-N`` (rundir.checkpoint_name) into ``checkpoints/.incoming``
    (args.output_dir while the hook runs), complete, and loft renames it into place; the older
    checkpoint is removed and nothing is left in ``.incoming``."""
    from loft.app.rundir import STAGING, checkpoint_name

    seen, checkpoints = run_trainer["first"], run_trainer["root"] / "checkpoints"
    todo = f"Adapt RunTrainerMixin._save_checkpoint (loft/app/trainer.py), {PIN}"
    where = f"Trainer.{li.SAVE_CHECKPOINT_HOOK}"
    assert seen["saves"] == 2, _lib("transformers", where, f"ran {seen['saves']} times for saves at steps 2 and 4", todo)
    assert [p["src"] for p in seen["published"]] == [checkpoints / STAGING / checkpoint_name(s) for s in (2, 4)], _lib(
        "transformers", where, f"no longer writes checkpoint-N under args.output_dir as set while it runs: {seen['published']}", todo)
    for p in seen["published"]:
        assert {"trainer_state.json", "model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                "loft_progress.json"} <= set(p["files"]), _lib("transformers", where, f"wrote only {p['files']}", todo)
        assert not p["dst_existed"] and p["root"] == [STAGING] + ([checkpoint_name(2)] if p["dst"].name.endswith("-4") else []), (
            _lib("transformers", where, f"wrote into the run folder itself: {p['root']}", todo))
    assert sorted(p.name for p in checkpoints.iterdir()) == [checkpoint_name(4)]
    state = json.loads((checkpoints / checkpoint_name(4) / "trainer_state.json").read_text())
    assert state["global_step"] == 4


def test_batch_hook_runs_once_per_optimizer_step_and_a_resume_after_the_last_step_trains_nothing(run_trainer):
    """BATCH_SAMPLES_HOOK: Trainer fetches each optimizer step's batches through it (4 steps: 4
    calls, 8 micro-batches trained); resumed from the checkpoint of the last step, loft's override
    makes Trainer take no step: no micro-batch trained, the checkpoint's weights unchanged."""
    first, resumed = run_trainer["first"], run_trainer["resumed"]
    where = f"Trainer.{li.BATCH_SAMPLES_HOOK}"
    todo = f"Find how Trainer now fetches a step's batches and adapt RunTrainerMixin (loft/app/trainer.py), {PIN}"
    assert (first["batches"], first["steps"]) == (4, 8), _lib(
        "transformers", where, f"ran {first['batches']} times for 4 optimizer steps ({first['steps']} micro-batches)", todo)
    assert resumed["steps"] == 0 and run_trainer["resumed_step"] == 4, _lib(
        "transformers", where, f"returning no batch no longer stops training: {resumed['steps']} micro-batches trained "
        f"after a resume at max_steps (global_step {run_trainer['resumed_step']})", todo)
    assert torch.equal(run_trainer["resumed_weight"], run_trainer["trained"])
    assert resumed["saves"] == 0


# ----------------------------------------------------------------------------- Accelerate on several processes
def _internal(two_rank_launch, scenario: str) -> list:
    return [r[f"internals:{scenario}"] for r in two_rank_launch]


def test_train_wraps_the_model_in_ddp_after_a_predict_only_with_let_train_wrap_for_ddp(two_rank_launch):
    """On 2 processes, Trainer.predict before train(): without let_train_wrap_for_ddp, train()
    leaves the model unwrapped (each process steps on its own rows: the weights differ); with it,
    the model is wrapped in DDP and both processes hold the same weights (averaged gradients)."""
    res = _internal(two_rank_launch, "ddp_after_predict")
    todo = f"Adapt let_train_wrap_for_ddp or evaluate before training without Trainer.predict, {PIN}"
    attr = "Accelerator.prepare_model / model._is_accelerate_prepared"
    assert all(r["with"]["ddp"] for r in res), _lib("accelerate", attr, "no longer lets train() wrap the model in DDP "
                                                    "once the mark is cleared", todo)
    assert torch.equal(res[0]["with"]["weight"], res[1]["with"]["weight"]), _lib(
        "accelerate", attr, "DDP did not average the gradients of the two processes", todo)
    assert not any(r["without"]["ddp"] for r in res), _lib(
        "accelerate", attr, "now wraps a model marked for evaluation in DDP by itself", "let_train_wrap_for_ddp is no "
        "longer needed: remove it (loft/app/finetune.py) and this test")
    assert not torch.equal(res[0]["without"]["weight"], res[1]["without"]["weight"])


def test_fsdp_on_cpu_makes_accelerate_shard_on_cpu_processes(two_rank_launch):
    """On 2 CPU processes Accelerate makes an Accelerator given an FSDP2 plugin MULTI_CPU (it
    would train with DDP); fsdp_on_cpu switches it to FSDP, a later AcceleratorState() keeps that,
    and prepare() shards the model (DTensor parameters). The Trainer route (shard_trainer_on_cpu)
    shards too: LoFTTrainer with fsdp_config in tests/setups_worker.py ("setups:trainer")."""
    todo = f"Adapt fsdp_on_cpu / shard_trainer_on_cpu, {PIN}"
    for r in _internal(two_rank_launch, "fsdp_plugin_on_cpu"):
        assert r["made"] == "DistributedType.MULTI_CPU", _lib(
            "accelerate", "AcceleratorState.distributed_type", f"is {r['made']} with an FSDP plugin on CPU processes",
            "Accelerate now honours the plugin there: remove fsdp_on_cpu and shard_trainer_on_cpu")
        assert r["changed"] and r["fsdp2_later"], _lib(
            "accelerate", "AcceleratorState / PartialState._shared_state['distributed_type']",
            "no longer keeps the FSDP switch", todo)
        assert r["sharded"], _lib("accelerate", "Accelerator.prepare", "did not shard with the switched state", todo)
    for r in two_rank_launch:
        assert r["setups:trainer"]["sharded"], _lib(
            "transformers", "TrainingArguments.fsdp_plugin_args / Trainer.is_fsdp_enabled",
            "no longer let LoFTTrainer shard on CPU processes", todo)


def test_fsdp_on_cpu_changes_only_a_cpu_state(monkeypatch):
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    monkeypatch.setattr(PartialState, "_shared_state", {})  # (this process's real state is left alone)
    state = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, fsdp_plugin=None)
    plugin = object()
    assert not li.fsdp_on_cpu(SimpleNamespace(state=state), None)
    assert li.fsdp_on_cpu(SimpleNamespace(state=state), plugin)
    assert state.distributed_type == DistributedType.FSDP and state.fsdp_plugin is plugin
    assert PartialState._shared_state == {"distributed_type": DistributedType.FSDP}
    assert not li.fsdp_on_cpu(SimpleNamespace(state=state), plugin)  # already FSDP: nothing to do


# ----------------------------------------------------------------------------- a GGUF-loaded model
def test_forget_gguf_quantization_makes_a_gguf_loaded_model_savable(tmp_path):
    """A model loaded from a GGUF file (tests/_tiny.make_llama_gguf, float32) equals the model
    written; save_pretrained refuses it and model.dequantize() is not implemented for GGUF; after
    forget_gguf_quantization it saves as a plain folder (no quantization_config) that loads back
    equal."""
    pytest.importorskip("gguf")
    from _tiny import make_llama_gguf
    from transformers import AutoModelForCausalLM

    path, reference = make_llama_gguf(tmp_path / "gguf")
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.arange(7).reshape(1, 7)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=1e-6)
    todo = f"Adapt forget_gguf_quantization (used by loft/app/models.py), {PIN}"
    assert getattr(model, "hf_quantizer", None) is not None, _lib(
        "transformers", "PreTrainedModel.hf_quantizer", "is not set by a GGUF load", "Remove forget_gguf_quantization if "
        "save_pretrained now saves such a model")
    with pytest.raises(NotImplementedError):  # when this fails: use model.dequantize() instead
        model.dequantize()
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "refused")
    li.forget_gguf_quantization(model)
    model.save_pretrained(tmp_path / "plain")
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert "quantization_config" not in config, _lib("transformers", "config.quantization_config", "was saved", todo)
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "plain"), dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


# ----------------------------------------------------------------------------- bitsandbytes
def test_bitsandbytes_cpu_packing_switch_and_training_after_an_evaluation():
    bnb = pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn import Linear4bit

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 24), nn.Linear(24, 8))  # widths not multiples of 64
    quantized = nn.Sequential(*(Linear4bit(m.in_features, m.out_features, compute_dtype=torch.float32,
                                           quant_type="nf4") for m in model))
    for q, m in zip(quantized, model):
        q.weight = bnb.nn.Params4bit(m.weight.data, requires_grad=False, quant_type="nf4")
        q.bias = nn.Parameter(m.bias.data, requires_grad=False)
        q.to("cpu")  # quantizes
        assert hasattr(q, "support_avx512bf16_for_cpu"), _lib(
            "bitsandbytes", "Linear4bit.support_avx512bf16_for_cpu", "is gone",
            f"Find how bitsandbytes now chooses its packed CPU path and adapt keep_4bit_layers_trainable_on_cpu, {PIN}")
    assert li.keep_4bit_layers_trainable_on_cpu(quantized) == 2
    x = torch.randn(5, 40)
    quantized.eval()
    with torch.no_grad():
        before = quantized(x)
    quantized.train()
    x.requires_grad_(True)
    # without the switch this fails on a CPU with AVX512-BF16 (bnb.functional.has_avx512bf16(), true on
    # the CI machine): the packed inference layout has no backward and refuses these widths
    quantized(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    torch.testing.assert_close(before, model(x.detach()), atol=0.3, rtol=0.3)  # nf4 error, not garbage


# ----------------------------------------------------------------------------- PEFT's LoRA-FA optimizer
def test_lorafa_head_group_trains_the_head_at_its_own_rate():
    """make_optimizer("lorafa") (PEFT's create_lorafa_optimizer, then lorafa_head_group): the head
    sits alone in the last group at head_lr, every group keeps LoRA-FA's parallel keys; one step
    leaves the frozen A, moves B, and moves each head weight by about head_lr (Adam's first step)."""
    import peft

    from loft.app.methods import make_optimizer

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0"], modules_to_save=["2"]))
    is_head = lambda n: "modules_to_save" in n
    head = {n: p for n, p in model.named_parameters() if p.requires_grad and is_head(n)}
    opt = make_optimizer("lorafa", model, lr=1e-3, head_lr=1e-2, weight_decay=0.0, is_head=is_head)
    *body, last = opt.param_groups
    assert [id(p) for p in last["params"]] == [id(p) for p in head.values()] and last["lr"] == 1e-2
    assert not any(id(p) in {id(h) for h in head.values()} for g in body for p in g["params"])
    for group in opt.param_groups:
        assert len(group["names"]) == len(group["params"]) == len(group["scaling_factors"])
    named = dict(model.named_parameters())
    a = next(n for n in named if "lora_A" in n)
    b = a.replace("lora_A", "lora_B")
    before = {n: p.detach().clone() for n, p in named.items()}
    g = torch.Generator().manual_seed(1)
    model(torch.randn(8, 6, generator=g)).square().mean().backward()
    try:
        opt.step()
    except (KeyError, TypeError) as e:
        pytest.fail(_lib("peft", "LoraFAOptimizer param groups (names, scaling_factors, betas)", f"changed: {e!r}",
                         f"Adapt lorafa_head_group, {PIN}"))
    assert torch.equal(named[a], before[a]) and not torch.equal(named[b], before[b])
    for n, p in head.items():
        moved = (p.detach() - before[n]).abs()
        assert moved.sub(1e-2).abs().max() < 1e-4, _lib("peft", "LoraFAOptimizer.step", f"moved {n} by {moved.max():.3g}, "
                                                         "not head_lr", f"Adapt lorafa_head_group, {PIN}")


# ----------------------------------------------------------------------------- TRL's fused LM head
def _fused_llama():
    """A tiny float64 Llama with TRL's fused head, a batch of 3 padded rows whose labels cover only a
    2-3 token completion, and the number of labelled next-token positions."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    model = LlamaForCausalLM(config).double()
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    ids = torch.randint(0, 97, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, 7:] = 0
    labels = torch.full_like(ids, -100)
    labels[0, 9:12], labels[1, 7:9], labels[2, 5:7] = ids[0, 9:12], ids[1, 7:9], ids[2, 5:7]
    return model, {"input_ids": ids, "attention_mask": mask, "labels": labels}, 7


def test_fused_head_scores_only_labelled_positions_with_the_same_loss_and_gradients(monkeypatch):
    """Inside fused_head_scores_labelled_positions_only the fused head projects the labelled positions
    only (7 rows, not 3 x 11) on CPU, and the loss, the per-token outputs and every gradient are those
    of TRL's own CPU path (float64, to 1e-12). Outside it TRL still projects every position on CPU:
    when a release does the compact path there itself, this fails, saying to drop the workaround."""
    pytest.importorskip("trl")
    from trl.trainer import utils

    model, batch, labelled = _fused_llama()
    rows = count_fused_head_rows(monkeypatch)

    def run():
        model.zero_grad()
        out = model(**batch, fused_lm_head=True, use_cache=False)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        return out, grads

    plain, plain_grads = run()
    assert rows == [3 * 11], _lib("trl", "add_fused_lm_head", "now scores only the labelled positions on CPU",
                                  "Remove fused_head_scores_labelled_positions_only and its use in "
                                  "loft/app/tasks/instruction.py")
    with li.fused_head_scores_labelled_positions_only() as arranged:
        compact, compact_grads = run()
    assert arranged and rows[-1] == labelled, _lib("trl", "trl.trainer.utils._use_triton",
                                                   f"no longer selects the compact path (rows {rows})",
                                                   f"Adapt fused_head_scores_labelled_positions_only, {PIN}")
    assert utils._use_triton is not None and utils._use_triton(torch.device("cpu")) is False  # restored
    torch.testing.assert_close(compact.loss, plain.loss, rtol=0, atol=1e-12)
    for field in ("log_probs", "entropy", "is_top1"):
        torch.testing.assert_close(getattr(compact, field), getattr(plain, field), rtol=0, atol=1e-12)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(compact_grads[name], grad, rtol=0, atol=1e-12, msg=name)
    assert plain_grads["model.layers.0.self_attn.q_proj.weight"].abs().sum() > 0


# ----------------------------------------------------------------------------- public APIs that replaced internals
def _classifier_gradient() -> torch.Tensor:
    """The gradient of the mean loss of internals_worker.classifier over its 4 examples (its classifier's weight)."""
    from internals_worker import classifier

    model, _, (ids, labels) = classifier()
    model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss.backward()
    return model.classifier.weight.grad


def test_per_process_mean_loss_is_one_mean_over_the_accumulated_batch(tmp_path):
    """A sequence classifier under loft finetune's Trainer (PerProcessMeanLoss: Trainer's
    documented loss_is_scaled_for_ga = False, compute_loss without num_items_in_batch), 2
    accumulated micro-batches of 2, one SGD step of rate 1: the step is minus the gradient of the
    mean loss over the 4 examples (float64). Trainer's default takes twice that step."""
    from internals_worker import classifier_step

    expected = -_classifier_gradient()
    torch.testing.assert_close(classifier_step(str(tmp_path / "mean"), True, accumulate=2, processes=1), expected,
                               rtol=1e-10, atol=1e-12)
    default = classifier_step(str(tmp_path / "default"), False, accumulate=2, processes=1)
    assert not torch.allclose(default, expected, rtol=1e-6), (
        f"transformers {metadata.version('transformers')}: Trainer now divides a sequence classifier's loss by the "
        "accumulation steps by itself; PerProcessMeanLoss.loss_is_scaled_for_ga (loft/app/trainer.py) can go")


def test_per_process_mean_loss_on_two_processes(two_rank_launch):
    """The same on 2 processes of 2 examples each (DDP): minus the gradient of the mean over the 4
    examples on both; Trainer's default (num_items_in_batch, the loss multiplied by the number of
    processes) takes twice that step."""
    expected = -_classifier_gradient()
    for r in _internal(two_rank_launch, "classifier_loss"):
        torch.testing.assert_close(r["True"], expected, rtol=1e-10, atol=1e-12)
        assert not torch.allclose(r["False"], expected, rtol=1e-6), (
            f"transformers {metadata.version('transformers')}: Trainer now scales a sequence classifier's loss right on "
            "several processes; PerProcessMeanLoss.compute_loss (loft/app/trainer.py) can go")


def test_checkpoint_name_is_what_trainer_resumes_from(tmp_path):
    from loft.app.rundir import checkpoint_name, checkpoints_in

    for step in (3, 12):
        (tmp_path / "checkpoints" / checkpoint_name(step)).mkdir(parents=True)
    assert [p.name for p in checkpoints_in(tmp_path)] == ["checkpoint-12", "checkpoint-3"]


def test_encoder_configs_by_transformers_public_masked_lm_table():
    from transformers import BertConfig, GPT2Config, LlamaConfig, RobertaConfig

    from loft.app.load import is_encoder_config

    assert is_encoder_config(BertConfig()) and is_encoder_config(RobertaConfig()), (
        f"transformers {metadata.version('transformers')}: MODEL_FOR_MASKED_LM_MAPPING no longer lists BERT / RoBERTa")
    assert not is_encoder_config(BertConfig(is_decoder=True))
    assert not is_encoder_config(LlamaConfig()) and not is_encoder_config(GPT2Config())


def test_linear_layer_types_include_transformers_conv1d_stored_in_by_out():
    from loft.app.tasks.base import linear_layer_types

    kinds = linear_layer_types()
    assert kinds[0] is nn.Linear
    layer = kinds[1](nf=3, nx=5)  # transformers' Conv1D(out_features, in_features)
    assert tuple(layer.weight.shape) == (5, 3), (
        f"transformers {metadata.version('transformers')}: Conv1D.weight is {tuple(layer.weight.shape)}, not (in, out)")


def test_loft_trainer_keeps_the_optimizer_it_built(tmp_path):
    """LoFTTrainer clips with the LoFTAdamW it built (``loft_optimizer``), the one inside
    Accelerate's wrapper in ``trainer.optimizer`` (no unwrapping of Accelerate's wrapper)."""
    import peft

    from loft import LoFTAdamW
    from loft.integrations import LoFTTrainer

    model = peft.get_peft_model(Regressor(), peft.LoraConfig(r=2, target_modules=["lin"]))
    trainer = _quiet(LoFTTrainer(model=model, args=_args(tmp_path, max_steps=1), train_dataset=rows(4)))
    assert trainer.loft_optimizer is None
    trainer.train()
    assert isinstance(trainer.loft_optimizer, LoFTAdamW)
    params = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert params == {id(p) for g in trainer.loft_optimizer.param_groups for p in g["params"]}


def test_bench_base_weights_are_what_fold_residual_adds_to():
    """federate's bench finds the LoRA layers with loft.pairs and their base with PEFT's public
    get_base_layer(): folding a residual changes exactly those weights."""
    import peft

    from loft import federated as fed
    from loft.app.federated.bench import base_weights

    torch.manual_seed(0)
    model = peft.get_peft_model(nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)),
                                peft.LoraConfig(r=2, target_modules=["0", "2"]))
    weights = base_weights(model)
    assert set(weights) == set(fed.get_factors(model))
    before = {n: w.detach().clone() for n, w in weights.items()}
    name = next(iter(weights))
    m, n = weights[name].shape
    fed.fold_residual(model, {name: (torch.ones(1, n), torch.ones(m, 1))})
    assert not torch.equal(weights[name], before[name])
    assert all(torch.equal(weights[k], before[k]) for k in weights if k != name)
