"""The LoFT algorithm as functions on plain tensors: one step of a batch of same-shape LoRA pairs.

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

**The whole step**, :func:`loft_step`: factors, gradients and state in, new factors and state out,
like ``torch.optim.adamw.adamw``. It is four phases, which a caller stepping many batches (the
optimizer) calls itself to make one host synchronisation per phase for all its batches:

1. :func:`prepare_step` (device work only): stacks in the compute dtype, grams, their Cholesky
   factorisations, and the comparisons of each stored partner with the current one where the
   caller does not know whether it moved;
2. :func:`settle_steps`: one host read of every batch's pending decisions (a Cholesky that failed
   gets the eigen fallback; which partners moved), then the scaled gradients (step 1 below);
   :func:`step_sq_norm` and :func:`clip_coefficient` give step 5's coefficient from them;
3. :func:`apply_step`: steps 2-4, the state updated in place;
4. :func:`rebalance_steps`: the rebalancing check of every batch with one host read (and one more
   for the batches that need the expensive check); :func:`new_factors` gives ``A`` and ``B``.

The math, in the paper's order::

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

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from torch import Tensor

from .linalg import (
    DampedGram,
    PackedIndex,
    PendingGram,
    compute_dtype,
    factor_grams,
    may_need_rebalancing,
    packed_index,
    packed_outer,
    packed_transport,
    projected_adam_direction,
    rank_regime,
    rebalanced_factors_all,
    settle_with,
)
from .options import LoFTOptions
from .state import PairState, SideState
from .syncs import host_values, on_host, to_host

__all__ = [
    "PairState", "PendingStep", "PreparedPair", "PreparedStep", "Side", "SideState", "StepOutput", "StepResult",
    "apply_step", "basis_invariant", "calibrate", "checks_balance", "clip_coefficient", "factor_adam_update",
    "loft_step", "new_factors", "pair_sq_norm", "prepare_step", "projected_sq_norm", "projected_update",
    "rebalance", "rebalance_steps", "settle_steps", "step_sq_norm", "update_moments",
]


# ----------------------------------------------------------------------------- 1. preparation
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
        return Side(self.factor[index], self.partner[index], self.gram[index], self.solver.select(index),
                    self.grad[index], self.param_scale, None if self.scaled is None else self.scaled[index])

    def grads_scaled_by(self, coef: float) -> Side:
        """The same side with its gradients multiplied by ``coef`` (clipping outside the step)."""
        scaled = None if self.scaled is None else self.scaled * coef
        return replace(self, grad=self.grad * coef, scaled=scaled)


class PreparedPair(NamedTuple):
    """Both sides of a batch of pairs at gradient time, before any state changes."""

    a: Side
    b: Side


@dataclass(frozen=True)
class PendingStep:
    """A batch after :func:`prepare_step`, before :func:`settle_steps` reads its decisions.

    ``params``: ``A`` and ``B`` as given; ``factors``, ``partners``, ``grads``, ``grams``: per side
    (A, then B), as in :class:`Side`;
    ``pending``: the grams' factorisations; ``moved``: per side, whether each pair's partner
    changed since its moments were stored (``None``: compared on the device, ``compared``);
    ``step``: the step this is (1-based); ``move``: whether A and B move.
    """

    params: tuple[Tensor, Tensor]
    factors: tuple[Tensor, Tensor]
    partners: tuple[Tensor, Tensor]
    grads: tuple[Tensor, Tensor]
    grams: tuple[Tensor, Tensor]
    pending: tuple[PendingGram, PendingGram]
    moved: tuple[list[bool | None], list[bool | None]]
    compared: tuple[Tensor | None, Tensor | None]
    scaling: float
    options: LoFTOptions
    step: int
    move: tuple[bool, bool]
    needs_scaled: bool

    def flags(self) -> list[Tensor]:
        """The device booleans :func:`settle_steps` reads: each factorisation's failures, then each
        side's partner comparisons."""
        return [p.failed() for p in self.pending] + [c for c in self.compared if c is not None]


@dataclass(frozen=True)
class PreparedStep:
    """A settled batch: its :class:`PreparedPair` (``sides``) and what :func:`apply_step` needs
    (``params``: ``A`` and ``B`` as given to :func:`prepare_step`)."""

    params: tuple[Tensor, Tensor]
    sides: PreparedPair
    moved: tuple[list[bool], list[bool]]
    scaling: float
    options: LoFTOptions
    step: int
    move: tuple[bool, bool]

    def grads_scaled_by(self, coef: float) -> PreparedStep:
        """The same step with its gradients multiplied by ``coef`` (clipping outside the step)."""
        return replace(self, sides=PreparedPair(*(side.grads_scaled_by(coef) for side in self.sides)))


def moving_factors(step: int, options: LoFTOptions, trainable: tuple[bool, bool]) -> tuple[bool, bool]:
    """Which of ``(A, B)`` move at ``step`` (1-based): a frozen factor never moves and the other
    then moves every step; with alternating updates B moves on odd steps, A on even ones."""
    if not all(trainable):
        return trainable
    if options.alternating_updates:
        return step % 2 == 0, step % 2 == 1
    return True, True


def prepare_step(
    a: Tensor,
    b: Tensor,
    grad_a: Tensor,
    grad_b: Tensor,
    state: PairState | None,
    *,
    scaling: float,
    options: LoFTOptions,
    trainable: tuple[bool, bool] = (True, True),
    moved: tuple[Sequence[bool | None], Sequence[bool | None]] | None = None,
    with_norm: bool = False,
) -> PendingStep:
    """Phase 1 for a batch, on the device: the sides' grams and their damped Cholesky
    factorisations, and the partner comparisons, without reading anything on the host.

    ``a``: ``A`` ``(b, r, n)``; ``b``: ``B`` ``(b, m, r)``; ``grad_a``, ``grad_b``: their gradients
    (zeros for a factor without one); any float dtype (the step computes in :func:`compute_dtype`).
    ``state``: the batch's state (``None`` or step 0: fresh). ``scaling``: the LoRA scaling ``s``
    (``U = s B``). ``trainable``: whether A and B train (a frozen factor never moves). ``moved``:
    per side, whether each pair's partner changed since its moments were stored, where the caller
    knows (``None`` entries, or ``moved=None``: compared on the device). ``with_norm``: a clipping
    norm will be taken (projected clipping needs the scaled gradients even without gradient
    scaling).
    """
    cd = compute_dtype(a.dtype)
    step = (0 if state is None else state.step) + 1
    damping = options.damping if options.damping is not None else 10 * torch.finfo(cd).eps
    params = (a, b)
    a, u = a.to(cd), b.to(cd) * scaling
    grad_u = grad_b.to(cd) / scaling  # dL/dU = dL/dB / s
    factors, partners, grads = (a, u.mT), (u, a.mT), (grad_a.to(cd), grad_u.mT)
    grams = tuple(p.mT @ p for p in partners)
    pending = tuple(PendingGram(g, damping) for g in grams)
    count = a.shape[0]
    known: list[list[bool | None]] = [[None] * count, [None] * count] if moved is None else [list(x) for x in moved]
    compared: list[Tensor | None] = [None, None]
    if step > 1:
        for side in (0, 1):
            rows = [i for i, f in enumerate(known[side]) if f is None]
            if rows:
                stored, current = state.sides[side].partner, partners[side]  # type: ignore[union-attr]
                if len(rows) < count:
                    index = torch.tensor(rows, device=a.device)
                    stored, current = stored[index], current[index]
                compared[side] = (stored != current).flatten(1).any(1)
    needs = options.gradient_scaling or (with_norm and options.projected_clipping)
    return PendingStep(params, factors, partners, grads, grams, pending, (known[0], known[1]),  # type: ignore[arg-type]
                       (compared[0], compared[1]), scaling, options, step,
                       moving_factors(step, options, trainable), needs)


def settle_steps(pending: Sequence[PendingStep]) -> list[PreparedStep]:
    """Phase 2 for every batch with one host sync: read each batch's factorisation failures (those
    matrices get the eigen fallback) and partner comparisons, then step 1, the scaled gradients
    ``g = (P^T P)^-1 P^T G`` (``P g`` is the projection of ``G`` onto ``P``'s columns) of the
    batches that need them."""
    flags = [t for p in pending for t in p.flags()]
    values = host_values(torch.cat(flags)) if flags else []
    out, at = [], 0
    for p in pending:
        counts = [g.count for g in p.pending]
        solvers = settle_with(list(p.pending), values[at : at + sum(counts)])
        at += sum(counts)
        moved: list[list[bool]] = []
        for side in (0, 1):
            known = list(p.moved[side])
            if p.compared[side] is not None:
                rows = [i for i, f in enumerate(known) if f is None]
                for i, changed in zip(rows, values[at : at + len(rows)]):
                    known[i] = changed
                at += len(rows)
            moved.append([bool(f) for f in known])
        sides = [Side(p.factors[s], p.partners[s], p.grams[s], solvers[s], p.grads[s], (1.0, p.scaling)[s], None)
                 for s in (0, 1)]
        if p.needs_scaled:
            sides = [replace(side, scaled=side.solver.solve(side.grad)) for side in sides]
        out.append(PreparedStep(p.params, PreparedPair(*sides), (moved[0], moved[1]), p.scaling, p.options, p.step, p.move))
    return out


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


def step_sq_norm(prep: PreparedStep) -> Tensor:
    """Step 5's squared norm of each pair of a prepared batch, ``(b,)``: :func:`pair_sq_norm` of
    the factors that move, projected or not as the batch's options say."""
    return pair_sq_norm(prep.sides, move_a=prep.move[0], move_b=prep.move[1], projected=prep.options.projected_clipping)


# ----------------------------------------------------------------------------- 2-4: applying a prepared step
class StepResult(NamedTuple):
    """The factors after a step of a batch: ``a`` ``(b, r, n)`` and ``u_t`` (``U^T``,
    ``(b, r, m)``), the old ones where nothing changed; ``rebalanced``: ``(b,)`` bool, the pairs
    whose factors were both re-factored (``None``: no rebalancing check ran)."""

    a: Tensor
    u_t: Tensor
    rebalanced: Tensor | None


def _slices(n: int, size: int) -> list[slice]:
    return [slice(start, start + size) for start in range(0, n, size)]


def step_index(prep: PreparedStep) -> PackedIndex:
    """The packed layout of the batch's second-moment grams."""
    a = prep.sides.a.factor
    return packed_index(a.shape[-2], not prep.options.second_moment_calibration, a.dtype, a.device)


def apply_step(
    prep: PreparedStep,
    state: PairState,
    *,
    clip_coef: Tensor | float | None = None,
    chunk_bytes: int = 4 * 2**20,
    fuse: bool = False,
) -> StepResult:
    """Phase 3, steps 2-4 of a prepared batch: updates ``state`` in place (its moments, the
    partners they are expressed in, and its step count) and returns the new factors (see
    :class:`StepResult`; rebalancing is :func:`rebalance_steps`, after). ``clip_coef``: the
    clipping coefficient (``None``: none; a tensor is never read on the host); ``fuse``: the
    rebuild's elementwise passes as one compiled kernel.

    Calibration and the moment updates go a slice of pairs at a time, a quarter of
    ``chunk_bytes`` of grams per slice, so that their chained passes stay in cache.
    """
    options, step, index = prep.options, prep.step, step_index(prep)
    state.match_layout(index)
    bc1, bc2 = 1 - options.beta1**step, 1 - options.beta2**step
    new: list[Tensor] = []
    for side, st, moves, flags in zip(prep.sides, state.sides, prep.move, prep.moved):
        b, k, p = st.exp_avg_sq.shape
        per_slice = max(1, chunk_bytes // (4 * k * p * st.exp_avg_sq.element_size()))
        grad = side.scaled if options.gradient_scaling else side.grad
        if clip_coef is not None:
            grad = grad * (clip_coef.to(grad.dtype) if isinstance(clip_coef, Tensor) else clip_coef)
        calibration = dict(first_moment=options.first_moment_calibration,
                           second_moment=options.second_moment_calibration, chunk_bytes=chunk_bytes)
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
        common = dict(lr=options.lr, weight_decay=options.weight_decay, eps=options.eps,
                      bias_correction1=bc1, bias_correction2=bc2)
        if options.projected_update:
            new.append(projected_update(side, st.exp_avg, st.exp_avg_sq, index, chunk_bytes=chunk_bytes, fuse=fuse,
                                        **common))
        else:
            new.append(factor_adam_update(side, st.exp_avg, st.exp_avg_sq, index, **common))
    state.step = step
    return StepResult(new[0], new[1], None)


def checks_balance(options: LoFTOptions, shape: tuple[int, int, int]) -> bool:
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


def basis_invariant(options: LoFTOptions) -> bool:
    """Whether the step depends on the product ``dW`` only, not on the factors' basis."""
    return (
        options.gradient_scaling
        and options.first_moment_calibration
        and options.second_moment_calibration
        and options.projected_update
    )


def rebalance_steps(preps: Sequence[PreparedStep], results: list[StepResult],
                    trainable: Sequence[tuple[bool, bool]] | None = None) -> list[StepResult]:
    """Phase 4, rebalancing after the step, for every batch with one host sync: the cheap test
    (:func:`loft.linalg.may_need_rebalancing` on the ``r x r`` grams, copied to the host together)
    decides which batches need the expensive check (:func:`rebalance`, one more host sync for all
    of those; their results carry ``rebalanced``). A batch is checked where :func:`checks_balance`
    allows and both its factors train (``trainable``, per batch; default: both)."""
    trainable = trainable or [(True, True)] * len(preps)
    checked = [i for i, prep in enumerate(preps)
               if checks_balance(prep.options, (prep.sides.b.factor.shape[-1], prep.sides.a.factor.shape[-1],
                                                prep.sides.a.factor.shape[-2])) and all(trainable[i])]
    if not checked:
        return results
    grams = [factor_grams(results[i].u_t.mT, results[i].a) for i in checked]
    host = to_host(torch.cat([g.reshape(-1) for g in grams]))
    out, start = list(results), 0
    with on_host():
        need = []
        for i, g in zip(checked, grams):
            part = host[start : start + g.numel()].reshape(g.shape)
            start += g.numel()
            eps = torch.finfo(results[i].a.dtype).eps
            need.append(bool(may_need_rebalancing(part, preps[i].options.rebalance_threshold, eps).any()))
    todo = [i for i, needed in zip(checked, need) if needed]
    if todo:
        thresholds = [preps[i].options.rebalance_threshold for i in todo]
        for i, result in zip(todo, rebalance([results[i] for i in todo], thresholds)):
            out[i] = result
    return out


def new_factors(prep: PreparedStep, result: StepResult) -> tuple[Tensor | None, Tensor | None]:
    """``A`` ``(b, r, n)`` and ``B = U / s`` ``(b, m, r)`` after the step, in the compute dtype;
    ``None`` for a factor that certainly did not change (it did not move and no rebalancing check
    ran). Where a check ran but re-factored nothing, the factor's old value."""
    out: list[Tensor | None] = []
    for side, moves in enumerate(prep.move):
        if not moves and result.rebalanced is None:
            out.append(None)
            continue
        value = result.a if side == 0 else result.u_t.mT / prep.scaling
        if not moves:  # the factor's own value where nothing was re-factored
            value = torch.where(result.rebalanced[:, None, None], value, prep.params[side].to(value.dtype))
        out.append(value)
    return out[0], out[1]


# ----------------------------------------------------------------------------- the whole step
class StepOutput(NamedTuple):
    """What :func:`loft_step` returns: the new ``a`` ``(b, r, n)`` and ``b`` ``(b, m, r)`` (in the
    inputs' dtype), the batch's ``state`` (updated in place) and ``rebalanced`` (``(b,)`` bool or
    ``None``: which pairs were re-factored)."""

    a: Tensor
    b: Tensor
    state: PairState
    rebalanced: Tensor | None


def loft_step(
    a: Tensor,
    b: Tensor,
    grad_a: Tensor,
    grad_b: Tensor,
    state: PairState | None = None,
    *,
    scaling: float,
    options: LoFTOptions = LoFTOptions(),
    trainable: tuple[bool, bool] = (True, True),
    clip_coef: Tensor | float | None = None,
    moved: tuple[Sequence[bool | None], Sequence[bool | None]] | None = None,
    chunk_bytes: int = 4 * 2**20,
    fuse: bool = False,
) -> StepOutput:
    """One LoFT step of a batch of ``b`` pairs of one shape: the four phases of the module
    docstring in a row (two or three host syncs), on plain tensors.

    ``a``: ``A`` ``(b, r, n)``; ``b``: ``B`` ``(b, m, r)``; ``grad_a``, ``grad_b``: their gradients
    (zeros for a factor without one); ``state``: the batch's :class:`PairState` from the previous
    call (``None``: fresh); ``scaling``: the LoRA scaling ``s``; ``options``: lr, betas, the
    switches ... (:class:`loft.options.LoFTOptions`; ``options.max_grad_norm`` clips by this
    batch's projected norm alone, unless ``clip_coef`` gives the coefficient); ``trainable``:
    whether A and B train; ``moved``: see :func:`prepare_step`.

    ``LoFTAdamW`` does exactly this for each batch of its pairs, its host reads folded across
    batches and the clipping norm taken over every pair and parameter (tested equal).
    """
    if state is None or state.step == 0:
        cd, (count, r, n), m = compute_dtype(a.dtype), a.shape, b.shape[-2]
        size = packed_index(r, not options.second_moment_calibration, cd, a.device).size
        state = PairState.zeros(count, m, n, r, size, cd, a.device)
    with_norm = clip_coef is None and options.max_grad_norm is not None
    (prep,) = settle_steps([prepare_step(a, b, grad_a, grad_b, state, scaling=scaling, options=options,
                                         trainable=trainable, moved=moved, with_norm=with_norm)])
    if with_norm:
        clip_coef = clip_coefficient(step_sq_norm(prep).sum().sqrt(), options.max_grad_norm)
    result = apply_step(prep, state, clip_coef=clip_coef, chunk_bytes=chunk_bytes, fuse=fuse)
    (result,) = rebalance_steps([prep], [result], [trainable])
    new_a, new_b = new_factors(prep, result)
    return StepOutput(a if new_a is None else new_a.to(a.dtype), b if new_b is None else new_b.to(b.dtype), state,
                      result.rebalanced)
