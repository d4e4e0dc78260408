"""benchmarks/perf.py renders docs/performance.md's tables from its result file only: the
statistics, the verdicts against the issue's targets and the marked section of the page."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench(name: str):
    """benchmarks/<name>.py as a module."""
    spec = importlib.util.spec_from_file_location(f"{name}_bench", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def perf():
    return _bench("perf")


def result(perf, loft_times, lora_times, layer_ratio):
    times = {"loft": loft_times, "lora": lora_times}
    whole = {
        "r": 16,
        "pairs": 56,
        "step": {m: perf.summary(t) for m, t in times.items()},
        "optimizer_step": {m: perf.summary([x / 4 for x in t]) for m, t in times.items()},
        "ratio": perf.paired(times, "loft", "lora"),
        "state_bytes": {"loft": 3 * 2**20, "lora": 2**20},
        "syncs_per_step": {"loft": {"count": 3}, "lora": {"count": 0}},
        "load_before": [1.0, 1.0, 1.0],
        "load_after": [1.0, 1.0, 1.0],
    }
    gemm = [0.01] * 5
    layer = {
        "r": 4,
        "shape": [64, 64],
        "threads": 1,
        "floor_multiply_adds": 64 * 64 * 18,
        "loft_step": perf.summary([g * layer_ratio for g in gemm]),
        "floor_gemm": perf.summary(gemm),
        "ratio": perf.paired({"a": [g * layer_ratio for g in gemm], "b": gemm}, "a", "b"),
        "sqrt_pass": perf.summary([0.004] * 5),
        "elementwise_passes": perf.summary([0.007] * 5),
        "block_rows": 8,
        "bound_sqrt": perf.summary([1.4] * 5),
        "bound_elementwise": perf.summary([1.7] * 5),
        "load_before": [2.0, 2.0, 2.0],
        "load_after": [2.0, 2.0, 2.0],
    }
    provenance = {
        "command": "benchmarks/perf.py --quick",
        "commit": "0123456789abcdef",
        "dirty": False,
        "date_utc": "2026-01-01 00:00",
        "versions": {"torch": "t", "transformers": "x", "peft": "p"},
        "machine": {"arch": "x86_64", "cpus": 2, "device": "cpu"},
        "threads": 1,
        "settings": {"batch": 1, "seq": 8, "samples": 5, "model": "smollm2-135m", "layers": 2, "device": "cpu", "dtype": "float32"},
    }
    return {"provenance": provenance, "whole_step": [whole], "layer": [layer], "memory": {}}


def test_statistics_and_verdicts(perf):
    s = perf.summary([3.0, 1.0, 2.0, 5.0, 4.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (3.0, 1.0, 5.0, 5)
    assert s["p25"] <= s["median"] <= s["p75"]
    fast = perf.render(result(perf, [1.05, 1.06, 1.07, 1.05, 1.06], [1.0] * 5, 1.2))
    assert "| 1.060 (" in fast and fast.count("| holds |") == 2
    slow = perf.render(result(perf, [1.5] * 5, [1.0] * 5, 2.0))
    assert "1.500 (1.500-1.500)x" in slow and slow.count("**does not hold**") == 2
    assert "3.0 / 1.0" in slow  # state MiB, LoFT / AdamW
    assert "0123456789" in slow and "5 interleaved samples" in slow
    # the eager bound: floor GEMM, the passes' times, the rows of their blocks and (floor + passes) / floor
    assert ("| 64 x 64, 1 thread(s) | 4 | 10.0 (10.0-10.0) | 4.0 (4.0-4.0) | 7.0 (7.0-7.0) | 8 | 1.40 (1.40-1.40) | "
            "1.70 (1.70-1.70) |") in slow


def test_results_without_the_eager_bound_still_render(perf):
    old = result(perf, [1.5] * 5, [1.0] * 5, 2.0)
    for key in ("sqrt_pass", "elementwise_passes", "block_rows", "bound_sqrt", "bound_elementwise"):
        del old["layer"][0][key]
    text = perf.render(old)
    assert "| 64 x 64, 1 thread(s) | 4 |" in text and "one sqrt pass" not in text


def test_report_replaces_only_the_marked_section(perf, tmp_path):
    doc = tmp_path / "page.md"
    doc.write_text(f"intro\n{perf.BEGIN}\nold table\n{perf.END}\noutro\n")
    perf.write_report(result(perf, [1.5] * 5, [1.0] * 5, 2.0), doc)
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith("\noutro\n") and "old table" not in text
    assert "1.500 (1.500-1.500)x" in text
    (tmp_path / "bare.md").write_text("no markers\n")
    with pytest.raises(SystemExit, match="markers"):
        perf.write_report(result(perf, [1.5] * 5, [1.0] * 5, 2.0), tmp_path / "bare.md")


# ----------------------------------------------------------------------------- benchmarks/sft_head.py
def renders_only_its_section(bench, result, tmp_path, expect: str) -> None:
    """``bench.render`` puts its table (holding ``expect``) between the page's markers, leaving the
    rest of the page, and refuses a page without them."""
    page = tmp_path / "page.md"
    page.write_text(f"intro\n{bench.BEGIN}\nNot measured yet.\n{bench.END}\noutro\n")
    bench.render(result, page)
    text = page.read_text()
    assert text.startswith("intro\n") and text.endswith("\noutro\n") and "Not measured" not in text
    assert text.count(bench.BEGIN) == 1 and expect in text
    (tmp_path / "bare.md").write_text("no markers\n")
    with pytest.raises(SystemExit, match="markers around the section"):
        bench.render(result, tmp_path / "bare.md")
    assert (tmp_path / "bare.md").read_text() == "no markers\n"


def _sft_result(ratios):
    row = {"method": "loft", "samples": len(ratios), "labelled_positions": [16] * len(ratios),
           "positions": [400 + i for i in range(len(ratios))],
           "median_seconds": {"every_position": 6.0, "completion_only": 4.0},
           "median_ratio_every_over_completion": sorted(ratios)[len(ratios) // 2], "ratios": ratios,
           "max_relative_loss_difference": 0.0}
    provenance = {"commit": "0123456789ab", "versions": {"torch": "t", "transformers": "x", "peft": "p"},
                  "threads": 1, "jobs": 1, "cpus": 2, "load_1min": 0.5}
    return {"benchmark": "benchmarks/sft_head.py", "model": "smollm2-135m", "data": "social_iqa_sft", "rank": 4,
            "batch_size": 8, "max_length": 128, "rows": [row], "provenance": provenance}


def test_sft_head_table_comes_from_the_result_and_replaces_only_the_marked_section(tmp_path):
    bench = _bench("sft_head")
    result = _sft_result([1.2, 1.5, 1.9])
    table = bench.table(result)
    assert "| loft | 401 | 16 | 6.00 | 4.00 | 1.50x (1.20-1.90) | 0 |" in table
    assert "`0123456789ab`" in table and "--max-length 128" in table
    renders_only_its_section(bench, result, tmp_path, "1.50x")


# ----------------------------------------------------------------------------- benchmarks/sft_step.py
def test_sft_step_table_comes_from_the_result_and_replaces_only_the_marked_section(tmp_path):
    bench = _bench("sft_step")
    seconds = {"loft": {"whole": [4.0, 4.4, 4.8], "forward_backward": [3.5, 3.9, 4.3], "optimizer": [0.4, 0.45, 0.5]},
               "lora": {"whole": [3.6, 4.0, 4.4], "forward_backward": [3.6, 3.97, 4.4], "optimizer": [0.02, 0.03, 0.04]}}
    result = {"benchmark": "benchmarks/sft_step.py", "model": "smollm2-135m", "data": "social_iqa_sft", "batch_size": 8,
              "max_length": 128, "provenance": _sft_result([1.0])["provenance"],
              "rows": [{"rank": 4, "pairs": 210, "samples": 15, "seconds": seconds,
                        "ratio_loft_over_lora": [1.05, 1.1, 1.15]}]}
    table = bench.table(result)
    assert ("| 4 | 210 | 15 | 4.40 (4.00-4.80) | 4.00 (3.60-4.40) | 1.100 (1.050-1.150)x | 3.90 / 3.97 | "
            "0.450 / 0.030 |") in table
    assert "`0123456789ab`" in table and "--max-length 128" in table
    renders_only_its_section(bench, result, tmp_path, "1.100")
