"""The LoFT algorithm as pure functions: one step of a batch of same-shape LoRA pairs.

A LoRA pair computes ``dW = U @ A`` with ``U = s * B`` (``m x r``) and ``A`` (``r x n``). The
algorithm treats its two factors symmetrically, since ``dW^T = A^T @ U^T``. Each *side* is a
factor ``F`` (``r x k``) with a partner ``P`` (``l x r``) such that the side's view of the
adapter is ``P @ F``:

=========  ==========  ==========  ===========================
side       ``F``       ``P``       ``P @ F``
=========  ==========  ==========  ===========================
A          ``A``       ``U``       ``dW``  (``m x n``)
B          ``U^T``     ``A^T``     ``dW^T`` (``n x m``)
=========  ==========  ==========  ===========================

With ``G = dL/d(dW)`` (seen from the side: ``G`` or ``G^T``), autograd's gradient of ``F`` is
``P^T G``. Every formula of the paper then has one form, written once here and used for both
sides. Every tensor carries a leading batch dimension ``b``: the pairs of one shape, param group
and step count are stepped together with batched GEMMs and solves (a lone pair is a batch of one).

The step, in the paper's order (:func:`prepare_pair` and :func:`scale_gradients` do 1,
:func:`pair_sq_norm` and :func:`clip_coefficient` do 5, :func:`loft_step` does 2-4 and
:func:`rebalance` the rebalancing, where :func:`loft.linalg.may_need_rebalancing` cannot rule
it out)::

    1. scaled gradients     g = (P^T P)^-1 P^T G                       (b, r, k)
    5. clipping coefficient c = min(1, max_norm / (||proj G|| + 1e-6))  over all pairs and heads
    2. calibration          C = (P^T P)^-1 P^T P_prev;  m <- C m;  S_j <- C S_j C^T
    3. moments              m <- b1 m + (1 - b1) c g;   S_j <- b2 S_j + (1 - b2) c^2 g_j g_j^T
    4. projected update     F <- (1 - lr wd) F - lr (P^T P)^-1 P^T D,
                            D = (P m / bc1) / (sqrt(V / bc2) + eps),  V_ij = P_i^T S_j P_i
       (only the active side moves: B on odd steps, A on even ones)
    +  rebalancing          (U, A) <- balanced factors of U A, when the grams drift apart

Clipping's coefficient needs every pair's norm before any moment changes, so it is computed
between preparation and the rest of the step.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from torch import Tensor

from .linalg import (
    DampedGram,
    PackedIndex,
    packed_outer,
    packed_transport,
    projected_adam_direction,
    rank_regime,
    rebalanced_factors_all,
    settle_all,
)

__all__ = [
    "PairOptions",
    "PreparedPair",
    "Side",
    "SideState",
    "StepResult",
    "basis_invariant",
    "calibrate",
    "checks_balance",
    "clip_coefficient",
    "factor_adam_update",
    "loft_step",
    "pair_sq_norm",
    "prepare_pair",
    "rebalance",
    "scale_gradients",
    "projected_sq_norm",
    "projected_update",
    "update_moments",
]


@dataclass(frozen=True)
class Side:
    """One factor of a batch of pairs in compute dtype, with what its step needs.

    ``factor`` ``F``: ``(b, r, k)``; ``partner`` ``P``: ``(b, l, r)``; ``gram``: ``P^T P``
    ``(b, r, r)`` and ``solver``, its damped factorisation; ``grad``: ``dL/dF = P^T G``
    ``(b, r, k)``; ``scaled``: ``(P^T P)^-1 grad`` (``(b, r, k)``, or ``None`` when neither
    gradient scaling nor projected clipping needs it); ``param_scale``: the number ``c`` with
    ``F = c * param^T`` (1 for A, the LoRA scaling ``s`` for B, since ``F = U^T = s B^T``).
    """

    factor: Tensor
    partner: Tensor
    gram: Tensor
    solver: DampedGram
    grad: Tensor
    param_scale: float
    scaled: Tensor | None

    def select(self, index: slice | Tensor) -> Side:
        """The sides ``index`` of the batch (a slice or gather on the first dimension)."""
        return Side(
            self.factor[index],
            self.partner[index],
            self.gram[index],
            self.solver.select(index),
            self.grad[index],
            self.param_scale,
            None if self.scaled is None else self.scaled[index],
        )

    def grads_scaled_by(self, coef: float) -> Side:
        """The same side with its gradients multiplied by ``coef`` (clipping outside the step)."""
        scaled = None if self.scaled is None else self.scaled * coef
        return replace(self, grad=self.grad * coef, scaled=scaled)


def _side(factor: Tensor, partner: Tensor, grad: Tensor, param_scale: float, damping: float) -> Side:
    gram = partner.mT @ partner
    solver = DampedGram(gram, damping, settle=False)
    return Side(factor, partner, gram, solver, grad, param_scale, None)


class PreparedPair(NamedTuple):
    """Both sides of a batch of pairs at gradient time, before any state changes."""

    a: Side
    b: Side


def prepare_pair(
    a: Tensor,
    u: Tensor,
    grad_a: Tensor,
    grad_u: Tensor,
    *,
    scaling: float,
    damping: float,
    scale_grads: bool,
    settle: bool = True,
) -> PreparedPair:
    """Step 1 for a batch: grams, their damped factorisations and the scaled gradients.

    ``a``: ``A`` ``(b, r, n)``; ``u``: ``U = s B`` ``(b, m, r)``; ``grad_a``: ``dL/dA``
    ``(b, r, n)``; ``grad_u``: ``dL/dU = (dL/dB) / s`` ``(b, m, r)``. Both sides are built from
    the factors as they are now, before either moves.

    ``settle=False`` stops before the solves: the caller settles the factorisations of all its
    batches at once (:func:`loft.linalg.settle_all`, one host sync) and then calls
    :func:`scale_gradients`.
    """
    side_a = _side(a, u, grad_a, 1.0, damping)
    side_b = _side(u.mT, a.mT, grad_u.mT, scaling, damping)
    pair = PreparedPair(side_a, side_b)
    if not settle:
        return pair
    settle_all([side_a.solver, side_b.solver])
    return scale_gradients(pair) if scale_grads else pair


def scale_gradients(pair: PreparedPair) -> PreparedPair:
    """1. the scaled gradients ``g = (P^T P)^-1 P^T G`` of both sides (``P g`` is the projection
    of ``G`` onto ``P``'s columns), from settled factorisations."""
    return PreparedPair(*(replace(side, scaled=side.solver.solve(side.grad)) for side in pair))


# ----------------------------------------------------------------------------- 5. clipping
def projected_sq_norm(side: Side) -> Tensor:
    """``||P (P^T P)^-1 P^T G||_F^2 = <grad, scaled>``: squared norm of the projected gradient ``(b,)``."""
    assert side.scaled is not None
    return (side.grad * side.scaled).sum((-2, -1))


def pair_sq_norm(pair: PreparedPair, *, move_a: bool, move_b: bool, projected: bool) -> Tensor:
    """Squared gradient norm of each pair of a batch for clipping, ``(b,)``.

    ``projected=False``: the plain ``||grad_A||^2 + ||grad_B||^2`` (parameter units), what
    ``torch.nn.utils.clip_grad_norm_`` would see. Otherwise the projected full gradient of the
    factor(s) that move this step: ``||G P_A||^2`` (B moves), ``||P_U G||^2`` (A moves), or the
    tangent norm ``||P_U G||^2 + ||G P_A||^2 - ||P_U G P_A||^2`` (both move).
    """
    side_a, side_b = pair
    if not projected:
        return side_a.grad.square().sum((-2, -1)) + side_b.grad.square().sum((-2, -1)) * side_b.param_scale**2
    if move_a and move_b:
        # ||P_U G P_A||^2 = tr((AA^T)^-1 K^T (U^T U) K) with K = gA A^T
        k = side_a.scaled @ side_b.partner
        cross = side_b.solver.solve(k.mT @ side_a.gram @ k).diagonal(dim1=-2, dim2=-1).sum(-1)
        return projected_sq_norm(side_a) + projected_sq_norm(side_b) - cross
    return projected_sq_norm(side_a if move_a else side_b)


def clip_coefficient(total_norm: Tensor, max_norm: float) -> Tensor:
    """``min(1, max_norm / (total_norm + 1e-6))``, as in ``torch.nn.utils.clip_grad_norm_``."""
    return (max_norm / (total_norm + 1e-6)).clamp(max=1.0)


# ----------------------------------------------------------------------------- 2-4. the sub-steps
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
    """Step 2: carry the moments from the basis ``previous_partner`` into the current partner's, in place.

    ``C = (P^T P)^-1 P^T P_prev`` (``(b, r, r)``); ``exp_avg <- C exp_avg`` (``(b, r, k)``) and
    each packed gram row of ``exp_avg_sq`` (``(b, k, p)``) ``S_j <- C S_j C^T``. With only the
    diagonal stored (``second_moment`` off) the second moment is left as it is.
    ``previous_partner``: ``(b, l, r)``.
    """
    if not (first_moment or second_moment):
        return
    c = side.solver.solve(side.partner.mT @ previous_partner)
    if first_moment:
        exp_avg.copy_(c @ exp_avg)
    if second_moment and not index.diagonal_only:
        exp_avg_sq.copy_(packed_transport(exp_avg_sq, c, index, chunk_bytes))


def update_moments(
    exp_avg: Tensor, exp_avg_sq: Tensor, grad: Tensor, index: PackedIndex, beta1: float, beta2: float
) -> None:
    """Step 3: Adam's moment updates for one side, in place.

    ``exp_avg`` ``(b, r, k)``: ``m <- b1 m + (1 - b1) g``. ``exp_avg_sq`` ``(b, k, p)``: each
    column's gram ``S_j <- b2 S_j + (1 - b2) g_j g_j^T`` in packed form (with a diagonal-only
    index this is Adam's elementwise ``v``, stored transposed).
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
    fuse: bool = False,
) -> Tensor:
    """Step 4: the new factor after LoFT's projected full AdamW step, ``(b, r, k)``.

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
        fuse=fuse,
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
    """Step 4 with the projected update off: a plain elementwise AdamW step on the factor's
    *parameter* (A, or B = U / s), returned as the new factor ``(b, r, k)``.

    With ``c = side.param_scale``, the moments in parameter units are ``c m`` and ``c^2 v``, so
    ``F_new = c * B_new`` is ``(1 - lr wd) F - lr |c| (m / bc1) / (sqrt(v / bc2) + eps / |c|)``:
    only ``|c|`` enters (Adam's step has the sign of its gradient whatever the sign of ``s``).
    """
    c = abs(side.param_scale)
    v = exp_avg_sq[..., index.diag].mT
    denom = v.sqrt().mul_(bias_correction2**-0.5).add_(eps / c)
    return side.factor.mul(1 - lr * weight_decay).addcdiv_(exp_avg, denom, value=-lr * c / bias_correction1)


# ----------------------------------------------------------------------------- the whole step
@dataclass(frozen=True)
class PairOptions:
    """A param group's numerical options, as the functional step reads them."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    gradient_scaling: bool
    first_moment_calibration: bool
    second_moment_calibration: bool
    projected_update: bool
    rebalance: bool
    rebalance_threshold: float


@dataclass
class SideState:
    """The stacked state of one side of a batch of pairs (mutated in place by :func:`loft_step`).

    ``exp_avg``: ``(b, r, k)``; ``exp_avg_sq``: packed grams ``(b, k, p)``; ``partner``: the
    partner the moments are expressed in, ``(b, l, r)``.
    """

    exp_avg: Tensor
    exp_avg_sq: Tensor
    partner: Tensor


class StepResult(NamedTuple):
    """The factors after a step of a batch: ``a`` ``(b, r, n)`` and ``u_t`` (``U^T``,
    ``(b, r, m)``), the old ones where nothing changed; ``rebalanced``: ``(b,)`` bool, the pairs
    whose factors were both re-factored (``None``: none were)."""

    a: Tensor
    u_t: Tensor
    rebalanced: Tensor | None


def _slices(n: int, size: int) -> list[slice]:
    return [slice(start, start + size) for start in range(0, n, size)]


def loft_step(
    pair: PreparedPair,
    state: tuple[SideState, SideState],
    *,
    step: int,
    move: tuple[bool, bool],
    options: PairOptions,
    index: PackedIndex,
    clip_coef: Tensor | float | None,
    chunk_bytes: int,
    moved: tuple[list[bool], list[bool]],
    fuse: bool = False,
) -> StepResult:
    """Steps 2-4 for a batch of pairs: updates ``state`` (A side, B side) in place and returns
    the new factors (see :class:`StepResult`; rebalancing is :func:`rebalance`, after the
    step). ``step``: the 1-based number of this step (bias correction); ``move``: whether A and
    B move; ``clip_coef``: the clipping coefficient (``None``: none; a tensor is never read on
    the host); ``moved``: for each side, which pairs' partner changed since the moments were
    stored (host booleans: the caller knows which factors it wrote; ignored at step 1);
    ``fuse``: the rebuild's elementwise passes as one compiled kernel.

    Calibration and the moment updates go a slice of pairs at a time, a quarter of
    ``chunk_bytes`` of grams per slice, so that their chained passes stay in cache.
    """
    bc1, bc2 = 1 - options.beta1**step, 1 - options.beta2**step
    new: list[Tensor] = []
    for side, st, moves, flags in zip(pair, state, move, moved):
        b, k, p = st.exp_avg_sq.shape
        per_slice = max(1, chunk_bytes // (4 * k * p * st.exp_avg_sq.element_size()))
        grad = side.scaled if options.gradient_scaling else side.grad
        if clip_coef is not None:
            grad = grad * (clip_coef.to(grad.dtype) if isinstance(clip_coef, Tensor) else clip_coef)
        calibration = dict(
            first_moment=options.first_moment_calibration,
            second_moment=options.second_moment_calibration,
            chunk_bytes=chunk_bytes,
        )
        for sl in _slices(b, per_slice):
            exp_avg, exp_avg_sq = st.exp_avg[sl], st.exp_avg_sq[sl]
            # 2. calibration: C = (P^T P)^-1 P^T P_prev; m <- C m; S_j <- C S_j C^T (moved pairs only;
            # none at the first step: the moments are zero)
            some = [] if step == 1 else [sl.start + i for i, f in enumerate(flags[sl]) if f]
            if len(some) == len(exp_avg):
                calibrate(exp_avg, exp_avg_sq, side.select(sl), st.partner[sl], index, **calibration)
            elif some:  # only these pairs: the others keep their moments exactly
                rows = torch.tensor(some, device=exp_avg.device)
                sub_avg, sub_sq = st.exp_avg[rows], st.exp_avg_sq[rows]
                calibrate(sub_avg, sub_sq, side.select(rows), st.partner[rows], index, **calibration)
                st.exp_avg[rows], st.exp_avg_sq[rows] = sub_avg, sub_sq
            # 3. moments: m <- b1 m + (1 - b1) g; S_j <- b2 S_j + (1 - b2) g_j g_j^T
            update_moments(exp_avg, exp_avg_sq, grad[sl], index, options.beta1, options.beta2)
        st.partner.copy_(side.partner)  # the basis the moments are now expressed in
        if not moves:
            new.append(side.factor)
            continue
        # 4. update: F <- (1 - lr wd) F - lr (P^T P)^-1 P^T D  (or AdamW on the factor itself)
        common = dict(
            lr=options.lr,
            weight_decay=options.weight_decay,
            eps=options.eps,
            bias_correction1=bc1,
            bias_correction2=bc2,
        )
        if options.projected_update:
            new.append(projected_update(side, st.exp_avg, st.exp_avg_sq, index, chunk_bytes=chunk_bytes, fuse=fuse, **common))
        else:
            new.append(factor_adam_update(side, st.exp_avg, st.exp_avg_sq, index, **common))
    return StepResult(new[0], new[1], None)


def checks_balance(options: PairOptions, shape: tuple[int, int, int]) -> bool:
    """Whether a batch of pairs of ``shape`` ``(m, n, r)`` is ever rebalanced: the option is on,
    the configuration is basis-invariant and ``r`` is not strictly between ``min(m, n)`` and
    ``max(m, n)`` (see :func:`loft.linalg.rank_regime`)."""
    m, n, r = shape
    return options.rebalance and basis_invariant(options) and rank_regime(m, n, r) != "between"


def rebalance(results: list[StepResult], thresholds: list[float]) -> list[StepResult]:
    """Rebalancing: ``(U, A) <- (Q_U X S^1/2, S^1/2 Y^T Q_A^T)`` for the pairs of each batch whose
    worse gram is more than ``threshold`` times worse-conditioned than the balanced factors'
    (the expensive check, :func:`loft.linalg.rebalanced_factors_all`: one host sync for all the
    batches; the caller skips the batches that :func:`loft.linalg.may_need_rebalancing` rules out)."""
    balanced = rebalanced_factors_all([(res.u_t.mT, res.a) for res in results], thresholds)
    out = []
    for result, bal in zip(results, balanced):
        if bal is None:
            out.append(result)
            continue
        u_new, a_new, better = bal
        pick = better[:, None, None]
        out.append(StepResult(torch.where(pick, a_new, result.a), torch.where(pick, u_new.mT, result.u_t), better))
    return out


def basis_invariant(options: PairOptions) -> bool:
    """Whether the step depends on the product ``dW`` only, not on the factors' basis."""
    return (
        options.gradient_scaling
        and options.first_moment_calibration
        and options.second_moment_calibration
        and options.projected_update
    )
