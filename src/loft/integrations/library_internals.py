"""Every private or undocumented part of transformers, Accelerate and PEFT that loft relies on.

loft overrides two private ``transformers.Trainer`` hooks and patches a few attributes that
the libraries do not document as API. Each such use is one small function (or name) here, its
docstring saying what it relies on and why; the rest of loft calls these instead of touching
the libraries' internals. ``tests/test_library_internals.py`` checks every relied-on name
against the installed versions and fails with a message naming the library, its version and
the attribute when a release renames or reshapes one; a silent change would be worst for
:func:`let_train_wrap_for_ddp`: without it several processes train without averaging their
gradients.

Importing this module imports nothing heavy (only the standard library): the core
(:mod:`loft.integrations`) and the application (:mod:`loft.app`) both use it, each function
importing the library it needs when called.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = [
    "BATCH_SAMPLES_HOOK",
    "CLIP_HOOK",
    "SAVE_CHECKPOINT_HOOK",
    "checkpoint_folder_name",
    "clip_hook_missing",
    "forget_gguf_quantization",
    "fsdp_on_cpu",
    "is_encoder_model_type",
    "keep_4bit_layers_trainable_on_cpu",
    "let_train_wrap_for_ddp",
    "linear_layer_types",
    "loss_is_per_process_mean",
    "saving_checkpoints_into",
    "unwrap_optimizer",
]

#: ``Trainer._clip_grad_norm(self, model)``: Trainer's clipping step (transformers >= 5.0). The
#: LoFT mixin overrides it to clip by LoFT's projected norm (loft/integrations/trainer.py).
CLIP_HOOK = "_clip_grad_norm"

#: ``Trainer._save_checkpoint(self, model, trial)``: writes ``checkpoint-N`` under the run
#: folder. ``loft finetune`` overrides it to write each checkpoint beside its final place and
#: rename it in once complete (loft/app/finetune.py, :func:`saving_checkpoints_into`).
SAVE_CHECKPOINT_HOOK = "_save_checkpoint"

#: ``Trainer.get_batch_samples(self, epoch_iterator, num_batches, device)``: fetches the batches
#: of one optimizer step, called by the training loop before each step (transformers 5.x;
#: public name, but when and how the loop calls it is not documented). ``loft finetune``
#: overrides it to take no step once ``global_step`` has reached ``max_steps``: Trainer checks
#: the step count only after a step, so a resume from the checkpoint of the last step would
#: otherwise train one step too many (loft/app/finetune.py).
BATCH_SAMPLES_HOOK = "get_batch_samples"


def clip_hook_missing(trainer_cls: type | None = None) -> str | None:
    """Why ``trainer_cls`` (default ``transformers.Trainer``) cannot clip with LoFT's norm, or
    ``None``: relies on the private :data:`CLIP_HOOK` method, which Trainer calls once per
    optimizer step when ``max_grad_norm > 0`` and whose result it logs as ``grad_norm``."""
    if trainer_cls is None:
        from transformers import Trainer as trainer_cls
    if callable(getattr(trainer_cls, CLIP_HOOK, None)):
        return None
    return (
        f"This transformers version has no Trainer.{CLIP_HOOK} hook, which loft uses to clip with "
        "LoFT's norm instead of Trainer's; upgrade transformers (>=5.0)."
    )


def unwrap_optimizer(optimizer: Any, target: type) -> Any:
    """The ``target`` optimizer inside Accelerate's ``AcceleratedOptimizer`` wrappers.

    Relies on ``AcceleratedOptimizer.optimizer`` (an attribute, not documented API) holding the
    wrapped optimizer; Trainer keeps the wrapper in ``trainer.optimizer`` after ``prepare``.
    """
    while hasattr(optimizer, "optimizer") and not isinstance(optimizer, target):
        optimizer = optimizer.optimizer
    return optimizer


def checkpoint_folder_name(step: int) -> str:
    """``checkpoint-<step>``: the folder name Trainer gives a checkpoint (``PREFIX_CHECKPOINT_DIR``
    of ``transformers.trainer_utils``, which ``resume_from_checkpoint`` also searches for)."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    return f"{PREFIX_CHECKPOINT_DIR}-{step}"


@contextmanager
def saving_checkpoints_into(trainer: Any, folder: str) -> Iterator[None]:
    """While inside, ``Trainer._save_checkpoint`` writes its ``checkpoint-N`` into ``folder``.

    Relies on ``_save_checkpoint`` taking its run folder from ``Trainer._get_output_dir(trial)``,
    which is ``trainer.args.output_dir`` outside hyperparameter search; the setting is restored
    on exit.
    """
    root = trainer.args.output_dir
    trainer.args.output_dir = str(folder)
    try:
        yield
    finally:
        trainer.args.output_dir = root


def let_train_wrap_for_ddp(trainer: Any) -> None:
    """Let ``trainer.train()`` wrap the model in DDP after a ``Trainer.predict`` before training.

    On several processes ``Trainer.predict`` before ``train()`` prepares the model for evaluation
    only (no DDP wrapper), and Accelerate marks it as prepared (transformers 5.24, accelerate
    1.15); ``train()`` then skips the DDP wrapper and each process trains alone on its share of
    every batch, gradients never averaged. Clear that mark and Accelerate's record of the model
    so that ``train()`` prepares it for training.

    Relies on Accelerate's private ``model._is_accelerate_prepared`` flag and
    ``Accelerator._models`` list, and on ``trainer.model_wrapped`` being the bare model until
    ``train()`` wraps it. tests/test_cli_distributed.py compares a 2-process run with a
    1-process run and fails without this.
    """
    model = trainer.model
    if trainer.args.world_size <= 1 or trainer.model_wrapped is not model:
        return
    if getattr(model, "_is_accelerate_prepared", False):
        model._is_accelerate_prepared = False
        prepared = getattr(trainer.accelerator, "_models", None)
        if isinstance(prepared, list):
            prepared[:] = [m for m in prepared if m is not model]


def loss_is_per_process_mean(trainer: Any) -> None:
    """Tell ``trainer`` that the model's loss is a plain per-process mean (sequence classifiers).

    Sequence classifiers take ``**kwargs`` but neither average their loss over gradient
    accumulation steps nor over the processes' examples; with ``num_items_in_batch`` Trainer
    would multiply their per-process mean loss by the number of processes (DDP then averages):
    N times the gradient. Relies on Trainer's ``loss_is_scaled_for_ga`` class attribute and the
    ``model_accepts_loss_kwargs`` attribute Trainer sets in ``__init__`` (not documented API),
    both read by ``Trainer.training_step`` / ``compute_loss``.
    """
    trainer.loss_is_scaled_for_ga = False
    trainer.model_accepts_loss_kwargs = False


def is_encoder_model_type(config: Any) -> bool:
    """Whether a model config is an encoder (BERT, RoBERTa ...) rather than a causal LM.

    Relies on ``MODEL_FOR_MASKED_LM_MAPPING_NAMES`` of
    ``transformers.models.auto.modeling_auto`` (the table behind ``AutoModelForMaskedLM``; a
    module path, not a top-level export) and on ``config.model_type`` / ``config.is_decoder``.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", None)
    return model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False)


def linear_layer_types() -> tuple[type, ...]:
    """The layer classes LoRA adapts: ``torch.nn.Linear`` and transformers' GPT-2 style
    ``Conv1D`` (``transformers.pytorch_utils``, weight stored as ``(in, out)``), which PEFT's
    LoRA also targets."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    return nn.Linear, Conv1D


def forget_gguf_quantization(model: Any) -> None:
    """Make a model loaded from a GGUF file (dequantized to float) savable as a plain folder.

    ``save_pretrained`` refuses a model whose ``hf_quantizer`` is set (a GGUF load sets it) and
    would write the ``quantization_config`` into ``config.json``. Relies on the
    ``model.hf_quantizer`` attribute (set by ``from_pretrained``, not documented API) and on
    ``config.quantization_config``.
    """
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def fsdp_on_cpu(accelerator: Any, fsdp_plugin: Any) -> bool:
    """Make ``accelerator`` shard with ``fsdp_plugin`` (FSDP2) on CPU processes (gloo).

    Accelerate 1.15 turns the FSDP plugin on only for GPU-like set-ups (``MULTI_GPU``, ``MULTI_XPU``
    ...); with ``MULTI_CPU`` it silently ignores it and trains with DDP, although torch's
    ``fully_shard`` runs on CPU over gloo. Relies on the shared ``AcceleratorState`` taking
    writes to ``distributed_type`` and ``fsdp_plugin`` (read by ``Accelerator.prepare``, its
    ``is_fsdp2`` and the FSDP checkpoint helpers), and on ``PartialState._shared_state`` holding
    the ``distributed_type`` that every later ``AcceleratorState()`` copies back into the shared
    state (as ``AcceleratorState.__init__`` itself writes it there): without that write
    ``is_fsdp2`` turned false again after ``prepare``, and Trainer's FULL_STATE_DICT save handed
    DTensors to PEFT's ``save_pretrained``, which failed on rank 0 while rank 1 waited. Returns
    whether it changed anything.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = accelerator.state
    if fsdp_plugin is None or state.distributed_type != DistributedType.MULTI_CPU:
        return False
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = fsdp_plugin
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return True


def keep_4bit_layers_trainable_on_cpu(model: Any) -> int:
    """Stop bitsandbytes from repacking ``model``'s 4-bit layers for CPU inference; returns how
    many layers were switched.

    bitsandbytes (0.50) converts a ``Linear4bit`` weight to an AVX512-BF16 packed layout the
    first time the layer runs on the CPU in eval mode without gradients (an evaluation), and keeps
    it: the packed path has no backward (training after an evaluation then fails: "a view of a
    leaf Variable that requires grad is being used in an in-place operation") and refuses layers
    whose input width is not a multiple of the 64-value block. Relies on the instance attribute
    ``Linear4bit.support_avx512bf16_for_cpu`` (set in ``__init__``, read by ``forward``; not
    documented API): with it false the layer always uses the ordinary (trainable) path.
    """
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)
