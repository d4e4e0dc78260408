"""Worker processes for tests/test_distributed.py (2 ranks, gloo, CPU, float64); one launch runs
every scenario (tests/_ranks.py)."""

from __future__ import annotations

import os
import time

import torch
from torch import nn

import loft
import loft.distributed

STEPS = 8
N_ROWS = 8


def build_model(rank_of_lora: int = 2):
    import peft

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    cfg = peft.LoraConfig(r=rank_of_lora, target_modules=["0"], modules_to_save=["2"], init_lora_weights=False)
    return peft.get_peft_model(base, cfg)


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(N_ROWS, 6, generator=g, dtype=torch.float64), torch.randn(N_ROWS, 3, generator=g, dtype=torch.float64)


def make_optimizer(model):
    return loft.LoFTAdamW(model, lr=1e-2, weight_decay=0.01, max_grad_norm=0.5, head_lr=3e-2)


def loss_fn(model, x, y):
    return (model(x) - y).square().mean()


def trainable(model):
    inner = model.module if hasattr(model, "module") else model
    return {n: p.detach().clone() for n, p in inner.named_parameters() if p.requires_grad}


def single_process_reference(micro_batches: int = 1):
    """One process that sees the whole batch every step."""
    model = build_model()
    opt = make_optimizer(model)
    x, y = data()
    for _ in range(STEPS):
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
    return trainable(model)


def worker(rank: int, world: int, port: int, scenarios: list[str], out_dir: str) -> None:
    """One rank: its rows of the batch, every scenario in one process group (tests/_ranks.py)."""
    from _ranks import serve_scenarios

    x, y = data()
    rows = slice(rank * N_ROWS // world, (rank + 1) * N_ROWS // world)
    serve_scenarios(rank, world, port, scenarios, out_dir, lambda scenario: run(scenario, rank, x[rows], y[rows]))


def run(scenario: str, rank: int, xs, ys) -> dict[str, object]:
    result: dict[str, object] = {}
    if scenario == "accelerate":  # Accelerate adopts the running process group
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)
        model = build_model()
        opt = make_optimizer(model)
        model, opt = accelerator.prepare(model, opt)
        result["distributed_type"] = str(accelerator.distributed_type)
        for _ in range(STEPS):
            opt.zero_grad()
            accelerator.backward(loss_fn(model, xs, ys))
            opt.step()
        result["params"] = trainable(model)
    elif scenario.startswith("missing"):
        # "missing:<seconds>" (the last scenario of a launch: rank 1 skips a construction, so the
        # ranks' construction counts differ from here on). Rank 1 never constructs its optimizer
        # (as if it had failed before): rank 0 must not wait forever.
        os.environ["LOFT_DIST_TIMEOUT"] = scenario.split(":")[1]
        result["refusal"] = None
        if rank == 0:
            t0 = time.perf_counter()
            try:
                make_optimizer(build_model())
            except loft.distributed.RanksNotResponding as exc:
                result["refusal"] = str(exc)
            result["seconds"] = time.perf_counter() - t0
    elif scenario == "mismatch":
        # (DDP would refuse this model itself; code that all-reduces by hand relies on LoFT's check)
        model = build_model(rank_of_lora=2 + rank)
        try:
            make_optimizer(model)
            result["refusal"] = None
        except loft.UnsupportedDistributedSetup as exc:
            result["refusal"] = str(exc)
    elif scenario in ("ddp", "accumulate"):
        model = nn.parallel.DistributedDataParallel(build_model())
        opt = make_optimizer(model)
        for _ in range(STEPS):
            opt.zero_grad()
            if scenario == "accumulate":  # two micro-batches, gradients synced only on the last
                half = xs.shape[0] // 2
                with model.no_sync():
                    (loss_fn(model, xs[:half], ys[:half]) / 2).backward()
                (loss_fn(model, xs[half:], ys[half:]) / 2).backward()
            else:
                loss_fn(model, xs, ys).backward()
            opt.step()
        result["params"] = trainable(model)
    else:
        raise ValueError(scenario)
    return result
