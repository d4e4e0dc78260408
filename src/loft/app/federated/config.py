"""The settings of a federated run (``loft federate``): :class:`FederateConfig`, checked once.

This module imports nothing heavy (no torch, no Flower): the command line checks its options
before anything is loaded.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..config import DEFAULT_LR, FinetuneConfig, check_output_option, option, parse_rate, shared_option
from ..errors import LoftUsageError

__all__ = ["AGGREGATORS", "FED_METHODS", "RESIDUALS", "FederateConfig", "parse_split"]

#: ``--method``: LoFT, LoRA (AdamW), FFA-LoRA (LoRA with every A frozen at its random start; AdamW
#: on B) and full fine-tuning (FedAvg of every weight, the reference)
FED_METHODS = ("loft", "lora", "ffa", "full")
#: ``--aggregator``: the mean of the clients' products B_k A_k re-factored to rank r
#: (loft.federated.aggregate_products); the means of A and of B separately (loft.federated.fedavg);
#: alternating rounds, each training one factor (loft.federated.alternating_aggregate)
AGGREGATORS = ("product", "fedavg", "alternating")
#: ``--residual``: what ``product`` does with the part of the mean beyond rank r
RESIDUALS = ("drop", "carry", "fold")


def parse_split(text: str) -> float | None:
    """``"even"`` -> ``None`` (an even iid split); ``"dirichlet:0.1"`` or ``"0.1"`` -> 0.1 (label skew
    from Dirichlet(alpha) per class: small alpha, few classes per client)."""
    value = text.strip().lower()
    if value in ("even", "iid"):
        return None
    value = value.removeprefix("dirichlet:").removeprefix("dirichlet=")
    try:
        alpha = float(value)
    except ValueError:
        alpha = float("nan")
    if not (alpha > 0 and math.isfinite(alpha)):
        raise LoftUsageError(
            f"--split {text!r} is neither 'even' nor a Dirichlet concentration: give --split even, or "
            "--split dirichlet:ALPHA with ALPHA > 0 (e.g. dirichlet:0.1 for strong label skew, dirichlet:1.0 for mild)."
        )
    return alpha


@dataclass
class FederateConfig:
    """Settings of one federated run. ``None`` means "the default" (per method).

    A field made with :func:`~loft.app.config.option` is a ``loft federate`` option; one made with
    :func:`~loft.app.config.shared_option` is ``loft finetune``'s option of that name (its default,
    flags and parsing come from :class:`FinetuneConfig`), so the command line is built from these
    fields and no default is typed twice.
    """

    model: str | None = shared_option(
        "model", help="As loft finetune: built-in name, local Hugging Face folder or hub id. Default: minilm-l6.")
    data: str = shared_option(
        "data", help="Classification data: built-in movie_sentiment or a .jsonl/.csv file of {text, label}.")
    eval_data: str | None = shared_option(
        "eval_data", help="Eval file (the server evaluates the global model each round). Default as loft finetune.")
    method: str = option("loft", "--method", help="loft | lora | ffa (FFA-LoRA: A frozen) | full.")
    rank: int = shared_option("rank")
    lr: float | None = option(None, "--lr", cli_type=Optional[str], parse=parse_rate,
                              help="Learning rate (default per method, as loft finetune; ffa: lora's).")
    clients: int = option(4, "--clients", help="Clients (Flower nodes); every client trains in every round.")
    rounds: int = option(10, "--rounds", help="Rounds.")
    local_steps: int = option(10, "--local-steps", help="Optimizer steps per client per round.")
    aggregator: str | None = option(
        None, "--aggregator", help="product (mean of B_k A_k re-factored to rank r) | fedavg (means of A and B) | "
        "alternating (one factor per round). Default: product for loft, fedavg otherwise.")
    residual: str = option(
        "drop", "--residual", help="With --aggregator product, the part beyond rank r: drop | carry (into the next "
        "round) | fold (into the frozen weights).")
    state: str | None = option(
        None, "--state", help="keep (each client's optimizer state across rounds, in Flower's context.state) | reset "
        "(a fresh optimizer each round). Default: keep for loft, reset otherwise.")
    split: str = option("even", "--split", help="even (iid) or dirichlet:ALPHA (label skew, e.g. dirichlet:0.1).")
    batch_size: int = shared_option("batch_size", help="Examples per local step.")
    max_length: int | None = shared_option("max_length", help="Max tokens per example (default 64).")
    max_eval: int | None = shared_option("max_eval")
    seed: int = shared_option("seed", help="Random seed (split, head init, batches).")
    #: ClientApps run at once (Ray actors of one CPU each); None: min(clients, CPUs)
    parallel: int | None = option(
        None, "--parallel", help="Clients trained at once (Ray actors of one CPU). Default: min(clients, CPUs).")
    output_dir: str | None = option(
        None, "--output-dir", "-o", help="Default: runs/<data>-federated-<method>-r<rank>.")
    # not options of the command line (set from Python)
    head_lr: float | None = None
    target_modules: list[str] | None = None

    # ------------------------------------------------------------------ resolved values
    @property
    def aggregator_name(self) -> str:
        return self.aggregator or ("product" if self.method == "loft" else "fedavg")

    @property
    def keep_state(self) -> bool:
        return (self.state or ("keep" if self.method == "loft" else "reset")) == "keep"

    @property
    def alpha(self) -> float | None:
        return parse_split(self.split)

    @property
    def method_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR["lora" if self.method == "ffa" else self.method]

    def check(self) -> None:
        """Refuse impossible settings with a clear message, before anything is loaded."""
        missing = [name for name in ("flwr", "ray") if importlib.util.find_spec(name) is None]
        if missing:
            raise LoftUsageError(
                f"loft federate runs on Flower's simulation engine, which needs {' and '.join(missing)} (not installed). "
                "Install the federated extra: pip install 'torch-loft[federated]'."
            )
        if self.method not in FED_METHODS:
            raise LoftUsageError(f"Unknown --method {self.method!r} for loft federate; choose one of: {', '.join(FED_METHODS)}.")
        if self.aggregator is not None and self.aggregator not in AGGREGATORS:
            raise LoftUsageError(f"Unknown --aggregator {self.aggregator!r}; choose one of: {', '.join(AGGREGATORS)}.")
        if self.residual not in RESIDUALS:
            raise LoftUsageError(f"Unknown --residual {self.residual!r}; choose one of: {', '.join(RESIDUALS)}.")
        if self.state is not None and self.state not in ("keep", "reset"):
            raise LoftUsageError(f"--state takes 'keep' or 'reset', got {self.state!r}.")
        for name in ("clients", "rounds", "local_steps", "rank", "batch_size"):
            if getattr(self, name) < 1:
                raise LoftUsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}.")
        if self.parallel is not None and self.parallel < 1:
            raise LoftUsageError(f"--parallel must be >= 1, got {self.parallel}.")
        agg = self.aggregator_name
        if self.method == "full" and agg != "fedavg":
            raise LoftUsageError(
                f"--method full has no factors to aggregate by {agg!r}: full fine-tuning averages every weight. "
                "Use --aggregator fedavg (the default for full)."
            )
        if self.method == "ffa" and agg != "fedavg":
            raise LoftUsageError(
                f"--method ffa (FFA-LoRA) trains only B on a shared frozen A, where FedAvg of B is already the exact "
                f"mean of the products; --aggregator {agg} does not apply. Use --aggregator fedavg (its default)."
            )
        if agg == "alternating" and self.keep_state and self.method != "loft":
            raise LoftUsageError(
                f"--state keep with --aggregator alternating needs --method loft: {self.method}'s AdamW holds only the "
                "factor that trains, which changes every round. Use --state reset, or --method loft."
            )
        if self.residual != "drop" and agg != "product":
            raise LoftUsageError(f"--residual {self.residual} applies to --aggregator product only (here {agg}).")
        self.alpha  # noqa: B018  (parse_split raises on a bad --split)
        check_output_option(self.output_dir, "runs/<data>-federated-<method>-r<rank>")
        self.finetune_config().check()  # model, data, lr, seed, lengths: loft finetune's own checks

    def finetune_config(self) -> FinetuneConfig:
        """The :class:`FinetuneConfig` of the model and data: what the server and every client load
        (with loft finetune's loading and checks); FFA-LoRA is a LoRA adapter."""
        return FinetuneConfig(
            model=self.model, data=self.data, eval_data=self.eval_data,
            method="lora" if self.method == "ffa" else self.method, rank=self.rank, lr=self.method_lr,
            head_lr=self.head_lr, target_modules=self.target_modules, batch_size=self.batch_size,
            max_length=self.max_length, max_eval=self.max_eval, seed=self.seed, output_dir=self.output_dir,
        )

    def identity(self) -> dict[str, Any]:
        """The settings that make a run what it is (compared when an output dir is reused)."""
        d = dataclasses.asdict(self)
        d.pop("output_dir")
        d.pop("parallel")
        return d

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "FederateConfig":
        return cls(**json.loads(text))

    def default_output_dir(self) -> Path:
        """``--output-dir``, or ``runs/<data>-federated-<method>-r<rank>``."""
        name = "full" if self.method == "full" else f"{self.method}-r{self.rank}"
        return Path(self.output_dir or Path("runs") / f"{Path(self.data).stem}-federated-{name}")
