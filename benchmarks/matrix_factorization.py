"""The paper's synthetic experiment: fit a low-rank target with a rank-8 adapter.

    .venv/bin/python benchmarks/matrix_factorization.py     # ~10 minutes on 2 CPU cores

Target ``W* = A* B*`` with Gaussian factors (1024 x 8 and 8 x 512, scaled so that ``W*`` has
unit-variance entries), identity input, MSE loss ``mean((W - W*)^2)``, ``W = W0 + s B A`` with
``W0 = 0``, betas (0.9, 0.999), 300 steps. Methods: full AdamW on ``W``, LoRA + AdamW (PEFT's
default init: A random, B = 0, alpha = r), LoFT, and LoFT's ablations. Every method runs at
every learning rate of one shared grid (``LR_GRID``) with ``SEEDS`` (seed: target and
initialisation); its learning rate is the one with the lowest geometric-mean final loss over
the seeds. The curves are also compared at one common learning rate (``LR``), where "LoFT
behaves like full AdamW" is a statement about the same step size.

Ablations change one thing each. Rebalancing (see docs/algorithm.md) runs only where the step
is basis-invariant, which the calibration and gradient-scaling ablations are not, so each
ablation is taken from "LoFT w/o rebalancing" (the reference row) with one block switched off;
"LoFT" itself is that reference plus rebalancing.

A second panel is at full rank: a square layer (128 x 128, r = 128) and a non-square one
(128 x 64) at r = 128 = max(m, n), where LoFT must lie on top of AdamW, and the non-square
one at r = 64 = min(m, n), where it need not.

Writes ``benchmarks/results/matrix_factorization.json`` (every final loss, with provenance),
``docs/figures/matrix_factorization.png`` and ``docs/results/matrix_factorization.md``.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import loft  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import provenance  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS = 300
LR = 1e-2  # the common learning rate of the curves' panel
LR_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
SEEDS = (0, 1, 2)
NO_REBALANCING = {"rebalance": False}
#: LoFT's variants: the reference (no rebalancing), LoFT, and one block off per ablation
VARIANTS = {
    "LoFT w/o rebalancing (reference)": NO_REBALANCING,
    "LoFT": {},
    "LoFT w/o alternation": {**NO_REBALANCING, "alternating_updates": False},
    "LoFT w/o moment calibration": {**NO_REBALANCING, "first_moment_calibration": False,
                                    "second_moment_calibration": False},
    "LoFT w/o gradient scaling": {**NO_REBALANCING, "gradient_scaling": False},
    "LoFT (simple: w/o second-moment calibration)": {**NO_REBALANCING, "second_moment_calibration": False},
}


def target(m: int, n: int, rank: int, seed: int = 0) -> torch.Tensor:
    """``W* = A* B* / sqrt(rank)``: Gaussian factors, unit-variance entries, ``(m, n)``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g) / rank**0.5


def full_adamw(w_star: torch.Tensor, lr: float, init: torch.Tensor | None = None) -> list[float]:
    w = nn.Parameter(torch.zeros_like(w_star) if init is None else init.clone())
    opt = torch.optim.AdamW([w], lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(STEPS):
        loss = (w - w_star).square().mean()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses


def factors(m: int, n: int, r: int, seed: int = 1, zero_b: bool = True):
    g = torch.Generator().manual_seed(seed)
    A = nn.Parameter(torch.empty(r, n).uniform_(-(1 / n) ** 0.5, (1 / n) ** 0.5, generator=g))  # PEFT-like
    B = nn.Parameter(torch.zeros(m, r) if zero_b else torch.randn(m, r, generator=g))
    return A, B


def factored(w_star: torch.Tensor, A, B, s: float, optimizer) -> list[float]:
    losses = []
    for _ in range(STEPS):
        loss = (s * B @ A - w_star).square().mean()
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return losses


def lora_adamw(w_star: torch.Tensor, r: int, lr: float, seed: int = 1) -> list[float]:
    A, B = factors(*w_star.shape, r, seed=seed)
    return factored(w_star, A, B, 1.0, torch.optim.AdamW([A, B], lr=lr, weight_decay=0.0))


def loft_run(w_star: torch.Tensor, r: int, lr: float, seed: int = 1, **switches) -> list[float]:
    A, B = factors(*w_star.shape, r, seed=seed)
    opt = loft.LoFTAdamW([loft.LoRAPair(A, B, 1.0)], lr=lr, **switches)
    return factored(w_star, A, B, 1.0, opt)


def method_runs(m: int, n: int, r: int) -> dict[str, Callable[[torch.Tensor, float, int], list[float]]]:
    """Every method of the low-rank panel: name -> ``run(w_star, lr, seed) -> losses``."""
    runs = {"full AdamW": lambda w, lr, seed: full_adamw(w, lr),
            "LoRA + AdamW": lambda w, lr, seed: lora_adamw(w, r, lr, seed=seed + 1)}
    for name, switches in VARIANTS.items():
        runs[name] = lambda w, lr, seed, switches=switches: loft_run(w, r, lr, seed=seed + 1, **switches)
    return runs


def geometric_mean(xs: list[float]) -> float:
    """Of final losses; a diverged run (inf or nan) makes it inf."""
    if not all(math.isfinite(x) for x in xs):
        return math.inf
    return math.exp(statistics.fmean(math.log(max(x, 1e-300)) for x in xs))


def main() -> None:
    started = time.time()
    torch.manual_seed(0)
    m, n, r = 1024, 512, 8
    runs = method_runs(m, n, r)
    targets = {seed: target(m, n, r, seed=seed) for seed in SEEDS}
    # every method x learning rate x seed: final losses (and the curves of every seed)
    finals: dict[str, dict[float, list[float]]] = {}
    curves_all: dict[tuple[str, float, int], list[float]] = {}
    for name, run in runs.items():
        for lr in LR_GRID:
            for seed in SEEDS:
                curves_all[(name, lr, seed)] = run(targets[seed], lr, seed)
            finals.setdefault(name, {})[lr] = [curves_all[(name, lr, s)][-1] for s in SEEDS]
        print(f"{name}: " + ", ".join(f"{lr:g}: {geometric_mean(v):.2e}" for lr, v in finals[name].items()), flush=True)
    best_lr = {name: min(LR_GRID, key=lambda lr: geometric_mean(finals[name][lr])) for name in runs}
    curves = {name: curves_all[(name, LR, SEEDS[0])] for name in runs}  # the common-lr panel, seed 0

    # full-rank panel: LoFT from well-conditioned factors vs AdamW from the same dW, on a square
    # layer (r = m = n) and on a non-square one at r = max(m, n) (exact) and r = min(m, n) (not)
    k = 128
    full_rank, gaps = {}, {}
    for m_fr, n_fr, ranks, seed in ((k, k, (k,), 2), (k, k // 2, (k, k // 2), 4)):
        w_fr = target(m_fr, n_fr, min(m_fr, n_fr), seed=seed)
        g = torch.Generator().manual_seed(seed + 1)
        b_full = torch.linalg.qr(torch.randn(m_fr, m_fr, generator=g))[0]  # orthogonal, m x m
        a_min = torch.linalg.qr(torch.randn(n_fr, n_fr, generator=g))[0]  # orthogonal, n x n
        dw0 = b_full[:, :n_fr] @ a_min
        adamw_name = f"full AdamW, {m_fr} x {n_fr}"
        full_rank[adamw_name] = full_adamw(w_fr, LR, init=dw0)
        for r_fr in ranks:  # every rank starts from the same dW: A gets zero rows beyond n
            B = nn.Parameter(b_full[:, :r_fr].clone())
            A = nn.Parameter(torch.cat([a_min, torch.zeros(r_fr - n_fr, n_fr)]))
            name = f"LoFT, {m_fr} x {n_fr}, r = {r_fr}"
            full_rank[name] = factored(w_fr, A, B, 1.0, loft.LoFTAdamW([loft.LoRAPair(A, B, 1.0)], lr=LR))
            gaps[name] = max(abs(a - b) / b for a, b in zip(full_rank[name], full_rank[adamw_name]))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, ys in curves.items():
        ax1.semilogy(ys, label=name, lw=2.5 if name in ("full AdamW", "LoFT") else 1.2)
    ax1.set(title=f"Rank-{r} adapter, {m} x {n} target (rank {r}), lr {LR:g}, seed {SEEDS[0]}", xlabel="step",
            ylabel="MSE")
    ax1.legend(fontsize=7)
    for name, ys in full_rank.items():
        ax2.semilogy(ys, label=name, ls="--" if "LoFT" in name else "-", lw=2 if "LoFT" not in name else 1.5)
    ax2.set(title="Full rank: r >= max(m, n) is AdamW;\nr = min(m, n) < max(m, n) is not", xlabel="step")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig_path = ROOT / "docs" / "figures" / "matrix_factorization.png"
    fig_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(fig_path, dpi=110)

    def spread(xs: list[float]) -> str:
        return f"{geometric_mean(xs):.2e} ({min(xs):.1e} - {max(xs):.1e})"

    lines = [
        f"Generated by `.venv/bin/python benchmarks/matrix_factorization.py` (raw: "
        f"`benchmarks/results/matrix_factorization.json`). {len(SEEDS)} seeds; final loss after {STEPS} steps: "
        "geometric mean over seeds (min - max).",
        "",
        f"| method | best lr of {', '.join(f'{x:g}' for x in LR_GRID)} | final loss at its best lr | "
        f"final loss at lr {LR:g} | loss at step 50, lr {LR:g} | loss at step 150, lr {LR:g} |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in runs:
        at_lr = [curves_all[(name, LR, s)] for s in SEEDS]
        lines.append(f"| {name} | {best_lr[name]:g} | {spread(finals[name][best_lr[name]])} | {spread(finals[name][LR])} | "
                     f"{geometric_mean([c[50] for c in at_lr]):.2e} | {geometric_mean([c[150] for c in at_lr]):.2e} |")
    lines += [
        "",
        "Full-rank panel: largest relative gap between LoFT's and AdamW's losses over "
        f"{STEPS} float32 steps (from the same dW, lr {LR:g}): "
        + "; ".join(f"{name}: {gap:.1e}" for name, gap in gaps.items())
        + ".",
        "",
        f"Wall time: {time.time() - started:.0f} s.",
    ]
    out = ROOT / "docs" / "results" / "matrix_factorization.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    raw = {"provenance": provenance(torch.get_num_threads()), "steps": STEPS, "lr_grid": LR_GRID, "seeds": SEEDS,
           "final_loss": {name: {f"{lr:g}": v for lr, v in by_lr.items()} for name, by_lr in finals.items()},
           "best_lr": best_lr, "full_rank_gap": gaps, "wall_seconds": round(time.time() - started)}
    raw_path = ROOT / "benchmarks" / "results" / "matrix_factorization.json"
    raw_path.parent.mkdir(parents=True, exist_ok=True)
    raw_path.write_text(json.dumps(raw, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
