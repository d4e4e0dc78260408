"""Every option of :class:`~loft.LoFTAdamW`, defined once: :class:`LoFTOptions`.

Each field is one constructor option with its default, its documentation and its kind:

* ``group`` options (``lr``, ``betas``, the switches, ``damping``, ...) are param-group keys, as
  in every ``torch.optim`` optimizer: a param-group dict may override any of them, and the step
  reads them from the group (:meth:`LoFTOptions.of_group`). A checkpoint written before an option
  existed gets its default when loaded.
* ``setting`` options (batching, memory budget, the policy for non-finite gradients, the split
  across ranks) change how the step computes, not what (the results agree up to rounding):
  they are the optimizer's, ``optimizer.settings`` (:class:`Settings`).

From the fields come :data:`GROUP_DEFAULTS`, :class:`Settings`, the validation
(:func:`check_group`), the key of the preparation kept between ``grad_norm()`` and ``step()``
(every group option: nothing a new option changes can leave it stale) and the ``Args`` section of
``LoFTAdamW``'s docstring; ``tests/test_optim_options.py`` checks that the constructor's
signature lists exactly these fields with these defaults.
"""

from __future__ import annotations

import numbers
import textwrap
from dataclasses import dataclass, field, fields
from typing import Any

from torch import Tensor

__all__ = ["GROUP_DEFAULTS", "GROUP_KEYS", "SETTING_KEYS", "SWITCHES", "LoFTOptions", "Settings", "check_group", "options_doc"]

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

_SWITCH_DOCS = {
    "gradient_scaling": "1. scale each factor's gradient by its partner's inverse gram (``g = (P^T P)^-1 P^T G``)",
    "alternating_updates": "4. move one factor per step (B on odd steps, A on even ones); off: both every step",
    "first_moment_calibration": "2. carry the first moments into the partner's new basis when it moved",
    "second_moment_calibration": "2. keep full ``r x r`` second-moment grams and carry them too; off: Adam's "
    "diagonal ``v`` (the paper's \"LoFT (simple)\"); switching it between steps converts the state",
    "projected_update": "4. the projected full AdamW direction; off: AdamW on the factor's own parameter",
    "projected_clipping": "5. clip by the projected full-gradient norm; off: by the factors' plain norm",
}


def _option(default: Any, doc: str, kind: str = "group") -> Any:
    return field(default=default, metadata={"doc": doc, "kind": kind})


@dataclass(frozen=True)
class LoFTOptions:
    """Every option of :class:`~loft.LoFTAdamW`, its default and its documentation (see the module)."""

    lr: float = _option(1e-3, "learning rate, as in ``torch.optim.AdamW``; LoFT takes full fine-tuning's rates")
    betas: tuple[float, float] = _option((0.9, 0.999), "Adam's moment decay rates")
    eps: float = _option(1e-8, "Adam's epsilon; for a pair it is added in the full weight space")
    weight_decay: float = _option(
        0.0, "decoupled weight decay; for a pair it shrinks the adapter's change ``dW`` toward the pretrained "
        "weight (``dW <- (1 - lr wd) dW``)")
    max_grad_norm: float | None = _option(
        None, "clip inside the step by the projected full-gradient norm over all groups (``None``: no clipping; "
        "every group must hold the same value). Clip outside the step with ``loft.clip_grad_norm_`` instead")
    head_lr: float | None = _option(
        None, "learning rate of the parameters that are not LoRA factors (fresh heads, ``modules_to_save``, "
        "biases, norms, DoRA magnitudes), put in a param group of their own next to each group's pairs "
        "(``None``: the group's ``lr``)")
    head_weight_decay: float | None = _option(None, "weight decay of those parameters (``None``: the group's)")
    gradient_scaling: bool = _option(True, _SWITCH_DOCS["gradient_scaling"])
    alternating_updates: bool = _option(True, _SWITCH_DOCS["alternating_updates"])
    first_moment_calibration: bool = _option(True, _SWITCH_DOCS["first_moment_calibration"])
    second_moment_calibration: bool = _option(True, _SWITCH_DOCS["second_moment_calibration"])
    projected_update: bool = _option(True, _SWITCH_DOCS["projected_update"])
    projected_clipping: bool = _option(True, _SWITCH_DOCS["projected_clipping"])
    rebalance: bool = _option(
        True, "re-factor a pair into balanced factors with the same product when its worse gram is "
        "``rebalance_threshold`` times worse-conditioned than necessary (only where the step is basis-invariant; "
        "``dW``'s trajectory is unchanged in exact arithmetic, much more accurate in float32)")
    rebalance_threshold: float = _option(10.0, "see ``rebalance`` (at least 1)")
    damping: float | None = _option(
        None, "relative damping of the ``r x r`` solves (``None``: ten machine epsilons of the compute dtype, "
        "1.2e-6 in float32)")
    chunk_bytes: int = _option(
        4 * 2**20, "memory budget of the full-direction rebuild's temporaries (for a batch of pairs, of the whole "
        "batch); calibration and the moment updates take slices of a batch of a quarter of it", "setting")
    nonfinite_grads: str = _option(
        "skip", "``'skip'`` (warn, leave parameters and state untouched) or ``'raise'`` when a gradient holds inf "
        "or NaN", "setting")
    batch_pairs: bool = _option(
        True, "step the pairs of equal shapes, dtype, device, param group, step count and scaling together "
        "(``False``: one at a time, for testing and comparison)", "setting")
    split_step: bool = _option(
        False, "under DDP (whole factors on every rank), give each pair one owner rank that keeps its state, "
        "steps it and broadcasts the new factors. FSDP2 models always have owners; with owners ``step()``, "
        "``grad_norm()``, ``state_dict()`` and ``load_state_dict()`` are collectives", "setting")
    fuse_elementwise: bool | None = _option(
        None, "the rebuild's elementwise passes (clamp, sqrt, ``+ eps``, divide) as one ``torch.compile`` kernel "
        "(``None``: on CUDA only; eager with a warning where compiling fails)", "setting")
    complete_state_dict: bool = _option(
        True, "what ``state_dict()`` holds, whoever calls it (:mod:`loft.checkpoint`): ``True``, an entry for every "
        "trainable parameter (step-0 zeros before its first step, which loading leaves fresh) and a frozen factor's "
        "state inside its trainable partner's entry, so that torch's ``get_optimizer_state_dict`` / "
        "``set_optimizer_state_dict`` (DCP, Accelerate's and Trainer's FSDP2 checkpoints) save and restore "
        "everything; ``False``, only the entries of parameters that have state, each under its own parameter",
        "setting")

    def __post_init__(self) -> None:
        check_group(self.group())
        Settings(**{k: getattr(self, k) for k in SETTING_KEYS})  # validates the settings

    def group(self) -> dict[str, Any]:
        """The param-group options, as a group dict holds them."""
        return {k: getattr(self, k) for k in GROUP_KEYS}

    @classmethod
    def of_group(cls, group: dict[str, Any]) -> LoFTOptions:
        """The options a param group holds (settings at their defaults): what the step reads."""
        return cls(**{k: group[k] for k in GROUP_KEYS})

    @property
    def beta1(self) -> float:
        return self.betas[0]

    @property
    def beta2(self) -> float:
        return self.betas[1]


GROUP_KEYS: tuple[str, ...] = tuple(f.name for f in fields(LoFTOptions) if f.metadata["kind"] == "group")
SETTING_KEYS: tuple[str, ...] = tuple(f.name for f in fields(LoFTOptions) if f.metadata["kind"] == "setting")
#: Every param-group option and its default.
GROUP_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(LoFTOptions) if f.name in GROUP_KEYS}


def options_doc(indent: str = "        ", width: int = 100) -> str:
    """The ``Args`` entries of every option (for ``LoFTAdamW``'s docstring)."""
    lines = []
    for f in fields(LoFTOptions):
        kind = "param-group key" if f.metadata["kind"] == "group" else "setting"
        text = f"{f.name} (default ``{f.default!r}``, {kind}): {f.metadata['doc']}."
        lines.append(textwrap.fill(text, width, initial_indent=indent, subsequent_indent=indent + "    ",
                                   break_on_hyphens=False, break_long_words=False))
    return "\n".join(lines)


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
    """The ``setting`` options of :class:`LoFTOptions` (``optimizer.settings``): how
    :class:`~loft.LoFTAdamW` computes, not what."""

    chunk_bytes: int = LoFTOptions.chunk_bytes
    batch_pairs: bool = LoFTOptions.batch_pairs
    nonfinite_grads: str = LoFTOptions.nonfinite_grads
    split_step: bool = LoFTOptions.split_step
    fuse_elementwise: bool | None = LoFTOptions.fuse_elementwise
    complete_state_dict: bool = LoFTOptions.complete_state_dict

    def fuses(self, device: Any) -> bool:
        """Whether the rebuild's elementwise passes run as one compiled kernel on ``device``:
        ``fuse_elementwise``, or by default on CUDA only (on the CPU compiling is slow to warm up
        for little gain: docs/performance.md)."""
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


assert set(SETTING_KEYS) == {f.name for f in fields(Settings)}
