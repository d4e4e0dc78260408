"""Small dense linear algebra used by the LoFT step.

Everything here is a pure function of its tensor arguments. Shapes use the "side" convention of
:mod:`loft.functional`: a factor ``F`` of shape ``(r, k)`` whose partner is ``P`` of shape
``(l, r)``, so that the adapter's change is ``P @ F`` (``(l, k)``).

Symmetric ``r x r`` second-moment grams are stored *packed*: only the ``p`` entries ``(i, j)``
selected by a :class:`PackedIndex` (the upper triangle, ``p = r (r + 1) / 2``, or just the
diagonal, ``p = r``, for the simple variant). A stack of ``k`` grams is a ``(k, p)`` matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

__all__ = [
    "DampedGram",
    "balanced_factors",
    "PackedIndex",
    "compute_dtype",
    "packed_index",
    "packed_outer",
    "packed_transport",
    "projected_adam_direction",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype LoFT does its math and keeps its state in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class DampedGram:
    """A factorisation of ``gram + lam I`` for repeated solves; ``gram``: ``(..., r, r)`` SPSD.

    The damping is relative to the matrix scale, ``lam = damping * trace(gram) / r``, so results do
    not depend on how the factors are scaled. An all-zero ``gram`` (LoRA's ``B = 0`` start) gets
    ``lam = tiny`` and a zero right-hand side solves to exactly zero. Cholesky is used; if it
    still fails (singular to working precision) an eigen-decomposition pseudo-solve that drops
    the directions below the damping level is used instead. No explicit inverse is formed.
    """

    def __init__(self, gram: Tensor, damping: float) -> None:
        r = gram.shape[-1]
        scale = gram.diagonal(dim1=-2, dim2=-1).sum(-1) / r
        lam = (scale * damping).clamp_min(torch.finfo(gram.dtype).tiny)
        damped = gram + lam[..., None, None] * torch.eye(r, dtype=gram.dtype, device=gram.device)
        self._chol, info = torch.linalg.cholesky_ex(damped)
        self._eig: tuple[Tensor, Tensor] | None = None
        if bool((info != 0).any()):
            evals, evecs = torch.linalg.eigh(damped)
            inv = torch.where(evals > 2 * lam[..., None], evals.reciprocal(), torch.zeros_like(evals))
            self._eig = (inv, evecs)

    def solve(self, rhs: Tensor) -> Tensor:
        """``(gram + lam I)^-1 rhs`` for ``rhs`` of shape ``(..., r, k)``."""
        if self._eig is None:
            return torch.cholesky_solve(rhs, self._chol)
        inv, evecs = self._eig
        return evecs @ (inv[..., :, None] * (evecs.transpose(-1, -2) @ rhs))


@dataclass(frozen=True)
class PackedIndex:
    """Which entries ``(rows[q], cols[q])`` of a symmetric ``r x r`` matrix are stored.

    ``weight[q]`` is 2 off the diagonal (the entry stands for itself and its mirror) and 1 on it,
    so ``x^T S x == sum_q weight[q] * S_packed[q] * x[rows[q]] * x[cols[q]]``.
    ``diag[i]`` is the packed position of entry ``(i, i)``.
    """

    r: int
    rows: Tensor
    cols: Tensor
    weight: Tensor
    diag: Tensor

    @property
    def size(self) -> int:
        return int(self.rows.numel())

    @property
    def diagonal_only(self) -> bool:
        return self.size == self.r


@lru_cache(maxsize=256)
def packed_index(r: int, diagonal_only: bool, dtype: torch.dtype, device: torch.device) -> PackedIndex:
    """The packed layout for rank ``r``: upper triangle (full grams) or diagonal only."""
    if diagonal_only:
        rows = cols = torch.arange(r, device=device)
    else:
        rows, cols = torch.triu_indices(r, r, device=device)
    weight = torch.where(rows == cols, 1.0, 2.0).to(dtype)
    diag = torch.nonzero(rows == cols).flatten()
    return PackedIndex(r, rows, cols, weight, diag)


def packed_outer(g: Tensor, index: PackedIndex) -> Tensor:
    """Packed outer products of the columns of ``g``: ``(r, k) -> (k, p)``.

    Row ``j`` of the result is ``g[:, j] g[:, j]^T`` in packed form.
    """
    return (g[index.rows] * g[index.cols]).T


def packed_transport(packed: Tensor, c: Tensor, index: PackedIndex, chunk_bytes: int = 4 * 2**20) -> Tensor:
    """Congruence ``S <- C S C^T`` applied to every packed gram: ``(k, p), (r, r) -> (k, p)``.

    The congruence is linear in the packed entries, ``S_new = S T^T`` with a ``(p, p)`` matrix
    ``T[q', q] = C[a, i] C[b, j] + [i != j] C[a, j] C[b, i]`` for ``q' = (a, b)``, ``q = (i, j)``:
    one GEMM. ``T`` has ``p^2 ~ r^4 / 4`` entries and costs ``k p^2`` multiply-adds, so above rank
    32 the grams are unpacked to ``(rows, r, r)`` blocks of at most ``chunk_bytes`` and
    multiplied instead (``2 k r^3``).
    """
    rows, cols = index.rows, index.cols
    if index.r <= 32:
        c_i, c_j = c[:, rows], c[:, cols]  # (r, p): columns i and j of each packed input entry
        t = c_i[rows] * c_j[cols] + (rows != cols).to(c.dtype) * c_j[rows] * c_i[cols]
        return packed @ t.T
    out = torch.empty_like(packed)
    step = max(1, chunk_bytes // (3 * index.r**2 * packed.element_size()))
    for start in range(0, packed.shape[0], step):
        block = packed[start : start + step]
        full = block.new_zeros(block.shape[0], index.r, index.r)
        full[:, rows, cols] = block
        full[:, cols, rows] = block
        out[start : start + step] = (c @ full @ c.T)[:, rows, cols]
    return out


def projected_adam_direction(
    partner: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    index: PackedIndex,
    *,
    bias_correction1: float,
    bias_correction2: float,
    eps: float,
    chunk_bytes: int,
) -> Tensor:
    """``P^T D`` where ``D`` is the full-space AdamW direction rebuilt from factor moments.

    ``partner`` ``P``: ``(l, r)``; ``exp_avg`` ``m``: ``(r, k)``; ``exp_avg_sq``: ``(k, p)``
    packed grams ``S_j``. The full first moment is ``M = P m`` (``(l, k)``), the full second
    moment ``V[i, j] = P_i^T S_j P_i`` and ``D = (M / bc1) / (sqrt(V / bc2) + eps)``; the result
    is ``P^T D`` (``(r, k)``). ``V`` is a GEMM of packed partner products ``(l, p)`` with the
    packed grams, computed ``rows`` of ``P`` at a time so that no temporary larger than about
    ``chunk_bytes`` (two ``(rows, k)`` buffers) and no ``(l, r, k)`` tensor ever exists.
    """
    l, k = partner.shape[0], exp_avg.shape[1]
    out = torch.zeros_like(exp_avg)
    rows_per_chunk = max(1, chunk_bytes // (2 * k * partner.element_size()))
    # bias corrections folded into the small operands: V / bc2 and M / bc1 come out of the GEMMs
    sq_t = (exp_avg_sq * (index.weight / bias_correction2)).T  # (p, k)
    avg = exp_avg / bias_correction1  # (r, k)
    for start in range(0, l, rows_per_chunk):
        p_rows = partner[start : start + rows_per_chunk]
        products = p_rows[:, index.rows] * p_rows[:, index.cols]  # (rows, p)
        denom = (products @ sq_t).clamp_min_(0).sqrt_().add_(eps)  # sqrt(V / bc2) + eps
        out.addmm_(p_rows.T, (p_rows @ avg).div_(denom))
    return out


def balanced_factors(u: Tensor, a: Tensor, threshold: float) -> tuple[Tensor, Tensor] | None:
    """Re-factor ``dW = u @ a`` (``(m, r)``, ``(r, n)``) into balanced factors, if it pays.

    Alternating updates let the two factors drift apart in conditioning even while ``dW`` stays
    well-conditioned; the solves with ``u^T u`` and ``a a^T`` then lose ``eps * cond`` of
    accuracy for nothing (in float32 this can make a run diverge). With ``u = Q_u R_u``,
    ``a^T = Q_a R_a`` and ``R_u R_a^T = X S Y^T``, the factors ``u' = Q_u X S^(1/2)`` and
    ``a' = S^(1/2) Y^T Q_a^T`` have the same product, the same column / row spaces, and equal
    grams ``u'^T u' = a' a'^T = S``, the best conditioning any factorisation of ``dW`` can have.

    Returns ``(u', a')`` when the worse gram's condition number exceeds ``threshold`` times the
    balanced one, else ``None`` (also when ``dW`` is rank-deficient: the bases then carry
    information the product does not).
    """
    q_u, r_u = torch.linalg.qr(u)
    q_a, r_a = torch.linalg.qr(a.T)
    x, sigma, yh = torch.linalg.svd(r_u @ r_a.T)
    if not bool(sigma[-1] > sigma[0] * torch.finfo(sigma.dtype).eps * 100):
        return None
    s_u, s_a = torch.linalg.svdvals(r_u), torch.linalg.svdvals(r_a)
    worst_gram_cond = max(float(s_u[0] / s_u[-1]), float(s_a[0] / s_a[-1])) ** 2
    if worst_gram_cond <= threshold * float(sigma[0] / sigma[-1]):
        return None
    root = sigma.sqrt()
    return q_u @ (x * root), (root[:, None] * yh) @ q_a.T
