"""LoFTAdamW under data parallelism: 2 CPU processes on gloo (127.0.0.1, a free port)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import _ranks
from conftest import rel_err
from dist_worker import single_process_reference

pytest.importorskip("peft")

#: one launch of 2 ranks runs every scenario (process start-up is most of the cost); "missing"
#: must come last (see dist_worker.run)
SCENARIOS = ["ddp", "accumulate", "accelerate", "mismatch", "missing:2"]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    from dist_worker import worker

    scenarios = SCENARIOS if importlib.util.find_spec("accelerate") else [s for s in SCENARIOS if s != "accelerate"]

    # the deadline: a rank that waits forever (scenario "missing") fails the tests instead of hanging
    return _ranks.run_ranks(worker, 2, scenarios, tmp_path_factory.mktemp("ranks"), deadline=240)


def assert_ranks_agree_and_match_one_process(results, scenario):
    reference = single_process_reference()
    rank0, rank1 = results[0][scenario]["params"], results[1][scenario]["params"]
    assert rank0.keys() == reference.keys()
    for name in reference:
        assert torch.equal(rank0[name], rank1[name]), name
        assert rel_err(rank0[name], reference[name]) < 1e-8, name


def test_ddp_equals_one_process_with_the_whole_batch(ranks):
    assert_ranks_agree_and_match_one_process(ranks, "ddp")


def test_ddp_gradient_accumulation_with_no_sync_equals_the_large_batch(ranks):
    assert_ranks_agree_and_match_one_process(ranks, "accumulate")


def test_accelerate_prepared_model_and_optimizer(ranks):
    pytest.importorskip("accelerate")
    assert ranks[0]["accelerate"]["distributed_type"] == "DistributedType.MULTI_CPU"
    assert_ranks_agree_and_match_one_process(ranks, "accelerate")


def test_ranks_with_different_lora_pairs_are_refused(ranks):
    for r in ranks:
        error = r["mismatch"]["refusal"]
        assert error is not None and "found different LoRA pairs" in error
        assert "Every data-parallel rank must build the same model" in error


def test_a_rank_that_never_constructs_the_optimizer_is_named_not_waited_for(ranks):
    """Rank 1 never constructs LoFTAdamW (as if it had failed before); rank 0's construction-time
    check gives up after LOFT_DIST_TIMEOUT seconds (2, set in the worker) and names rank 1 (on
    main: waits forever)."""
    result = ranks[0]["missing:2"]
    error = result["refusal"]
    assert error is not None and "waited 2 s for rank(s) 1 of 2" in error and "LOFT_DIST_TIMEOUT" in error
    # it waited for the timeout; that it gave up at all is run_ranks' deadline (no upper bound on
    # the time here: under heavy load the store's wait took 30 s once, and timing is for benchmarks)
    assert result["seconds"] > 1.5


def _small_peft_model():
    import peft
    from torch import nn

    base = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    return peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["0"]))


def test_dtensor_layouts_other_than_fsdp2_are_refused(tmp_path):
    """FSDP2's layout (Shard(0) on a 1-D mesh) is accepted (tests/test_owners.py); a replicated or
    column-sharded DTensor (tensor parallelism) is refused, naming FSDP2."""
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import loft
    from loft.distributed import mesh_key

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdzv'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        again, named = init_device_mesh("cpu", (1,)), init_device_mesh("cpu", (1,), mesh_dim_names=("dp",))
        assert again is not mesh and mesh_key(again) == mesh_key(mesh) == ("cpu", (1,), (0,), None)
        assert mesh_key(named) == ("cpu", (1,), (0,), ("dp",))
        sharded = _small_peft_model()
        fully_shard(sharded, mesh=mesh)
        assert len(loft.LoFTAdamW(sharded).pairs) == 1
        for placement in (Replicate(), Shard(1)):
            model = _small_peft_model()
            layer = model.base_model.model[0]
            for mod in (layer.lora_A["default"], layer.lora_B["default"]):
                mod.weight = nn.Parameter(distribute_tensor(mod.weight.detach(), mesh, [placement]))
            with pytest.raises(loft.UnsupportedDistributedSetup, match=r"is a DTensor with placements.*Supported: FSDP2"):
                loft.LoFTAdamW(model)
    finally:
        dist.destroy_process_group()


def test_fsdp1_wrapped_model_is_refused():
    """FSDP (v1) cannot be built on a CPU-only machine; the check looks for its wrapper module."""
    from torch import nn

    import loft

    class FullyShardedDataParallel(nn.Module):  # stands in for torch's wrapper, matched by name
        def __init__(self, module):
            super().__init__()
            self.module = module

    with pytest.raises(loft.UnsupportedDistributedSetup, match="wrapped in FullyShardedDataParallel"):
        loft.LoFTAdamW(FullyShardedDataParallel(_small_peft_model()))


def test_deepspeed_zero3_partitioned_parameters_are_refused():
    import loft

    model = _small_peft_model()
    for p in model.parameters():
        p.ds_id = 0  # what ZeRO-3 attaches to each partitioned parameter
    with pytest.raises(loft.UnsupportedDistributedSetup, match="partitioned by DeepSpeed ZeRO-3"):
        loft.LoFTAdamW(model)


def test_parameters_replaced_behind_the_optimizer_are_refused_at_step():
    """ZeRO-1/2 style wrappers swap param_groups' tensors for flat partitions: never a silent step."""
    import loft

    model = _small_peft_model()
    opt = loft.LoFTAdamW(model)
    flat = torch.nn.Parameter(torch.cat([p.detach().flatten() for p in opt.param_groups[0]["params"]]))
    flat.grad = torch.zeros_like(flat)
    opt.param_groups[0]["params"] = [flat]
    with pytest.raises(loft.UnsupportedDistributedSetup, match="it was not built with"):
        opt.step()
