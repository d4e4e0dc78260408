"""Integrations of :class:`loft.LoFTAdamW` with training frameworks (transformers ``Trainer``)."""

from .trainer import LoFTTrainer, LoFTTrainerMixin, build_loft_optimizer, with_loft

__all__ = ["LoFTTrainer", "LoFTTrainerMixin", "build_loft_optimizer", "with_loft"]
