"""Train a PEFT model with LoFT under ``transformers.Trainer`` (and its subclasses, such as
TRL's ``SFTTrainer``).

>>> from loft.integrations import LoFTTrainer
>>> trainer = LoFTTrainer(model=peft_model, args=TrainingArguments(...), train_dataset=ds,
...                       loft_options={"head_lr": 1e-3})
>>> trainer.train()                                  # or trainer.train(resume_from_checkpoint=True)

For another Trainer subclass: ``LoFTSFTTrainer = with_loft(SFTTrainer)``.

What the mixin changes, and only that:

- ``create_optimizer`` builds a :class:`loft.LoFTAdamW` over the whole model from the
  ``TrainingArguments`` (``learning_rate``, ``adam_beta1/2``, ``adam_epsilon``,
  ``weight_decay``) plus ``loft_options`` (``head_lr``, switches, ...). The optimizer is made
  inside the Trainer, so Trainer's refusal of a pre-built optimizer under FSDP does not apply.
  With ``fsdp`` / ``fsdp_config`` (FSDP2: ``fsdp_config={"version": 2, ...}``) Trainer builds it
  before Accelerate shards the model and swaps the optimizer's parameters for the shards;
  ``LoFTAdamW`` follows the swap (:meth:`LoFTAdamW.follow_swapped_params`, :mod:`loft.registry`) and steps the shards with one owner rank
  per pair. On CPU processes the mixin makes Accelerate shard over gloo (it would otherwise
  ignore the FSDP plugin there and train with DDP).
  LR schedulers, gradient accumulation, ``save_steps``
  checkpoints and ``resume_from_checkpoint`` (optimizer state included) are Trainer's own.
- Gradient clipping: Trainer's ``max_grad_norm`` (default 1.0) is kept, but the clipping is
  LoFT's (:func:`loft.clip_grad_norm_`, by the norm of the projected full gradient) instead of
  ``torch.nn.utils.clip_grad_norm_`` over the factors; the two never both run. The logged
  ``grad_norm`` is LoFT's norm. Set ``max_grad_norm=0`` to turn clipping off. The norm's work
  (stacked factors, grams, solves) is kept by the optimizer and reused by its ``step()``, so
  clipping does not prepare the step twice.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer, TrainingArguments

from ..clip import clip_grad_norm_
from ..optim import LoFTAdamW
from .library_internals import CLIP_HOOK, clip_hook_missing, shard_trainer_on_cpu

__all__ = ["LoFTTrainer", "LoFTTrainerMixin", "build_loft_optimizer", "with_loft"]


def build_loft_optimizer(model: torch.nn.Module, args: TrainingArguments, **loft_options: Any) -> LoFTAdamW:
    """A :class:`loft.LoFTAdamW` for ``model`` with the optimizer settings of ``args``.

    ``loft_options`` go to ``LoFTAdamW`` (``head_lr``, ``head_weight_decay``, switches ...) and
    override the values taken from ``args``. Clipping is left to the caller (``max_grad_norm``
    is not set): :class:`LoFTTrainerMixin` clips with :func:`loft.clip_grad_norm_`.
    """
    options: dict[str, Any] = dict(
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        weight_decay=args.weight_decay,
    )
    options.update(loft_options)
    return LoFTAdamW(model, **options)


class LoFTTrainerMixin:
    """Mix into a ``transformers.Trainer`` subclass to train with :class:`loft.LoFTAdamW`.

    Extra keyword argument: ``loft_options`` (dict), passed to ``LoFTAdamW``. Must come before
    the Trainer class in the bases: ``class MyTrainer(LoFTTrainerMixin, SFTTrainer)``.

    ``loft_optimizer``: the :class:`loft.LoFTAdamW` it built (``None`` before
    ``create_optimizer``); ``trainer.optimizer`` holds it inside Accelerate's wrapper once
    training starts.
    """

    loft_optimizer: LoFTAdamW | None = None

    def __init__(self, *args: Any, loft_options: dict[str, Any] | None = None, **kwargs: Any) -> None:
        optimizers = kwargs.get("optimizers")
        if optimizers is not None and optimizers[0] is not None:
            raise ValueError(
                f"{type(self).__name__} builds its LoFTAdamW itself; do not pass optimizers=(optimizer, ...). "
                "Pass LoFT settings as loft_options={...} (a scheduler may still be passed as optimizers=(None, scheduler))."
            )
        if kwargs.get("optimizer_cls_and_kwargs") is not None:
            raise ValueError(f"{type(self).__name__} builds its LoFTAdamW itself; pass loft_options={{...}} instead of optimizer_cls_and_kwargs.")
        missing = clip_hook_missing(Trainer)
        if missing:  # pragma: no cover - guards against a Trainer refactor
            raise RuntimeError(missing)
        self.loft_options = dict(loft_options or {})
        if "max_grad_norm" in self.loft_options:
            raise ValueError(
                "Set clipping with TrainingArguments(max_grad_norm=...), not loft_options: the trainer already "
                "clips with LoFT's projected norm, and clipping twice would hide which limit applies."
            )
        super().__init__(*args, **kwargs)

    def create_accelerator_and_postprocess(self) -> None:
        """Trainer's own, plus: with ``fsdp`` / ``fsdp_config`` on CPU processes, shard with FSDP2
        over gloo (Accelerate would silently train with DDP there; see
        :func:`~loft.integrations.library_internals.shard_trainer_on_cpu`)."""
        super().create_accelerator_and_postprocess()  # type: ignore[misc]
        shard_trainer_on_cpu(self)

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """Build the :class:`loft.LoFTAdamW` (once)."""
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            self.optimizer = self.loft_optimizer = build_loft_optimizer(opt_model, self.args, **self.loft_options)
        return self.optimizer

    # Trainer's private clipping hook (library_internals.CLIP_HOOK, checked in __init__ and by
    # tests/test_library_internals.py)
    def _clip_grad_norm(self, model: torch.nn.Module) -> torch.Tensor:
        """Trainer's clipping hook: clip by LoFT's projected full-gradient norm."""
        if self.loft_optimizer is None:  # (a subclass built another optimizer)
            return super()._clip_grad_norm(model)
        self.accelerator.unscale_gradients()  # a no-op without an fp16 grad scaler
        return clip_grad_norm_(self.loft_optimizer, self.args.max_grad_norm)


assert LoFTTrainerMixin._clip_grad_norm.__name__ == CLIP_HOOK


class LoFTTrainer(LoFTTrainerMixin, Trainer):
    """``transformers.Trainer`` that trains with :class:`loft.LoFTAdamW` (see the module docs)."""


def with_loft(trainer_cls: type[Trainer]) -> type[Trainer]:
    """A subclass of ``trainer_cls`` (e.g. TRL's ``SFTTrainer``) that trains with LoFT."""
    return type(f"LoFT{trainer_cls.__name__}", (LoFTTrainerMixin, trainer_cls), {"__doc__": LoFTTrainerMixin.__doc__})
