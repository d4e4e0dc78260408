"""The adapter methods of ``loft finetune --method`` besides LoFT, all PEFT's own:

========== ======================================================= =====================================
method     adapter (``peft.LoraConfig``)                            optimizer
========== ======================================================= =====================================
lora       LoRA, ``lora_alpha = 2 r``                               ``torch.optim.AdamW``
dora       ``use_dora=True`` (weight-decomposed LoRA)               ``torch.optim.AdamW``
rslora     ``use_rslora=True`` (scale ``alpha / sqrt(r)``)          ``torch.optim.AdamW``
pissa      ``init_lora_weights="pissa_niter_16"`` (principal        ``torch.optim.AdamW``
           singular vectors in the adapter, the rest stays base)
loraplus   LoRA                                                     ``peft.optimizers.create_loraplus_optimizer``
                                                                    (AdamW, B at ``LORAPLUS_LR_RATIO`` x lr)
lorafa     LoRA                                                     ``peft.optimizers.create_lorafa_optimizer``
                                                                    (A frozen, B's gradient projected)
========== ======================================================= =====================================

Every method trains the fresh head (``modules_to_save``) at ``head_lr`` in a param group of its
own, as LoFT and full fine-tuning do: PEFT's LoRA+ optimizer is built on the model with the head
left out and the head group added to what it returns; PEFT's LoRA-FA optimizer takes every
parameter, and the head is moved into a group of its own
(:func:`loft.integrations.library_internals.lorafa_head_group`).

PiSSA changes the base weights (``W_res = W - scale * B0 A0``), so an adapter saved as trained
loads only on that residual base. :class:`PissaStart` keeps the initial adapter and converts the
trained one with PEFT (``save_pretrained(..., path_initial_model_for_weight_conversion=...)``)
into a plain LoRA adapter of rank ``2 r`` for the unmodified base: what the run saves.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["LORAPLUS_LR_RATIO", "PISSA_INIT", "PissaStart", "lora_options", "make_optimizer"]

#: LoRA+: learning rate of B over A's. 16 (2^4) is the LoRA+ paper's recommended ratio (Hayou et
#: al. 2024, "set lambda = 2^4") and the value of PEFT's example.
LORAPLUS_LR_RATIO = 16.0
#: PiSSA initialisation: 16 subspace iterations of a randomized SVD (PEFT's fast variant, whose
#: documentation calls its training effect approximately equivalent to the full SVD's), instead
#: of a full SVD of every adapted weight.
PISSA_INIT = "pissa_niter_16"


def lora_options(method: str) -> dict[str, Any]:
    """The ``peft.LoraConfig`` arguments that make ``method`` (beyond rank, alpha and targets)."""
    return {
        "use_dora": method == "dora",
        "use_rslora": method == "rslora",
        "init_lora_weights": PISSA_INIT if method == "pissa" else True,
    }


def make_optimizer(method: str, model: nn.Module, *, lr: float, head_lr: float, weight_decay: float,
                   is_head: Callable[[str], bool]) -> torch.optim.Optimizer:
    """The optimizer of ``model`` for a method other than LoFT (a PEFT model, or the whole model for
    ``full``): the trainable parameters at ``lr`` (as the method arranges them), the fresh head's
    (names where ``is_head``) at ``head_lr`` in a group of their own."""
    head = [(n, p) for n, p in model.named_parameters() if p.requires_grad and is_head(n)]
    if method == "loraplus":
        from peft.optimizers import create_loraplus_optimizer

        with _frozen([p for _, p in head]):  # the head is not a LoRA factor: its own group below
            optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=LORAPLUS_LR_RATIO,
                                                  loraplus_weight_decay=weight_decay, weight_decay=weight_decay)
    elif method == "lorafa":
        from peft.optimizers import create_lorafa_optimizer

        from ..integrations.library_internals import lorafa_head_group

        config = model.peft_config["default"]
        optimizer = create_lorafa_optimizer(model, r=config.r, lora_alpha=config.lora_alpha, lr=lr,
                                            weight_decay=weight_decay)  # freezes every lora_A
        lorafa_head_group(optimizer, head, lr=head_lr, weight_decay=weight_decay)  # the head at head_lr
        return optimizer
    else:
        body = [p for n, p in model.named_parameters() if p.requires_grad and not is_head(n)]
        optimizer = torch.optim.AdamW([{"params": body, "lr": lr}], lr=lr, weight_decay=weight_decay)
    if head:
        optimizer.add_param_group({"params": [p for _, p in head], "lr": head_lr, "weight_decay": weight_decay})
    return optimizer


class _frozen:
    """Parameters with ``requires_grad`` off inside the ``with`` block."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params

    def __enter__(self) -> None:
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc: Any) -> None:
        for p in self.params:
            p.requires_grad_(True)


class PissaStart:
    """The initial PiSSA adapter of a run (saved in a temporary folder when the adapter is made,
    before any training), to convert the trained adapter into a LoRA adapter for the unmodified
    base at the end. The folder is removed by :meth:`close`."""

    def __init__(self, model: Any) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="loft-pissa-"))
        self.folder = self.root / "pissa_init"
        model.save_pretrained(str(self.folder))

    def save(self, model: Any, folder: str | Path) -> None:
        """``model.save_pretrained(folder)``, converted by PEFT into a rank-``2 r`` LoRA adapter
        that loads on the original (not the residual) base."""
        model.save_pretrained(str(folder), path_initial_model_for_weight_conversion=str(self.folder))

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
