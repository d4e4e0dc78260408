"""One option surface: every numerical option is a param-group key, engineering settings are one
typed object, switches can change between steps, and ``grad_norm()`` and ``step()`` share one
preparation."""

from __future__ import annotations

import copy

import pytest
import torch
from test_optim_batching import Pairs, run

import loft
from loft import functional
from loft.options import GROUP_DEFAULTS, Settings


def make(**options):
    model = Pairs()
    return model, loft.LoFTAdamW([*model.pairs(), model.bias], **options)


def test_every_numerical_option_is_a_param_group_key_and_engineering_settings_are_one_object():
    model, opt = make(lr=2e-2, damping=1e-7, rebalance_threshold=20.0, max_grad_norm=0.5, chunk_bytes=4096)
    for group in opt.param_groups:
        assert group.keys() - {"params"} == GROUP_DEFAULTS.keys()
    assert opt.param_groups[0]["damping"] == 1e-7 and opt.param_groups[0]["rebalance_threshold"] == 20.0
    assert opt.settings == Settings(chunk_bytes=4096, batch_pairs=True, nonfinite_grads="skip")
    with pytest.raises(AttributeError):
        opt.settings.chunk_bytes = 1  # frozen: one place, set at construction


def test_group_rebalance_threshold_reaches_the_rebalancing(monkeypatch):
    seen = []
    original = functional.rebalanced_factors_all
    spy = lambda pairs, thresholds: seen.extend(thresholds) or original(pairs, thresholds)  # noqa: E731
    monkeypatch.setattr(functional, "rebalanced_factors_all", spy)
    # the cheap test that decides whether the QR / SVD check runs gets the threshold too
    cheap = functional.may_need_rebalancing
    monkeypatch.setattr(functional, "may_need_rebalancing", lambda g, threshold, eps: seen.append(threshold) or cheap(g, threshold, eps))
    model = Pairs()
    pairs = model.pairs()
    opt = loft.LoFTAdamW([{"params": pairs[:3]}, {"params": pairs[3:], "rebalance_threshold": 50.0}], lr=1e-2)
    run(model, opt, 1)
    assert sorted(set(seen)) == [10.0, 50.0]


def test_groups_with_different_max_grad_norm_are_refused():
    model = Pairs()
    pairs = model.pairs()
    with pytest.raises(ValueError, match=r"different max_grad_norm"):
        loft.LoFTAdamW([{"params": pairs[:3]}, {"params": pairs[3:], "max_grad_norm": 1.0}], max_grad_norm=0.5)
    opt = loft.LoFTAdamW([{"params": pairs[:3]}, {"params": pairs[3:]}], max_grad_norm=0.5)
    opt.param_groups[1]["max_grad_norm"] = 2.0
    model.loss().backward()
    with pytest.raises(ValueError, match=r"different max_grad_norm"):
        opt.step()


def test_switching_second_moment_calibration_off_keeps_the_grams_diagonals():
    """Full grams -> diagonal is exact: continuing equals loading the diagonals into "LoFT (simple)"."""
    model, opt = make(lr=2e-2)
    run(model, opt, 4)
    twin = copy.deepcopy(model)
    saved = copy.deepcopy(opt.state_dict())
    for pid, st in saved["state"].items():
        if "partner" in st:
            r = st["partner"].shape[1]
            rows, cols = torch.triu_indices(r, r)
            st["exp_avg_sq"] = st["exp_avg_sq"][:, rows == cols].contiguous()
    for group in saved["param_groups"]:
        group["second_moment_calibration"] = False
    for group in opt.param_groups:
        group["second_moment_calibration"] = False
    run(model, opt, 3)  # used to crash with a shape error
    twin_opt = loft.LoFTAdamW([*twin.pairs(), twin.bias], lr=2e-2, second_moment_calibration=False)
    twin_opt.load_state_dict(saved)
    run(twin, twin_opt, 3)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    assert opt.state[model.A[0]]["exp_avg_sq"].shape == (6, 3)


def test_switching_second_moment_calibration_on_starts_from_diagonal_grams():
    model, opt = make(lr=2e-2, second_moment_calibration=False)
    run(model, opt, 4)
    v = opt.state[model.A[0]]["exp_avg_sq"].clone()  # (6, 3): Adam's v, transposed
    for group in opt.param_groups:
        group["second_moment_calibration"] = True
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = model.loss()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    grams = opt.state[model.A[0]]["exp_avg_sq"]
    assert grams.shape == (6, 6) and torch.isfinite(grams).all()
    assert losses[-1] < losses[0]
    assert v.abs().min() > 0


def test_other_switches_can_change_between_steps():
    model, opt = make(lr=2e-2, max_grad_norm=0.5)
    run(model, opt, 3)
    for name in loft.SWITCHES:
        for group in opt.param_groups:
            group[name] = not group[name]
        run(model, opt, 2)
        for group in opt.param_groups:
            group[name] = not group[name]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_grad_norm_and_step_share_one_preparation(monkeypatch):
    calls = []
    original = loft.optim.prepare_step
    monkeypatch.setattr(loft.optim, "prepare_step", lambda *a, **k: calls.append(1) or original(*a, **k))
    model, opt = make(lr=2e-2)
    model_ref, opt_ref = make(lr=2e-2, max_grad_norm=0.05)
    for step in range(4):
        for o, m in ((opt, model), (opt_ref, model_ref)):
            o.zero_grad()
            m.loss().backward()
        calls.clear()
        norm = loft.clip_grad_norm_(opt, 0.05)
        assert norm > 0.05  # the gradients really were scaled
        opt.step()
        assert len(calls) == 4  # four batches, each prepared once for both the norm and the step
        opt_ref.step()
        assert float(opt_ref.last_grad_norm) == pytest.approx(float(norm), rel=1e-6)  # grad_norm() is float32
    for p, q in zip(model.parameters(), model_ref.parameters()):
        assert torch.allclose(p, q, rtol=1e-6, atol=1e-9)  # the outside coefficient is float32, as before


def test_a_gradient_changed_after_grad_norm_is_seen_by_step():
    model, opt = make(lr=2e-2)
    model_ref, opt_ref = make(lr=2e-2)
    for o, m in ((opt, model), (opt_ref, model_ref)):
        run(m, o, 2)
        o.zero_grad()
        m.loss().backward()
    opt.grad_norm()
    model.A[0].grad.mul_(3.0)  # in place, behind the optimizer's back
    model.B[4].grad = model.B[4].grad * 0.5  # replaced
    model_ref.A[0].grad.mul_(3.0)
    model_ref.B[4].grad = model_ref.B[4].grad * 0.5
    opt.step()
    opt_ref.step()
    for p, q in zip(model.parameters(), model_ref.parameters()):
        assert torch.equal(p, q)


def test_the_constructor_takes_exactly_the_options_of_the_dataclass():
    """LoFTOptions defines every option once: the signature lists its fields, in order, with its
    defaults; the docstring carries each field's text; the group keys and settings come from it."""
    import dataclasses
    import inspect

    from loft.options import GROUP_KEYS, SETTING_KEYS, LoFTOptions

    sig = inspect.signature(loft.LoFTAdamW.__init__).parameters
    names = [p for p in sig if p not in ("self", "params", "unknown")]
    fields = dataclasses.fields(LoFTOptions)
    assert names == [f.name for f in fields]
    assert [sig[f.name].default for f in fields] == [f.default for f in fields]
    doc = " ".join(loft.LoFTAdamW.__doc__.split())
    assert all(" ".join(f.metadata["doc"].split()) in doc for f in fields)
    assert set(GROUP_KEYS) | set(SETTING_KEYS) == set(names) and not set(GROUP_KEYS) & set(SETTING_KEYS)
    model, opt = make()
    assert set(opt.param_groups[0]) - {"params"} == set(GROUP_KEYS)
    assert set(dataclasses.asdict(opt.settings)) == set(SETTING_KEYS)


#: a different valid value for each param-group option
CHANGED = {"lr": 3e-2, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1, "max_grad_norm": 7.0,
           "rebalance_threshold": 20.0, "damping": 1e-5, "head_lr": 1e-3, "head_weight_decay": 0.01}


def test_changing_any_group_option_between_grad_norm_and_step_prepares_again(monkeypatch):
    """The preparation kept from grad_norm() for step() is keyed on every group option, so an
    option added later cannot leave it stale: each is changed in turn and the step prepares again."""
    from loft.options import GROUP_KEYS

    calls = []
    original = loft.optim.prepare_step
    monkeypatch.setattr(loft.optim, "prepare_step", lambda *a, **k: calls.append(1) or original(*a, **k))
    for key in GROUP_KEYS:
        model, opt = make(lr=2e-2)
        model.loss().backward()
        opt.grad_norm()
        prepared = len(calls)
        group = opt.param_groups[0]
        group[key] = CHANGED[key] if key in CHANGED else not group[key]
        opt.step()
        assert len(calls) > prepared, key
