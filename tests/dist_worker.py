"""Worker processes for tests/test_distributed.py (2 ranks, gloo, CPU, float64)."""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist
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


def worker(rank: int, world: int, port: int, scenario: str, out_dir: str) -> None:
    run_scenario(rank, world, port, scenario, out_dir)
    # Leave without the interpreter's teardown: gloo's background threads can abort the process
    # there ("terminate called without an active exception", seen once in CI after the results
    # were saved), which would fail the test for a reason that has nothing to do with LoFT.
    os._exit(0)


def run_scenario(rank: int, world: int, port: int, scenario: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    x, y = data()
    shard = slice(rank * N_ROWS // world, (rank + 1) * N_ROWS // world)
    xs, ys = x[shard], y[shard]
    result: dict[str, object] = {}
    if scenario == "accelerate":
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
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        accelerator.end_training()
        dist.destroy_process_group() if dist.is_initialized() else None
        return
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        if scenario == "missing":
            # rank 1 never constructs its optimizer (as if it had failed before): rank 0 must not wait forever
            result["error"] = None
            if rank == 0:
                import time

                t0 = time.perf_counter()
                try:
                    make_optimizer(build_model())
                except loft.distributed.RanksNotResponding as exc:
                    result["error"] = str(exc)
                result["seconds"] = time.perf_counter() - t0
        elif scenario == "mismatch":
            # (DDP would refuse this model itself; code that all-reduces by hand relies on LoFT's check)
            model = build_model(rank_of_lora=2 + rank)
            try:
                make_optimizer(model)
                result["error"] = None
            except loft.UnsupportedDistributedSetup as exc:
                result["error"] = str(exc)
        else:
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
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # neither rank tears the group down while the other still uses it
    finally:
        dist.destroy_process_group()
