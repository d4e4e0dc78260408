"""LoFT against AdamW at ranks on both sides of min(m, n) and max(m, n) (docs/algorithm.md).

    .venv/bin/python benchmarks/rank_regimes.py      # ~30 s; writes docs/results/rank_regimes.md

For each layer shape and rank, float64, a PEFT LoRA layer on the tests' regression problem
(``tests/conftest.py``), betas (0.9, 0.999), lr 5e-3, 40 steps: the largest relative distance
of ``dW`` from ``torch.optim.AdamW`` on ``dW`` from the same start. Then, for ranks strictly
between min(m, n) and max(m, n), how far ``dW`` moves when only the rounding changes (the
rebuild's chunk size, 1 byte against the default), over 60 steps at lr 2e-2.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import Regression, delta_w, lora_linear, rel_err  # noqa: E402
from test_optim_exactness import dense_adamw_trajectory  # noqa: E402

import loft  # noqa: E402
from loft.linalg import rank_regime  # noqa: E402


def gap_to_adamw(m: int, n: int, r: int, steps: int = 40) -> float:
    model, layer = lora_linear(m, n, r, random_b=True, seed=2)
    problem = Regression(n, m)
    expected = dense_adamw_trajectory(layer, problem, steps, lr=5e-3, weight_decay=0.0, max_norm=None)
    opt = loft.LoFTAdamW(model, lr=5e-3)
    worst = 0.0
    for t in range(steps):
        opt.zero_grad()
        problem.model_loss(model).backward()
        opt.step()
        worst = max(worst, rel_err(delta_w(layer), expected[t]))
    return worst


def rounding_spread(m: int, n: int, r: int, steps: int = 60) -> float:
    paths = []
    for chunk_bytes in (4 * 2**20, 1):
        model, layer = lora_linear(m, n, r, random_b=True, seed=3)
        problem = Regression(n, m)
        opt = loft.LoFTAdamW(model, lr=2e-2, rebalance=False, chunk_bytes=chunk_bytes)
        path = []
        for _ in range(steps):
            opt.zero_grad()
            problem.model_loss(model).backward()
            opt.step()
            path.append(delta_w(layer))
        paths.append(path)
    return max(rel_err(b, a) for a, b in zip(*paths))


def main() -> None:
    warnings.simplefilter("ignore", UserWarning)
    torch.set_num_threads(1)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    lines = [
        f"Made by `benchmarks/rank_regimes.py` at commit {commit}, torch {torch.__version__}, float64.",
        "",
        "| layer (m x n) | rank | regime | largest relative gap of dW to AdamW (40 steps) |",
        "| --- | --- | --- | --- |",
    ]
    for m, n in ((6, 4), (4, 6), (12, 8), (8, 12)):
        for r in sorted({min(m, n), min(m, n) + 1, max(m, n), max(m, n) + 2}):
            lines.append(f"| {m} x {n} | {r} | {rank_regime(m, n, r)} | {gap_to_adamw(m, n, r):.1e} |")
    lines += ["", "| layer (m x n) | rank | dW moved by a different rounding (60 steps) |", "| --- | --- | --- |"]
    for m, n, r in ((12, 8, 9), (8, 12, 10), (6, 4, 5), (12, 8, 8), (12, 8, 12)):
        lines.append(f"| {m} x {n} | {r} ({rank_regime(m, n, r)}) | {rounding_spread(m, n, r):.1e} |")
    out = ROOT / "docs" / "results" / "rank_regimes.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
