"""Which tensors :class:`~loft.LoFTAdamW` holds and what each is: :class:`ParamRegistry`.

The optimizer's ``param_groups`` hold plain tensors, as torch's do; LoFT also needs to know which
of them form a LoRA pair (and which side of it each is), which are other parameters (heads,
``modules_to_save``, biases: plain AdamW), and what to call them in messages. The registry keeps
that, expands the modules a user passes into their pairs and other parameters, and follows a
wrapper that swaps the tensors in ``param_groups`` for sharded ones (:meth:`ParamRegistry.follow_swap`):

Accelerate's FSDP2 preparation (``accelerator.prepare(model, optimizer)``, which
``transformers.Trainer`` also runs with ``fsdp_version: 2``) needs the optimizer *before* it
shards the model: it calls ``fully_shard`` and then puts each new DTensor parameter in the
optimizer's ``param_groups`` at the position of the tensor it replaces. Before the optimizer uses
its tensors it asks :meth:`~ParamRegistry.swapped` whether ``param_groups`` still hold the ones
it recorded (:meth:`~ParamRegistry.note_layout`) and, when a wrapper replaced them, the registry
takes the new ones position by position:

* a replacement must have the same global shape and dtype as the tensor it replaces, and be a
  layout LoFT supports (FSDP2's ``Shard(0)`` DTensors, or whole tensors); anything else (DeepSpeed
  ZeRO's flat partitions, FSDP v1's flat parameters) is refused, naming FSDP2;
* each :class:`~loft.LoRAPair` keeps its identity (so its state stays attached) and gets the new
  ``A`` and ``B``; the other parameters' state moves to the new tensors (their shards).

The optimizer then chooses its distributor again (FSDP2 shards get one owner rank per pair).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .distributed import check_module_supported, check_pair_supported, check_tensor_supported
from .distributor import is_dtensor, shard_like
from .errors import UnsupportedDistributedSetup
from .pairs import LoRAPair, count_lora_layers, split_lora_parameters
from .state import PairStates, ParamStateView

__all__ = ["ParamRegistry"]


def _ids(param_groups: list[dict[str, Any]]) -> list[list[int]]:
    return [[id(p) for p in group["params"]] for group in param_groups]


class ParamRegistry:
    """The optimizer's tensors by kind: ``pairs`` (in the order they were added), each factor's
    ``(pair, side)``, the other parameters, and a name for each (for messages)."""

    def __init__(self) -> None:
        self.pairs: list[LoRAPair] = []
        self._by_param: dict[int, tuple[LoRAPair, int]] = {}  # id(param) -> (pair, 0 for A / 1 for B)
        self._plain: set[int] = set()
        self._names: dict[int, str] = {}
        self._modules: list[nn.Module] = []
        self._layout: list[list[int]] | None = None

    # ------------------------------------------------------------------ what each tensor is
    def held(self, p: Tensor) -> tuple[LoRAPair, int] | None:
        """``(pair, side)`` of a LoRA factor (side 0: ``A``, 1: ``B``), ``None`` for another tensor."""
        return self._by_param.get(id(p))

    def is_plain(self, p: Tensor) -> bool:
        """Whether ``p`` is one of the other parameters (stepped with AdamW)."""
        return id(p) in self._plain

    def knows(self, p: Tensor) -> bool:
        return id(p) in self._by_param or id(p) in self._plain

    def name(self, p: Tensor) -> str:
        return self._names.get(id(p), f"a parameter of shape {tuple(p.shape)}")

    @property
    def names(self) -> dict[int, str]:
        """``id(tensor) -> name``, for messages."""
        return dict(self._names)

    def plain_in(self, param_groups: list[dict[str, Any]]) -> list[Tensor]:
        """The other parameters, in ``param_groups`` order."""
        return [p for g in param_groups for p in g["params"] if id(p) in self._plain]

    # ------------------------------------------------------------------ adding
    def expand(self, items: Any) -> tuple[list[LoRAPair], list[Tensor]]:
        """A param group's ``"params"`` (modules, :class:`LoRAPair` objects, tensors) as its
        pairs and other tensors, each checked for a layout LoFT supports. Records nothing but the
        modules' parameter names."""
        items = [items] if isinstance(items, (Tensor, nn.Module, LoRAPair)) else list(items)
        pairs: list[LoRAPair] = []
        plain: list[Tensor] = []
        for item in items:
            if isinstance(item, nn.Module):
                check_module_supported(item)
                found, others = split_lora_parameters(item)
                pairs += found
                plain += others
                self._modules.append(item)
                self._names.update({id(p): n for n, p in item.named_parameters()})
            elif isinstance(item, LoRAPair):
                pairs.append(item)
            elif isinstance(item, Tensor):
                plain.append(item)
            else:
                raise TypeError(
                    f"LoFTAdamW params must be modules, loft.LoRAPair objects or tensors, got {type(item).__name__}."
                )
        for pair in pairs:
            check_pair_supported(pair)
        for t in plain:
            check_tensor_supported(t, self.name(t))
        return pairs, plain

    def add(self, pairs: list[LoRAPair], plain: list[Tensor]) -> None:
        """Record ``pairs`` and the other tensors ``plain`` (after the param group took them)."""
        self._plain.update(id(t) for t in plain)
        for pair in pairs:
            self.pairs.append(pair)
            for side, t in enumerate((pair.A, pair.B)):
                self._by_param[id(t)] = (pair, side)
            self._names.setdefault(id(pair.A), f"{pair.name}.A" if pair.name else "lora A")
            self._names.setdefault(id(pair.B), f"{pair.name}.B" if pair.name else "lora B")

    def no_pairs_message(self) -> str:
        """Why a model or parameter list gave LoFT no pair to train, and what to do."""
        if self._modules:
            layers = sum(count_lora_layers(m) for m in self._modules)
            kinds = ", ".join(sorted({type(m).__name__ for m in self._modules}))
            if layers:
                return (
                    f"{kinds} has {layers} LoRA layer(s) but none with trainable factors. Make the adapter "
                    "trainable (e.g. peft_model.set_adapter(name) or requires_grad_(True) on lora_A/lora_B)."
                )
            return (
                f"No LoRA layers found in {kinds}. LoFTAdamW trains LoRA adapters: wrap the model first, "
                "e.g. model = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=[...])), "
                "or pass explicit pairs with loft.LoRAPair(A, B, scaling). For a model without adapters "
                "use torch.optim.AdamW."
            )
        return (
            "LoFTAdamW got tensors but no LoRA pairs. Pass the model itself, LoFTAdamW(model), not "
            "model.parameters(): LoFT must know which tensors form a LoRA pair (A, B, scaling). For "
            "your own LoRA modules pass loft.LoRAPair(A, B, scaling) objects (tensors may follow)."
        )

    # ------------------------------------------------------------------ a wrapper's swap
    def note_layout(self, param_groups: list[dict[str, Any]]) -> None:
        """Record which tensor sits at each position of ``param_groups``."""
        self._layout = _ids(param_groups)

    def swapped(self, param_groups: list[dict[str, Any]]) -> bool:
        """Whether a wrapper put other tensors in ``param_groups`` since :meth:`note_layout`."""
        return self._layout is not None and self._layout != _ids(param_groups)

    def follow_swap(self, param_groups: list[dict[str, Any]], state: dict[Tensor, Any], pair_states: PairStates) -> None:
        """Take the tensors a wrapper put in ``param_groups`` in place of the recorded ones (see
        the module docstring); ``state``: the optimizer's ``state`` (moved to the new tensors)."""
        layout = self._layout or []
        if [len(g) for g in layout] != [len(g["params"]) for g in param_groups]:
            raise UnsupportedDistributedSetup(
                "LoFTAdamW's param_groups hold tensors it was not built with (a different number of them): something "
                "replaced the optimizer's parameters. DeepSpeed ZeRO and other wrappers that flatten or partition them "
                "are not supported; shard with FSDP2 (torch.distributed.fsdp.fully_shard, or Accelerate / Trainer with "
                "fsdp_version 2), and add parameters with add_param_group."
            )
        by_id = {id(t): t for t in state}  # state keeps the old tensors that have state alive
        for pair in self.pairs:
            by_id[id(pair.A)], by_id[id(pair.B)] = pair.A, pair.B
        moved = [(by_id.get(old_id), new, old_id) for old_ids, group in zip(layout, param_groups)
                 for old_id, new in zip(old_ids, group["params"]) if old_id != id(new)]
        for old, new, old_id in moved:
            self._check_replacement(old, new, self._names.get(old_id, f"a parameter of shape {tuple(new.shape)}"))
        for old, new, old_id in moved:
            self._take(old, new, old_id, state, pair_states)
        for pair in self.pairs:
            check_pair_supported(pair)
        self.note_layout(param_groups)

    @staticmethod
    def _check_replacement(old: Tensor | None, new: Tensor, name: str) -> None:
        if old is not None and (tuple(old.shape) != tuple(new.shape) or old.dtype != new.dtype):
            raise UnsupportedDistributedSetup(
                f"{name} was replaced in LoFTAdamW's param_groups by a tensor of shape {tuple(new.shape)} / "
                f"{new.dtype} (it was {tuple(old.shape)} / {old.dtype}): a wrapper flattened or partitioned the "
                "parameters, which LoFT cannot follow exactly. Shard with FSDP2 (fully_shard, or Accelerate / "
                "Trainer with fsdp_version 2) instead."
            )
        check_tensor_supported(new, name)

    def _take(self, old: Tensor | None, new: Tensor, old_id: int, state: dict[Tensor, Any],
              pair_states: PairStates) -> None:
        """``new`` in place of the tensor whose id was ``old_id`` (``old``: it, where still alive)."""
        name = self._names.pop(old_id, None)
        if name is not None:
            self._names[id(new)] = name
        held = self._by_param.pop(old_id, None)
        if held is not None:
            pair, side = held
            if side == 0:
                pair.A = new
            else:
                pair.B = new
            self._by_param[id(new)] = held
            if old is not None:
                state.pop(old, None)
            state[new] = ParamStateView(pair_states, pair, side)
            return
        if old_id in self._plain:
            self._plain.discard(old_id)
            self._plain.add(id(new))
            st = state.pop(old, None) if old is not None else None
            if st:
                if is_dtensor(new):
                    st = {k: shard_like(v, new) if isinstance(v, Tensor) and v.shape == new.shape and v.dim() else v
                          for k, v in st.items()}
                state[new] = st
