"""LoFT's optimizer state through ``torch.distributed.checkpoint`` (DCP) and torch's
``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` (what Accelerate's and Trainer's FSDP2
checkpoints call), on 2 gloo CPU processes, float64; resumed on 2, on 4 and on 1 process."""

from __future__ import annotations

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
    """Loading a fresh optimizer's templates changes nothing: the run equals one never loaded."""
    from owner_worker import build_model, data, make_optimizer, train, trainable
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    x, y = data()
    runs = []
    for load in (False, True):
        model = build_model()
        opt, sched = make_optimizer(model)
        if load:
            template = get_optimizer_state_dict(model, opt)
            assert all(int(st["step"]) == 0 for st in template["state"].values()) and len(template["state"]) == NAMES
            set_optimizer_state_dict(model, opt, template)
            assert opt.batch_states() == []  # no pair state installed (the head gets AdamW's zeros at step 0)
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
        assert res["distributor"] == "OwnerDistributor" and res["dtensors"]
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
