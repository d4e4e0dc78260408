"""The Flower apps of ``loft federate`` (loft/app/federated/): the records, the ClientApp called in
this process (its state kept across rounds in ``context.state``, or reset), the ServerApp and
ClientApps of every method, aggregator and residual option run in this process through a
``Grid`` that hands the messages to the ClientApp (the bytes each message carries; each
round's aggregate from what the clients sent), and one small simulation in Flower's engine (Ray)
through the command line (tests/test_cli_federate.py has the refusals)."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")
pytest.importorskip("ray")

from _tiny import make_bert, sentiment_records, write_jsonl  # noqa: E402
from conftest import lora_linear  # noqa: E402
from flwr.app import Context, Message, MessageType, RecordDict  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402

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
    record_bytes,
    record_factors,
    record_tensors,
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
    # one side only: the record holds just those tensors; the receiver completes the pairs from what it knows
    only_b = factors_record(factors, only="B")
    assert sorted(only_b) == ["a.b.query.B", "a.c.value.B"]
    assert record_bytes(only_b) == fed.message_bytes({n: (b,) for n, (_, b) in factors.items()}) == 7 * 2 * (8 + 4)
    known = {n: (a + 1, b + 1) for n, (a, b) in factors.items()}
    back = record_factors(only_b, known)
    for name, (a, b) in factors.items():
        assert torch.equal(back[name][0], known[name][0]) and torch.equal(back[name][1], b)
    with pytest.raises(ValueError, match="factor record has no 'a.b.query.A', and the receiver does not know it"):
        record_factors(only_b)


@pytest.fixture
def task_identity(monkeypatch):
    """What a ServerApp process has when it creates messages (the simulation sets it)."""
    from flwr.supercore.task_identity import TaskIdentity

    for key, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, key, value)


def _message(cfg, bench, rnd, indices, factors, others, trained=None, only=None):
    content = RecordDict({"factors": factors_record(factors, only=only), "others": tensors_record(others),
                          "config": client_mod.train_message_config(cfg, rnd, 0, indices, trained)})
    return Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)


def _context(node=1):
    return Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})


def _client_rounds(cfg):
    """Two rounds of the ClientApp called in this process with one Context (as the simulation
    keeps it per node); between them the global factors change (the mean of the client's and
    the start's products). Returns (replies, the globals sent, the heads sent)."""
    server = build_bench(cfg)
    indices = list(range(0, 48, 2))
    g1, h1 = server.factors(), server.others()
    context = _context()
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


def test_alternating_client_sends_and_needs_only_one_factor(tiny, tmp_path, task_identity):
    """With --aggregator alternating the server names the factor each round trains (B on odd
    rounds, A on even ones: loft.federated.trained_factor). The ClientApp replies with that
    factor only, and takes the other from the global factors it keeps in context.state: its
    round 2 with only the changed factor sent is bit-identical to its round 2 with both sent."""
    cfg = _cfg(tiny, tmp_path, aggregator="alternating", state="keep")
    server = build_bench(cfg)
    indices = list(range(0, 48, 2))
    head = server.others()
    contexts = [_context(), _context()]
    g1 = server.factors()
    r1 = [client_mod.app(_message(cfg, server, 1, indices, g1, head, "B"), c) for c in contexts]
    assert all(k.endswith(".B") for k in r1[0].content["factors"]) and len(r1[0].content["factors"]) == len(g1)
    sent = record_factors(r1[0].content["factors"], g1)
    assert max(float((sent[n][1] - g1[n][1]).abs().max()) for n in g1) > 0  # B trained
    g2 = fed.alternating_aggregate([sent], [1.0], "B")
    full = client_mod.app(_message(cfg, server, 2, indices, g2, head, "A"), contexts[0])
    part = client_mod.app(_message(cfg, server, 2, indices, g2, head, "A", only="B"), contexts[1])
    assert sorted(part.content["factors"]) == sorted(full.content["factors"]) and all(
        k.endswith(".A") for k in part.content["factors"])
    for key, value in record_factors(full.content["factors"], g2).items():
        assert torch.equal(record_factors(part.content["factors"], g2)[key][0], value[0]), key
    a2 = record_factors(part.content["factors"], g2)
    assert max(float((a2[n][0] - g2[n][0]).abs().max()) for n in g2) > 0  # A trained
    # the client's record of the global factors is the server's
    kept = record_factors(contexts[1].state["global.factors"])
    assert all(torch.equal(kept[n][i], g2[n][i]) for n in g2 for i in (0, 1))


# ----------------------------------------------------------------------------- ServerApp and ClientApps in this process
class LocalGrid(Grid):
    """Flower's ``Grid`` for a ServerApp whose ClientApps run in this process: each message goes
    to ``client.app`` with its node's own ``Context`` (as the simulation keeps one per node);
    every message sent and every reply is kept, per round."""

    def __init__(self, clients: int) -> None:
        self.nodes = list(range(1, clients + 1))
        self.contexts = {n: _context(n) for n in self.nodes}
        self.rounds: list[tuple[list[Message], list[Message]]] = []

    def set_run(self, run) -> None:
        pass

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, *args, **kwargs):
        raise NotImplementedError

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        """Each message is answered at once by its node's ClientApp; the replies wait to be pulled."""
        messages = list(messages)
        replies = []
        for k, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"{len(self.rounds)}.{k}"  # what Flower's grids do on push
            replies.append(client_mod.app(msg, self.contexts[msg.metadata.dst_node_id]))
        self.rounds.append((messages, replies))
        self.waiting = replies
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, message_ids):
        found = [r for r in self.waiting if r.metadata.reply_to_message_id in set(message_ids)]
        self.waiting = [r for r in self.waiting if r not in found]
        return found

    def send_and_receive(self, messages, *, timeout=None):
        raise NotImplementedError  # the ServerApp pushes and pulls, so that it can stop waiting


def _keys(record) -> set[str]:
    return {k.rsplit(".", 1)[1] for k in record} if record is not None else set()


FLAVOURS = {
    "alternating": dict(aggregator="alternating", state="keep"),
    "carry": dict(residual="carry"),
    "fold": dict(residual="fold"),
    "lora": dict(method="lora"),
    "ffa": dict(method="ffa"),
    "full": dict(method="full"),
}


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_server_and_clients_in_process(tiny, tmp_path, flavour, task_identity):
    """Two rounds of the ServerApp with two ClientApps in this process, per option: every message
    carries exactly the bytes the round's record counts (loft.federated.message_bytes of the
    factors the other end does not know, plus the head and a folded residual), and the server's
    new global state is the option's aggregate of what the clients sent, computed here."""
    cfg = _cfg(tiny, tmp_path, local_steps=1, **FLAVOURS[flavour])
    bench = build_bench(cfg)
    split = fed.dirichlet_split(list(bench.task.train_labels), cfg.clients, cfg.alpha, cfg.seed)
    grid = LocalGrid(cfg.clients)
    seen, start = [], [bench.factors(), bench.others()]
    bases = []

    def on_round(record, detail):
        seen.append((record, {**detail, "start": start[0], "start_others": start[1]}))
        start[:] = [bench.factors(), bench.others()]
        bases.append({n: m.base_layer.weight.detach().clone() for n, m in bench.model.named_modules()
                      if hasattr(m, "base_layer") and hasattr(m, "lora_A")})

    server_mod.make_server_app(bench, split, on_round=on_round)(grid, _context(0))
    assert [r["round"] for r, _ in seen] == [0, 1, 2] and len(grid.rounds) == 2
    # a round's record holds the evaluation's numbers, not its per-example predictions
    assert all("predictions" not in r and isinstance(r["eval_accuracy"], float) for r, _ in seen)
    carry = None
    for (record, detail), (sent, replies) in zip(seen[1:], grid.rounds):
        rnd, glob, weights, updates = record["round"], detail["start"], detail["weights"], detail["updates"]
        head = server_mod.tensor_bytes(detail["start_others"])
        # -- the bytes: what the records hold is what the round counts, and message_bytes of the expected factors
        down = {"alternating": None if rnd == 1 else "B", "ffa": "B"}.get(flavour)
        up = {"alternating": fed.trained_factor(rnd), "ffa": "B"}.get(flavour)
        side = lambda f, which: {n: p if which is None else (p["AB".index(which)],) for n, p in f.items()}  # noqa: E731
        fold_down = seen[rnd - 1][1].get("residual") if flavour == "fold" and rnd > 1 else None
        for msg in sent:
            got = {k: record_bytes(msg.content[k]) for k in msg.content.array_records}
            assert sum(got.values()) == record["bytes_down"], (rnd, got)
            if glob is None:
                assert "factors" not in got and got["others"] == head
            else:
                assert _keys(msg.content["factors"]) == ({"A", "B"} if down is None else {down})
                assert got["factors"] == fed.message_bytes(side(glob, down))
            assert ("fold" in got) == bool(fold_down)
            if fold_down:
                assert got["fold"] == fed.message_bytes(fold_down)
                assert all(torch.equal(t, u) for n in fold_down for t, u in
                           zip(record_factors(msg.content["fold"])[n], fold_down[n]))
        for k, reply in enumerate(replies):
            got = {key: record_bytes(reply.content[key]) for key in reply.content.array_records}
            assert sum(got.values()) == record["bytes_up"][k]
            if glob is not None:
                assert _keys(reply.content["factors"]) == ({"A", "B"} if up is None else {up})
                assert got["factors"] == fed.message_bytes(side(updates[k], up))
        # -- the aggregate, from what the clients sent
        mean_others = {n: sum((w / sum(weights)) * record_tensors(r.content["others"])[n]
                              for r, w in zip(replies, weights)) for n in detail["others"]}
        assert all(torch.equal(detail["others"][n], mean_others[n]) for n in mean_others)
        if flavour == "full":
            assert detail["factors"] is None
            moved = [float((detail["others"][n] - detail["start_others"][n]).abs().max()) for n in mean_others]
            assert len(moved) > 20 and min(moved) > 0  # every weight trains and is averaged
            continue
        sent_factors = [record_factors(r.content["factors"], glob) for r in replies]
        for u, s in zip(updates, sent_factors):
            assert all(torch.equal(u[n][i], s[n][i]) for n in s for i in (0, 1))
        if flavour == "alternating":
            expected = fed.alternating_aggregate(updates, weights, fed.trained_factor(rnd))
            frozen = 1 if fed.trained_factor(rnd) == "A" else 0
            assert all(torch.equal(expected[n][frozen], glob[n][frozen]) for n in glob)
        elif flavour in ("lora", "ffa"):
            expected = fed.fedavg(updates, weights)
        else:
            agg = fed.aggregate_products(updates, weights, cfg.rank, carry=carry)
            assert agg.residual  # 2 clients' rank-2 products: the mean has rank 4
            expected = agg.factors
            assert all(torch.equal(detail["residual"][n][i], agg.residual[n][i]) for n in agg.residual for i in (0, 1))
            if flavour == "carry":
                carry = agg.residual
        for n in expected:
            assert all(torch.equal(detail["factors"][n][i], expected[n][i]) for i in (0, 1)), (rnd, n)
        if flavour == "ffa":  # A stays at the seeded start, on the server and on every client
            assert all(torch.equal(detail["factors"][n][0], bench.start[n][0]) for n in expected)
    if flavour != "full":  # every client's record of the global factors is what the server had in round 2
        glob = seen[2][1]["start"]
        for context in grid.contexts.values():
            kept = record_factors(context.state["global.factors"])
            assert all(torch.equal(kept[n][i], glob[n][i]) for n in glob for i in (0, 1))
    if flavour == "fold":  # base weights with the residuals folded by hand: the server's both, the clients' round 1's
        ref = build_bench(cfg)
        fed.fold_residual(ref.model, seen[1][1]["residual"])
        client_bench = client_mod._BENCHES[cfg.to_json()]
        modules = dict(client_bench.model.named_modules())
        ref_modules = dict(ref.model.named_modules())
        for n, weight in bases[1].items():
            assert torch.equal(modules[n].base_layer.weight, ref_modules[n].base_layer.weight), n
            assert torch.equal(weight, ref_modules[n].base_layer.weight), n
        assert max(float((bases[1][n] - bases[0][n]).abs().max()) for n in bases[1]) > 0
        fed.fold_residual(ref.model, seen[2][1]["residual"])
        assert all(torch.equal(bases[2][n], ref_modules[n].base_layer.weight) for n in bases[2])


def test_simulation_two_clients_two_rounds(tiny, tmp_path, monkeypatch, capfd):
    """`loft federate` on Flower's simulation engine (Ray): 2 clients, 2 rounds. The server's
    aggregate is loft.federated.aggregate_products of exactly what the clients sent, written
    into the server's model; the clients' LoFT state survives into round 2; the outputs are
    written; no process of the run is left."""
    seen: list[tuple[dict, dict]] = []
    alive_during: list[int] = []
    real = server_mod.make_server_app

    def recording(bench, split, *, on_round, stop=None):
        def hook(record, detail):
            on_round(record, detail)
            if detail:
                detail = {**detail, "model": bench.factors()}
                alive_during.append(len(run_mod.leftover_processes(run_mod.LAST_RUN_MARKER)))
            seen.append((record, detail))
        return real(bench, split, on_round=hook, stop=stop)

    monkeypatch.setattr(server_mod, "make_server_app", recording)
    bert, train, test = tiny
    out = tmp_path / "run"
    capfd.readouterr()
    code = main(["federate", "--model", str(bert), "--data", str(train), "--eval-data", str(test), "--clients", "2",
                 "--rounds", "2", "--local-steps", "2", "--rank", "2", "--batch-size", "8", "--lr", "5e-3",
                 "--output-dir", str(out), "--quiet"])
    assert code == 0
    # --quiet: no notice of Flower's or Ray's (run_simulation deprecated, "Started a local Ray instance"), none of
    # the actors' library noise Ray forwards, no colour codes (issue 32)
    err = capfd.readouterr().err
    assert "\x1b[" not in err and "WARNING" not in err and "INFO" not in err, err
    assert "Skipping publisher trust check" not in err and "DeprecationWarning" not in err, err
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


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_simulation_cleans_up(tiny, tmp_path, monkeypatch, capsys, request, signum):
    """Ctrl-C (SIGINT) or SIGTERM to `loft federate` during round 2 of the simulation: exit status
    130 / 143 with one line on stderr, the finished rounds kept, Ray's temporary folder removed,
    none of the run's processes left, the ServerApp's thread ended and the SIGTERM handler that
    ray.init replaces put back."""
    temp = Path(tempfile.mkdtemp(prefix="lft"))  # short: Ray's socket paths inside must fit in 107 bytes
    request.addfinalizer(lambda: shutil.rmtree(temp, ignore_errors=True))
    monkeypatch.setattr(tempfile, "tempdir", str(temp))  # where the run's mkdtemp puts Ray's folder
    alive: list[int] = []
    real = server_mod.make_server_app

    def interrupting(bench, split, *, on_round, stop=None):
        def hook(record, detail):
            on_round(record, detail)
            if record["round"] == 1:
                alive.append(len(run_mod.leftover_processes(run_mod.LAST_RUN_MARKER)))
                assert [p.name for p in temp.iterdir()][0].startswith("loft-ray-")
                os.kill(os.getpid(), signum)  # to the main thread, which runs Flower's simulation engine
        return real(bench, split, on_round=hook, stop=stop)

    monkeypatch.setattr(server_mod, "make_server_app", interrupting)
    handler, int_handler = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    threads = set(threading.enumerate())
    bert, train, test = tiny
    out = tmp_path / "run"
    argv = ["federate", "--model", str(bert), "--data", str(train), "--eval-data", str(test), "--clients", "2",
            "--rounds", "3", "--local-steps", "1", "--rank", "2", "--batch-size", "8", "--parallel", "1",
            "--output-dir", str(out), "--quiet"]
    assert main(argv) == (130 if signum == signal.SIGINT else 143)
    err = capsys.readouterr().err.strip()  # Ray also forwards what its actors print
    lines = err.splitlines()
    assert "Traceback" not in err and [x for x in lines if x.startswith("loft")] == [lines[-1]], err
    what = "Interrupted" if signum == signal.SIGINT else "Terminated (SIGTERM)"
    assert err.splitlines()[-1].startswith(f"loft: {what} after 1 of 3 rounds; Ray's processes and temporary files "
                                           "were removed"), err
    assert alive and alive[0] >= 1  # the check below would see the run's processes
    assert run_mod.leftover_processes(run_mod.LAST_RUN_MARKER) == []
    assert list(temp.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) == handler and signal.getsignal(signal.SIGINT) == int_handler
    assert [json.loads(line)["round"] for line in (out / "rounds.jsonl").read_text().splitlines()] == [0, 1]
    assert not (out / "metrics.json").exists()
    deadline = time.monotonic() + 30  # the ServerApp's thread stops at its next wait for replies
    while (left := [t for t in set(threading.enumerate()) - threads if not t.daemon]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == []


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the run's processes in /proc (Linux)")
def test_ctrl_c_from_a_terminal_while_clients_train(tiny, tmp_path, request):
    """`loft federate` in a terminal of its own (a pseudo-terminal, the process group in its
    foreground), Ctrl-C typed while the clients train round 2: the terminal sends SIGINT to the
    whole foreground group (Ray's processes too, which block it). Exit status 130, stderr ends in
    loft's one line and holds no error or traceback (Flower reported the actors that Ray's
    shutdown ends), no process of the run left, Ray's temporary folder removed, round 1 kept."""
    import fcntl
    import pty
    import subprocess
    import sys
    import termios
    import uuid

    bert, train, test = tiny
    tag, out = uuid.uuid4().hex, tmp_path / "run"
    temp = Path(tempfile.mkdtemp(prefix="lft"))  # short: Ray's socket paths inside must fit in 107 bytes
    request.addfinalizer(lambda: shutil.rmtree(temp, ignore_errors=True))
    master, terminal = pty.openpty()

    def own_terminal():  # a session of its own, with the pseudo-terminal as its controlling terminal
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    argv = [sys.executable, "-m", "loft.app", "federate", "--model", str(bert), "--data", str(train), "--eval-data",
            str(test), "--clients", "2", "--rounds", "20", "--local-steps", "600", "--rank", "2", "--batch-size", "8",
            "--parallel", "1", "--output-dir", str(out), "--quiet"]
    env = {**os.environ, "LOFT_TEST_TAG": tag, "TMPDIR": str(temp)}
    proc = subprocess.Popen(argv, stdin=terminal, stdout=terminal, stderr=subprocess.PIPE, preexec_fn=own_terminal,
                            env=env)
    os.close(terminal)
    try:
        rounds = out / ".incoming" / "rounds.jsonl"  # where a run's rounds go as they finish
        deadline = time.monotonic() + 240
        while not (rounds.exists() and len(rounds.read_text().splitlines()) >= 2):  # round 1 evaluated
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-3000:]
            time.sleep(0.1)
        # loft, Ray's services and a client: what the check below must not find
        assert len(run_mod.leftover_processes(tag, "LOFT_TEST_TAG")) >= 3
        time.sleep(1.5)  # into round 2's first client (600 steps, about 6 s): Flower is waiting on Ray for it
        os.write(master, b"\x03")  # Ctrl-C, typed
        err = proc.communicate(timeout=120)[1].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    lines = err.strip().splitlines()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "ERROR" not in err, err[-3000:]
    assert lines[-1].startswith("loft: Interrupted after"), err[-3000:]
    assert run_mod.leftover_processes(tag, "LOFT_TEST_TAG") == []
    assert not [p for p in temp.iterdir() if p.name.startswith("loft-ray-")]
    kept = [json.loads(line)["round"] for line in (out / "rounds.jsonl").read_text().splitlines()]  # moved in
    assert kept[:2] == [0, 1] and kept == list(range(len(kept)))
    assert not (out / "metrics.json").exists()
