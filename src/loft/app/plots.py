"""Plots of the fine-tuning workflow (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plot_compare", "plot_loss_curve", "plot_lr_search", "plot_rounds"]


def plot_loss_curve(curve: Sequence[tuple[int, float]], path: str | Path, title: str) -> None:
    """Training loss against step, one line."""
    fig, ax = plt.subplots(figsize=(6, 4))
    if curve:
        steps, losses = zip(*curve)
        ax.plot(steps, losses, marker=".", linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_compare(rows: Sequence[Mapping], curves: Mapping[str, Sequence[tuple[int, float]]], path: str | Path, title: str) -> None:
    """Left: eval accuracy (eval perplexity where no run has an accuracy: instruction data with
    long answers) against rank, one line per method (full fine-tuning as a horizontal line).
    Right: the training loss curve of every run."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    key = "eval_accuracy" if any(r.get("eval_accuracy") is not None for r in rows) else "eval_perplexity"
    name = key.replace("eval_", "")
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "full"]
    for method in methods:
        pts = sorted((r["rank"], r[key]) for r in rows if r["method"] == method and r.get(key) is not None)
        left.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    for r in rows:
        if r["method"] == "full" and r.get(key) is not None:
            left.axhline(r[key], color="black", linestyle="--", linewidth=1, label="full fine-tuning")
    ranks = sorted({r["rank"] for r in rows if r["method"] != "full"})
    if ranks:
        left.set_xscale("log", base=2)
        left.set_xticks(ranks, [str(r) for r in ranks])
    left.set_xlabel("LoRA rank")
    left.set_ylabel(f"eval {name}")
    left.set_title(f"{name} vs rank")
    left.grid(alpha=0.3)
    left.legend()
    for name, curve in curves.items():
        if curve:
            steps, losses = zip(*curve)
            right.plot(steps, losses, linewidth=1, label=name)
    right.set_xlabel("step")
    right.set_ylabel("training loss")
    right.set_title("loss curves")
    right.grid(alpha=0.3)
    right.legend(fontsize="small", ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_rounds(runs: Mapping[str, Sequence[Mapping]], path: str | Path, title: str) -> None:
    """Federated runs (``loft federate``, benchmarks/federated.py). Left: eval accuracy against
    round (round 0: before training), one line per run. Right: the aggregation error per round
    (log scale; runs whose error is 0 throughout, exact aggregates, are left out)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, rounds in runs.items():
        left.plot([r["round"] for r in rounds], [r["eval_accuracy"] for r in rounds], marker=".", label=name)
        errs = [(r["round"], r["aggregation_error"]) for r in rounds if r.get("aggregation_error")]
        if errs:
            right.plot(*zip(*errs), marker=".", label=name)
    left.set_xlabel("round")
    left.set_ylabel("eval accuracy")
    left.grid(alpha=0.3)
    left.legend(fontsize="small")
    right.set_xlabel("round")
    right.set_ylabel("aggregation error ||mean B_k A_k - B A|| / ||mean B_k A_k||")
    if right.lines:
        right.set_yscale("log")
        right.legend(fontsize="small")
    right.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_lr_search(record: Mapping, path: str | Path, title: str) -> None:
    """A learning-rate search (``lr_search.json``'s record, loft/app/autolr.py): the validation
    accuracy (the loss where no trial has one) of every trial against its learning rate, one line
    per rung (its steps), the default rate and the chosen one marked, and the floor a choice must
    beat (where the record has one)."""
    trials = record["trials"]
    key = "metric" if any(t.get("metric") is not None for t in trials) else "loss"
    label = "validation accuracy" if key == "metric" else "validation loss"
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for rung in sorted({t["rung"] for t in trials}):
        pts = sorted((t["lr"], t[key]) for t in trials if t["rung"] == rung and t.get(key) is not None)
        if pts:
            steps = next(t["steps"] for t in trials if t["rung"] == rung)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{steps} step{'' if steps == 1 else 's'}")
    ax.axvline(record["default_lr"], color="grey", linestyle=":", linewidth=1, label=f"default {record['default_lr']:g}")
    if record.get("lr") is not None:
        kept = " (default kept)" if record.get("kept_default") else ""
        ax.axvline(record["lr"], color="black", linestyle="--", linewidth=1, label=f"chosen {record['lr']:g}{kept}")
    if key == "metric" and record.get("floor") is not None:
        ax.axhline(record["floor"]["threshold"], color="tab:red", linestyle=":", linewidth=1,
                   label=f"floor {record['floor']['threshold']:.3f}")
    ax.set_xscale("log")
    ax.set_xticks(record["lrs"], [f"{lr:g}" for lr in record["lrs"]], rotation=30)
    ax.minorticks_off()
    ax.set_xlabel("learning rate")
    ax.set_ylabel(label)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
