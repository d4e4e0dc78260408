"""The options of :class:`~loft.LoFTAdamW`, in two places.

* Numerical options (``lr``, ``betas``, the switches, ``damping``, ...) are param-group keys
  with defaults, as in every ``torch.optim`` optimizer: :data:`GROUP_DEFAULTS` lists them all,
  :func:`check_group` validates a group. A checkpoint written before an option existed gets its
  default when loaded.
* Engineering settings that do not change the result beyond rounding (batching, memory budget,
  the policy for non-finite gradients) are one :class:`Settings`, ``optimizer.settings``.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

from torch import Tensor

__all__ = ["GROUP_DEFAULTS", "SWITCHES", "Settings", "check_group"]

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

#: Every param-group option and its default.
GROUP_DEFAULTS: dict[str, Any] = {
    "lr": 1e-3,
    "betas": (0.9, 0.999),
    "eps": 1e-8,
    "weight_decay": 0.0,
    **{name: True for name in SWITCHES},
    # clipping is by the norm over all groups: every group must hold the same value
    "max_grad_norm": None,
    # re-factor (U, A) when the worse gram's condition number exceeds `rebalance_threshold`
    # times the balanced factors'; see loft.linalg.balanced_factors
    "rebalance": True,
    "rebalance_threshold": 10.0,
    # relative damping of the r x r solves; None: ten machine epsilons of the compute dtype
    "damping": None,
    # lr / weight decay of the group's parameters that are not LoRA factors (None: the group's);
    # read when the group is added, which puts those parameters in a group of their own
    "head_lr": None,
    "head_weight_decay": None,
}


def _number(name: str, value: Any, *, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, Tensor):
        raise TypeError(
            f"Invalid {name}: a tensor ({value!r}). LoFTAdamW takes Python numbers for its options "
            f"(its step does its scalar math on the host); pass {name}=float(value)."
        )
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        kind = "a number" + (" or None" if allow_none else "")
        raise TypeError(f"Invalid {name}: {value!r} (type {type(value).__name__}); it must be {kind}.")
    return float(value)


def check_group(group: dict[str, Any]) -> None:
    """Validate the numerical options of a param group (``TypeError`` / ``ValueError`` naming the option)."""
    lr = _number("lr", group["lr"])
    if not lr >= 0.0:
        raise ValueError(f"Invalid learning rate: {lr} (must be >= 0).")
    betas = group["betas"]
    if isinstance(betas, Tensor) or not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} (two numbers in [0, 1)).")
    if not all(0.0 <= _number("betas", b) < 1.0 for b in betas):
        raise ValueError(f"Invalid betas: {betas} (two numbers in [0, 1)).")
    for name in ("eps", "weight_decay"):
        if not _number(name, group[name]) >= 0.0:
            raise ValueError(f"Invalid {name}: {group[name]} (must be >= 0).")
    for name in ("head_lr", "head_weight_decay", "damping"):
        value = _number(name, group[name], allow_none=True)
        if value is not None and not value >= 0.0:
            raise ValueError(f"Invalid {name}: {value} (must be >= 0, or None for the default).")
    max_norm = _number("max_grad_norm", group["max_grad_norm"], allow_none=True)
    if max_norm is not None and not max_norm > 0.0:
        raise ValueError(f"Invalid max_grad_norm: {max_norm} (a positive number, or None for no clipping).")
    if not _number("rebalance_threshold", group["rebalance_threshold"]) >= 1.0:
        raise ValueError(f"Invalid rebalance_threshold: {group['rebalance_threshold']} (must be >= 1).")
    for name in (*SWITCHES, "rebalance"):
        if not isinstance(group[name], bool):
            raise TypeError(f"Invalid {name}: {group[name]!r} (True or False).")


@dataclass(frozen=True)
class Settings:
    """How :class:`~loft.LoFTAdamW` computes and checkpoints, not what it computes: the results
    agree up to rounding.

    ``chunk_bytes``: memory budget of the temporaries of the full-direction rebuild (for a batch
    of pairs, of the whole batch); calibration and the moment updates take slices of a batch of
    a quarter of it. ``batch_pairs``: step the pairs of equal shapes, dtype, device, param
    group, step count and scaling together (``False``: one at a time, for testing and
    comparison). ``nonfinite_grads``: ``"skip"`` (warn and leave parameters and state untouched)
    or ``"raise"`` when a gradient holds inf or NaN. ``split_step``: under data parallelism with
    whole factors on every rank (DDP), give each pair one owner rank that keeps its state and
    computes its step, and broadcast the new factors (``False``: every rank steps every pair).
    Sharded factors (FSDP2) always have owners. With owners, ``state_dict()`` and
    ``load_state_dict()`` are collectives: call them on every rank. ``fuse_elementwise``: the
    full-direction rebuild's elementwise passes (clamp, sqrt, ``+ eps``, divide) as one
    ``torch.compile`` kernel (``None``: on CUDA only; eager with a warning where compiling fails).
    ``complete_state_dict``: what ``state_dict()`` holds, whoever calls it (:mod:`loft.checkpoint`):
    ``True``, an entry for every trainable parameter (step-0 zeros before its first step, which
    loading leaves fresh) and a frozen factor's state inside its trainable partner's entry, so
    that torch's ``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` (DCP, Accelerate's and
    Trainer's FSDP2 checkpoints) save and restore everything; ``False``, only the entries of
    parameters that have state, each under its own parameter (a fresh optimizer then offers DCP
    nothing to load into).
    """

    chunk_bytes: int = 4 * 2**20
    batch_pairs: bool = True
    nonfinite_grads: str = "skip"
    split_step: bool = False
    fuse_elementwise: bool | None = None
    complete_state_dict: bool = True

    def fuses(self, device: Any) -> bool:
        """Whether the rebuild's elementwise passes run as one compiled kernel on ``device``:
        ``fuse_elementwise``, or by default on CUDA only (on the CPU compiling took 47 s to warm up
        for 8% off those passes: docs/performance.md)."""
        if self.fuse_elementwise is not None:
            return self.fuse_elementwise
        return getattr(device, "type", device) == "cuda"

    def __post_init__(self) -> None:
        if isinstance(self.chunk_bytes, bool) or not isinstance(self.chunk_bytes, numbers.Integral):
            raise TypeError(f"Invalid chunk_bytes: {self.chunk_bytes!r} (an int).")
        if self.chunk_bytes < 1:
            raise ValueError(f"Invalid chunk_bytes: {self.chunk_bytes} (must be >= 1).")
        if not isinstance(self.batch_pairs, bool):
            raise TypeError(f"Invalid batch_pairs: {self.batch_pairs!r} (True or False).")
        if self.fuse_elementwise is not None and not isinstance(self.fuse_elementwise, bool):
            raise TypeError(f"Invalid fuse_elementwise: {self.fuse_elementwise!r} (True, False or None).")
        if not isinstance(self.complete_state_dict, bool):
            raise TypeError(f"Invalid complete_state_dict: {self.complete_state_dict!r} (True or False).")
        if not isinstance(self.split_step, bool):
            raise TypeError(f"Invalid split_step: {self.split_step!r} (True or False).")
        if self.nonfinite_grads not in ("skip", "raise"):
            raise ValueError(f"Invalid nonfinite_grads: {self.nonfinite_grads!r} (use 'skip' or 'raise').")
