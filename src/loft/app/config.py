"""The settings of a fine-tuning run, defined once: :class:`FinetuneConfig`.

Each user-facing field carries its command-line flags and help (:func:`option`);
:mod:`loft.app.cli` builds ``loft finetune``'s options from them, and ``loft compare``'s shared
options from those marked ``compare=True``. This module imports nothing heavy (no torch,
transformers or typer), so the command line starts fast.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..lr_search import MIN_GAIN
from .errors import LoftUsageError

__all__ = [
    "AUTO_LR",
    "DEFAULT_HEAD_LR",
    "DEFAULT_LR",
    "DEFAULT_LRS",
    "DEFAULT_LR_SOURCES",
    "TASK_FAMILIES",
    "ADAPTER_METHODS",
    "DEFAULT_MAX_STEPS",
    "METHODS",
    "NOT_OPTIONS",
    "FinetuneConfig",
    "OptionSpec",
    "check_batch_split",
    "check_output_option",
    "check_fsdp",
    "compare_fields",
    "default_lr",
    "default_lr_note",
    "finetune_fields",
    "lr_measured",
    "option",
    "option_fields",
    "parse_lr",
    "parse_rate",
    "shared_option",
    "split_modules",
]

#: ``--method`` values: LoFT, PEFT's LoRA family (plain, DoRA, LoRA+, LoRA-FA, PiSSA, rsLoRA; see
#: loft/app/methods.py) and full fine-tuning.
METHODS = ("loft", "lora", "dora", "loraplus", "lorafa", "pissa", "rslora", "full")
#: the methods that train an adapter (``loft compare --methods``)
ADAPTER_METHODS = tuple(m for m in METHODS if m != "full")

#: The task families of ``loft finetune`` (a task's ``kind``): an encoder with a fresh head, and a causal LM
#: scored on multiple-choice answers or trained on instruction data (TRL's SFTTrainer).
TASK_FAMILIES = ("classification", "multiple_choice", "instruction")
#: Classification (MiniLM-L6 with a fresh head); where each rate comes from: :data:`DEFAULT_LR_SOURCES`.
_CLASSIFICATION = {"loft": 4e-4, "lora": 2e-3, "dora": 2e-3, "loraplus": 2.5e-4, "lorafa": 8e-3, "pissa": 8e-4,
                   "rslora": 1.6e-3, "full": 2e-4}
#: Default learning rate per task family and method: ``DEFAULT_LRS[family][method]``. Multiple choice's and
#: instruction's are copies of classification's where :data:`DEFAULT_LR_SOURCES` says so, not yet measured on those
#: families: benchmarks/lr_defaults.py tunes every method on two or three tasks per family and its report gives the
#: numbers that replace them (docs/results.md, section 5).
DEFAULT_LRS: dict[str, dict[str, float]] = {
    "classification": dict(_CLASSIFICATION),
    # LoFT's measured; the others copied from classification
    "multiple_choice": {**_CLASSIFICATION, "loft": 8e-4},
    # LoFT's and LoRA's measured (LoFT's the same rate as classification's); the others copied from classification
    "instruction": {**_CLASSIFICATION, "lora": 3.2e-3},
}
_MEASURED = ("measured (benchmarks/lr_defaults.py): the best mean validation accuracy over movie sentiment and TREC "
             "question types, 3 tuning seeds, 100 steps, rank 4")
#: instruction data (SmolLM2-135M, answers of one word): Social IQa's grids stay at chance at 100 steps, so the two
#: other tasks vote (the protocol's rule)
_INSTRUCTION = ("measured (benchmarks/lr_defaults.py): the best mean validation accuracy over TREC question types "
                "and movie sentiment answered in one word (SmolLM2-135M; Social IQa's grid did not leave chance and "
                "does not vote), 3 tuning seeds, 100 steps, rank 4")
#: multiple-choice data (SmolLM2-135M): as on instruction data, Social IQa's grid stays at chance at 100 steps
_MULTIPLE_CHOICE = (
    "(benchmarks/lr_defaults.py): the best mean validation accuracy over TREC question types as 6 choices and "
    "movie sentiment as 2 (SmolLM2-135M; Social IQa's grid did not leave chance and does not vote), 3 tuning seeds, "
    "100 steps, rank 4")
_MEASURED_MULTIPLE_CHOICE = (
    "measured " + _MULTIPLE_CHOICE + "; 0.3 points above classification's 4e-4 (the mean over the two tasks), within the seeds' "
    "noise. Adopted by LoFT's own rule, as on the other families: none of its 3 tuning runs at twice it (1.6e-3) on "
    "TREC fell to chance, and movie sentiment's grid did not run 1.6e-3")
_MEASURED_INSTRUCTION = (_INSTRUCTION + "; as classification's, it keeps LoFT's own rule: 1 of its 6 tuning runs at "
                         "twice it (8e-4) fell to chance, on movie sentiment")
#: a peer's measured default is adopted when every tuning run at it and at the next lattice point up left chance
#: (on classification, LoRA's and DoRA's measured 3.2e-3 were not: runs one point above them fell to chance)
_ADOPTED_PEER = "; adopted since every tuning run at it and at twice it beat always giving the most frequent answer"
_MEASURED_PEER = _MEASURED + _ADOPTED_PEER + " (a margin of one lattice point to where the method fell to chance)"
_MEASURED_INSTRUCTION_PEER = _INSTRUCTION + _ADOPTED_PEER
_APP_LRS = "movie sentiment alone, one seed, validation split (benchmarks/app_methods.py lrs, docs/results/app_lrs.md)"
_COPY = "a copy of classification's: not measured on this family yet"
#: Where each default of :data:`DEFAULT_LRS` comes from, by family and method (the table of
#: docs/results/lr_defaults.md, "The defaults now", is made from it).
DEFAULT_LR_SOURCES: dict[str, dict[str, str]] = {
    "classification": {
        "loft": _MEASURED, "full": _MEASURED,
        "lora": ("movie sentiment: the usual ratio to LoFT's first default (5e-4), next to the per-rank tuning of "
                 "benchmarks/evidence.py (1.6e-3 at rank 4). The two-task measurement's 3.2e-3 is not adopted: it is "
                 "where LoRA first collapsed in the stability runs"),
        "dora": ("LoRA's (the per-rank tuning of benchmarks/evidence.py chose the same rate for both at rank 4). The "
                 "two-task measurement's 3.2e-3 is not adopted: its grids fell towards chance one point above it, and "
                 "on test it trailed movie sentiment's own best rate by 2.6 points, while --lr auto, which kept 2e-3 in 5 "
                 "of its 6 runs, came within 1 point of each task's best (benchmarks/lr_defaults.py, docs/results.md "
                 "section 5)"),
        "pissa": _MEASURED_PEER, "rslora": _MEASURED_PEER,
        "loraplus": (_APP_LRS + ". The two-task measurement's 4e-4 (A's rate) is not adopted: 1 of its 6 tuning runs at "
                     "twice it (8e-4) fell to chance, on movie sentiment"),
        "lorafa": (_APP_LRS + ". The two-task measurement's 1.28e-2 is not adopted: 2 of its 6 tuning runs at twice it "
                   "(2.56e-2) fell to chance, on movie sentiment; 8e-3 lies between the two tasks' own best rates "
                   "(6.4e-3 and 1.28e-2)"),
    },
    "multiple_choice": {**{m: _COPY for m in _CLASSIFICATION}, "loft": _MEASURED_MULTIPLE_CHOICE,
                        "lora": ("classification's, kept after measuring " + _MULTIPLE_CHOICE + ", was at 3.2e-3 "
                                 "(0.900; 1.6e-3: 0.875), not adopted: 1 of its 6 tuning runs at twice it (6.4e-3) "
                                 "fell to chance, on movie sentiment")},
    "instruction": {**{m: _COPY for m in _CLASSIFICATION},
                    "loft": _MEASURED_INSTRUCTION,  # the same rate as the copy, now measured
                    "lora": _MEASURED_INSTRUCTION_PEER},
}
#: Classification's defaults (the default task), by method.
DEFAULT_LR = DEFAULT_LRS["classification"]
#: ``--lr auto``: search the learning rate (loft/app/autolr.py) instead of taking the default.
AUTO_LR = "auto"


def default_lr(method: str, family: str = "classification") -> float:
    """The default learning rate of ``method`` on a task of ``family`` (:data:`DEFAULT_LRS`)."""
    return DEFAULT_LRS[family][method]


def lr_measured(method: str, family: str) -> bool:
    """Whether ``method``'s default learning rate on ``family`` was measured on tasks of that
    family (:data:`DEFAULT_LR_SOURCES`), not copied from classification's."""
    return DEFAULT_LR_SOURCES[family][method] != _COPY


def default_lr_note(family: str, methods: list[str]) -> str | None:
    """What a run (or a comparison) taking ``methods``' default learning rates on a ``family`` task
    should be told before it starts: ``None`` where every one of them was measured on that family
    (:func:`lr_measured`), else which of them are classification's copies and what to do."""
    methods = list(dict.fromkeys(methods))
    copies = [m for m in methods if not lr_measured(m, family)]
    if not copies:
        return None
    rates = ", ".join(f"{m} {default_lr(m, family):g}" for m in copies)
    one = len(copies) == 1
    return (f"Note: the default learning rate{'' if one else 's'} ({rates}) {'was' if one else 'were'} measured on "
            f"classification tasks, not yet on {family.replace('_', ' ')} tasks (docs/workflow.md, \"Learning rates\")"
            + ("" if len(methods) == 1 else ", so a comparison at them can favour whichever default suits this data")
            + f". On data of your own, give --lr, or --lr auto to check {'it' if one else 'them'} against a short "
            "search.")


#: Default learning rate of fresh head parameters, the same for every method (docs/workflow.md).
DEFAULT_HEAD_LR = 2e-3
#: Steps of the default run (and of each ``loft compare`` run) when neither steps nor epochs are given.
DEFAULT_MAX_STEPS = 400


@dataclass(frozen=True)
class OptionSpec:
    """How a :class:`FinetuneConfig` field appears on the command line."""

    flags: tuple[str, ...]  # "--model", "-m"
    help: str
    cli_type: Any = None  # the type typer parses, when it differs from the field's (e.g. repeated values)
    parse: Callable[[Any], Any] | None = None  # command-line value -> field value
    compare: bool = True  # also a loft compare option (the same for every run of a comparison)


def option(default: Any, *flags: str, help: str, cli_type: Any = None, parse: Callable[[Any], Any] | None = None,
           compare: bool = True) -> Any:
    """A :class:`FinetuneConfig` field that is a command-line option (see :class:`OptionSpec`)."""
    spec = OptionSpec(tuple(flags), help, cli_type, parse, compare)
    return dataclasses.field(default=default, metadata={"option": spec})


def _sci(value: float) -> str:
    """``0.00025`` -> ``"2.5e-4"`` (for help texts)."""
    mantissa, exponent = f"{value:e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def parse_rate(text: str | float | None, flag: str = "--lr") -> float | None:
    """A learning rate given on the command line: a number (``None`` when not given). Its range is
    checked with the other settings; ``auto`` is refused here (a search is loft finetune's and loft
    compare's)."""
    if text is None or isinstance(text, (int, float)):
        return text
    if text.strip().lower() == AUTO_LR:
        raise LoftUsageError(f"{flag} auto (a learning-rate search) is for loft finetune and loft compare; give "
                             f"{flag} a number here, or leave it out for the default.")
    try:
        return float(text)
    except ValueError:
        raise LoftUsageError(f"{flag} takes a number (e.g. 2e-4) or auto, got {text!r}.") from None


def parse_lr(text: str | float | None) -> float | str | None:
    """``--lr``: a number, or ``auto`` (search it: loft/app/lr_search.py)."""
    if isinstance(text, str) and text.strip().lower() == AUTO_LR:
        return AUTO_LR
    return parse_rate(text)


def split_modules(values: list[str] | None) -> list[str] | None:
    """``--target-modules q,v --target-modules o`` -> ``["q", "v", "o"]``."""
    if not values:
        return None
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


@dataclass
class FinetuneConfig:
    """Settings of one run. ``None`` means "the default".

    A field made with :func:`option` is a ``loft finetune`` option (and, unless
    ``compare=False``, a ``loft compare`` option shared by all its runs); the command line is
    built from these fields, so a new option is one new field here.
    """

    model: str | None = option(
        None, "--model", "-m",
        help="Built-in name (minilm-l6, smollm2-135m), local Hugging Face folder or hub id. Default: minilm-l6 for "
        "classification, smollm2-135m for multiple choice and instruction data.",
    )
    data: str = option("movie_sentiment", "--data", "-d", help="Built-in set (movie_sentiment, social_iqa, social_iqa_sft) or a .jsonl/.csv file.")
    eval_data: str | None = option(
        None, "--eval-data", help="Eval file. Default: the built-in test split, or 10% of --data held out."
    )
    method: str = option("loft", "--method", help=" | ".join(METHODS), compare=False)
    rank: int = option(4, "--rank", "-r", help="LoRA rank.", compare=False)
    alpha: float | None = None
    target_modules: list[str] | None = option(
        None, "--target-modules", cli_type=Optional[list[str]], parse=split_modules,
        help="Linear layers to adapt (names or suffixes, comma separated). Default: all linear layers.",
    )
    max_steps: int | None = option(None, "--max-steps", help="Optimizer steps (default 400 when --epochs is not given).")
    epochs: float | None = option(None, "--epochs", help="Epochs over --data instead of --max-steps.")
    lr: float | str | None = option(
        None, "--lr", cli_type=Optional[str], parse=parse_lr,
        help="Learning rate, or auto: search it (successive halving over 1e-4 * 2**k around the default, on a "
        "validation split carved from the training data, within --lr-search-budget; the default is kept unless the "
        "best trial beats always giving the most frequent answer and, at another rate, the default's trial by "
        f"{MIN_GAIN:g}; no rate at or above one whose trial collapsed to that floor is chosen). Default per method "
        "and task "
        "(classification: " + ", ".join(f"{m} {_sci(v)}" for m, v in DEFAULT_LR.items()) + ").", compare=False
    )
    lr_search_budget: float = option(
        0.25, "--lr-search-budget",
        help="With --lr auto: the most training steps the search may take, as a fraction of the run's steps "
        "(0.25: a quarter).",
    )
    head_lr: float | None = option(None, "--head-lr", help="Learning rate of the fresh head (every method). Default 2e-3.")
    batch_size: int = option(
        16, "--batch-size", "-b",
        help="Examples per optimizer step; on several processes (torchrun, accelerate launch) the global batch, split "
        "evenly over them.",
    )
    max_length: int | None = option(
        None, "--max-length", help="Max tokens per example (default 64 classification, 128 multiple choice, 256 instruction)."
    )
    max_eval: int | None = option(None, "--max-eval", help="Evaluate on the first N eval examples only.")
    seed: int = option(0, "--seed", help="Random seed (data order, head init).")
    output_dir: str | None = option(
        None, "--output-dir", "-o", help="Default: runs/<data>-<method>-r<rank>.", compare=False
    )
    fsdp: bool = option(
        False, "--fsdp",
        help="Shard the model with FSDP2 (torch fully_shard: each transformer block, then the root) over the processes "
        "of torchrun / accelerate launch, instead of replicating it (DDP). Methods loft, lora and full.",
    )
    load_in_4bit: bool = option(
        False, "--load-in-4bit",
        help="QLoRA: load the base model's linear layers in 4 bits (bitsandbytes nf4) and train the adapter on "
        "them (not with --method full or pissa). Needs bitsandbytes (the qlora extra of torch-loft).",
    )
    load_in_8bit: bool = option(
        False, "--load-in-8bit",
        help="Load the base model's linear layers in 8 bits (bitsandbytes LLM.int8) instead; as --load-in-4bit.",
    )
    # not options of the command line (set from Python: benchmarks, loft compare)
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    grad_accum: int = 1
    save_steps: int = 200
    logging_steps: int = 10
    eval_before: bool = True
    lr_search_points: int = 7  # --lr auto: lattice rates searched (7: 1/8 to 8 times the default)
    # --lr auto's rule (loft.lr_search.AUTO_RULE, rule 4): the gain a move from the default must show (0: off) and
    # the cap (no rate at or above a collapsed trial's; where the data gives a floor). 0 and False: rule 2
    lr_search_min_gain: float = MIN_GAIN
    lr_search_cap: bool = True
    lr_trial: bool = False  # a trial of a learning-rate search: no checkpoints, no result files

    def check(self, processes: int = 1) -> None:
        """Refuse impossible settings with a clear message (``processes``: data-parallel processes)."""
        if self.method not in METHODS:
            raise LoftUsageError(f"Unknown --method {self.method!r}; choose one of: {', '.join(METHODS)}.")
        if self.rank < 1:
            raise LoftUsageError(f"--rank must be a positive integer, got {self.rank}.")
        if self.max_steps is not None and self.epochs is not None:
            raise LoftUsageError("Give --max-steps or --epochs, not both.")
        if self.max_steps is not None and self.max_steps < 1:
            raise LoftUsageError(f"--max-steps must be >= 1, got {self.max_steps}.")
        if self.epochs is not None and not self.epochs > 0:
            raise LoftUsageError(f"--epochs must be > 0, got {self.epochs}.")
        if self.epochs is not None and not math.isfinite(self.epochs):
            raise LoftUsageError(f"--epochs must be a finite number, got {self.epochs}.")
        for name in ("lr", "head_lr"):
            value = getattr(self, name)
            if value is not None and value != AUTO_LR and not (value > 0 and math.isfinite(value)):
                raise LoftUsageError(f"--{name.replace('_', '-')} must be > 0 and finite, got {value}.")
        if not (self.lr_search_budget > 0 and math.isfinite(self.lr_search_budget)):
            raise LoftUsageError(
                f"--lr-search-budget must be a fraction > 0 of the run's steps (0.25: a quarter), got {self.lr_search_budget}.")
        if self.lr_search_points < 2:
            raise LoftUsageError(f"FinetuneConfig.lr_search_points must be >= 2, got {self.lr_search_points}.")
        if not (self.lr_search_min_gain >= 0 and math.isfinite(self.lr_search_min_gain)):
            raise LoftUsageError(f"FinetuneConfig.lr_search_min_gain must be >= 0 and finite, got "
                                 f"{self.lr_search_min_gain}.")
        if not 0 <= self.seed < 2**32:
            raise LoftUsageError(f"--seed must be between 0 and {2**32 - 1}, got {self.seed}.")
        if self.batch_size < 1:
            raise LoftUsageError(f"--batch-size must be >= 1, got {self.batch_size}.")
        if self.grad_accum < 1:
            raise LoftUsageError(f"FinetuneConfig.grad_accum must be >= 1, got {self.grad_accum}.")
        check_batch_split(self.batch_size, processes)
        check_fsdp(self.fsdp, self.method, processes, self.quantization)
        self.check_quantization()
        if self.max_length is not None and self.max_length < 8:
            raise LoftUsageError(f"--max-length must be >= 8, got {self.max_length}.")
        if self.max_eval is not None and self.max_eval < 1:
            raise LoftUsageError(f"--max-eval must be >= 1, got {self.max_eval}.")
        check_output_option(self.output_dir, "runs/<data>-<method>-r<rank>")

    @property
    def quantization(self) -> str | None:
        """``"4bit"``, ``"8bit"`` or ``None`` (a full-precision base)."""
        return "4bit" if self.load_in_4bit else "8bit" if self.load_in_8bit else None

    def check_quantization(self) -> None:
        """Refuse ``--load-in-4bit`` / ``--load-in-8bit`` where they cannot work (before any loading)."""
        if self.load_in_4bit and self.load_in_8bit:
            raise LoftUsageError("Give --load-in-4bit or --load-in-8bit, not both.")
        flag = f"--load-in-{self.quantization}" if self.quantization else None
        if flag is None:
            return
        if self.method == "full":
            raise LoftUsageError(
                f"--method full cannot train a quantized base ({flag}): its weights are frozen integers. Train an "
                f"adapter on it (--method {' / '.join(ADAPTER_METHODS[:3])} ...), or drop {flag} for full fine-tuning."
            )
        if self.method == "pissa":
            raise LoftUsageError(
                f"--method pissa cannot start from a quantized base ({flag}): PiSSA moves the principal part of every "
                "adapted weight into the adapter and keeps the rest as the new base weight, which PEFT does only in "
                f"full precision. Use another method with {flag}, or drop {flag}."
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise LoftUsageError(
                f"{flag} needs the bitsandbytes package (>= 0.50, which also runs on the CPU), which is not installed. "
                "Install the qlora extra: pip install 'torch-loft[qlora]'."
            )

    def identity(self) -> dict[str, Any]:
        """The settings that make a run what it is (compared when an output dir is reused)."""
        d = dataclasses.asdict(self)
        for key in ("output_dir", "save_steps", "logging_steps"):
            d.pop(key)
        for key in ("load_in_4bit", "load_in_8bit", "lr_trial"):  # absent (False) in earlier runs
            if not d[key]:
                d.pop(key)
        if self.lr != AUTO_LR:  # the search's settings matter only to a search
            for key in ("lr_search_budget", "lr_search_points", "lr_search_min_gain", "lr_search_cap"):
                d.pop(key)
        else:
            for key in ("lr_search_min_gain", "lr_search_cap"):  # 0 and False (rule 2): absent, as before rules 3, 4
                if not d[key]:
                    d.pop(key)
        return d


#: identity keys left out where off (False, 0), so that runs made before them keep their identity: a
#: saved run that has one on and settings that leave it out are different runs
ABSENT_WHEN_OFF = ("load_in_4bit", "load_in_8bit", "lr_trial", "lr_search_min_gain", "lr_search_cap")


def check_output_option(value: str | None, default: str) -> None:
    """Refuse an empty ``--output-dir`` (``-o ''``: it would name the current folder)."""
    if value is not None and not str(value).strip():
        raise LoftUsageError(f"--output-dir is empty; give a folder, or leave the option out for {default}.")


def check_batch_split(batch_size: int, processes: int) -> None:
    """``--batch-size`` is the global batch; refuse one that ``processes`` cannot share evenly."""
    if processes > 1 and batch_size % processes:
        lower = batch_size // processes * processes
        choices = " or ".join(str(b) for b in (lower, lower + processes) if b > 0)
        raise LoftUsageError(
            f"--batch-size {batch_size} cannot be split evenly over {processes} processes: --batch-size is the "
            f"global batch (examples per optimizer step, all processes together), each process takes "
            f"--batch-size / {processes}. Give a multiple of {processes}, e.g. {choices}."
        )


#: the methods ``--fsdp`` is tested with
FSDP_METHODS = ("loft", "lora", "full")


def check_fsdp(fsdp: bool, method: str, processes: int, quantization: str | None = None) -> None:
    """``--fsdp`` needs several processes, a full-precision base and a method it is tested with."""
    if not fsdp:
        return
    if processes <= 1:
        raise LoftUsageError(
            "--fsdp shards the model over several processes, but this is one process. Launch it with "
            "torchrun --nproc_per_node N -m loft.app finetune ... or accelerate launch --multi_gpu --num_processes N "
            "-m loft.app finetune ... (N >= 2), or leave --fsdp out."
        )
    if quantization is not None:
        raise LoftUsageError(
            f"--fsdp with --load-in-{quantization} is not supported: sharding a bitsandbytes-quantized base with "
            f"FSDP2 is untested. Use --load-in-{quantization} on one process (or under DDP without --fsdp), or "
            "--fsdp with a full-precision base."
        )
    if method not in FSDP_METHODS:
        raise LoftUsageError(
            f"--fsdp with --method {method} (or {method} in loft compare's --methods) is not supported: only "
            f"{', '.join(FSDP_METHODS)} are tested under FSDP2. With --fsdp use one of them (loft compare --methods "
            f"loft,lora), or run {method} without --fsdp (DDP)."
        )


#: FinetuneConfig fields that are deliberately not command-line options (set from Python).
NOT_OPTIONS = ("alpha", "warmup_ratio", "weight_decay", "max_grad_norm", "grad_accum", "save_steps", "logging_steps",
               "eval_before", "lr_search_points", "lr_search_min_gain", "lr_search_cap", "lr_trial")


def option_fields(cls: type) -> list[tuple[dataclasses.Field, OptionSpec]]:
    """The fields of a config dataclass that are command-line options, in order."""
    return [(f, f.metadata["option"]) for f in dataclasses.fields(cls) if "option" in f.metadata]


def finetune_fields() -> list[tuple[dataclasses.Field, OptionSpec]]:
    """The :class:`FinetuneConfig` fields that are ``loft finetune`` options, in order."""
    return option_fields(FinetuneConfig)


def shared_option(name: str, help: str | None = None) -> Any:
    """A field of another command's config (``loft federate``'s) that is :class:`FinetuneConfig`'s
    option ``name``: its default, flags and parsing, defined once there (``help``: another text)."""
    field = {f.name: f for f in dataclasses.fields(FinetuneConfig)}[name]
    spec: OptionSpec = field.metadata["option"]
    return option(field.default, *spec.flags, help=help or spec.help, cli_type=spec.cli_type, parse=spec.parse)


def compare_fields() -> list[tuple[dataclasses.Field, OptionSpec]]:
    """The options ``loft compare`` shares with ``loft finetune`` (one value for every run)."""
    return [(f, spec) for f, spec in finetune_fields() if spec.compare]
