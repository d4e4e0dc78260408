"""Integrations of :class:`loft.LoFTAdamW` with training frameworks (transformers ``Trainer``)."""

try:
    from .lr_search import find_lr_with_trainer
    from .trainer import LoFTTrainer, LoFTTrainerMixin, build_loft_optimizer, with_loft
except ModuleNotFoundError as e:  # transformers is an extra: say which one
    if e.name and e.name.split(".")[0] in ("transformers", "accelerate", "peft"):
        raise ModuleNotFoundError(
            f"loft.integrations needs {e.name.split('.')[0]}: pip install 'torch-loft[peft]'", name=e.name
        ) from e
    raise

__all__ = ["LoFTTrainer", "LoFTTrainerMixin", "build_loft_optimizer", "find_lr_with_trainer", "with_loft"]
