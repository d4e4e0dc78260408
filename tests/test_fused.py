"""The fused elementwise rebuild (``fuse_elementwise``): ``torch.compile`` where it works, the
eager passes where it does not (issue 14, item 3). Compiling on the CPU takes tens of seconds,
so these tests check the plumbing and the fallback with stand-ins for the compiler; the real
compiled kernel is compared with the eager passes on CUDA (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

import loft
from loft import linalg
from loft.options import Settings

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
]


def trajectory(steps=4, device="cpu", **options):
    g = torch.Generator().manual_seed(0)
    pairs = []
    for m, n, r in [(24, 16, 4), (16, 24, 4)]:
        a = torch.nn.Parameter(torch.randn(r, n, generator=g, dtype=torch.float64).to(device))
        b = torch.nn.Parameter(torch.randn(m, r, generator=g, dtype=torch.float64).mul(0.1).to(device))
        pairs.append(loft.LoRAPair(a, b, 2.0))
    opt = loft.LoFTAdamW(pairs, lr=1e-2, **options)
    for step in range(steps):
        for p in pairs:
            for t in (p.A, p.B):
                t.grad = torch.randn(t.shape, generator=g, dtype=torch.float64).to(device)
        opt.step()
    return [t.detach().cpu().clone() for p in pairs for t in (p.A, p.B)]


def test_default_fuses_on_cuda_only():
    assert not Settings().fuses(torch.device("cpu")) and Settings().fuses(torch.device("cuda"))
    assert Settings(fuse_elementwise=True).fuses(torch.device("cpu"))
    assert not Settings(fuse_elementwise=False).fuses(torch.device("cuda"))
    with pytest.raises(TypeError, match="fuse_elementwise"):
        Settings(fuse_elementwise="yes")


def test_fused_kernel_is_used_when_on(monkeypatch):
    """With the option on the step goes through the compiled function (a stand-in that records
    its calls and evaluates the same expression eagerly): same results as the eager passes."""
    calls = []
    monkeypatch.setattr(linalg, "_compiled_quotient", lambda v, m, eps: calls.append(v.shape) or linalg._adam_quotient_expr(v, m, eps))
    monkeypatch.setattr(linalg, "_compile_failed", False)
    fused = trajectory(fuse_elementwise=True)
    assert calls
    n = len(calls)
    eager = trajectory(fuse_elementwise=False)
    assert len(calls) == n  # off: never called
    for a, b in zip(fused, eager):
        assert torch.equal(a, b)


def test_falls_back_to_the_eager_passes_when_compiling_fails(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(linalg, "_compiled_quotient", None)
    monkeypatch.setattr(linalg, "_compile_failed", False)
    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(RuntimeWarning, match="fused elementwise kernel is not available.*no compiler here"):
        fused = trajectory(fuse_elementwise=True)
    assert linalg._compile_failed
    eager = trajectory(fuse_elementwise=False)
    for a, b in zip(fused, eager):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES[1:])
def test_compiled_kernel_matches_the_eager_passes(device, monkeypatch):
    monkeypatch.setattr(linalg, "_compiled_quotient", None)
    monkeypatch.setattr(linalg, "_compile_failed", False)
    fused = trajectory(device=device, fuse_elementwise=True)
    assert not linalg._compile_failed
    eager = trajectory(device=device, fuse_elementwise=False)
    for a, b in zip(fused, eager):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
