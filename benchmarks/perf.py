"""The performance targets of issue 14, measured in one run; docs/performance.md's tables are
rendered from the result file only.

    .venv/bin/python benchmarks/perf.py                  # the full run (writes benchmarks/results/perf.json)
    .venv/bin/python benchmarks/perf.py --quick          # few samples, small shapes: a smoke run
    .venv/bin/python benchmarks/perf.py --report-only    # re-render docs/performance.md from the file

What is measured (``--device cuda --dtype bfloat16 --model 1b`` for the GPU run of
``benchmarks/gpu.sh``):

* ``whole_step``: a whole training step (forward, backward, optimizer step, zero_grad) of a
  Llama model with SmolLM2-135M's shapes (8 layers, random weights, LoRA on all seven
  projections), batch ``--batch`` x ``--seq`` tokens: LoFT (defaults) against LoRA + AdamW
  (torch, foreach), at r = 16 and r = 4; the optimizer step's share too.
* ``layer``: one 4096 x 4096 LoFT step (one pair, fixed gradients) against its floor, one GEMM
  with the step's unavoidable ``m n (p + 2 r)`` multiply-adds (``p = r (r + 1) / 2``), on one
  thread, at r = 16 and r = 4.
* ``memory``: LoFT's and AdamW's optimizer state bytes on the whole-step model, and the whole
  run's peak memory for each (peak RSS of a fresh process that builds the model and takes 3
  steps; on CUDA the peak allocated device memory).
* ``syncs``: host synchronisations of one optimizer step (:class:`loft.syncs.HostSyncCounter`).

Every time is from ``--samples`` (default 30) interleaved samples, the two methods alternating
which goes first; reported as the median, the quartiles and the extremes, with the median of
the paired ratios. The file records the commit, the library versions, the threads and the
machine's load average (``os.getloadavg``) before and after each part.
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
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import loft
from loft.options import Settings
from loft.syncs import HostSyncCounter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _pages import replace_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "perf.json"
DOC = ROOT / "docs" / "performance.md"
BEGIN, END = "<!-- perf.py tables: begin -->", "<!-- perf.py tables: end -->"
MiB = 2**20
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: (hidden, intermediate, heads, kv heads, vocab) of the model shapes
MODELS = {
    "smollm2-135m": (576, 1536, 9, 3, 49152),
    "1b": (2048, 8192, 32, 8, 128256),  # Llama-3.2-1B's shapes
}


# ----------------------------------------------------------------------------- statistics
def summary(values: list[float]) -> dict[str, float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "p25": q[0], "p75": q[2], "min": min(values), "max": max(values), "n": len(values)}


def interleaved(runs: dict[str, Callable[[], float]], samples: int, warmup: int = 2) -> dict[str, list[float]]:
    """``samples`` timings of each run, in alternating order (ABAB..., then BA...)."""
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            runs[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(samples):
        for name in names if i % 2 == 0 else names[::-1]:
            times[name].append(runs[name]())
    return times


def paired(times: dict[str, list[float]], a: str, b: str) -> dict[str, float]:
    return summary([x / y for x, y in zip(times[a], times[b])])


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- the whole step
def build_model(kind: str, layers: int, r: int, device: torch.device, dtype: torch.dtype):
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, heads, kv, vocab = MODELS[kind]
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS)
    return peft.get_peft_model(model, config, autocast_adapter_dtype=False)


def make_optimizer(method: str, model: nn.Module) -> torch.optim.Optimizer:
    if method == "loft":
        return loft.LoFTAdamW(model, lr=1e-4)
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=True)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if torch.is_tensor(t)
    )


def whole_step(args: argparse.Namespace, r: int) -> dict:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, MODELS[args.model][4], (args.batch, args.seq), generator=g).to(device)
    methods = {}
    step_times: dict[str, list[float]] = {"loft": [], "lora": []}
    for method in ("loft", "lora"):
        model = build_model(args.model, args.layers, r, device, dtype)
        opt = make_optimizer(method, model)
        methods[method] = (model, opt)

    def run(method: str) -> Callable[[], float]:
        model, opt = methods[method]

        def one() -> float:
            sync(device)
            t0 = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            sync(device)
            t1 = time.perf_counter()
            opt.step()
            opt.zero_grad()
            sync(device)
            t2 = time.perf_counter()
            step_times[method].append(t2 - t1)
            return t2 - t0

        return one

    before = load()
    times = interleaved({"loft": run("loft"), "lora": run("lora")}, args.samples)
    for method in step_times:  # drop the warm-up steps
        step_times[method] = step_times[method][-args.samples :]
    # host syncs of one optimizer step of each (after the timed steps, gradients fresh)
    syncs = {}
    for method, (model, opt) in methods.items():
        model(input_ids=ids, labels=ids).loss.backward()
        steps = {id(t) for st in opt.state.values() for k, t in st.items() if k == "step" and torch.is_tensor(t)}
        with HostSyncCounter(ignore=lambda t: id(t) in steps) as counter:  # torch AdamW's CPU step counters
            opt.step()
        opt.zero_grad()
        syncs[method] = {"count": counter.count, "events": dict(counter.events)}
    return {
        "r": r,
        "pairs": len(methods["loft"][1].pairs),
        "step": {m: summary(t) for m, t in times.items()},
        "optimizer_step": {m: summary(t) for m, t in step_times.items()},
        "ratio": paired(times, "loft", "lora"),
        "state_bytes": {m: state_bytes(opt) for m, (_, opt) in methods.items()},
        "syncs_per_step": syncs,
        "load_before": before,
        "load_after": load(),
    }


def peak_memory_child(args: argparse.Namespace, method: str, r: int) -> None:
    """In a fresh process: the peak memory of building the model and taking 3 whole steps."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model = build_model(args.model, args.layers, r, device, dtype)
    opt = make_optimizer(method, model)
    ids = torch.randint(0, MODELS[args.model][4], (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    out = {"peak_rss_mib": _status_kib("VmHWM") / 1024}
    if device.type == "cuda":
        out["peak_device_mib"] = torch.cuda.max_memory_allocated(device) / MiB
    print(json.dumps(out))


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def peak_memory(args: argparse.Namespace, r: int) -> dict:
    out = {}
    for method in ("loft", "lora"):
        command = [sys.executable, __file__, "--peak-child", method, str(r), *_shape_args(args)]
        done = subprocess.run(command, check=True, capture_output=True, text=True)
        out[method] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def _shape_args(args: argparse.Namespace) -> list[str]:
    return ["--device", args.device, "--dtype", args.dtype, "--model", args.model, "--layers", str(args.layers),
            "--batch", str(args.batch), "--seq", str(args.seq)]  # fmt: skip


# ----------------------------------------------------------------------------- one layer vs its floor
def layer(args: argparse.Namespace, r: int) -> dict:
    device = torch.device(args.device)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        m = n = args.layer_size
        g = torch.Generator().manual_seed(0)
        a = nn.Parameter((torch.randn(r, n, generator=g) / n**0.5).to(device))
        b = nn.Parameter((torch.randn(m, r, generator=g) * 0.02).to(device))
        a.grad = (torch.randn(r, n, generator=g) * 1e-3).to(device)
        b.grad = (torch.randn(m, r, generator=g) * 1e-3).to(device)
        opt = loft.LoFTAdamW([loft.LoRAPair(a, b, 2.0)], lr=1e-4)
        depth = r * (r + 1) // 2 + 2 * r
        x, y = torch.randn(m, depth, device=device), torch.randn(depth, n, device=device)
        z = torch.empty(m, n, device=device)
        # the elementwise passes no eager implementation avoids: Adam's denominator needs the square root
        # of all m x n rebuilt second moments, then + eps and a division (and a clamp of rounding below 0),
        # here over blocks of the rows the rebuild uses (cache-sized), without allocating
        rows = max(1, Settings().chunk_bytes // (2 * n * z.element_size()))
        v_full, m_full, d_full = torch.rand(m, n, device=device) + 1, torch.randn(m, n, device=device), torch.empty(m, n, device=device)
        blocks = [(v_full[i : i + rows], m_full[i : i + rows], d_full[i : i + rows]) for i in range(0, m, rows)]

        def sqrt_pass() -> None:
            for v, _, _ in blocks:
                v.sqrt_()  # stays at ~1: no denormals

        def elementwise() -> None:
            for v, m_block, d in blocks:
                torch.div(m_block, v.clamp_min_(0).sqrt_().add_(1e-8), out=d)

        def timed(f: Callable[[], object]) -> Callable[[], float]:
            def one() -> float:
                sync(device)
                t0 = time.perf_counter()
                f()
                sync(device)
                return time.perf_counter() - t0

            return one

        before = load()
        runs = {"loft": timed(opt.step), "gemm": timed(lambda: torch.mm(x, y, out=z)), "sqrt": timed(sqrt_pass),
                "elementwise": timed(elementwise)}
        times = interleaved(runs, args.samples)
        for name in ("sqrt", "elementwise"):  # the floor GEMM plus the passes, sample by sample
            times[f"gemm+{name}"] = [g + t for g, t in zip(times["gemm"], times[name])]
        return {
            "r": r,
            "shape": [m, n],
            "threads": torch.get_num_threads(),
            "floor_multiply_adds": m * n * depth,
            "loft_step": summary(times["loft"]),
            "floor_gemm": summary(times["gemm"]),
            "ratio": paired(times, "loft", "gemm"),
            "sqrt_pass": summary(times["sqrt"]),
            "elementwise_passes": summary(times["elementwise"]),
            "block_rows": rows,
            # (floor GEMM + the passes) / floor GEMM: what an eager step costs at the very least
            "bound_sqrt": paired(times, "gemm+sqrt", "gemm"),
            "bound_elementwise": paired(times, "gemm+elementwise", "gemm"),
            "load_before": before,
            "load_after": load(),
        }
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- provenance
def provenance(args: argparse.Namespace) -> dict:
    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "unknown"

    import peft
    import transformers

    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "versions": {
            "loft": loft.__version__ if hasattr(loft, "__version__") else "unknown",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "python": platform.python_version(),
        },
        "machine": {
            "arch": platform.machine(),
            "cpus": os.cpu_count(),
            "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        },
        "threads": torch.get_num_threads(),
        "command": "benchmarks/perf.py " + " ".join(sys.argv[1:]),
        "settings": {k: getattr(args, k) for k in ("samples", "model", "layers", "batch", "seq", "layer_size", "device", "dtype", "quick")},
    }


# ----------------------------------------------------------------------------- report
def _t(s: dict, unit: float = 1.0, digits: int = 3) -> str:
    return f"{s['median'] * unit:.{digits}f} ({s['p25'] * unit:.{digits}f}-{s['p75'] * unit:.{digits}f})"


def _verdict(value: float, target: float) -> str:
    return "holds" if value <= target else "**does not hold**"


def render(result: dict) -> str:
    """docs/performance.md's measured tables, from a result file only."""
    p, s = result["provenance"], result["provenance"]["settings"]
    tokens = f"{s['batch']} x {s['seq']} tokens"
    lines = [
        f"Measured by `{p['command']}` at commit `{p['commit'][:10]}`{' (with uncommitted changes)' if p['dirty'] else ''}, "
        f"{p['date_utc']} UTC: torch {p['versions']['torch']}, transformers {p['versions']['transformers']}, "
        f"peft {p['versions']['peft']}; {p['machine']['arch']}, {p['machine']['cpus']} CPUs, device {p['machine']['device']}, "
        f"{s['dtype']}, {p['threads']} threads (the one-layer rows: 1). Every time is the median (and quartiles) of "
        f"{s['samples']} interleaved samples in alternating order; ratios are the median (quartiles) of the paired ratios. "
        f"Load average (1, 5, 15 min) before / after each part is in the last column: the machine is shared, so "
        "read the ratios, not the absolute times.",
        "",
        "| target | measured | verdict | load before / after |",
        "| --- | --- | --- | --- |",
    ]
    whole_target = {16: 1.08, 4: 1.03}
    for w in result["whole_step"]:
        lines.append(
            f"| whole step, {s['model']} shapes ({s['layers']} layers, {w['pairs']} pairs), {tokens}, r = {w['r']}: "
            f"LoFT <= {whole_target.get(w['r'], float('nan'))}x LoRA + AdamW | {_t(w['ratio'])}x | "
            f"{_verdict(w['ratio']['median'], whole_target.get(w['r'], 0))} | {w['load_before']} / {w['load_after']} |"
        )
    for ly in result["layer"]:
        m, n = ly["shape"]
        lines.append(
            f"| one {m} x {n} step, {ly['threads']} thread(s), r = {ly['r']}: <= 1.3x the floor GEMM "
            f"({ly['floor_multiply_adds'] / 1e9:.2f} G multiply-adds) | {_t(ly['ratio'])}x | "
            f"{_verdict(ly['ratio']['median'], 1.3)} | {ly['load_before']} / {ly['load_after']} |"
        )
    lines += [
        "",
        "| whole step | r | LoFT s | LoRA + AdamW s | LoFT optimizer step s | AdamW step s | state MiB LoFT / AdamW | peak memory MiB LoFT / LoRA | host syncs per step LoFT / AdamW |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for w in result["whole_step"]:
        mem = result.get("memory", {}).get(str(w["r"]), {})
        peak_key = "peak_device_mib" if s["device"] == "cuda" else "peak_rss_mib"
        peak = " / ".join(f"{mem[m][peak_key]:.0f}" for m in ("loft", "lora")) if mem else "not measured"
        state = " / ".join(f"{w['state_bytes'][m] / MiB:.1f}" for m in ("loft", "lora"))
        syncs = " / ".join(str(w["syncs_per_step"][m]["count"]) for m in ("loft", "lora"))
        lines.append(
            f"| {tokens} | {w['r']} | {_t(w['step']['loft'])} | {_t(w['step']['lora'])} | "
            f"{_t(w['optimizer_step']['loft'])} | {_t(w['optimizer_step']['lora'])} | {state} | {peak} | {syncs} |"
        )
    lines += [
        "",
        "| one layer | r | LoFT step ms | floor GEMM ms | ratio |",
        "| --- | --- | --- | --- | --- |",
    ]
    for ly in result["layer"]:
        lines.append(
            f"| {_layer_label(ly)} | {_t(ly['loft_step'], 1e3, 1)} | {_t(ly['floor_gemm'], 1e3, 1)} | "
            f"{_t(ly['ratio'], 1, 2)} |"
        )
    if all("bound_sqrt" in ly for ly in result["layer"]):
        lines += [
            "",
            "| one layer | r | floor GEMM ms | one sqrt pass ms | clamp, sqrt, + eps, divide ms | rows per block | "
            "(floor + sqrt) / floor | (floor + all four) / floor |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for ly in result["layer"]:
            lines.append(
                f"| {_layer_label(ly)} | {_t(ly['floor_gemm'], 1e3, 1)} | {_t(ly['sqrt_pass'], 1e3, 1)} | "
                f"{_t(ly['elementwise_passes'], 1e3, 1)} | {ly['block_rows']} | "
                f"{_t(ly['bound_sqrt'], 1, 2)} | {_t(ly['bound_elementwise'], 1, 2)} |"
            )
    return "\n".join(lines)


def _layer_label(ly: dict) -> str:
    """The first two cells of a one-layer row: shape and threads, rank."""
    m, n = ly["shape"]
    return f"{m} x {n}, {ly['threads']} thread(s) | {ly['r']}"


def write_report(result: dict, doc: Path = DOC) -> None:
    replace_section(doc, BEGIN, END, render(result))


# ----------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 samples, 2 layers, 1 x 64 tokens, a 1024 x 1024 layer")
    parser.add_argument("--report-only", action="store_true", help="only re-render docs/performance.md from --out")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--doc", type=Path, default=DOC, help="the page whose marked tables are rendered")
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2-135m")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--layer-size", type=int, default=4096)
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 4])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the whole step (default: torch's)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--peak-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_child:
        peak_memory_child(args, args.peak_child[0], int(args.peak_child[1]))
        return
    if args.report_only:
        write_report(json.loads(args.out.read_text()), args.doc)
        print(f"rendered {args.doc} from {args.out}")
        return
    if args.quick:
        args.samples, args.layers, args.batch, args.seq, args.layer_size = 4, 2, 1, 64, 1024
    if args.threads:
        torch.set_num_threads(args.threads)
    result: dict = {"provenance": provenance(args), "whole_step": [], "layer": [], "memory": {}}
    for r in args.ranks:
        print(f"whole step, r = {r} ...", flush=True)
        result["whole_step"].append(whole_step(args, r))
        if not args.no_memory:
            result["memory"][str(r)] = peak_memory(args, r)
    for r in args.ranks:
        print(f"one layer, r = {r} ...", flush=True)
        result["layer"].append(layer(args, r))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(render(result))
    if args.out.resolve() == RESULTS.resolve() and not args.quick:
        write_report(result, args.doc)
        print(f"wrote {args.out.relative_to(ROOT)} and rendered {args.doc.relative_to(ROOT)}")
    else:
        print(f"wrote {args.out} (docs not touched: --quick or another --out)")


if __name__ == "__main__":
    main()
