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

The hooks that translate LoFT's stacked state to and from torch's per-parameter format live here
too (:class:`StateDictHooks`, registered by the optimizer). A LoRA factor's entry is a plain
per-parameter dict (``step``, ``exp_avg (r, k)``, ``exp_avg_sq (k, p)``, ``partner (l, r)``; see
:mod:`loft.state`); loading checks the saved state against the parameters (count; LoRA rank and
layer; the other parameters' shapes) and installs each loaded pair as a batch of its own.

Everything else is LoFT's ordinary ``state_dict()`` / ``load_state_dict()``: with owners (FSDP2,
``split_step``) the state dict holds every pair's whole state on every rank (CPU tensors) and
the head's whole state, so a DCP checkpoint loads on any number of processes; DCP writes each
replicated tensor once.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .distributor import is_dtensor, local_part, shard_like
from .linalg import compute_dtype, packed_index
from .pairs import LoRAPair
from .registry import ParamRegistry
from .state import STATE_KEYS, BatchState, ParamStateView, SideState

__all__ = ["FROZEN", "StateDictHooks", "add_templates", "fold_frozen_sides", "unfold_frozen_sides"]

#: the prefix of a frozen factor's state keys inside its trainable partner's entry
FROZEN = "frozen."


def _one_frozen(registry: ParamRegistry) -> list[tuple[Any, int]]:
    """``(pair, frozen side)`` of every pair with exactly one frozen factor (0: A, 1: B)."""
    return [(pair, 0 if not pair.A.requires_grad else 1) for pair in registry.pairs
            if pair.A.requires_grad != pair.B.requires_grad]


def fold_frozen_sides(registry: ParamRegistry, state_dict: dict[str, Any], params: list[Tensor]) -> None:
    """For every pair with one frozen factor that has state, move the frozen factor's entry of
    ``state_dict["state"]`` into the trainable factor's, its keys prefixed with :data:`FROZEN`
    (``step`` is the pair's, kept once). ``params``: the parameters in ``state_dict()`` order."""
    state = state_dict["state"]
    index = {id(p): i for i, p in enumerate(params)}
    for pair, side in _one_frozen(registry):
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
    registry: ParamRegistry, saved: dict[Any, Any], saved_ids: list[Any], params: list[Tensor]
) -> dict[Any, Any]:
    """The inverse of :func:`fold_frozen_sides` on a state being loaded: an entry holding
    :data:`FROZEN` keys gives its pair's other factor its entry back (with the pair's ``step``).
    Returns a new ``state`` dict (``saved`` is not changed); ``saved_ids``: the saved ids of
    ``params``, in order."""
    out = dict(saved)
    pid = {id(p): i for i, p in zip(saved_ids, params)}
    for pair in registry.pairs:
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


def add_templates(registry: ParamRegistry, param_groups: list[dict[str, Any]], state_dict: dict[str, Any],
                  device: torch.device | None) -> None:
    """Give every trainable parameter without an entry in ``state_dict["state"]`` a zero entry
    with ``step`` 0 (the fresh state), after folding each pair's frozen factor's state into its
    trainable factor's (:func:`fold_frozen_sides`). ``device``: where the pairs' entries live
    (``None``: each pair's device).

    A LoRA factor's entry: ``exp_avg`` ``(r, k)``, ``exp_avg_sq`` ``(k, r(r+1)/2)`` (``(k, r)``
    without second-moment calibration), ``partner`` ``(l, r)`` in the compute dtype, and the
    same of its frozen partner factor under :data:`FROZEN` keys where the pair has one; another
    parameter's: AdamW's ``exp_avg`` / ``exp_avg_sq`` of its whole shape and a ``step`` tensor.
    """
    params = [p for g in param_groups for p in g["params"]]
    fold_frozen_sides(registry, state_dict, params)
    state = state_dict["state"]
    group_of = {id(p): g for g in param_groups for p in g["params"]}
    for i, p in enumerate(params):
        if i in state or not p.requires_grad:
            continue
        held = registry.held(p)
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


def _zero_side(pair: Any, side: int, size: int, dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
    """Zeros of the shapes of a factor's state: ``exp_avg`` ``(r, k)``, ``exp_avg_sq`` ``(k, size)``,
    ``partner`` ``(l, r)`` (``k, l = n, m`` for A, ``m, n`` for B)."""
    (m, n), r = pair.shape, pair.rank
    k, l = (n, m) if side == 0 else (m, n)
    return {
        "exp_avg": torch.zeros(r, k, dtype=dtype, device=device),
        "exp_avg_sq": torch.zeros(k, size, dtype=dtype, device=device),
        "partner": torch.zeros(l, r, dtype=dtype, device=device),
    }


def _params(optimizer: Any) -> list[Tensor]:
    """The parameters in ``state_dict()`` order (their position is their id there)."""
    return [p for group in optimizer.param_groups for p in group["params"]]


class StateDictHooks:
    """The optimizer's state-dict hooks (torch calls each with the optimizer). They use its public
    ``param_groups``, ``state``, ``settings``, ``registry``, ``pair_states`` and ``distributor``
    only; what a load carries from the pre-hook to the post-hook is kept here."""

    def __init__(self) -> None:
        self._loaded: list[tuple[LoRAPair, dict[str, Any], dict[str, Any]]] = []

    def register(self, optimizer: Any) -> None:
        optimizer.register_state_dict_post_hook(self.pack)
        optimizer.register_load_state_dict_pre_hook(self.unpack)
        optimizer.register_load_state_dict_post_hook(self.install)

    # ------------------------------------------------------------------ state_dict()
    def pack(self, optimizer: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
        """``state_dict()`` post-hook: each LoRA factor's entry becomes a plain per-parameter dict
        (views of its batch's stacks; with owners, every rank's pairs gathered as CPU copies: a
        collective); with ``complete_state_dict`` (the default) every trainable parameter without
        state gets its step-0 template and a frozen factor's entry moves into its partner's
        (:func:`add_templates`), else it is left out before the pair's first step."""
        registry, states, dist = optimizer.registry, optimizer.pair_states, optimizer.distributor
        state = state_dict["state"]
        number = {pair: k for k, pair in enumerate(registry.pairs)}
        mine = {number[pair]: (states.param_state(pair, 0), states.param_state(pair, 1))
                for pair in registry.pairs if dist.owns(pair) and pair in states}
        everyone = dist.all_states(mine)
        for i, p in enumerate(_params(optimizer)):
            held = registry.held(p)
            if held is None:
                if i in state and any(is_dtensor(v) for v in state[i].values()):  # an FSDP2 shard: the whole state
                    state[i] = {k: v.full_tensor().cpu() if is_dtensor(v) else v for k, v in state[i].items()}
                continue
            saved = everyone.get(number[held[0]])
            st = {} if saved is None else saved[held[1]]
            if st:
                state[i] = st
            else:
                state.pop(i, None)
        if optimizer.settings.complete_state_dict:  # what torch's DCP API needs (see the module docstring)
            add_templates(registry, optimizer.param_groups, state_dict, dist.template_device)
        return state_dict

    # ------------------------------------------------------------------ load_state_dict()
    def unpack(self, optimizer: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
        """``load_state_dict`` pre-hook: check the saved state against the parameters, and take the
        LoRA factors' entries out (torch would cast them to the parameters' dtype); :meth:`install`
        turns them into batch states."""
        optimizer.follow_swapped_params()
        registry, params = optimizer.registry, _params(optimizer)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        if len(saved_ids) != len(params):
            raise ValueError(
                f"This optimizer state holds {len(saved_ids)} parameters but the optimizer has {len(params)}: "
                "it was saved for a different model or adapter configuration (target modules, adapters)."
            )
        saved = unfold_frozen_sides(registry, state_dict["state"], saved_ids, params)
        by_pair: dict[LoRAPair, list[dict[str, Any] | None]] = {}
        for pid, p in zip(saved_ids, params):
            st, held = saved.get(pid), registry.held(p)
            if held is None:
                _check_plain_state(registry.name(p), p, st)
                continue
            pair, side = held
            st = st if st and int(st.get("step", 1)) > 0 else None  # step 0: a template, the fresh state
            by_pair.setdefault(pair, [None, None])[side] = st
            if st:
                _check_factor_state(registry.name(p), pair, side, st)
        self._loaded = []
        for pair, (st_a, st_b) in by_pair.items():
            if (st_a is None) != (st_b is None) or (st_a and st_a["step"] != st_b["step"]):  # type: ignore[index]
                raise ValueError(f"Saved state for LoRA pair {pair.name or '(unnamed)'} is incomplete or inconsistent.")
            if st_a is not None:
                self._loaded.append((pair, st_a, st_b))  # type: ignore[arg-type]
        pair_ids = {pid for pid, p in zip(saved_ids, params) if registry.held(p) is not None}
        return {**state_dict, "state": {k: v for k, v in saved.items() if k not in pair_ids}}

    def install(self, optimizer: Any) -> None:
        """``load_state_dict`` post-hook: each loaded pair this rank steps becomes a batch of its
        own (the next step regroups the pairs), in the compute dtype, on the parameters' device;
        the other parameters' FSDP2 state keeps this rank's rows; the pairs' views are shown again."""
        registry, states, dist = optimizer.registry, optimizer.pair_states, optimizer.distributor
        states.clear()
        for pair, st_a, st_b in self._loaded:
            if not dist.owns(pair):
                continue  # another rank owns this pair: it keeps the state
            cd, device = compute_dtype(pair.A.dtype), pair.A.device
            sides = tuple(
                SideState(*(st[key].to(device=device, dtype=cd, copy=True).unsqueeze(0) for key in STATE_KEYS))
                for st in (st_a, st_b)
            )
            states.install(BatchState([pair], int(st_a["step"]), sides))  # type: ignore[arg-type]
        self._loaded = []
        for p in registry.plain_in(optimizer.param_groups):
            st = optimizer.state.get(p)
            if is_dtensor(p) and st:
                for key, value in list(st.items()):
                    if isinstance(value, Tensor) and not is_dtensor(value) and tuple(value.shape) == tuple(p.shape):
                        st[key] = shard_like(value, p)
        for pair in registry.pairs:  # torch's load made a new state dict: show the pairs' state again
            for side, t in enumerate((pair.A, pair.B)):
                optimizer.state[t] = ParamStateView(states, pair, side)


def _check_plain_state(name: str, p: Tensor, st: dict[str, Any] | None) -> None:
    for key in ("exp_avg", "exp_avg_sq"):
        value = None if not st else st.get(key)
        if isinstance(value, Tensor) and value.shape != p.shape:
            raise ValueError(
                f"Saved state for {name} has {key} of shape {tuple(value.shape)}, but the parameter has shape "
                f"{tuple(p.shape)}: the checkpoint was saved for a different model (another head size or number "
                "of labels, say)."
            )


def _check_factor_state(name: str, pair: LoRAPair, side: int, st: dict[str, Any]) -> None:
    (m, n), r = pair.shape, pair.rank
    k, l = (n, m) if side == 0 else (m, n)
    expected = {"exp_avg": [(r, k)], "exp_avg_sq": [(k, r * (r + 1) // 2), (k, r)], "partner": [(l, r)]}
    for key, shapes in expected.items():
        value = st.get(key)
        if not isinstance(value, Tensor) or tuple(value.shape) not in shapes:
            got = tuple(value.shape) if isinstance(value, Tensor) else value
            raise ValueError(
                f"Saved state for {name} has {key} {got}, expected {shapes[0]}: the checkpoint was saved with a "
                "different LoRA rank or layer."
            )
