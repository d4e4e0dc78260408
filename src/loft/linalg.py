"""Small dense linear algebra used by the LoFT step.

Everything here is a pure function of its tensor arguments. Shapes use the "side" convention of
:mod:`loft.functional`: a factor ``F`` of shape ``(r, k)`` whose partner is ``P`` of shape
``(l, r)``, so that the adapter's change is ``P @ F`` (``(l, k)``).

Symmetric ``r x r`` second-moment grams are stored *packed*: only the ``p`` entries ``(i, j)``
selected by a :class:`PackedIndex` (the upper triangle, ``p = r (r + 1) / 2``, or just the
diagonal, ``p = r``, for the simple variant). A stack of ``k`` grams is a ``(k, p)`` matrix.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from .syncs import host_values, on_host, to_device, to_host

__all__ = [
    "DampedGram",
    "PendingGram",
    "balanced_factors",
    "PackedIndex",
    "compute_dtype",
    "factor_grams",
    "may_need_rebalancing",
    "settle_all",
    "settle_with",
    "packed_index",
    "packed_outer",
    "packed_transport",
    "projected_adam_direction",
    "rank_regime",
    "rebalanced_factors",
    "rebalanced_factors_all",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype LoFT does its math and keeps its state in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class PendingGram:
    """The first half of a :class:`DampedGram`: the Cholesky factorisation of ``gram + lam I``
    (``gram``: ``(..., r, r)`` SPSD), made without reading on the host whether it succeeded.

    :meth:`failed` gives those flags on the device; :meth:`settle` takes them read on the host
    and returns the usable :class:`DampedGram`. Splitting the two lets a caller read the flags
    of many factorisations (and other decisions) in one host sync (:func:`settle_all`).

    The damping is relative to the matrix scale, ``lam = damping * trace(gram) / r`` (per matrix
    of a batch), so results do not depend on how the factors are scaled. An all-zero ``gram``
    (LoRA's ``B = 0`` start) gets ``lam = tiny`` and a zero right-hand side solves to exactly
    zero.
    """

    def __init__(self, gram: Tensor, damping: float) -> None:
        r = gram.shape[-1]
        scale = gram.diagonal(dim1=-2, dim2=-1).sum(-1) / r
        self.lam = (scale * damping).clamp_min(torch.finfo(gram.dtype).tiny)
        self.damped = gram + self.lam[..., None, None] * torch.eye(r, dtype=gram.dtype, device=gram.device)
        self.chol, self.info = torch.linalg.cholesky_ex(self.damped)

    @property
    def count(self) -> int:
        """How many matrices (the flattened batch): the length of :meth:`failed`."""
        return self.damped.shape[:-2].numel()

    def failed(self) -> Tensor:
        """Whether each matrix's Cholesky failed, flattened ``(count,)`` bool, on the device.

        A matrix with inf / nan entries (diverged factors) does not count: it is left to
        Cholesky's nan-filled solve, since eigh would raise on it, and the step's finite check
        decides what happens next."""
        r = self.damped.shape[-1]
        return (self.info.reshape(-1) != 0) & self.damped.reshape(-1, r * r).isfinite().all(-1)

    def settle(self, failed: list[bool]) -> DampedGram:
        """The solver, given :meth:`failed` read on the host: the matrices whose Cholesky failed
        (singular to working precision) get an eigen-decomposition pseudo-solve that drops the
        directions below the damping level; the others keep their Cholesky solve. No sync but
        ``eigh``'s own (rare)."""
        bad = [i for i, f in enumerate(failed) if f]
        if not bad:
            return DampedGram(self.chol, None)
        damped, r = self.damped, self.damped.shape[-1]
        flat = damped.reshape(-1, r, r)
        index = torch.tensor(bad, device=damped.device)
        evals, evecs = torch.linalg.eigh(flat[index])
        keep = evals > 2 * self.lam.reshape(-1)[index][:, None]
        inv = flat.new_zeros(flat.shape[:-1])
        vecs = torch.eye(r, dtype=flat.dtype, device=flat.device).expand_as(flat).clone()
        inv[index] = torch.where(keep, evals.reciprocal(), torch.zeros_like(evals))
        vecs[index] = evecs
        chol = self.chol.reshape(-1, r, r).clone()
        chol[index] = torch.eye(r, dtype=flat.dtype, device=flat.device)  # finite, unused
        mask = torch.zeros(flat.shape[0], dtype=torch.bool, device=flat.device)
        mask[index] = True
        shape = damped.shape[:-2]
        return DampedGram(chol.reshape(damped.shape), (mask.reshape(shape), inv.reshape(*shape, r), vecs.reshape(damped.shape)))


class DampedGram:
    """Solves with ``gram + lam I`` (see :class:`PendingGram`, which makes it): Cholesky, or for
    the matrices where it failed, the eigen pseudo-solve. A matrix that is not finite solves to
    non-finite values (no exception). No explicit inverse is formed.

    ``DampedGram.of(gram, damping)`` factorises and settles at once (one host sync).
    """

    def __init__(self, chol: Tensor, eig: tuple[Tensor, Tensor, Tensor] | None) -> None:
        self.chol = chol
        #: ``(failed, inv, evecs)``: which matrices fell back to the eigen pseudo-solve and, for
        #: those, the kept inverse eigenvalues ``(..., r)`` and eigenvectors ``(..., r, r)``
        #: (zeros / identity elsewhere); ``None`` when none did
        self.eig = eig

    @classmethod
    def of(cls, gram: Tensor, damping: float) -> DampedGram:
        """Factorise ``gram + lam I`` and settle it (one host sync)."""
        return settle_all([PendingGram(gram, damping)])[0]

    def solve(self, rhs: Tensor) -> Tensor:
        """``(gram + lam I)^-1 rhs`` for ``rhs`` of shape ``(..., r, k)``."""
        out = torch.cholesky_solve(rhs, self.chol)
        if self.eig is None:
            return out
        failed, inv, evecs = self.eig
        pseudo = evecs @ (inv[..., :, None] * (evecs.transpose(-1, -2) @ rhs))
        return torch.where(failed[..., None, None], pseudo, out)

    def select(self, index: slice | Tensor) -> DampedGram:
        """The factorisations of the matrices ``index`` of a batch (a slice or gather on the first dim)."""
        return DampedGram(self.chol[index], None if self.eig is None else tuple(t[index] for t in self.eig))  # type: ignore[arg-type]


def settle_all(pending: list[PendingGram]) -> list[DampedGram]:
    """Settle ``pending`` with one copy of their failure flags to the host (one sync whatever
    the number of batches). :func:`settle_with` does the same with flags the caller read."""
    return settle_with(pending, host_values(torch.cat([p.failed() for p in pending])) if pending else [])


def settle_with(pending: list[PendingGram], flags: list[bool]) -> list[DampedGram]:
    """:meth:`PendingGram.settle` each of ``pending`` with its slice of ``flags`` (their
    :meth:`~PendingGram.failed` flags, concatenated, read on the host)."""
    out, start = [], 0
    for p in pending:
        out.append(p.settle(flags[start : start + p.count]))
        start += p.count
    return out


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
    # built on the host and copied once: nothing here reads device values
    pairs = [(i, i) for i in range(r)] if diagonal_only else [(i, j) for i in range(r) for j in range(i, r)]
    rows = torch.tensor([i for i, _ in pairs], device=device)
    cols = torch.tensor([j for _, j in pairs], device=device)
    weight = torch.tensor([1.0 if i == j else 2.0 for i, j in pairs], dtype=dtype, device=device)
    diag = torch.tensor([q for q, (i, j) in enumerate(pairs) if i == j], device=device)
    return PackedIndex(r, rows, cols, weight, diag)


def packed_outer(g: Tensor, index: PackedIndex) -> Tensor:
    """Packed outer products of the columns of ``g``: ``(..., r, k) -> (..., k, p)``.

    Row ``j`` of the result is ``g[:, j] g[:, j]^T`` in packed form.
    """
    return (g.index_select(-2, index.rows) * g.index_select(-2, index.cols)).transpose(-1, -2)


def packed_transport(packed: Tensor, c: Tensor, index: PackedIndex, chunk_bytes: int = 4 * 2**20) -> Tensor:
    """Congruence ``S <- C S C^T`` applied to every packed gram: ``(..., k, p), (..., r, r) -> (..., k, p)``.

    The congruence is linear in the packed entries, ``S_new = S T^T`` with a ``(p, p)`` matrix
    ``T[q', q] = C[a, i] C[b, j] + [i != j] C[a, j] C[b, i]`` for ``q' = (a, b)``, ``q = (i, j)``:
    one GEMM (a batched one for a batch of pairs, each with its own ``C``). ``T`` has
    ``p^2 ~ r^4 / 4`` entries and costs ``k p^2`` multiply-adds, so above rank 32 the grams are
    unpacked to ``(..., rows, r, r)`` blocks of at most ``chunk_bytes`` in all and multiplied
    instead (``2 k r^3``).
    """
    rows, cols = index.rows, index.cols
    if index.r <= 32:
        c_i, c_j = c[..., :, rows], c[..., :, cols]  # (..., r, p): columns i and j of each packed input entry
        t = c_i[..., rows, :] * c_j[..., cols, :] + (rows != cols).to(c.dtype) * c_j[..., rows, :] * c_i[..., cols, :]
        return packed @ t.transpose(-1, -2)
    out = torch.empty_like(packed)
    batch = packed[..., 0, 0].numel()
    step = max(1, chunk_bytes // (3 * index.r**2 * batch * packed.element_size()))
    c_b = c.unsqueeze(-3)  # (..., 1, r, r): one C for every row of a block
    for start in range(0, packed.shape[-2], step):
        block = packed[..., start : start + step, :]
        full = block.new_zeros(*block.shape[:-1], index.r, index.r)
        full[..., rows, cols] = block
        full[..., cols, rows] = block
        out[..., start : start + step, :] = (c_b @ full @ c_b.transpose(-1, -2))[..., rows, cols]
    return out


def _adam_quotient(v: Tensor, m: Tensor, eps: float) -> Tensor:
    """``M / (sqrt(max(V, 0)) + eps)``: the elementwise passes of the rebuild, in place in ``m``
    (``V`` and ``M`` in units already divided by the bias corrections)."""
    return m.div_(v.clamp_min_(0).sqrt_().add_(eps))


def _adam_quotient_expr(v: Tensor, m: Tensor, eps: float) -> Tensor:
    return m / (v.clamp_min(0).sqrt() + eps)


_compiled_quotient: Any = None
_compile_failed = False


def adam_quotient(v: Tensor, m: Tensor, eps: float, *, fuse: bool = False) -> Tensor:
    """:func:`_adam_quotient`, as one fused kernel (``torch.compile``) when ``fuse``: one pass
    over the block instead of four. Falls back to the eager passes, with one warning, when
    compilation is not available (no compiler, no Triton, an unsupported platform)."""
    global _compiled_quotient, _compile_failed
    if not fuse or _compile_failed:
        return _adam_quotient(v, m, eps)
    try:
        if _compiled_quotient is None:
            _compiled_quotient = torch.compile(_adam_quotient_expr, dynamic=True)
        return _compiled_quotient(v, m, eps)
    except Exception as error:  # noqa: BLE001 - any compiler failure: keep training, eagerly
        _compile_failed = True
        warnings.warn(
            f"LoFT's fused elementwise kernel is not available ({type(error).__name__}: {error}); "
            "using the eager passes (same results; pass fuse_elementwise=False to skip the attempt).",
            RuntimeWarning,
            stacklevel=2,
        )
        return _adam_quotient(v, m, eps)


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
    fuse: bool = False,
) -> Tensor:
    """``P^T D`` where ``D`` is the full-space AdamW direction rebuilt from factor moments.

    ``partner`` ``P``: ``(l, r)``; ``exp_avg`` ``m``: ``(r, k)``; ``exp_avg_sq``: ``(k, p)``
    packed grams ``S_j``; or a batch of pairs of these, ``(b, l, r)``, ``(b, r, k)``,
    ``(b, k, p)``. The full first moment is ``M = P m`` (``(l, k)``), the full second moment
    ``V[i, j] = P_i^T S_j P_i`` and ``D = (M / bc1) / (sqrt(V / bc2) + eps)``; the result is
    ``P^T D`` (``(r, k)``, or ``(b, r, k)``). ``V`` is a GEMM of packed partner products
    ``(rows, p)`` with the packed grams, computed a block at a time so that the temporaries of a
    block (two ``(pairs, rows, k)`` buffers) stay within about ``chunk_bytes`` in all and no
    ``(l, r, k)`` tensor ever exists. A block is as many whole pairs as fit in the budget, or
    ``rows`` of one pair when a whole pair does not fit (then exactly the unbatched blocks).
    ``fuse``: the elementwise passes as one compiled kernel (:func:`adam_quotient`).

    The two block buffers are allocated once per call and every block's GEMMs write into them
    (``out=``): a fresh multi-MiB tensor per block costs the kernel's page faults each time
    (measured in docs/performance.md, "Fresh block buffers").
    """
    k = exp_avg.shape[-1]
    out = torch.zeros_like(exp_avg)
    row_bytes = 2 * k * partner.element_size()
    rows_per_chunk = max(1, chunk_bytes // row_bytes)
    options = {"bias_correction1": bias_correction1, "bias_correction2": bias_correction2, "eps": eps, "fuse": fuse}
    l = partner.shape[-2]
    if exp_avg.dim() == 2:
        buffers = _block_buffers(exp_avg, (min(rows_per_chunk, l), k))
        _add_direction(out, partner, exp_avg, exp_avg_sq, index, rows_per_chunk=rows_per_chunk, buffers=buffers, **options)
        return out
    b = partner.shape[0]
    pairs_per_block = max(1, min(b, chunk_bytes // (row_bytes * l)))
    one_pair = pairs_per_block == 1  # then plain GEMMs on one pair's matrices at a time, in blocks of rows
    buffers = _block_buffers(exp_avg, (min(rows_per_chunk, l), k) if one_pair else (pairs_per_block, l, k))
    for first in range(0, b, pairs_per_block):
        pick = first if one_pair else slice(first, first + pairs_per_block)
        _add_direction(
            out[pick],
            partner[pick],
            exp_avg[pick],
            exp_avg_sq[pick],
            index,
            rows_per_chunk=rows_per_chunk if one_pair else l,
            buffers=buffers,
            **options,
        )
    return out


def _block_buffers(like: Tensor, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """The ``V`` and ``M`` buffers of one block, ``shape``, reused by every block of a rebuild."""
    return like.new_empty(shape), like.new_empty(shape)


def _add_direction(
    out: Tensor,
    partner: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    index: PackedIndex,
    *,
    bias_correction1: float,
    bias_correction2: float,
    eps: float,
    rows_per_chunk: int,
    fuse: bool,
    buffers: tuple[Tensor, Tensor],
) -> None:
    """``out += P^T D`` for one pair (2-D operands) or a block of pairs (3-D), ``rows_per_chunk``
    rows of ``P`` at a time: the body of :func:`projected_adam_direction`. ``buffers``: two
    tensors of at least ``([pairs,] rows_per_chunk, k)`` that the ``V`` and ``M`` GEMMs write into."""
    # bias corrections folded into the small operands: V / bc2 and M / bc1 come out of the GEMMs
    sq_t = (exp_avg_sq * (index.weight / bias_correction2)).transpose(-1, -2)  # ([pairs,] p, k)
    avg = exp_avg / bias_correction1  # ([pairs,] r, k)
    gemm = torch.mm if out.dim() == 2 else torch.bmm
    for start in range(0, partner.shape[-2], rows_per_chunk):
        p_rows = partner[..., start : start + rows_per_chunk, :]  # ([pairs,] rows, r)
        products = p_rows[..., index.rows] * p_rows[..., index.cols]  # ([pairs,] rows, p)
        # a leading, contiguous part of each buffer: ``rows`` rows (2-D) or the block's pairs (3-D, all ``l`` rows)
        v, m = (buffer[: p_rows.shape[0]] for buffer in buffers)
        # D = (M / bc1) / (sqrt(V / bc2) + eps)
        direction = adam_quotient(gemm(products, sq_t, out=v), gemm(p_rows, avg, out=m), eps, fuse=fuse)
        if out.dim() == 2:
            out.addmm_(p_rows.T, direction)
        else:
            out.baddbmm_(p_rows.transpose(-1, -2), direction)


def rank_regime(m: int, n: int, r: int) -> str:
    """Where rank ``r`` sits for an ``m x n`` layer: ``"low"`` (``r <= min(m, n)``, excluding a
    square layer's full rank), ``"full"`` (``r >= max(m, n)``) or ``"between"``
    (``min(m, n) < r < max(m, n)``).

    * ``"low"``: at a generic point both factors have rank ``r``; the step depends on ``dW``
      only (basis invariance) and is AdamW's step projected onto the adapter's subspace. At
      ``r = min(m, n)`` of a non-square layer the narrower factor spans fewer than
      ``max(m, n)`` dimensions, so every other step is projected: not exactly AdamW.
    * ``"full"``: ``U`` spans all ``m`` rows and ``A`` all ``n`` columns, so both projections
      are the identity and every step is exactly AdamW's on ``dW``. Above ``min(m, n)`` one
      gram (above ``max(m, n)`` both) is singular; the damped solve returns the minimum-norm
      step, whose part in the gram's null space the product never sees.
    * ``"between"``: the wider factor's gram is singular while the other factor does not span
      its side. The minimum-norm solve then depends on the basis, and rounding noise in the
      null space (amplified by ``1 / damping``) moves the narrower factor's span: the
      trajectory is neither basis-invariant nor reproducible across roundings, and ``dW`` has
      rank at most ``min(m, n)`` anyway. ``r <= min(m, n)`` has the same expressiveness;
      ``r >= max(m, n)`` is exact.
    """
    if r >= max(m, n):
        return "full"
    return "low" if r <= min(m, n) else "between"


def rebalanced_factors(u: Tensor, a: Tensor, threshold: float) -> tuple[Tensor, Tensor, Tensor] | None:
    """Balanced re-factorisations of ``dW = u @ a`` and which of them pay: the batched core of
    :func:`balanced_factors`.

    ``u``: ``(..., m, r)``, ``a``: ``(..., r, n)``, any rank ``r`` (also above ``min(m, n)``).
    Returns ``(u', a', better)`` (``None`` at ranks between ``min(m, n)`` and ``max(m, n)``,
    below) with ``better`` (``(...,)`` bool, never read on the host here) true where the worse gram's condition number (of its nonzero part) exceeds
    ``threshold`` times the balanced one and ``dW`` has full rank ``min(m, n, r)``; ``u'``,
    ``a'`` are meaningful only there.

    With ``q = min(m, n, r)`` the rank of ``dW``, the first ``q`` columns of ``u'`` and rows of
    ``a'`` are the balanced factors of ``dW``. When ``r > min(m, n)`` one factor has directions
    that ``dW`` does not use (``u`` spans ``min(m, r) > q`` dimensions, or ``a``'s rows span
    ``min(n, r) > q``): ``u'`` keeps them, orthonormal and scaled to the geometric mean of the
    balanced gram's range, beside zero rows of ``a'`` (or the mirror image), so ``u'`` and
    ``a'`` span exactly the spaces ``u`` and ``a`` span and ``(u', a')`` is a change of basis of
    ``(u, a)``. Any slots left over (``r > max(m, n)``) are zero in both. At ranks strictly
    between ``min(m, n)`` and ``max(m, n)`` the step depends on the basis (see
    :func:`rank_regime`), so nothing is rebalanced there (``None``).
    """
    if rank_regime(u.shape[-2], a.shape[-1], u.shape[-1]) == "between":  # the step is not basis-invariant: a new basis would change it
        return None
    q_u, q_a, small = _balance_qr(u, a)
    return _balanced_from(q_u, q_a, u.shape[-1], _small_svds(*small), threshold)


def rebalanced_factors_all(
    pairs: list[tuple[Tensor, Tensor]], thresholds: list[float]
) -> list[tuple[Tensor, Tensor, Tensor] | None]:
    """:func:`rebalanced_factors` of several batches (``[(u, a), ...]``, each ``(..., m, r)``,
    ``(..., r, n)``, any shapes) with one host sync in all: the QRs stay on the device, the small
    cores of every batch go to the host in one copy, their SVDs run there (in the same dtype; no
    per-call error check stalls a GPU stream) and the results come back without a wait."""
    out: list[tuple[Tensor, Tensor, Tensor] | None] = [None] * len(pairs)
    todo = [i for i, (u, a) in enumerate(pairs) if rank_regime(u.shape[-2], a.shape[-1], u.shape[-1]) != "between"]
    if not todo:
        return out
    qrs = {i: _balance_qr(*pairs[i]) for i in todo}
    flat = [t for i in todo for t in qrs[i][2]]
    host = to_host(torch.cat([t.reshape(-1) for t in flat]))
    with on_host():
        pieces = iter(host.split([t.numel() for t in flat]))
        svds = {i: _small_svds(*(next(pieces).view(t.shape) for t in qrs[i][2])) for i in todo}
    for i in todo:
        u, a = pairs[i]
        device_svds = tuple(to_device(t, u.device) for t in svds[i])
        out[i] = _balanced_from(qrs[i][0], qrs[i][1], u.shape[-1], device_svds, thresholds[i])
    return out


def _balance_qr(u: Tensor, a: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor]]:
    """``(Q_u, Q_a, (core, R_u, R_a))`` of ``u = Q_u R_u``, ``a^T = Q_a R_a``, ``core = R_u R_a^T``:
    ``(..., m, m')``, ``(..., n, n')``, ``(..., m', n')``, ``(..., m', r)``, ``(..., n', r)`` with
    ``m' = min(m, r)``, ``n' = min(n, r)``."""
    q_u, r_u = torch.linalg.qr(u)
    q_a, r_a = torch.linalg.qr(a.transpose(-1, -2))
    return q_u, q_a, (r_u @ r_a.transpose(-1, -2), r_u, r_a)


def _small_svds(core: Tensor, r_u: Tensor, r_a: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(X, sigma, Y^T)`` of ``core``'s SVD and the singular values of ``R_u`` and ``R_a``."""
    if core.shape[-2:] == r_u.shape[-2:] == r_a.shape[-2:]:  # r <= min(m, n): one SVD call (one host check on a GPU)
        x, sv, yh = torch.linalg.svd(torch.stack([core, r_u, r_a]))
        return x[0], sv[0], yh[0], sv[1], sv[2]
    x, sigma, yh = torch.linalg.svd(core)  # (..., m', m'), (..., q), (..., n', n')
    return x, sigma, yh, torch.linalg.svdvals(r_u), torch.linalg.svdvals(r_a)


def _balanced_from(
    q_u: Tensor, q_a: Tensor, r: int, svds: tuple[Tensor, Tensor, Tensor, Tensor, Tensor], threshold: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The balanced factors and the ``better`` mask from the QRs and the small SVDs."""
    x, sigma, yh, s_u, s_a = svds
    n = q_a.shape[-2]
    tol = torch.finfo(sigma.dtype).eps * 100
    full_rank = sigma[..., -1] > sigma[..., 0] * tol
    m_used, n_used, q = x.shape[-1], yh.shape[-2], sigma.shape[-1]
    # a factor with directions dW does not use must span them (else u' would span more than u)
    if m_used > q:
        full_rank &= s_u[..., -1] > s_u[..., 0] * tol
    if n_used > q:
        full_rank &= s_a[..., -1] > s_a[..., 0] * tol
    worst_gram_cond = torch.maximum(s_u[..., 0] / s_u[..., -1], s_a[..., 0] / s_a[..., -1]).square_()
    better = full_rank & (worst_gram_cond > threshold * (sigma[..., 0] / sigma[..., -1]))
    root = sigma.sqrt()
    if m_used > q or n_used > q:  # r > min(m, n): scale of the directions dW does not use
        spare = (root[..., :1] * root[..., -1:]).sqrt()  # (..., 1): gram entry sqrt(s_max s_min)
        root_u = torch.cat([root, spare.expand(*root.shape[:-1], m_used - q)], -1)
        root_a = torch.cat([root, spare.expand(*root.shape[:-1], n_used - q)], -1)
    else:
        root_u = root_a = root
    u_new = q_u @ (x * root_u[..., None, :])  # (..., m, m')
    a_new = (root_a[..., :, None] * yh) @ q_a.transpose(-1, -2)  # (..., n', n)
    if m_used < r:  # the slots u does not span: zero columns of u'
        u_new = torch.cat([u_new, u_new.new_zeros(*u_new.shape[:-1], r - m_used)], -1)
    if n_used < r:  # likewise zero rows of a'
        a_new = torch.cat([a_new, a_new.new_zeros(*a_new.shape[:-2], r - n_used, n)], -2)
    return u_new, a_new, better


def factor_grams(u: Tensor, a: Tensor) -> Tensor:
    """``U^T U`` and ``A A^T`` in float64, ``(..., 2, r, r)``, for :func:`may_need_rebalancing`
    (``u``: ``(..., m, r)``, ``a``: ``(..., r, n)``; ``(m + n) r^2`` multiply-adds)."""
    u64, a64 = u.double(), a.double()
    return torch.stack([u64.mT @ u64, a64 @ a64.mT], -3)


#: the cheap test rules rebalancing out only below ``threshold / margin``, with the margin
#: ``1 + REBALANCE_NOISE * eps * cond(U) cond(A)``: a bound, with room to spare, on the relative
#: rounding of the expensive check's own ratio in the compute dtype (QR, then SVDs of the ``r x r``
#: cores: relative ``~ eps cond(U) cond(A)``) ...
REBALANCE_NOISE = 1e3
#: ... and only where ``cond(U) cond(A) <= REBALANCE_TRUST / eps``, so that margin stays <= 2
REBALANCE_TRUST = 1e-3


def may_need_rebalancing(grams: Tensor, threshold: float, eps: float) -> Tensor:
    """The cheap test before :func:`rebalanced_factors`: ``False`` where that check certainly
    finds nothing to rebalance, ``(...,)`` bool; ``grams``: :func:`factor_grams` ``(..., 2, r, r)``
    (float64, best on the host: ``r x r`` work only); ``eps``: of the factors' compute dtype.

    The expensive check compares ``max(cond(G_U), cond(G_A))`` with ``threshold cond(dW)``,
    ``G_U = U^T U``, ``G_A = A A^T``, and gets ``cond(dW)`` from an SVD of the QR cores. The
    nonzero singular values of ``dW = U A`` are the square roots of the eigenvalues of
    ``G_U G_A``, which has those of the symmetric ``W^T G_A W`` with ``G_U = W W^T``
    (``W = V diag(lambda)^(1/2)`` from ``G_U``'s eigen-decomposition): so the same ratio
    ``rho = max(cond(G_U), cond(G_A)) / cond(dW)`` follows from three ``r x r`` symmetric
    eigenvalue problems. A pair is ruled out when ``rho <= threshold / margin`` (``margin = 1 +
    REBALANCE_NOISE eps cond(U) cond(A)``, the expensive check's rounding with room to spare), both
    grams are positive definite and ``cond(U) cond(A) <= REBALANCE_TRUST / eps``; anything else
    (a singular gram: ``r > min(m, n)``, ``B = 0``; ill-conditioned factors whose float32 check is
    itself noisy) is left to the expensive check. See docs/algorithm.md, "Rebalancing".
    """
    lam, vecs = torch.linalg.eigh(grams)  # (..., 2, r), ascending
    lo, hi = lam[..., 0], lam[..., -1]  # (..., 2)
    definite = (lo > 0).all(-1)
    cond = hi / lo.clamp_min(torch.finfo(lam.dtype).tiny)  # (..., 2): cond(G_U), cond(G_A)
    w = vecs[..., 0, :, :] * lam[..., 0, None, :].clamp_min(0).sqrt()  # G_U = W W^T
    mu = torch.linalg.eigvalsh(w.mT @ grams[..., 1, :, :] @ w)  # eigenvalues of G_U G_A: sigma(dW)^2
    cond_dw = (mu[..., -1] / mu[..., 0].clamp_min(torch.finfo(mu.dtype).tiny)).sqrt()
    rho = cond.amax(-1) / cond_dw
    cond_ua = cond.prod(-1).sqrt()  # cond(U) cond(A)
    trusted = definite & (mu[..., 0] > 0) & (cond_ua <= REBALANCE_TRUST / eps)
    return ~(trusted & (rho <= threshold / (1 + REBALANCE_NOISE * eps * cond_ua)))


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
    information the product does not). :func:`rebalanced_factors` does a batch of pairs.
    """
    balanced = rebalanced_factors(u, a, threshold)
    return None if balanced is None or not bool(balanced[2].all()) else balanced[:2]
