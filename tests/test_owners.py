"""LoFT with one owner rank per pair: FSDP2 (``fully_shard``, DTensor shards) and DDP with
``split_step=True``, on 2 and 4 CPU processes over gloo (127.0.0.1, a free port). One spawn of
the workers per world size runs every scenario (tests/owner_worker.py), and tests/test_dcp.py's
(conftest.py: fsdp_two_ranks, fsdp_four_ranks)."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def two(fsdp_two_ranks):
    """Two ranks (one launch shared with tests/test_dcp.py: conftest.fsdp_two_ranks)."""
    return fsdp_two_ranks[0]


@pytest.fixture(scope="module")
def four(fsdp_four_ranks):
    """Four ranks; they also resume the two ranks' checkpoint."""
    return fsdp_four_ranks[0]


@pytest.fixture(scope="module")
def reference():
    from owner_worker import single_process_reference

    return single_process_reference()


def assert_equals_one_process(results, scenario, reference):
    for r, result in enumerate(results):
        params = result[scenario]["params"]
        assert params.keys() == reference.keys()
        for name in reference:
            assert torch.equal(params[name], results[0][scenario]["params"][name]), (r, name)
            assert rel_err(params[name], reference[name]) < 1e-8, (r, name, rel_err(params[name], reference[name]))


def assert_owners_split_the_pairs(results, scenario, world):
    owned = [set(r[scenario]["owned"]) for r in results]
    assert sum(len(o) for o in owned) == 4 and set().union(*owned) == set.union(*owned)
    assert all(owned), f"a rank owns nothing: {owned}" if world <= 4 else None
    sizes = [r[scenario]["state_bytes"] for r in results]
    assert all(s > 0 for s in sizes)
    return sizes


def test_fsdp2_two_processes_equal_one_process_with_the_whole_batch(two, reference):
    """Sharded factors (rank 1 holds an empty shard of the rank-1 pair's A, m = 7 split 4 + 3), a
    sharded modules_to_save head with head_lr, clipping that is active, weight decay, alternation and
    a scheduler: float64 trajectory equal to one process to 1e-8, and every rank holds the same model."""
    assert_equals_one_process(two, "fsdp2", reference)
    norms = two[0]["fsdp2"]["norms"]
    assert max(norms) > 0.05  # the clipping coefficient was below 1
    assert all(r["fsdp2"]["norms"] == norms for r in two)
    assert_owners_split_the_pairs(two, "fsdp2", 2)


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp2_without_a_mesh_argument_equals_one_process(two, four, reference, world):
    """fully_shard(layer) for each layer, then fully_shard(model), with no mesh= (as torch's tutorials
    and docs/distributed.md write it): each call makes a default mesh of its own, equal ones, so the
    model trains with owners and equals one process (float64, 1e-8), each rank holding part of the state."""
    results = two if world == 2 else four
    assert_equals_one_process(results, "fsdp2_default_mesh", reference)
    for r in results:
        assert r["fsdp2_default_mesh"]["owned"] == r["fsdp2"]["owned"]  # the same owners as with one mesh
        assert r["fsdp2_default_mesh"]["state_bytes"] == r["fsdp2"]["state_bytes"]


@pytest.mark.parametrize("layout, message", [
    ("subgroup", r"base_model\.model\.0\[default\]\.A is sharded over a 1-D cpu mesh of shape \(2,\) over ranks \[0, 1\] but "
                 r"base_model\.model\.4\[default\]\.A over a 1-D cpu mesh of shape \(1,\) over ranks \[RANK\] named \('shard',\)"),
    ("named", r"over a 1-D cpu mesh of shape \(2,\) over ranks \[0, 1\] named \('dp',\) but .* over a 1-D cpu mesh of "
              r"shape \(2,\) over ranks \[0, 1\]: .*Pass the same mesh to every fully_shard call"),
    ("2d", r"is a DTensor with placements \(Replicate\(\), Shard\(dim=0\)\) on a 2-D mesh"),
])
def test_fsdp2_over_meshes_that_differ_is_refused(two, layout, message):
    """Meshes that really differ (a sub-group of the ranks, other dimension names, a 2-D mesh) are
    refused at construction on every rank, naming both meshes (or the layout) and what to do."""
    import re

    for rank, r in enumerate(two):
        refusal = r["mesh_refusals"][layout]
        assert refusal is not None, layout
        assert re.search(message.replace("RANK", str(rank)), refusal), refusal


def test_fsdp2_clipping_outside_the_step(two, reference):
    """loft.clip_grad_norm_ (what LoFTTrainer calls) on sharded gradients: the same norms and the same
    trajectory as clipping inside the step on one process."""
    assert_equals_one_process(two, "fsdp2_clip_outside", reference)
    for a, b in zip(two[0]["fsdp2_clip_outside"]["norms"], two[0]["fsdp2"]["norms"]):
        assert abs(a - b) <= 1e-6 * b  # (grad_norm() returns float32, as torch's)
    # the step reuses the factors and gradients grad_norm() gathered: one gather per step, as when
    # clipping inside the step
    for r in two:
        assert r["fsdp2_clip_outside"]["sent_bytes"] == r["fsdp2"]["sent_bytes"] > 0


def test_fsdp2_four_processes_equal_one_process(four, reference):
    """Four ranks: two hold empty shards of the rank-1 pair's A, one an empty shard of its B (m = 5)
    and of the head (3 rows); every rank owns one pair."""
    assert_equals_one_process(four, "fsdp2", reference)
    assert sorted(len(r["fsdp2"]["owned"]) for r in four) == [1, 1, 1, 1]


def test_ddp_split_step_equals_one_process(two, reference):
    """DDP with split_step=True: each pair stepped by its owner only, new factors broadcast."""
    assert_equals_one_process(two, "ddp_split", reference)
    assert_owners_split_the_pairs(two, "ddp_split", 2)


def test_owners_hold_part_of_the_state(two):
    """Per-rank LoFT state: the two ranks together hold what one process holds, each part of it."""
    from owner_worker import build_model, make_optimizer, state_bytes

    model = build_model()
    opt, _ = make_optimizer(model)
    x = torch.randn(4, 6, dtype=torch.float64)
    model(x).square().mean().backward()
    opt.step()
    whole = state_bytes(opt)
    for scenario in ("fsdp2", "ddp_split"):
        sizes = [r[scenario]["state_bytes"] for r in two]
        assert sum(sizes) == whole and max(sizes) < whole, (scenario, sizes, whole)


def test_fsdp2_mixed_precision_trains(two):
    """bf16 parameters in forward / backward, float32 shards and gradient reduction: the optimizer
    steps the float32 shards and the loss falls."""
    for r in two:
        res = r["fsdp2_mixed_precision"]
        assert res["dtypes"] == ["torch.float32"]
        assert res["losses"][-1] < res["losses"][0]
        for name, value in res["params"].items():
            assert torch.isfinite(value).all(), name
            assert torch.equal(value, two[0]["fsdp2_mixed_precision"]["params"][name])


def test_fsdp2_resume_is_bit_exact(two):
    """state_dict() on every rank (the owners' state gathered, the head's shards made whole), then a
    fresh sharded model and optimizer loaded from it continue exactly as the uninterrupted run."""
    for r in two:
        continued, resumed = r["checkpoint"]["continued"], r["checkpoint"]["resumed"]
        assert continued.keys() == resumed.keys()
        for name in continued:
            assert torch.equal(continued[name], resumed[name]), name


def test_fsdp2_checkpoint_has_the_per_parameter_format_and_resumes_on_one_process(two, reference):
    """The 2-process checkpoint holds every pair's state in today's per-parameter format and a
    whole head state; one process (no FSDP) resumed from it ends where one process ends."""
    from owner_worker import CHECKPOINT_AT, STEPS, build_model, data, load_trainable, make_optimizer, train

    checkpoint = torch.load(two[0]["checkpoint"]["checkpoint"], weights_only=False)
    model = build_model()
    load_trainable(model, checkpoint["model"])
    opt, sched = make_optimizer(model)
    saved = checkpoint["optimizer"]["state"]
    assert len(saved) == 10  # 4 pairs x 2 factors + head weight and bias
    opt.load_state_dict(checkpoint["optimizer"])
    assert all(int(st["step"]) == CHECKPOINT_AT for st in opt.state.values())
    head = model.base_model.model[8].modules_to_save["default"].weight
    assert opt.state[head]["exp_avg"].shape == head.shape
    sched.load_state_dict(checkpoint["scheduler"])
    x, y = data()
    train(model, opt, sched, x, y, STEPS - CHECKPOINT_AT)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert rel_err(p.detach(), reference[name]) < 1e-8, name


def test_fsdp2_checkpoint_of_two_processes_continues_on_four(four, reference):
    for r in four:
        resumed = r[next(k for k in r if k.startswith("resume:"))]["resumed"]
        for name in reference:
            assert rel_err(resumed[name], reference[name]) < 1e-8, name


def test_split_step_is_a_checked_setting_and_without_a_process_group_changes_nothing():
    from owner_worker import build_model

    import loft

    with pytest.raises(TypeError, match="split_step"):
        loft.LoFTAdamW(build_model(), split_step="yes")
    opt = loft.LoFTAdamW(build_model(), split_step=True)  # one process: every pair is stepped here
    assert opt.settings.split_step and type(opt.distributor).__name__ == "LocalDistributor"
