"""What LoFT supports when training is spread over processes, the checks that refuse the rest,
and the choice of :mod:`distributor <loft.distributor>`.

LoFT's step needs each pair's *whole* factors ``A`` and ``B`` (their ``r x r`` grams and the
full-space rebuild). Supported:

* data parallelism (``DistributedDataParallel`` plain, through Accelerate or under
  ``transformers.Trainer``): every rank holds the whole factors and the all-reduced gradients;
  by default every rank steps every pair, with ``split_step=True`` each pair has one owner rank
  that steps it and broadcasts the new factors;
* FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters are DTensors sharded along dim 0
  on a 1-D mesh; each pair has one owner rank that gathers the pair's rows (never the base
  weight), steps it and scatters the new rows back (:class:`loft.distributor.FSDP2Owners`).

Refused, with a message naming FSDP2 as the supported way to shard: FSDP v1 (flat parameters),
DeepSpeed ZeRO, tensor parallelism and other DTensor layouts (``Replicate``, ``Shard`` on
another dim, 2-D meshes), and parameters sharded over meshes that differ.

Meshes are compared by what they are (:func:`mesh_key`: device type, shape, ranks, dimension
names), not by identity: each ``fully_shard(module)`` call without ``mesh=`` makes a default mesh
of its own, a different object equal in all of these, and a model sharded that way (torch's own
tutorials do) shards every parameter over the same processes alike.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

import torch
from torch import Tensor, nn

from .distributor import DDPOwners, Distributor, FSDP2Owners, LocalDistributor, is_dtensor
from .errors import RanksNotResponding, UnsupportedDistributedSetup
from .pairs import LoRAPair

__all__ = [
    "RanksNotResponding",
    "UnsupportedDistributedSetup",
    "check_module_supported",
    "check_pair_supported",
    "check_pairs_agree_across_ranks",
    "check_sharding",
    "check_tensor_supported",
    "make_distributor",
    "mesh_key",
    "sharding_mesh",
]

SUPPORTED = (
    "Supported: FSDP2 (torch.distributed.fsdp.fully_shard on a 1-D mesh: parameters sharded along dim 0), "
    "the supported way to shard; and DistributedDataParallel (torchrun, accelerate launch with DDP / "
    "MULTI_CPU / MULTI_GPU, transformers.Trainer on several processes)."
)


def _fsdp2_layout(t: Tensor) -> tuple[bool, str]:
    """Whether a DTensor is laid out as FSDP2's ``fully_shard`` lays parameters out (``Shard(0)``
    on a 1-D mesh), and a description of its layout."""
    from torch.distributed.tensor import Shard

    placements = tuple(t.placements)  # type: ignore[attr-defined]
    mesh = t.device_mesh  # type: ignore[attr-defined]
    ok = mesh.ndim == 1 and len(placements) == 1 and isinstance(placements[0], Shard) and placements[0].dim == 0
    return ok, f"placements {placements} on a {mesh.ndim}-D mesh"


def check_tensor_supported(t: Tensor, name: str) -> None:
    """Refuse parameters LoFT cannot step exactly: DTensors not laid out as FSDP2 lays them out
    (tensor parallelism, HSDP's 2-D meshes), FSDP flat parameters, ZeRO-3 partitions."""
    if is_dtensor(t):
        ok, layout = _fsdp2_layout(t)
        if not ok:
            raise UnsupportedDistributedSetup(
                f"{name} is a DTensor with {layout} (tensor parallelism or 2-D sharding): LoFTAdamW supports "
                f"DTensor parameters only as FSDP2's fully_shard makes them (Shard(0) on a 1-D mesh). {SUPPORTED}"
            )
    if getattr(t, "_is_flat_param", False):
        raise UnsupportedDistributedSetup(
            f"{name} is an FSDP (v1) FlatParameter: LoFTAdamW does not support FullyShardedDataParallel; "
            f"use FSDP2 (fully_shard) instead. {SUPPORTED}"
        )
    if hasattr(t, "ds_id") or hasattr(t, "ds_numel"):
        raise UnsupportedDistributedSetup(
            f"{name} is partitioned by DeepSpeed ZeRO-3: LoFTAdamW does not support ZeRO (it cannot follow "
            f"the partitions exactly); shard with FSDP2 (fully_shard) instead. {SUPPORTED}"
        )


def check_pair_supported(pair: LoRAPair) -> None:
    """A pair's factors must both be whole tensors, or both FSDP2 shards on the same mesh."""
    name = pair.name or "a LoRA pair"
    check_tensor_supported(pair.A, f"{name}.A")
    check_tensor_supported(pair.B, f"{name}.B")
    if is_dtensor(pair.A) != is_dtensor(pair.B):
        raise UnsupportedDistributedSetup(
            f"{name}: one factor is sharded (DTensor) and the other is not; shard the whole LoRA layer with "
            f"fully_shard. {SUPPORTED}"
        )
    if is_dtensor(pair.A):
        sharding_mesh([pair.A, pair.B], [f"{name}.A", f"{name}.B"])


def mesh_key(mesh: Any) -> tuple[Any, ...]:
    """What a ``DeviceMesh`` is, for comparing meshes: ``(device type, shape, ranks, dimension
    names)``, the ranks being this rank's mesh tensor flattened (for a mesh sliced from a larger
    one, the ranks of this rank's slice). Two meshes with the same key shard a tensor alike over
    the same processes. (torch's own ``DeviceMesh.__eq__`` also compares the creating thread and
    the layout's strides.)"""
    return (mesh.device_type, tuple(mesh.shape), tuple(mesh.mesh.flatten().tolist()), mesh.mesh_dim_names)


def _describe(key: tuple[Any, ...]) -> str:
    device, shape, ranks, names = key
    text = f"a {len(shape)}-D {device} mesh of shape {shape} over ranks {list(ranks)}"
    return text + (f" named {names}" if names else "")


def sharding_mesh(tensors: list[Tensor], names: list[str]) -> Any:
    """The one ``DeviceMesh`` the DTensors among ``tensors`` are sharded over (``None`` when none
    is a DTensor): the first one's, after checking that every other is equal to it
    (:func:`mesh_key`). ``names``: the tensors' names, for the message. Raises
    :class:`UnsupportedDistributedSetup` when they differ: the owners' gathers, scatters and the
    clipping norm's all-reduce run over one process group, which must hold every shard."""
    sharded = [(t.device_mesh, n) for t, n in zip(tensors, names) if is_dtensor(t)]  # type: ignore[attr-defined]
    if not sharded:
        return None
    first, first_name = sharded[0]
    key = mesh_key(first)
    for mesh, name in sharded[1:]:
        other = mesh_key(mesh)
        if other != key:
            raise UnsupportedDistributedSetup(
                f"{first_name} is sharded over {_describe(key)} but {name} over {_describe(other)}: LoFTAdamW needs "
                "every sharded parameter on one mesh (equal meshes are fine). Pass the same mesh to every fully_shard "
                f"call, or none (each call then makes the default mesh over all ranks). {SUPPORTED}"
            )
    return first


def check_sharding(pairs: list[LoRAPair], others: list[Tensor], names: dict[int, str] | None = None) -> Any:
    """The mesh the optimizer's sharded parameters live on, ``None`` when none is sharded. Either
    every pair is sharded or none is; every sharded tensor (factors, and ``others``: the heads,
    whose shards the clipping norm adds over the mesh's group) must be on meshes equal to each
    other (:func:`sharding_mesh`), so a model sharded by ``fully_shard`` calls without ``mesh=``
    (a default mesh per call) is accepted. ``names``: ``id(tensor) -> name`` for messages."""
    names = names or {}
    sharded = [is_dtensor(p.A) for p in pairs]
    if not any(sharded) and not any(is_dtensor(t) for t in others):
        return None
    if not all(sharded):
        raise UnsupportedDistributedSetup(
            "Some LoRA pairs or other parameters are sharded (FSDP2) and some LoRA pairs are not; shard the whole "
            f"model with fully_shard (its submodules first, then the root). {SUPPORTED}"
        )
    tensors = [t for p in pairs for t in (p.A, p.B)] + list(others)
    labels = [f"{p.name or 'a LoRA pair'}.{side}" for p in pairs for side in "AB"]
    labels += [names.get(id(t), f"a parameter of shape {tuple(t.shape)}") for t in others]
    return sharding_mesh(tensors, labels)


def make_distributor(
    pairs: list[LoRAPair], split_step: bool, others: list[Tensor] | None = None, names: dict[int, str] | None = None
) -> Distributor:
    """The distributor for these pairs: owners over the FSDP2 mesh when the factors are sharded
    (:func:`check_sharding`: one mesh, compared by what it is); owners over the default process
    group for whole factors with ``split_step`` under a running process group of several ranks;
    otherwise every pair stepped here. ``others``, ``names``: as for :func:`check_sharding`."""
    mesh = check_sharding(pairs, others or [], names)
    if mesh is not None:
        return FSDP2Owners(pairs, mesh.get_group())
    if split_step and torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_world_size() > 1:
            return DDPOwners(pairs, torch.distributed.group.WORLD)
    return LocalDistributor()


def check_module_supported(module: nn.Module) -> None:
    """Refuse a model wrapped in FSDP (v1); FSDP2 and ZeRO-3 are caught on the tensors."""
    for name, sub in module.named_modules():
        if type(sub).__name__ == "FullyShardedDataParallel":
            raise UnsupportedDistributedSetup(
                f"{name or 'the model'} is wrapped in FullyShardedDataParallel (FSDP v1): LoFTAdamW does not "
                f"support it; use FSDP2 (torch.distributed.fsdp.fully_shard) instead. {SUPPORTED}"
            )


#: Seconds ``check_pairs_agree_across_ranks`` waits for the other ranks (``LOFT_DIST_TIMEOUT``).
DEFAULT_TIMEOUT = 300.0
_rounds: dict[int, list] = {}


def _timeout(timeout: float | None) -> float:
    if timeout is not None:
        return float(timeout)
    try:
        return float(os.environ.get("LOFT_DIST_TIMEOUT", DEFAULT_TIMEOUT))
    except ValueError:
        return DEFAULT_TIMEOUT


def _default_store():
    try:
        from torch.distributed import distributed_c10d

        return distributed_c10d._get_default_group(), distributed_c10d._get_default_store()
    except (ImportError, AttributeError, RuntimeError, ValueError):  # pragma: no cover - other torch builds
        return None, None


def check_pairs_agree_across_ranks(
    signature: Iterable[tuple[str, tuple[int, ...], tuple[int, ...]]], timeout: float | None = None
) -> None:
    """When a process group is running, make sure every rank found the same LoRA pairs.

    ``signature``: ``(name, A.shape, B.shape)`` per pair, in optimizer order. Every rank must
    construct its optimizer (as data-parallel training does anyway). The ranks exchange their
    signatures through the process group's key-value store and wait at most ``timeout`` seconds
    (default ``$LOFT_DIST_TIMEOUT`` or 300) for each other: a rank that failed or stopped before
    constructing its optimizer is named in a :class:`RanksNotResponding` error instead of
    leaving the others waiting forever.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size()
    if world == 1:
        return
    rank = dist.get_rank()
    mine = [[n, list(a), list(b)] for n, a, b in signature]
    group, store = _default_store()
    if store is None:  # pragma: no cover - no store to wait on with a bound: plain all_gather
        gathered: list[object] = [None] * world
        dist.all_gather_object(gathered, mine)
    else:
        entry = _rounds.setdefault(id(group), [group, 0])  # (keeps the group alive, so its id is not reused)
        entry[1] += 1
        prefix = f"loft/pairs/{entry[1]}/"
        keys = [f"{prefix}{r}" for r in range(world)]
        store.set(keys[rank], json.dumps(mine))
        seconds = _timeout(timeout)
        try:
            store.wait(keys, timedelta(seconds=seconds))
        except RuntimeError:  # the store's timeout (DistStoreError is a RuntimeError)
            missing = [r for r in range(world) if not store.check([keys[r]])]
            if not missing:
                raise
            names = ", ".join(str(r) for r in missing)
            raise RanksNotResponding(
                f"LoFTAdamW on rank {rank} waited {seconds:g} s for rank(s) {names} of {world} to construct their "
                f"optimizer; every data-parallel rank must construct LoFTAdamW at the same point. Rank(s) {names} "
                "probably failed or stopped before it: see their output. (LOFT_DIST_TIMEOUT sets the wait, in seconds.)"
            ) from None
        gathered = [json.loads(store.get(k)) for k in keys]
    for other, theirs in enumerate(gathered):
        if theirs != mine:
            diff = next(
                (f"{tuple(x)} vs {tuple(y)}" for x, y in zip(mine, theirs) if x != y),  # type: ignore[arg-type]
                f"{len(mine)} pairs vs {len(theirs)} pairs",  # type: ignore[arg-type]
            )
            raise UnsupportedDistributedSetup(
                f"Rank {rank} and rank {other} found different LoRA pairs ({diff}). "
                "Every data-parallel rank must build the same model and adapter configuration."
            )
