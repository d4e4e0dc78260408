"""The Flower ``ClientApp`` of ``loft federate``: one client's round.

The server's ``train`` message carries the run's settings (``config["settings"]``, JSON), the
round, the client's example indices, which factor trains this round (alternating rounds), the
global factors that the client does not already know (``"factors"``), the other trainable
tensors (``"others"``: the head) and, with ``--residual fold``, the residual to fold into the
frozen weights (``"fold"``). The client

1. rebuilds its base weights (with every residual folded so far, kept in ``context.state``);
2. completes the global factors: a pair the message holds one factor of (alternating rounds
   after the first send only the factor aggregated last round; FFA-LoRA's messages only ``B``)
   takes the other from the last global factors this client received (``context.state``) or,
   for FFA-LoRA's ``A``, from the seeded start every process builds alike;
3. with ``--state keep`` and a state from an earlier round: puts back its own last local
   factors, loads its optimizer state (``context.state``, see :mod:`.records`), then writes the
   global factors in place with ``loft.federated.set_factors(..., keep_state=True)``, so that
   LoFT's next step carries its moments into the new factors' basis; otherwise writes the
   global factors into a fresh optimizer's model (the usual federated LoRA: state reset);
4. trains ``local_steps`` steps on its examples, and replies with the factors it trained (only
   the round's factor on alternating rounds, only ``B`` for FFA-LoRA: the server knows the
   other), its other tensors and its metrics (``train_loss``, ``examples``, ``state_steps``:
   the optimizer steps its state had already taken when this round began, 0 after a reset);
5. keeps its optimizer state, local factors and the global factors in ``context.state``.

One Ray actor serves several clients in turn: the model it loaded is cached per settings and
every trainable value is overwritten from the message (and the state) at each call.
"""

from __future__ import annotations

import logging
import os

os.environ["FLWR_TELEMETRY_ENABLED"] = "0"  # read when flwr is imported: no usage reports, offline

from typing import Any  # noqa: E402

from ..noise import quiet_library_logs  # noqa: E402

quiet_library_logs()  # in the Ray actors too (before peft imports bitsandbytes)

import torch  # noqa: E402
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

# in the Ray actors: Flower's notices (e.g. "Manually terminating ClientAppActor" when the run ends)
# are nothing the user can act on; errors still show (Flower's logger module sets its level when imported)
logging.getLogger("flwr").setLevel(logging.ERROR)

from ... import federated as fed  # noqa: E402
from .bench import Bench, build_bench  # noqa: E402
from .config import FederateConfig  # noqa: E402
from .records import (  # noqa: E402
    factors_record,
    record_factors,
    record_tensors,
    records_to_state,
    state_to_records,
    tensors_record,
)

__all__ = ["THREADS_VAR", "app", "state_steps", "train_message_config", "trained_factors"]

#: set by loft federate for its Ray actors: torch threads per actor
THREADS_VAR = "LOFT_FEDERATE_THREADS"

app = ClientApp()

_BENCHES: dict[str, Bench] = {}  # settings (JSON) -> the model this process loaded for them


def _bench(settings: str) -> Bench:
    if settings not in _BENCHES:
        _BENCHES.clear()  # one run at a time per process
        threads = os.environ.get(THREADS_VAR)
        if threads:  # in a Ray actor of loft federate: the CPUs the backend gives each actor
            torch.set_num_threads(int(threads))
        _BENCHES[settings] = build_bench(FederateConfig.from_json(settings))
    return _BENCHES[settings]


def state_steps(state: dict[str, Any]) -> int:
    """The most optimizer steps any parameter's state records (``state_dict()["state"]``)."""
    steps = [int(s["step"]) for s in state.get("state", {}).values() if isinstance(s, dict) and "step" in s]
    return max(steps, default=0)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One client's round (see the module docstring)."""
    config = msg.content["config"]
    bench = _bench(str(config["settings"]))
    cfg = bench.cfg
    rnd, client = int(config["round"]), int(config["client"])
    indices = [int(i) for i in config["indices"]]
    trained = str(config["trained"]) or None  # "A" / "B" on alternating rounds
    saved = context.state

    # 1. the base weights: as loaded, plus every residual folded so far (this round's too)
    folds = [record_factors(saved[k]) for k in sorted(saved.array_records, key=_fold_index) if k.startswith("fold.")]
    if "fold" in msg.content.array_records:
        new = record_factors(msg.content["fold"])
        saved[f"fold.{len(folds)}"] = factors_record(new)
        folds.append(new)
    bench.restore_base(folds)

    # 2. the global factors, completed from what this client knows; the trainable values; the optimizer
    trains = trained_factors(cfg, trained)
    if bench.has_factors:
        fed.freeze_factor(bench.model, {"A": "B", "B": "A"}.get(trains or ""))
    glob = None
    if bench.has_factors:
        known = record_factors(saved["global.factors"]) if "global.factors" in saved.array_records else (
            bench.start if cfg.method == "ffa" else None)
        glob = record_factors(msg.content["factors"], known)
        saved["global.factors"] = factors_record(glob)
    others = record_tensors(msg.content["others"])
    keep = cfg.keep_state and "optimizer" in saved.array_records
    steps_before = 0
    if keep:
        if glob is not None:
            fed.set_factors(bench.model, record_factors(saved["local.factors"]))
        bench.set_others(record_tensors(saved["local.others"]))
        optimizer = bench.optimizer()
        state = records_to_state(saved["optimizer"], saved["optimizer.skeleton"])
        optimizer.load_state_dict(state)
        steps_before = state_steps(state)
        if glob is not None:
            fed.set_factors(bench.model, glob, optimizer, keep_state=True)
    else:
        if glob is not None:
            fed.set_factors(bench.model, glob)
        optimizer = bench.optimizer()
    bench.set_others(others)

    # 3. local training
    losses = bench.train_steps(optimizer, indices, cfg.local_steps, seed=cfg.seed * 1_000_003 + rnd * 1_009 + client)

    # 4. the reply, and what this client keeps for the next round
    content = RecordDict({"others": tensors_record(bench.others()),
                          "metrics": MetricRecord({"train_loss": sum(losses) / len(losses), "examples": len(indices),
                                                   "state_steps": steps_before, "client": client})})
    if bench.has_factors:
        local = bench.factors()
        content["factors"] = factors_record(local, only=trains)
        saved["local.factors"] = factors_record(local)
    saved["local.others"] = content["others"]
    if cfg.keep_state:
        tensors, skeleton = state_to_records(optimizer.state_dict())
        saved["optimizer"], saved["optimizer.skeleton"] = tensors, skeleton
    return Message(content=content, reply_to=msg)


def trained_factors(cfg: FederateConfig, trained: str | None) -> str | None:
    """The factor the clients train, hence send, this round: ``"B"`` for FFA-LoRA (its ``A``
    stays at the shared start), the round's factor on alternating rounds, ``None`` for both."""
    return "B" if cfg.method == "ffa" else trained


def _fold_index(key: str) -> int:
    return int(key.split(".")[1]) if key.startswith("fold.") else -1


def train_message_config(cfg: FederateConfig, rnd: int, client: int, indices: list[int], trained: str | None) -> ConfigRecord:
    """The ``config`` record of the server's ``train`` message to one client."""
    return ConfigRecord({"settings": cfg.to_json(), "round": rnd, "client": client, "indices": list(indices),
                         "trained": trained or ""})

