"""Worker processes for tests/test_owners.py: LoFT with one owner rank per pair, under FSDP2
(``fully_shard``) and under DDP with ``split_step=True`` (gloo, CPU, float64 unless stated)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

import loft

STEPS = 6
N_ROWS = 8
LORA_LAYERS = (0, 2, 4, 6)


def build_model(dtype: torch.dtype = torch.float64):
    """Four LoRA pairs of three shapes: ``0`` (A 2x6, B 7x2), ``2`` and ``4`` (A 2x7, B 7x2: one
    batch), ``6`` (rank 1 < world size: A 1x7, B 5x1; m = 7 and 5 split unevenly); a
    ``modules_to_save`` head ``8`` (3 x 5) trained with ``head_lr``."""
    import peft

    torch.manual_seed(0)
    base = nn.Sequential(
        nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 7), nn.Tanh(), nn.Linear(7, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(),
        nn.Linear(5, 3),
    ).to(dtype)
    cfg = peft.LoraConfig(
        r=2,
        target_modules=[str(i) for i in LORA_LAYERS],
        rank_pattern={"6": 1},
        modules_to_save=["8"],
        init_lora_weights=False,
    )
    return peft.get_peft_model(base, cfg, autocast_adapter_dtype=False)


def data(dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(N_ROWS, 6, generator=g).to(dtype), torch.randn(N_ROWS, 3, generator=g).to(dtype)


def make_optimizer(model, **settings):
    opt = loft.LoFTAdamW(model, lr=1e-2, weight_decay=0.01, max_grad_norm=0.05, head_lr=3e-2, **settings)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.5 * s))
    return opt, sched


def loss_fn(model, x, y):
    return (model(x) - y).square().mean()


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def trainable(model):
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return {n: full(p) for n, p in inner.named_parameters() if p.requires_grad}


def train(model, opt, sched, x, y, steps: int = STEPS):
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
        sched.step()


def single_process_reference(steps: int = STEPS, frozen: str | None = None):
    """One process that sees the whole batch every step (every pair's ``frozen`` factor, 'A' or
    'B', frozen from the start: loft.federated.freeze_factor)."""
    model = build_model()
    if frozen:
        from loft import federated

        federated.freeze_factor(model, frozen)
    opt, sched = make_optimizer(model)
    x, y = data()
    train(model, opt, sched, x, y, steps)
    return trainable(model)


def state_bytes(opt) -> int:
    """Bytes of LoFT state this rank holds (every batch state's stacks)."""
    return sum(t.numel() * t.element_size() for b in opt.batch_states() for side in b.sides for t in vars(side).values())


def shard(model, world: int, mp_policy=None, *, mesh: bool = True, **fsdp_options):
    """``fully_shard`` on each LoRA layer, then the root. ``mesh=False``: as torch's tutorials and
    most users write it, no ``mesh=`` argument (each call makes a default mesh of its own).
    ``fsdp_options``: more keyword arguments of ``fully_shard`` (``reshard_after_forward``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    kwargs = dict(fsdp_options) if mp_policy is None else {"mp_policy": mp_policy, **fsdp_options}
    if mesh:
        kwargs["mesh"] = init_device_mesh("cpu", (world,))
    for i in LORA_LAYERS:
        fully_shard(model.base_model.model[i], **kwargs)
    fully_shard(model, **kwargs)
    return model


def mesh_refusals(world: int) -> dict[str, str | None]:
    """Models sharded over meshes that really differ, each given to LoFTAdamW: the message of the
    refusal, or None where it was accepted. ``subgroup``: layers 0 and 2 over every rank, layers 4
    and 6 over a 1-D mesh of this rank alone (sliced from a 2-D mesh); ``named``: one layer over a
    mesh named ("dp",), the rest over unnamed default meshes; ``2d``: the whole model over a 2-D
    mesh (HSDP's layout: replicated along one dimension)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    out: dict[str, str | None] = {}
    grid = init_device_mesh("cpu", (world, 1), mesh_dim_names=("replicate", "shard"))
    layouts = {
        "subgroup": {0: None, 2: None, 4: grid["shard"], 6: grid["shard"]},
        "named": {0: init_device_mesh("cpu", (world,), mesh_dim_names=("dp",)), 2: None, 4: None, 6: None},
        "2d": {i: grid for i in LORA_LAYERS},
    }
    for name, meshes in layouts.items():
        model = build_model()
        for i, mesh in meshes.items():
            fully_shard(model.base_model.model[i], mesh=mesh)
        fully_shard(model, mesh=grid if name == "2d" else None)
        try:
            loft.LoFTAdamW(model, lr=1e-2)
            out[name] = None
        except loft.UnsupportedDistributedSetup as exc:
            out[name] = str(exc)
    return out


def worker(rank: int, world: int, port: int, scenarios: list[str], out_dir: str) -> None:
    """One rank: its rows of the batch, every scenario in one process group (tests/_ranks.py)."""
    from _ranks import serve_scenarios

    global OUT_DIR
    OUT_DIR = out_dir
    x, y = data()
    rows = slice(rank * N_ROWS // world, (rank + 1) * N_ROWS // world)
    serve_scenarios(rank, world, port, scenarios, out_dir, lambda scenario: run(scenario, rank, world, x[rows], y[rows]))


def run(scenario: str, rank: int, world: int, xs, ys) -> dict[str, object]:
    out: dict[str, object] = {}
    if scenario in ("dcp:accelerate", "setups:trainer"):  # each starts from a fresh Accelerate state
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    if scenario.startswith("dcp:"):  # a scenario of tests/dcp_worker.py, in the same launch
        import dcp_worker

        dcp_worker.OUT_DIR = OUT_DIR
        return dcp_worker.run(scenario.removeprefix("dcp:"), rank, world, xs, ys)
    if scenario.startswith("internals:"):  # a scenario of tests/internals_worker.py, in the same launch
        import internals_worker

        internals_worker.OUT_DIR = OUT_DIR
        return internals_worker.run(scenario.removeprefix("internals:"), rank, world)
    if scenario.startswith("setups:"):  # a scenario of tests/setups_worker.py, in the same launch
        import setups_worker

        setups_worker.OUT_DIR = OUT_DIR
        return setups_worker.run(scenario.removeprefix("setups:"), rank, world, xs, ys)
    if scenario == "mesh_refusals":
        return mesh_refusals(world)
    if scenario in ("fsdp2", "fsdp2_default_mesh", "ddp_split"):
        if scenario.startswith("fsdp2"):
            model = shard(build_model(), world, mesh=scenario == "fsdp2")
            opt, sched = make_optimizer(model)
        else:
            model = nn.parallel.DistributedDataParallel(build_model())
            opt, sched = make_optimizer(model, split_step=True)
        norms = []
        for _ in range(STEPS):
            opt.zero_grad()
            loss_fn(model, xs, ys).backward()
            opt.step()
            sched.step()
            norms.append(float(opt.last_grad_norm))
        out["params"] = trainable(model)
        out["norms"] = norms
        out["state_bytes"] = state_bytes(opt)
        out["sent_bytes"] = opt.distributor.sent_bytes
        out["owned"] = sorted(p.name for p in opt.pairs if opt.distributor.owner(p) == rank)
        return out
    if scenario == "fsdp2_clip_outside":  # clipping by loft.clip_grad_norm_ before the step, as LoFTTrainer does
        model = shard(build_model(), world)
        opt = loft.LoFTAdamW(model, lr=1e-2, weight_decay=0.01, head_lr=3e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.5 * s))
        norms = []
        for _ in range(STEPS):
            opt.zero_grad()
            loss_fn(model, xs, ys).backward()
            norms.append(float(loft.clip_grad_norm_(opt, 0.05)))
            opt.step()
            sched.step()
        out["params"] = trainable(model)
        out["norms"] = norms
        out["sent_bytes"] = opt.distributor.sent_bytes
        return out
    if scenario == "fsdp2_mixed_precision":
        from torch.distributed.fsdp import MixedPrecisionPolicy

        model = shard(build_model(torch.float32), world, MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
        opt, sched = make_optimizer(model)
        x32, y32 = xs.float(), ys.float()
        losses = []
        for _ in range(STEPS):
            opt.zero_grad()
            loss = loss_fn(model, x32, y32)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        out["losses"] = losses
        out["params"] = trainable(model)
        out["dtypes"] = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad})
        return out
    if scenario == "checkpoint":  # 3 steps, state_dict(), 3 more; a fresh run resumed from the checkpoint
        model = shard(build_model(), world)
        opt, sched = make_optimizer(model)
        train(model, opt, sched, xs, ys, CHECKPOINT_AT)
        path = os.path.join(OUT_DIR, "checkpoint.pt")
        checkpoint = {"model": trainable(model), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
        if rank == 0:
            torch.save(checkpoint, path)
        dist.barrier()
        train(model, opt, sched, xs, ys, STEPS - CHECKPOINT_AT)
        out["continued"] = trainable(model)
        out["resumed"] = resume(path, world, xs, ys)
        out["checkpoint"] = path
        return out
    if scenario.startswith("resume:"):  # a checkpoint written on another number of processes
        out["resumed"] = resume(scenario.split(":", 1)[1], world, xs, ys)
        return out
    raise ValueError(scenario)


CHECKPOINT_AT = 3
OUT_DIR = ""


def load_trainable(model, values) -> None:
    """Copy whole values into a (possibly FSDP2-sharded) model's trainable parameters."""
    from loft.distributor import local_part, shard_like

    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in values:
                whole = values[n].to(p.dtype)
                local_part(p).copy_(local_part(shard_like(whole, p)) if hasattr(p, "device_mesh") else whole)


def resume(path: str, world: int, xs, ys):
    """Continue from a checkpoint in a fresh FSDP2 model and optimizer; the whole trainable parameters after."""
    checkpoint = torch.load(path, weights_only=False)
    model = shard(build_model(), world)
    load_trainable(model, checkpoint["model"])
    opt, sched = make_optimizer(model)
    opt.load_state_dict(checkpoint["optimizer"])
    sched.load_state_dict(checkpoint["scheduler"])
    train(model, opt, sched, xs, ys, STEPS - CHECKPOINT_AT)
    return trainable(model)
