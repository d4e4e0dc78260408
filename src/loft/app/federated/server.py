"""The Flower ``ServerApp`` of ``loft federate``: the rounds, the aggregation and the record.

Every client takes part in every round. Round ``t`` (1-based) sends each client the global
trainable state; the replies' factors are aggregated with :mod:`loft.federated`:

* ``product``: :func:`~loft.federated.aggregate_products` (the weighted mean of the products
  ``B_k A_k`` re-factored to rank r); its residual is dropped, carried into the next round's
  aggregate, or folded into every frozen weight (:func:`~loft.federated.fold_residual` on the
  server; sent to the clients, which fold it too);
* ``fedavg``: :func:`~loft.federated.fedavg` (means of A and of B);
* ``alternating``: every client trains ``trained_factor(t - 1)`` only;
  :func:`~loft.federated.alternating_aggregate` averages it;

the other trainable tensors (the head; every weight for full fine-tuning) by their weighted mean,
weights = the clients' example counts. The server then evaluates the global model and records,
per round: ``eval_accuracy``, ``eval_loss``, ``train_loss`` (the clients' weighted mean),
``aggregation_error`` (``||mean_k B_k A_k - B A||_F / ||mean_k B_k A_k||_F`` per layer, mean and
max over layers, measured densely here for the record), ``bytes_up`` / ``bytes_down`` per
client: the tensors the messages carry (:func:`~loft.federated.message_bytes` of the factors
that change, plus the head and a folded residual). A message carries only the factors the other
end does not know: FFA-LoRA's ``B`` (every process builds the same frozen ``A`` from the run's
seed); on alternating rounds the round's factor up, and down the factor aggregated in the round
before (the first round sends both); the clients keep the global factors in ``context.state``.
Also ``state_steps`` per client and ``seconds``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

os.environ["FLWR_TELEMETRY_ENABLED"] = "0"  # read when flwr is imported: no usage reports, offline

import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from flwr.app import Context, Message, MessageType, RecordDict  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from ... import federated as fed  # noqa: E402
from .bench import Bench  # noqa: E402
from .client import train_message_config, trained_factors  # noqa: E402
from .records import factors_record, record_factors, record_tensors, tensors_record  # noqa: E402

__all__ = ["RunStopped", "factor_bytes", "make_server_app", "product_error", "tensor_bytes"]

#: seconds the server waits for the simulation's nodes to register
NODE_WAIT_S = 300.0
#: seconds between two looks for the clients' replies (Flower's InMemoryGrid pulls every 0.1 s too)
PULL_INTERVAL_S = 0.1


class RunStopped(Exception):
    """The run was interrupted (Ctrl-C, SIGTERM): the ServerApp stops instead of waiting for replies."""


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes of these tensors in a message (numel * element size)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def factor_bytes(factors: fed.Factors, which: str | None) -> int:
    """Bytes of the factors a message needs to carry: both, or only ``which`` (``"A"``, ``"B"``)
    when only that one changes (alternating rounds; FFA-LoRA's B, on a frozen A every client
    built from the same seed)."""
    if which is None:
        return fed.message_bytes(factors)
    return fed.message_bytes({n: (p[0 if which == "A" else 1],) for n, p in factors.items()})  # type: ignore[misc]


def product_error(updates: Sequence[fed.Factors], weights: Sequence[float], result: fed.Factors,
                  carry: fed.Factors | None = None) -> dict[str, float]:
    """Per layer ``||M - B A||_F / ||M||_F`` with ``M = sum_k w_k B_k A_k (+ B_c A_c)`` (weights
    normalised): how far the global product is from the exact mean of the clients' products.
    Dense ``m x n`` products, for the record only (the aggregators never form them)."""
    total = float(sum(weights))
    out = {}
    for name, (a, b) in result.items():
        mean = sum((w / total) * (u[name][1].double() @ u[name][0].double()) for u, w in zip(updates, weights))
        if carry and name in carry:
            mean = mean + carry[name][1].double() @ carry[name][0].double()
        norm = float(torch.linalg.norm(mean))
        diff = float(torch.linalg.norm(mean - b.double() @ a.double()))
        out[name] = diff / norm if norm > 0 else diff
    return out


def _mean(tensors: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    total = float(sum(weights))
    return {k: sum((w / total) * t[k] for t, w in zip(tensors, weights)) for k in tensors[0]}


def _check(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise RunStopped("the run was interrupted")


def _wait_for_nodes(grid: Grid, clients: int, stop: threading.Event | None) -> list[int]:
    deadline = time.monotonic() + NODE_WAIT_S
    while len(nodes := sorted(grid.get_node_ids())) < clients:
        _check(stop)
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} of {clients} Flower nodes registered in {NODE_WAIT_S:.0f} s")
        time.sleep(0.05)
    return nodes[:clients]


def _send_and_receive(grid: Grid, messages: list[Message], stop: threading.Event | None) -> list[Message]:
    """``grid.send_and_receive`` that gives up (:class:`RunStopped`) once ``stop`` is set: the
    simulation runs the ServerApp in a thread of its own that nothing else can end, and whose
    clients are gone after an interrupt."""
    waiting = set(grid.push_messages(messages))
    replies: list[Message] = []
    while True:
        got = list(grid.pull_messages(waiting))
        replies += got
        waiting -= {reply.metadata.reply_to_message_id for reply in got}
        if not waiting:
            return replies
        _check(stop)
        time.sleep(PULL_INTERVAL_S)


@dataclass
class _Residual:
    """What the product aggregation carries between rounds: the part beyond rank r kept for the
    next mean (``carry``) or folded into the frozen weights, to be folded by the clients (``fold``)."""

    carry: fed.Factors | None = None
    fold: fed.Factors | None = None


def make_server_app(bench: Bench, split: list[list[int]], *, on_round: Callable[[dict[str, Any], dict[str, Any]], None],
                    stop: threading.Event | None = None) -> ServerApp:
    """The ``ServerApp`` of one run. ``bench`` holds the server's copy of the model (the global
    state, evaluated each round); ``split[k]``: client ``k``'s training example indices.
    ``on_round(record, detail)`` is called after round 0 (the evaluation before training) and after
    each round: ``record`` is the round's JSON-able metrics, ``detail`` what the round received
    and computed (``updates``, ``weights``, ``factors``, ``residual``, ``others``), for tests.
    Once ``stop`` is set, the app raises :class:`RunStopped` at its next wait or round."""
    cfg = bench.cfg
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        nodes = _wait_for_nodes(grid, cfg.clients, stop)
        residual = _Residual()
        start = time.perf_counter()
        on_round({"round": 0, **bench.evaluate(), "seconds": 0.0}, {})
        for rnd in range(1, cfg.rounds + 1):
            _check(stop)
            record, detail = _round(bench, split, grid, nodes, rnd, residual, stop)
            on_round({**record, "seconds": round(time.perf_counter() - start, 2)}, detail)

    return app


def _round(bench: Bench, split: list[list[int]], grid: Grid, nodes: list[int], rnd: int, residual: _Residual,
           stop: threading.Event | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """One round: the global state sent to every client, their replies, the aggregation, the
    evaluation; returns the round's record (without its time) and its detail (see :func:`make_server_app`)."""
    cfg = bench.cfg
    trained = fed.trained_factor(rnd) if cfg.aggregator_name == "alternating" else None
    glob = bench.factors()
    moving = trained_factors(cfg, trained)  # the factor the clients train and send (None: both)
    # the factors that changed since the clients last heard (alternating: last round's; the first round: all)
    changed = fed.trained_factor(rnd - 1) if trained and rnd > 1 else (None if trained else moving)
    down: dict[str, Any] = {"others": tensors_record(bench.others())}
    if glob is not None:
        down["factors"] = factors_record(glob, only=changed)
    if residual.fold:
        down["fold"] = factors_record(residual.fold)
    bytes_down = (factor_bytes(glob, changed) if glob else 0) + tensor_bytes(bench.others()) + (
        fed.message_bytes(residual.fold) if residual.fold else 0)
    messages = [Message(content=RecordDict({**down, "config": train_message_config(cfg, rnd, k, split[k], trained)}),
                        dst_node_id=node, message_type=MessageType.TRAIN) for k, node in enumerate(nodes)]
    ordered = _replies_by_client(_send_and_receive(grid, messages, stop), len(nodes), rnd)
    weights = [float(r.content["metrics"]["examples"]) for r in ordered]
    others = _mean([record_tensors(r.content["others"]) for r in ordered], weights)
    # each client's factors, completed with the global factor it did not train
    updates = [record_factors(r.content["factors"], glob) for r in ordered] if glob is not None else []
    used_carry = residual.carry
    new, rest = _aggregate(bench, updates, weights, trained, residual)
    errors = product_error(updates, weights, new, used_carry) if new is not None else {}
    if new is not None:
        fed.set_factors(bench.model, new)
    bench.set_others(others)
    up = [(factor_bytes(u, moving) if u else 0) + tensor_bytes(record_tensors(r.content["others"]))
          for u, r in zip(updates or [None] * len(ordered), ordered)]
    metrics = [r.content["metrics"] for r in ordered]
    record = {
        "round": rnd,
        **bench.evaluate(),
        "train_loss": sum(w * float(m["train_loss"]) for w, m in zip(weights, metrics)) / sum(weights),
        "aggregation_error": sum(errors.values()) / len(errors) if errors else 0.0,
        "aggregation_error_max": max(errors.values(), default=0.0),
        "bytes_up": up,
        "bytes_down": bytes_down,
        "state_steps": [int(m["state_steps"]) for m in metrics],
        "trained_factor": trained,
    }
    return record, {"updates": updates, "weights": weights, "factors": new, "residual": rest, "others": others}


def _replies_by_client(replies: list[Message], clients: int, rnd: int) -> list[Message]:
    """The round's replies in client order; a failed or missing client stops the run."""
    by_client: dict[int, Message] = {}
    for reply in replies:
        if reply.has_error():
            raise RuntimeError(f"a client failed in round {rnd}: {reply.error.reason}")
        by_client[int(reply.content["metrics"]["client"])] = reply
    if len(by_client) != clients:
        raise RuntimeError(f"round {rnd}: {len(by_client)} of {clients} clients replied")
    return [by_client[k] for k in range(clients)]


def _aggregate(bench: Bench, updates: list[fed.Factors], weights: list[float], trained: str | None,
               residual: _Residual) -> tuple[fed.Factors | None, fed.Factors]:
    """The new global factors (``None`` for full fine-tuning) and the part beyond rank r;
    ``residual`` updated for the next round (carry, or fold into the server's weights now and the
    clients' at the next round)."""
    cfg = bench.cfg
    residual.fold = None
    if not updates:
        return None, {}
    if cfg.aggregator_name == "product":
        agg = fed.aggregate_products(updates, weights, cfg.rank, carry=residual.carry)
        if cfg.residual == "carry":
            residual.carry = agg.residual or None
        elif cfg.residual == "fold" and agg.residual:
            fed.fold_residual(bench.model, agg.residual)
            residual.fold = agg.residual
        return agg.factors, agg.residual
    if cfg.aggregator_name == "fedavg":
        return fed.fedavg(updates, weights), {}
    return fed.alternating_aggregate(updates, weights, trained), {}
