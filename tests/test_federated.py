"""loft.federated: the aggregators, loading global factors into a client that keeps (or resets)
its LoFT state, one-factor rounds, byte accounting and the Dirichlet splitter (issue 18)."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

import loft
from loft import federated as fed
from loft.linalg import packed_index

peft = pytest.importorskip("peft")

F64 = torch.float64


def test_the_module_needs_torch_only():
    code = "import sys, loft; loft.federated.get_factors; print(sorted(m for m in ('peft', 'transformers', 'flwr', 'loft.app') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------------- builders
def mlp(seed: int = 0, r: int = 2, random_b: bool = False, dtype=F64):
    """A PEFT model around a 2-layer MLP (6 -> 8 -> 5); LoRA rank ``r`` on both Linear layers."""
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5)).to(dtype)
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0", "2"], init_lora_weights=not random_b)
    return peft.get_peft_model(base, cfg, autocast_adapter_dtype=False)


def batch(step: int, dtype=F64):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(32, 6, generator=g, dtype=dtype), torch.randn(32, 5, generator=g, dtype=dtype)


def train(model, opt, steps, start=0):
    for t in range(start, start + steps):
        x, y = batch(t)
        opt.zero_grad()
        (torch.tanh(model(x)) - y).square().mean().backward()
        opt.step()


def random_factors(shapes, r, seed, dtype=F64, row_space=None):
    """``{name: (A (r, n), B (m, r))}``; ``row_space``: ``{name: (r, n)}`` every A is a mix of."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (m, n) in shapes.items():
        a = torch.randn(r, n, generator=g, dtype=dtype)
        if row_space is not None:
            a = torch.randn(r, r, generator=g, dtype=dtype) @ row_space[name]
        out[name] = (a, torch.randn(m, r, generator=g, dtype=dtype))
    return out


def dense_mean(updates, weights, carry=None):
    """The reference, in the test only: the weighted mean of the products as m x n matrices."""
    total = sum(weights)
    mean = {name: sum(w / total * u[name][1] @ u[name][0] for w, u in zip(weights, updates)) for name in updates[0]}
    for name, (a, b) in (carry or {}).items():
        mean[name] = mean[name] + b @ a
    return mean


def rel(x, y):
    return float((x - y).detach().norm() / y.detach().norm())


SHAPES = {"q": (7, 9), "v": (12, 5)}


# --------------------------------------------------------------------------------- product aggregation
def test_product_aggregation_is_the_exact_mean_when_its_rank_fits():
    basis = {name: torch.randn(2, n, dtype=F64, generator=torch.Generator().manual_seed(7)) for name, (m, n) in SHAPES.items()}
    updates = [random_factors(SHAPES, 2, seed, row_space=basis) for seed in range(3)]  # all A's share a row space
    weights = [10.0, 30.0, 60.0]
    agg = fed.aggregate_products(updates, weights)
    reference = dense_mean(updates, weights)
    for name, (a, b) in agg.factors.items():
        assert a.shape == (2, SHAPES[name][1]) and b.shape == (SHAPES[name][0], 2)
        assert rel(b @ a, reference[name]) < 1e-13
        assert torch.allclose(b.T @ b, a @ a.T, rtol=0, atol=1e-12 * float(a.norm()) ** 2)  # balanced
        assert agg.error[name] == 0.0
    assert agg.residual == {}
    # the mean is not FedAvg's product (the baseline's bias)
    avg = fed.fedavg(updates, weights)
    assert all(rel(avg[k][1] @ avg[k][0], reference[k]) > 0.1 for k in SHAPES)


def test_product_aggregation_truncates_optimally_and_the_residual_completes_it():
    updates = [random_factors(SHAPES, 2, seed) for seed in range(3)]  # the mean has rank 6 > 2
    weights = [1.0, 2.0, 3.0]
    agg = fed.aggregate_products(updates, weights)
    reference = dense_mean(updates, weights)
    for name, (a, b) in agg.factors.items():
        u, s, vh = torch.linalg.svd(reference[name])
        best = u[:, :2] @ torch.diag(s[:2]) @ vh[:2]  # Eckart-Young
        assert rel(b @ a, best) < 1e-12
        assert torch.allclose(b.T @ b, a @ a.T, rtol=0, atol=1e-12 * float(s[0]))
        a_res, b_res = agg.residual[name]
        assert a_res.shape[0] == b_res.shape[1] == min(6, *SHAPES[name]) - 2
        assert rel(b @ a + b_res @ a_res, reference[name]) < 1e-12
        expected = float(s[2:].square().sum().sqrt() / s.square().sum().sqrt())
        assert abs(agg.error[name] - expected) < 1e-12 and expected > 0.1
    # a larger server rank holds the whole mean: exact again
    big = fed.aggregate_products(updates, weights, rank=6)
    assert all(rel(b @ a, reference[k]) < 1e-12 and big.error[k] == 0.0 for k, (a, b) in big.factors.items())
    assert big.factors["v"][0].shape == (6, 5)  # v is 12 x 5: rank 5 at most, one spare slot
    assert big.residual == {}


def test_carry_is_added_to_the_mean():
    updates = [random_factors(SHAPES, 2, seed) for seed in range(2)]
    first = fed.aggregate_products(updates, [1.0, 1.0])
    nxt = [random_factors(SHAPES, 2, seed) for seed in range(5, 7)]
    agg = fed.aggregate_products(nxt, [1.0, 3.0], carry=first.residual)
    reference = dense_mean(nxt, [1.0, 3.0], carry=first.residual)
    for name, (a, b) in agg.factors.items():
        a_res, b_res = agg.residual[name]
        assert rel(b @ a + b_res @ a_res, reference[name]) < 1e-12
        assert rel(b @ a + b_res @ a_res, dense_mean(nxt, [1.0, 3.0])[name]) > 1e-3  # the carry mattered


def test_product_aggregation_never_forms_an_m_by_n_matrix():
    # 200000 x 200000 in float64 would be 320 GB: this runs only if nothing of that size is built
    m = n = 200_000
    updates = [random_factors({"big": (m, n)}, 2, seed) for seed in range(3)]
    weights = [1.0, 2.0, 1.0]
    agg = fed.aggregate_products(updates, weights, rank=6)
    a, b = agg.factors["big"]
    x = torch.randn(n, 3, dtype=F64)
    exact = sum(w / 4 * u["big"][1] @ (u["big"][0] @ x) for w, u in zip(weights, updates))
    assert rel(b @ (a @ x), exact) < 1e-12 and agg.error["big"] == 0.0


def test_a_rank_deficient_mean_keeps_a_full_rank_a():
    column = torch.randn(7, 1, dtype=F64)
    updates = [{"q": (torch.randn(2, 9, dtype=F64), column @ torch.randn(1, 2, dtype=F64))} for _ in range(2)]  # rank 1
    agg = fed.aggregate_products(updates, [1.0, 1.0])
    a, b = agg.factors["q"]
    assert rel(b @ a, dense_mean(updates, [1.0, 1.0])["q"]) < 1e-12
    assert float(b[:, 1].abs().max()) == 0.0  # the unused slot: B's column is zero ...
    assert torch.linalg.matrix_rank(a) == 2  # ... and A's row is a direction LoFT can grow
    zero = {"q": (torch.randn(2, 9, dtype=F64), torch.zeros(7, 2, dtype=F64))}  # an untrained LoRA: B = 0
    a0, b0 = fed.aggregate_products([zero], [1.0]).factors["q"]
    assert float(b0.abs().max()) == 0.0 and torch.linalg.matrix_rank(a0) == 2


def test_float32_clients_get_float32_factors():
    updates = [random_factors(SHAPES, 2, seed, dtype=torch.float32) for seed in range(2)]
    agg = fed.aggregate_products(updates, [1.0, 1.0])
    assert all(a.dtype == b.dtype == torch.float32 for a, b in agg.factors.values())
    assert fed.message_bytes(agg.factors) == 4 * 2 * (7 + 9 + 12 + 5)
    assert fed.message_bytes(updates[0]) == 4 * 2 * (7 + 9 + 12 + 5)
    assert fed.message_bytes(random_factors(SHAPES, 3, 0)) == 8 * 3 * (7 + 9 + 12 + 5)


def test_fedavg_is_the_mean_of_each_factor():
    updates = [random_factors(SHAPES, 2, seed) for seed in range(3)]
    avg = fed.fedavg(updates, [1.0, 1.0, 2.0])
    for name, (a, b) in avg.items():
        assert torch.allclose(a, (updates[0][name][0] + updates[1][name][0] + 2 * updates[2][name][0]) / 4, atol=1e-15)
        assert torch.allclose(b, (updates[0][name][1] + updates[1][name][1] + 2 * updates[2][name][1]) / 4, atol=1e-15)


# --------------------------------------------------------------------------------- the client side
def test_get_and_set_factors_round_trip_in_place():
    model = mlp(random_b=True)
    got = fed.get_factors(model)
    assert list(got) == ["base_model.model.0", "base_model.model.2"]
    assert got["base_model.model.0"][0].shape == (2, 6) and got["base_model.model.2"][1].shape == (5, 2)
    layer = model.base_model.model[0]
    param = layer.lora_A["default"].weight
    new = random_factors({k: (b.shape[0], a.shape[1]) for k, (a, b) in got.items()}, 2, 3)
    fed.set_factors(model, new)
    assert layer.lora_A["default"].weight is param and torch.equal(param, new["base_model.model.0"][0])
    got["base_model.model.0"][0].add_(1.0)  # clones: the model is not touched
    assert torch.equal(param, new["base_model.model.0"][0])


def _sides(opt, model):
    """``{(layer, side): (exp_avg, exp_avg_sq as full (k, r, r), partner)}`` copies."""
    out = {}
    for name in ("0", "2"):
        layer = model.base_model.model[int(name)]
        for side, p in enumerate((layer.lora_A["default"].weight, layer.lora_B["default"].weight)):
            st = opt.state[p]
            r = st["exp_avg"].shape[0]
            idx = packed_index(r, False, F64, torch.device("cpu"))
            packed = st["exp_avg_sq"]
            full = packed.new_zeros(packed.shape[0], r, r)
            full[:, idx.rows, idx.cols] = packed
            full[:, idx.cols, idx.rows] = packed
            out[name, side] = (st["exp_avg"].clone(), full, st["partner"].clone())
    return out


def _hand_transport(before, model, betas):
    """The moments one LoFT step makes from ``before`` at the model's current factors and
    gradients: ``C = (P^T P)^-1 P^T P_prev``, ``m <- b1 C m + (1 - b1) g``,
    ``S_j <- b2 C S_j C^T + (1 - b2) g_j g_j^T``, ``g = (P^T P)^-1 P^T G``; and ``C``."""
    b1, b2 = betas
    out = {}
    torch.set_grad_enabled(False)
    for name in ("0", "2"):
        layer = model.base_model.model[int(name)]
        a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
        u = s * b
        for side, (partner, grad) in enumerate(((u, a.grad), (a.T, (b.grad / s).T))):
            m, full, prev = before[name, side]
            gram = partner.T @ partner
            c = torch.linalg.solve(gram, partner.T @ prev)
            g = torch.linalg.solve(gram, grad)
            cm = c @ m
            new_m = b1 * cm + (1 - b1) * g
            new_s = b2 * (c @ full @ c.T) + (1 - b2) * g.T[:, :, None] * g.T[:, None, :]
            out[name, side] = (new_m, new_s, cm, c)
    torch.set_grad_enabled(True)
    return out


def _gradients(model, step):
    x, y = batch(step)
    model.zero_grad()
    (torch.tanh(model(x)) - y).square().mean().backward()


@pytest.mark.parametrize("round_trip", [False, True])
def test_kept_state_transports_the_moments_into_the_new_factors(round_trip):
    betas = (0.9, 0.999)
    initial = mlp(seed=0)
    model = copy.deepcopy(initial)
    opt = loft.LoFTAdamW(model, lr=2e-2, betas=betas)
    train(model, opt, 3)  # the last step moved B: the A side knows its partner moved, the B side does not
    other = mlp(seed=1)
    train(other, loft.LoFTAdamW(other, lr=2e-2), 3)
    new = fed.aggregate_products([fed.get_factors(model), fed.get_factors(other)], [1.0, 1.0]).factors
    before = _sides(opt, model)
    if round_trip:  # a client that saved its optimizer state, rebuilt its model and optimizer
        saved = copy.deepcopy(opt.state_dict())
        model = copy.deepcopy(initial)
        fed.set_factors(model, new)
        opt = loft.LoFTAdamW(model, lr=2e-2, betas=betas)
        opt.load_state_dict(saved)
    else:
        fed.set_factors(model, new, opt, keep_state=True)
    _gradients(model, 3)
    expected = _hand_transport(before, model, betas)
    opt.step()
    after = _sides(opt, model)
    worst = 0.0
    for key, (new_m, new_s, cm, c) in expected.items():
        m, full, _ = after[key]
        assert float((c - torch.eye(2, dtype=F64)).norm()) > 0.1  # a real change of basis on both sides
        assert rel(m, new_m) < 1e-12 and rel(full, new_s) < 1e-12
        g = (m - betas[0] * cm) / (1 - betas[0])  # the step's own gradient term: what is left is C m
        worst = max(worst, rel((m - (1 - betas[0]) * g) / betas[0], cm), rel(m, new_m))
    assert worst < 1e-12, worst


def test_a_write_through_data_is_not_seen_and_set_factors_is():
    """Why set_factors writes with copy_ under no_grad: the optimizer sees version counters."""
    model = mlp(seed=0)
    opt = loft.LoFTAdamW(model, lr=2e-2, rebalance=False)  # (a rebalancing check would make A's flag "maybe")
    train(model, opt, 3)
    (pair,) = [p for p in opt.pairs if p.name.startswith("base_model.model.0")]
    assert opt._partner_flags(pair) == (0, 1)  # after a B step: B changed, A did not
    new = {k: (a * 2, b * 3) for k, (a, b) in fed.get_factors(model).items()}
    pair.A.data.copy_(new["base_model.model.0"][0])
    assert opt._partner_flags(pair) == (0, 1)  # not seen: the calibration would be skipped
    fed.set_factors(model, new, opt)
    assert opt._partner_flags(pair) == (2, 2)  # seen: compared with the stored bases at the next step


def test_one_client_reproduces_centralised_loft():
    options = dict(lr=2e-2, weight_decay=0.1, max_grad_norm=0.5)
    central, client = mlp(seed=0), mlp(seed=0)
    train(central, loft.LoFTAdamW(central, **options), 15)
    opt = loft.LoFTAdamW(client, **options)
    moved = 0.0
    for round_ in range(3):  # 3 rounds of 5 local steps; the server re-factors the product each time
        train(client, opt, 5, start=5 * round_)
        mine = fed.get_factors(client)
        agg = fed.aggregate_products([mine], [7.0])
        assert all(e == 0.0 for e in agg.error.values()) and agg.residual == {}
        moved = max(moved, *(rel(agg.factors[k][1], mine[k][1]) for k in mine))
        fed.set_factors(client, agg.factors, opt, keep_state=True)
    assert moved > 1e-2  # the server's factors are another factorisation, not the client's own
    for name in ("0", "2"):
        a, b = fed.get_factors(central)[f"base_model.model.{name}"]
        a2, b2 = fed.get_factors(client)[f"base_model.model.{name}"]
        assert rel(b2 @ a2, b @ a) < 1e-9
        assert float((b @ a).norm()) > 1e-2  # it trained (B started at 0)


def test_reset_state_equals_a_fresh_optimizer():
    options = dict(lr=2e-2, max_grad_norm=0.5)
    model = mlp(seed=0)
    opt = loft.LoFTAdamW(model, **options)
    train(model, opt, 3)
    new = {k: (a * 1.5, b - 0.1) for k, (a, b) in fed.get_factors(model).items()}
    fed.set_factors(model, new, opt, keep_state=False)
    assert all(not opt.state[p] for g in opt.param_groups for p in g["params"])
    fresh_model = copy.deepcopy(model)
    fresh = loft.LoFTAdamW(fresh_model, **options)
    train(model, opt, 4, start=3)
    train(fresh_model, fresh, 4, start=3)
    for (a, b), (a2, b2) in zip(fed.get_factors(model).values(), fed.get_factors(fresh_model).values()):
        assert torch.equal(a, a2) and torch.equal(b, b2)


def test_reset_keeps_the_param_groups_of_any_optimizer():
    model = mlp(seed=0, random_b=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train(model, opt, 2)
    opt.param_groups[0]["lr"] = 5e-3  # a scheduler moved it
    fed.set_factors(model, fed.get_factors(model), opt, keep_state=False)
    assert opt.param_groups[0]["lr"] == 5e-3 and all(not s for s in opt.state.values())


# --------------------------------------------------------------------------------- one factor per round
def test_a_frozen_factor_stays_and_loft_steps_the_other_every_step():
    model = mlp(seed=0)
    fed.freeze_factor(model, "A")
    opt = loft.LoFTAdamW(model, lr=2e-2)  # a pair with one frozen factor is accepted
    layer = model.base_model.model[0]
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    a0 = a.detach().clone()
    projector = a0.T @ torch.linalg.solve(a0 @ a0.T, a0)  # onto A's row space
    for t in range(4):  # B moves at every step (no alternation), A never
        b_before = b.detach().clone()
        train(model, opt, 1, start=t)
        assert torch.equal(a, a0) and not torch.equal(b, b_before)
        assert a.grad is None
        change = ((b - b_before) @ a).detach()  # B's steps stay in A's row space: X P_A = X
        assert rel(change @ projector, change) < 1e-12
    fed.freeze_factor(model, None)
    opt.zero_grad()
    b_before, a_before = b.detach().clone(), a.detach().clone()
    train(model, opt, 2, start=4)  # both trainable again: alternation resumes (steps 5 and 6: B, then A)
    assert not torch.equal(b, b_before) and not torch.equal(a, a_before)
    fed.freeze_factor(model, "B")
    opt.zero_grad()
    b0 = b.detach().clone()
    train(model, opt, 2, start=6)
    assert torch.equal(b, b0)


def test_alternating_rounds_aggregate_exactly():
    clients = [mlp(seed=0) for _ in range(2)]
    for k, model in enumerate(clients):
        fed.set_factors(model, fed.get_factors(clients[0]))  # the same global start
        fed.freeze_factor(model, "A")  # round 1 trains B
        train(model, loft.LoFTAdamW(model, lr=2e-2), 3, start=10 * k)  # different data per client
    assert fed.trained_factor(1) == "B"
    updates = [fed.get_factors(m) for m in clients]
    agg = fed.alternating_aggregate(updates, [1.0, 2.0], fed.trained_factor(1))
    reference = dense_mean(updates, [1.0, 2.0])
    for name, (a, b) in agg.items():
        assert rel(b @ a, reference[name]) < 1e-14
        assert torch.equal(a, updates[0][name][0])
    with pytest.raises(ValueError, match=r"Client 1's B of 'base_model.model.0' differs from client 0's.*freeze_factor\(model, 'B'\)"):
        fed.alternating_aggregate(updates, [1.0, 2.0], "A")


def test_trained_factor_schedule():
    assert [fed.trained_factor(k) for k in range(1, 5)] == ["B", "A", "B", "A"]
    with pytest.raises(ValueError, match="round must be an integer >= 1"):
        fed.trained_factor(0)


# --------------------------------------------------------------------------------- fold
def test_folding_the_residual_gives_the_model_of_the_exact_mean():
    clients = [mlp(seed=0, random_b=True)] + [mlp(seed=0, random_b=True) for _ in range(2)]
    for k, model in enumerate(clients):
        fed.set_factors(model, {n: (a + 0.3 * torch.randn_like(a), b + 0.3 * torch.randn_like(b))
                                for n, (a, b) in fed.get_factors(model).items()})
    updates = [fed.get_factors(m) for m in clients]
    agg = fed.aggregate_products(updates, [1.0, 1.0, 1.0])
    assert agg.residual and all(e > 1e-3 for e in agg.error.values())
    server = copy.deepcopy(clients[0])
    fed.set_factors(server, agg.factors)
    fed.fold_residual(server, agg.residual)
    # the reference: the base weights plus the exact mean, dense (in the test only)
    reference = copy.deepcopy(clients[0]).base_model.model
    mean = dense_mean(updates, [1.0, 1.0, 1.0])
    for name in ("0", "2"):
        layer = reference[int(name)]
        with torch.no_grad():
            layer.base_layer.weight += layer.scaling["default"] * mean[f"base_model.model.{name}"]
        layer.lora_B["default"].weight.data.zero_()
    x = torch.randn(16, 6, dtype=F64)
    assert rel(server(x), reference(x)) < 1e-12
    truncated = copy.deepcopy(clients[0])
    fed.set_factors(truncated, agg.factors)
    assert rel(truncated(x), reference(x)) > 1e-4  # the fold mattered


def test_fold_into_an_embedding():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.out = nn.Linear(4, 3)

        def forward(self, ids):
            return self.out(self.emb(ids))

    torch.manual_seed(0)
    model = peft.get_peft_model(Net().double(), peft.LoraConfig(r=1, lora_alpha=2, target_modules=["emb"]))
    (name,) = fed.get_factors(model)
    updates = [{name: (torch.randn(1, 10, dtype=F64), torch.randn(4, 1, dtype=F64))} for _ in range(3)]
    agg = fed.aggregate_products(updates, [1.0, 1.0, 1.0])
    ids = torch.arange(10)[None]
    reference = copy.deepcopy(model)
    fed.set_factors(reference, {name: (torch.zeros(1, 10, dtype=F64), torch.zeros(4, 1, dtype=F64))})
    with torch.no_grad():  # PEFT's embedding update is (B A)^T, added to the (10, 4) table
        reference.base_model.model.emb.base_layer.weight += 2.0 * dense_mean(updates, [1.0, 1.0, 1.0])[name].T
    fed.set_factors(model, agg.factors)
    fed.fold_residual(model, agg.residual)
    assert agg.residual and rel(model(ids), reference(ids)) < 1e-12


# --------------------------------------------------------------------------------- bad input
def test_bad_input_is_refused_with_a_clear_message():
    u = [random_factors(SHAPES, 2, seed) for seed in range(2)]
    with pytest.raises(ValueError, match="2 client updates but 1 weights"):
        fed.aggregate_products(u, [1.0])
    with pytest.raises(ValueError, match="Client 1's weight is 0.0; weights must be positive"):
        fed.fedavg(u, [1.0, 0.0])
    with pytest.raises(ValueError, match="Client 0's weight is nan"):
        fed.aggregate_products(u, [float("nan"), 1.0])
    with pytest.raises(ValueError, match="No client updates"):
        fed.fedavg([], [])
    missing = {"q": u[1]["q"]}
    with pytest.raises(ValueError, match=r"client 1's update has no factors for LoRA layer 'v'"):
        fed.aggregate_products([u[0], missing], [1.0, 1.0])
    extra = dict(u[1], k=u[1]["q"])
    with pytest.raises(ValueError, match=r"client 1's update has factors for 'k', which is not a LoRA layer"):
        fed.fedavg([u[0], extra], [1.0, 1.0])
    other_rank = dict(u[1], q=random_factors({"q": (7, 9)}, 3, 0)["q"])
    with pytest.raises(ValueError, match=r"client 1's update\['q'\] has A \(3, 9\) and B \(7, 3\), but the layer needs A \(2, 9\)"):
        fed.aggregate_products([u[0], other_rank], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"client 0's update\['q'\] has A \(2, 9\) and B \(8, 3\)"):
        fed.fedavg([dict(u[0], q=(u[0]["q"][0], torch.zeros(8, 3, dtype=F64)))], [1.0])
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        fed.aggregate_products(u, [1.0, 1.0], rank=0)
    with pytest.raises(ValueError, match=r"carry\['q'\] has A \(1, 4\)"):
        fed.aggregate_products(u, [1.0, 1.0], carry={"q": (torch.zeros(1, 4, dtype=F64), torch.zeros(7, 1, dtype=F64))})
    with pytest.raises(ValueError, match="trained must be 'A' or 'B'"):
        fed.alternating_aggregate(u, [1.0, 1.0], "C")
    with pytest.raises(ValueError, match="which must be 'A', 'B' or None"):
        fed.freeze_factor(mlp(), "a")


def test_set_factors_refuses_bad_factors_and_writes_nothing():
    model = mlp(seed=0, random_b=True)
    before = fed.get_factors(model)
    good = {k: (a + 1, b + 1) for k, (a, b) in before.items()}
    bad = dict(good)
    del bad["base_model.model.2"]
    with pytest.raises(ValueError, match=r"factors has no factors for LoRA layer 'base_model.model.2'"):
        fed.set_factors(model, bad)
    with pytest.raises(ValueError, match=r"factors has factors for 'x', which is not a LoRA layer"):
        fed.set_factors(model, dict(good, x=good["base_model.model.0"]))
    a, b = good["base_model.model.2"]
    with pytest.raises(ValueError, match=r"factors\['base_model.model.2'\] has A \(3, 8\).*needs A \(2, 8\)"):
        fed.set_factors(model, dict(good, **{"base_model.model.2": (torch.zeros(3, 8, dtype=F64), torch.zeros(5, 3, dtype=F64))}))
    with pytest.raises(ValueError, match="inf or NaN"):
        fed.set_factors(model, dict(good, **{"base_model.model.2": (a * float("nan"), b)}))
    for k, (a, b) in fed.get_factors(model).items():  # the first layer was valid, and still not written
        assert torch.equal(a, before[k][0]) and torch.equal(b, before[k][1])
    with pytest.raises(ValueError, match="no LoRA layers with an adapter named 'default'"):
        fed.get_factors(nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"residual\['base_model.model.0'\] has A \(1, 5\)"):
        fed.fold_residual(model, {"base_model.model.0": (torch.zeros(1, 5, dtype=F64), torch.zeros(8, 1, dtype=F64))})


# --------------------------------------------------------------------------------- the splitter
LABELS = [i % 4 for i in range(400)]


def test_dirichlet_split_is_a_deterministic_partition():
    for alpha in (0.1, 1.0, None):
        split = fed.dirichlet_split(LABELS, 8, alpha, seed=3)
        assert split == fed.dirichlet_split(LABELS, 8, alpha, seed=3)
        assert split != fed.dirichlet_split(LABELS, 8, alpha, seed=4)
        assert sorted(i for part in split for i in part) == list(range(len(LABELS)))
        assert len(split) == 8 and all(part for part in split)
    even = fed.dirichlet_split(LABELS, 7, None)
    assert max(map(len, even)) - min(map(len, even)) <= 1
    # a tiny alpha puts each class on about one client; no client is left empty
    for s in range(5):
        tiny = fed.dirichlet_split([0, 1] * 20, 8, 1e-3, seed=s)
        assert all(len(part) > 0 for part in tiny) and sorted(sum(tiny, [])) == list(range(40))


def test_label_skew_grows_as_alpha_shrinks():
    def skew(alpha):
        return sum(fed.label_skew(LABELS, fed.dirichlet_split(LABELS, 8, alpha, seed=s)) for s in range(5)) / 5

    measured = [skew(a) for a in (None, 100.0, 1.0, 0.1)]
    assert measured[0] < 0.15 and measured[1] < 0.15
    assert measured[1] < measured[2] < measured[3], measured
    assert measured[3] > 0.5


def test_dirichlet_split_refuses_bad_input():
    with pytest.raises(ValueError, match="Cannot split 3 examples over 4 clients"):
        fed.dirichlet_split([0, 1, 0], 4, 1.0)
    with pytest.raises(ValueError, match="clients must be a positive integer"):
        fed.dirichlet_split(LABELS, 0, 1.0)
    with pytest.raises(ValueError, match=r"alpha must be a positive number \(or None"):
        fed.dirichlet_split(LABELS, 4, 0.0)
    with pytest.raises(ValueError, match="alpha must be a positive number"):
        fed.dirichlet_split(LABELS, 4, float("inf"))
