"""``loft finetune --fsdp`` on 2 CPU processes (``accelerate launch`` and ``torchrun``): Trainer's
FSDP2 (fully_shard on each transformer block, then the root) over gloo, with LoFT's owners, on the
tiny BERT and settings of tests/test_cli_distributed.py."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from test_cli_distributed import BATCH, BIN, STEPS, TIMEOUT, _env, adapter, free_port, make_setup, max_rel_diff, summary_lines, torchrun

from loft.app.cli import main
from loft.app.finetune import FinetuneConfig, finetune

pytestmark = pytest.mark.slow  # real multi-process launches (pyproject.toml: markers)


@pytest.fixture(scope="module")
def straight(setup):
    """One uninterrupted --fsdp run, launched with ``accelerate launch --multi_gpu --num_processes 2``
    (torchrun's launcher underneath; on CPU loft trains over gloo)."""
    out = setup["root"] / "straight"
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "-m", "loft.app", "finetune", *map(str, setup["args"]), "--fsdp", "-o", str(out)]
    return out, subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=_env())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny BERT and data of tests/test_cli_distributed.py, the same options."""
    return make_setup(tmp_path_factory.mktemp("fsdp"))


def test_fsdp_run_writes_the_adapter_and_equals_one_process_with_the_same_arithmetic(setup, straight, tmp_path):
    """The adapter (gathered from the shards, written by rank 0) equals one process with 2 accumulated
    micro-batches of 4 (what DDP equals in tests/test_cli_distributed.py): FSDP2 reduce-scatters the
    same averaged gradients and the owners step each pair on its whole factors."""
    out, proc = straight
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(summary_lines(proc.stdout)) == 1, proc.stdout
    assert not (out / "checkpoints").exists()
    m = json.loads((out / "metrics.json").read_text())
    assert m["processes"] == 2 and m["steps"] == STEPS and m["eval_accuracy_before"] is None  # (not with --fsdp)
    a = adapter(out)
    assert all(torch.isfinite(t).all() for t in a.values())
    accum = finetune(FinetuneConfig(model=str(setup["bert"]), data=str(setup["train"]), eval_data=str(setup["test"]),
                                    max_steps=STEPS, lr=5e-3, head_lr=1e-2, batch_size=BATCH // 2, grad_accum=2,
                                    output_dir=str(tmp_path / "accum")), progress=False)
    assert max_rel_diff(a, adapter(tmp_path / "accum")) < 1e-5, max_rel_diff(a, adapter(tmp_path / "accum"))
    assert m["train_loss"] == pytest.approx(accum["train_loss"], rel=1e-6)
    assert m["eval_loss"] == pytest.approx(accum["eval_loss"], rel=1e-6)


def test_fsdp_without_a_distributed_launch_is_refused(setup, tmp_path, capsys):
    out = tmp_path / "one"
    assert main(["finetune", *map(str, setup["args"]), "--fsdp", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--fsdp shards the model over several processes" in err and "torchrun" in err
    assert not out.exists()


@pytest.mark.parametrize("extra, message", [
    (["--method", "dora"], "--fsdp with --method dora (or dora in loft compare's --methods) is not supported"),
    (["--method", "pissa"], "--fsdp with --method pissa"),
    (["--load-in-4bit"], "--fsdp with --load-in-4bit is not supported"),
])
def test_fsdp_with_an_untested_method_or_a_quantized_base_is_refused(setup, tmp_path, monkeypatch, capsys, extra,
                                                                      message):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    out = tmp_path / "refused"
    assert main(["finetune", *map(str, setup["args"]), "--fsdp", *extra, "-o", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_fsdp_ctrl_c_then_resume_matches_the_uninterrupted_run(setup, straight):
    """Ctrl-C at step 3: one checkpoint with Accelerate's DCP folders (model and LoFT's optimizer
    state); --resume on 2 processes ends with the uninterrupted --fsdp run's adapter."""
    out = setup["root"] / "interrupted"
    cmd = ["finetune", *setup["args"], "--fsdp", "-o", out]
    proc = torchrun(str(Path(__file__).with_name("ctrl_c_cli.py")), *cmd, env=_env(LOFT_TEST_CTRL_C_STEP="3"))
    assert proc.returncode != 0
    assert proc.stderr.count("loft: Interrupted at step") == 1, proc.stderr[-3000:]
    (ckpt,) = sorted((out / "checkpoints").iterdir())
    files = {p.name for p in ckpt.iterdir()}
    assert {"optimizer_0", "scheduler.pt", "rng_state_0.pth", "rng_state_1.pth"} <= files, files
    resumed = torchrun("-m", "loft.app", *cmd, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["steps"] == STEPS
    straight_out, proc = straight
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert max_rel_diff(adapter(out), adapter(straight_out)) < 1e-6  # (measured: bit-identical)



def test_compare_with_fsdp_on_two_processes(setup):
    """``loft compare --fsdp`` under torchrun: each run of the comparison (loft, lora and full
    fine-tuning) trains sharded with FSDP2 on both processes, and rank 0 writes the table."""
    import csv

    out = setup["root"] / "compare"
    proc = torchrun("-m", "loft.app", "compare", "--model", setup["bert"], "--data", setup["train"], "--eval-data",
                    setup["test"], "--methods", "loft,lora", "--ranks", "2", "--max-steps", 3, "--batch-size", BATCH,
                    "--fsdp", "--quiet", "-o", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert [(r["method"], r["rank"]) for r in rows] == [("loft", "2"), ("lora", "2"), ("full", "")]
    for run in ("loft-r2", "lora-r2"):
        m = json.loads((out / run / "metrics.json").read_text())
        assert m["processes"] == 2 and m["steps"] == 3 and 0 <= m["eval_accuracy"] <= 1
        assert all(torch.isfinite(t).all() for t in adapter(out / run).values())
