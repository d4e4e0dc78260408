"""Clipping by the projected full-gradient norm, inside the step and with loft.clip_grad_norm_."""

from __future__ import annotations

import pytest
import torch
from conftest import Regression, delta_w, factors, lora_linear, orthogonal_factors_, rel_err
from torch import nn

import loft

peft = pytest.importorskip("peft")


def test_full_rank_norm_is_the_dense_gradient_norm():
    model, layer = lora_linear(5, 5, 5, random_b=True)
    orthogonal_factors_(layer)
    problem = Regression(5, 5)
    opt = loft.LoFTAdamW(model)
    A, B, s = factors(layer)
    w = (layer.base_layer.weight + s * B @ A).detach().requires_grad_(True)
    problem.loss(problem.x @ w.T + layer.base_layer.bias.detach()).backward()
    dense = torch.nn.utils.clip_grad_norm_([w], float("inf"))
    problem.model_loss(model).backward()
    assert abs(float(opt.grad_norm()) - float(dense)) < 1e-6 * float(dense)


@pytest.mark.parametrize("alternating", [True, False])
def test_clip_grad_norm_outside_the_step_equals_clipping_inside(alternating):
    results, norms = [], []
    for outside in (False, True):
        torch.manual_seed(0)
        model = peft.get_peft_model(
            nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 3)).double(),
            peft.LoraConfig(r=2, target_modules=["0"], modules_to_save=["2"], init_lora_weights=False),
        )
        opt = loft.LoFTAdamW(model, lr=1e-2, max_grad_norm=None if outside else 0.05, alternating_updates=alternating)
        x = torch.randn(16, 6, dtype=torch.float64)
        y = torch.randint(0, 3, (16,))
        seen = []
        for _ in range(8):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            if outside:
                seen.append(float(loft.clip_grad_norm_(opt, 0.05)))
            opt.step()
            if not outside:
                seen.append(float(opt.last_grad_norm))
        results.append([p.detach().clone() for p in model.parameters() if p.requires_grad])
        norms.append(seen)
    assert all(n > 0.05 for n in norms[0])  # clipping was active
    assert norms[0] == pytest.approx(norms[1], rel=1e-6)
    for a, b in zip(*results):
        assert rel_err(b, a) < 1e-8


def test_tangent_norm_when_both_factors_move():
    """Alternation off: the norm is that of P_U G + G P_A - P_U G P_A, checked densely."""
    model, layer = lora_linear(7, 6, 2, random_b=True, seed=2)
    problem = Regression(6, 7)
    opt = loft.LoFTAdamW(model, alternating_updates=False)
    A, B, s = factors(layer)
    w = (layer.base_layer.weight + s * B @ A).detach().requires_grad_(True)
    problem.loss(problem.x @ w.T + layer.base_layer.bias.detach()).backward()
    G, U, a = w.grad, (s * B).detach(), A.detach()
    p_u = U @ torch.linalg.solve(U.T @ U, U.T)
    p_a = a.T @ torch.linalg.solve(a @ a.T, a)
    tangent = p_u @ G + G @ p_a - p_u @ G @ p_a
    problem.model_loss(model).backward()
    assert abs(float(opt.grad_norm()) - float(tangent.norm())) < 1e-6 * float(tangent.norm())
    assert float(tangent.norm()) < float(G.norm())  # a real projection at rank 2 < 6


def test_clipping_changes_the_trajectory_only_when_the_norm_is_large():
    runs = []
    for max_norm in (None, 1e6, 1e-3):
        model, layer = lora_linear(8, 6, 2, random_b=False, seed=1)
        problem = Regression(6, 8)
        opt = loft.LoFTAdamW(model, lr=1e-2, max_grad_norm=max_norm)
        for _ in range(6):
            opt.zero_grad()
            problem.model_loss(model).backward()
            opt.step()
        runs.append(delta_w(layer))
    assert torch.equal(runs[0], runs[1])
    assert rel_err(runs[2], runs[0]) > 1e-3
