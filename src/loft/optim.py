"""``LoFTAdamW``: the LoFT optimizer as a drop-in ``torch.optim.Optimizer``.

The math is in :mod:`loft.functional` (the step of a batch of pairs, in the paper's order) on
top of :mod:`loft.linalg`; the pairs' state in :mod:`loft.state`; the options in
:mod:`loft.options`. This module keeps the bookkeeping: it groups the pairs (:mod:`loft.registry`
finds them) into batches, stacks their factors and gradients as its distributor
(:mod:`loft.distributor`) gives them, runs the functional step's phases, hands the new factors
back, and steps the other parameters with AdamW; :mod:`loft.checkpoint` translates the state to
and from ``state_dict()``.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.adamw import adamw as _adamw_functional

from .checkpoint import StateDictHooks
from .distributed import check_pairs_agree_across_ranks, check_sharding, make_distributor
from .distributor import Distributor, LocalDistributor, Whole, all_finite, is_dtensor, local_part
from .errors import UnsupportedDistributedSetup
from .functional import (
    PendingStep,
    PreparedStep,
    StepResult,
    apply_step,
    clip_coefficient,
    new_factors,
    prepare_step,
    rebalance_steps,
    settle_steps,
    step_sq_norm,
)
from .linalg import compute_dtype, packed_index
from .options import SETTING_KEYS, SWITCHES, LoFTOptions, Settings, check_group, options_doc
from .pairs import LoRAPair, warn_about_ranks_between
from .registry import ParamRegistry
from .state import BatchState, PairStates, ParamStateView

__all__ = ["LoFTAdamW", "SWITCHES"]


@dataclass
class _Batch:
    """A batch of pairs prepared for this step: same factor shapes, dtype, device, param group,
    step count and scaling; ``prep`` their stacked, settled preparation; ``state`` their state."""

    pairs: list[LoRAPair]
    group: dict[str, Any]
    prep: PreparedStep
    state: BatchState


@dataclass
class _Preparation:
    """Everything this step computes from the gradients before any state changes, shared by
    :meth:`LoFTAdamW.grad_norm` and :meth:`LoFTAdamW.step` while the gradients are unchanged."""

    batches: list[_Batch]
    fingerprint: tuple[Any, ...]
    with_norm: bool  # the scaled gradients that the projected norm needs are there


class LoFTAdamW(Optimizer):
    r"""LoFT: AdamW for LoRA adapters that takes the step full fine-tuning would take,
    projected onto the adapter's subspace (Tastan et al., ICLR 2026).

    .. code-block:: text

        input: pairs (A: r x n, B: m x r, scaling s), other parameters theta,
               lr, betas (b1, b2), eps, weight decay wd, max_grad_norm, switches
        for t = 1, 2, ...:
          for each batch of pairs of one shape (stacked; U = s B, G = dL/d(U A)):
            1  gA = (U^T U)^-1 grad_A,  gU = (grad_B / s) (A A^T)^-1        scaled gradients
          5  c = min(1, max_grad_norm / (norm + 1e-6)),                      clipping coefficient
               norm^2 = sum_pairs ||proj G||^2 + sum ||grad_theta||^2
          for each batch, for each side (F, P) in ((A, U), (U^T, A^T)):
            2  C = (P^T P)^-1 P^T P_prev;  m <- C m;  S_j <- C S_j C^T       calibration
               P_prev <- P
            3  m <- b1 m + (1 - b1) c g;  S_j <- b2 S_j + (1 - b2) c^2 g_j g_j^T   moments
            4  if F moves at t (B on odd t, A on even t):                    projected AdamW
                 D = (P m / (1 - b1^t)) / (sqrt(V / (1 - b2^t)) + eps),  V_ij = P_i^T S_j P_i
                 F <- (1 - lr wd) F - lr (P^T P)^-1 P^T D
          rebalance (U, A) when their grams drift apart (same U A)
          write back A and B = U / s
          theta <- AdamW(theta, c grad_theta)                                the other parameters

    The code follows this box line by line: :func:`loft.functional.prepare_pair` (1),
    :func:`~loft.functional.pair_sq_norm` and :func:`~loft.functional.clip_coefficient` (5),
    :func:`~loft.functional.loft_step` (2, 3, 4, rebalancing).

    Args:
        params: the model (a PEFT model, any module holding PEFT LoRA layers, or either wrapped
            in ``DistributedDataParallel``); or an iterable of :class:`~loft.LoRAPair` objects
            and tensors; or a list of param-group dicts whose ``"params"`` hold modules, pairs
            and tensors. Modules are expanded into their LoRA pairs (LoFT) and their other
            trainable parameters (plain AdamW). A plain iterable of tensors such as
            ``model.parameters()`` is refused: LoFT must know which tensors form a pair.
        the options (:class:`loft.options.LoFTOptions` defines each once: its default, whether it
            is a param-group key or a setting of how the step computes, and this text):

{options}

    Every param-group key may be overridden by a param-group dict, as in torch; the settings form
    ``optimizer.settings`` (:class:`loft.options.Settings`). State and solves are float32 for
    float32 / bfloat16 / float16 parameters and float64 for float64 ones. Parameters that are not
    LoRA factors follow ``torch.optim.AdamW`` exactly. A pair's state lives in a
    :class:`loft.state.BatchState` shared with the pairs it is stepped with;
    ``optimizer.state[param]`` and ``state_dict()`` show it per parameter.
    """

    def __init__(
        self,
        params: nn.Module | Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        max_grad_norm: float | None = None,
        *,
        head_lr: float | None = None,
        head_weight_decay: float | None = None,
        gradient_scaling: bool = True,
        alternating_updates: bool = True,
        first_moment_calibration: bool = True,
        second_moment_calibration: bool = True,
        projected_update: bool = True,
        projected_clipping: bool = True,
        rebalance: bool = True,
        rebalance_threshold: float = 10.0,
        damping: float | None = None,
        chunk_bytes: int = 4 * 2**20,
        nonfinite_grads: str = "skip",
        batch_pairs: bool = True,
        split_step: bool = False,
        fuse_elementwise: bool | None = None,
        complete_state_dict: bool = True,
        **unknown: Any,
    ) -> None:
        given = locals()
        values = {f.name: given[f.name] for f in fields(LoFTOptions)}
        if unknown:
            name = next(iter(unknown))
            close = difflib.get_close_matches(name, list(values), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"LoFTAdamW got an unknown option {name!r}.{hint} Options: {', '.join(values)}.")
        if isinstance(values["betas"], list):
            values["betas"] = tuple(values["betas"])
        options = LoFTOptions(**values)  # validates every option
        #: how the step computes (batching, memory budget, non-finite policy, split across ranks)
        self.settings = Settings(**{k: values[k] for k in SETTING_KEYS})
        defaults = options.group()
        #: total gradient norm (clipping norm) seen by the last step, when clipping is on
        self.last_grad_norm: Tensor | None = None
        #: how many steps were skipped because of non-finite gradients
        self.skipped_steps = 0
        #: which tensors are LoRA factors (of which pair, which side) and which are other parameters
        self.registry = ParamRegistry()
        #: the LoRA pairs' LoFT state, one :class:`~loft.state.BatchState` per batch
        self.pair_states = PairStates()
        self._prepared: _Preparation | None = None
        #: pair -> ((A changed, B changed), stamp): what the last step of the pair wrote (0 nothing,
        #: 1 a new factor, 2 maybe: compare) and the factors' version stamp right after it
        self._written: dict[LoRAPair, tuple[tuple[int, int], tuple[Any, ...]]] = {}
        groups = [self._expanded(g) for g in _as_param_groups(params)]
        pairs = [p for g in groups for p in g["params"] if isinstance(p, LoRAPair)]
        if not pairs:
            raise ValueError(self.registry.no_pairs_message())
        check_pairs_agree_across_ranks((p.name, p.A.shape, p.B.shape) for p in pairs)
        plain = [t for g in groups for t in g["params"] if isinstance(t, Tensor)]
        self._distributor: Distributor = make_distributor(pairs, self.settings.split_step, plain, self.registry.names)
        super().__init__(groups, defaults)
        warn_about_ranks_between(pairs)
        self.register_state_dict_pre_hook(LoFTAdamW.follow_swapped_params)
        StateDictHooks().register(self)
        self.register_load_state_dict_post_hook(LoFTAdamW._forget_what_was_written)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # groups saved before an option existed get its default (the constructor's value)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    # ----------------------------------------------------------------------------- set-up
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group whose ``"params"`` may hold modules, :class:`LoRAPair` objects and tensors."""
        if not isinstance(param_group, dict):
            raise TypeError(f"A param group must be a dict, got {type(param_group).__name__}.")
        group = dict(param_group)
        pairs, plain = self.registry.expand(group.get("params", []))
        unknown = set(group) - {"params", *self.defaults}
        if unknown:
            name = sorted(unknown)[0]
            close = difflib.get_close_matches(name, list(self.defaults), n=1)
            if close:  # other extra keys (names, tags) are allowed, as in torch
                raise ValueError(f"Param group has unknown option {name!r}. Did you mean {close[0]!r}?")
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        check_group(group)
        norms = {g["max_grad_norm"] for g in self.param_groups} | {group["max_grad_norm"]}
        if len(norms) > 1:
            raise ValueError(
                f"Param groups with different max_grad_norm ({sorted(norms, key=str)}): clipping is by the norm "
                "over all groups, so every group must hold the same max_grad_norm."
            )
        group["params"] = [t for p in pairs for t in (p.A, p.B)] + plain
        head_lr, head_weight_decay = group["head_lr"], group["head_weight_decay"]
        if plain and (head_lr is not None or head_weight_decay is not None):
            head_group = dict(group, params=plain)
            if head_lr is not None:
                head_group["lr"] = head_lr
            if head_weight_decay is not None:
                head_group["weight_decay"] = head_weight_decay
            group["params"] = group["params"][: 2 * len(pairs)]
            if group["params"]:
                super().add_param_group(group)
            super().add_param_group(head_group)
        else:
            super().add_param_group(group)
        self.registry.add(pairs, plain)
        for pair in pairs:
            for side, t in enumerate((pair.A, pair.B)):
                self.state[t] = ParamStateView(self.pair_states, pair, side)
        # (the distributor was chosen from every group before torch's constructor added them here)
        mesh = check_sharding(self.registry.pairs, self.registry.plain_in(self.param_groups), self.registry.names)
        if (mesh is not None) != self._distributor.sharded:
            raise UnsupportedDistributedSetup(
                "add_param_group: the new parameters are sharded (FSDP2) and the optimizer's are not, or the other "
                "way round; shard the whole model with fully_shard before constructing LoFTAdamW."
            )
        self._distributor.add_pairs(pairs)
        self._prepared = None
        self.registry.note_layout(self.param_groups)  # to follow a wrapper that swaps the tensors

    def _expanded(self, group: dict[str, Any]) -> dict[str, Any]:
        """``group`` with its modules expanded into their pairs and other parameters."""
        if not isinstance(group, dict):
            raise TypeError(f"A param group must be a dict, got {type(group).__name__}.")
        pairs, plain = self.registry.expand(group.get("params", []))
        return {**group, "params": [*pairs, *plain]}

    def follow_swapped_params(self) -> bool:
        """Take the tensors a wrapper (Accelerate's or Trainer's FSDP2 ``prepare``) put in
        ``param_groups`` in place of the ones the optimizer was built with, and choose the
        distributor again (:meth:`loft.registry.ParamRegistry.follow_swap`). Called before the
        optimizer uses its tensors; returns whether anything changed."""
        if not self.registry.swapped(self.param_groups):
            return False
        self.registry.follow_swap(self.param_groups, self.state, self.pair_states)
        plain = self.registry.plain_in(self.param_groups)
        self._distributor = make_distributor(self.registry.pairs, self.settings.split_step, plain, self.registry.names)
        if not isinstance(self._distributor, LocalDistributor) and self.pair_states.batches():
            raise UnsupportedDistributedSetup(
                "LoFTAdamW's LoRA factors were sharded after it had taken steps; shard the model (or run "
                "accelerator.prepare) before training, and load a checkpoint after that."
            )
        self._prepared = None
        return True

    def _forget_what_was_written(self) -> None:
        """After a load: the pairs' partners are compared again, and nothing prepared is kept."""
        self._written.clear()
        self._prepared = None

    # ----------------------------------------------------------------------------- preparation
    def _fingerprint(self) -> tuple[Any, ...]:
        """What a preparation depends on besides the state: each pair's factors and gradients
        (their tensor version counters), scalings, and every group option (the prepared step
        carries them all: :class:`loft.options.LoFTOptions`)."""
        items: list[Any] = []
        for pair in self.registry.pairs:
            for t in (pair.A, pair.B):
                g = t.grad
                items += (t._version, t.requires_grad, None if g is None else (id(g), g._version))
        items += [pair.scale() for pair in self.registry.pairs]
        items += [LoFTOptions.of_group(group) for group in self.param_groups]
        return tuple(items)

    def _prepare(self, with_norm: bool) -> _Preparation:
        """Step 1 for every batch of pairs with gradients, or the preparation :meth:`grad_norm`
        made if nothing changed since. ``with_norm``: a norm will be taken (projected clipping
        needs the scaled gradients even where gradient scaling is off)."""
        self.follow_swapped_params()  # Accelerate's FSDP2 prepare swapped the parameters
        fingerprint = self._fingerprint()
        cached = self._prepared
        dist = self._distributor
        reuse = cached is not None and cached.fingerprint == fingerprint and (cached.with_norm or not with_norm)
        # every rank takes part in each gather: reuse only when all ranks can (one all-reduce with owners)
        reuse = dist.all_agree(reuse, self._device())
        if reuse:
            assert cached is not None
            return cached
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError(
                        f"LoFTAdamW does not support sparse gradients ({self.registry.name(p)}). Use dense "
                        "gradients (e.g. nn.Embedding(..., sparse=False))."
                    )
                if not self.registry.knows(p):
                    raise UnsupportedDistributedSetup(
                        f"LoFTAdamW's param_groups hold a tensor of shape {tuple(p.shape)} it was not built with. "
                        "Something replaced the optimizer's parameters (DeepSpeed ZeRO and other wrappers that "
                        "flatten or partition them are not supported); add parameters with add_param_group."
                    )
        # the whole factors and gradients of the pairs stepped here (a collective with owners)
        wholes = dist.gather(self.registry.pairs)
        pending: list[tuple[list[LoRAPair], dict[str, Any], BatchState, PendingStep]] = []
        for group in self.param_groups:
            options = LoFTOptions.of_group(group)
            grouped: dict[tuple[Any, ...], list[LoRAPair]] = {}
            for p in group["params"]:
                held = self.registry.held(p)
                if held is None:
                    continue
                pair, side = held
                if side == 0 and pair in wholes:
                    trainable = (pair.A.requires_grad, pair.B.requires_grad)
                    key = (pair.A.shape, pair.B.shape, pair.A.dtype, pair.A.device, self.pair_states.step_of(pair),
                           pair.scale(), trainable)
                    grouped.setdefault(key if self.settings.batch_pairs else (id(pair),), []).append(pair)
            for pairs in grouped.values():
                state = self._batch_state(pairs, options)
                pending.append((pairs, group, state, self._prepare_batch(pairs, [wholes[p] for p in pairs], state,
                                                                          options, with_norm)))
        settled = settle_steps([p for *_, p in pending])  # one host sync for every batch
        batches = [_Batch(pairs, group, prep, state) for (pairs, group, state, _), prep in zip(pending, settled)]
        self._prepared = _Preparation(batches, fingerprint, with_norm)
        return self._prepared

    def _batch_state(self, pairs: list[LoRAPair], options: LoFTOptions) -> BatchState:
        """The state of exactly these pairs as one batch (regrouped if needed; fresh before their first step)."""
        if self.pair_states.step_of(pairs[0]) > 0:
            return self.pair_states.batch_for(pairs)
        cd, device = compute_dtype(pairs[0].A.dtype), local_part(pairs[0].A).device
        size = packed_index(pairs[0].rank, not options.second_moment_calibration, cd, device).size
        return self.pair_states.batch_for(pairs, fresh=BatchState.for_pairs(pairs, size, cd, device))

    def _prepare_batch(self, pairs: list[LoRAPair], wholes: list[Whole], state: BatchState, options: LoFTOptions,
                       with_norm: bool) -> PendingStep:
        """Phase 1 of the step for one batch: its factors and gradients stacked ``(b, ...)`` in the
        compute dtype, and what the optimizer knows of which partners moved (the rest is compared
        on the device, in the same host sync)."""
        cd = compute_dtype(pairs[0].A.dtype)
        flags = [self._partner_flags(pair) for pair in pairs]
        known = {0: False, 1: True, 2: None}  # 2: unknown, compare (the A side's partner is U (B), B's is A)
        moved = ([known[f[1]] for f in flags], [known[f[0]] for f in flags])
        return prepare_step(
            _stack([w.a for w in wholes], cd),  # A: (b, r, n)
            _stack([w.b for w in wholes], cd),  # B: (b, m, r)
            _stack([w.grad_a for w in wholes], cd),
            _stack([w.grad_b for w in wholes], cd),
            state,
            scaling=pairs[0].scale(),
            options=options,
            trainable=(pairs[0].A.requires_grad, pairs[0].B.requires_grad),
            moved=moved,
            with_norm=with_norm,
        )

    def _stamp(self, pair: LoRAPair) -> tuple[Any, ...]:
        """What changes when anything writes a factor in place or replaces it, or the scaling changes."""
        a, b = local_part(pair.A), local_part(pair.B)
        return (a._version, b._version, a.data_ptr(), b.data_ptr(), pair.scale())

    def _partner_flags(self, pair: LoRAPair) -> tuple[int, int]:
        """Whether ``A`` and ``B`` changed since the pair's last step: 0 no, 1 yes (the optimizer
        wrote a new factor), 2 unknown (compare): after a load, a change outside the optimizer
        (the version stamp moved), a rebalancing check, or, with owners, any factor the owner did
        not write (another rank may have changed its rows)."""
        known = self._written.get(pair)
        if known is None or known[1] != self._stamp(pair):
            return (2, 2)
        return self._distributor.known_writes(known[0])

    def _plain_with_grads(self) -> list[tuple[dict[str, Any], list[Tensor]]]:
        return [
            (group, [p for p in group["params"] if self.registry.is_plain(p) and p.grad is not None])
            for group in self.param_groups
        ]

    def _total_norm(self, prepared: _Preparation, plain: list[tuple[dict[str, Any], list[Tensor]]]) -> Tensor:
        """5: the clipping norm, sqrt of the pairs' projected and the other parameters' plain
        squared norms (float64, on the first parameter's device; one sync)."""
        terms = [step_sq_norm(b.prep) for b in prepared.batches]
        dist = self._distributor
        terms += [local_part(p.grad).double().square().sum() for _, ps in plain for p in ps if dist.counts_plain(p)]
        device = self._device()
        if not terms:
            total = torch.zeros((), dtype=torch.float64, device=device)
        else:
            total = torch.cat([t.to(device=device, dtype=torch.float64).reshape(-1) for t in terms]).sum()
        return dist.sum(total).sqrt()

    def _device(self) -> torch.device:
        return local_part(self.registry.pairs[0].A).device

    def _max_grad_norm(self) -> float | None:
        norms = {group["max_grad_norm"] for group in self.param_groups}
        if len(norms) > 1:
            raise ValueError(
                f"Param groups with different max_grad_norm ({sorted(norms, key=str)}): clipping is by the norm "
                "over all groups, so every group must hold the same max_grad_norm."
            )
        norm = norms.pop()
        return None if norm is None else float(norm)

    # ----------------------------------------------------------------------------- clipping
    @torch.no_grad()
    def grad_norm(self) -> Tensor:
        """The norm LoFT clips by, for the current gradients and the next step's active factors:
        the projected full-gradient norm of each pair plus the plain norm of the other parameters
        (float32 scalar). When a gradient holds inf or NaN it is the plain norm of all gradients,
        inf or nan, as ``torch.nn.utils.clip_grad_norm_`` reports it.

        The preparation it makes (stacked factors, grams, solves) is kept for the next
        :meth:`step`, which reuses it if the gradients, factors and options are unchanged.
        """
        prepared, plain = self._prepare(with_norm=True), self._plain_with_grads()
        total = self._total_norm(prepared, plain)
        # a non-finite gradient of a factor that does not move next is not in LoFT's norm
        finite = self._finite_everywhere(prepared, plain)
        if not (bool(torch.isfinite(total)) and finite):
            total = self._plain_total_norm()
        return total.float()

    def _plain_total_norm(self) -> Tensor:
        """The plain norm of all gradients (what torch reports for a non-finite gradient)."""
        dist = self._distributor
        grads = [local_part(p.grad) for g in self.param_groups for p in g["params"] if p.grad is not None and dist.counts_plain(p)]
        squares = [g.double().square().sum().to(self._device()) for g in grads]
        total = torch.stack(squares).sum() if squares else torch.zeros((), dtype=torch.float64, device=self._device())
        return dist.sum(total).sqrt()

    @torch.no_grad()
    def scale_grads_(self, coef: Tensor | float) -> None:
        """Multiply every gradient by ``coef`` in place (clipping outside the step), keeping the
        preparation of :meth:`grad_norm` valid for :meth:`step`: its stacked gradients and scaled
        gradients are scaled by the same number (linear in the gradient; the same values as a
        fresh preparation up to rounding)."""
        coef_t = torch.as_tensor(coef)
        prepared = self._prepared
        valid = prepared is not None and prepared.fingerprint == self._fingerprint()
        if valid and float(coef_t) != 1.0:
            factor = float(coef_t)
            for batch in prepared.batches:  # before the gradients: a lone pair's stack may be a view of its gradient
                batch.prep = batch.prep.grads_scaled_by(factor)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    g = local_part(p.grad)
                    g.mul_(coef_t.to(device=g.device, dtype=g.dtype))
        if valid:
            prepared.fingerprint = self._fingerprint()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch's; also drops a kept preparation (it holds the stacked gradients)."""
        self._prepared = None
        super().zero_grad(set_to_none)

    # ----------------------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One LoFT step for every pair and one AdamW step for every other parameter."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        max_norm = self._max_grad_norm()
        prepared = self._prepare(with_norm=max_norm is not None)
        self._prepared = None  # the step changes the factors: a preparation is used once
        plain = self._plain_with_grads()
        if not self._all_finite(prepared, plain):
            return loss
        coef = None
        if max_norm is not None:
            self.last_grad_norm = self._total_norm(prepared, plain)
            coef = clip_coefficient(self.last_grad_norm, max_norm)  # stays on the device
        fuse = self.settings.fuses(self._device())
        results = [apply_step(b.prep, b.state, clip_coef=coef, chunk_bytes=self.settings.chunk_bytes, fuse=fuse)
                   for b in prepared.batches]
        results = rebalance_steps([b.prep for b in prepared.batches], results,
                                  [(b.pairs[0].A.requires_grad, b.pairs[0].B.requires_grad) for b in prepared.batches])
        for batch, result in zip(prepared.batches, results):
            self._write_back(batch, result)
        self._distributor.finish()  # the owners send the new factors (a collective with owners)
        for batch, result in zip(prepared.batches, results):
            maybe = 2 if result.rebalanced is not None else 0
            flags = (1 if batch.prep.move[0] else maybe, 1 if batch.prep.move[1] else maybe)
            for pair in batch.pairs:
                self._written[pair] = (flags, self._stamp(pair))
        for group, params in plain:
            self._step_plain(group, params, coef)
        return loss

    def _write_back(self, batch: _Batch, result: StepResult) -> None:
        """Hand the distributor the factors that may have changed (those that moved; where a
        rebalancing check ran, also the other, with its own value where nothing was re-factored)."""
        for side, values in enumerate(new_factors(batch.prep, result)):
            if values is not None:
                for i, pair in enumerate(batch.pairs):
                    self._distributor.write(pair, side, values[i])

    @staticmethod
    def _grads_finite(prepared: _Preparation, plain: list[tuple[dict[str, Any], list[Tensor]]]) -> bool:
        # the pairs' gradients as stacked for the step: one check per batch and side; one sync
        grads = [side.grad for b in prepared.batches for side in b.prep.sides]
        grads += [local_part(p.grad) for _, ps in plain for p in ps]
        return all_finite(grads)

    def _finite_everywhere(self, prepared: _Preparation, plain: list[tuple[dict[str, Any], list[Tensor]]]) -> bool:
        """Whether every rank's gradients are finite (one collective with owners)."""
        return self._distributor.all_agree(self._grads_finite(prepared, plain), self._device())

    def _all_finite(self, prepared: _Preparation, plain: list[tuple[dict[str, Any], list[Tensor]]]) -> bool:
        """Whether the step may go on: warn and skip (or raise) when a gradient is not finite."""
        if self._finite_everywhere(prepared, plain):
            return True
        params = [t for b in prepared.batches for pair in b.pairs for t in (pair.A, pair.B)]
        params += [p for _, ps in plain for p in ps]
        bad = [self.registry.name(p) for p in params if p.grad is not None and not bool(torch.isfinite(local_part(p.grad)).all())]
        message = (
            f"Non-finite gradient (inf or NaN) in {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; "
            "the LoFTAdamW step was skipped and no parameter or state changed."
        )
        if self.settings.nonfinite_grads == "raise":
            raise FloatingPointError(message + " (nonfinite_grads='raise')")
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        self.skipped_steps += 1
        return False

    def _step_plain(self, group: dict[str, Any], params: list[Tensor], coef: Tensor | None) -> None:
        if not params:
            return
        exp_avgs, exp_avg_sqs, steps = [], [], []
        for p in params:
            st = self.state[p]
            if not st:
                st["step"] = torch.tensor(0.0)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avgs.append(st["exp_avg"])
            exp_avg_sqs.append(st["exp_avg_sq"])
            steps.append(st["step"])
        grads = [p.grad for p in params]
        if coef is not None:  # a device tensor: never read on the host (but for FSDP2's DTensor gradients)
            if any(is_dtensor(g) for g in grads):
                factor = float(coef)
                grads = [g * factor for g in grads]
            else:
                grads = [g * coef.to(device=g.device, dtype=g.dtype) for g in grads]
        beta1, beta2 = group["betas"]
        _adamw_functional(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            foreach=None,
            has_complex=any(torch.is_complex(p) for p in params),
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )

    # ----------------------------------------------------------------------------- state
    @property
    def distributor(self) -> Distributor:
        """Where each pair's step runs (:mod:`loft.distributor`): chosen at construction, and
        again when a wrapper swaps the parameters for FSDP2 shards."""
        return self._distributor

    @property
    def pairs(self) -> list[LoRAPair]:
        """The LoRA pairs this optimizer trains with LoFT."""
        return list(self.registry.pairs)

    def batch_states(self) -> list[BatchState]:
        """The state of the pairs, one :class:`~loft.state.BatchState` per batch."""
        return self.pair_states.batches()


LoFTAdamW.__doc__ = (LoFTAdamW.__doc__ or "").replace("{options}", options_doc())


# --------------------------------------------------------------------------------- helpers
def _stack(matrices: list[Tensor], dtype: torch.dtype) -> Tensor:
    """``(b, rows, cols)`` in ``dtype``; a single matrix is not copied when it has the dtype."""
    if len(matrices) == 1:
        return matrices[0].unsqueeze(0).to(dtype)
    return torch.stack(matrices).to(dtype)


def _as_param_groups(params: Any) -> list[dict[str, Any]]:
    if isinstance(params, (nn.Module, Tensor, LoRAPair)):
        return [{"params": [params]}]
    if isinstance(params, dict):
        return [params]
    items = list(params)
    if not items:
        raise ValueError("LoFTAdamW got an empty parameter list; pass the model: LoFTAdamW(model).")
    if all(isinstance(i, dict) for i in items):
        return items
    if any(isinstance(i, dict) for i in items):
        raise TypeError("Pass either param-group dicts or modules/pairs/tensors, not a mix of both.")
    return [{"params": items}]
