"""LoFT's optimizer state and ``torch.distributed.checkpoint`` (DCP).

``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` / ``set_optimizer_state_dict``
(what Accelerate's and ``transformers.Trainer``'s FSDP2 checkpoints call) read
``optimizer.state_dict()``, rename its parameter numbers to parameter names, and, for loading,
use the state dict of the *fresh* optimizer as the template that DCP reads the saved tensors
into. A fresh optimizer has no state yet, so torch first fills it by a step with zero gradients
and learning rate 0 when ``optimizer.state`` is empty. LoFT cannot allow that step (with lr 0
it may still rebalance a pair's factors, changing ``A`` and ``B`` at the same product), and its
``optimizer.state`` is never empty (every factor has a view of its pair's state), so torch skips
it. Instead, when torch's ``get_optimizer_state_dict`` machinery asks, LoFT's ``state_dict()``
holds an entry for *every* trainable parameter: before a parameter's first step, zeros of the
right shapes with ``step`` 0 (:func:`add_templates`). Loading such an entry leaves the fresh
state (a pair's step-0 entry is skipped; AdamW's zeros at step 0 are its fresh state).

Everything else is LoFT's ordinary ``state_dict()`` / ``load_state_dict()``: with owners (FSDP2,
``split_step``) the state dict holds every pair's whole state on every rank (CPU tensors) and
the head's whole state, so a DCP checkpoint loads on any number of processes; DCP writes each
replicated tensor once.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import torch

from .distributor import local_part
from .linalg import compute_dtype, packed_index

if TYPE_CHECKING:  # pragma: no cover
    from .optim import LoFTAdamW

__all__ = ["add_templates", "called_by_torch_state_dict_api"]

#: The function of ``torch.distributed.checkpoint.state_dict`` that calls ``optimizer.state_dict()``
#: for ``get_optimizer_state_dict`` and ``set_optimizer_state_dict`` (torch 2.13; a private name,
#: checked by tests/test_dcp.py).
TORCH_DSD_MODULE = "torch.distributed.checkpoint.state_dict"
TORCH_DSD_GETTER = "_get_optim_state_dict"


def called_by_torch_state_dict_api() -> bool:
    """Whether ``state_dict()`` is being called by torch's ``get_optimizer_state_dict`` /
    ``set_optimizer_state_dict`` (their ``_get_optim_state_dict`` is on the call stack)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == TORCH_DSD_GETTER and frame.f_globals.get("__name__") == TORCH_DSD_MODULE:
            return True
        frame = frame.f_back
    return False


def add_templates(optimizer: LoFTAdamW, state_dict: dict[str, Any], params: list[torch.Tensor], device: torch.device | None) -> None:
    """Give every trainable parameter without an entry in ``state_dict["state"]`` a zero entry
    with ``step`` 0 (the fresh state). ``params``: the parameters in ``state_dict()`` order;
    ``device``: where the pairs' entries live (``None``: each pair's device).

    A LoRA factor's entry: ``exp_avg`` ``(r, k)``, ``exp_avg_sq`` ``(k, r(r+1)/2)`` (``(k, r)``
    without second-moment calibration), ``partner`` ``(l, r)`` in the compute dtype; another
    parameter's: AdamW's ``exp_avg`` / ``exp_avg_sq`` of its whole shape and a ``step`` tensor.
    """
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
        (m, n), r = pair.shape, pair.rank
        k, l = (n, m) if side == 0 else (m, n)
        cd = compute_dtype(pair.A.dtype)
        where = local_part(pair.A).device if device is None else device
        size = packed_index(r, not group_of[id(p)]["second_moment_calibration"], cd, where).size
        state[i] = {
            "step": 0,
            "exp_avg": torch.zeros(r, k, dtype=cd, device=where),
            "exp_avg_sq": torch.zeros(k, size, dtype=cd, device=where),
            "partner": torch.zeros(l, r, dtype=cd, device=where),
        }
