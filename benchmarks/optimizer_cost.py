"""What a LoFT step costs, side by side with AdamW: time, peak memory, state bytes.

    .venv/bin/python benchmarks/optimizer_cost.py            # everything, writes docs/benchmark_results.md
    .venv/bin/python benchmarks/optimizer_cost.py --quick    # small shapes, a smoke run
    .venv/bin/python benchmarks/optimizer_cost.py --batching # batched vs one pair at a time (prints only)

Three measurements, each within one run so that the ratios are fair on a noisy machine:

1. One layer (Llama-7B shapes 4096x4096, 4096x11008, 11008x4096; r in 1, 4, 16, 64): the
   optimizer step alone of LoFTAdamW, LoFT (simple), torch AdamW (foreach) on the same LoRA
   factors and torch AdamW (foreach) on the dense weight. Steps are interleaved, medians taken.
   Peak resident-memory growth over the first steps is measured in a fresh subprocess per
   configuration (Linux VmHWM, reset after set-up), persistent state included.
2. A whole training step (forward, backward, step) of a Llama model with SmolLM2-135M's layer
   shapes (random weights), LoRA on all seven projections, batch 4 x 128 tokens, r in 4, 16:
   LoFT vs LoRA + AdamW, interleaved.
3. Optimizer state bytes per method.

LoFT runs with its defaults, so pairs of one shape are stepped as a batch (``batch_pairs=True``).
``--batching`` compares that with one pair at a time on the whole-step model, interleaved.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

import loft

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20


# ----------------------------------------------------------------------------- single layer
def make_layer(m: int, n: int, r: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    A = nn.Parameter(torch.randn(r, n, generator=g) / n**0.5)
    B = nn.Parameter(torch.randn(m, r, generator=g) * 0.02)
    A.grad = torch.randn(r, n, generator=g) * 1e-3
    B.grad = torch.randn(m, r, generator=g) * 1e-3
    return A, B


def make_optimizer(method: str, m: int, n: int, r: int):
    """``(optimizer, persistent tensors)`` for one layer; gradients are set once and reused."""
    if method == "dense":
        W = nn.Parameter(torch.zeros(m, n))
        W.grad = torch.randn(m, n, generator=torch.Generator().manual_seed(1)) * 1e-3
        return torch.optim.AdamW([W], lr=1e-4, foreach=True), [W]
    A, B = make_layer(m, n, r)
    if method == "lora":
        return torch.optim.AdamW([A, B], lr=1e-4, foreach=True), [A, B]
    options = {"second_moment_calibration": False} if method == "simple" else {}
    return loft.LoFTAdamW([loft.LoRAPair(A, B, 2.0)], lr=1e-4, **options), [A, B]


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if torch.is_tensor(t))


def layer_times(m: int, n: int, r: int, methods: list[str], steps: int) -> dict[str, float]:
    opts = {meth: make_optimizer(meth, m, n, r)[0] for meth in methods}
    for opt in opts.values():  # warm-up; two steps so LoFT has run both sides
        opt.step()
        opt.step()
    times: dict[str, list[float]] = {meth: [] for meth in methods}
    for _ in range(steps):
        for meth, opt in opts.items():
            t0 = time.perf_counter()
            opt.step()
            times[meth].append(time.perf_counter() - t0)
    return {meth: statistics.median(ts) for meth, ts in times.items()}


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def layer_memory_child(method: str, m: int, n: int, r: int, steps: int) -> None:
    """Run in a fresh process: peak RSS growth of ``steps`` optimizer steps after set-up."""
    torch.set_num_threads(torch.get_num_threads())
    opt, _ = make_optimizer(method, m, n, r)
    baseline = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    for _ in range(steps):
        opt.step()
    peak = _rss_kib("VmHWM")
    print(json.dumps({"growth_mib": (peak - baseline) / 1024, "state_mib": state_bytes(opt) / MiB}))


def layer_memory(method: str, m: int, n: int, r: int, steps: int = 3) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", method, str(m), str(n), str(r), str(steps)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- whole model
def smollm2_shaped_model(r: int, quick: bool):
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=4 if quick else 30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets))


def _step_times(models: dict, opts: dict, steps: int) -> dict[str, float]:
    """Median whole training step (``name``) and optimizer step (``name_step``) of each model,
    ``steps`` samples after 2 warm-up steps, interleaved in alternating order."""
    names = list(models)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49152, (4, 128), generator=g)
    times: dict[str, list[float]] = {key: [] for name in names for key in (name, name + "_step")}
    for i in range(steps + 2):
        for name in names if i % 2 else names[::-1]:
            model, opt = models[name], opts[name]
            t0 = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            t1 = time.perf_counter()
            opt.step()
            opt.zero_grad()
            t2 = time.perf_counter()
            if i >= 2:  # warm-up
                times[name].append(t2 - t0)
                times[name + "_step"].append(t2 - t1)
    return {key: statistics.median(v) for key, v in times.items()}


def model_times(r: int, steps: int, quick: bool) -> dict[str, float]:
    models = {"loft": smollm2_shaped_model(r, quick), "lora": smollm2_shaped_model(r, quick)}
    opts = {
        "loft": loft.LoFTAdamW(models["loft"], lr=1e-4),
        "lora": torch.optim.AdamW([p for p in models["lora"].parameters() if p.requires_grad], lr=1e-4, foreach=True),
    }
    result = _step_times(models, opts, steps)
    result["loft_state_mib"] = state_bytes(opts["loft"]) / MiB
    result["lora_state_mib"] = state_bytes(opts["lora"]) / MiB
    return result


def batching_times(r: int, steps: int, quick: bool) -> dict[str, float]:
    """Whole training step and optimizer step of LoFT with pairs of one shape batched (the
    default) and one pair at a time, interleaved (alternating which goes first)."""
    names = ("batched", "per_pair")
    models = {name: smollm2_shaped_model(r, quick) for name in names}
    opts = {name: loft.LoFTAdamW(models[name], lr=1e-4, batch_pairs=name == "batched") for name in names}
    return _step_times(models, opts, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes and few steps (a smoke run)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per configuration")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmark_results.md"))
    parser.add_argument("--batching", action="store_true", help="only compare batched pairs with one pair at a time")
    parser.add_argument("--memory-child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        method, m, n, r, steps = args.memory_child
        layer_memory_child(method, int(m), int(n), int(r), int(steps))
        return

    if args.batching:
        print("| r | batched step s | per-pair step s | batched optimizer s | per-pair optimizer s |")
        print("| --- | --- | --- | --- | --- |")
        for r in (4, 16):
            t = batching_times(r, args.steps or (3 if args.quick else 10), args.quick)
            print(
                f"| {r} | {t['batched']:.3f} | {t['per_pair']:.3f} | {t['batched_step']:.3f} | {t['per_pair_step']:.3f} |",
                flush=True,
            )
        return

    shapes = [(512, 512), (512, 1376)] if args.quick else [(4096, 4096), (4096, 11008), (11008, 4096)]
    ranks = [1, 4, 16] if args.quick else [1, 4, 16, 64]
    steps = args.steps or (3 if args.quick else 6)
    methods = ["loft", "simple", "lora", "dense"]
    started = time.time()
    lines = [
        "# Benchmark results",
        "",
        f"Made by `python benchmarks/optimizer_cost.py{' --quick' if args.quick else ''}` on "
        f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, float32, {time.strftime('%Y-%m-%d')}.",
        "",
        "## One layer: optimizer step alone",
        "",
        "Median seconds per step (interleaved), the ratio to a dense AdamW step on the same weight,",
        "and peak resident-memory growth over the first 3 steps (fresh process each, state included).",
        "",
        "| shape (m x n) | r | LoFT s | LoFT simple s | LoRA+AdamW s | dense AdamW s | LoFT / dense | simple / dense | LoFT peak MiB | simple peak MiB | dense peak MiB | LoFT state MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m, n in shapes:
        for r in ranks:
            t = layer_times(m, n, r, methods, steps)
            mem = {meth: layer_memory(meth, m, n, r) for meth in ("loft", "simple", "dense")}
            row = (
                f"| {m} x {n} | {r} | {t['loft']:.4f} | {t['simple']:.4f} | {t['lora']:.5f} | {t['dense']:.4f} "
                f"| {t['loft'] / t['dense']:.2f} | {t['simple'] / t['dense']:.2f} | {mem['loft']['growth_mib']:.0f} "
                f"| {mem['simple']['growth_mib']:.0f} | {mem['dense']['growth_mib']:.0f} | {mem['loft']['state_mib']:.1f} |"
            )
            print(row, flush=True)
            lines.append(row)
    lines += [
        "",
        "## Whole training step, SmolLM2-135M shapes",
        "",
        f"Llama config with SmolLM2-135M's shapes ({'4 layers (quick)' if args.quick else '30 layers'}, hidden 576, "
        "intermediate 1536, 9/3 heads, vocab 49152), random weights, LoRA on q/k/v/o/gate/up/down, batch 4 x 128 "
        "tokens, forward + backward + step, interleaved medians.",
        "",
        "| r | LoFT step s | LoRA+AdamW step s | ratio | LoFT optimizer s | AdamW optimizer s | LoFT state MiB | AdamW state MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in (4, 16):
        t = model_times(r, max(3, steps), args.quick)
        row = (
            f"| {r} | {t['loft']:.3f} | {t['lora']:.3f} | {t['loft'] / t['lora']:.3f} | {t['loft_step']:.3f} "
            f"| {t['lora_step']:.3f} | {t['loft_state_mib']:.1f} | {t['lora_state_mib']:.1f} |"
        )
        print(row, flush=True)
        lines.append(row)
    lines += ["", f"Total benchmark wall time: {time.time() - started:.0f} s.", ""]
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
