"""``loft.clip_grad_norm_``: gradient clipping by the norm of the *projected full* gradient.

For a LoRA pair the gradient that moves the model is not ``(grad_A, grad_B)`` but the full
gradient ``G`` projected onto what the step can change: ``P_U G`` when A moves, ``G P_A`` when
B moves, and the tangent projection ``P_U G + G P_A - P_U G P_A`` when both move. Summed with
the plain squared norms of the other trainable parameters it gives the total norm that LoFT
clips by; at full rank it equals the dense gradient's norm, so clipping is exactly
``torch.nn.utils.clip_grad_norm_`` on ``W``. The formulas are in :mod:`loft.functional`
(:func:`~loft.functional.pair_sq_norm`); this function only drives a
:class:`~loft.LoFTAdamW` through its public methods.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .functional import clip_coefficient

__all__ = ["clip_grad_norm_"]


@torch.no_grad()
def clip_grad_norm_(optimizer: Any, max_norm: float, error_if_nonfinite: bool = False) -> Tensor:
    """Clip the gradients of every parameter of a :class:`~loft.LoFTAdamW` in place.

    The LoFT counterpart of ``torch.nn.utils.clip_grad_norm_(params, max_norm)`` for code that
    clips outside the optimizer step (construct the optimizer with ``max_grad_norm=None`` then).
    It takes the optimizer, not the parameters: the norm is the projected full-gradient norm of
    the factors that the *next* step moves, plus the plain norms of the other parameters.
    Returns the total norm before clipping (a scalar tensor), like torch's; with an inf or NaN
    gradient that is inf or nan, as torch's. The work of the norm (stacked factors, grams,
    solves) is reused by the next ``optimizer.step()``.
    """
    if not (hasattr(optimizer, "grad_norm") and hasattr(optimizer, "scale_grads_")):
        raise TypeError(
            f"loft.clip_grad_norm_ takes the LoFTAdamW optimizer, not {type(optimizer).__name__}: "
            "call loft.clip_grad_norm_(optimizer, max_norm). LoFT's norm needs to know which tensors "
            "form a LoRA pair and which factor moves next. (For plain parameters use "
            "torch.nn.utils.clip_grad_norm_.)"
        )
    total = optimizer.grad_norm()
    if error_if_nonfinite and not bool(torch.isfinite(total)):
        raise RuntimeError(
            f"The total norm of the gradients is {float(total)}; set error_if_nonfinite=False to clip anyway."
        )
    optimizer.scale_grads_(clip_coefficient(total, float(max_norm)))
    return total
