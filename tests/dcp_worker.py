"""The scenarios of tests/test_dcp.py (run by tests/owner_worker.py's workers, as ``dcp:<scenario>``,
in the launches tests/test_owners.py's scenarios use): LoFT's optimizer state through
``torch.distributed.checkpoint`` (DCP) and ``get_optimizer_state_dict`` /
``set_optimizer_state_dict``, under FSDP2 and DDP (gloo, CPU, float64)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from owner_worker import CHECKPOINT_AT, STEPS, build_model, load_trainable, make_optimizer, shard, train, trainable
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict

from loft import federated


def wrap(kind: str, world: int):
    """A fresh model: FSDP2-sharded (``fsdp2``), in DDP (``ddp``), or plain (``plain``, one process);
    a suffix ``+A`` or ``+B`` freezes that factor of every pair first (FFA-LoRA, a federated client)."""
    kind, _, frozen = kind.partition("+")
    model = build_model()
    if frozen:
        federated.freeze_factor(model, frozen)
    if kind == "fsdp2":
        return shard(model, world)
    if kind == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    return model


def inner(model):
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def template_keys(model, opt) -> list[str]:
    """The names in a fresh optimizer's get_optimizer_state_dict (what DCP can load into)."""
    return sorted(get_optimizer_state_dict(model, opt)["state"])


def save(kind: str, world: int, rank: int, folder: str, xs, ys, full: bool) -> dict[str, object]:
    """Train CHECKPOINT_AT steps, checkpoint the optimizer through get_optimizer_state_dict (DCP,
    or a full state dict written by rank 0), train the rest: the checkpoint and the final weights."""
    model = wrap(kind, world)
    opt, sched = make_optimizer(model)
    out: dict[str, object] = {"fresh_keys": template_keys(model, opt)}
    train(model, opt, sched, xs, ys, CHECKPOINT_AT)
    os.makedirs(folder, exist_ok=True)
    if full:
        osd = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            torch.save(osd, os.path.join(folder, "optimizer.pt"))
    else:
        dcp.save({"optimizer": get_optimizer_state_dict(model, opt)}, checkpoint_id=os.path.join(folder, "dcp"))
    weights = trainable(inner(model))  # (a collective under FSDP2)
    if rank == 0:
        torch.save({"model": weights, "scheduler": sched.state_dict()}, os.path.join(folder, "rest.pt"))
    dist.barrier()
    train(model, opt, sched, xs, ys, STEPS - CHECKPOINT_AT)
    out["continued"] = trainable(inner(model))
    return out


def resume(kind: str, world: int, rank: int, folder: str, xs, ys, full: bool) -> dict[str, torch.Tensor]:
    """A fresh model and optimizer loaded from ``folder`` (saved by :func:`save`), trained to the end."""
    rest = torch.load(os.path.join(folder, "rest.pt"), weights_only=False)
    model = wrap(kind, world)
    load_trainable(inner(model), rest["model"])
    opt, sched = make_optimizer(model)
    if full and dist.is_initialized():  # rank 0 reads the file and broadcasts it (Accelerate's FULL_STATE_DICT, rank0_only)
        osd = torch.load(os.path.join(folder, "optimizer.pt"), weights_only=False) if rank == 0 else {}
        set_optimizer_state_dict(model, opt, osd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    elif full:  # one process
        set_optimizer_state_dict(model, opt, torch.load(os.path.join(folder, "optimizer.pt"), weights_only=False))
    else:
        osd = get_optimizer_state_dict(model, opt)
        state = {"optimizer": osd}
        dcp.load(state, checkpoint_id=os.path.join(folder, "dcp"))
        set_optimizer_state_dict(model, opt, state["optimizer"])
    sched.load_state_dict(rest["scheduler"])
    train(model, opt, sched, xs, ys, STEPS - CHECKPOINT_AT)
    return trainable(inner(model))


def accelerate_fsdp2(xs, ys) -> dict[str, object]:
    """Accelerate's FSDP plugin (fsdp_version=2): LoFTAdamW built on the whole model, then
    ``accelerator.prepare(model, optimizer)`` shards the model and swaps the optimizer's parameters
    for the shards; a checkpoint through Accelerate's FSDP helpers (DCP) resumes bit-exactly."""
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import load_fsdp_optimizer, save_fsdp_optimizer

    from loft.integrations.library_internals import fsdp_on_cpu

    def prepared():
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="NO_WRAP", state_dict_type="SHARDED_STATE_DICT")
        accelerator = Accelerator(fsdp_plugin=plugin, cpu=True)
        fsdp_on_cpu(accelerator, plugin)  # Accelerate ignores the plugin on CPU processes otherwise
        model = build_model()
        opt, sched = make_optimizer(model)
        model, opt = accelerator.prepare(model, opt)
        return accelerator, model, opt, sched

    accelerator, model, opt, sched = prepared()
    out: dict[str, object] = {"dtensors": all(hasattr(p, "device_mesh") for p in model.parameters())}
    train(model, opt, sched, xs, ys, CHECKPOINT_AT)
    out["distributor"] = type(opt.optimizer.distributor).__name__  # (chosen again at the first step)
    folder = os.path.join(OUT_DIR, "accelerate")
    save_fsdp_optimizer(accelerator.state.fsdp_plugin, accelerator, opt.optimizer, model, folder)
    weights, scheduler = trainable(model), sched.state_dict()
    train(model, opt, sched, xs, ys, STEPS - CHECKPOINT_AT)
    out["params"] = trainable(model)
    accelerator, model, opt, sched = prepared()
    load_trainable(model, weights)
    load_fsdp_optimizer(accelerator.state.fsdp_plugin, accelerator, opt.optimizer, model, folder)
    sched.load_state_dict(scheduler)
    train(model, opt, sched, xs, ys, STEPS - CHECKPOINT_AT)
    out["resumed"] = trainable(model)
    return out


OUT_DIR = ""


def run(scenario: str, rank: int, world: int, xs, ys) -> dict[str, object]:
    """``accelerate``, ``save:<kind>:<dcp|full>`` (save, continue, and resume from it on the same
    processes) or ``resume:<kind>:<dcp|full>:<folder>`` (resume a checkpoint of another launch)."""
    if scenario == "accelerate":
        return accelerate_fsdp2(xs, ys)
    what, kind, fmt, *rest = scenario.split(":", 3)
    full = fmt == "full"
    if what == "save":
        folder = os.path.join(OUT_DIR, f"{kind}-{fmt}")
        res = save(kind, world, rank, folder, xs, ys, full)
        res["resumed"] = resume(kind, world, rank, folder, xs, ys, full)
        res["folder"] = folder
        return res
    return {"resumed": resume(kind, world, rank, rest[0], xs, ys, full)}

