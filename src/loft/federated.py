"""Federated LoFT: aggregating LoRA factors across clients, and loading the result into a client.

A round of federated LoRA: the server sends global factors, every client loads them
(:func:`set_factors`), trains a few local steps and sends its factors back (:func:`get_factors`),
and the server aggregates them. The aggregators:

* :func:`fedavg`: the weighted means of ``A`` and of ``B`` separately, the common baseline.
  Its product ``mean(B) mean(A)`` is not the mean of the clients' updates ``mean(B A)``.
* :func:`aggregate_products`: the weighted mean of the products ``B_k A_k``, re-factored to
  rank ``r`` without forming an ``m x n`` matrix; exact when that mean has rank ``<= r``, else
  its best rank-``r`` approximation, with the remainder returned (drop it, carry it into the
  next round, or fold it into the frozen weight: :func:`fold_residual`).
* :func:`alternating_aggregate`: rounds in which every client trains one factor only
  (:func:`trained_factor`, :func:`freeze_factor`), so the mean of the trained factor is the
  exact mean of the products.

LoFT's step depends only on the product ``dW = s B A``, and its calibration carries a client's
moments into whatever basis the factors it finds define; so a client that keeps its
:class:`~loft.LoFTAdamW` (``set_factors(..., keep_state=True)``) continues with its moments
transported into the server's factors, as if its own optimizer had moved them.

Pure torch: PEFT LoRA layers are recognised by structure (:mod:`loft.pairs`), nothing here
imports PEFT, Flower or :mod:`loft.app`. Factors are matrices: ``A`` ``(r, n)``, ``B``
``(m, r)`` (a convolution's ``lora_A`` kernel flattened to ``(r, in * prod(kernel))``).
"""

from __future__ import annotations

import math
import numbers
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .pairs import adapter_factors

if TYPE_CHECKING:
    from .optim import LoFTAdamW

__all__ = [
    "Aggregate",
    "Factors",
    "aggregate_products",
    "alternating_aggregate",
    "dirichlet_split",
    "fedavg",
    "fold_residual",
    "freeze_factor",
    "get_factors",
    "label_skew",
    "message_bytes",
    "reset_state",
    "set_factors",
    "trained_factor",
]

Factors = dict[str, tuple[Tensor, Tensor]]
"""adapter name (PEFT module name, e.g. 'base_model.model.encoder.layer.0.attention.self.query')
-> (A (r, n), B (m, r)) detached float tensors, PEFT's convention: the layer's update is
scaling * B @ A, scaling the same on every client (same LoraConfig)."""


# --------------------------------------------------------------------------------- the client side
def _layers(model: nn.Module, adapter: str) -> Iterator[tuple[str, nn.Module, Tensor, Tensor]]:
    """``(module name, module, A, B)`` of every LoRA layer of ``model`` holding ``adapter``."""
    for name, module in model.named_modules():
        for found, a, b in adapter_factors(module):
            if found == adapter:
                yield name, module, a, b


def _layer_dict(model: nn.Module, adapter: str) -> dict[str, tuple[nn.Module, Tensor, Tensor]]:
    layers = {name: (module, a, b) for name, module, a, b in _layers(model, adapter)}
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no LoRA layers with an adapter named {adapter!r}: wrap it first "
            "(peft.get_peft_model(model, peft.LoraConfig(...))) or pass the adapter's name."
        )
    return layers


def _matrix(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1)


def get_factors(model: nn.Module, *, adapter: str = "default") -> Factors:
    """Clones of every LoRA pair's (A, B) of a PEFT model (the 'default' adapter).

    ``A`` ``(r, n)`` and ``B`` ``(m, r)`` as matrices, detached, in the parameters' dtype, keyed
    by module name in module order; frozen factors included.
    """
    return {
        name: (_matrix(a.detach()).clone(), _matrix(b.detach()).clone())
        for name, (_, a, b) in _layer_dict(model, adapter).items()
    }


def _check_against(layers: dict[str, tuple[Tensor, Tensor]], factors: Factors, what: str) -> None:
    """ValueError naming the first key of ``factors`` missing from / extra to ``layers``, or the
    first factor whose shape differs (``layers``: name -> (A, B) as matrices or tensors)."""
    if not isinstance(factors, dict):
        raise TypeError(f"{what} must be a dict name -> (A, B), got {type(factors).__name__}.")
    _refuse_names(what, "has no factors for LoRA layer {}", [name for name in layers if name not in factors],
                  "send factors for every layer.")
    _refuse_names(what, "has factors for {}, which is not a LoRA layer of the model",
                  [name for name in factors if name not in layers], "")
    for name, (a, b) in layers.items():
        pair = factors[name]
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(t, Tensor) for t in pair)):
            raise TypeError(f"{what}[{name!r}] must be a pair of tensors (A, B).")
        got = tuple(tuple(t.shape) for t in pair)
        want = (tuple(_matrix(a).shape), tuple(_matrix(b).shape))
        if got != want:
            raise ValueError(
                f"{what}[{name!r}] has A {got[0]} and B {got[1]}, but the layer needs A {want[0]} and B {want[1]} "
                "(another LoRA rank or layer size)."
            )
        if not all(bool(torch.isfinite(t).all()) for t in pair):
            raise ValueError(f"{what}[{name!r}] holds inf or NaN; refusing to load it.")


def _refuse_names(what: str, problem: str, names: list[str], advice: str) -> None:
    """ValueError for the first of ``names`` (if any): ``problem`` (``{}``: the name) plus how many
    more, and that the factors were made for another model or LoRA configuration."""
    if names:
        more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
        raise ValueError(
            f"{what} {problem.format(repr(names[0]))}{more}: it was made for another model or LoRA configuration "
            f"(target modules){'; ' + advice if advice else '.'}"
        )


def set_factors(
    model: nn.Module,
    factors: Factors,
    optimizer: LoFTAdamW | torch.optim.Optimizer | None = None,
    *,
    keep_state: bool = True,
    adapter: str = "default",
) -> None:
    """Write global factors into the model in place (same Parameter objects, so an existing
    optimizer keeps pointing at them). keep_state=True: the LoFTAdamW state is kept, and its
    next step calibrates the moments into the new basis (C m, as LoFT does when a partner factor
    moves; must be detected even though the write happened outside the optimizer).
    keep_state=False: the optimizer's state is reset, equal to a fresh optimizer (tested).
    Raises ValueError naming the first missing / extra / mis-shaped key.

    The write is an in-place ``copy_`` under ``no_grad``, which moves the parameters' version
    counters: that is how :class:`~loft.LoFTAdamW` learns that a factor changed outside its
    own steps, and compares the pair's factors with the bases its moments are stored in (a
    write through ``param.data`` would not be seen). Everything is checked before anything is
    written. ``optimizer`` may be any torch optimizer for ``keep_state=False`` (its state is
    emptied, its param groups kept); with ``keep_state=True`` and a plain AdamW the moments are
    simply kept (AdamW has no notion of a basis).
    """
    layers = _layer_dict(model, adapter)
    _check_against({name: (a, b) for name, (_, a, b) in layers.items()}, factors, "factors")
    with torch.no_grad():
        for name, (_, a, b) in layers.items():
            new_a, new_b = factors[name]
            a.copy_(new_a.reshape(a.shape))
            b.copy_(new_b.reshape(b.shape))
    if optimizer is not None and not keep_state:
        reset_state(optimizer)


def reset_state(optimizer: torch.optim.Optimizer) -> None:
    """Empty ``optimizer``'s state, keeping its param groups (learning rates and options as they
    are now): the next step is the first step of a fresh optimizer. Through the public
    ``load_state_dict``, so :class:`~loft.LoFTAdamW` drops its batch states and records too."""
    groups = optimizer.state_dict()["param_groups"]
    optimizer.load_state_dict({"state": {}, "param_groups": groups})


def freeze_factor(model: nn.Module, which: str | None, *, adapter: str = "default") -> None:
    """requires_grad False on every LoRA 'A' (or 'B') of the model, None unfreezes both; LoFT must
    then step only the other factor.

    :class:`~loft.LoFTAdamW` reads ``requires_grad`` at every step: a pair with one frozen
    factor moves only the other one, at every step (no alternation), with no rebalancing (which
    would change the frozen factor); the frozen side's moments see zero gradients. Call
    ``optimizer.zero_grad()`` (set to None) after freezing, so that no old gradient is left on
    the frozen factor.
    """
    if which not in ("A", "B", None):
        raise ValueError(f"freeze_factor: which must be 'A', 'B' or None (unfreeze both), got {which!r}.")
    for _, (_, a, b) in _layer_dict(model, adapter).items():
        a.requires_grad_(which != "A")
        b.requires_grad_(which != "B")


def fold_residual(model: nn.Module, residual: Factors, *, adapter: str = "default") -> None:
    """W_base += scaling * B_res @ A_res for every layer (FedEx-LoRA's fold), in place.

    ``residual`` (:attr:`Aggregate.residual`) may name any subset of the model's LoRA layers
    (those without one are left alone); each ``(A_res (k, n), B_res (m, k))``, any ``k``.
    Linear and GPT-2 ``Conv1D`` (``fan_in_fan_out``) bases and LoRA embeddings; refused, before
    anything is written, for convolutions, DoRA and quantised bases. Forms each layer's
    ``m x n`` update once (the size of the weight it is added to).
    """
    layers = _layer_dict(model, adapter)
    if not isinstance(residual, dict):
        raise TypeError(f"residual must be a dict name -> (A_res, B_res), got {type(residual).__name__}.")
    plans = []
    for name, pair in residual.items():
        if name not in layers:
            raise ValueError(f"residual has factors for {name!r}, which is not a LoRA layer of the model.")
        module, a, b = layers[name]
        a_res, b_res = pair
        m, n = _matrix(b).shape[0], _matrix(a).shape[1]
        if a_res.dim() != 2 or b_res.dim() != 2 or a_res.shape[1] != n or b_res.shape[0] != m or a_res.shape[0] != b_res.shape[1]:
            raise ValueError(
                f"residual[{name!r}] has A {tuple(a_res.shape)} and B {tuple(b_res.shape)}; the layer needs "
                f"A (k, {n}) and B ({m}, k)."
            )
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else getattr(module, "base_layer", None)
        weight = getattr(base, "weight", None)
        kind = type(module).__name__
        if getattr(module, "use_dora", {}).get(adapter, False):
            raise ValueError(f"fold_residual: {name!r} is a DoRA layer; its update is not additive, so it cannot be folded.")
        if not isinstance(weight, Tensor) or not weight.is_floating_point() or isinstance(base, nn.modules.conv._ConvNd):
            raise ValueError(
                f"fold_residual: cannot fold into {name!r} ({kind}, base {type(base).__name__}): only float Linear, "
                "Conv1D and Embedding bases are supported (not convolutions or quantised weights)."
            )
        embedding = hasattr(module, "lora_embedding_A") and adapter in getattr(module, "lora_embedding_A")
        transpose = embedding or bool(getattr(module, "fan_in_fan_out", False))
        expected = (n, m) if transpose else (m, n)
        if tuple(weight.shape) != expected:
            raise ValueError(f"fold_residual: {name!r}'s base weight is {tuple(weight.shape)}, expected {expected}.")
        scaling = float(module.scaling[adapter])
        plans.append((weight, a_res, b_res, scaling, transpose))
    with torch.no_grad():
        for weight, a_res, b_res, scaling, transpose in plans:
            a_w, b_w = a_res.to(weight.device, weight.dtype), b_res.to(weight.device, weight.dtype)
            if transpose:
                weight.addmm_(a_w.T, b_w.T, alpha=scaling)
            else:
                weight.addmm_(b_w, a_w, alpha=scaling)


# --------------------------------------------------------------------------------- checks shared by the aggregators
def _check_updates(updates: Sequence[Factors], weights: Sequence[float]) -> list[float]:
    """The weights normalised to sum 1, after checking that every client sent factors for the
    same layers with the same shapes and that the weights are positive numbers, one per client."""
    updates = list(updates)
    weights = list(weights)
    if not updates:
        raise ValueError("No client updates to aggregate.")
    if len(weights) != len(updates):
        raise ValueError(f"{len(updates)} client updates but {len(weights)} weights: give one weight per client.")
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w) or w <= 0:
            raise ValueError(
                f"Client {i}'s weight is {w!r}; weights must be positive finite numbers (e.g. the clients' "
                "numbers of examples)."
            )
    first = updates[0]
    _check_factors(first, "client 0's update")
    layers = {name: (a, b) for name, (a, b) in first.items()}
    for k, update in enumerate(updates[1:], start=1):
        _check_against(layers, update, f"client {k}'s update")
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def _check_factors(factors: Factors, what: str) -> None:
    if not isinstance(factors, dict) or not factors:
        raise ValueError(f"{what} must be a non-empty dict name -> (A (r, n), B (m, r)).")
    for name, pair in factors.items():
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(t, Tensor) for t in pair)):
            raise TypeError(f"{what}[{name!r}] must be a pair of tensors (A, B).")
        a, b = pair
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"{what}[{name!r}] has A {tuple(a.shape)} and B {tuple(b.shape)}: expected A (r, n) and B (m, r)."
            )
        if not (a.is_floating_point() and b.is_floating_point()):
            raise TypeError(f"{what}[{name!r}]: factors must be floating-point tensors.")
        if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
            raise ValueError(f"{what}[{name!r}] holds inf or NaN.")


# --------------------------------------------------------------------------------- the aggregators
def fedavg(updates: Sequence[Factors], weights: Sequence[float]) -> Factors:
    """The common baseline: the weighted means of A and of B separately (weights normalised).

    Its product ``mean(B) mean(A)`` differs from the clients' mean update ``mean(B A)``, unless
    every client has the same ``A`` or the same ``B``. Accumulated in float64, returned in the
    clients' dtype.
    """
    w = _check_updates(updates, weights)
    out: Factors = {}
    for name, (a0, b0) in updates[0].items():
        a = sum(wk * u[name][0].double() for wk, u in zip(w, updates))
        b = sum(wk * u[name][1].double() for wk, u in zip(w, updates))
        out[name] = (a.to(a0.dtype), b.to(b0.dtype))
    return out


@dataclass
class Aggregate:
    """The result of :func:`aggregate_products`."""

    #: the new global factors, rank r each, balanced (B^T B = A A^T) in the directions the mean uses
    factors: Factors
    #: the part beyond rank r as low-rank factors (A_res (k, n), B_res (m, k)); layers without any left out
    residual: Factors = field(default_factory=dict)
    #: per layer: ||mean - truncation||_F / ||mean||_F (0 when exact)
    error: dict[str, float] = field(default_factory=dict)


def aggregate_products(
    updates: Sequence[Factors], weights: Sequence[float], rank: int | None = None, carry: Factors | None = None
) -> Aggregate:
    """The weighted mean of the clients' products B_k A_k (plus `carry`, last round's residual,
    if given), re-factored to rank `rank` (default: the clients' rank): QR of the stacked
    sqrt(w_k)-scaled B's (m x K r) and of the stacked A^T's (n x K r), SVD of the small core,
    never an m x n matrix; exact when the mean has rank <= r, else the best rank-r approximation.
    The caller decides what to do with `residual`: drop it, pass it as `carry` next round, or
    fold it into the frozen weight (fold_residual).

    With ``[sqrt(w_1) B_1, ...] = Q_B R_B`` and ``[sqrt(w_1) A_1; ...]^T = Q_A R_A``, the mean is
    ``Q_B (R_B R_A^T) Q_A^T``; with ``R_B R_A^T = X S Y^T`` the new factors are
    ``B = Q_B X_r S_r^(1/2)``, ``A = S_r^(1/2) Y_r^T Q_A^T`` (Eckart-Young: the best rank-r
    approximation in the Frobenius and spectral norms) and the residual the same with the
    singular values beyond ``r``. Cost ``O((m + n) (K r)^2 + (K r)^3)`` per layer, float64.

    Singular values below ``K r * eps * s_max`` count as zero (the numerical rank). Where
    the mean has rank ``q < r``, the ``r - q`` spare slots get zero columns of ``B`` and rows of
    ``A`` orthonormal to the others (right singular vectors of the core, in the span of the
    clients' ``A``), scaled like the used ones (``(s_max s_q)^(1/4)``): the product stays exact
    and ``A`` keeps full row rank, so LoFT (whose scaled gradients need both grams) can grow
    those directions again, as from LoRA's own ``B = 0`` start.
    """
    w = _check_updates(updates, weights)
    first = updates[0]
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1):
        raise ValueError(f"rank must be a positive integer (or None: the clients' rank), got {rank!r}.")
    rank = None if rank is None else int(rank)
    if carry:
        _check_factors(carry, "carry")
        for name, (ca, cb) in carry.items():
            if name not in first:
                raise ValueError(f"carry has factors for {name!r}, which the clients did not send.")
            a0, b0 = first[name]
            if ca.shape[1] != a0.shape[1] or cb.shape[0] != b0.shape[0]:
                raise ValueError(
                    f"carry[{name!r}] has A {tuple(ca.shape)} and B {tuple(cb.shape)}; the layer's factors are "
                    f"A {tuple(a0.shape)} and B {tuple(b0.shape)} (the residual must be (k, n) and (m, k))."
                )
    result = Aggregate(factors={}, residual={}, error={})
    for name, (a0, b0) in first.items():
        r = a0.shape[0] if rank is None else rank
        bs = [math.sqrt(wk) * u[name][1].double() for wk, u in zip(w, updates)]
        as_ = [math.sqrt(wk) * u[name][0].double() for wk, u in zip(w, updates)]
        if carry and name in carry:
            as_.append(carry[name][0].to(a0.device, torch.float64))
            bs.append(carry[name][1].to(a0.device, torch.float64))
        spare_scale = math.sqrt(sum(float(a.square().sum()) for a in as_[: len(updates)]) / a0.shape[0])
        new, res, error = _refactor(torch.cat(bs, 1), torch.cat(as_, 0), r, spare_scale)
        result.factors[name] = (new[0].to(a0.dtype), new[1].to(b0.dtype))
        if res is not None:
            result.residual[name] = (res[0].to(a0.dtype), res[1].to(b0.dtype))
        result.error[name] = error
    return result


def _refactor(
    b: Tensor, a: Tensor, r: int, spare_scale: float
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor] | None, float]:
    """Rank-``r`` balanced factors of ``b @ a`` (``(m, K)``, ``(K, n)``, float64) without forming
    it: ``((A (r, n), B (m, r)), residual (A (k, n), B (m, k)) or None, relative error)``."""
    q_b, r_b = torch.linalg.qr(b)  # (m, p), (p, K)
    q_a, r_a = torch.linalg.qr(a.mT)  # (n, q), (q, K)
    x, s, yh = torch.linalg.svd(r_b @ r_a.mT, full_matrices=True)  # (p, p), (min(p, q),), (q, q)
    tol = max(r_b.shape[0], r_a.shape[0], 1) * torch.finfo(s.dtype).eps * (float(s[0]) if s.numel() else 0.0)
    used = int((s > tol).sum())  # the numerical rank of the mean
    kept = min(r, used)
    root = s[:kept].sqrt()
    m, n = b.shape[0], a.shape[1]
    new_b = b.new_zeros(m, r)
    new_a = a.new_zeros(r, n)
    new_b[:, :kept] = q_b @ (x[:, :kept] * root)
    new_a[:kept] = (root[:, None] * yh[:kept]) @ q_a.mT
    spare = min(r, yh.shape[0]) - kept  # A rows for the directions the mean does not use
    if spare > 0:
        scale = math.sqrt(math.sqrt(float(s[0]) * float(s[kept - 1]))) if kept else spare_scale
        new_a[kept : kept + spare] = scale * (yh[kept : kept + spare] @ q_a.mT)
    residual = None
    if used > r:
        rest = s[r:used].sqrt()
        residual = ((rest[:, None] * yh[r:used]) @ q_a.mT, q_b @ (x[:, r:used] * rest))
    total = float(s[:used].square().sum())
    error = math.sqrt(float(s[r:used].square().sum()) / total) if total > 0 and used > r else 0.0
    return (new_a, new_b), residual, error


def alternating_aggregate(updates: Sequence[Factors], weights: Sequence[float], trained: str) -> Factors:
    """Rounds where every client trained only one factor ('A' or 'B'; the other is the shared
    global one): the weighted mean of the trained factor, so the aggregate product is exact.

    ``mean_k(B A_k) = B mean_k(A_k)`` (and likewise for ``B``). The untrained factor must be
    the same on every client (bitwise): a ValueError names the first layer where it is not.
    """
    if trained not in ("A", "B"):
        raise ValueError(f"trained must be 'A' or 'B', got {trained!r}.")
    w = _check_updates(updates, weights)
    side = 0 if trained == "A" else 1
    other = "B" if trained == "A" else "A"
    out: Factors = {}
    for name, pair in updates[0].items():
        for k, update in enumerate(updates[1:], start=1):
            if not torch.equal(update[name][1 - side], pair[1 - side]):
                raise ValueError(
                    f"Client {k}'s {other} of {name!r} differs from client 0's: alternating aggregation needs the "
                    f"global {other} unchanged on every client (freeze it: freeze_factor(model, {other!r})), or use "
                    "aggregate_products."
                )
        mean = sum(wk * u[name][side].double() for wk, u in zip(w, updates)).to(pair[side].dtype)
        out[name] = (mean, pair[1].clone()) if side == 0 else (pair[0].clone(), mean)
    return out


def trained_factor(round: int) -> str:
    """'A' on even rounds, 'B' on odd ones (the alternating schedule).

    Rounds count from 1, as Flower's ``server_round`` does, so the first round trains ``B``
    (which LoRA initialises to zero: ``A`` gets no gradient while ``B = 0``), as LoFT's own
    alternating steps do.
    """
    if isinstance(round, bool) or not isinstance(round, numbers.Integral) or round < 1:
        raise ValueError(f"round must be an integer >= 1 (rounds count from 1, as Flower's), got {round!r}.")
    return "A" if round % 2 == 0 else "B"


def message_bytes(factors: Factors) -> int:
    """Bytes of one message carrying these factors (numel * element size, summed)."""
    return sum(t.numel() * t.element_size() for pair in factors.values() for t in pair)


# --------------------------------------------------------------------------------- data
def dirichlet_split(labels: Sequence[int], clients: int, alpha: float | None, seed: int = 0) -> list[list[int]]:
    """Indices per client: label skew from Dirichlet(alpha) per class; alpha None = an even iid
    split. Deterministic for a seed; every index in exactly one client; no client empty (raise
    ValueError with a clear message when that cannot be met).

    With ``alpha``, each class's examples are shuffled and dealt to the clients in proportions
    drawn from ``Dirichlet(alpha, ..., alpha)`` (smaller ``alpha``: each class on fewer
    clients); a client left empty then gets one example from the largest client. Without, the
    shuffled indices are dealt into ``clients`` parts whose sizes differ by at most one. Python's
    ``random.Random(seed)`` draws everything (the same split on every platform and torch
    version). Each client's indices are sorted.
    """
    labels = list(labels)
    if isinstance(clients, bool) or not isinstance(clients, numbers.Integral) or clients < 1:
        raise ValueError(f"clients must be a positive integer, got {clients!r}.")
    clients = int(clients)
    if len(labels) < clients:
        raise ValueError(
            f"Cannot split {len(labels)} examples over {clients} clients without an empty client: use fewer "
            "clients or more examples."
        )
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or alpha <= 0):
        raise ValueError(f"alpha must be a positive number (or None for an even split), got {alpha!r}.")
    rng = random.Random(seed)
    if alpha is None:
        order = list(range(len(labels)))
        rng.shuffle(order)
        return [sorted(order[k::clients]) for k in range(clients)]
    parts: list[list[int]] = [[] for _ in range(clients)]
    for label in sorted(set(labels), key=repr):
        members = [i for i, y in enumerate(labels) if y == label]
        rng.shuffle(members)
        gammas = [rng.gammavariate(float(alpha), 1.0) for _ in range(clients)]
        total = sum(gammas)
        if total == 0.0:  # every draw underflowed (tiny alpha): all to one client
            gammas = [1.0 if k == rng.randrange(clients) else 0.0 for k in range(clients)]
            total = 1.0
        start, cumulative = 0, 0.0
        for k, g in enumerate(gammas):
            cumulative += g / total
            end = len(members) if k == clients - 1 else min(len(members), round(cumulative * len(members)))
            parts[k] += members[start:end]
            start = end
    for k in range(clients):
        if not parts[k]:
            donor = max(range(clients), key=lambda j: len(parts[j]))
            parts[k].append(parts[donor].pop())
    return [sorted(p) for p in parts]


def label_skew(labels: Sequence[int], split: Sequence[Sequence[int]]) -> float:
    """How far the clients' label distributions are from the whole data's: the mean over
    clients of the total-variation distance (0: every client has the global mix; near 1: each
    client holds classes no other has)."""
    labels = list(labels)
    classes = sorted(set(labels), key=repr)
    overall = {c: labels.count(c) / len(labels) for c in classes}
    distances = []
    for part in split:
        if not part:
            raise ValueError("label_skew: a client has no examples.")
        counts = {c: 0 for c in classes}
        for i in part:
            counts[labels[i]] += 1
        distances.append(0.5 * sum(abs(counts[c] / len(part) - overall[c]) for c in classes))
    return sum(distances) / len(distances)
