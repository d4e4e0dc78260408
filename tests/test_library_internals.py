"""Every private or undocumented name of transformers / Accelerate that loft relies on
(loft/integrations/library_internals.py) still exists, with the shape loft expects, in the
installed versions. A failure names the library, its version and the attribute: read the
docstring of the matching function in library_internals.py before adapting it."""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap
from importlib import metadata
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")

from loft.integrations import library_internals as li  # noqa: E402


def _lib(name: str, attr: str, what: str) -> str:
    """The assert message: library, installed version, attribute, what changed."""
    return f"{name} {metadata.version(name)}: {attr} {what} (see loft/integrations/library_internals.py)"


def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


# ----------------------------------------------------------------------------- transformers.Trainer
def test_trainer_clip_hook_exists_and_is_called_per_step():
    from transformers import Trainer

    hook = getattr(Trainer, li.CLIP_HOOK, None)
    assert callable(hook), _lib("transformers", f"Trainer.{li.CLIP_HOOK}", "is gone")
    assert _params(hook) == ["self", "model"], _lib("transformers", f"Trainer.{li.CLIP_HOOK}", f"now takes {_params(hook)}")
    loop = inspect.getsource(Trainer)
    assert f"self.{li.CLIP_HOOK}(model)" in loop, _lib("transformers", f"Trainer.{li.CLIP_HOOK}", "is no longer called by the training loop")
    assert li.clip_hook_missing(Trainer) is None
    assert "no Trainer._clip_grad_norm hook" in li.clip_hook_missing(object)


def test_loft_trainer_overrides_the_clip_hook():
    from loft.integrations import LoFTTrainerMixin

    assert li.CLIP_HOOK in vars(LoFTTrainerMixin), "LoFTTrainerMixin no longer overrides the clipping hook"


def test_trainer_save_checkpoint_hook_and_its_output_folder():
    from transformers import Trainer

    hook = getattr(Trainer, li.SAVE_CHECKPOINT_HOOK, None)
    where = f"Trainer.{li.SAVE_CHECKPOINT_HOOK}"
    assert callable(hook), _lib("transformers", where, "is gone")
    assert _params(hook) == ["self", "model", "trial"], _lib("transformers", where, f"now takes {_params(hook)}")
    source = inspect.getsource(hook)
    assert "self._get_output_dir(trial=trial)" in source, _lib("transformers", where, "no longer takes its folder from _get_output_dir")
    assert "self.args.output_dir" in inspect.getsource(Trainer._get_output_dir), _lib(
        "transformers", "Trainer._get_output_dir", "no longer returns args.output_dir"
    )
    from loft.app.trainer import RunTrainerMixin

    assert li.SAVE_CHECKPOINT_HOOK in vars(RunTrainerMixin), "loft finetune no longer overrides the checkpoint hook"


def test_trainer_batch_samples_hook_is_called_before_each_step():
    from transformers import Trainer

    hook = getattr(Trainer, li.BATCH_SAMPLES_HOOK, None)
    where = f"Trainer.{li.BATCH_SAMPLES_HOOK}"
    assert callable(hook), _lib("transformers", where, "is gone")
    assert _params(hook) == ["self", "epoch_iterator", "num_batches", "device"], _lib(
        "transformers", where, f"now takes {_params(hook)}")
    loop = inspect.getsource(Trainer)
    assert f"self.{li.BATCH_SAMPLES_HOOK}(epoch_iterator, num_batches" in loop, _lib(
        "transformers", where, "is no longer called by the training loop")
    assert "for i, inputs in enumerate(batch_samples)" in loop, _lib(
        "transformers", where, "its batches are no longer what the step trains on")
    from loft.app.trainer import RunTrainerMixin

    assert li.BATCH_SAMPLES_HOOK in vars(RunTrainerMixin), "loft finetune no longer overrides the batch hook"


def test_checkpoint_folder_name_is_what_trainer_writes(tmp_path):
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

    assert PREFIX_CHECKPOINT_DIR == "checkpoint", _lib("transformers", "trainer_utils.PREFIX_CHECKPOINT_DIR", f"is {PREFIX_CHECKPOINT_DIR!r}")
    assert li.checkpoint_folder_name(12) == "checkpoint-12"
    for step in (3, 12):
        (tmp_path / li.checkpoint_folder_name(step)).mkdir()
    found = get_last_checkpoint(str(tmp_path))  # what resume_from_checkpoint=True looks for
    assert found is not None and found.endswith("checkpoint-12"), _lib("transformers", "trainer_utils.get_last_checkpoint", f"found {found}")


def test_trainer_loss_scaling_attributes():
    from transformers import Trainer

    assert "loss_is_scaled_for_ga" in vars(Trainer), _lib("transformers", "Trainer.loss_is_scaled_for_ga", "is no longer a class attribute")
    assert "self.model_accepts_loss_kwargs =" in inspect.getsource(Trainer.__init__), _lib(
        "transformers", "Trainer.model_accepts_loss_kwargs", "is no longer set in __init__"
    )
    step = inspect.getsource(Trainer.training_step)
    for name in ("self.loss_is_scaled_for_ga", "self.model_accepts_loss_kwargs"):
        assert name in step, _lib("transformers", name, "is no longer read by Trainer.training_step")
    trainer = SimpleNamespace(loss_is_scaled_for_ga=None, model_accepts_loss_kwargs=True)
    li.loss_is_per_process_mean(trainer)
    assert trainer.loss_is_scaled_for_ga is False and trainer.model_accepts_loss_kwargs is False


def test_saving_checkpoints_into_restores_the_folder_even_on_error():
    trainer = SimpleNamespace(args=SimpleNamespace(output_dir="runs/x/checkpoints"))
    with pytest.raises(RuntimeError):
        with li.saving_checkpoints_into(trainer, "runs/x/checkpoints/.incoming"):
            assert trainer.args.output_dir == "runs/x/checkpoints/.incoming"
            raise RuntimeError
    assert trainer.args.output_dir == "runs/x/checkpoints"


# ----------------------------------------------------------------------------- transformers, other
def test_masked_lm_table():
    from transformers.models.auto import modeling_auto

    table = getattr(modeling_auto, "MODEL_FOR_MASKED_LM_MAPPING_NAMES", None)
    assert table is not None, _lib("transformers", "models.auto.modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES", "is gone")
    assert "bert" in table and "llama" not in table, _lib("transformers", "MODEL_FOR_MASKED_LM_MAPPING_NAMES", "changed meaning")
    assert li.is_encoder_model_type(SimpleNamespace(model_type="bert", is_decoder=False))
    assert not li.is_encoder_model_type(SimpleNamespace(model_type="bert", is_decoder=True))
    assert not li.is_encoder_model_type(SimpleNamespace(model_type="llama"))


def test_conv1d_stores_in_by_out():
    kinds = li.linear_layer_types()
    assert kinds[0] is torch.nn.Linear
    layer = kinds[1](nf=3, nx=5)  # transformers' Conv1D(out_features, in_features)
    assert tuple(layer.weight.shape) == (5, 3), _lib("transformers", "pytorch_utils.Conv1D.weight", f"is {tuple(layer.weight.shape)}, not (in, out)")


def test_gguf_quantizer_attribute():
    from transformers import PreTrainedModel

    assert "hf_quantizer" in inspect.getsource(PreTrainedModel.save_pretrained), _lib(
        "transformers", "PreTrainedModel.hf_quantizer", "is no longer what save_pretrained checks"
    )
    model = SimpleNamespace(hf_quantizer=object(), config=SimpleNamespace(quantization_config={"q": 1}))
    li.forget_gguf_quantization(model)
    assert model.hf_quantizer is None and not hasattr(model.config, "quantization_config")


# ----------------------------------------------------------------------------- Accelerate
def test_accelerated_optimizer_keeps_the_wrapped_optimizer():
    from accelerate.optimizer import AcceleratedOptimizer

    assert "self.optimizer = optimizer" in inspect.getsource(AcceleratedOptimizer.__init__), _lib(
        "accelerate", "AcceleratedOptimizer.optimizer", "no longer holds the wrapped optimizer"
    )
    inner = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    wrapped = SimpleNamespace(optimizer=SimpleNamespace(optimizer=inner))
    assert li.unwrap_optimizer(wrapped, torch.optim.SGD) is inner
    assert li.unwrap_optimizer(inner, torch.optim.SGD) is inner


def test_accelerate_prepared_mark_and_model_record():
    """What :func:`let_train_wrap_for_ddp` clears: run in a fresh interpreter (an Accelerator
    sets process-wide state)."""
    code = textwrap.dedent(
        """
        import torch
        from accelerate import Accelerator
        acc = Accelerator(cpu=True)
        assert isinstance(acc._models, list), "Accelerator._models is not a list"
        model = torch.nn.Linear(2, 2)
        out = acc.prepare_model(model, evaluation_mode=True)
        assert getattr(out, "_is_accelerate_prepared", None) is True, "prepare_model sets no _is_accelerate_prepared"
        assert any(m is out for m in acc._models), "prepare_model does not record the model in Accelerator._models"
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", _lib(
        "accelerate", "Accelerator._models / model._is_accelerate_prepared", f"changed: {out.stderr.strip()[-500:]}"
    )
    from accelerate import Accelerator

    source = inspect.getsource(Accelerator.prepare_model)
    assert 'getattr(model, "_is_accelerate_prepared", False)' in source, _lib(
        "accelerate", "Accelerator.prepare_model", "no longer skips a model marked _is_accelerate_prepared"
    )


def test_let_train_wrap_for_ddp_clears_the_mark_on_several_processes_only():
    model = torch.nn.Linear(2, 2)
    other = torch.nn.Linear(2, 2)

    def trainer(world: int, wrapped=None):
        model._is_accelerate_prepared = True
        acc = SimpleNamespace(_models=[model, other])
        return SimpleNamespace(model=model, model_wrapped=wrapped or model, accelerator=acc,
                               args=SimpleNamespace(world_size=world))

    one = trainer(1)
    li.let_train_wrap_for_ddp(one)
    assert model._is_accelerate_prepared is True and one.accelerator._models == [model, other]
    two = trainer(2)
    li.let_train_wrap_for_ddp(two)
    assert model._is_accelerate_prepared is False and two.accelerator._models == [other]
    already = trainer(2, wrapped=torch.nn.Linear(2, 2))  # train() has wrapped it: leave it alone
    li.let_train_wrap_for_ddp(already)
    assert model._is_accelerate_prepared is True


# ----------------------------------------------------------------------------- Accelerate FSDP2 on CPU
def test_accelerate_ignores_the_fsdp_plugin_on_cpu_processes_and_fsdp_on_cpu_sets_it(monkeypatch):
    """What fsdp_on_cpu works around and relies on: AcceleratorState enables FSDP only for GPU-like
    distributed types (the MULTI_CPU branch does not read the plugin), its distributed_type /
    fsdp_plugin / is_fsdp2 are plain shared attributes, and every AcceleratorState() copies
    PartialState's shared distributed_type back (so fsdp_on_cpu writes it there too)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    source = inspect.getsource(AcceleratorState.__init__)
    assert "DistributedType.FSDP" in source and "fsdp_plugin" in source, _lib("accelerate", "AcceleratorState.__init__", "no longer sets FSDP from the plugin")
    assert hasattr(DistributedType, "MULTI_CPU") and hasattr(DistributedType, "FSDP")
    assert "distributed_type == DistributedType.FSDP" in inspect.getsource(AcceleratorState.is_fsdp2.fget), _lib(
        "accelerate", "AcceleratorState.is_fsdp2", "is no longer read from distributed_type")
    assert "self.__dict__.update(PartialState._shared_state)" in source and \
        'PartialState._shared_state["distributed_type"]' in source, _lib(
        "accelerate", "AcceleratorState.__init__", "no longer keeps distributed_type in PartialState's shared state")
    monkeypatch.setattr(PartialState, "_shared_state", {})  # (this process's real state is left alone)
    state = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, fsdp_plugin=None)
    plugin = object()
    assert li.fsdp_on_cpu(SimpleNamespace(state=state), plugin)
    assert state.distributed_type == DistributedType.FSDP and state.fsdp_plugin is plugin
    assert PartialState._shared_state == {"distributed_type": DistributedType.FSDP}
    assert not li.fsdp_on_cpu(SimpleNamespace(state=state), plugin)  # already FSDP: nothing to do


# ----------------------------------------------------------------------------- bitsandbytes
def test_bitsandbytes_cpu_packing_switch_and_training_after_an_evaluation():
    bnb = pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn import Linear4bit

    forward = inspect.getsource(Linear4bit.forward)
    assert "support_avx512bf16_for_cpu" in forward, _lib("bitsandbytes", "Linear4bit.forward", "no longer reads support_avx512bf16_for_cpu")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 24), torch.nn.Linear(24, 8))  # widths not multiples of 64
    quantized = torch.nn.Sequential(*(Linear4bit(m.in_features, m.out_features, compute_dtype=torch.float32,
                                                 quant_type="nf4") for m in model))
    for q, m in zip(quantized, model):
        q.weight = bnb.nn.Params4bit(m.weight.data, requires_grad=False, quant_type="nf4")
        q.bias = torch.nn.Parameter(m.bias.data, requires_grad=False)
        q.to("cpu")  # quantizes
        assert hasattr(q, "support_avx512bf16_for_cpu"), _lib("bitsandbytes", "Linear4bit.support_avx512bf16_for_cpu", "is gone")
    assert li.keep_4bit_layers_trainable_on_cpu(quantized) == 2
    x = torch.randn(5, 40)
    quantized.eval()
    with torch.no_grad():
        before = quantized(x)
    quantized.train()
    x.requires_grad_(True)
    # without the switch this fails on a CPU with AVX512-BF16 (the packed inference layout has no
    # backward, and refuses these widths); elsewhere bitsandbytes never packs and it passes either way
    quantized(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    torch.testing.assert_close(before, model(x.detach()), atol=0.3, rtol=0.3)  # nf4 error, not garbage
