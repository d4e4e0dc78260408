"""Properties of LoFT: alpha invariance, projected steps, plain AdamW for the rest, groups."""

from __future__ import annotations

import pytest
import torch
from conftest import Regression, delta_w, factors, lora_linear, rel_err
from torch import nn

import loft
from loft.linalg import packed_index

peft = pytest.importorskip("peft")


def trajectory(model, layer, problem, steps, **kw):
    opt = loft.LoFTAdamW(model, **kw)
    out = []
    for _ in range(steps):
        opt.zero_grad()
        problem.model_loss(model).backward()
        opt.step()
        out.append(delta_w(layer))
    return out


@pytest.mark.parametrize("m, n, r", [(10, 6, 2), (5, 12, 3), (8, 8, 4)])
def test_alpha_and_init_scale_invariance(m, n, r):
    """The same dW trajectory whatever lora_alpha, rsLoRA, or how A is scaled or mixed."""
    problem = Regression(n, m, seed=2)
    variants = []
    for alpha, rslora, a_transform in [
        (r, False, None),
        (1.0, False, None),
        (64.0, False, None),
        (16.0, True, None),
        (r, False, "scale"),
        (r, False, "mix"),
    ]:
        model, layer = lora_linear(m, n, r, alpha=alpha, rslora=rslora, random_b=False, seed=11)
        A = factors(layer)[0]
        with torch.no_grad():
            if a_transform == "scale":
                A.mul_(25.0)
            elif a_transform == "mix":  # any invertible r x r re-mixing of A's rows
                mix = torch.eye(r, dtype=A.dtype) + 0.5 * torch.randn(r, r, generator=torch.Generator().manual_seed(0), dtype=A.dtype)
                A.copy_(mix @ A)
        variants.append(trajectory(model, layer, problem, 25, lr=1e-2, weight_decay=0.01))
    first = variants[0]
    assert float(first[-1].norm()) > 0.05
    for other in variants[1:]:
        for t, (a, b) in enumerate(zip(first, other)):
            assert rel_err(b, a) < 1e-9, f"step {t + 1}"


def test_lora_baseline_is_not_alpha_invariant():
    """The invariance test above can fail: AdamW on the factors changes with alpha."""
    problem = Regression(6, 10, seed=2)
    runs = []
    for alpha in (1.0, 64.0):
        model, layer = lora_linear(10, 6, 2, alpha=alpha, random_b=False, seed=11)
        runs.append(trajectory(model, layer, problem, 10, lr=1e-2, **{k: False for k in loft.SWITCHES}))
    assert rel_err(runs[1][-1], runs[0][-1]) > 1e-2


def _full_second_moment(optimizer, pair, side):
    """Dense V and M rebuilt naively from the optimizer's state, for the factor that moved."""
    A, B, s = pair.A.detach(), pair.B.detach(), pair.scale()
    U = s * B
    index = packed_index(pair.rank, False, A.dtype, A.device)
    st = optimizer.state[pair.A if side == "A" else pair.B]
    r = pair.rank
    grams = torch.zeros(st["exp_avg_sq"].shape[0], r, r, dtype=A.dtype)
    grams[:, index.rows, index.cols] = st["exp_avg_sq"]
    grams[:, index.cols, index.rows] = st["exp_avg_sq"]
    if side == "A":  # M = U mA, V[i, j] = u_i^T SA[j] u_i
        return U @ st["exp_avg"], torch.einsum("ik,jkl,il->ij", U, grams, U)
    m_u = st["exp_avg"].T  # stored as (U^T)'s moment
    return m_u @ A, torch.einsum("kj,ikl,lj->ij", A, grams, A)


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_each_step_is_the_projected_adamw_direction(weight_decay):
    """dW_new = (1 - lr wd) dW - lr * proj(D), D built from the stored moments; the change lies in
    the active factor's subspace: X P_A when B moved, P_U X when A moved."""
    m, n, r, lr, eps = 9, 7, 3, 1e-2, 1e-8
    beta1, beta2 = 0.9, 0.999
    model, layer = lora_linear(m, n, r, random_b=False, seed=3)
    problem = Regression(n, m, seed=3)
    # the state is read back against the factors, so they must not be re-based behind our back
    opt = loft.LoFTAdamW(model, lr=lr, eps=eps, weight_decay=weight_decay, rebalance=False)
    (pair,) = opt.pairs
    for t in range(1, 13):
        before = delta_w(layer)
        A0, U0 = pair.A.detach().clone(), pair.scale() * pair.B.detach().clone()
        opt.zero_grad()
        problem.model_loss(model).backward()
        opt.step()
        side = "B" if t % 2 == 1 else "A"
        # the stored moments are this step's; the partner did not move in this step
        M, V = _full_second_moment(opt, pair, side)
        if side == "B":
            proj = A0.T @ torch.linalg.solve(A0 @ A0.T, A0)  # P_A
        else:
            proj = U0 @ torch.linalg.solve(U0.T @ U0, U0.T)  # P_U
        D = (M / (1 - beta1**t)) / ((V / (1 - beta2**t)).sqrt() + eps)
        expected_change = -lr * weight_decay * before - lr * (D @ proj if side == "B" else proj @ D)
        change = delta_w(layer) - before
        assert rel_err(change, expected_change) < 1e-9, f"step {t}"
        residual = change - (change @ proj if side == "B" else proj @ change)
        assert float(residual.norm()) < 1e-12 * float(change.norm()) + 1e-15


def test_lora_default_start_gives_finite_sensible_first_step():
    """B = 0: U^T U = 0 and grad_A = 0. The first step is AdamW's first step on G P_A, projected:
    dW = -lr * sign(G P_A) P_A (up to eps)."""
    for dtype in (torch.float64, torch.float32):
        model, layer = lora_linear(8, 6, 2, random_b=False, dtype=dtype, seed=4)
        A, B, s = factors(layer)
        assert float(B.abs().max()) == 0.0
        problem = Regression(6, 8, dtype=dtype)
        opt = loft.LoFTAdamW(model, lr=1e-3)
        problem.model_loss(model).backward()
        a = A.detach().double()
        proj = a.T @ torch.linalg.solve(a @ a.T, a)  # P_A
        G = (B.grad.double() / s) @ torch.linalg.solve(a @ a.T, a)  # = G P_A
        opt.step()
        expected = -1e-3 * (G / (G.abs() + 1e-8)) @ proj
        assert torch.isfinite(A).all() and torch.isfinite(B).all()
        tol = 1e-10 if dtype == torch.float64 else 1e-4
        assert rel_err(delta_w(layer).double(), expected) < tol
        assert torch.equal(opt.state[A]["exp_avg"], torch.zeros_like(opt.state[A]["exp_avg"]))  # gA came out 0


def _model_with_head(seed=0, dtype=torch.float64, **config):
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)
    cfg = peft.LoraConfig(r=2, target_modules=["0"], modules_to_save=["2"], bias="lora_only", **config)
    return peft.get_peft_model(base, cfg)


def _plain_params(model):
    pairs, others = loft.split_lora_parameters(model)
    return others


@pytest.mark.parametrize("use_dora", [False, True])
def test_non_lora_parameters_follow_adamw_exactly(use_dora):
    model = _model_with_head(use_dora=use_dora)
    others = _plain_params(model)
    names = {n for n, p in model.named_parameters() if p.requires_grad and any(p is o for o in others)}
    assert any("modules_to_save" in n for n in names) and any("bias" in n for n in names)
    if use_dora:
        assert any("lora_magnitude_vector" in n for n in names)
    shadows = [nn.Parameter(p.detach().clone()) for p in others]
    ref = torch.optim.AdamW(shadows, lr=3e-3, weight_decay=0.02)
    opt = loft.LoFTAdamW(model, lr=3e-3, weight_decay=0.02)
    x = torch.randn(16, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    for _ in range(15):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        for sh, p in zip(shadows, others):
            sh.grad = p.grad.clone()
        opt.step()
        ref.step()
        for sh, p in zip(shadows, others):
            assert torch.equal(sh.detach(), p.detach())


def test_head_lr_gives_plain_parameters_their_own_lr_and_leaves_pairs_alone():
    models = [_model_with_head(seed=0), _model_with_head(seed=0)]
    opts = [loft.LoFTAdamW(models[0], lr=1e-3), loft.LoFTAdamW(models[1], lr=1e-3, head_lr=1e-2, head_weight_decay=0.1)]
    assert [g["lr"] for g in opts[1].param_groups] == [1e-3, 1e-2]
    assert [g["weight_decay"] for g in opts[1].param_groups] == [0.0, 0.1]
    others = _plain_params(models[1])
    shadows = [nn.Parameter(p.detach().clone()) for p in others]
    ref = torch.optim.AdamW(shadows, lr=1e-2, weight_decay=0.1)
    x = torch.randn(16, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    for _ in range(10):
        opts[0].zero_grad()
        opts[1].zero_grad()
        nn.functional.cross_entropy(models[0](x), y).backward()
        # both optimizers see the same gradients, so only the learning rates differ
        for p0, p1 in zip(models[0].parameters(), models[1].parameters()):
            if p0.grad is not None:
                p1.grad = p0.grad.clone()
        for sh, p in zip(shadows, others):
            sh.grad = p.grad.clone()
        opts[0].step()
        opts[1].step()
        ref.step()
    for (n0, p0), p1 in zip(models[0].named_parameters(), models[1].parameters()):
        if "lora_A" in n0 or "lora_B" in n0:
            assert torch.equal(p0, p1), n0
    for sh, p in zip(shadows, others):
        assert torch.equal(sh.detach(), p.detach())
    assert not torch.equal(others[0], _plain_params(models[0])[0])


def test_lr_schedulers_scale_pairs_and_heads_alike():
    transformers = pytest.importorskip("transformers")
    model = _model_with_head()
    opt = loft.LoFTAdamW(model, lr=1e-3, head_lr=1e-2)
    sched = transformers.get_linear_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=10)
    x = torch.randn(16, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    seen = []
    for _ in range(10):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
        seen.append([g["lr"] for g in opt.param_groups])
    assert all(abs(h - 10 * p) < 1e-15 for p, h in seen)
    assert seen[0][0] == pytest.approx(1e-3 / 2) and seen[-1][0] == 0.0


def test_lr_zero_group_and_step_lr_scheduler_freeze_what_they_should():
    model = _model_with_head()
    (pair,) = loft.find_lora_pairs(model)
    opt = loft.LoFTAdamW([{"params": [pair], "lr": 0.0}, {"params": _plain_params(model), "lr": 1e-2}])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.0)
    before_pair = [pair.A.detach().clone(), pair.B.detach().clone()]
    x = torch.randn(16, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    head = _plain_params(model)[0]
    snapshots = []
    for _ in range(6):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
        snapshots.append(head.detach().clone())
    assert torch.equal(pair.A, before_pair[0]) and torch.equal(pair.B, before_pair[1])
    assert not torch.equal(snapshots[0], snapshots[2])  # moved while lr > 0
    assert torch.equal(snapshots[3], snapshots[5])  # StepLR set lr to 0 after 3 steps


def test_several_adapters_and_embedding_layers_are_found():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_embd=8, n_layer=1, n_head=2, vocab_size=20, n_positions=8)
    base = transformers.GPT2LMHeadModel(cfg)
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["c_attn", "wte"], fan_in_fan_out=True))
    model.add_adapter("second", peft.LoraConfig(r=3, target_modules=["c_attn"], fan_in_fan_out=True))
    model.base_model.set_adapter(["default", "second"])  # train both adapters at once
    pairs = loft.find_lora_pairs(model)
    assert sorted((p.name.split(".")[-1], p.rank) for p in pairs) == sorted(
        [("c_attn[default]", 2), ("c_attn[second]", 3), ("wte[default]", 2)]
    )
    opt = loft.LoFTAdamW(model, lr=1e-3)
    ids = torch.randint(0, 20, (2, 8))
    before = {p.name: p.scale() * p.B.detach() @ LoRAPairMatrix(p.A) for p in pairs}
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    for p in pairs:
        after = p.scale() * p.B.detach() @ LoRAPairMatrix(p.A)
        assert torch.isfinite(after).all()
        assert not torch.equal(after, before[p.name]), p.name


def LoRAPairMatrix(t):  # noqa: N802 - small local helper
    return loft.LoRAPair.matrix(t.detach())


def test_a_factor_written_back_unchanged_is_calibrated_with_the_identity():
    """At lr = 0 the factor the step moves is written back bit-identical; the optimizer decides
    "partner moved" from what it wrote (no whole-tensor comparison), so the next step calibrates
    the moments with C = (F_new F_old^T)(F_old F_old^T)^-1, the identity up to rounding. In float64
    the moments equal those of the same steps with the first-moment calibration switched off, to
    1e-12 (the second moment's transport uses the same C; switching it off changes its format)."""
    m, n, r = 9, 7, 3
    problem = Regression(n, m, seed=5)
    runs = []
    for calibrate in (True, False):
        model, layer = lora_linear(m, n, r, alpha=r, random_b=True, seed=3)
        opt = loft.LoFTAdamW(model, lr=1e-2, rebalance=False)
        for step in range(8):
            if step == 3:  # from here on nothing moves; the moments keep taking in gradients
                for group in opt.param_groups:
                    group["lr"] = 0.0
                before = [t.detach().clone() for t in factors(layer)[:2]]
            if step == 4:  # (step 3 still calibrates for step 2's real move)
                for group in opt.param_groups:
                    group["first_moment_calibration"] = calibrate
            opt.zero_grad()
            problem.model_loss(model).backward()
            opt.step()
        assert all(torch.equal(a, b) for a, b in zip(before, factors(layer)[:2]))  # lr = 0: bit-identical
        runs.append([{k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v) and v.is_floating_point()}
                     for p in factors(layer)[:2]])
    for with_c, without in zip(*runs):
        assert with_c.keys() == without.keys() and with_c
        for key in with_c:
            assert rel_err(with_c[key], without[key]) < 1e-12, key
