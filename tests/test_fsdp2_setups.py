"""The other ways users shard with FSDP2, one test each, against one process: options of
``fully_shard`` (``reshard_after_forward=False``, a bf16 ``MixedPrecisionPolicy``), gradient
accumulation, activation checkpointing (torch's ``checkpoint_wrapper``, transformers'
``gradient_checkpointing_enable()``), transformers' Trainer configured for FSDP2 and Accelerate from
a config file. The 2-process scenarios run in the 2-rank launch shared with tests/test_owners.py
(conftest.fsdp_two_ranks; tests/setups_worker.py); the Accelerate one is a real ``accelerate launch``."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from conftest import rel_err

pytest.importorskip("peft")

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def two(fsdp_two_ranks):
    return fsdp_two_ranks[2]


@pytest.fixture(scope="module")
def reference():
    from owner_worker import single_process_reference

    return single_process_reference()


@pytest.fixture(scope="module")
def llama_reference():
    from setups_worker import llama_reference

    return llama_reference()


def assert_equals(results, scenario, reference, tol=1e-8):
    """Every rank holds the same trainable parameters, each within ``tol`` (relative) of ``reference``
    (``tol=None``: bit-identical)."""
    for r, result in enumerate(results):
        params = result[scenario]["params"]
        assert params.keys() == reference.keys(), (r, sorted(params), sorted(reference))
        for name in reference:
            assert torch.equal(params[name], results[0][scenario]["params"][name]), (r, name)
            if tol is None:
                assert torch.equal(params[name], reference[name]), (r, name, rel_err(params[name], reference[name]))
            else:
                assert rel_err(params[name], reference[name]) < tol, (r, name, rel_err(params[name], reference[name]))


def test_reshard_after_forward_false_equals_one_process(two, reference):
    """fully_shard(..., reshard_after_forward=False) (parameters stay gathered between forward and
    backward, ZeRO-2 style), no mesh=: float64, equal to one process to 1e-8."""
    assert_equals(two, "no_reshard", reference)


#: how close a bf16 run must be to one process running its policy by hand (relative, per parameter)
POLICY_TOL = 1e-5


def test_bf16_mixed_precision_equals_one_process_running_the_same_policy(two, reference):
    """MixedPrecisionPolicy(param_dtype=torch.bfloat16): forward and backward in bfloat16 (gradients
    reduced in bfloat16, the policy's default), float32 shards and float32 LoFT state. Exact
    equality with a float32 run is impossible; the run equals one process that runs the same policy
    by hand (setups_worker.bf16_reference: bfloat16 copies per rank's rows, gradients averaged and
    rounded to bfloat16) to float32 rounding, and stays within bfloat16's rounding of the float64 run.

    Float32 rounding, not bit for bit: the two runs do the same float32 operations, but MKL's
    AVX-512 GEMMs may round differently for operands at other addresses (its reproducibility
    mode, ``MKL_CBWR=COMPATIBLE``, makes them bit-identical). Measured on such a CPU: 3.5e-7
    relative at most, bit-identical on the CPUs before it. ``POLICY_TOL`` still tells the policy
    from its neighbour: reducing the gradients in float32 instead of bfloat16 moves the result
    8.5e-5 (checked below)."""
    from setups_worker import bf16_reference

    emulated = bf16_reference(world=2)
    assert_equals(two, "bf16", emulated, tol=POLICY_TOL)
    float32_reduce = bf16_reference(world=2, reduce_dtype=torch.float32)
    assert max(rel_err(float32_reduce[name], emulated[name]) for name in emulated) > POLICY_TOL
    for r in two:
        res = r["bf16"]
        assert res["dtypes"] == ["torch.float32"] and res["state_dtypes"] == ["torch.float32"]
        assert res["losses"][-1] < res["losses"][0]
        for name in reference:  # measured 1.7e-3 after 6 steps: bfloat16 has 8 bits of mantissa
            assert rel_err(res["params"][name].double(), reference[name]) < 1e-2, name


@pytest.mark.parametrize("scenario", ["accumulate", "accumulate_synced"])
def test_gradient_accumulation_equals_one_process_with_the_whole_batch(two, reference, scenario):
    """Two micro-batches per step, each loss divided by 2: with the gradient sync of the first
    switched off (model.set_requires_gradient_sync(False), FSDP2's no_sync) and with every
    micro-batch reduce-scattered; both equal one process on the whole batch (float64, 1e-8)."""
    assert_equals(two, scenario, reference)


def test_checkpoint_wrapper_activation_checkpointing_equals_one_process(two, reference):
    """torch's apply_activation_checkpointing(checkpoint_wrapper) on each LoRA layer, then fully_shard on
    each wrapper and the root: equal to one process without checkpointing (1e-8). (Before loft found
    each wrapped layer twice, through the wrapper's attribute forwarding, and stepped it twice.)"""
    for r in two:
        assert r["checkpoint_wrapper"]["wrapped"] == 4
    assert_equals(two, "checkpoint_wrapper", reference)


def test_a_checkpoint_wrapped_lora_layer_is_one_pair():
    """One process: the wrapper forwards attribute access to the layer it wraps, so it looks like a
    LoRA layer itself; each pair is found once, and training equals the unwrapped model bit for bit."""
    from owner_worker import LORA_LAYERS, build_model, data, make_optimizer, train, trainable
    from setups_worker import WRAPPED
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    from loft.pairs import count_lora_layers

    x, y = data()
    runs = []
    for wrap in (False, True):
        model = build_model()
        if wrap:
            layers = {model.base_model.model[i] for i in LORA_LAYERS}
            apply_activation_checkpointing(model, check_fn=lambda m: m in layers)
        opt, sched = make_optimizer(model)
        assert len(opt.pairs) == count_lora_layers(model) == 4
        train(model, opt, sched, x, y)
        runs.append({k.replace(WRAPPED, ""): v for k, v in trainable(model).items()})
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])


def test_transformers_gradient_checkpointing_equals_one_process(two, llama_reference):
    """A transformers Llama (float64) with model.gradient_checkpointing_enable(), fully_shard on each
    decoder layer and the root without mesh=: LoFT steps the shards with owners and equals one process
    without sharding or checkpointing (1e-8)."""
    for r in two:
        assert r["hf_checkpointing"]["checkpointing"] and r["hf_checkpointing"]["owner_distributor"] == "FSDP2Owners"
    assert_equals(two, "hf_checkpointing", llama_reference)


def test_trainer_fsdp2_as_users_configure_it_equals_one_process_and_resumes_bit_exactly(two, tmp_path):
    """LoFTTrainer with TrainingArguments(fsdp="full_shard", fsdp_config={"version": 2,
    "transformer_layer_cls_to_wrap": [...]}) and Trainer's default checkpoints on 2 processes (FSDP2
    shards, LoFT's owners) equals LoFTTrainer on one process with 2 accumulated micro-batches of the
    same size (float64, 1e-8; measured: bit-identical). Its checkpoint (Trainer's default
    FULL_STATE_DICT: the adapter, optimizer.bin through torch's get_optimizer_state_dict) resumes in a
    fresh trainer bit-exactly. (Before, on CPU processes, the checkpoint's adapter save failed on rank
    0 with DTensors while rank 1 waited: Accelerate reverted fsdp_on_cpu's switch.)"""
    from setups_worker import trainer_run

    one, sharded = trainer_run(str(tmp_path / "one"), fsdp=False)
    assert not sharded
    for r in two:
        res = r["trainer"]
        assert res["sharded"]
        assert {"adapter_model.safetensors", "optimizer.bin", "rng_state_1.pth"} <= set(res["checkpoint"])
        assert all(torch.equal(res["resumed"][n], res["params"][n]) for n in one)
    assert_equals(two, "trainer", one)


@pytest.mark.slow  # a real `accelerate launch` of 2 processes (pyproject.toml: markers)
def test_accelerate_launch_with_an_fsdp2_config_file_equals_one_process(tmp_path, llama_reference):
    """``accelerate launch --config_file`` with the YAML ``accelerate config`` writes for FSDP2
    (tests/fixtures/accelerate_fsdp2.yaml: distributed_type FSDP, fsdp_version 2, transformer-based
    wrapping, CPU-RAM-efficient loading) running an ordinary Accelerate loop with LoFTAdamW built
    before ``prepare``: the model is sharded, LoFT steps it with owners, and the adapter equals one
    process (float64, 1e-8)."""
    from test_cli_distributed import BIN, TIMEOUT, _env, free_port

    out = tmp_path / "adapter.pt"
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(HERE / "fixtures" / "accelerate_fsdp2.yaml"),
           "--main_process_port", str(free_port()), str(HERE / "accelerate_fsdp_script.py"), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = torch.load(out, weights_only=False)
    assert result["sharded"] and result["distributor"] == "FSDP2Owners"
    params = result["params"]
    assert params.keys() == llama_reference.keys()
    for name in llama_reference:
        assert rel_err(params[name], llama_reference[name]) < 1e-8, name
