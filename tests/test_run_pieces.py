"""The typed pieces of one run (loft/app/finetune.py, loft/app/tasks/base.py): the task protocol,
the frozen run plan and the metrics that metrics.json holds."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from loft.app import finetune as ft
from loft.app.tasks import ClassificationTask, InstructionTask, MultipleChoiceTask, Task
from loft.app.tasks.base import DEFAULT_MEMBERS

#: the keys of metrics.json, in order (what ``loft finetune`` wrote before RunMetrics existed, plus the
#: perplexities of instruction data)
METRICS_KEYS = [
    "eval_accuracy", "eval_loss", "eval_accuracy_before", "eval_loss_before", "eval_perplexity",
    "eval_perplexity_before", "train_loss", "train_loss_last",
    "steps", "epochs", "train_seconds", "seconds", "train_examples_per_second", "resumed_from", "task", "method",
    "rank", "lr", "head_lr", "model", "model_path", "data", "eval_data", "num_train", "num_eval", "batch_size",
    "processes", "max_length", "seed", "trainable_params", "total_params", "fresh_modules", "labels", "loss_curve",
    "loft_version", "torch_threads", "quantization", "base_model_mb", "peak_memory_mb", "load_peak_memory_mb",
    "peak_memory_kind", "lr_search",
]


def _protocol_members() -> list[str]:
    return [n for n, v in vars(Task).items() if not n.startswith("_") and (callable(v) or isinstance(v, property))]


@pytest.mark.parametrize("cls", [ClassificationTask, MultipleChoiceTask, InstructionTask])
def test_tasks_implement_every_protocol_member(cls):
    assert Task in cls.__mro__  # subclassed explicitly, not matched structurally
    members = _protocol_members()
    assert {"num_train", "num_eval", "evaluate", "load_model", "train_dataset", "collator"} <= set(members)
    assert set(DEFAULT_MEMBERS) <= set(members)
    for name in members:  # implemented by the class itself, not the protocol's stub (defaults excepted)
        if name in DEFAULT_MEMBERS and cls is not InstructionTask:
            continue
        assert vars(Task)[name] is not inspect.getattr_static(cls, name), f"{cls.__name__} does not implement {name}"
    for name in ("kind", "default_model", "default_max_length"):
        assert isinstance(getattr(cls, name), (str, int)), (cls.__name__, name)


def test_num_eval_follows_limit_eval():
    task = ClassificationTask(["a", "b"], [0, 1], ["c", "d", "e"], [1, 0, 1], ["neg", "pos"])
    assert task.num_eval == 3
    task.limit_eval(2)
    assert task.num_eval == 2 and isinstance(task, Task)
    mc = MultipleChoiceTask([("q", ["x", "y"], 0)], [("q", ["x", "y"], 1)] * 4)
    mc.limit_eval(1)
    assert mc.num_eval == 1 and mc.label_names is None


def test_run_metrics_has_the_metrics_json_keys_in_order():
    assert [f.name for f in dataclasses.fields(ft.RunMetrics)] == METRICS_KEYS
    values = {k: i for i, k in enumerate(METRICS_KEYS)}
    assert list(ft.RunMetrics(**values).as_dict().items()) == list(values.items())


def test_run_plan_is_frozen():
    assert ft.RunPlan.__dataclass_params__.frozen
    plan = ft.RunPlan(**{f.name: None for f in dataclasses.fields(ft.RunPlan)})
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.max_steps = 3


def test_finetune_is_plan_build_train_save():
    source = inspect.getsource(ft.finetune)
    order = [source.index(f"{step}(") for step in ("plan_run", "prepare_folder", "choose_lr", "build_run", "train_run",
                                                    "save_run")]
    assert order == sorted(order)
