"""Gradient clipping by the norm of the *projected full* gradient.

For a LoRA pair the gradient that moves the model is not ``(grad_A, grad_B)`` but the full
gradient ``G`` projected onto what the step can change: ``P_U G`` when A moves, ``G P_A`` when
B moves, and the tangent projection ``P_U G + G P_A - P_U G P_A`` when both move. Its squared
norm needs only ``r x r`` work. Summed with the plain squared norms of the other trainable
parameters it gives the total norm that LoFT clips by; at full rank it equals the dense
gradient's norm, so clipping is exactly ``torch.nn.utils.clip_grad_norm_`` on ``W``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .functional import Side, projected_sq_norm

if TYPE_CHECKING:  # pragma: no cover
    from .optim import LoFTAdamW

__all__ = ["clip_coefficient", "clip_grad_norm_", "pair_sq_norm"]


def pair_sq_norm(side_a: Side, side_b: Side, *, move_a: bool, move_b: bool, projected: bool) -> Tensor:
    """Squared gradient norm of one pair for clipping (``()``, or ``(b,)`` for a batch of pairs).

    ``projected=False``: the plain ``||grad_A||^2 + ||grad_B||^2`` (parameter units), what
    ``torch.nn.utils.clip_grad_norm_`` would see. Otherwise the projected full gradient of the
    factor(s) that move this step; both sides need ``scaled`` set.
    """
    if not projected:
        return side_a.grad.square().sum((-2, -1)) + side_b.grad.square().sum((-2, -1)) * side_b.unit**2
    if move_a and move_b:
        # ||P_U G||^2 + ||G P_A||^2 - ||P_U G P_A||^2, the last as tr((AA^T)^-1 K^T (U^T U) K), K = gA A^T
        k = side_a.scaled @ side_b.partner
        cross = side_b.solver.solve(k.transpose(-1, -2) @ side_a.gram @ k).diagonal(dim1=-2, dim2=-1).sum(-1)
        return projected_sq_norm(side_a) + projected_sq_norm(side_b) - cross
    return projected_sq_norm(side_a if move_a else side_b)


def clip_coefficient(total_norm: Tensor, max_norm: float) -> Tensor:
    """``min(1, max_norm / (total_norm + 1e-6))``, as in ``torch.nn.utils.clip_grad_norm_``."""
    return (max_norm / (total_norm + 1e-6)).clamp(max=1.0)


@torch.no_grad()
def clip_grad_norm_(optimizer: LoFTAdamW, max_norm: float, error_if_nonfinite: bool = False) -> Tensor:
    """Clip the gradients of every parameter of a :class:`~loft.LoFTAdamW` in place.

    The LoFT counterpart of ``torch.nn.utils.clip_grad_norm_(params, max_norm)`` for code that
    clips outside the optimizer step (construct the optimizer with ``max_grad_norm=None`` then).
    The norm is the projected full-gradient norm of the factors that the *next* step moves,
    plus the plain norms of the other parameters. Returns the total norm before clipping (a
    scalar tensor), like torch's.
    """
    total = optimizer.grad_norm()
    if error_if_nonfinite and not bool(torch.isfinite(total)):
        raise RuntimeError(
            f"The total norm of the gradients is {float(total)}; set error_if_nonfinite=False to clip anyway."
        )
    coef = clip_coefficient(total, float(max_norm))
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                p.grad.mul_(coef.to(device=p.grad.device, dtype=p.grad.dtype))
    return total
