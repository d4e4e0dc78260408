"""The Trainer of a run: its arguments (``TrainingArguments``, FSDP2's), the mixin that keeps every
step's loss and writes checkpoints atomically, and the per-step loss curve."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import publish_dir, write_failure, write_json
from .config import FinetuneConfig
from .errors import OutputWriteError
from .launch import any_rank, barrier, cpu_processes
from .rundir import CHECKPOINTS, PROGRESS_FILE, STAGING, checkpoint_name, checkpoints_in

_TRAINER_CLASSES: dict[tuple[type, bool], type] = {}
#: what ``Trainer.save_model`` writes beside a model: its ``TrainingArguments`` (``torch.save``)
TRAINING_ARGS_FILE = "training_args.bin"

def fsdp_args(cfg: FinetuneConfig, model: nn.Module) -> dict[str, Any]:
    """Trainer's FSDP2 arguments for ``--fsdp``: ``fully_shard`` on each transformer block (the
    class of the layers of the model's ``nn.ModuleList`` stacks; Accelerate adds the input
    embeddings and the output head), then on the root. Checkpoints are Accelerate's DCP folders
    (``SHARDED_STATE_DICT``): its ``FULL_STATE_DICT`` resume hangs on CPU processes (Accelerate
    1.15's ``load_fsdp_model`` broadcasts the model on one rank only)."""
    if not cfg.fsdp:
        return {}
    blocks = sorted({type(m[0]).__name__ for m in model.modules()
                     if isinstance(m, nn.ModuleList) and len(m) > 1 and len({type(c) for c in m}) == 1})
    config: dict[str, Any] = {"version": 2, "reshard_after_forward": True, "state_dict_type": "SHARDED_STATE_DICT"}
    if blocks:
        config["transformer_layer_cls_to_wrap"] = blocks
    return {"fsdp": "full_shard auto_wrap" if blocks else "full_shard", "fsdp_config": config}


def training_args(cfg: FinetuneConfig, out: Path, max_steps: int, lr: float, processes: int = 1,
                   fsdp: dict[str, Any] | None = None):
    from transformers import TrainingArguments

    cpu = cpu_processes()  # several processes, no GPU: DDP (or FSDP2, --fsdp) on the CPU over gloo
    return TrainingArguments(
        **(fsdp or {}),
        output_dir=str(out / CHECKPOINTS),
        max_steps=max_steps,
        per_device_train_batch_size=cfg.batch_size // processes,
        per_device_eval_batch_size=max(32, cfg.batch_size),
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=lr,
        weight_decay=cfg.weight_decay,
        lr_scheduler_type="linear",
        warmup_steps=int(round(cfg.warmup_ratio * max_steps)),
        max_grad_norm=cfg.max_grad_norm,
        logging_steps=max(1, min(cfg.logging_steps, max_steps // 10)),
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=1,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        dataloader_pin_memory=False,
        use_cpu=cpu,
        ddp_backend="gloo" if cpu else None,
    )


class RunTrainerMixin:
    """What ``loft finetune`` adds to ``transformers.Trainer``:

    - the training loss of every step, kept (averaged over the processes) in each checkpoint, so
      that after ``--resume`` ``metrics.json`` describes the whole run as if uninterrupted;
    - checkpoints written into ``checkpoints/.incoming/`` and renamed into place once complete,
      so a kill at any moment leaves the previous checkpoint intact (``--resume`` uses it).
    """

    #: builds the optimizer inside the Trainer (``--fsdp`` with lora / full: Trainer refuses a
    #: pre-built optimizer under FSDP); ``None``: the Trainer's own (LoFTTrainer's LoFTAdamW)
    optimizer_factory: Any = None

    def create_accelerator_and_postprocess(self) -> None:
        from ..integrations.library_internals import shard_trainer_on_cpu

        super().create_accelerator_and_postprocess()
        shard_trainer_on_cpu(self)  # --fsdp on CPU processes: FSDP2 over gloo

    def create_optimizer(self, model=None):
        if self.optimizer_factory is not None and self.optimizer is None:
            self.optimizer = self.optimizer_factory(self.model if model is None else model)
        return super().create_optimizer(model)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Trainer's, except under FSDP2 (``--fsdp``): the whole trainable values gathered by every
        rank, written by rank 0 with the tokenizer and the arguments, as Trainer writes them
        (Accelerate's ``get_state_dict`` hands DTensors to PEFT on CPU processes)."""
        if not self.accelerator.is_fsdp2:
            return super().save_model(output_dir, _internal_call)
        weights = full_trainable_state(self.model)  # a collective
        if self.args.should_save:
            folder = Path(output_dir or self.args.output_dir)
            folder.mkdir(parents=True, exist_ok=True)
            self.model.save_pretrained(folder, state_dict=weights)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(folder)
            torch.save(self.args, folder / TRAINING_ARGS_FILE)

    def loft_setup(self, progress: dict[str, Any] | None) -> None:
        self._loft_prior_losses = list((progress or {}).get("losses", []))
        self._loft_prior_seconds = float((progress or {}).get("train_seconds", 0.0))
        self._loft_step_losses: dict[int, torch.Tensor] = {}
        self._loft_t0 = time.perf_counter()

    # Trainer's batch fetch before each optimizer step (library_internals.BATCH_SAMPLES_HOOK)
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Trainer's, except when the run already took its last step: a resume from the checkpoint
        written after the final step (an interruption during the final evaluation or while saving)
        would otherwise train step ``max_steps + 1`` (transformers 5.25 checks the step count only
        after a step). No batch then, and training stops before any step."""
        if self.state.global_step >= self.state.max_steps:
            self.control.should_training_stop = True
            return [], None
        return super().get_batch_samples(epoch_iterator, num_batches, device)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        step = self.state.global_step + 1
        value = loss.detach().float().reshape(())
        prev = self._loft_step_losses.get(step)
        self._loft_step_losses[step] = value if prev is None else prev + value
        return loss

    def loft_progress(self) -> dict[str, Any]:
        """Per-step losses of the whole run so far and its training seconds (a collective)."""
        steps = sorted(self._loft_step_losses)
        values: list[float] = []
        if steps:
            t = torch.stack([self._loft_step_losses[s] for s in steps])
            if group_running():
                torch.distributed.all_reduce(t)
                t = t / torch.distributed.get_world_size()
            values = t.tolist()
        losses = self._loft_prior_losses[: (steps[0] - 1) if steps else None] + values
        seconds = self._loft_prior_seconds + time.perf_counter() - self._loft_t0
        return {"losses": losses, "train_seconds": seconds}

    # Trainer's private checkpoint hook (library_internals.SAVE_CHECKPOINT_HOOK)
    def _save_checkpoint(self, model, trial):
        from ..integrations.library_internals import saving_checkpoints_into

        root = Path(self.args.output_dir)
        name = checkpoint_name(self.state.global_step)
        staging = root / STAGING
        if self.args.should_save:
            shutil.rmtree(staging / name, ignore_errors=True)
        barrier()
        failed = None
        try:
            with saving_checkpoints_into(self, staging):
                super()._save_checkpoint(model, trial)
        except Exception as e:  # a full disk ...: every rank learns of it below, none is left waiting
            failed = write_failure(e, staging)
            if failed is None:
                raise
        progress = self.loft_progress()
        if self.args.should_save and failed is None:
            try:
                write_json(staging / name / PROGRESS_FILE, progress)
            except OSError as e:
                failed = write_failure(e, staging)
        if any_rank(failed is not None, self.args.device):
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)  # the partial checkpoint would keep the disk full
            raise OutputWriteError(f"{failed or 'another process could not write its part'} while writing {name} "
                                   f"into {str(root)!r} (its partial files were removed)")
        barrier()  # every process has written its files (rng_state_<rank>.pth) before the rename
        if self.args.should_save:
            publish_dir(staging / name, root / name)
            try:
                staging.rmdir()  # only when empty
            except OSError:
                pass
            for old in checkpoints_in(root.parent):
                if old.name != name:
                    shutil.rmtree(old, ignore_errors=True)
        barrier()


class PerProcessMeanLoss:
    """For a model whose loss is a plain mean over one micro-batch of this process's examples
    (sequence classifiers), what Trainer needs to be told.

    Sequence classifiers take ``**kwargs``, so Trainer would pass them ``num_items_in_batch``
    (which they ignore) and count their loss as normalised over the whole accumulated batch of
    every process: not divided by the gradient accumulation steps, and multiplied by the number
    of processes (which DDP then averages): N times the gradient on N processes. Here
    ``compute_loss`` passes no ``num_items_in_batch`` (Trainer then leaves the loss as it is) and
    ``loss_is_scaled_for_ga = False`` (Trainer's documented switch for subclasses) makes
    ``training_step`` divide it by the accumulation steps. Only public Trainer API.
    """

    loss_is_scaled_for_ga = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=None)


def trainer_class(base: type, per_process_mean_loss: bool = False) -> type:
    """``base`` (Trainer or LoFTTrainer) with :class:`RunTrainerMixin`, and with
    :class:`PerProcessMeanLoss` where the model's loss is a per-process mean (classification)."""
    key = (base, per_process_mean_loss)
    if key not in _TRAINER_CLASSES:
        mixins = (RunTrainerMixin, PerProcessMeanLoss) if per_process_mean_loss else (RunTrainerMixin,)
        _TRAINER_CLASSES[key] = type(f"Run{base.__name__}", (*mixins, base), {})
    return _TRAINER_CLASSES[key]


def group_running() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def loss_curve(losses: list[float], every: int) -> list[tuple[int, float]]:
    """Mean loss of every ``every`` steps (and of the steps after the last full window)."""
    curve, start = [], 0
    for step in range(1, len(losses) + 1):
        if step % every == 0 or step == len(losses):
            window = losses[start:step]
            curve.append((step, sum(window) / len(window)))
            start = step
    return curve


def count_params(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def full_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole values of an FSDP2-sharded model's parameters (trainable ones, and all of
    them for full fine-tuning), on the CPU of rank 0 (empty on the others). A collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    frozen = any(not p.requires_grad for p in model.parameters())
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=frozen)
    return get_model_state_dict(model, options=options)
