"""A quantized base model for QLoRA: ``loft finetune --load-in-4bit`` / ``--load-in-8bit``.

The base is loaded through transformers' ``BitsAndBytesConfig`` (4-bit: nf4 with double
quantization; 8-bit: LLM.int8), its linear layers become bitsandbytes ``Linear4bit`` /
``Linear8bitLt`` layers, and ``peft.prepare_model_for_kbit_training`` readies it for an adapter
(every base parameter frozen, the remaining non-quantized ones in float32). The adapter (LoRA
factors, DoRA magnitudes, the fresh head) stays in float32 (:func:`keep_adapter_float32` undoes
TRL's bfloat16 cast for instruction data) and is trained by the method's optimizer as on a
full-precision base; the saved adapter loads on the full-precision base with
``PeftModel.from_pretrained``.

Kept in full precision: the output embedding and tied weights (transformers' own choice) and
the freshly initialised modules (a classification head, which the run trains in full). On the
CPU the 4-bit compute dtype is float32; on a GPU bfloat16 where supported (else float16).
"""

from __future__ import annotations

import gc
import logging
import os
import warnings
from typing import Any

import torch

from .errors import LoftUsageError

__all__ = ["keep_adapter_float32", "load_quantized", "quantized_layers"]


def _quiet() -> None:
    # bitsandbytes logs a warning about an optional CPU kernel package at import, and warns on
    # every 8-bit matmul on the CPU that it casts its input to float16; neither is actionable
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt: inputs will be cast.*")
    warnings.filterwarnings("ignore", message=".*inputs will be cast from torch.float32 to float16.*")


def _compute_dtype() -> torch.dtype:
    if not torch.cuda.is_available():
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _device_map() -> Any:
    """Where bitsandbytes puts the model: this process's GPU, else the CPU."""
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))}
    return "cpu"


def _config(bits: int, skip: list[str] | None):
    from transformers import BitsAndBytesConfig

    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=_compute_dtype(), llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


def quantized_layers(model: torch.nn.Module) -> list[str]:
    """Names of ``model``'s bitsandbytes 4-bit / 8-bit layers."""
    import bitsandbytes as bnb

    kinds = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return [name for name, module in model.named_modules() if isinstance(module, kinds)]


def _inside(name: str, modules: list[str]) -> bool:
    return any(name == m or name.startswith(m + ".") for m in modules)


def load_quantized(task: Any, model_path: str, spec: str, bits: int) -> tuple[torch.nn.Module, list[str]]:
    """``task``'s model from ``model_path`` with its linear layers in ``bits`` (4 or 8) bits, ready
    for an adapter; returns ``(model, names of freshly initialised parameters)`` like
    ``Task.load_model``. A model whose fresh modules (the head) transformers would quantize is
    loaded a second time with them kept in full precision (which modules are fresh is known only
    after loading)."""
    _quiet()
    import peft

    from ..integrations.library_internals import keep_4bit_layers_trainable_on_cpu
    from .tasks.base import fresh_modules, linear_layer_types

    flag = f"--load-in-{bits}bit"

    def load(skip: list[str] | None):
        try:
            return task.load_model(model_path, dtype=torch.float32, quantization_config=_config(bits, skip),
                                   device_map=_device_map())
        except (OSError, ValueError, TypeError, RuntimeError) as e:
            text = " ".join(str(e).split()) or type(e).__name__
            raise LoftUsageError(f"Could not load model {spec!r} ({model_path}) with {flag}: {text}") from None

    model, missing = load(None)
    fresh = fresh_modules(missing)
    if any(_inside(name, fresh) for name in quantized_layers(model)):
        quantized = set(quantized_layers(model))
        kept = [name for name, m in model.named_modules() if isinstance(m, linear_layer_types()) and name not in quantized]
        del model
        gc.collect()
        model, missing = load(sorted(set(kept) | set(fresh)))
    if not quantized_layers(model):
        raise LoftUsageError(
            f"{flag}: model {spec!r} has no linear layer that bitsandbytes can quantize (every one is an output "
            f"embedding, tied or freshly initialised). Drop {flag} for this model."
        )
    if bits == 4:
        keep_4bit_layers_trainable_on_cpu(model)
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model, missing


def keep_adapter_float32(model: torch.nn.Module) -> int:
    """Put back in float32 the trainable parameters (adapter, head) that a trainer cast to
    bfloat16; returns how many it changed. Call it after the trainer is built.

    TRL's ``SFTTrainer`` (trl 1.x, instruction data) casts a quantized model's trainable
    parameters to bfloat16 in its ``__init__``, following the QLoRA paper. loft trains the
    adapter in float32 on a quantized base for every task, and must: a resumed run reloads its
    adapter through PEFT's ``load_adapter``, which upcasts it to float32, so a bfloat16 adapter
    would train in bfloat16 before an interruption and in float32 after it (``--resume`` not
    bit-exact). The parameters stay the same objects (``param.data`` is replaced), so an
    optimizer built before keeps them.
    """
    changed = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype == torch.bfloat16:
            param.data = param.data.to(torch.float32)
            changed += 1
    return changed
