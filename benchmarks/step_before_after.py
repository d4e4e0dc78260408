"""The LoFT optimizer step on SmolLM2-135M's shapes: a frozen copy of an older ``loft`` against
the installed one, interleaved in one process (the machine is noisy: alternating order, medians).

    cp -r src/loft /tmp/loft_before        # before changing the code
    .venv/bin/python benchmarks/step_before_after.py --before /tmp/loft_before
    .venv/bin/python benchmarks/step_before_after.py --before /tmp/loft_before --syncs   # host syncs per step
    .venv/bin/python benchmarks/step_before_after.py --before /tmp/loft_before --layer 4096 4096 --samples 30

Two modes: ``step`` (``optimizer.step()`` alone) and ``trainer`` (``loft.clip_grad_norm_`` then
``step()``, what ``transformers.Trainer`` does each step with ``max_grad_norm`` set; the
clipping is active, the gradients are scaled). The pairs
are the 210 LoRA pairs of SmolLM2-135M's seven projections in 30 layers (576 x 576,
192 x 576, 1536 x 576, 576 x 1536) built directly as ``LoRAPair`` objects with fixed random
gradients; the whole training step is in ``optimizer_cost.py``. One sample is two steps (one
moves B, one moves A), float32, one thread. ``--layer M N``: one ``M x N`` pair instead (a 7B
model's projection is 4096 x 4096). Each line also gives the minor page faults per step (the
kernel zeroing fresh pages for the process: large temporaries allocated anew every step).
"""

from __future__ import annotations

import argparse
import importlib.util
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import loft

HIDDEN, INTER, KV = 576, 1536, 192
PROJECTIONS = [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN), (INTER, HIDDEN), (INTER, HIDDEN), (HIDDEN, INTER)]


def load_package(path: Path, name: str = "loft_before"):
    spec = importlib.util.spec_from_file_location(name, path / "__init__.py", submodule_search_locations=[str(path)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def build(package, r: int, layers: int, shapes: list[tuple[int, int]] = PROJECTIONS):
    g = torch.Generator().manual_seed(0)
    pairs = []
    for layer in range(layers):
        for j, (m, n) in enumerate(shapes):
            A = nn.Parameter(torch.randn(r, n, generator=g) / n**0.5)
            B = nn.Parameter(torch.randn(m, r, generator=g) * 0.02)
            A.grad = torch.randn(r, n, generator=g) * 1e-3
            B.grad = torch.randn(m, r, generator=g) * 1e-3
            A.first_grad, B.first_grad = A.grad.clone(), B.grad.clone()
            pairs.append(package.LoRAPair(A, B, 2.0, name=f"{layer}.{j}"))
    return package.LoFTAdamW(pairs, lr=1e-4)


def one_sample(package, opt, mode: str) -> float:
    """Seconds of two steps (``trainer``: each with clipping that scales the gradients, which
    are restored from their first values outside the timed part)."""
    elapsed = 0.0
    for _ in range(2):
        if mode == "trainer":
            for pair in opt.pairs:
                for t in (pair.A, pair.B):
                    t.grad.copy_(t.first_grad)
        t0 = time.perf_counter()
        if mode == "trainer":
            package.clip_grad_norm_(opt, 1e-2)  # the norm is ~2: the gradients are scaled
        opt.step()
        elapsed += time.perf_counter() - t0
    return elapsed


def count_syncs(packages: dict, args: argparse.Namespace) -> None:
    """Host syncs (``loft.syncs.HostSyncCounter``) of each of 4 steps, with and without clipping
    inside the step (``max_grad_norm``), for each package."""
    from loft.syncs import HostSyncCounter

    print(f"host syncs per step, {args.layers * len(PROJECTIONS)} pairs (4 shapes), steps 1-4")
    for r in args.ranks:
        for clip in (None, 1e-2):
            row = []
            for name, package in packages.items():
                opt = build(package, r, args.layers)
                for group in opt.param_groups:
                    group["max_grad_norm"] = clip
                counts = []
                for _ in range(4):
                    with HostSyncCounter() as syncs:
                        opt.step()
                    counts.append(syncs.count)
                row.append(f"{name} {counts}")
            print(f"r={r:2d} max_grad_norm={clip}: " + ", ".join(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", type=Path, required=True, help="a copy of an older src/loft")
    parser.add_argument("--samples", type=int, default=15)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--modes", nargs="+", default=["step", "trainer"])
    parser.add_argument("--syncs", action="store_true", help="count host syncs per step instead of timing")
    parser.add_argument("--layer", type=int, nargs=2, metavar=("M", "N"), help="one M x N pair instead of SmolLM2's")
    args = parser.parse_args()
    shapes = PROJECTIONS
    if args.layer:
        shapes, args.layers = [tuple(args.layer)], 1
    torch.set_num_threads(1)
    before = load_package(args.before)
    packages = {"before": before, "after": loft}
    if args.syncs:
        count_syncs(packages, args)
        return
    what = f"one {shapes[0][0]} x {shapes[0][1]} pair" if args.layer else f"{args.layers * len(shapes)} pairs"
    print(f"torch {torch.__version__}, 1 thread, {what}, {args.samples} samples of 2 steps")
    for r in args.ranks:
        for mode in args.modes:
            opts = {name: build(pkg, r, args.layers, shapes) for name, pkg in packages.items()}
            for name, opt in opts.items():  # warm-up: both factors once
                one_sample(packages[name], opt, mode)
            times = {name: [] for name in packages}
            faults = {name: 0 for name in packages}
            ratios = []
            for i in range(args.samples):
                order = ["before", "after"] if i % 2 == 0 else ["after", "before"]
                sample = {}
                for name in order:
                    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                    sample[name] = one_sample(packages[name], opts[name], mode)
                    faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start
                for name, t in sample.items():
                    times[name].append(t / 2)
                ratios.append(sample["after"] / sample["before"])
            b, a = statistics.median(times["before"]), statistics.median(times["after"])
            per_step = {name: faults[name] / (2 * args.samples) for name in packages}
            print(
                f"r={r:2d} {mode:7s}: before {b:.4f} s/step, after {a:.4f} s/step, "
                f"ratio of medians {a / b:.3f}, median of paired ratios {statistics.median(ratios):.3f}; "
                f"page faults per step before {per_step['before']:.0f}, after {per_step['after']:.0f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
