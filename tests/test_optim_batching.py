"""Pairs of one shape processed together (``batch_pairs=True``, the default) against one pair at a
time (``batch_pairs=False``), in float64: the same trajectories up to rounding.

Tolerance: batched and 2-D GEMMs round differently, and the full second moment ``V`` is a GEMM
with cancellation whose ``sqrt(V) + eps`` amplifies that rounding where ``V`` is small: without
gradient scaling the two paths differ by up to ~5e-12 after one step and ~1e-11 after 30
(measured); with the default switches by ~1e-13.
"""

from __future__ import annotations

import copy
import io
import itertools

import pytest
import torch
from torch import nn

import loft
from loft import linalg
from loft.linalg import DampedGram

STEPS = 30
# (m, n, r, scaling) of the pairs: three of one shape, two of another, one alone, and one of the
# first shape with another scaling (a batch of its own)
SHAPES = [(8, 6, 3, 2.0)] * 3 + [(5, 9, 2, 2.0)] * 2 + [(7, 4, 4, 2.0), (8, 6, 3, 0.5)]


class Pairs(nn.Module):
    """Factors ``A_i``, ``B_i`` of several LoRA pairs and a plain bias, with a smooth loss
    ``sum_i mean(tanh(s_i B_i A_i + W_i) - Y_i)^2 + bias^2``."""

    def __init__(self, shapes=SHAPES, seed: int = 0, random_b: bool = True, dtype=torch.float64) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.A = nn.ParameterList()
        self.B = nn.ParameterList()
        self.scalings = [s for *_, s in shapes]
        self.base, self.target = [], []
        for m, n, r, _ in shapes:
            self.A.append(nn.Parameter((torch.randn(r, n, generator=g) / n**0.5).to(dtype)))
            b = torch.randn(m, r, generator=g) * 0.3 if random_b else torch.zeros(m, r)
            self.B.append(nn.Parameter(b.to(dtype)))
            self.base.append(torch.randn(m, n, generator=g).to(dtype))
            self.target.append(torch.randn(m, n, generator=g).to(dtype))
        self.bias = nn.Parameter(torch.randn(3, generator=g).to(dtype))

    def pairs(self) -> list[loft.LoRAPair]:
        return [
            loft.LoRAPair(a, b, s, name=f"pair{i}") for i, (a, b, s) in enumerate(zip(self.A, self.B, self.scalings))
        ]

    def loss(self) -> torch.Tensor:
        total = self.bias.square().sum()
        for a, b, s, w, y in zip(self.A, self.B, self.scalings, self.base, self.target):
            total = total + (torch.tanh(w + s * b @ a) - y).square().mean()
        return total


def make(batch_pairs: bool, model_kwargs=None, groups=None, **options):
    model = Pairs(**(model_kwargs or {}))
    params = groups(model) if groups else [*model.pairs(), model.bias]
    return model, loft.LoFTAdamW(params, batch_pairs=batch_pairs, **options)


def run(model, opt, steps: int, *, without_grad=lambda step: ()) -> list[torch.Tensor]:
    """``steps`` steps; ``without_grad(step)``: the pair indices whose gradients are dropped
    (``"A"``/``"B"`` suffix: only that factor's)."""
    for step in range(steps):
        opt.zero_grad()
        model.loss().backward()
        for which in without_grad(step):
            i, side = (int(which[:-1]), which[-1]) if isinstance(which, str) else (which, "AB")
            if "A" in side:
                model.A[i].grad = None
            if "B" in side:
                model.B[i].grad = None
        opt.step()
    return [t.detach().clone() for t in model.parameters()]


TOL = 5e-11


def assert_same(model1, opt1, model2, opt2, tol: float = TOL) -> None:
    for p1, p2 in zip(model1.parameters(), model2.parameters()):
        p1, p2 = p1.detach(), p2.detach()
        assert float((p1 - p2).norm()) <= tol * max(1.0, float(p2.norm())), "parameters differ"
    for p1, p2 in zip(model1.parameters(), model2.parameters()):
        st1, st2 = opt1.state[p1], opt2.state[p2]
        assert st1.keys() == st2.keys()
        for key, value in st2.items():
            if torch.is_tensor(value) and value.dim() > 0:
                assert float((st1[key] - value).norm()) <= tol * max(1.0, float(value.norm())), key
            else:
                assert st1[key] == value, key


def both(model_kwargs=None, groups=None, steps=STEPS, without_grad=lambda step: (), **options):
    results = []
    for batch_pairs in (True, False):
        model, opt = make(batch_pairs, model_kwargs, groups, **options)
        run(model, opt, steps, without_grad=without_grad)
        results += [model, opt]
    return results


def batch_sizes(opt) -> list[int]:
    return sorted(len(batch.pairs) for batch in opt.batch_states())


def test_batches_are_formed_by_shape_group_step_and_scaling():
    model, opt = make(True, lr=1e-2)
    run(model, opt, 1)
    assert batch_sizes(opt) == [1, 1, 2, 3]
    model, opt = make(False, lr=1e-2)
    run(model, opt, 1)
    assert batch_sizes(opt) == [1] * len(SHAPES)


@pytest.mark.parametrize("flags", list(itertools.product([True, False], repeat=len(loft.SWITCHES))))
def test_every_switch_combination_with_clipping_and_weight_decay(flags):
    switches = dict(zip(loft.SWITCHES, flags))
    model1, opt1, model2, opt2 = both(lr=2e-2, weight_decay=0.1, max_grad_norm=0.3, **switches)
    assert opt1.last_grad_norm is not None
    assert abs(float(opt1.last_grad_norm) - float(opt2.last_grad_norm)) <= TOL * float(opt2.last_grad_norm)
    assert_same(model1, opt1, model2, opt2)


def test_default_options_without_clipping_and_a_zero_b_start():
    model1, opt1, model2, opt2 = both(model_kwargs={"random_b": False}, lr=2e-2)
    assert_same(model1, opt1, model2, opt2)
    assert all(float(b.abs().max()) > 0 for b in model1.B)  # the B = 0 start really moved


def test_param_groups_with_different_options_are_not_batched_together():
    def groups(model):
        pairs = model.pairs()
        return [
            {"params": pairs[:2], "lr": 1e-2},
            {"params": pairs[2:], "lr": 3e-2, "weight_decay": 0.2, "second_moment_calibration": False},
            {"params": [model.bias], "lr": 1e-3},
        ]

    model1, opt1, model2, opt2 = both(groups=groups, max_grad_norm=0.5)
    assert_same(model1, opt1, model2, opt2)
    assert batch_sizes(opt1) == [1, 1, 1, 2, 2]


def test_pairs_without_gradients_leave_and_rejoin_their_batch():
    def without_grad(step):
        if step in (3, 4, 9):
            return [1]  # pair 1 skips: it falls out of step with pairs 0 and 2
        if step == 6:
            return ["0A", "2B", 3]  # only one factor's gradient for some pairs
        if step in (12, 13, 14):
            return [0, 2]  # pairs 0 and 2 skip three times too: back in step with pair 1
        return []

    model1, opt1, model2, opt2 = both(lr=2e-2, max_grad_norm=0.5, without_grad=without_grad)
    assert_same(model1, opt1, model2, opt2)
    steps = [opt1.state[model1.A[i]]["step"] for i in range(3)]
    assert steps == [STEPS - 3, STEPS - 3, STEPS - 3]
    # pairs 0-2 together again; pair 3 (skipped once) is now out of step with pair 4; every pair's
    # state is held by exactly one batch (a pair that left a batch took its rows along)
    batches = opt1.batch_states()
    assert sorted(len(b.pairs) for b in batches) == [1, 1, 1, 1, 3]
    held = [pair.A for b in batches for pair in b.pairs]
    assert len(held) == len(SHAPES) and {id(t) for t in held} == {id(a) for a in model1.A}
    (three,) = [b for b in batches if len(b.pairs) == 3]
    assert [pair.A for pair in three.pairs] == [model1.A[0], model1.A[1], model1.A[2]]
    assert all(b.sides[0].exp_avg.shape[0] == len(b.pairs) for b in batches)


def test_state_shows_per_parameter_and_batches_keep_their_stacks():
    model, opt = make(True, lr=2e-2)
    run(model, opt, 3)
    (batch,) = [b for b in opt.batch_states() if len(b.pairs) == 3]
    stack = batch.sides[0].exp_avg_sq
    assert stack.shape == (3, 6, 6)
    a0 = opt.state[model.A[0]]["exp_avg_sq"]
    assert a0.shape == (6, 6) and torch.equal(a0, stack[0])
    assert opt.state_dict()["state"][0]["exp_avg_sq"].shape == (6, 6)
    run(model, opt, 2)
    (again,) = [b for b in opt.batch_states() if len(b.pairs) == 3]
    assert again is batch and again.sides[0].exp_avg_sq is stack  # not regrouped, not copied
    assert batch.step == 5 and opt.state[model.A[0]]["step"] == 5


def test_state_dict_round_trip_and_resume_are_bit_exact():
    model, opt = make(True, lr=2e-2, max_grad_norm=0.5)
    run(model, opt, 5)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model2, opt2 = make(True, lr=2e-2, max_grad_norm=0.5)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    run(model, opt, 6)
    run(model2, opt2, 6)
    for p1, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p1, p2)


def test_a_per_pair_checkpoint_with_strided_state_loads_into_batches():
    """Checkpoints of the per-pair step held B's state transposed in memory; they still load."""
    model, opt = make(False, lr=2e-2)
    run(model, opt, 5)
    state = copy.deepcopy(opt.state_dict())  # (torch shares the plain parameters' step tensors)
    for st in state["state"].values():
        if "partner" in st:
            for key in ("exp_avg", "partner"):
                st[key] = st[key].T.contiguous().T  # same values, other strides
    model2, opt2 = make(True, lr=2e-2)
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(state)
    run(model, opt, 6)
    run(model2, opt2, 6)
    assert_same(model2, opt2, model, opt)


def test_damped_gram_falls_back_per_matrix_in_a_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, 3, generator=g, dtype=torch.float64)
    x[1, :, 2] = x[1, :, 0]
    x[3] = 0  # all-zero gram: lam = tiny
    grams = x.mT @ x
    grams[1, 2, 2] *= 1 - 1e-6  # slightly indefinite: Cholesky fails
    rhs = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    batched = DampedGram.of(grams, 0.0)
    assert batched.eig is not None and batched.eig[0].tolist() == [False, True, False, False]
    out = batched.solve(rhs)
    for i in range(4):
        single = DampedGram.of(grams[i], 0.0)
        assert (single.eig is not None) == (i == 1)
        assert torch.allclose(out[i], single.solve(rhs[i]), rtol=1e-12, atol=1e-300)
    sub = batched.select(torch.tensor([3, 1]))
    assert torch.allclose(sub.solve(rhs[[3, 1]]), out[[3, 1]], rtol=1e-12, atol=1e-300)


def test_damped_gram_of_a_nonfinite_matrix_solves_to_nonfinite_without_raising():
    """Diverged factors give inf / nan grams; eigh would raise on them (LinAlgError), so they
    stay out of the fallback and only their own solves are non-finite."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, 3, generator=g, dtype=torch.float64)
    x[2, :, 2] = x[2, :, 0]  # exactly singular: the fallback still serves this one
    grams = x.mT @ x
    grams[0, 1, 1] = float("nan")
    grams[1, 0, 0] = float("inf")
    rhs = torch.randn(3, 3, 2, generator=g, dtype=torch.float64)
    out = DampedGram.of(grams, 0.0).solve(rhs)
    assert not out[0].isfinite().any() and not out[1].isfinite().all()
    assert torch.allclose(out[2], DampedGram.of(grams[2], 0.0).solve(rhs[2]), rtol=1e-12, atol=1e-300)


def test_eigh_fallback_inside_a_batch(monkeypatch):
    """One pair of a batch has two equal columns of B (exactly representable: its gram has an
    exactly zero pivot without damping) and falls back to the eigen pseudo-solve while the other
    pairs of the batch keep Cholesky."""
    calls = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda m: calls.append(m.shape) or eigh(m))

    def singular(model):
        with torch.no_grad():
            model.B[1].zero_()
            model.B[1][0, 0] = model.B[1][0, 2] = model.B[1][1, 1] = 1.0
        return [*model.pairs(), model.bias]

    options = {"damping": 0.0, "rebalance": False, "alternating_updates": False, "first_moment_calibration": False}
    results = []
    for batch_pairs in (True, False):
        model = Pairs()
        opt = loft.LoFTAdamW(singular(model), lr=2e-2, batch_pairs=batch_pairs, **options)
        n = len(calls)
        run(model, opt, 1)
        results += [model, opt, calls[n:]]
    model1, opt1, calls1, model2, opt2, calls2 = results
    assert calls1 and all(shape[0] == 1 for shape in calls1)  # only the failing matrix, in the batch of 3
    assert len(calls1) == len(calls2)
    assert_same(model1, opt1, model2, opt2)


def test_rebalancing_only_the_pairs_that_need_it_inside_a_batch(monkeypatch):
    seen = []
    original = linalg.rebalanced_factors_all

    def spy(pairs, thresholds):
        outs = original(pairs, thresholds)
        seen.extend(out[2].tolist() for (u, _), out in zip(pairs, outs) if u.shape[0] == 3 and out is not None)
        return outs

    monkeypatch.setattr("loft.functional.rebalanced_factors_all", spy)

    def unbalance(model):
        with torch.no_grad():  # same product, badly conditioned factors for pair 1 only
            d = torch.tensor([1.0, 30.0, 0.05], dtype=torch.float64)
            model.A[1].mul_(d[:, None])
            model.B[1].div_(d)
        return [*model.pairs(), model.bias]

    model1, opt1, model2, opt2 = both(groups=unbalance, lr=2e-2)
    assert [False, True, False] in seen
    assert_same(model1, opt1, model2, opt2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_low_precision_parameters_keep_float32_state_in_batches(dtype):
    model1, opt1, model2, _ = both(model_kwargs={"dtype": dtype}, steps=6, lr=1e-2)
    for p in model1.A:
        assert opt1.state[p]["exp_avg_sq"].dtype == torch.float32
    for p1, p2 in zip(model1.parameters(), model2.parameters()):
        assert p1.dtype == dtype
        assert torch.allclose(p1.float(), p2.float(), rtol=2e-2, atol=1e-3)


def test_nonfinite_gradient_in_a_batch_skips_the_whole_step():
    model, opt = make(True, lr=2e-2)
    run(model, opt, 2)
    before = [t.detach().clone() for t in model.parameters()]
    state = {k: v.clone() for k, v in opt.state[model.A[0]].items() if torch.is_tensor(v)}
    opt.zero_grad()
    model.loss().backward()
    model.A[1].grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.equal(v, opt.state[model.A[0]][k]) for k, v in state.items())
