"""LoFTAdamW against exact references, in float64."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, Regression, delta_w, factors, lora_linear, orthogonal_factors_, rel_err
from reference import ReferenceLoFT
from torch import nn

import loft

STEPS = 60


def dense_adamw_trajectory(layer, problem: Regression, steps: int, *, lr, weight_decay, max_norm, betas=(0.9, 0.999)):
    """torch.optim.AdamW on ``dW`` (``W = W0 + dW``, decay applied to ``dW``), clipping with
    ``torch.nn.utils.clip_grad_norm_``: what full fine-tuning would do."""
    w0 = layer.base_layer.weight.detach().clone()
    b0 = layer.base_layer.bias.detach().clone()
    dw = nn.Parameter(delta_w(layer))
    opt = torch.optim.AdamW([dw], lr=lr, betas=betas, weight_decay=weight_decay)
    out = []
    for _ in range(steps):
        opt.zero_grad()
        problem.loss(problem.x @ (w0 + dw).T + b0).backward()
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_([dw], max_norm)
        opt.step()
        out.append(dw.detach().clone())
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("max_norm", [None, 0.05])
def test_full_rank_square_layer_recovers_adamw(weight_decay, max_norm, device):
    n = r = 6
    model, layer = lora_linear(n, n, r, alpha=3.0, random_b=True)
    orthogonal_factors_(layer)
    model.to(device)
    problem = Regression(n, n).to(device)
    expected = dense_adamw_trajectory(layer, problem, STEPS, lr=5e-3, weight_decay=weight_decay, max_norm=max_norm)
    # precondition of exactness in floating point: dW stays far from singular (see docs/algorithm.md)
    assert max(float(torch.linalg.cond(w)) for w in expected) < 100
    opt = loft.LoFTAdamW(model, lr=5e-3, weight_decay=weight_decay, max_grad_norm=max_norm)
    clipped = 0
    for t in range(STEPS):
        opt.zero_grad()
        problem.model_loss(model).backward()
        opt.step()
        if max_norm is not None:
            clipped += int(opt.last_grad_norm > max_norm)
        assert rel_err(delta_w(layer), expected[t]) < 1e-8, f"step {t + 1}"
    if max_norm is not None:
        assert clipped > STEPS // 2  # the clipping branch really ran
    assert rel_err(expected[-1], expected[0]) > 0.3  # the trajectory really moved


def test_full_rank_gpt2_conv1d_fan_in_fan_out_recovers_adamw():
    """GPT-2's Conv1D stores its weight as (in, out); PEFT marks it fan_in_fan_out."""
    import copy

    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_embd=8, n_layer=1, n_head=2, vocab_size=20, n_positions=8, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    base = transformers.GPT2LMHeadModel(cfg).double()
    ref_model = copy.deepcopy(base).requires_grad_(False)
    model = peft.get_peft_model(
        base,
        peft.LoraConfig(r=8, lora_alpha=16, target_modules=["attn.c_proj"], fan_in_fan_out=True, init_lora_weights=False),
    )
    layer = model.base_model.model.transformer.h[0].attn.c_proj
    orthogonal_factors_(layer)
    ids = torch.randint(0, 20, (4, 8), generator=torch.Generator().manual_seed(0))
    # reference: the same network with attn.c_proj's weight a dense W0 + dW, dW trained by AdamW
    ref_layer = ref_model.transformer.h[0].attn.c_proj
    w0 = ref_layer.weight.detach().clone()  # (in, out)
    del ref_layer._parameters["weight"]
    dw = nn.Parameter(delta_w(layer))  # (out, in)
    opt_ref = torch.optim.AdamW([dw], lr=5e-3, weight_decay=0.0)
    opt = loft.LoFTAdamW(model, lr=5e-3)
    start = dw.detach().clone()
    for t in range(50):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt_ref.zero_grad()
        ref_layer.weight = w0 + dw.T
        ref_model(input_ids=ids, labels=ids).loss.backward()
        opt_ref.step()
        assert rel_err(delta_w(layer), dw.detach()) < 1e-8, f"step {t + 1}"
    assert rel_err(dw.detach(), start) > 0.05


def reference_grads(ref: ReferenceLoFT, layer, problem: Regression):
    """``(grad_A, grad_B)`` of the problem's loss at the reference's own factors."""
    a_ref = ref.A.clone().requires_grad_(True)
    b_ref = ref.B.clone().requires_grad_(True)
    w = layer.base_layer.weight.detach() + ref.s * b_ref @ a_ref
    problem.loss(problem.x @ w.T + layer.base_layer.bias.detach()).backward()
    return a_ref.grad, b_ref.grad


@pytest.mark.parametrize(
    "m, n, r, options",
    [
        (12, 7, 3, {}),
        (5, 9, 2, {"weight_decay": 0.05}),
        (8, 8, 4, {"alternating": False}),
        (10, 6, 3, {"second_moment_calibration": False}),
        (6, 6, 6, {"betas": (0.0, 0.9)}),
    ],
)
def test_low_rank_matches_the_slow_reference(m, n, r, options):
    """Packing, chunking and the two-sided code against the algorithm written out plainly."""
    model, layer = lora_linear(m, n, r, alpha=2 * r, random_b=True, seed=3)
    problem = Regression(n, m, seed=4)
    A, B, s = factors(layer)
    ref = ReferenceLoFT(A.detach(), B.detach(), s, lr=5e-3, **options)
    kw = dict(options)
    kw["alternating_updates"] = kw.pop("alternating", True)
    # tiny budget: many chunks; the reference compares factors, so no rebalancing of the factors
    opt = loft.LoFTAdamW(model, lr=5e-3, chunk_bytes=64, rebalance=False, **kw)
    for t in range(40):
        opt.zero_grad()
        problem.model_loss(model).backward()
        opt.step()
        ref.step(*reference_grads(ref, layer, problem))
        assert rel_err(A.detach(), ref.A) < 1e-9, f"A at step {t + 1}"
        assert rel_err(B.detach(), ref.B) < 1e-9, f"B at step {t + 1}"


def test_low_rank_clipping_matches_reference_projected_norm():
    m, n, r, max_norm = 9, 7, 3, 0.02
    model, layer = lora_linear(m, n, r, random_b=True, seed=5)
    problem = Regression(n, m, seed=6)
    A, B, s = factors(layer)
    ref = ReferenceLoFT(A.detach(), B.detach(), s, lr=5e-3)
    opt = loft.LoFTAdamW(model, lr=5e-3, max_grad_norm=max_norm, rebalance=False)
    for t in range(20):
        opt.zero_grad()
        problem.model_loss(model).backward()
        opt.step()
        grad_a, grad_b = reference_grads(ref, layer, problem)
        norm = ref.projected_grad_norm_sq(grad_a, grad_b) ** 0.5
        assert abs(float(opt.last_grad_norm) - norm) < 1e-10 * norm
        assert norm > max_norm  # clipping is active in this test
        ref.step(grad_a, grad_b, clip_coef=min(1.0, max_norm / (norm + 1e-6)))
        assert rel_err(A.detach(), ref.A) < 1e-9 and rel_err(B.detach(), ref.B) < 1e-9, f"step {t + 1}"


ALL_OFF = {name: False for name in loft.SWITCHES}


@pytest.mark.parametrize("max_norm, alpha", [(None, 6.0), (0.01, 6.0), (None, -6.0)])
def test_all_switches_off_is_adamw_on_the_factors(max_norm, alpha):
    """Also with a negative LoRA scaling (alpha < 0), where B's step must not go uphill."""
    model, layer = lora_linear(7, 5, 3, alpha=alpha, random_b=True)
    twin, twin_layer = lora_linear(7, 5, 3, alpha=alpha, random_b=True)
    assert (layer.scaling["default"] < 0) == (alpha < 0)
    problem = Regression(5, 7)
    opt = loft.LoFTAdamW(model, lr=1e-2, weight_decay=0.1, max_grad_norm=max_norm, **ALL_OFF)
    twin_params = [p for p in twin.parameters() if p.requires_grad]
    ref = torch.optim.AdamW(twin_params, lr=1e-2, weight_decay=0.1)
    for t in range(30):
        for o, mdl in ((opt, model), (ref, twin)):
            o.zero_grad()
            problem.model_loss(mdl).backward()
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(twin_params, max_norm)
        opt.step()
        ref.step()
        for got, want in zip(factors(layer)[:2], factors(twin_layer)[:2]):
            assert rel_err(got.detach(), want.detach()) < 1e-12, f"step {t + 1}"


def test_chunk_budget_does_not_change_the_result():
    results = []
    for chunk_bytes in (1, 1000, 2**30):
        model, layer = lora_linear(33, 17, 4, random_b=False, seed=7)
        problem = Regression(17, 33)
        opt = loft.LoFTAdamW(model, lr=1e-2, chunk_bytes=chunk_bytes)
        for _ in range(6):
            opt.zero_grad()
            problem.model_loss(model).backward()
            opt.step()
        results.append(delta_w(layer))
    assert rel_err(results[0], results[2]) < 1e-10 and rel_err(results[1], results[2]) < 1e-10
    assert results[2].abs().max() > 0


@pytest.mark.parametrize("r", [3, 40])
def test_packed_transport_both_paths(r):
    """The (p, p) GEMM path (r <= 32) and the unpacked path (r > 32) compute C S C^T."""
    from loft.linalg import packed_index, packed_transport

    g = torch.Generator().manual_seed(0)
    index = packed_index(r, False, torch.float64, torch.device("cpu"))
    x = torch.randn(5, r, r, generator=g, dtype=torch.float64)
    grams = x @ x.transpose(1, 2)
    c = torch.randn(r, r, generator=g, dtype=torch.float64)
    got = packed_transport(grams[:, index.rows, index.cols], c, index)
    want = (c @ grams @ c.T)[:, index.rows, index.cols]
    assert rel_err(got, want) < 1e-13


def _square_target_run(dtype, rebalance, steps=150):
    """Full rank 24 x 24, the target a random square matrix: dW's path stays invertible but the
    alternating factors drift apart in conditioning."""
    k = 24
    g = torch.Generator().manual_seed(2)
    target = torch.randn(k, k, generator=g, dtype=dtype) / k**0.5
    A = nn.Parameter(torch.linalg.qr(torch.randn(k, k, generator=g, dtype=dtype))[0])
    B = nn.Parameter(torch.linalg.qr(torch.randn(k, k, generator=g, dtype=dtype))[0])
    opt = loft.LoFTAdamW([loft.LoRAPair(A, B, 1.0)], lr=1e-2, rebalance=rebalance)
    out, conds = [], []
    for _ in range(steps):
        opt.zero_grad()
        (B @ A - target).square().mean().backward()
        opt.step()
        out.append((B @ A).detach().double())
        conds.append(float(torch.linalg.cond(A.detach().double())))
    return out, max(conds)


def test_rebalancing_keeps_the_dw_trajectory_and_the_factors_well_conditioned():
    plain, plain_cond = _square_target_run(torch.float64, rebalance=False)
    balanced, balanced_cond = _square_target_run(torch.float64, rebalance=True)
    for t, (a, b) in enumerate(zip(plain, balanced)):
        assert rel_err(b, a) < 1e-9, f"step {t + 1}"
    assert plain_cond > 30 and balanced_cond < plain_cond / 3


def test_rebalanced_float32_full_rank_tracks_float32_adamw():
    """float32 itself moves this problem far from its float64 path (dense AdamW too, by ~140%);
    LoFT in float32 must stay on dense AdamW's float32 path. (Without rebalancing its factors'
    grams reach condition numbers ~1e10 here and the run diverges.)"""
    k = 24
    g = torch.Generator().manual_seed(2)
    target = torch.randn(k, k, generator=g, dtype=torch.float32) / k**0.5
    A = torch.linalg.qr(torch.randn(k, k, generator=g))[0]
    B = torch.linalg.qr(torch.randn(k, k, generator=g))[0]
    w = nn.Parameter(B @ A)
    opt = torch.optim.AdamW([w], lr=1e-2, weight_decay=0.0)
    dense = []
    for _ in range(150):
        opt.zero_grad()
        (w - target).square().mean().backward()
        opt.step()
        dense.append(w.detach().double().clone())
    single, _ = _square_target_run(torch.float32, rebalance=True)
    assert max(rel_err(b, a) for a, b in zip(dense, single)) < 1e-2
