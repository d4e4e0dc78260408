"""The LoFT update as pure functions on one *side* of a LoRA pair.

A LoRA pair computes ``dW = U @ A`` with ``U = s * B`` (``m x r``) and ``A`` (``r x n``). The
algorithm treats its two factors symmetrically, since ``dW^T = A^T @ U^T``. Each side is a
factor ``F`` (``r x k``) with a fixed partner ``P`` (``l x r``) such that the side's view of the
adapter is ``P @ F``:

=========  ==========  ==========  ===========================
side       ``F``       ``P``       ``P @ F``
=========  ==========  ==========  ===========================
A          ``A``       ``U``       ``dW``  (``m x n``)
B          ``U^T``     ``A^T``     ``dW^T`` (``n x m``)
=========  ==========  ==========  ===========================

With ``G = dL/d(dW)`` (seen from the side: ``G`` or ``G^T``), autograd's gradient of ``F`` is
``P^T G``. Every formula of the paper then has one form:

* gradient scaling: ``g = (P^T P)^-1 P^T G``, so ``P g`` is the projection of ``G``;
* calibration: when ``P`` moved from ``P_prev``, ``C = (P^T P)^-1 P^T P_prev`` carries the
  moments into the new basis, ``m <- C m`` and ``S_j <- C S_j C^T``;
* projected full update: ``F <- (1 - lr wd) F - lr (P^T P)^-1 P^T D`` with ``D`` the full-space
  AdamW direction rebuilt from the moments.

The B side is stored in units of ``U = s B``; :func:`factor_adam_update` converts back to B's
own units so that, with every building block off, the optimizer is plain AdamW on ``B``.

Every function also takes a *batch* of sides of pairs of one shape: each tensor then has a
leading batch dimension (``(b, r, k)``, ``(b, l, r)``, ``(b, k, p)``, ...) and the math is done
per pair with batched GEMMs and solves.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .linalg import DampedGram, PackedIndex, packed_outer, packed_transport, projected_adam_direction

__all__ = [
    "Side",
    "calibrate",
    "factor_adam_update",
    "projected_update",
    "projected_sq_norm",
    "update_moments",
]


@dataclass
class Side:
    """One factor of a pair (or of a batch of pairs) in compute dtype, with what its step needs.

    ``factor`` ``F``: ``(r, k)``; ``partner`` ``P``: ``(l, r)``; ``gram``: ``P^T P`` ``(r, r)``
    and ``solver``, its damped factorisation; ``grad``: ``dL/dF = P^T G`` ``(r, k)``;
    ``scaled``: ``(P^T P)^-1 grad`` (``(r, k)``, computed when gradient scaling or projected
    clipping needs it); ``unit``: the factor's size in its parameter's own units (1 for A, ``s``
    for B, since ``F = s B^T``). A batch of ``b`` pairs has ``(b, r, k)``, ``(b, l, r)``, ...
    and one ``unit`` for all.
    """

    factor: Tensor
    partner: Tensor
    gram: Tensor
    solver: DampedGram
    grad: Tensor
    unit: float
    scaled: Tensor | None = None

    def select(self, index: Tensor) -> Side:
        """The sides ``index`` of a batch (a gather on the first dimension)."""
        return Side(
            self.factor[index],
            self.partner[index],
            self.gram[index],
            self.solver.select(index),
            self.grad[index],
            self.unit,
            None if self.scaled is None else self.scaled[index],
        )


def projected_sq_norm(side: Side) -> Tensor:
    """``||P (P^T P)^-1 P^T G||_F^2 = <grad, scaled>``: squared norm of the projected gradient
    (``()``, or ``(b,)`` for a batch)."""
    assert side.scaled is not None
    return (side.grad * side.scaled).sum((-2, -1))


def calibrate(
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    side: Side,
    previous_partner: Tensor,
    index: PackedIndex,
    *,
    first_moment: bool,
    second_moment: bool,
    chunk_bytes: int = 4 * 2**20,
) -> None:
    """Carry the moments from the basis ``previous_partner`` into the current partner's, in place.

    ``C = (P^T P)^-1 P^T P_prev`` (``r x r``); ``exp_avg <- C exp_avg`` (``(r, k)``) and each
    packed gram row of ``exp_avg_sq`` (``(k, p)``) ``S_j <- C S_j C^T``. With only the diagonal
    stored (``second_moment`` off) the second moment is left as it is. ``previous_partner``:
    ``(l, r)`` (``(b, l, r)`` for a batch).
    """
    if not (first_moment or second_moment):
        return
    c = side.solver.solve(side.partner.transpose(-1, -2) @ previous_partner)
    if first_moment:
        exp_avg.copy_(c @ exp_avg)
    if second_moment and not index.diagonal_only:
        exp_avg_sq.copy_(packed_transport(exp_avg_sq, c, index, chunk_bytes))


def update_moments(
    exp_avg: Tensor, exp_avg_sq: Tensor, grad: Tensor, index: PackedIndex, beta1: float, beta2: float
) -> None:
    """Adam's moment updates for one side, in place.

    ``exp_avg`` ``(r, k)``: ``m <- b1 m + (1 - b1) g``. ``exp_avg_sq`` ``(k, p)``: each column's
    gram ``S_j <- b2 S_j + (1 - b2) g_j g_j^T`` in packed form (with a diagonal-only index this
    is Adam's elementwise ``v``, stored transposed).
    """
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).add_(packed_outer(grad, index), alpha=1 - beta2)


def projected_update(
    side: Side,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    index: PackedIndex,
    *,
    lr: float,
    weight_decay: float,
    eps: float,
    bias_correction1: float,
    bias_correction2: float,
    chunk_bytes: int,
) -> Tensor:
    """The new factor after LoFT's projected full AdamW step: ``(r, k)``.

    ``F_new = (1 - lr wd) F - lr (P^T P)^-1 P^T D``, where ``D`` (``l x k``, never stored whole)
    is the AdamW direction of the full weight rebuilt from the moments. Weight decay scales only
    this factor, which decays the adapter's change ``P F`` toward the pretrained weight.
    """
    projected = projected_adam_direction(
        side.partner,
        exp_avg,
        exp_avg_sq,
        index,
        bias_correction1=bias_correction1,
        bias_correction2=bias_correction2,
        eps=eps,
        chunk_bytes=chunk_bytes,
    )
    step = side.solver.solve(projected)
    return side.factor.mul(1 - lr * weight_decay).sub_(step, alpha=lr)


def factor_adam_update(
    side: Side,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    index: PackedIndex,
    *,
    lr: float,
    weight_decay: float,
    eps: float,
    bias_correction1: float,
    bias_correction2: float,
) -> Tensor:
    """The new factor after a plain elementwise AdamW step on the factor itself: ``(r, k)``.

    Used when the projected full update is switched off. The step is AdamW on the *parameter*
    (A, or B = U / s): with ``u = side.unit``, moments in parameter units are ``u m`` and
    ``u^2 v``, so ``F_new = (1 - lr wd) F - lr u (m / bc1) / (sqrt(v / bc2) + eps / u)``.
    """
    u = side.unit
    v = exp_avg_sq[..., index.diag].transpose(-1, -2)
    denom = v.sqrt().mul_(bias_correction2 ** -0.5).add_(eps / u)
    return side.factor.mul(1 - lr * weight_decay).addcdiv_(exp_avg, denom, value=-lr * u / bias_correction1)
