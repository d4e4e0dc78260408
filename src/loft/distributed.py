"""What LoFT supports when training is spread over processes, and the checks that refuse the rest.

LoFT's step needs each pair's *whole* factors ``A`` and ``B`` (their ``r x r`` grams and the
full-space rebuild). Data parallelism keeps them whole on every rank: ``DistributedDataParallel``
(plain, through Accelerate, or under ``transformers.Trainer``) all-reduces gradients before
``step()``, every rank then computes the same update. Schemes that shard parameters or optimizer
state (FSDP, FSDP2 / DTensor, DeepSpeed ZeRO) give a rank only a slice, and LoFT would compute
wrong steps from it; they are refused with a message, never run silently.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

__all__ = ["check_pairs_agree_across_ranks", "check_tensor_supported", "check_module_supported"]

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


def check_pairs_agree_across_ranks(signature: Iterable[tuple[str, tuple[int, ...], tuple[int, ...]]]) -> None:
    """When a process group is running, make sure every rank found the same LoRA pairs.

    ``signature``: ``(name, A.shape, B.shape)`` per pair, in optimizer order. A collective: every
    rank must construct its optimizer (as data-parallel training does anyway).
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    world = torch.distributed.get_world_size()
    if world == 1:
        return
    mine = [(n, tuple(a), tuple(b)) for n, a, b in signature]
    gathered: list[object] = [None] * world
    torch.distributed.all_gather_object(gathered, mine)
    for rank, theirs in enumerate(gathered):
        if theirs != mine:
            diff = next(
                (f"{x} vs {y}" for x, y in zip(mine, theirs) if x != y),  # type: ignore[arg-type]
                f"{len(mine)} pairs vs {len(theirs)} pairs",  # type: ignore[arg-type]
            )
            raise UnsupportedDistributedSetup(
                f"Rank {torch.distributed.get_rank()} and rank {rank} found different LoRA pairs ({diff}). "
                "Every data-parallel rank must build the same model and adapter configuration."
            )
