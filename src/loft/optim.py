"""``LoFTAdamW``: the LoFT optimizer as a drop-in ``torch.optim.Optimizer``.

The math lives in :mod:`loft.functional` (one side of a pair), :mod:`loft.linalg` (solves,
packed grams, the chunked full-direction rebuild) and :mod:`loft.clip` (projected norms); this
module finds the pairs, keeps the state and runs the step.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.adamw import adamw as _adamw_functional

from .clip import clip_coefficient, pair_sq_norm
from .distributed import (
    UnsupportedDistributedSetup,
    check_module_supported,
    check_pairs_agree_across_ranks,
    check_tensor_supported,
)
from .functional import Side, calibrate, factor_adam_update, projected_update, update_moments
from .linalg import DampedGram, compute_dtype, packed_index, rebalanced_factors
from .pairs import LoRAPair, count_lora_layers, split_lora_parameters, warn_about_ranks_between

__all__ = ["LoFTAdamW", "SWITCHES"]

#: The building blocks of LoFT, each a boolean option (and param-group key) that is on by default.
#: With all of them off the optimizer is AdamW on the LoRA factors; with only
#: ``second_moment_calibration`` off it is the paper's "LoFT (simple)".
SWITCHES = (
    "gradient_scaling",
    "alternating_updates",
    "first_moment_calibration",
    "second_moment_calibration",
    "projected_update",
    "projected_clipping",
)

_OPTIONS = (
    "lr",
    "betas",
    "eps",
    "weight_decay",
    "max_grad_norm",
    "head_lr",
    "head_weight_decay",
    *SWITCHES,
    "rebalance",
    "damping",
    "chunk_bytes",
    "nonfinite_grads",
    "batch_pairs",
)


@dataclass
class _PreparedBatch:
    """The inputs to this step of a batch of pairs, computed before any state changes.

    The pairs share their factors' shapes, dtype and device, param group, step count and
    scaling; the sides' tensors are stacked along a leading batch dimension (``(b, r, k)``, ...).
    """

    pairs: list[LoRAPair]
    group: dict[str, Any]
    step: int
    move_a: bool
    move_b: bool
    scaling: float
    side_a: Side
    side_b: Side


class LoFTAdamW(Optimizer):
    r"""LoFT: AdamW for LoRA adapters that takes the step full fine-tuning would take,
    projected onto the adapter's subspace (Tastan et al., ICLR 2026).

    Args:
        params: the model (a PEFT model, any module holding PEFT LoRA layers, or either wrapped
            in ``DistributedDataParallel``); or an iterable of :class:`~loft.LoRAPair` objects
            and tensors; or a list of param-group dicts whose ``"params"`` hold modules, pairs
            and tensors. Modules are expanded into their LoRA pairs (LoFT) and their other
            trainable parameters (plain AdamW). A plain iterable of tensors such as
            ``model.parameters()`` is refused: LoFT must know which tensors form a pair.
        lr, betas, eps, weight_decay: as in :class:`torch.optim.AdamW`. For a pair, ``eps`` is
            added in the full weight space and weight decay shrinks the adapter's change
            ``dW`` toward the pretrained weight (``dW <- (1 - lr wd) dW``).
        max_grad_norm: clip inside the step by the projected full-gradient norm (``None``: no
            clipping). Clip outside the step with :func:`loft.clip_grad_norm_` instead.
        head_lr, head_weight_decay: learning rate and weight decay of the parameters that are
            not LoRA factors (fresh heads, ``modules_to_save``, biases, norms, DoRA magnitudes).
            They are put in a param group of their own, next to each group's pairs, so LR
            schedulers scale both by the same factor. ``None``: the group's ``lr`` /
            ``weight_decay``. A param-group dict may carry its own ``"head_lr"`` /
            ``"head_weight_decay"``. LoFT's good learning rates are full fine-tuning's, often
            several times lower than a fresh head wants.
        gradient_scaling, alternating_updates, first_moment_calibration,
        second_moment_calibration, projected_update, projected_clipping: LoFT's building
            blocks, each on by default and each a param-group key (see :data:`SWITCHES`).
        rebalance: when the two factors of a pair drift apart in conditioning, re-factor them
            into balanced ones with the same product (see :func:`loft.linalg.balanced_factors`).
            The moments follow through calibration, so ``dW``'s trajectory is unchanged in exact
            arithmetic and much more accurate in float32. Only in configurations that are
            invariant to the factors' basis (scaling, both calibrations and the projected update
            on); ``A`` and ``B`` themselves change, their product does not.
        damping: relative damping of the ``r x r`` solves (``None``: ten machine epsilons of the
            compute dtype, 1.2e-6 in float32).
        chunk_bytes: memory budget of the temporaries of the full-direction rebuild (for a
            batch of pairs, of the whole batch); calibration and the moment updates take slices
            of a batch of a quarter of it.
        batch_pairs: process pairs with equal shapes, dtype, device, param group, step count
            and scaling together (stacked, with batched GEMMs and solves: all the q_proj pairs
            of a model at once, say) instead of one at a time. The results are the same up to
            rounding; ``False`` is there for testing and comparison.
        nonfinite_grads: ``"skip"`` (warn and leave parameters and state untouched) or
            ``"raise"`` when a gradient holds inf or NaN.

    State and solves are float32 for float32 / bfloat16 / float16 parameters and float64 for
    float64 ones. Parameters that are not LoRA factors follow ``torch.optim.AdamW`` exactly.
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
        damping: float | None = None,
        chunk_bytes: int = 4 * 2**20,
        nonfinite_grads: str = "skip",
        batch_pairs: bool = True,
        **unknown: Any,
    ) -> None:
        if unknown:
            name = next(iter(unknown))
            close = difflib.get_close_matches(name, _OPTIONS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"LoFTAdamW got an unknown option {name!r}.{hint} Options: {', '.join(_OPTIONS)}.")
        _check_options(lr, betas, eps, weight_decay, max_grad_norm, damping, chunk_bytes, nonfinite_grads)
        for name, value in (("head_lr", head_lr), ("head_weight_decay", head_weight_decay)):
            if value is not None and not value >= 0.0:
                raise ValueError(f"Invalid {name}: {value} (must be >= 0, or None to use the group's value).")
        self.head_lr = head_lr
        self.head_weight_decay = head_weight_decay
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.damping = damping
        self.rebalance = bool(rebalance)
        self.chunk_bytes = int(chunk_bytes)
        self.nonfinite_grads = nonfinite_grads
        self.batch_pairs = bool(batch_pairs)
        #: total gradient norm (clipping norm) seen by the last step, when clipping is on
        self.last_grad_norm: Tensor | None = None
        #: how many steps were skipped because of non-finite gradients
        self.skipped_steps = 0
        self._pairs: list[LoRAPair] = []
        self._pair_by_param: dict[int, LoRAPair] = {}
        self._plain_ids: set[int] = set()
        self._param_names: dict[int, str] = {}
        self._modules_seen: list[nn.Module] = []
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            gradient_scaling=gradient_scaling,
            alternating_updates=alternating_updates,
            first_moment_calibration=first_moment_calibration,
            second_moment_calibration=second_moment_calibration,
            projected_update=projected_update,
            projected_clipping=projected_clipping,
        )
        super().__init__(_as_param_groups(params), defaults)
        if not self._pairs:
            raise ValueError(self._no_pairs_message())
        check_pairs_agree_across_ranks((p.name, p.A.shape, p.B.shape) for p in self._pairs)
        warn_about_ranks_between(self._pairs)

    # ----------------------------------------------------------------------------- set-up
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group whose ``"params"`` may hold modules, :class:`LoRAPair` objects and tensors."""
        if not isinstance(param_group, dict):
            raise TypeError(f"A param group must be a dict, got {type(param_group).__name__}.")
        group = dict(param_group)
        items = group.get("params", [])
        items = [items] if isinstance(items, (Tensor, nn.Module, LoRAPair)) else list(items)
        pairs: list[LoRAPair] = []
        plain: list[Tensor] = []
        for item in items:
            if isinstance(item, nn.Module):
                check_module_supported(item)
                found, others = split_lora_parameters(item)
                pairs += found
                plain += others
                self._modules_seen.append(item)
                self._param_names.update({id(p): n for n, p in item.named_parameters()})
            elif isinstance(item, LoRAPair):
                pairs.append(item)
            elif isinstance(item, Tensor):
                plain.append(item)
            else:
                raise TypeError(
                    f"LoFTAdamW params must be modules, loft.LoRAPair objects or tensors, got {type(item).__name__}."
                )
        for pair in pairs:
            check_tensor_supported(pair.A, pair.name or "a LoRA factor")
            check_tensor_supported(pair.B, pair.name or "a LoRA factor")
        for t in plain:
            check_tensor_supported(t, self._param_names.get(id(t), f"a parameter of shape {tuple(t.shape)}"))
        head_lr = group.pop("head_lr", self.head_lr)
        head_weight_decay = group.pop("head_weight_decay", self.head_weight_decay)
        unknown = set(group) - {"params", *self.defaults}
        if unknown:
            name = sorted(unknown)[0]
            close = difflib.get_close_matches(name, list(self.defaults), n=1)
            if close:  # other extra keys (names, tags) are allowed, as in torch
                raise ValueError(f"Param group has unknown option {name!r}. Did you mean {close[0]!r}?")
        group["params"] = [t for p in pairs for t in (p.A, p.B)] + plain
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
        self._plain_ids.update(id(t) for t in plain)
        for pair in pairs:
            self._pairs.append(pair)
            self._pair_by_param[id(pair.A)] = pair
            self._pair_by_param[id(pair.B)] = pair
            self._param_names.setdefault(id(pair.A), f"{pair.name}.A" if pair.name else "lora A")
            self._param_names.setdefault(id(pair.B), f"{pair.name}.B" if pair.name else "lora B")

    def _no_pairs_message(self) -> str:
        if self._modules_seen:
            layers = sum(count_lora_layers(m) for m in self._modules_seen)
            kinds = ", ".join(sorted({type(m).__name__ for m in self._modules_seen}))
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

    # ----------------------------------------------------------------------------- the step
    def _pair_moves(self, group: dict[str, Any], step: int) -> tuple[bool, bool]:
        """``(move_a, move_b)`` at 1-based ``step``: B moves on odd steps, A on even ones."""
        if not group["alternating_updates"]:
            return True, True
        return step % 2 == 0, step % 2 == 1

    def _damping(self, dtype: torch.dtype) -> float:
        return self.damping if self.damping is not None else 10 * torch.finfo(dtype).eps

    def _prepare(
        self, group: dict[str, Any], pairs: list[LoRAPair], scaling: float, need_scaled: bool
    ) -> _PreparedBatch:
        first = pairs[0]
        step = self.state[first.A].get("step", 0) + 1
        move_a, move_b = self._pair_moves(group, step)
        s = scaling
        cd = compute_dtype(first.A.dtype)
        a = _stack([LoRAPair.matrix(pair.A) for pair in pairs], cd)  # (b, r, n)
        u = _stack([LoRAPair.matrix(pair.B) for pair in pairs], cd) * s  # (b, m, r)
        grad_a = _stack([_grad_matrix(pair.A) for pair in pairs], cd)
        grad_u = _stack([_grad_matrix(pair.B) for pair in pairs], cd) / s
        damping = self._damping(cd)
        gram_u, gram_a = u.mT @ u, a @ a.mT
        side_a = Side(a, u, gram_u, DampedGram(gram_u, damping), grad_a, unit=1.0)
        side_b = Side(u.mT, a.mT, gram_a, DampedGram(gram_a, damping), grad_u.mT, unit=s)
        if need_scaled:
            for side in (side_a, side_b):
                side.scaled = side.solver.solve(side.grad)
        return _PreparedBatch(pairs, group, step, move_a, move_b, s, side_a, side_b)

    def _collect(self, clipping: bool) -> tuple[list[_PreparedBatch], list[tuple[dict[str, Any], list[Tensor]]]]:
        """Pairs with gradients (prepared, in batches) and, per group, the other parameters with
        gradients. ``clipping``: a norm will be taken, so projected clipping needs the scaled
        gradients."""
        prepared: list[_PreparedBatch] = []
        plain: list[tuple[dict[str, Any], list[Tensor]]] = []
        for group in self.param_groups:
            others = []
            batches: dict[tuple[Any, ...], tuple[float, list[LoRAPair]]] = {}
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError(
                        f"LoFTAdamW does not support sparse gradients ({self._name(p)}). Use dense "
                        "gradients (e.g. nn.Embedding(..., sparse=False))."
                    )
                pair = self._pair_by_param.get(id(p))
                if pair is None and id(p) not in self._plain_ids:
                    raise UnsupportedDistributedSetup(
                        f"LoFTAdamW's param_groups hold a tensor of shape {tuple(p.shape)} it was not built with. "
                        "Something replaced the optimizer's parameters (DeepSpeed ZeRO and other wrappers that "
                        "flatten or partition them are not supported); add parameters with add_param_group."
                    )
                if pair is None:
                    if p.grad is not None:
                        others.append(p)
                elif p is pair.A and (pair.A.grad is not None or pair.B.grad is not None):
                    s = pair.scale()
                    step = self.state[pair.A].get("step", 0)
                    key = (pair.A.shape, pair.B.shape, pair.A.dtype, pair.A.device, step, s)
                    batches.setdefault(key if self.batch_pairs else (id(pair),), (s, []))[1].append(pair)
            need = group["gradient_scaling"] or (clipping and group["projected_clipping"])
            prepared += [self._prepare(group, pairs, s, need) for s, pairs in batches.values()]
            plain.append((group, others))
        return prepared, plain

    def _all_finite(self, prepared: list[_PreparedBatch], plain: list[tuple[dict[str, Any], list[Tensor]]]) -> bool:
        params = [t for pb in prepared for pair in pb.pairs for t in (pair.A, pair.B)]
        params += [p for _, ps in plain for p in ps]
        # the pairs' gradients as stacked for the step: one check per batch and side
        grads = [side.grad for pb in prepared for side in (pb.side_a, pb.side_b)]
        grads += [p.grad for _, ps in plain for p in ps]
        if not grads:
            return True
        flags = torch.stack([torch.isfinite(g).all().to(grads[0].device) for g in grads])
        if bool(flags.all()):
            return True
        bad = [self._name(p) for p in params if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
        message = (
            f"Non-finite gradient (inf or NaN) in {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; "
            "the LoFTAdamW step was skipped and no parameter or state changed."
        )
        if self.nonfinite_grads == "raise":
            raise FloatingPointError(message + " (nonfinite_grads='raise')")
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        self.skipped_steps += 1
        return False

    def _total_sq_norm(
        self, prepared: list[_PreparedBatch], plain: list[tuple[dict[str, Any], list[Tensor]]]
    ) -> Tensor:
        """Sum of the squared clipping norms, float64, on the first parameter's device (one sync)."""
        terms = [
            pair_sq_norm(
                pb.side_a, pb.side_b, move_a=pb.move_a, move_b=pb.move_b, projected=pb.group["projected_clipping"]
            )
            for pb in prepared
        ]
        terms += [p.grad.double().square().sum() for _, params in plain for p in params]
        if not terms:
            return torch.zeros((), dtype=torch.float64)
        device = terms[0].device
        return torch.cat([t.to(device=device, dtype=torch.float64).reshape(-1) for t in terms]).sum()

    @torch.no_grad()
    def grad_norm(self) -> Tensor:
        """The norm LoFT clips by, for the current gradients and the next step's active factors:
        the projected full-gradient norm of each pair plus the plain norm of the other parameters."""
        prepared, plain = self._collect(clipping=True)
        return self._total_sq_norm(prepared, plain).sqrt().float()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One LoFT step for every pair and one AdamW step for every other parameter."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        prepared, plain = self._collect(clipping=self.max_grad_norm is not None)
        if not self._all_finite(prepared, plain):
            return loss
        coef = None
        if self.max_grad_norm is not None:
            self.last_grad_norm = self._total_sq_norm(prepared, plain).sqrt()
            coef = float(clip_coefficient(self.last_grad_norm, self.max_grad_norm))  # a host number
        for pb in prepared:
            self._step_batch(pb, coef)
        for group, params in plain:
            self._step_plain(group, params, coef)
        return loss

    def _init_state(self, pb: _PreparedBatch, diagonal_only: bool) -> None:
        for side, params in ((pb.side_a, [pair.A for pair in pb.pairs]), (pb.side_b, [pair.B for pair in pb.pairs])):
            b, r, k = side.factor.shape
            p = r if diagonal_only else r * (r + 1) // 2
            new = {
                "exp_avg": side.factor.new_zeros(b, r, k),
                "exp_avg_sq": side.factor.new_zeros(b, k, p),
                "partner": side.factor.new_zeros(side.partner.shape),
            }
            for i, param in enumerate(params):
                self.state[param].update(step=0, **{key: value[i] for key, value in new.items()})

    def _stacked_state(self, params: list[Tensor], key: str) -> Tensor:
        """The ``key`` state of ``params`` as one ``(b, ...)`` tensor of which the per-parameter
        state tensors are views, so the batch's math updates them in place.

        The stack is kept from step to step (the state tensors are views of it); it is made
        again, one copy, only when the batch changed or the state was replaced (loading a state
        dict). A state tensor left behind as a view of a larger stack gets its own copy when its
        parameter is next stepped (alone, or in a new stack), so a stack is freed once no batch
        uses it.
        """
        first = self.state[params[0]][key]
        if len(params) == 1:
            if first._base is not None:  # a view of a stack it has left: its own copy frees the stack
                first = self.state[params[0]][key] = first.clone()
            return first.unsqueeze(0)
        stack = first._base
        if stack is not None and stack.shape == (len(params), *first.shape) and stack.is_contiguous():
            step = first.numel() * first.element_size()
            ptr = stack.data_ptr()
            if all(
                t._base is stack and t.data_ptr() == ptr + i * step and t.shape == first.shape
                for i, t in enumerate(self.state[p][key] for p in params)
            ):
                return stack
        stack = torch.stack([self.state[p][key] for p in params])
        for p, view in zip(params, stack.unbind(0)):
            self.state[p][key] = view
        return stack

    def _step_batch(self, pb: _PreparedBatch, coef: float | None) -> None:
        group, pairs, t = pb.group, pb.pairs, pb.step
        beta1, beta2 = group["betas"]
        cd = pb.side_a.factor.dtype
        index = packed_index(pairs[0].rank, not group["second_moment_calibration"], cd, pairs[0].A.device)
        if t == 1:
            self._init_state(pb, index.diagonal_only)
        new: dict[str, Tensor] = {}
        for key, side, params, moves in (
            ("A", pb.side_a, [pair.A for pair in pairs], pb.move_a),
            ("B", pb.side_b, [pair.B for pair in pairs], pb.move_b),
        ):
            exp_avg, exp_avg_sq, partner = (
                self._stacked_state(params, k) for k in ("exp_avg", "exp_avg_sq", "partner")
            )
            # the moments are in the basis of the partner at the last step; carry them over if it
            # moved. Calibration and the moment updates go a slice of pairs at a time: they chain
            # several passes over (pairs, k, p) temporaries, which should stay in cache. A quarter
            # of chunk_bytes (1 MiB by default) was measured faster than all of it (SmolLM2
            # shapes, r = 16: 12% less optimizer time; r = 4: the same).
            k, p = exp_avg_sq.shape[1:]
            per_slice = max(1, self.chunk_bytes // (4 * k * p * exp_avg_sq.element_size()))
            if t > 1 and not torch.equal(partner, side.partner):
                moved = None if len(pairs) == 1 else (partner != side.partner).flatten(1).any(1)
                options = {
                    "first_moment": group["first_moment_calibration"],
                    "second_moment": group["second_moment_calibration"],
                    "chunk_bytes": self.chunk_bytes,
                }
                if moved is None or bool(moved.all()):
                    for sl in _slices(len(pairs), per_slice):
                        calibrate(exp_avg[sl], exp_avg_sq[sl], side.select(sl), partner[sl], index, **options)
                else:  # only some partners moved (rebalanced pairs, say)
                    for which in moved.nonzero().flatten().split(per_slice):
                        some_avg, some_sq = exp_avg[which], exp_avg_sq[which]
                        calibrate(some_avg, some_sq, side.select(which), partner[which], index, **options)
                        exp_avg.index_copy_(0, which, some_avg)
                        exp_avg_sq.index_copy_(0, which, some_sq)
            partner.copy_(side.partner)
            grad = side.scaled if group["gradient_scaling"] else side.grad
            if coef is not None and coef != 1.0:
                grad = grad * coef
            for sl in _slices(len(pairs), per_slice):
                update_moments(exp_avg[sl], exp_avg_sq[sl], grad[sl], index, beta1, beta2)
            for param in params:
                self.state[param]["step"] = t
            if moves:
                new[key] = self._new_factor(group, side, exp_avg, exp_avg_sq, index, t)
        # written back only after every new factor is computed
        a, u_t = new.get("A", pb.side_a.factor), new.get("B", pb.side_b.factor)
        write_a = write_b = None  # which pairs to write besides those whose factor moved: none
        if self.rebalance and self._basis_invariant(group):
            balanced = rebalanced_factors(u_t.mT, a, threshold=10.0)
            if balanced is not None:
                u_new, a_new, better = balanced
                pick = better[:, None, None]
                a, u_t = torch.where(pick, a_new, a), torch.where(pick, u_new.mT, u_t)
                write_a = write_b = better.tolist()
        for factor, move, write in (("A", pb.move_a, write_a), ("B", pb.move_b, write_b)):
            which = [i for i in range(len(pairs)) if move or (write is not None and write[i])]
            if which:
                new_values = a if factor == "A" else u_t.mT / pb.scaling
                params = [getattr(pairs[i], factor) for i in which]
                torch._foreach_copy_(params, [new_values[i].reshape(p.shape) for i, p in zip(which, params)])

    @staticmethod
    def _basis_invariant(group: dict[str, Any]) -> bool:
        """Whether the group's step depends on the product ``dW`` only, not on the factors' basis."""
        keys = ("gradient_scaling", "first_moment_calibration", "second_moment_calibration", "projected_update")
        return all(group[k] for k in keys)

    def _new_factor(
        self, group: dict[str, Any], side: Side, exp_avg: Tensor, exp_avg_sq: Tensor, index: Any, t: int
    ) -> Tensor:
        beta1, beta2 = group["betas"]
        common = dict(
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            bias_correction1=1 - beta1**t,
            bias_correction2=1 - beta2**t,
        )
        if group["projected_update"]:
            return projected_update(side, exp_avg, exp_avg_sq, index, chunk_bytes=self.chunk_bytes, **common)
        return factor_adam_update(side, exp_avg, exp_avg_sq, index, **common)

    def _step_plain(self, group: dict[str, Any], params: list[Tensor], coef: float | None) -> None:
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
        if coef is not None and coef != 1.0:
            grads = [g * coef for g in grads]
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
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict`; pair states keep their compute dtype
        (torch would cast them to the parameter dtype) and are checked against the pairs."""
        params = [p for g in self.param_groups for p in g["params"]]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        if len(saved_ids) != len(params):
            raise ValueError(
                f"This optimizer state holds {len(saved_ids)} parameters but the optimizer has {len(params)}: "
                "it was saved for a different model or adapter configuration (target modules, adapters)."
            )
        saved_state = state_dict["state"]
        for pid, p in zip(saved_ids, params):
            pair = self._pair_by_param.get(id(p))
            st = saved_state.get(pid)
            if pair is None or not st:
                continue
            side_rows = pair.rank
            side_cols = LoRAPair.matrix(pair.A).shape[1] if p is pair.A else pair.shape[0]
            if tuple(st["exp_avg"].shape) != (side_rows, side_cols):
                raise ValueError(
                    f"Saved state for {self._name(p)} has shape {tuple(st['exp_avg'].shape)}, expected "
                    f"{(side_rows, side_cols)}: the checkpoint was saved with a different LoRA rank or layer."
                )
        super().load_state_dict(state_dict)
        for pid, p in zip(saved_ids, params):
            if id(p) in self._pair_by_param and saved_state.get(pid):
                cd = compute_dtype(p.dtype)
                for key, value in saved_state[pid].items():
                    if isinstance(value, Tensor):
                        self.state[p][key] = value.to(device=p.device, dtype=cd, copy=True)

    def _name(self, p: Tensor) -> str:
        return self._param_names.get(id(p), f"a parameter of shape {tuple(p.shape)}")

    @property
    def pairs(self) -> list[LoRAPair]:
        """The LoRA pairs this optimizer trains with LoFT."""
        return list(self._pairs)


def _grad_matrix(param: Tensor) -> Tensor:
    if param.grad is None:
        return LoRAPair.matrix(param).new_zeros(LoRAPair.matrix(param).shape)
    return LoRAPair.matrix(param.grad)


def _slices(n: int, size: int) -> list[slice]:
    return [slice(start, start + size) for start in range(0, n, size)]


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


def _check_options(
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    max_grad_norm: float | None,
    damping: float | None,
    chunk_bytes: int,
    nonfinite_grads: str,
) -> None:
    if not lr >= 0.0:
        raise ValueError(f"Invalid learning rate: {lr} (must be >= 0).")
    if len(tuple(betas)) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"Invalid betas: {betas} (two numbers in [0, 1)).")
    if not eps >= 0.0:
        raise ValueError(f"Invalid eps: {eps} (must be >= 0).")
    if not weight_decay >= 0.0:
        raise ValueError(f"Invalid weight_decay: {weight_decay} (must be >= 0).")
    if max_grad_norm is not None and not max_grad_norm > 0.0:
        raise ValueError(f"Invalid max_grad_norm: {max_grad_norm} (a positive number, or None for no clipping).")
    if damping is not None and not damping >= 0.0:
        raise ValueError(f"Invalid damping: {damping} (must be >= 0, or None for the default).")
    if int(chunk_bytes) < 1:
        raise ValueError(f"Invalid chunk_bytes: {chunk_bytes} (must be >= 1).")
    if nonfinite_grads not in ("skip", "raise"):
        raise ValueError(f"Invalid nonfinite_grads: {nonfinite_grads!r} (use 'skip' or 'raise').")
