"""Every rank PEFT accepts, on both sides of ``min(m, n)`` and ``max(m, n)`` (issue #17).

``r >= max(m, n)``: exactly AdamW on ``dW`` for any layer shape, with rebalancing on.
``r <= min(m, n)`` (non-square): the projected step, not AdamW. Strictly between: trains, but
the step depends on the factors' basis and on rounding; LoFT warns and never rebalances there.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import Regression, delta_w, factors, lora_linear, rel_err
from test_optim_exactness import dense_adamw_trajectory

import loft
from loft.linalg import rank_regime, rebalanced_factors

SHAPES = [(6, 4), (4, 6), (12, 8), (8, 12), (8, 2), (5, 5)]


def ranks_around(m: int, n: int) -> list[int]:
    """Ranks on both sides of min(m, n) and max(m, n)."""
    lo, hi = min(m, n), max(m, n)
    return sorted({max(1, lo - 1), lo, lo + 1, hi - 1, hi, hi + 2} - {0})


GRID = [(m, n, r) for m, n in SHAPES for r in ranks_around(m, n)]


def test_rank_regime():
    assert rank_regime(6, 4, 3) == rank_regime(6, 4, 4) == "low"
    assert rank_regime(6, 4, 5) == rank_regime(4, 6, 5) == "between"
    assert rank_regime(6, 4, 6) == rank_regime(4, 6, 9) == rank_regime(5, 5, 5) == rank_regime(5, 5, 7) == "full"


def _span_projector(x: torch.Tensor) -> torch.Tensor:
    """Orthogonal projector onto the column space of ``x``."""
    return x @ torch.linalg.pinv(x)


@pytest.mark.parametrize("m,n,r", GRID)
def test_rebalanced_factors_keep_the_product_and_both_spans(m, n, r):
    g = torch.Generator().manual_seed(m * 100 + n * 10 + r)
    u = torch.randn(m, r, generator=g, dtype=torch.float64) * torch.logspace(0, 2, r, dtype=torch.float64)
    a = torch.randn(r, n, generator=g, dtype=torch.float64) / torch.logspace(0, 2, r, dtype=torch.float64)[:, None]
    out = rebalanced_factors(u, a, threshold=0.0)  # threshold 0: rebalance whenever it is allowed
    if rank_regime(m, n, r) == "between":
        assert out is None  # the step is not basis-invariant there: never re-factored
        return
    assert out is not None
    u2, a2, better = out
    assert bool(better) and u2.shape == (m, r) and a2.shape == (r, n)
    assert rel_err(u2 @ a2, u @ a) < 1e-12
    # the same column space of U and row space of A: a change of basis, so the step is unchanged
    assert rel_err(_span_projector(u2), _span_projector(u)) < 1e-10
    assert rel_err(_span_projector(a2.T), _span_projector(a.T)) < 1e-10
    # balanced: the nonzero parts of both grams are as well conditioned as dW allows
    q = min(m, n, r)
    sigma = torch.linalg.svdvals(u @ a)[:q]
    for gram in (u2.T @ u2, a2 @ a2.T):
        ev = torch.linalg.eigvalsh(gram).flip(0)
        ev = ev[ev > ev[0] * 1e-12]
        assert float(ev[0] / ev[-1]) <= float(sigma[0] / sigma[-1]) * (1 + 1e-9)


def _run(m, n, r, *, dtype, rebalance, steps=30, lr=2e-2):
    model, layer = lora_linear(m, n, r, random_b=True, seed=3, dtype=dtype)
    problem = Regression(n, m, dtype=dtype)
    opt = loft.LoFTAdamW(model, lr=lr, rebalance=rebalance)
    path, losses = [], []
    for _ in range(steps):
        opt.zero_grad()
        loss = problem.model_loss(model)
        loss.backward()
        opt.step()
        losses.append(float(loss))
        path.append(delta_w(layer).double())
    return path, losses, factors(layer)[0].detach().double().clone()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("m,n", SHAPES)
def test_every_rank_trains_with_rebalancing_on(m, n, dtype):
    """No crash at any rank, finite factors, a falling loss; where the step depends on dW only,
    rebalancing leaves dW's float64 path unchanged while it re-factors A and B."""
    rebalanced_somewhere = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the "between" warning is tested below
        for r in ranks_around(m, n):
            path, losses, a_on = _run(m, n, r, dtype=dtype, rebalance=True)
            assert all(bool(torch.isfinite(w).all()) for w in path), (m, n, r)
            assert losses[-1] < losses[0], (m, n, r)
            if dtype == torch.float64 and rank_regime(m, n, r) != "between":
                plain, _, a_off = _run(m, n, r, dtype=dtype, rebalance=False)
                assert max(rel_err(b, p) for p, b in zip(plain, path)) < 1e-8, (m, n, r)
                rebalanced_somewhere |= rel_err(a_on, a_off) > 1e-6
    if dtype == torch.float64 and (m, n) != (8, 2):  # 8 x 2 never drifts far enough here
        assert rebalanced_somewhere  # the re-factoring really ran on this shape


@pytest.mark.parametrize(
    "m,n,extra,weight_decay,max_norm",
    [(6, 4, 0, 0.0, None), (4, 6, 0, 0.1, None), (12, 8, 0, 0.0, 0.05), (8, 12, 0, 0.1, 0.05), (6, 4, 2, 0.1, 0.05)],
)
def test_non_square_layer_at_rank_max_m_n_is_exactly_adamw(m, n, extra, weight_decay, max_norm):
    """U spans all m rows and A all n columns: both projections are the identity."""
    r = max(m, n) + extra
    model, layer = lora_linear(m, n, r, random_b=True, seed=2)
    problem = Regression(n, m)
    steps = 40
    expected = dense_adamw_trajectory(layer, problem, steps, lr=5e-3, weight_decay=weight_decay, max_norm=max_norm)
    opt = loft.LoFTAdamW(model, lr=5e-3, weight_decay=weight_decay, max_grad_norm=max_norm)  # rebalance on
    for t in range(steps):
        opt.zero_grad()
        problem.model_loss(model).backward()
        opt.step()
        assert rel_err(delta_w(layer), expected[t]) < 1e-8, f"step {t + 1}"
    assert rel_err(expected[-1], expected[0]) > 0.1  # the trajectory really moved


@pytest.mark.parametrize("m,n", [(6, 4), (4, 6), (12, 8)])
def test_ranks_below_max_m_n_are_not_adamw(m, n):
    """At min(m, n) <= r < max(m, n) the narrower factor does not span its side: every other
    step is projected, and dW leaves AdamW's path (0.18-0.24 relative after 40
    steps in docs/results/rank_regimes.md)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for r in range(min(m, n), max(m, n)):
            model, layer = lora_linear(m, n, r, random_b=True, seed=2)
            problem = Regression(n, m)
            expected = dense_adamw_trajectory(layer, problem, 40, lr=5e-3, weight_decay=0.0, max_norm=None)
            opt = loft.LoFTAdamW(model, lr=5e-3)
            errors = []
            for t in range(40):
                opt.zero_grad()
                problem.model_loss(model).backward()
                opt.step()
                errors.append(rel_err(delta_w(layer), expected[t]))
            assert max(errors) > 1e-2, (m, n, r)
            if r == n < m:  # A square and invertible: P_A = I, so step 1 (B moves) is still AdamW's
                assert errors[0] < 1e-10


def test_rank_between_warns_once_naming_the_layer():
    model, _ = lora_linear(12, 8, 10)
    with pytest.warns(UserWarning, match=r"rank 10 .*\(12 x 8\).* between min\(m, n\) = 8 and max\(m, n\) = 12"):
        loft.LoFTAdamW(model, lr=1e-3)
    for r in (8, 12):
        model, _ = lora_linear(12, 8, r)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loft.LoFTAdamW(model, lr=1e-3)
