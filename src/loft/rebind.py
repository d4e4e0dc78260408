"""Following a wrapper that swaps the optimizer's parameters for sharded ones.

Accelerate's FSDP2 preparation (``accelerator.prepare(model, optimizer)``, which
``transformers.Trainer`` also runs with ``fsdp_version: 2``) needs the optimizer *before* it
shards the model: it calls ``fully_shard`` and then puts each new DTensor parameter in the
optimizer's ``param_groups`` at the position of the tensor it replaces
(``fsdp2_switch_optimizer_parameters``). :class:`~loft.LoFTAdamW` knows its tensors as LoRA
pairs and head parameters, so before it uses them (``step()``, ``grad_norm()``,
``state_dict()``, ``load_state_dict()``) it checks whether the tensors in ``param_groups`` are
still the ones it was built with (:func:`note_layout` records them) and, when a wrapper
replaced them, takes the new ones position by position (:func:`rebind_if_swapped`):

* a replacement must have the same global shape and dtype as the tensor it replaces, and be a
  layout LoFT supports (FSDP2's ``Shard(0)`` DTensors, or whole tensors); anything else (DeepSpeed
  ZeRO's flat partitions, FSDP v1's flat parameters) is refused, naming FSDP2;
* each :class:`~loft.LoRAPair` keeps its identity (so its state stays attached) and gets the new
  ``A`` and ``B``; the head parameters' state moves to the new tensors (their shards);
* the distributor is chosen again: FSDP2 shards get one owner rank per pair.

Factors sharded after the optimizer took steps are refused (shard, or prepare, before training).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from .distributed import UnsupportedDistributedSetup, check_pair_supported, check_tensor_supported, make_distributor
from .distributor import is_dtensor, shard_like
from .state import ParamStateView

if TYPE_CHECKING:  # pragma: no cover
    from .optim import LoFTAdamW

__all__ = ["note_layout", "rebind_if_swapped"]


def _ids(optimizer: LoFTAdamW) -> list[list[int]]:
    return [[id(p) for p in group["params"]] for group in optimizer.param_groups]


def note_layout(optimizer: LoFTAdamW) -> None:
    """Record which tensor sits at each position of ``param_groups`` (after construction and
    after every ``add_param_group``)."""
    optimizer._layout = _ids(optimizer)


def rebind_if_swapped(optimizer: LoFTAdamW) -> bool:
    """Take the tensors a wrapper put in ``param_groups`` in place of the ones the optimizer was
    built with (see the module docstring). Returns whether anything changed."""
    layout = getattr(optimizer, "_layout", None)
    if layout is None or layout == _ids(optimizer):
        return False
    if [len(g) for g in layout] != [len(g["params"]) for g in optimizer.param_groups]:
        raise UnsupportedDistributedSetup(
            "LoFTAdamW's param_groups hold tensors it was not built with (a different number of them): something "
            "replaced the optimizer's parameters. DeepSpeed ZeRO and other wrappers that flatten or partition them "
            "are not supported; shard with FSDP2 (torch.distributed.fsdp.fully_shard, or Accelerate / Trainer with "
            "fsdp_version 2), and add parameters with add_param_group."
        )
    by_id = {id(t): t for t in optimizer.state}  # state keeps the old tensors that have state alive
    for pair in optimizer._pairs:
        by_id[id(pair.A)], by_id[id(pair.B)] = pair.A, pair.B
    moved: list[tuple[Tensor, Tensor]] = []
    for old_ids, group in zip(layout, optimizer.param_groups):
        for old_id, new in zip(old_ids, group["params"]):
            if old_id != id(new):
                moved.append((by_id.get(old_id), new, old_id))  # type: ignore[arg-type]
    for old, new, old_id in moved:
        name = optimizer._param_names.get(old_id, f"a parameter of shape {tuple(new.shape)}")
        if old is not None and (tuple(old.shape) != tuple(new.shape) or old.dtype != new.dtype):
            raise UnsupportedDistributedSetup(
                f"{name} was replaced in LoFTAdamW's param_groups by a tensor of shape {tuple(new.shape)} / "
                f"{new.dtype} (it was {tuple(old.shape)} / {old.dtype}): a wrapper flattened or partitioned the "
                "parameters, which LoFT cannot follow exactly. Shard with FSDP2 (fully_shard, or Accelerate / "
                "Trainer with fsdp_version 2) instead."
            )
        check_tensor_supported(new, name)
    for old, new, old_id in moved:
        name = optimizer._param_names.pop(old_id, None)
        if name is not None:
            optimizer._param_names[id(new)] = name
        held = optimizer._pair_by_param.pop(old_id, None)
        if held is not None:
            pair, side = held
            if side == 0:
                pair.A = new
            else:
                pair.B = new
            optimizer._pair_by_param[id(new)] = held
            if old is not None:
                optimizer.state.pop(old, None)
            optimizer.state[new] = ParamStateView(optimizer._states, pair, side)
            continue
        if old_id in optimizer._plain_ids:
            optimizer._plain_ids.discard(old_id)
            optimizer._plain_ids.add(id(new))
            st = optimizer.state.pop(old, None) if old is not None else None
            if st:
                if is_dtensor(new):
                    st = {k: shard_like(v, new) if isinstance(v, Tensor) and v.shape == new.shape and v.dim() else v for k, v in st.items()}
                optimizer.state[new] = st
    for pair in optimizer._pairs:
        check_pair_supported(pair)
    optimizer._distributor = make_distributor(optimizer._pairs, optimizer.settings.split_step,
                                              optimizer._plain_params(), optimizer._param_names)
    if not optimizer._distributor.local and optimizer._states.batches():
        raise UnsupportedDistributedSetup(
            "LoFTAdamW's LoRA factors were sharded after it had taken steps; shard the model (or run "
            "accelerator.prepare) before training, and load a checkpoint after that."
        )
    optimizer._prepared = None
    note_layout(optimizer)
    return True
