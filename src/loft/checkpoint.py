"""What LoFT's ``state_dict()`` holds so that torch's checkpoint API restores everything.

``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` / ``set_optimizer_state_dict``
(what DCP users, Accelerate's and ``transformers.Trainer``'s FSDP2 checkpoints call) read
``optimizer.state_dict()``, rename its parameter numbers to parameter names, and, for loading,
use the state dict of the *fresh* optimizer as the template that DCP reads the saved tensors
into: only the entries the template has are loaded. Two things would otherwise be lost:

* **Parameters without state yet.** A fresh optimizer has no state, so its template would be
  empty and the load would silently restore nothing. torch fills an empty ``optimizer.state``
  by a step with zero gradients and learning rate 0; LoFT cannot allow that step (with lr 0 it
  may still rebalance a pair's factors, changing ``A`` and ``B`` at the same product, and its
  calibration and step count would move), and never gets it: its ``optimizer.state`` is never
  empty (every factor has a view of its pair's state, from construction on), so torch skips it.
  Instead ``state_dict()`` holds an entry for *every* trainable parameter: before a parameter's
  first step, zeros of the right shapes with ``step`` 0 (:func:`add_templates`). Loading such an
  entry leaves the fresh state (a pair's step-0 entry is skipped; AdamW's zeros at step 0 are
  its fresh state).
* **A pair's frozen factor.** A pair with one frozen factor (``requires_grad=False``: FFA-LoRA's
  ``A``, a federated client's factor of the other round) still has state on both sides (the
  frozen side's moments decay with zero gradients, and are used again once it trains), but
  torch's ``set_optimizer_state_dict`` keeps only the entries of parameters that require grad.
  So the frozen side's entry travels inside the trainable side's, as ``frozen.exp_avg``,
  ``frozen.exp_avg_sq`` and ``frozen.partner`` (:func:`fold_frozen_sides`; the step-0 template
  has them too), and ``load_state_dict`` takes it back out (:func:`unfold_frozen_sides`). Freeze
  the same factors before loading as when saving: DCP reads exactly the keys of the fresh
  optimizer's template.

Both are what ``state_dict()`` returns whoever calls it (``torch.save(optimizer.state_dict())``,
torch's API, Accelerate, Trainer): the ``complete_state_dict`` setting of
:class:`~loft.LoFTAdamW`, on by default. With ``complete_state_dict=False`` the state dict holds
only the parameters that have state, each factor under its own entry (smaller before the first
step; a fresh optimizer then offers DCP nothing to load into). ``load_state_dict`` accepts
either form, and checkpoints of earlier versions.

Everything else is LoFT's ordinary ``state_dict()`` / ``load_state_dict()``: with owners (FSDP2,
``split_step``) the state dict holds every pair's whole state on every rank (CPU tensors) and
the head's whole state, so a DCP checkpoint loads on any number of processes; DCP writes each
replicated tensor once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .distributor import local_part
from .linalg import compute_dtype, packed_index

if TYPE_CHECKING:  # pragma: no cover
    from .optim import LoFTAdamW

__all__ = ["FROZEN", "add_templates", "fold_frozen_sides", "unfold_frozen_sides"]

#: the prefix of a frozen factor's state keys inside its trainable partner's entry
FROZEN = "frozen."


def _one_frozen(optimizer: LoFTAdamW) -> list[tuple[Any, int]]:
    """``(pair, frozen side)`` of every pair with exactly one frozen factor (0: A, 1: B)."""
    return [(pair, 0 if not pair.A.requires_grad else 1) for pair in optimizer._pairs
            if pair.A.requires_grad != pair.B.requires_grad]


def fold_frozen_sides(optimizer: LoFTAdamW, state_dict: dict[str, Any], params: list[torch.Tensor]) -> None:
    """For every pair with one frozen factor that has state, move the frozen factor's entry of
    ``state_dict["state"]`` into the trainable factor's, its keys prefixed with :data:`FROZEN`
    (``step`` is the pair's, kept once). ``params``: the parameters in ``state_dict()`` order."""
    state = state_dict["state"]
    index = {id(p): i for i, p in enumerate(params)}
    for pair, side in _one_frozen(optimizer):
        frozen, live = index[id((pair.A, pair.B)[side])], index[id((pair.A, pair.B)[1 - side])]
        entry = state.pop(frozen, None)
        if not entry:
            continue
        if not state.get(live):  # a pair's two sides get state at the same step: both or neither
            raise RuntimeError(
                f"LoRA pair {pair.name or '(unnamed)'}: its frozen factor has optimizer state but its trainable "
                "factor has none, so the state cannot be carried in a complete state dict. This is a bug in "
                "loft; please report it with the optimizer's state_dict() keys."
            )
        state[live] = {**state[live], **{FROZEN + k: v for k, v in entry.items() if k != "step"}}


def unfold_frozen_sides(
    optimizer: LoFTAdamW, saved: dict[Any, Any], saved_ids: list[Any], params: list[torch.Tensor]
) -> dict[Any, Any]:
    """The inverse of :func:`fold_frozen_sides` on a state being loaded: an entry holding
    :data:`FROZEN` keys gives its pair's other factor its entry back (with the pair's ``step``).
    Returns a new ``state`` dict (``saved`` is not changed); ``saved_ids``: the saved ids of
    ``params``, in order."""
    out = dict(saved)
    pid = {id(p): i for i, p in zip(saved_ids, params)}
    for pair in optimizer._pairs:
        for side in (0, 1):
            live, other = pid.get(id((pair.A, pair.B)[side])), pid.get(id((pair.A, pair.B)[1 - side]))
            entry = out.get(live)
            if not isinstance(entry, dict) or not any(isinstance(k, str) and k.startswith(FROZEN) for k in entry):
                continue
            out[live] = {k: v for k, v in entry.items() if not k.startswith(FROZEN)}
            if other not in out or not out[other]:
                out[other] = {"step": entry.get("step", 0),
                              **{k[len(FROZEN):]: v for k, v in entry.items() if k.startswith(FROZEN)}}
    return out


def add_templates(
    optimizer: LoFTAdamW, state_dict: dict[str, Any], params: list[torch.Tensor], device: torch.device | None
) -> None:
    """Give every trainable parameter without an entry in ``state_dict["state"]`` a zero entry
    with ``step`` 0 (the fresh state), after folding each pair's frozen factor's state into its
    trainable factor's (:func:`fold_frozen_sides`). ``params``: the parameters in
    ``state_dict()`` order; ``device``: where the pairs' entries live (``None``: each pair's device).

    A LoRA factor's entry: ``exp_avg`` ``(r, k)``, ``exp_avg_sq`` ``(k, r(r+1)/2)`` (``(k, r)``
    without second-moment calibration), ``partner`` ``(l, r)`` in the compute dtype, and the
    same of its frozen partner factor under :data:`FROZEN` keys where the pair has one; another
    parameter's: AdamW's ``exp_avg`` / ``exp_avg_sq`` of its whole shape and a ``step`` tensor.
    """
    fold_frozen_sides(optimizer, state_dict, params)
    state = state_dict["state"]
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for i, p in enumerate(params):
        if i in state or not p.requires_grad:
            continue
        held = optimizer._pair_by_param.get(id(p))
        if held is None:
            where = local_part(p).device if device is None else device
            zeros = torch.zeros(tuple(p.shape), dtype=p.dtype, device=where)
            state[i] = {"step": torch.tensor(0.0), "exp_avg": zeros, "exp_avg_sq": zeros.clone()}
            continue
        pair, side = held
        cd = compute_dtype(pair.A.dtype)
        where = local_part(pair.A).device if device is None else device
        size = packed_index(pair.rank, not group_of[id(p)]["second_moment_calibration"], cd, where).size
        state[i] = {"step": 0, **_zero_side(pair, side, size, cd, where)}
        if not (pair.A, pair.B)[1 - side].requires_grad:
            state[i].update({FROZEN + k: v for k, v in _zero_side(pair, 1 - side, size, cd, where).items()})


def _zero_side(pair: Any, side: int, size: int, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Zeros of the shapes of a factor's state: ``exp_avg`` ``(r, k)``, ``exp_avg_sq`` ``(k, size)``,
    ``partner`` ``(l, r)`` (``k, l = n, m`` for A, ``m, n`` for B)."""
    (m, n), r = pair.shape, pair.rank
    k, l = (n, m) if side == 0 else (m, n)
    return {
        "exp_avg": torch.zeros(r, k, dtype=dtype, device=device),
        "exp_avg_sq": torch.zeros(k, size, dtype=dtype, device=device),
        "partner": torch.zeros(l, r, dtype=dtype, device=device),
    }
