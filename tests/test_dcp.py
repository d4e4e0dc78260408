"""LoFT's optimizer state through ``torch.distributed.checkpoint`` (DCP) and torch's
``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` (what Accelerate's and Trainer's FSDP2
checkpoints call), on 2 gloo CPU processes, float64; resumed on 2, on 4 and on 1 process."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import DCP_SAVES, rel_err

pytest.importorskip("peft")

#: every trainable parameter: 4 pairs x 2 factors, the head's weight and bias
NAMES = 10


SAVES = DCP_SAVES


@pytest.fixture(scope="module")
def two(fsdp_two_ranks):
    """Two ranks (one launch shared with tests/test_owners.py: conftest.fsdp_two_ranks)."""
    return fsdp_two_ranks[1]


@pytest.fixture(scope="module")
def reference():
    from owner_worker import single_process_reference

    return single_process_reference()


def assert_close(params, reference, tol=1e-8):
    assert params.keys() == reference.keys()
    for name in reference:
        assert rel_err(params[name], reference[name]) < tol, (name, rel_err(params[name], reference[name]))


@pytest.mark.parametrize("scenario", SAVES)
def test_resume_on_the_same_processes_is_bit_exact(two, scenario):
    """A fresh model and optimizer loaded through set_optimizer_state_dict (from DCP, or from a full
    state dict broadcast by rank 0) continue exactly as the uninterrupted run."""
    for r in two:
        continued, resumed = r[scenario]["continued"], r[scenario]["resumed"]
        assert continued.keys() == resumed.keys()
        for name in continued:
            assert torch.equal(continued[name], resumed[name]), (scenario, name)


@pytest.mark.parametrize("scenario", SAVES)
def test_the_run_equals_one_process(two, scenario, reference):
    for r in two:
        assert_close(r[scenario]["continued"], reference)


def test_a_fresh_optimizer_offers_every_parameter_to_dcp(two):
    """get_optimizer_state_dict of a fresh LoFTAdamW names every trainable parameter (zeros at step 0),
    so that DCP has something to load into; without that the load would silently restore nothing."""
    for r in two:
        for scenario in SAVES:
            keys = r[scenario]["fresh_keys"]
            assert len(keys) == NAMES and any(k.endswith("lora_A.default.weight") for k in keys), keys


def test_step_zero_entries_are_the_fresh_state():
    """Loading a fresh optimizer's templates changes nothing: the run equals one never loaded. torch's
    get / set_optimizer_state_dict on a fresh LoFTAdamW take no step of their own (torch fills an empty
    optimizer.state by a step with zero gradients and lr 0, which would move LoFT's state and may
    rebalance the factors; LoFT's optimizer.state is never empty): the parameters stay bit-identical,
    no gradient is created, no pair state appears and the learning rates are kept."""
    from owner_worker import build_model, data, make_optimizer, train, trainable
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    x, y = data()
    runs = []
    for load in (False, True):
        model = build_model()
        opt, sched = make_optimizer(model)
        if load:
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            lrs = [g["lr"] for g in opt.param_groups]
            template = get_optimizer_state_dict(model, opt)
            assert all(int(st["step"]) == 0 for st in template["state"].values()) and len(template["state"]) == NAMES
            set_optimizer_state_dict(model, opt, template)
            assert opt.batch_states() == []  # no pair state installed (the head gets AdamW's zeros at step 0)
            assert all(p.grad is None for p in model.parameters())
            assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
            assert [g["lr"] for g in opt.param_groups] == lrs
        train(model, opt, sched, x, y, 3)
        runs.append(trainable(model))
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), name


def test_two_process_checkpoints_continue_on_one_process(two, reference):
    """DCP (read without a process group) and the full state dict, both written on 2 FSDP2 ranks,
    continue on one process without FSDP: the single-process trajectory to 1e-8."""
    from dcp_worker import resume
    from owner_worker import data

    x, y = data()
    for scenario in ("save:fsdp2:dcp", "save:fsdp2:full"):
        folder = two[0][scenario]["folder"]
        assert_close(resume("plain", 1, 0, folder, x, y, full=scenario.endswith("full")), reference)


def test_two_process_dcp_checkpoint_continues_on_four(fsdp_four_ranks, reference):
    """DCP and the full state dict, written on 2 FSDP2 ranks, continue on 4 (conftest.fsdp_four_ranks)."""
    four = fsdp_four_ranks[1]
    assert all(len(r) == 2 for r in four)
    for r in four:
        for res in r.values():
            assert_close(res["resumed"], reference)


def test_accelerate_fsdp2_plugin_with_the_optimizer_built_before_prepare(two, reference):
    """Accelerate's FSDP2 preparation (fully_shard, then the optimizer's parameters swapped for the
    shards by position): LoFTAdamW follows the swap, steps the shards with owners, equals one
    process to 1e-8; Accelerate's save_fsdp_optimizer / load_fsdp_optimizer (DCP) resume bit-exactly."""
    for r in two:
        res = r["accelerate"]
        assert res["distributor"] == "FSDP2Owners" and res["dtensors"]
        assert_close(res["params"], reference)
        for name in res["params"]:
            assert torch.equal(res["params"][name], res["resumed"][name]), name


def test_a_swap_that_changes_shapes_is_refused():
    """A wrapper that replaces the parameters by flat partitions (DeepSpeed ZeRO-1/2 style) is refused
    at the next use, naming FSDP2."""
    from owner_worker import build_model

    import loft

    model = build_model()
    opt = loft.LoFTAdamW(model, lr=1e-2)
    group = opt.param_groups[0]
    group["params"][0] = torch.zeros(group["params"][0].numel(), dtype=torch.float64, requires_grad=True)
    with pytest.raises(loft.UnsupportedDistributedSetup, match="FSDP2"):
        opt.step()


def _by_name(model, opt, state):
    """``state_dict()["state"]`` keyed by parameter name, as torch's get_optimizer_state_dict keys it."""
    params = [p for g in opt.param_groups for p in g["params"]]
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(params[i])]: entry for i, entry in state.items()}


def _assert_same_entries(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        for key, value in a[name].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b[name][key])), (name, key)


@pytest.mark.parametrize("frozen", [None, "A", "B"])
def test_state_dict_is_the_same_whoever_calls_it(frozen):
    """optimizer.state_dict() and torch's get_optimizer_state_dict hold the same entries (the latter
    keyed by name), before the first step (step-0 templates for every trainable parameter) and after
    steps with a factor of every pair frozen (its state inside its partner's entry): LoFT does not
    look at who calls it (complete_state_dict, the default)."""
    from owner_worker import build_model, data, make_optimizer, train
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from loft import federated
    from loft.checkpoint import FROZEN

    x, y = data()
    model = build_model()
    opt, sched = make_optimizer(model)
    for steps in (0, 2):
        train(model, opt, sched, x, y, steps)
        if steps and frozen:
            federated.freeze_factor(model, frozen)
            train(model, opt, sched, x, y, 1)
        plain = opt.state_dict()["state"]
        torch_api = get_optimizer_state_dict(model, opt)["state"]
        _assert_same_entries(_by_name(model, opt, plain), torch_api)
        trainable = sum(p.requires_grad for p in model.parameters())
        assert len(plain) == trainable == (NAMES if not (steps and frozen) else NAMES - 4)
        assert all(int(st["step"]) == (0 if not steps else 3 if frozen else 2) for st in plain.values())
        assert any(k.startswith(FROZEN) for st in plain.values() for k in st) == bool(steps and frozen)


def test_complete_state_dict_false_keeps_each_factors_own_entry_and_loads_either_way():
    """complete_state_dict=False: state_dict() holds only parameters with state, a frozen factor under
    its own entry (empty before the first step, so a fresh optimizer offers DCP nothing to load into,
    as documented). Either form loads into either kind of optimizer and continues bit-identically."""
    from owner_worker import build_model, data, make_optimizer, train, trainable
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from loft import federated

    x, y = data()
    fresh_model = build_model()
    fresh, _ = make_optimizer(fresh_model, complete_state_dict=False)
    assert fresh.state_dict()["state"] == {} and get_optimizer_state_dict(fresh_model, fresh)["state"] == {}
    models, opts, scheds = [], [], []
    for complete in (True, False):
        model = build_model()
        opt, sched = make_optimizer(model, complete_state_dict=complete)
        train(model, opt, sched, x, y, 2)
        federated.freeze_factor(model, "B")
        train(model, opt, sched, x, y, 1)
        models.append(model), opts.append(opt), scheds.append(sched)
    minimal = opts[1].state_dict()
    assert len(minimal["state"]) == NAMES  # the frozen Bs keep their own entries
    assert sorted(_by_name(models[1], opts[1], minimal["state"])) == sorted(
        n for n, p in models[1].named_parameters() if "lora_" in n or "modules_to_save" in n)
    finals = []
    for source, target in ((0, 1), (1, 0)):  # the complete form into a minimal optimizer, and back
        model = build_model()
        model.load_state_dict(models[source].state_dict())
        federated.freeze_factor(model, "B")
        opt, sched = make_optimizer(model, complete_state_dict=bool(source))
        opt.load_state_dict(copy.deepcopy(opts[source].state_dict()))  # (torch's load shares the head's tensors)
        sched.load_state_dict(scheds[source].state_dict())
        train(model, opt, sched, x, y, 2)
        finals.append(trainable(model))
    for model, opt, sched in zip(models, opts, scheds):
        train(model, opt, sched, x, y, 2)
    reference = trainable(models[0])
    for final in (*finals, trainable(models[1])):
        assert all(torch.equal(final[n], reference[n]) for n in reference)
