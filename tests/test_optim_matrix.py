"""A table-driven test matrix for ``LoFTAdamW``, in the spirit of torch's ``OptimizerInfo``.

One table of option sets (:data:`CASES`), one of parameter dtypes with their tolerances
(:data:`DTYPES`), one of devices (:data:`DEVICES`: cpu, and cuda when present) and one of bad
inputs (:data:`ERROR_INPUTS`) feed generic contract tests. The model is a few LoRA pairs of
:data:`SHAPES` (two of one shape: a batch) and a plain parameter. The slow reference
(``tests/reference.py``) is checked against the fast path over the switches it implements.
"""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from reference import ReferenceLoFT
from torch import nn

import loft
from loft.options import GROUP_DEFAULTS

SHAPES = [(6, 5, 2, 1.5), (6, 5, 2, 1.5), (4, 7, 3, -0.5)]  # (m, n, r, scaling); one negative scaling
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
#: dtype -> relative tolerance of comparisons that are not bit-exact
DTYPES = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 3e-2}


@dataclass(frozen=True)
class Case:
    """An option set of the matrix; ``reference``: the options of ``ReferenceLoFT`` that make the
    same algorithm (``None``: the reference does not implement this case)."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    reference: dict[str, Any] | None = None


OFF = {name: False for name in loft.SWITCHES}
CASES = [
    Case("default", {}, {}),
    Case("clip_wd", {"max_grad_norm": 0.05, "weight_decay": 0.1}, None),
    Case("simple", {"second_moment_calibration": False}, {"second_moment_calibration": False}),
    Case("both_move", {"alternating_updates": False}, {"alternating": False}),
    Case("no_scaling", {"gradient_scaling": False}, {"gradient_scaling": False}),
    Case("no_first_calibration", {"first_moment_calibration": False}, {"first_moment_calibration": False}),
    Case("factor_adam", {"projected_update": False, "weight_decay": 0.1},
         {"projected_update": False, "weight_decay": 0.1}),
    Case("lora_baseline", {**OFF, "max_grad_norm": 0.05}, None),
    Case("one_at_a_time", {"batch_pairs": False, "chunk_bytes": 64}, {}),
]
IDS = [case.name for case in CASES]


class Model(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float64, device: str = "cpu", seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.A, self.B = nn.ParameterList(), nn.ParameterList()
        self.base, self.target = [], []
        for m, n, r, _ in SHAPES:
            self.A.append(nn.Parameter(torch.randn(r, n, generator=g) / n**0.5))
            self.B.append(nn.Parameter(torch.randn(m, r, generator=g) * 0.3))
            self.base.append(torch.randn(m, n, generator=g).to(dtype=dtype, device=device))
            self.target.append(torch.randn(m, n, generator=g).to(dtype=dtype, device=device))
        self.head = nn.Parameter(torch.randn(3, generator=g))
        self.to(dtype=dtype, device=device)

    def pairs(self) -> list[loft.LoRAPair]:
        return [loft.LoRAPair(a, b, s, name=f"p{i}") for i, (a, b, (*_, s)) in enumerate(zip(self.A, self.B, SHAPES))]

    def loss(self) -> torch.Tensor:
        total = (self.head - 1).square().sum()
        for a, b, (*_, s), w, y in zip(self.A, self.B, SHAPES, self.base, self.target):
            total = total + (torch.tanh(w + s * b @ a) - y).square().mean()
        return total


def build(case: Case, dtype=torch.float64, device="cpu", **extra):
    model = Model(dtype, device)
    return model, loft.LoFTAdamW([*model.pairs(), model.head], lr=1e-2, **{**case.options, **extra})


def train(model: Model, opt: loft.LoFTAdamW, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad()
        model.loss().backward()
        opt.step()


def snapshot(model: Model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_step_without_gradients_changes_nothing(case, device):
    model, opt = build(case, device=device)
    before = snapshot(model)
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))
    assert opt.batch_states() == []  # no state created: state_dict() holds only the step-0 templates
    assert all(int(st["step"]) == 0 for st in opt.state_dict()["state"].values())
    train(model, opt, 2)
    state = copy.deepcopy(opt.state_dict())
    before = snapshot(model)
    opt.zero_grad()
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))
    after = opt.state_dict()["state"]
    for pid, st in state["state"].items():
        for key, value in st.items():
            assert torch.equal(torch.as_tensor(after[pid][key]), torch.as_tensor(value)), (pid, key)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_state_dict_round_trip_resumes_bit_exactly(case, dtype, device):
    model, opt = build(case, dtype, device)
    train(model, opt, 3)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model2, opt2 = build(case, dtype, device)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    # (torch's load adds a "differentiable" key of its own)
    options = [[{k: v for k, v in g.items() if k in GROUP_DEFAULTS} for g in o.param_groups] for o in (opt, opt2)]
    assert options[0] == options[1]
    train(model, opt, 3)
    train(model2, opt2, 3)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert p.dtype == dtype and torch.equal(p, q)
    assert opt.state[model.A[0]]["exp_avg"].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_add_param_group_after_steps(case, device):
    model, opt = build(case, device=device)
    extra = Model(device=device, seed=1)
    train(model, opt, 3)
    opt.add_param_group({"params": extra.pairs()[:1] + [extra.head], "lr": 5e-3})
    assert opt.param_groups[-1]["lr"] == 5e-3 and len(opt.pairs) == len(SHAPES) + 1
    before = snapshot(extra)
    for _ in range(2):
        opt.zero_grad()
        (model.loss() + extra.loss()).backward()
        opt.step()
    assert opt.state[model.A[0]]["step"] == 5 and opt.state[extra.A[0]]["step"] == 2
    assert not torch.equal(before[0], extra.A[0]) or not torch.equal(before[len(SHAPES)], extra.B[0])
    assert all(torch.isfinite(p).all() for p in [*model.parameters(), *extra.parameters()])


@pytest.mark.parametrize("case", [c for c in CASES if c.reference is not None], ids=lambda c: c.name)
def test_fast_path_matches_the_slow_reference(case):
    """float64, 16 steps, rebalancing off (the reference compares factors, not just products)."""
    model, opt = build(case, rebalance=False)
    refs = [
        ReferenceLoFT(a.detach(), b.detach(), s, lr=1e-2, **case.reference)
        for a, b, (*_, s) in zip(model.A, model.B, SHAPES)
    ]
    for t in range(16):
        grads = []
        for ref, w, y in zip(refs, model.base, model.target):
            a, b = ref.A.clone().requires_grad_(True), ref.B.clone().requires_grad_(True)
            (torch.tanh(w + ref.s * b @ a) - y).square().mean().backward()
            grads.append((a.grad, b.grad))
        train(model, opt, 1)
        for ref, g in zip(refs, grads):
            ref.step(*g)
        for i, ref in enumerate(refs):
            for got, want in ((model.A[i], ref.A), (model.B[i], ref.B)):
                err = float((got.detach() - want).norm() / want.norm())
                assert err < DTYPES[torch.float64], (case.name, t, i, err)


ERROR_INPUTS = [
    ({"lr": -1.0}, ValueError, "Invalid learning rate"),
    ({"lr": "abc"}, TypeError, "Invalid lr"),
    ({"betas": (0.9, 1.0)}, ValueError, "Invalid betas"),
    ({"betas": 0.9}, ValueError, "Invalid betas"),
    ({"eps": -1e-8}, ValueError, "Invalid eps"),
    ({"weight_decay": -0.1}, ValueError, "Invalid weight_decay"),
    ({"max_grad_norm": 0.0}, ValueError, "Invalid max_grad_norm"),
    ({"damping": -1.0}, ValueError, "Invalid damping"),
    ({"rebalance_threshold": 0.5}, ValueError, "Invalid rebalance_threshold"),
    ({"rebalance": "yes"}, TypeError, "Invalid rebalance"),
    ({"gradient_scaling": None}, TypeError, "Invalid gradient_scaling"),
    ({"head_lr": -1.0}, ValueError, "Invalid head_lr"),
    ({"chunk_bytes": 0}, ValueError, "Invalid chunk_bytes"),
    ({"nonfinite_grads": "ignore"}, ValueError, "Invalid nonfinite_grads"),
    ({"lerning_rate": 1.0}, TypeError, "unknown option 'lerning_rate'"),
]


@pytest.mark.parametrize("kwargs, error, message", ERROR_INPUTS, ids=[next(iter(k)) for k, *_ in ERROR_INPUTS])
def test_error_inputs(kwargs, error, message):
    model = Model()
    with pytest.raises(error, match=message):
        loft.LoFTAdamW([*model.pairs(), model.head], **kwargs)
    group_kwargs = {k: v for k, v in kwargs.items() if k not in ("chunk_bytes", "nonfinite_grads", "lerning_rate")}
    if group_kwargs:  # the same option given in a param group
        with pytest.raises(error, match=message):
            loft.LoFTAdamW([{"params": [*model.pairs(), model.head], **group_kwargs}])


def functional_run(case: Case, dtype: torch.dtype, steps: int) -> Model:
    """The matrix's model trained by :func:`loft.functional.loft_step` alone, one call per batch
    (same-shape pairs together, unless the case steps them one at a time), on plain stacked
    tensors: no optimizer. The head: ``torch.optim.AdamW`` on its clipped gradient. Clipping by
    the norm over every batch and the head, from the functional phases."""
    from loft.functional import clip_coefficient, loft_step, prepare_step, settle_steps, step_sq_norm
    from loft.options import GROUP_KEYS, LoFTOptions

    values = {"lr": 1e-2, **case.options}
    options = LoFTOptions(**{k: v for k, v in values.items() if k in GROUP_KEYS})
    settings = {k: v for k, v in values.items() if k == "chunk_bytes"}
    model = Model(dtype)
    head_opt = torch.optim.AdamW([model.head], lr=options.lr, betas=options.betas, eps=options.eps,
                                 weight_decay=options.weight_decay)
    by_shape: dict[Any, list[int]] = {}
    for i, (m, n, r, s) in enumerate(SHAPES):
        by_shape.setdefault((m, n, r, s) if values.get("batch_pairs", True) else i, []).append(i)
    batches = list(by_shape.values())
    states: list[Any] = [None] * len(batches)
    for _ in range(steps):
        model.zero_grad()
        model.loss().backward()
        stacks = [[torch.stack([t[i].grad if grad else t[i].detach() for i in rows])
                   for t, grad in ((model.A, False), (model.B, False), (model.A, True), (model.B, True))]
                  for rows in batches]
        coef = None
        if options.max_grad_norm is not None:
            preps = settle_steps([prepare_step(*stack, st, scaling=SHAPES[rows[0]][3], options=options, with_norm=True)
                                  for stack, st, rows in zip(stacks, states, batches)])
            total = sum(step_sq_norm(p).sum() for p in preps) + model.head.grad.double().square().sum()
            coef = clip_coefficient(total.sqrt(), options.max_grad_norm)
        for k, (stack, rows) in enumerate(zip(stacks, batches)):
            out = loft_step(*stack, states[k], scaling=SHAPES[rows[0]][3], options=options, clip_coef=coef, **settings)
            states[k] = out.state
            with torch.no_grad():
                for j, i in enumerate(rows):
                    model.A[i].copy_(out.a[j])
                    model.B[i].copy_(out.b[j])
        if coef is not None:
            model.head.grad.mul_(coef.to(model.head.dtype))
        head_opt.step()
    return model


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_functional_loft_step_alone_equals_the_optimizer(case, dtype):
    """``loft.functional.loft_step`` called alone on plain tensors takes the optimizer's steps:
    the optimizer is bookkeeping around it (gather, stack, call, write back). Bit-identical
    factors, in float64 and float32, for every option set of the matrix."""
    model, opt = build(case, dtype)
    train(model, opt, 6)
    alone = functional_run(case, dtype, 6)
    for i in range(len(SHAPES)):
        assert torch.equal(model.A[i], alone.A[i]) and torch.equal(model.B[i], alone.B[i]), (case.name, i)
