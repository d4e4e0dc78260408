"""Host synchronisations of one LoFT step: at most 4 whatever the model (issue 14, item 2).

Counted on the CPU with :class:`loft.syncs.HostSyncCounter` (Python-level reads such as
``bool``, ``.item()``, ``.tolist()``; aten ``_local_scalar_dense``, ``equal``, ``is_nonzero``;
linear algebra that checks its result on the host; copies to the host): each is a stall of the
stream on a GPU. torch AdamW's step counters of the other parameters are CPU tensors on any
device and are not counted.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import loft
from loft.syncs import HostSyncCounter, to_host

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
]

MAX_SYNCS = 4
SHAPES = [(12, 8, 4), (8, 12, 4), (16, 16, 2), (6, 10, 3), (12, 8, 2)]  # (m, n, r)


def build(shapes, *, seed=0, device="cpu", **options):
    g = torch.Generator().manual_seed(seed)
    pairs, weights = [], []
    for i, (m, n, r) in enumerate(shapes):
        for copy in range(2):  # two pairs of each shape: a batch of two
            # well-conditioned factors: the cheap test rules rebalancing out (see the last test)
            a = nn.Parameter(torch.linalg.qr(torch.randn(n, r, generator=g))[0].T.contiguous())
            b = nn.Parameter(torch.linalg.qr(torch.randn(m, r, generator=g))[0] * 0.1)
            a, b = (nn.Parameter(t.detach().to(device)) for t in (a, b))
            pairs.append(loft.LoRAPair(a, b, 2.0, name=f"l{i}.{copy}"))
            weights.append(torch.randn(m, n, generator=g) / n**0.5)
    head = nn.Parameter(torch.randn(3, 5, generator=g).mul(0.1).to(device))
    bias = nn.Parameter(torch.zeros(3, device=device))
    opt = loft.LoFTAdamW([*pairs, head, bias], lr=1e-3, **options)
    return pairs, weights, (head, bias), opt


def set_grads(pairs, weights, head, step):
    g = torch.Generator().manual_seed(100 + step)
    for pair in pairs:
        for t in (pair.A, pair.B):
            t.grad = torch.randn(t.shape, generator=g).mul(0.1).to(t.device)
    for t in head:
        t.grad = torch.randn(t.shape, generator=g).to(t.device)


def step_syncs(shapes, steps=5, device="cpu", **options):
    """Host syncs of each of ``steps`` steps (alternation on: A and B steps both counted)."""
    pairs, weights, head, opt = build(shapes, device=device, **options)
    adamw_steps = lambda t: any(t is st.get("step") for p in head for st in [opt.state.get(p, {})])  # noqa: E731
    counts = []
    for step in range(steps):
        set_grads(pairs, weights, head, step)
        with HostSyncCounter(ignore=adamw_steps) as syncs:
            opt.step()
        counts.append(dict(syncs.events))
    return counts


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("max_grad_norm", [None, 0.5])
def test_a_step_makes_at_most_four_host_syncs_whatever_the_model(max_grad_norm, device):
    few = step_syncs(SHAPES[:2], max_grad_norm=max_grad_norm, device=device)
    many = step_syncs(SHAPES, max_grad_norm=max_grad_norm, device=device)
    for counts in (few, many):
        for step, events in enumerate(counts, 1):
            assert sum(events.values()) <= MAX_SYNCS, f"step {step}: {events}"
    # not growing with the number of shapes (batches)
    assert [sum(e.values()) for e in few] == [sum(e.values()) for e in many]


def test_the_counter_sees_every_kind_of_host_read():
    t = torch.tensor([1.0, 2.0])
    with HostSyncCounter() as syncs:
        bool(t[0])
        t.tolist()
        float(t[1])
        t[0].item()
        torch.equal(t, t)
        to_host(t)
        torch.linalg.eigvalsh(torch.eye(2))
    assert syncs.count == 7, syncs.events
    with HostSyncCounter() as quiet:
        (t * 2).sum()
        torch.linalg.cholesky_ex(torch.eye(2))
    assert quiet.count == 0, quiet.events


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("unbalanced", [[0], [0, 2, 4, 6]])
def test_batches_the_cheap_bound_cannot_clear_add_one_sync_in_all(unbalanced, device):
    """Where the cheap test cannot rule rebalancing out (factors 2500x unbalanced in one pair of
    each batch listed), the QR / SVD check runs for those batches: their small SVDs run on the
    host after one copy, so one more sync however many batches, and the step stays within 4."""
    pairs, weights, head, opt = build(SHAPES, device=device)
    scale = torch.tensor([1.0, 1.0, 1.0, 50.0], device=device)
    with torch.no_grad():
        for i in unbalanced:
            r = pairs[i].A.shape[0]
            pairs[i].A.mul_(scale[-r:, None])
            pairs[i].B.div_(scale[-r:])
    set_grads(pairs, weights, head, 0)
    calls = []
    original = loft.functional.rebalanced_factors_all
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loft.functional, "rebalanced_factors_all", lambda ps, ts: calls.append(len(ps)) or original(ps, ts))
        with HostSyncCounter(ignore=lambda t: any(t is opt.state.get(p, {}).get("step") for p in head)) as syncs:
            opt.step()
    assert calls == [len(unbalanced)], calls  # the expensive check ran, once, for those batches
    assert "linalg.svd (error check)" not in syncs.events, syncs.events
    assert syncs.events["copy to host"] == 3, syncs.events  # two in every step, one for the small cores
    assert syncs.count <= MAX_SYNCS, syncs.events
