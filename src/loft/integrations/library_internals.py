"""Every private or undocumented part of transformers, Accelerate, PEFT, TRL and bitsandbytes that loft
relies on.

Each use is one small function (or hook name) here, its docstring saying what it relies on, why
no public API does the job, and which test guards it; the rest of loft calls these instead of
touching the libraries' internals. ``tests/test_library_internals.py`` checks each by what it
does (a tiny Trainer run, a 2-process launch, a LoRA-FA step ...) with the installed versions
and fails with a message naming the library, its version, the attribute and what to do. The
table in docs/architecture.md ("Library internals") lists them, with what would replace each.

Importing this module imports nothing heavy (only the standard library): the core
(:mod:`loft.integrations`) and the application (:mod:`loft.app`) both use it, each function
importing the library it needs when called.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

__all__ = [
    "BATCH_SAMPLES_HOOK",
    "CLIP_HOOK",
    "SAVE_CHECKPOINT_HOOK",
    "clip_hook_missing",
    "forget_gguf_quantization",
    "fsdp_on_cpu",
    "fused_head_scores_labelled_positions_only",
    "keep_4bit_layers_trainable_on_cpu",
    "let_train_wrap_for_ddp",
    "lorafa_head_group",
    "saving_checkpoints_into",
    "shard_trainer_on_cpu",
]

# ----------------------------------------------------------------------------- transformers.Trainer hooks
#: ``Trainer._clip_grad_norm(self, model)``: Trainer's clipping step (transformers >= 5.0), called
#: once per optimizer step when ``max_grad_norm > 0``; its result is logged as ``grad_norm``. The
#: LoFT mixin overrides it to clip by LoFT's projected norm (loft/integrations/trainer.py). No
#: public hook runs there and returns the logged norm (a callback's ``on_pre_optimizer_step`` runs
#: after Trainer's own clipping and cannot set ``grad_norm``).
CLIP_HOOK = "_clip_grad_norm"

#: ``Trainer._save_checkpoint(self, model, trial)``: writes ``checkpoint-N`` (model, optimizer,
#: scheduler, RNG states, ``trainer_state.json``) under ``args.output_dir``. ``loft finetune``
#: overrides it to write each checkpoint beside its final place, rename it in once complete, and
#: turn a failed write on any process into one error on every process (loft/app/trainer.py, with
#: :func:`saving_checkpoints_into`). A ``TrainerCallback.on_save`` runs only after the save
#: returned: it cannot catch a full disk on rank 0 while rank 1 waits.
SAVE_CHECKPOINT_HOOK = "_save_checkpoint"

#: ``Trainer.get_batch_samples(self, epoch_iterator, num_batches, device)``: fetches the batches
#: of one optimizer step, called by the training loop before each step (transformers 5.x; public
#: name, but when and how the loop calls it is not documented). ``loft finetune`` overrides it to
#: take no step once ``global_step`` has reached ``max_steps``: Trainer checks the step count only
#: after a step, so a resume from the checkpoint of the last step would otherwise train one step
#: too many (loft/app/trainer.py). No callback event comes before the first step's forward.
BATCH_SAMPLES_HOOK = "get_batch_samples"


def clip_hook_missing(trainer_cls: type | None = None) -> str | None:
    """Why ``trainer_cls`` (default ``transformers.Trainer``) cannot clip with LoFT's norm, or
    ``None``: relies on the private :data:`CLIP_HOOK` method."""
    if trainer_cls is None:
        from transformers import Trainer as trainer_cls
    if callable(getattr(trainer_cls, CLIP_HOOK, None)):
        return None
    return (
        f"This transformers version has no Trainer.{CLIP_HOOK} hook, which loft uses to clip with "
        "LoFT's norm instead of Trainer's; upgrade transformers (>=5.0)."
    )


@contextmanager
def saving_checkpoints_into(trainer: Any, folder: str) -> Iterator[None]:
    """While inside, ``Trainer._save_checkpoint`` writes its ``checkpoint-N`` into ``folder``.

    Relies on ``_save_checkpoint`` taking its run folder from ``args.output_dir`` at the time it
    runs (through the private ``Trainer._get_output_dir(trial)`` outside hyperparameter search);
    the setting is restored on exit.
    """
    root = trainer.args.output_dir
    trainer.args.output_dir = str(folder)
    try:
        yield
    finally:
        trainer.args.output_dir = root


# ----------------------------------------------------------------------------- transformers + Accelerate: processes
def let_train_wrap_for_ddp(trainer: Any) -> None:
    """Let ``trainer.train()`` wrap the model in DDP after a ``Trainer.predict`` before training.

    On several processes ``Trainer.predict`` before ``train()`` prepares the model for evaluation
    only (``Accelerator.prepare_model(model, evaluation_mode=True)``: no DDP wrapper) and
    Accelerate marks the model itself as prepared; ``train()`` then returns the marked model
    unwrapped and each process trains alone on its share of every batch, gradients never averaged
    (transformers 5.25, Accelerate 1.16). Clear that mark, and Accelerate's record of prepared
    objects (the public ``Accelerator.free_memory()``, which ``train()`` itself calls first), so
    that ``train()`` prepares the model for training.

    Relies on Accelerate's private ``model._is_accelerate_prepared`` flag (read by
    ``prepare_model``) and on ``trainer.model_wrapped`` being the bare model until ``train()``
    wraps it. A public alternative would evaluate before training without ``Trainer.predict``.
    """
    model = trainer.model
    if trainer.args.world_size <= 1 or trainer.model_wrapped is not model:
        return
    if getattr(model, "_is_accelerate_prepared", False):
        model._is_accelerate_prepared = False
        trainer.accelerator.free_memory()


def fsdp_on_cpu(accelerator: Any, fsdp_plugin: Any) -> bool:
    """Make ``accelerator`` shard with ``fsdp_plugin`` (FSDP2) on CPU processes (gloo).

    Accelerate 1.16 turns the FSDP plugin on only for GPU-like set-ups (``MULTI_GPU``, ``MULTI_XPU``
    ...); with ``MULTI_CPU`` it silently ignores it and trains with DDP, although torch's
    ``fully_shard`` runs on CPU over gloo. Relies on the shared ``AcceleratorState`` taking
    writes to ``distributed_type`` and ``fsdp_plugin`` (read by ``Accelerator.prepare``, its
    ``is_fsdp2`` and the FSDP checkpoint helpers), and on ``PartialState._shared_state`` holding
    the ``distributed_type`` that every later ``AcceleratorState()`` copies back into the shared
    state: without that write ``is_fsdp2`` turned false again after ``prepare``, and Trainer's
    FULL_STATE_DICT save handed DTensors to PEFT's ``save_pretrained``, which failed on rank 0
    while rank 1 waited. Returns whether it changed anything.
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


def shard_trainer_on_cpu(trainer: Any) -> bool:
    """When ``trainer.args`` ask for FSDP and the processes run on the CPU, make the trainer's
    Accelerator shard with FSDP2 over gloo instead of ignoring the plugin (:func:`fsdp_on_cpu`);
    returns whether it changed anything. Call it from ``create_accelerator_and_postprocess``
    after Trainer's own.

    Relies on ``TrainingArguments.fsdp_plugin_args`` (the keyword arguments of Accelerate's
    ``FullyShardedDataParallelPlugin`` that Trainer builds its plugin from; set in
    ``__post_init__``, not documented) and on ``Trainer.is_fsdp_enabled`` (set in
    ``create_accelerator_and_postprocess``, read by Trainer's save, load and optimizer code).
    """
    plugin_args = getattr(trainer.args, "fsdp_plugin_args", None)
    if not trainer.args.fsdp or plugin_args is None or getattr(trainer, "is_fsdp_enabled", False):
        return False
    from accelerate.utils import FullyShardedDataParallelPlugin

    if not fsdp_on_cpu(trainer.accelerator, FullyShardedDataParallelPlugin(**plugin_args)):
        return False
    trainer.is_fsdp_enabled = True
    return True


# ----------------------------------------------------------------------------- models
def forget_gguf_quantization(model: Any) -> None:
    """Make a model loaded from a GGUF file (dequantized to float) savable as a plain folder.

    ``save_pretrained`` refuses a model whose ``hf_quantizer`` is set (a GGUF load sets it, and
    its quantizer says it is not serializable) and would write the ``quantization_config`` into
    ``config.json``. The public ``model.dequantize()`` raises NotImplementedError for GGUF
    (transformers 5.25). Relies on the ``model.hf_quantizer`` attribute (set by
    ``from_pretrained``, not documented API) and on ``config.quantization_config``.
    """
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


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


# ----------------------------------------------------------------------------- TRL
@contextmanager
def fused_head_scores_labelled_positions_only() -> Iterator[bool]:
    """Within this context, TRL's fused LM head projects only the positions that have a label, on
    every device; yields whether it could arrange that.

    TRL (>= 1.16) computes an SFT loss through ``add_fused_lm_head``: the last hidden states
    ``(batch, seq - 1, hidden)`` go through the LM head in tiles, yielding one log-probability per
    position. Its ``trl.trainer.utils._use_triton(device)`` decides whether it scores only the
    positions whose label is not -100 (``hidden[mask]``, true on CUDA / XPU with Triton) or every
    position and masks the rest afterwards (elsewhere: compilers such as Neuron's recompile for
    every new number of positions). Both give the same per-position values (a tile's rows are
    independent); on CPU the second spends the head, and its backward, on prompt tokens whose loss
    is zero, most of them with a completion-only loss and short answers (SmolLM2-135M's head is
    49,152 x 576; ``benchmarks/sft_head.py`` times a step both ways, docs/performance.md). No
    public option chooses the compact path. The swap is undone on exit (the kernels' own choice of
    Triton is untouched).
    Guarded by ``test_fused_head_scores_only_labelled_positions_with_the_same_loss_and_gradients``.
    """
    try:
        from trl.trainer import utils
    except ImportError:
        yield False
        return
    original = getattr(utils, "_use_triton", None)
    if original is None:
        yield False
        return
    utils._use_triton = lambda device: True
    try:
        yield True
    finally:
        utils._use_triton = original


# ----------------------------------------------------------------------------- PEFT
def lorafa_head_group(optimizer: Any, head: Sequence[tuple[str, Any]], *, lr: float, weight_decay: float) -> None:
    """Move the ``head`` parameters (``(name, param)`` pairs: the fresh classification head) of
    PEFT's LoRA-FA optimizer into a param group of their own at ``lr``.

    ``peft.optimizers.create_lorafa_optimizer`` puts every parameter of the model into one group
    at the LoRA learning rate (it needs the frozen ``lora_A`` beside each ``lora_B``), with the
    parallel lists ``names`` and ``scaling_factors``; ``LoraFAOptimizer.step`` reads those keys and
    ``betas`` in every group, and steps a parameter whose name has no ``lora`` as AdamW. Relies
    on that group layout (PEFT 0.21; not documented API): the head is removed from each group
    with its entries of the parallel lists, and added as a group with the same keys.
    """
    drop = {id(p) for _, p in head}
    for group in optimizer.param_groups:
        keep = [i for i, p in enumerate(group["params"]) if id(p) not in drop]
        for key in ("params", "names", "scaling_factors"):
            if key in group:
                group[key] = [group[key][i] for i in keep]
    if head:
        optimizer.add_param_group({"params": [p for _, p in head], "lr": lr, "weight_decay": weight_decay,
                                   "names": [n for n, _ in head], "scaling_factors": [None] * len(head),
                                   "betas": (0.9, 0.999)})
