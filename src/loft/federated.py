"""Federated LoFT: aggregating LoRA factors across clients, and loading the result into a client.

Pure torch (PEFT models are recognised by structure, as :mod:`loft.pairs` does); no Flower here.
API under construction: the signatures are final, the bodies come next.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import Tensor, nn

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
    "message_bytes",
    "set_factors",
    "trained_factor",
]

Factors = dict[str, tuple[Tensor, Tensor]]
"""adapter name (PEFT module name, e.g. 'base_model.model.encoder.layer.0.attention.self.query')
-> (A (r, n), B (m, r)) detached float tensors, PEFT's convention: the layer's update is
scaling * B @ A, scaling the same on every client (same LoraConfig)."""


def get_factors(model: nn.Module) -> Factors:
    """Clones of every LoRA pair's (A, B) of a PEFT model (the 'default' adapter)."""
    raise NotImplementedError


def set_factors(model: nn.Module, factors: Factors, optimizer: LoFTAdamW | None = None, *, keep_state: bool = True) -> None:
    """Write global factors into the model in place (same Parameter objects, so an existing
    optimizer keeps pointing at them). keep_state=True: the LoFTAdamW state is kept, and its
    next step calibrates the moments into the new basis (C m, as LoFT does when a partner factor
    moves; must be detected even though the write happened outside the optimizer).
    keep_state=False: the optimizer's state is reset, equal to a fresh optimizer (tested).
    Raises ValueError naming the first missing / extra / mis-shaped key."""
    raise NotImplementedError


def fedavg(updates: Sequence[Factors], weights: Sequence[float]) -> Factors:
    """The common baseline: the weighted means of A and of B separately (weights normalised)."""
    raise NotImplementedError


@dataclass
class Aggregate:
    """The result of :func:`aggregate_products`."""

    factors: Factors  # the new global factors, rank r each, balanced (B^T B = A A^T)
    residual: Factors = field(default_factory=dict)  # the part beyond rank r: (A_res (k, n), B_res (m, k)); empty if none
    error: dict[str, float] = field(default_factory=dict)  # per layer: ||mean - truncation||_F / ||mean||_F


def aggregate_products(
    updates: Sequence[Factors], weights: Sequence[float], rank: int | None = None, carry: Factors | None = None
) -> Aggregate:
    """The weighted mean of the clients' products B_k A_k (plus `carry`, last round's residual,
    if given), re-factored to rank `rank` (default: the clients' rank): QR of the stacked
    sqrt(w_k)-scaled B's (m x K r) and of the stacked A^T's (n x K r), SVD of the small core,
    never an m x n matrix; exact when the mean has rank <= r, else the best rank-r approximation.
    The caller decides what to do with `residual`: drop it, pass it as `carry` next round, or
    fold it into the frozen weight (fold_residual)."""
    raise NotImplementedError


def fold_residual(model: nn.Module, residual: Factors) -> None:
    """W_base += scaling * B_res @ A_res for every layer (FedEx-LoRA's fold), in place."""
    raise NotImplementedError


def alternating_aggregate(updates: Sequence[Factors], weights: Sequence[float], trained: str) -> Factors:
    """Rounds where every client trained only one factor ('A' or 'B'; the other is the shared
    global one): the weighted mean of the trained factor, so the aggregate product is exact."""
    raise NotImplementedError


def trained_factor(round: int) -> str:
    """'A' on even rounds, 'B' on odd ones (the alternating schedule)."""
    raise NotImplementedError


def freeze_factor(model: nn.Module, which: str | None) -> None:
    """requires_grad False on every LoRA 'A' (or 'B') of the model, None unfreezes both; LoFT must
    then step only the other factor."""
    raise NotImplementedError


def message_bytes(factors: Factors) -> int:
    """Bytes of one message carrying these factors (numel * element size, summed)."""
    raise NotImplementedError


def dirichlet_split(labels: Sequence[int], clients: int, alpha: float | None, seed: int = 0) -> list[list[int]]:
    """Indices per client: label skew from Dirichlet(alpha) per class; alpha None = an even iid
    split. Deterministic for a seed; every index in exactly one client; no client empty (raise
    ValueError with a clear message when that cannot be met)."""
    raise NotImplementedError
