"""The Flower apps of ``loft federate`` (loft/app/federated/): the records, the ClientApp called in
this process (its state kept across rounds in ``context.state``, or reset), and one small
simulation in Flower's engine (Ray) through the command line (tests/test_cli_federate.py has
the refusals)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

pytest.importorskip("flwr")
pytest.importorskip("ray")

from _tiny import make_bert, sentiment_records, write_jsonl  # noqa: E402
from conftest import lora_linear  # noqa: E402
from flwr.app import Context, Message, MessageType, RecordDict  # noqa: E402

from loft import LoFTAdamW  # noqa: E402
from loft import federated as fed  # noqa: E402
from loft.app.cli import main  # noqa: E402
from loft.app.federated import FederateConfig  # noqa: E402
from loft.app.federated import client as client_mod  # noqa: E402
from loft.app.federated import run as run_mod  # noqa: E402
from loft.app.federated import server as server_mod  # noqa: E402
from loft.app.federated.bench import build_bench  # noqa: E402
from loft.app.federated.records import (  # noqa: E402
    factors_record,
    record_factors,
    records_to_state,
    state_to_records,
    tensors_record,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("fed")
    bert = make_bert(d / "bert")
    train = write_jsonl(d / "train.jsonl", sentiment_records(48))
    test = write_jsonl(d / "test.jsonl", sentiment_records(16, seed=1))
    return bert, train, test


def _cfg(tiny, tmp_path, **kw) -> FederateConfig:
    bert, train, test = tiny
    base = dict(model=str(bert), data=str(train), eval_data=str(test), clients=2, rounds=2, local_steps=3, rank=2,
                batch_size=8, lr=5e-3, head_lr=1e-2, output_dir=str(tmp_path / "out"))
    return FederateConfig(**{**base, **kw})


def _same(a, b) -> None:
    """Nested state dicts equal value for value (tensors: same dtype, shape and values)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b)
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    else:
        assert a == b and type(a) is type(b)


def test_loft_state_round_trips_through_flower_records():
    model, _ = lora_linear(12, 10, 3, dtype=torch.float64)
    opt = LoFTAdamW(model, lr=1e-2)
    x = torch.randn(8, 10, dtype=torch.float64)
    for _ in range(3):
        model(x).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    state = opt.state_dict()
    tensors, skeleton = state_to_records(state)
    back = records_to_state(tensors, skeleton)
    _same(state, back)
    assert any(t.dtype == torch.float64 for t in tensors.to_torch_state_dict().values())
    # a fresh optimizer loaded from the records steps exactly as the original
    model2, _ = lora_linear(12, 10, 3, dtype=torch.float64)
    model2.load_state_dict(model.state_dict())
    opt2 = LoFTAdamW(model2, lr=1e-2)
    opt2.load_state_dict(back)
    for m, o in ((model, opt), (model2, opt2)):
        m(x).pow(2).sum().backward()
        o.step()
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_factor_records_keep_names_and_values():
    factors = {"a.b.query": (torch.randn(2, 5, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64)),
               "a.c.value": (torch.randn(2, 5), torch.randn(7, 2))}
    back = record_factors(factors_record(factors))
    assert list(back) == sorted(factors)
    for name, (a, b) in factors.items():
        assert torch.equal(back[name][0], a) and torch.equal(back[name][1], b) and back[name][0].dtype == a.dtype


@pytest.fixture
def task_identity(monkeypatch):
    """What a ServerApp process has when it creates messages (the simulation sets it)."""
    from flwr.supercore.task_identity import TaskIdentity

    for key, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, key, value)


def _message(cfg, bench, rnd, indices, factors, others):
    content = RecordDict({"factors": factors_record(factors), "others": tensors_record(others),
                          "config": client_mod.train_message_config(cfg, rnd, 0, indices, None)})
    return Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)


def _client_rounds(cfg):
    """Two rounds of the ClientApp called in this process with one Context (as the simulation
    keeps it per node); between them the global factors change (the mean of the client's and
    the start's products). Returns (replies, the globals sent, the heads sent)."""
    server = build_bench(cfg)
    indices = list(range(0, 48, 2))
    g1, h1 = server.factors(), server.others()
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    r1 = client_mod.app(_message(cfg, server, 1, indices, g1, h1), context)
    sent = record_factors(r1.content["factors"])
    g2 = fed.aggregate_products([sent, g1], [1.0, 1.0], cfg.rank).factors
    h2 = {k: v + 0.01 for k, v in h1.items()}
    r2 = client_mod.app(_message(cfg, server, 2, indices, g2, h2), context)
    return (r1, r2), (g1, g2), (h1, h2), indices


@pytest.mark.parametrize("state", ["keep", "reset"])
def test_client_keeps_or_resets_its_loft_state_across_rounds(tiny, tmp_path, state, task_identity):
    """The ClientApp's round 2 equals, to rounding, one LoFTAdamW in memory that trained round 1,
    received the new global factors with set_factors(keep_state=...) and trained round 2: the
    state went through Flower's records in context.state and came back intact (or was reset)."""
    cfg = _cfg(tiny, tmp_path, state=state)
    (r1, r2), (g1, g2), (h1, h2), indices = _client_rounds(cfg)
    assert r1.content["metrics"]["state_steps"] == 0
    assert r2.content["metrics"]["state_steps"] == (cfg.local_steps if state == "keep" else 0)

    ref = build_bench(cfg)
    fed.set_factors(ref.model, g1)
    ref.set_others(h1)
    opt = LoFTAdamW(ref.model, lr=cfg.method_lr, head_lr=cfg.head_lr)
    seed = lambda rnd: cfg.seed * 1_000_003 + rnd * 1_009  # noqa: E731  (the client's batch seed, client 0)
    ref.train_steps(opt, indices, cfg.local_steps, seed(1))
    for name, (a, b) in record_factors(r1.content["factors"]).items():
        assert torch.allclose(a, ref.factors()[name][0], atol=1e-6) and torch.allclose(b, ref.factors()[name][1], atol=1e-6)
    after_round_1 = copy.deepcopy(ref.model.state_dict())
    results = {}
    for how in ("keep", "reset"):
        ref.model.load_state_dict(after_round_1)
        fed.set_factors(ref.model, g2, opt if how == "keep" else None)
        ref.set_others(h2)
        if how == "reset":  # the head's moments start anew too
            opt = LoFTAdamW(ref.model, lr=cfg.method_lr, head_lr=cfg.head_lr)
        ref.train_steps(opt, indices, cfg.local_steps, seed(2))
        results[how] = ref.factors()
    got = record_factors(r2.content["factors"])
    for name, (a, b) in results[state].items():
        torch.testing.assert_close(got[name][0], a, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(got[name][1], b, atol=2e-6, rtol=1e-5)
    # keeping the state is not a no-op: the kept and the reset round 2 differ
    other = results["reset" if state == "keep" else "keep"]
    assert max(float((got[n][0] - other[n][0]).abs().max()) for n in got) > 1e-4


def test_client_trains_only_the_rounds_factor_on_alternating_rounds(tiny, tmp_path, task_identity):
    """With --aggregator alternating the server names the factor each round trains (B on odd
    rounds, A on even ones: loft.federated.trained_factor); the ClientApp then replies with the
    other factor exactly as sent, and the mean of the replies is the exact mean product."""
    cfg = _cfg(tiny, tmp_path, aggregator="alternating", state="keep")
    server = build_bench(cfg)
    indices = list(range(0, 48, 2))
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    globals_ = server.factors()
    for rnd in (1, 2):
        trained = fed.trained_factor(rnd)
        content = RecordDict({"factors": factors_record(globals_), "others": tensors_record(server.others()),
                              "config": client_mod.train_message_config(cfg, rnd, 0, indices, trained)})
        reply = client_mod.app(Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN), context)
        got = record_factors(reply.content["factors"])
        frozen, moved = (0, 1) if trained == "B" else (1, 0)
        for name, sent in globals_.items():
            assert torch.equal(got[name][frozen], sent[frozen]), (rnd, name)
        assert max(float((got[n][moved] - globals_[n][moved]).abs().max()) for n in got) > 0, rnd
        globals_ = fed.alternating_aggregate([got], [1.0], trained)


def test_simulation_two_clients_two_rounds(tiny, tmp_path, monkeypatch):
    """`loft federate` on Flower's simulation engine (Ray): 2 clients, 2 rounds. The server's
    aggregate is loft.federated.aggregate_products of exactly what the clients sent, written
    into the server's model; the clients' LoFT state survives into round 2; the outputs are
    written; no process of the run is left."""
    seen: list[tuple[dict, dict]] = []
    alive_during: list[int] = []
    real = server_mod.make_server_app

    def recording(bench, split, *, on_round):
        def hook(record, detail):
            on_round(record, detail)
            if detail:
                detail = {**detail, "model": bench.factors()}
                alive_during.append(len(run_mod.leftover_processes(run_mod.LAST_RUN_MARKER)))
            seen.append((record, detail))
        return real(bench, split, on_round=hook)

    monkeypatch.setattr(server_mod, "make_server_app", recording)
    bert, train, test = tiny
    out = tmp_path / "run"
    code = main(["federate", "--model", str(bert), "--data", str(train), "--eval-data", str(test), "--clients", "2",
                 "--rounds", "2", "--local-steps", "2", "--rank", "2", "--batch-size", "8", "--lr", "5e-3",
                 "--output-dir", str(out), "--quiet"])
    assert code == 0
    assert [r["round"] for r, _ in seen] == [0, 1, 2]
    assert [r["state_steps"] for r, _ in seen[1:]] == [[0, 0], [2, 2]]
    for record, detail in seen[1:]:
        expected = fed.aggregate_products(detail["updates"], detail["weights"], 2)
        assert detail["weights"] == [24.0, 24.0]
        for name, (a, b) in expected.factors.items():
            assert torch.equal(detail["factors"][name][0], a) and torch.equal(detail["factors"][name][1], b)
            assert torch.equal(detail["model"][name][0], a) and torch.equal(detail["model"][name][1], b)
        assert record["aggregation_error"] == pytest.approx(sum(expected.error.values()) / len(expected.error), abs=1e-6)
        assert record["bytes_up"][0] == fed.message_bytes(detail["updates"][0]) + server_mod.tensor_bytes(detail["others"])
    assert min(alive_during) >= 2  # the check below would see Ray's processes (the actors at least)
    assert run_mod.leftover_processes(run_mod.LAST_RUN_MARKER) == []
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes_killed"] == 0
    assert [r["eval_accuracy"] for r in metrics["rounds"]] == [r["eval_accuracy"] for r, _ in seen]
    assert len((out / "rounds.jsonl").read_text().splitlines()) == 3
    assert (out / "accuracy.png").stat().st_size > 0
    assert json.loads((out / "run_config.json").read_text())["settings"]["clients"] == 2
