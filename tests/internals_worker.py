"""The 2-process scenarios of tests/test_library_internals.py (run by tests/owner_worker.py's
workers as ``internals:<scenario>``, in the shared 2-rank launch of tests/conftest.py)."""

from __future__ import annotations

import os

import torch
from torch import nn

OUT_DIR = ""
ROWS = 8  # examples of the training set; each process sees its half


class Regressor(nn.Module):
    """``{"loss": mse, "logits": y}`` of one linear layer, as Trainer expects a model's output."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        y = self.lin(x)
        return {"logits": y} if labels is None else {"loss": (y - labels).square().mean(), "logits": y}


def rows(n: int = ROWS) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(n, 6, generator=g), torch.randn(n, 4, generator=g)
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


def ddp_after_predict(rank: int, clear: bool) -> dict[str, object]:
    """``Trainer.predict`` and then ``train()`` (one step of the global batch of 8, 4 rows per
    process) on a fresh Accelerate state, with or without
    :func:`loft.integrations.library_internals.let_train_wrap_for_ddp` in between: whether
    ``train()`` wrapped the model in DDP, and the trained weights (equal on both processes only
    if their gradients were averaged)."""
    from accelerate.state import AcceleratorState
    from transformers import PrinterCallback, Trainer, TrainingArguments

    from loft.integrations.library_internals import let_train_wrap_for_ddp

    AcceleratorState._reset_state(reset_partial_state=True)
    torch.manual_seed(0)
    args = TrainingArguments(output_dir=os.path.join(OUT_DIR, f"ddp-{clear}"), max_steps=1, per_device_train_batch_size=ROWS // 2,
                             per_device_eval_batch_size=ROWS // 2, learning_rate=0.1, max_grad_norm=0.0, save_strategy="no",
                             logging_strategy="no", report_to=[], use_cpu=True, ddp_backend="gloo", disable_tqdm=True, seed=0)
    model = Regressor()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)  # (Adam's first step hides the gradient's size)
    trainer = Trainer(model=model, args=args, train_dataset=rows(), optimizers=(sgd, None))
    trainer.remove_callback(PrinterCallback)
    trainer.predict(rows())
    if clear:
        let_train_wrap_for_ddp(trainer)
    trainer.train()
    return {"ddp": isinstance(trainer.model_wrapped, nn.parallel.DistributedDataParallel),
            "weight": trainer.model.lin.weight.detach().clone()}


def classifier(seed: int = 0):
    """A 1-layer BERT sequence classifier in float64 (no dropout), and 4 examples: ``(model,
    examples, (input_ids, labels))``."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2)
    g = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(1, 30, (4, 5), generator=g), torch.tensor([0, 1, 1, 0])
    examples = [{"input_ids": ids[i], "attention_mask": torch.ones(5, dtype=torch.long), "labels": labels[i]}
                for i in range(4)]
    torch.manual_seed(seed)
    return BertForSequenceClassification(config).double(), examples, (ids, labels)


def classifier_step(folder: str, per_process_mean_loss: bool, accumulate: int, processes: int) -> torch.Tensor:
    """One SGD step of rate 1 of :func:`classifier` under loft finetune's Trainer over its 4
    examples (``accumulate`` micro-batches on each of ``processes`` processes): the change of the
    classifier's weight."""
    from accelerate.state import AcceleratorState
    from transformers import PrinterCallback, Trainer, TrainingArguments

    from loft.app.trainer import trainer_class

    AcceleratorState._reset_state(reset_partial_state=True)
    model, examples, _ = classifier()
    start = model.classifier.weight.detach().clone()
    args = TrainingArguments(output_dir=folder, max_steps=1, per_device_train_batch_size=4 // accumulate // processes,
                             gradient_accumulation_steps=accumulate, learning_rate=1.0, lr_scheduler_type="constant",
                             max_grad_norm=0.0, save_strategy="no", logging_strategy="no", report_to=[], use_cpu=True,
                             ddp_backend="gloo" if processes > 1 else None, disable_tqdm=True, seed=0)
    cls = trainer_class(Trainer, per_process_mean_loss=per_process_mean_loss)
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)
    trainer = cls(model=model, args=args, train_dataset=examples, optimizers=(sgd, None))
    trainer.remove_callback(PrinterCallback)
    trainer.loft_setup(None)
    trainer.train()
    return model.classifier.weight.detach() - start


def fsdp_plugin_on_cpu() -> dict[str, object]:
    """An Accelerator given an FSDP2 plugin on CPU processes, on a fresh Accelerate state: its
    distributed type as made, whether :func:`~loft.integrations.library_internals.fsdp_on_cpu`
    changed it, whether a later ``AcceleratorState()`` still says FSDP2, and whether ``prepare``
    sharded a model (DTensor parameters)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import FullyShardedDataParallelPlugin

    from loft.integrations.library_internals import fsdp_on_cpu

    AcceleratorState._reset_state(reset_partial_state=True)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="NO_WRAP")
    accelerator = Accelerator(fsdp_plugin=plugin, cpu=True)
    out: dict[str, object] = {"made": str(accelerator.state.distributed_type)}
    out["changed"] = fsdp_on_cpu(accelerator, plugin)
    out["fsdp2_later"] = bool(AcceleratorState().is_fsdp2)
    model = accelerator.prepare(Regressor())
    out["sharded"] = all(hasattr(p, "device_mesh") for p in model.parameters())
    return out


def run(scenario: str, rank: int, world: int) -> dict[str, object]:
    if scenario == "ddp_after_predict":
        return {"without": ddp_after_predict(rank, clear=False), "with": ddp_after_predict(rank, clear=True)}
    if scenario == "fsdp_plugin_on_cpu":
        return fsdp_plugin_on_cpu()
    if scenario == "classifier_loss":  # 2 examples on each process, no accumulation
        return {str(mean): classifier_step(os.path.join(OUT_DIR, f"classifier-{mean}"), mean, accumulate=1,
                                           processes=world) for mean in (True, False)}
    raise ValueError(scenario)
