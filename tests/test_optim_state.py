"""State: bit-exact resume across processes, dtypes, non-finite gradients, DDP wrapping."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from conftest import Regression, delta_w, factors, lora_linear
from torch import nn

import loft

peft = pytest.importorskip("peft")

RESUME_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch, peft
    from torch import nn
    import loft
    torch.set_num_threads(1)

    def build(n_steps, alternating):
        torch.manual_seed(0)
        base = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3))
        cfg = peft.LoraConfig(r=4, target_modules=["0"], modules_to_save=["2"])
        model = peft.get_peft_model(base, cfg)
        opt = loft.LoFTAdamW(model, lr=1e-2, weight_decay=0.01, max_grad_norm=1.0, head_lr=3e-2,
                             alternating_updates=alternating)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=n_steps)
        return model, opt, sched

    def trainable(model):
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def run(model, opt, sched, steps):
        for t in steps:
            g = torch.Generator().manual_seed(100 + t)
            x = torch.randn(32, 12, generator=g)
            y = torch.randint(0, 3, (32,), generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()

    # every job: [mode, path, k, n_steps, alternating]; each builds its own model, optimizer and
    # scheduler (seeded), so jobs in one process do not depend on each other
    for mode, path, k, n_steps, alternating in json.loads(sys.argv[1]):
        model, opt, sched = build(n_steps, alternating)
        if mode == "full":
            run(model, opt, sched, range(n_steps))
            torch.save(trainable(model), path)
        elif mode == "first":
            run(model, opt, sched, range(k))
            torch.save({"model": trainable(model), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, path)
        else:
            ckpt = torch.load(path, weights_only=True)
            model.load_state_dict(ckpt["model"], strict=False)
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            run(model, opt, sched, range(k, n_steps))
            torch.save(trainable(model), path + ".resumed")
    """
)

RESUME_CASES = [(5, True), (6, True), (5, False)]


@pytest.fixture(scope="module")
def resumed_in_new_processes(tmp_path_factory):
    """Two processes for all cases (starting one costs more than its 12 steps): the first runs
    every uninterrupted run and every first part, the second, new, resumes every checkpoint."""
    folder = tmp_path_factory.mktemp("resume")
    script = folder / "resume.py"
    script.write_text(RESUME_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    paths = {case: (str(folder / f"full-{case[0]}-{case[1]}.pt"), str(folder / f"part-{case[0]}-{case[1]}.pt"))
             for case in RESUME_CASES}
    before = [[mode, path, k, 12, alternating] for (k, alternating), (full, part) in paths.items()
              for mode, path in (("full", full), ("first", part))]
    after = [["resume", part, k, 12, alternating] for (k, alternating), (_, part) in paths.items()]
    for jobs in (before, after):
        subprocess.run([sys.executable, str(script), json.dumps(jobs)], check=True, env=env)
    return paths


@pytest.mark.parametrize("k, alternating", RESUME_CASES)
def test_resume_in_a_new_process_is_bit_exact(resumed_in_new_processes, k, alternating):
    full, part = resumed_in_new_processes[(k, alternating)]
    uninterrupted = torch.load(full, weights_only=True)
    resumed = torch.load(part + ".resumed", weights_only=True)
    at_k = torch.load(part, weights_only=True)["model"]
    assert uninterrupted.keys() == resumed.keys()
    for name in uninterrupted:
        assert torch.equal(uninterrupted[name], resumed[name]), name
        assert not torch.equal(uninterrupted[name], at_k[name]), name  # training went on after k


def test_state_dict_round_trip_keeps_float32_state_for_bf16_parameters(tmp_path):
    model, layer = lora_linear(8, 6, 2, dtype=torch.bfloat16, random_b=False)
    problem = Regression(6, 8, dtype=torch.bfloat16)
    opt = loft.LoFTAdamW(model, lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        problem.model_loss(model).backward()
        opt.step()
    A = factors(layer)[0]
    assert opt.state[A]["exp_avg"].dtype == torch.float32
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    model2 = copy.deepcopy(model)
    opt2 = loft.LoFTAdamW(model2, lr=1e-2)
    opt2.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    A2 = factors(model2.base_model.model[0])[0]
    for key in ("exp_avg", "exp_avg_sq", "partner"):
        assert opt2.state[A2][key].dtype == torch.float32
        assert torch.equal(opt2.state[A2][key], opt.state[A][key])
    assert opt2.state[A2]["step"] == 3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_parameters_train(dtype):
    model, layer = lora_linear(16, 12, 4, dtype=dtype, random_b=False)
    problem = Regression(12, 16, dtype=dtype)
    opt = loft.LoFTAdamW(model, lr=5e-3)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = problem.model_loss(model)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    A, B, _ = factors(layer)
    assert A.dtype == dtype and B.dtype == dtype
    assert torch.isfinite(A).all() and torch.isfinite(B).all()
    assert losses[-1] < losses[0] - 0.01


def test_float64_parameters_keep_float64_state():
    model, layer = lora_linear(6, 5, 2)
    problem = Regression(5, 6)
    opt = loft.LoFTAdamW(model)
    problem.model_loss(model).backward()
    opt.step()
    assert all(t.dtype == torch.float64 for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor))


def _one_step_then_nan(nonfinite_grads):
    model = peft.get_peft_model(
        nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 2)), peft.LoraConfig(r=2, target_modules=["0"], modules_to_save=["1"])
    )
    opt = loft.LoFTAdamW(model, lr=1e-2, nonfinite_grads=nonfinite_grads)
    x = torch.randn(4, 6)
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad()
    model(x).square().mean().backward()
    (pair,) = opt.pairs
    pair.B.grad[0, 0] = float("nan")
    return model, opt


def test_nonfinite_gradient_skips_the_step_and_touches_nothing():
    model, opt = _one_step_then_nan("skip")
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = copy.deepcopy(opt.state_dict())
    with pytest.warns(RuntimeWarning, match=r"Non-finite gradient .*lora_B.*skipped"):
        opt.step()
    assert opt.skipped_steps == 1
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]), n
    after = opt.state_dict()
    for pid, st in state["state"].items():
        for key, value in st.items():
            other = after["state"][pid][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


def test_nonfinite_gradient_can_raise():
    _, opt = _one_step_then_nan("raise")
    with pytest.raises(FloatingPointError, match="Non-finite gradient"):
        opt.step()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_diverged_factors_meet_the_nonfinite_policy_not_a_linalg_error(policy, bad):
    """A run that diverged (its factors hold nan or inf, so the loss and gradients do too) gets
    the non-finite policy's warning or error, not LinAlgError from inside the step (eigh raises
    on a non-finite matrix from r = 3 on)."""
    model = peft.get_peft_model(nn.Sequential(nn.Linear(12, 10)), peft.LoraConfig(r=4, target_modules=["0"]))
    opt = loft.LoFTAdamW(model, lr=1e-2, nonfinite_grads=policy)
    x = torch.randn(5, 12)
    model(x).square().mean().backward()
    opt.step()
    (pair,) = opt.pairs
    with torch.no_grad():
        pair.A.fill_(bad)  # both factors: whichever moves next, its partner's gram is not finite
        pair.B.fill_(bad)
    opt.zero_grad()
    model(x).square().mean().backward()
    if policy == "skip":
        with pytest.warns(RuntimeWarning, match="Non-finite gradient"):
            opt.step()
        assert opt.skipped_steps == 1
    else:
        with pytest.raises(FloatingPointError, match="Non-finite gradient"):
            opt.step()


def test_ddp_wrapped_model_is_accepted_and_trains_like_the_plain_one(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    model, layer = lora_linear(8, 6, 2, random_b=False, seed=9)
    twin, twin_layer = lora_linear(8, 6, 2, random_b=False, seed=9)
    problem = Regression(6, 8)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrapped = DDP(model)
        opt = loft.LoFTAdamW(wrapped, lr=1e-2)
        ref = loft.LoFTAdamW(twin, lr=1e-2)
        assert [p.name for p in opt.pairs] == ["module." + p.name for p in ref.pairs]
        for _ in range(6):
            for o, m in ((opt, wrapped), (ref, twin)):
                o.zero_grad()
                problem.model_loss(m).backward()
                o.step()
        assert torch.equal(delta_w(layer), delta_w(twin_layer))
        assert float(delta_w(layer).norm()) > 0
    finally:
        dist.destroy_process_group()


def test_optimizer_state_of_a_factor_is_writable_as_torch_promises():
    """``optimizer.state[A]["exp_avg"] = t`` writes into the pair's stacked state (what the next
    step uses, and what state_dict() saves); in-place changes of the returned tensors do too;
    ``step``, a key before the first step, a wrong shape and deletion are refused in plain words."""
    model, layer = lora_linear(6, 5, 2)
    problem = Regression(5, 6)
    A, B, _ = factors(layer)
    opt = loft.LoFTAdamW(model, lr=1e-2)
    with pytest.raises(KeyError, match="empty until the pair's first step"):
        opt.state[A]["exp_avg"] = torch.zeros(2, 5, dtype=torch.float64)
    problem.model_loss(model).backward()
    opt.step()
    twin = copy.deepcopy(opt.state_dict())
    new = torch.full((2, 5), 0.25, dtype=torch.float64)
    opt.state[A]["exp_avg"] = new
    assert torch.equal(opt.state[A]["exp_avg"], new)
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], new)  # what a checkpoint saves
    opt.state[B]["exp_avg"].zero_()  # in place: the view is the state
    assert not opt.state[B]["exp_avg"].any()
    # the next step uses what was written: the same as loading a state dict that holds it
    twin["state"][0]["exp_avg"], twin["state"][1]["exp_avg"] = new.clone(), torch.zeros(2, 6, dtype=torch.float64)
    model2, layer2 = lora_linear(6, 5, 2)
    model2.load_state_dict(model.state_dict())
    opt2 = loft.LoFTAdamW(model2, lr=1e-2)
    opt2.load_state_dict(twin)
    for o, mdl in ((opt, model), (opt2, model2)):
        o.zero_grad()
        problem.model_loss(mdl).backward()
        o.step()
    assert all(torch.equal(x, y) for x, y in zip(factors(layer)[:2], factors(layer2)[:2]))
    with pytest.raises(KeyError, match="share one step count"):
        opt.state[A]["step"] = 5
    with pytest.raises(ValueError, match=r"shape \(2, 5\), got \(3, 5\)"):
        opt.state[A]["exp_avg"] = torch.zeros(3, 5)
    with pytest.raises(KeyError, match="all of step"):
        del opt.state[A]["partner"]
    with pytest.raises(KeyError, match="has the keys"):
        opt.state[A]["momentum"] = torch.zeros(1)
