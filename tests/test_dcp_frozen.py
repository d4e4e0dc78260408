"""``torch.distributed.checkpoint`` (DCP) with LoRA pairs that have one frozen factor (FFA-LoRA's
``A``, a federated client's other factor; loft/checkpoint.py), in one process, float64.

torch's ``set_optimizer_state_dict`` keeps only the entries of parameters that require grad,
so the frozen factor's state travels inside its trainable partner's entry (``frozen.*`` keys,
in the step-0 templates too); ``load_state_dict`` takes it back out."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")

import torch.distributed.checkpoint as dcp  # noqa: E402
from owner_worker import build_model, data, make_optimizer, train, trainable  # noqa: E402
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict  # noqa: E402

from loft import federated as fed  # noqa: E402
from loft.checkpoint import FROZEN  # noqa: E402

#: the pairs of owner_worker.build_model: (m, n, r)
PAIRS = {"0": (7, 6, 2), "2": (7, 7, 2), "4": (7, 7, 2), "6": (5, 7, 1)}


def _dcp_round_trip(model, opt, folder, frozen):
    """Save ``opt`` through get_optimizer_state_dict + dcp.save, load it into a fresh model (the same
    weights and factor frozen) and optimizer through dcp.load + set_optimizer_state_dict."""
    dcp.save({"optimizer": get_optimizer_state_dict(model, opt)}, checkpoint_id=str(folder))
    fresh = build_model()
    fresh.load_state_dict(model.state_dict())
    fed.freeze_factor(fresh, frozen)
    fresh_opt, fresh_sched = make_optimizer(fresh)
    state = {"optimizer": get_optimizer_state_dict(fresh, fresh_opt)}
    dcp.load(state, checkpoint_id=str(folder))
    set_optimizer_state_dict(fresh, fresh_opt, state["optimizer"])
    return fresh, fresh_opt, fresh_sched


def _same_state(a, b):
    assert a.keys() == b.keys()
    for i in a:
        assert a[i].keys() == b[i].keys(), i
        for key, value in a[i].items():
            assert torch.equal(value, b[i][key]) if isinstance(value, torch.Tensor) else value == b[i][key], (i, key)


@pytest.mark.parametrize("frozen", ["A", "B"])
def test_templates_of_a_pair_with_a_frozen_factor_before_its_first_step(frozen, tmp_path):
    """Before any step the trainable factor's template (step 0) also holds its frozen partner's
    zeros of the right shapes; saving and loading the templates leaves a fresh optimizer, which
    then trains exactly as one never loaded."""
    x, y = data()
    model = build_model()
    fed.freeze_factor(model, frozen)
    opt, sched = make_optimizer(model)
    template = get_optimizer_state_dict(model, opt)["state"]
    live = "B" if frozen == "A" else "A"
    for layer, (m, n, r) in PAIRS.items():
        assert f"base_model.model.{layer}.lora_{frozen}.default.weight" not in template
        entry = template[f"base_model.model.{layer}.lora_{live}.default.weight"]
        size = r * (r + 1) // 2
        k, l = (m, n) if live == "B" else (n, m)  # the trainable side's; the frozen side's are swapped
        shapes = {key: tuple(v.shape) for key, v in entry.items() if key != "step"}
        assert shapes == {"exp_avg": (r, k), "exp_avg_sq": (k, size), "partner": (l, r),
                          FROZEN + "exp_avg": (r, l), FROZEN + "exp_avg_sq": (l, size), FROZEN + "partner": (k, r)}
        assert entry["step"] == 0 and all(not v.any() for key, v in entry.items() if key != "step")
    loaded, loaded_opt, loaded_sched = _dcp_round_trip(model, opt, tmp_path / "dcp", frozen)
    assert loaded_opt.batch_states() == []
    train(model, opt, sched, x, y, 3)
    train(loaded, loaded_opt, loaded_sched, x, y, 3)
    ta, tb = trainable(model), trainable(loaded)
    assert all(torch.equal(ta[n], tb[n]) for n in ta)


@pytest.mark.parametrize("frozen", ["A", "B"])
def test_dcp_keeps_a_frozen_factors_state_and_resumes_bit_exactly(frozen, tmp_path):
    """Both factors train 2 steps, then one is frozen for a step (its moments decay, nonzero), the
    optimizer goes through DCP into a fresh one: every entry (the frozen side's too) comes back
    equal, and the two continue bit-identically, one more step frozen, then 2 with both factors
    training again (where the frozen side's moments are used)."""
    x, y = data()
    model = build_model()
    opt, sched = make_optimizer(model)
    train(model, opt, sched, x, y, 2)
    fed.freeze_factor(model, frozen)
    opt.zero_grad(set_to_none=True)
    train(model, opt, sched, x, y, 1)
    saved = opt.state_dict()["state"]
    side = 0 if frozen == "A" else 1
    frozen_entries = [saved[2 * k + side] for k in range(len(PAIRS))]  # param order: A0, B0, A1, B1, ...
    assert all(int(e["step"]) == 3 and e["exp_avg"].abs().max() > 0 for e in frozen_entries)
    assert not any(key.startswith(FROZEN) for e in saved.values() for key in e)  # state_dict() itself: unchanged
    loaded, loaded_opt, loaded_sched = _dcp_round_trip(model, opt, tmp_path / "dcp", frozen)
    loaded_sched.load_state_dict(sched.state_dict())
    _same_state(saved, loaded_opt.state_dict()["state"])
    for m, o, s in ((model, opt, sched), (loaded, loaded_opt, loaded_sched)):
        train(m, o, s, x, y, 1)
        fed.freeze_factor(m, None)
        train(m, o, s, x, y, 2)
    ta, tb = trainable(model), trainable(loaded)
    assert all(torch.equal(ta[n], tb[n]) for n in ta)
