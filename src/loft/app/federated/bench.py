"""What the server and every client of a federated run build from the same settings: the model
(loaded and wrapped for the method with ``loft finetune``'s own code), the encoded training data,
the optimizer, a few local steps, and the evaluation.

The trainable state that travels between them is two parts: the LoRA factors
(:data:`loft.federated.Factors`, ``None`` for full fine-tuning) and ``others``, every other
trainable tensor by parameter name (the fresh classification head; every weight for full
fine-tuning), which is averaged plainly.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ... import LoFTAdamW, clip_grad_norm_
from ... import federated as fed
from ... import adapter_factors
from ..config import DEFAULT_HEAD_LR
from ..errors import LoftUsageError
from ..load import apply_method, load_data, prepare_inputs, quiet_libraries, resolve_targets
from ..methods import make_optimizer
from .config import FederateConfig

__all__ = ["Bench", "base_weights", "build_bench"]


@dataclass
class Bench:
    """A model of the run and its data, as one process (the server, or a Ray actor serving
    clients one after another) holds it."""

    cfg: FederateConfig
    task: Any
    tokenizer: Any
    model: nn.Module
    max_length: int
    train: list[dict[str, Any]]  # encoded training examples (all of them; a client uses its indices)
    collator: Any
    #: the adapted layers' base weights as loaded (to undo folds: a process serves several clients)
    pristine: dict[str, torch.Tensor] = field(default_factory=dict)
    #: the factors as built from the run's seed (the same in every process): FFA-LoRA's frozen A,
    #: which messages never carry
    start: fed.Factors | None = None
    _trainer: Any = None

    # ------------------------------------------------------------------ the trainable state
    @property
    def has_factors(self) -> bool:
        return self.cfg.method != "full"

    def factors(self) -> fed.Factors | None:
        return fed.get_factors(self.model) if self.has_factors else None

    def others(self) -> dict[str, torch.Tensor]:
        """Every trainable tensor that is not a LoRA factor, by parameter name (clones)."""
        return {n: p.detach().clone() for n, p in self._other_params().items()}

    def _other_params(self) -> dict[str, nn.Parameter]:
        factors = {id(t) for m in self.model.modules() for _, a, b in adapter_factors(m) for t in (a, b)}
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad and id(p) not in factors}

    def set_others(self, values: dict[str, torch.Tensor]) -> None:
        params = self._other_params()
        if set(values) != set(params):
            raise ValueError(f"trainable tensors differ: {sorted(set(values) ^ set(params))[:3]}")
        with torch.no_grad():
            for name, value in values.items():
                params[name].copy_(value)

    def restore_base(self, folds: list[fed.Factors]) -> None:
        """The adapted layers' base weights as loaded, plus every residual folded so far."""
        if not self.pristine:
            return
        weights = base_weights(self.model)
        with torch.no_grad():
            for name, weight in self.pristine.items():
                weights[name].copy_(weight)
        for residual in folds:
            fed.fold_residual(self.model, residual)

    # ------------------------------------------------------------------ training and evaluation
    def optimizer(self) -> torch.optim.Optimizer:
        """A fresh optimizer of the method over the model's trainable parameters."""
        cfg = self.cfg
        head_lr = cfg.head_lr if cfg.head_lr is not None else DEFAULT_HEAD_LR
        if cfg.method == "loft":
            return LoFTAdamW(self.model, lr=cfg.method_lr, head_lr=head_lr)
        method = "full" if cfg.method == "full" else "lora"
        is_head = (lambda n: False) if cfg.method == "full" else (lambda n: "modules_to_save" in n)
        return make_optimizer(method, self.model, lr=cfg.method_lr, head_lr=head_lr, weight_decay=0.0, is_head=is_head)

    def train_steps(self, optimizer: torch.optim.Optimizer, indices: list[int], steps: int, seed: int) -> list[float]:
        """``steps`` optimizer steps on batches drawn from ``indices`` (a fresh permutation per
        pass, from ``seed``), gradients clipped to norm 1 (LoFT's projected norm for LoFT, as
        ``loft finetune`` does); returns the losses."""
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # dropout
        order: list[int] = []
        losses = []
        self.model.train()
        for _ in range(steps):
            batch_idx = []
            while len(batch_idx) < min(self.cfg.batch_size, len(indices)):
                if not order:
                    order = [indices[i] for i in torch.randperm(len(indices), generator=gen).tolist()]
                batch_idx.append(order.pop())
            batch = self.collator([self.train[i] for i in batch_idx])
            loss = self.model(**batch).loss
            loss.backward()
            if isinstance(optimizer, LoFTAdamW):
                clip_grad_norm_(optimizer, 1.0)
            else:
                torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        return losses

    def evaluate(self) -> dict[str, float]:
        """The task's own evaluation (``Trainer.predict``) of the model as it is now: its ``eval_*``
        numbers only (not the per-example predictions, which would repeat in every round's record)."""
        from transformers import Trainer, TrainingArguments

        if self._trainer is None:  # Trainer.predict writes nothing: its output folder is not kept
            folder = tempfile.mkdtemp(prefix="loft-federate-eval-")
            args = TrainingArguments(output_dir=folder, report_to=[], per_device_eval_batch_size=64, use_cpu=True,
                                     disable_tqdm=True)
            self._trainer = Trainer(model=self.model, args=args, data_collator=self.collator,
                                    processing_class=self.tokenizer)
            shutil.rmtree(folder, ignore_errors=True)
        self.model.eval()
        result = self.task.evaluate(self._trainer, self.tokenizer, self.max_length)
        return {k: v for k, v in result.items() if k.startswith("eval_")}


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base weight of every LoRA layer of ``model`` (what :func:`loft.federated.fold_residual`
    adds to), by module name: the layers found by :func:`loft.adapter_factors`, their base
    through PEFT's ``get_base_layer()``."""
    return {name: m.get_base_layer().weight for name, m in model.named_modules() if adapter_factors(m)}


def build_bench(cfg: FederateConfig) -> Bench:
    """Load the data and the model and wrap the model for the method, with ``loft finetune``'s
    own functions (so every check and default is the same); LoftUsageError on bad input."""
    quiet_libraries()
    fcfg = cfg.finetune_config()
    fcfg.check()
    kind = load_data(fcfg)[0].kind  # before the model: its checks are for the task's kind
    if kind != "classification":
        raise LoftUsageError(
            f"loft federate trains classification data ({{\"text\", \"label\"}} records) for now; {cfg.data!r} is "
            f"{kind.replace('_', '-')} data. Use loft finetune for it, or give classification data."
        )
    loaded = prepare_inputs(fcfg)
    task = loaded.task
    targets = None if cfg.method == "full" else resolve_targets(loaded.model, fcfg.target_modules, cfg.rank,
                                                                set(loaded.fresh))
    model = apply_method(fcfg, task, loaded.model, loaded.fresh, targets)
    if cfg.method == "ffa":
        fed.freeze_factor(model, "A")
    pristine = {}
    if cfg.residual == "fold":
        pristine = {name: weight.detach().clone() for name, weight in base_weights(model).items()}
    return Bench(cfg=cfg, task=task, tokenizer=loaded.tokenizer, model=model, max_length=loaded.max_length,
                 train=task.train_dataset(loaded.tokenizer, loaded.max_length), collator=task.collator(loaded.tokenizer),
                 pristine=pristine, start=fed.get_factors(model) if cfg.method != "full" else None)
