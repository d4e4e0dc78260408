"""``torch.distributed.checkpoint`` (DCP) with LoRA pairs that have one frozen factor (FFA-LoRA's
``A``, a federated client's other factor; loft/checkpoint.py), in one process, and on 2 gloo
processes under FSDP2 and DDP (the 2-rank launch of conftest.fsdp_two_ranks), float64.

torch's ``set_optimizer_state_dict`` keeps only the entries of parameters that require grad,
so the frozen factor's state travels inside its trainable partner's entry (``frozen.*`` keys,
in the step-0 templates too); ``load_state_dict`` takes it back out."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")

import torch.distributed.checkpoint as dcp  # noqa: E402
from conftest import DCP_FROZEN_SAVES, rel_err  # noqa: E402
from owner_worker import build_model, data, make_optimizer, train, trainable  # noqa: E402
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict  # noqa: E402

from loft import federated as fed  # noqa: E402
from loft.checkpoint import FROZEN, fold_frozen_sides  # noqa: E402

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
    side = 0 if frozen == "A" else 1  # param order: A0, B0, A1, B1, ...
    # state_dict() itself carries the frozen side's state in the trainable side's entry (complete_state_dict)
    assert not any(2 * k + side in saved for k in range(len(PAIRS)))
    live_entries = [saved[2 * k + 1 - side] for k in range(len(PAIRS))]
    assert all(int(e["step"]) == 3 and e[FROZEN + "exp_avg"].abs().max() > 0 for e in live_entries)
    loaded, loaded_opt, loaded_sched = _dcp_round_trip(model, opt, tmp_path / "dcp", frozen)
    loaded_sched.load_state_dict(sched.state_dict())
    _same_state(saved, loaded_opt.state_dict()["state"])
    for m, o, s in ((model, opt, sched), (loaded, loaded_opt, loaded_sched)):
        train(m, o, s, x, y, 1)
        fed.freeze_factor(m, None)
        train(m, o, s, x, y, 2)
    ta, tb = trainable(model), trainable(loaded)
    assert all(torch.equal(ta[n], tb[n]) for n in ta)


def test_a_frozen_factors_state_without_its_partners_is_refused_not_dropped():
    """Folding needs the trainable side's entry to carry the frozen side's state; a state dict
    where only the frozen side has an entry (never made by LoFT: both sides get state at the same
    step) raises, rather than saving a checkpoint that silently lost that state."""
    x, y = data()
    model = build_model()
    opt, sched = make_optimizer(model, complete_state_dict=False)  # state_dict(): each factor's own entry
    train(model, opt, sched, x, y, 1)
    fed.freeze_factor(model, "B")
    params = [p for g in opt.param_groups for p in g["params"]]
    sd = opt.state_dict()
    del sd["state"][0]  # pair "0": A (trainable) loses its entry, B (frozen) keeps its
    with pytest.raises(RuntimeError, match="frozen factor has optimizer state but its trainable factor has none"):
        fold_frozen_sides(opt.registry, sd, params)
    sd = opt.state_dict()
    fold_frozen_sides(opt.registry, sd, params)  # the intact state folds: B's entries under A's, prefixed
    assert 1 not in sd["state"] and FROZEN + "exp_avg" in sd["state"][0]


# ----------------------------------------------------------------------------- on 2 processes
def _frozen(scenario: str) -> str:
    return scenario.split(":")[1].partition("+")[2]  # "save:fsdp2+B:dcp" -> "B"


@pytest.mark.parametrize("scenario", DCP_FROZEN_SAVES)
def test_two_processes_with_a_frozen_factor_resume_bit_exactly_and_equal_one_process(fsdp_two_ranks, scenario):
    """Every pair's A (DDP) or B (FSDP2) frozen from the start: on each rank the fresh optimizer offers
    DCP only the trainable parameters, the checkpoint (DCP, per-rank shards) loads into a fresh
    model and optimizer on the same processes and continues bit-identically, and the run equals
    one process with the same factor frozen (1e-8)."""
    from owner_worker import single_process_reference

    frozen = _frozen(scenario)
    reference = single_process_reference(frozen=frozen)
    assert len(reference) == 6  # 4 trainable factors and the head's weight and bias
    for r in fsdp_two_ranks[1]:
        res = r[scenario]
        assert len(res["fresh_keys"]) == 6 and not any(f"lora_{frozen}." in k for k in res["fresh_keys"])
        assert res["continued"].keys() == res["resumed"].keys() == reference.keys()
        for name in reference:
            assert torch.equal(res["continued"][name], res["resumed"][name]), (scenario, name)
            assert rel_err(res["continued"][name], reference[name]) < 1e-8, (scenario, name)


def test_a_two_process_fsdp2_checkpoint_with_a_frozen_factor_continues_on_one_process(fsdp_two_ranks):
    """The FSDP2 ranks' DCP checkpoint (B frozen) continues on one process without FSDP (the frozen
    side's state unfolded from its partner's entry): the single-process trajectory to 1e-8."""
    from dcp_worker import resume
    from owner_worker import single_process_reference

    x, y = data()
    folder = fsdp_two_ranks[1][0]["save:fsdp2+B:dcp"]["folder"]
    resumed, reference = resume("plain+B", 1, 0, folder, x, y, full=False), single_process_reference(frozen="B")
    for name in reference:
        assert rel_err(resumed[name], reference[name]) < 1e-8, name
