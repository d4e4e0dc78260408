"""Finding LoRA pairs: which trainable tensors are the ``A`` and ``B`` of one adapter.

PEFT is optional: layers are recognised by structure (``lora_A`` / ``lora_B`` module dicts, or
``lora_embedding_A`` / ``lora_embedding_B`` parameter dicts, next to a ``scaling`` dict keyed by
adapter name), which is what every PEFT LoRA layer (Linear, GPT-2 Conv1D, Embedding, Conv, DoRA,
bitsandbytes) has. People with their own LoRA modules build :class:`LoRAPair` themselves.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from torch import Tensor, nn

from .linalg import rank_regime

__all__ = ["LoRAPair", "adapter_factors", "count_lora_layers", "find_lora_pairs", "split_lora_parameters", "warn_about_ranks_between"]


@dataclass(eq=False)
class LoRAPair:
    """One LoRA adapter: ``dW = scaling * B @ A``.

    ``A``: ``(r, n)`` (or a conv ``lora_A`` weight ``(r, in, *kernel)``, used as ``(r, in *
    prod(kernel))``); ``B``: ``(m, r)`` (or ``(m, r, 1, ...)``). ``scaling``: a number, or a
    function returning it (read at every step, so PEFT's live ``layer.scaling[adapter]`` is
    followed). ``name`` is used in messages. One factor may be frozen (``requires_grad=False``,
    read at every step, e.g. FFA-LoRA's frozen ``A`` or a federated round that trains one
    factor): :class:`~loft.LoFTAdamW` then moves only the other one, at every step, and does not
    rebalance the pair.
    """

    A: Tensor
    B: Tensor
    scaling: float | Callable[[], float] = 1.0
    name: str = field(default="")

    def __post_init__(self) -> None:
        where = f" ({self.name})" if self.name else ""
        for label, t in (("A", self.A), ("B", self.B)):
            if not isinstance(t, Tensor):
                raise TypeError(f"LoRAPair{where}: {label} must be a tensor, got {type(t).__name__}.")
            if t.dim() < 2:
                raise ValueError(f"LoRAPair{where}: {label} must have at least 2 dimensions, got shape {tuple(t.shape)}.")
        r = self.A.shape[0]
        if self.B.shape[1] != r or any(d != 1 for d in self.B.shape[2:]):
            raise ValueError(
                f"LoRAPair{where}: shapes do not form a product B @ A: A is {tuple(self.A.shape)} (rank "
                f"{r} rows) but B is {tuple(self.B.shape)}; B must be (out_features, {r})."
            )
        if self.A.dtype != self.B.dtype or self.A.device != self.B.device:
            raise ValueError(
                f"LoRAPair{where}: A and B must share dtype and device, got {self.A.dtype}/{self.A.device} "
                f"and {self.B.dtype}/{self.B.device}."
            )
        if not (self.A.requires_grad or self.B.requires_grad):
            raise ValueError(
                f"LoRA pair {self.name or '(unnamed)'}: neither factor is trainable (both have "
                "requires_grad=False). Set requires_grad=True on at least one, or leave the pair out."
            )
        if self.A.is_sparse or self.B.is_sparse:
            raise ValueError(f"LoRAPair{where}: sparse factors are not supported.")
        self.scale()  # validate now, not at the first step

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """``(m, n)``: the shape of ``dW``."""
        return int(self.B.shape[0]), math.prod(self.A.shape[1:])  # (shapes only: A may be a DTensor)

    @property
    def rank_regime(self) -> str:
        """``"low"``, ``"between"`` or ``"full"``: see :func:`loft.linalg.rank_regime`."""
        return rank_regime(*self.shape, self.rank)

    def scale(self) -> float:
        s = float(self.scaling() if callable(self.scaling) else self.scaling)
        if not math.isfinite(s) or s == 0.0:
            raise ValueError(
                f"LoRA pair {self.name or '(unnamed)'} has scaling {s}; LoFT needs a finite, non-zero "
                "scaling (check lora_alpha)."
            )
        return s

    @staticmethod
    def matrix(t: Tensor) -> Tensor:
        """A 2-D view of a factor (conv kernels flattened): ``(rows, -1)``."""
        return t.reshape(t.shape[0], -1)


def adapter_factors(module: nn.Module) -> list[tuple[str, Tensor, Tensor]]:
    """``(adapter, A, B)`` for each adapter of a PEFT LoRA layer ``module`` (empty if it is none):
    the adapter's name and its factors' weights, ``A`` of shape ``(r, in_features)`` and ``B`` of
    shape ``(out_features, r)`` (a convolution's: its kernels, ``(r, in, *k)`` and ``(out, r, 1, ...)``;
    an embedding's: ``(r, num_embeddings)`` and ``(embedding_dim, r)``). Raises ``ValueError`` for
    layers LoFT cannot pair (mixture-of-experts LoRA, grouped convolutions)."""
    found: list[tuple[str, Tensor, Tensor]] = []
    lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
    if isinstance(lora_a, nn.ModuleDict) and isinstance(lora_b, nn.ModuleDict):
        for adapter, a_mod in lora_a.items():
            if adapter not in lora_b:
                continue
            b_mod = lora_b[adapter]
            if getattr(module, "num_experts", 1) != 1:
                raise ValueError(
                    f"{type(module).__name__} is a mixture-of-experts LoRA layer; LoFTAdamW does not support "
                    "it yet. Leave it out of target_modules or train it with another optimizer."
                )
            if isinstance(b_mod, nn.modules.conv._ConvNd) and b_mod.groups != 1:
                raise ValueError(
                    f"{type(module).__name__}: grouped-convolution LoRA (groups={b_mod.groups}) is not a "
                    "single product B @ A; LoFTAdamW does not support it."
                )
            found.append((adapter, a_mod.weight, b_mod.weight))
    emb_a, emb_b = getattr(module, "lora_embedding_A", None), getattr(module, "lora_embedding_B", None)
    if isinstance(emb_a, nn.ParameterDict) and isinstance(emb_b, nn.ParameterDict):
        for adapter, a in emb_a.items():
            if adapter in emb_b:
                found.append((adapter, a, emb_b[adapter]))
    return found


def _scaling_reader(module: nn.Module, adapter: str) -> Callable[[], float]:
    scaling = getattr(module, "scaling", None)
    if not isinstance(scaling, dict) or adapter not in scaling:
        raise ValueError(
            f"{type(module).__name__} has LoRA factors for adapter {adapter!r} but no scaling[{adapter!r}]; "
            "pass explicit loft.LoRAPair(A, B, scaling) objects instead."
        )
    return lambda: scaling[adapter]


def find_lora_pairs(model: nn.Module) -> list[LoRAPair]:
    """Every trainable LoRA pair in ``model`` (a PEFT model, a module holding PEFT LoRA layers,
    or either wrapped in ``DistributedDataParallel``), in module order.

    Adapters whose factors are both frozen (inactive adapters) are skipped. Each pair is found
    once, under the first module that shows it: a wrapper that forwards attribute access to the
    layer it wraps (torch's ``CheckpointWrapper`` of activation checkpointing) shows the layer's
    ``lora_A`` / ``lora_B`` as its own, and the pair is not counted again under the wrapped layer.
    """
    pairs: list[LoRAPair] = []
    seen: set[tuple[int, int]] = set()
    for name, module in model.named_modules():
        for adapter, a, b in adapter_factors(module):
            if not (a.requires_grad or b.requires_grad) or (id(a), id(b)) in seen:
                continue
            seen.add((id(a), id(b)))
            pairs.append(LoRAPair(a, b, _scaling_reader(module, adapter), name=f"{name}[{adapter}]"))
    return pairs


def split_lora_parameters(model: nn.Module) -> tuple[list[LoRAPair], list[Tensor]]:
    """``(pairs, others)``: the LoRA pairs of ``model`` and its other trainable parameters
    (biases, heads, norms, ``modules_to_save``, DoRA magnitudes), each once, in module order."""
    pairs = find_lora_pairs(model)
    in_pairs = {id(t) for p in pairs for t in (p.A, p.B)}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in in_pairs]
    return pairs, others


def count_lora_layers(model: nn.Module) -> int:
    """How many LoRA layers ``model`` holds (trainable or not), each once (see :func:`find_lora_pairs`)."""
    return len({tuple(id(t) for _, a, b in found for t in (a, b)) for _, m in model.named_modules()
                if (found := adapter_factors(m))})



def warn_about_ranks_between(pairs: Iterable[LoRAPair]) -> None:
    """Warn once about the pairs whose rank lies strictly between ``min(m, n)`` and ``max(m, n)``.

    PEFT accepts such ranks, and LoFT trains them, but its step there is neither invariant to
    the factors' basis nor reproducible across roundings (see :func:`loft.linalg.rank_regime`).
    """
    between = [p for p in pairs if p.rank_regime == "between"]
    if not between:
        return
    p = between[0]
    (m, n), r = p.shape, p.rank
    more = f" and {len(between) - 1} more" if len(between) > 1 else ""
    warnings.warn(
        f"LoRA rank {r} of {p.name or 'a pair'} ({m} x {n}){more} lies between min(m, n) = {min(m, n)} and "
        f"max(m, n) = {max(m, n)}. LoFT's step there depends on how the factors split dW and on rounding "
        f"(one gram is singular while the other factor does not span its side), and dW cannot exceed rank "
        f"{min(m, n)} anyway. Use rank <= {min(m, n)} (the same expressiveness), or rank >= {max(m, n)}, where "
        "LoFT is exactly AdamW on the layer.",
        UserWarning,
        stacklevel=3,
    )
