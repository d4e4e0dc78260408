"""What LoFT supports when training is spread over processes, and the checks that refuse the rest.

LoFT's step needs each pair's *whole* factors ``A`` and ``B`` (their ``r x r`` grams and the
full-space rebuild). Data parallelism keeps them whole on every rank: ``DistributedDataParallel``
(plain, through Accelerate, or under ``transformers.Trainer``) all-reduces gradients before
``step()``, every rank then computes the same update. Schemes that shard parameters or optimizer
state (FSDP, FSDP2 / DTensor, DeepSpeed ZeRO) give a rank only a slice, and LoFT would compute
wrong steps from it; they are refused with a message, never run silently.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from datetime import timedelta

import torch
from torch import Tensor, nn

__all__ = ["RanksNotResponding", "check_pairs_agree_across_ranks", "check_tensor_supported", "check_module_supported"]

SUPPORTED = (
    "Supported: DistributedDataParallel (torchrun, accelerate launch with DDP / MULTI_CPU / MULTI_GPU, "
    "transformers.Trainer on several processes), where every rank holds the whole LoRA factors."
)


class UnsupportedDistributedSetup(RuntimeError):
    """A parallel set-up that shards LoRA factors or optimizer state."""


def _is_dtensor(t: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


def check_tensor_supported(t: Tensor, name: str) -> None:
    """Refuse sharded parameters: FSDP2 / tensor parallel (DTensor), FSDP flat parameters, ZeRO-3."""
    if _is_dtensor(t):
        raise UnsupportedDistributedSetup(
            f"{name} is a DTensor (FSDP2 fully_shard or tensor parallelism): LoFTAdamW needs whole LoRA "
            f"factors on every rank and does not support sharded parameters yet. {SUPPORTED}"
        )
    if getattr(t, "_is_flat_param", False):
        raise UnsupportedDistributedSetup(
            f"{name} is an FSDP FlatParameter: LoFTAdamW does not support FullyShardedDataParallel yet. {SUPPORTED}"
        )
    if hasattr(t, "ds_id") or hasattr(t, "ds_numel"):
        raise UnsupportedDistributedSetup(
            f"{name} is partitioned by DeepSpeed ZeRO-3: LoFTAdamW does not support ZeRO yet. {SUPPORTED}"
        )


def check_module_supported(module: nn.Module) -> None:
    """Refuse a model wrapped in FSDP (v1); FSDP2 and ZeRO-3 are caught on the tensors."""
    for name, sub in module.named_modules():
        if type(sub).__name__ == "FullyShardedDataParallel":
            raise UnsupportedDistributedSetup(
                f"{name or 'the model'} is wrapped in FullyShardedDataParallel: LoFTAdamW needs whole LoRA "
                f"factors on every rank and does not support FSDP yet. {SUPPORTED}"
            )


class RanksNotResponding(RuntimeError):
    """Another rank did not reach the optimizer's construction-time check in time."""


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
