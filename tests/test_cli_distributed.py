"""``loft finetune`` on 2 CPU processes: ``torchrun`` and ``accelerate launch`` (DDP over gloo).

Every launch is a real ``torchrun --nproc_per_node 2 -m loft.app finetune ...`` subprocess on the
tiny BERT of ``_tiny.py`` (one thread per process, a free port on 127.0.0.1).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _ranks import free_port
from _tiny import make_bert, sentiment_records, write_jsonl
from safetensors.torch import load_file

from loft.app.cli import main
from loft.app.finetune import FinetuneConfig, finetune

pytestmark = pytest.mark.slow  # real multi-process launches (pyproject.toml: markers)

BIN = Path(sys.executable).parent
STEPS, BATCH = 8, 8
TIMEOUT = 300  # seconds per launch; a launch takes ~10-20 s on 2 cores


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def torchrun(*args, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env or _env())


def make_setup(root: Path) -> dict:
    """A tiny BERT, data and the `loft finetune` options every multi-process CLI test shares."""
    bert = make_bert(root / "bert")
    # 48 examples: 6 full global batches of 8 per epoch, so one process and two see the same batches
    train = write_jsonl(root / "train.jsonl", sentiment_records(48))
    test = write_jsonl(root / "test.jsonl", sentiment_records(24, seed=1))
    args = ["--model", bert, "--data", train, "--eval-data", test, "--max-steps", STEPS, "--batch-size", BATCH,
            "--lr", "5e-3", "--head-lr", "1e-2", "--quiet"]
    return {"root": root, "bert": bert, "train": train, "test": test, "args": args}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("ddp"))


@pytest.fixture(scope="module")
def straight(setup):
    """One uninterrupted 2-process torchrun run."""
    out = setup["root"] / "straight"
    proc = torchrun("-m", "loft.app", "finetune", *setup["args"], "-o", out)
    return out, proc


def summary_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("Saved to ")]


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)) for k in a)


def test_torchrun_two_processes_write_one_run(setup, straight):
    out, proc = straight
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(summary_lines(proc.stdout)) == 1, proc.stdout  # rank 1 prints nothing
    assert proc.stdout.count("eval accuracy") == 1
    for name in ("adapter_config.json", "adapter_model.safetensors", "metrics.json", "loss_curve.png",
                 "run_config.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert not (out / "checkpoints").exists() and not (out / "eval_before.json").exists()
    m = json.loads((out / "metrics.json").read_text())
    assert m["processes"] == 2 and m["steps"] == STEPS and m["batch_size"] == BATCH
    assert json.loads((out / "run_config.json").read_text())["processes"] == 2
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert all(torch.isfinite(t).all() for t in adapter(out).values())


def test_two_processes_match_one_process_with_the_same_global_batch(setup, straight, tmp_path):
    """--batch-size is the global batch: 2 processes x 4 examples per step = 1 process x 8."""
    out, proc = straight
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((out / "metrics.json").read_text())
    common = dict(model=str(setup["bert"]), data=str(setup["train"]), eval_data=str(setup["test"]), max_steps=STEPS,
                  lr=5e-3, head_lr=1e-2)
    # The same arithmetic on one process: 2 micro-batches of 4, gradients averaged, one step. Same examples in every step: accelerate hands rank r every other
    # per-process batch of the one seeded shuffle. Only the order of one float32 addition differs.
    accum = finetune(FinetuneConfig(batch_size=BATCH // 2, grad_accum=2, output_dir=str(tmp_path / "accum"), **common),
                     progress=False)
    assert max_rel_diff(adapter(out), adapter(tmp_path / "accum")) < 1e-5
    assert two["eval_loss"] == pytest.approx(accum["eval_loss"], rel=1e-6)
    assert two["train_loss"] == pytest.approx(accum["train_loss"], rel=1e-6)
    # One process with batches of 8: one 8-example mean instead of two 4-example means averaged
    # rounds differently in float32, and Adam's normalisation amplifies that in the layers whose
    # gradients are tiny (the factors of this random model can differ by O(1) there), so compare
    # what training achieved: the losses.
    one = finetune(FinetuneConfig(batch_size=BATCH, output_dir=str(tmp_path / "one"), **common), progress=False)
    # (measured: 3e-6 and 6e-5 relative)
    assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-3)
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-3)
    assert [s for s, _ in two["loss_curve"]] == [s for s, _ in one["loss_curve"]]
    # step 1: the same examples and weights, so the same loss up to rounding
    assert two["loss_curve"][0][1] == pytest.approx(one["loss_curve"][0][1], rel=1e-5)


def test_torchrun_ctrl_c_checkpoint_by_rank_0_then_resume_matches_uninterrupted(setup, straight):
    out = setup["root"] / "interrupted"
    cmd = ["-m", "loft.app", "finetune", *setup["args"], "-o", out]
    proc = torchrun(str(Path(__file__).with_name("ctrl_c_cli.py")), *cmd[2:], env=_env(LOFT_TEST_CTRL_C_STEP="3"))
    assert proc.returncode != 0
    assert proc.stderr.count("loft: Interrupted at step") == 1, proc.stderr[-3000:]  # printed by rank 0 only
    assert not (out / "metrics.json").exists()
    # one checkpoint, written once: rank 0's model / optimizer / scheduler / trainer state, plus the
    # random state each rank saves for itself (rng_state_<rank>.pth)
    saved = sorted((out / "checkpoints").iterdir())
    assert len(saved) == 1 and re.fullmatch(r"checkpoint-\d+", saved[0].name), saved
    ckpt, step = saved[0], int(saved[0].name.split("-")[1])
    assert 3 <= step < STEPS
    files = sorted(p.name for p in ckpt.iterdir())
    for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json",
                 "rng_state_0.pth", "rng_state_1.pth"):
        assert name in files, files
    assert not [f for f in files if f.startswith("rng_state") and f not in ("rng_state_0.pth", "rng_state_1.pth")]
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == step
    assert torch.load(ckpt / "optimizer.pt", weights_only=False)["state"]  # loads, and holds LoFT's moments
    assert all(torch.isfinite(t).all() for t in load_file(ckpt / "adapter_model.safetensors").values())

    # without --resume rank 0 refuses to touch the unfinished run; rank 1 stops with it (no hang),
    # the message is printed once, the checkpoint is kept
    again = torchrun(*cmd)
    assert again.returncode != 0
    assert again.stderr.count("loft: error: Output directory") == 1, again.stderr[-3000:]
    assert "Continue it with the same command plus --resume" in again.stderr
    assert sorted((out / "checkpoints").iterdir()) == saved

    resumed = torchrun(*cmd, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert len(summary_lines(resumed.stdout)) == 1
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == STEPS and m["resumed_from"].endswith(ckpt.name)
    assert not (out / "checkpoints").exists()
    # Same float32 operations in the same order on the same data as the uninterrupted run (the
    # checkpoint holds the exact optimizer state and each rank's random state), so the weights
    # agree to rounding; 1e-6 relative leaves room for nothing more than a differently ordered sum.
    straight_out, straight_proc = straight
    assert straight_proc.returncode == 0, straight_proc.stderr[-3000:]
    assert max_rel_diff(adapter(out), adapter(straight_out)) < 1e-6
    straight_metrics = json.loads((straight_out / "metrics.json").read_text())
    assert m["eval_loss"] == pytest.approx(straight_metrics["eval_loss"], rel=1e-6)


def test_torchrun_sigterm_checkpoint_by_rank_0_then_resume_matches_uninterrupted(setup, straight):
    """SIGTERM to the torchrun launcher (kill, docker stop, a Slurm time limit), which forwards it
    to every worker: as Ctrl-C, the ranks agree on a step, save its checkpoint and stop; one line
    on stderr; --resume ends where the uninterrupted run does."""
    out = setup["root"] / "terminated"
    cmd = ["-m", "loft.app", "finetune", *setup["args"], "-o", out]
    proc = torchrun(str(Path(__file__).with_name("ctrl_c_cli.py")), *cmd[2:],
                    env=_env(LOFT_TEST_CTRL_C_STEP="3", LOFT_TEST_SIGNAL="SIGTERM"))
    assert proc.returncode != 0
    assert proc.stderr.count("loft: Terminated (SIGTERM) at step") == 1, proc.stderr[-3000:]
    # the workers stop cleanly; the launcher itself ends with its SignalException's traceback
    assert not re.search(r'File "[^"]*/loft/', proc.stderr), proc.stderr[-3000:]
    (ckpt,) = sorted((out / "checkpoints").iterdir())
    assert {"rng_state_0.pth", "rng_state_1.pth", "optimizer.pt"} <= {p.name for p in ckpt.iterdir()}
    resumed = torchrun(*cmd, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == STEPS and m["resumed_from"].endswith(ckpt.name)
    straight_out, _ = straight
    assert max_rel_diff(adapter(out), adapter(straight_out)) < 1e-6


def test_accelerate_launch_two_cpu_processes(setup, straight):
    """``accelerate launch --multi_gpu --num_processes 2`` runs torchrun's launcher underneath; on a
    machine without GPUs loft trains on the CPU over gloo, the same run as torchrun's."""
    out = setup["root"] / "accelerate"
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "-m", "loft.app", "finetune", *map(str, setup["args"]), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(summary_lines(proc.stdout)) == 1, proc.stdout
    m = json.loads((out / "metrics.json").read_text())
    assert m["processes"] == 2 and m["steps"] == STEPS
    straight_out, straight_proc = straight
    assert straight_proc.returncode == 0
    assert max_rel_diff(adapter(out), adapter(straight_out)) < 1e-6


def test_batch_size_not_divisible_by_the_processes_is_refused(setup, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun --nproc_per_node 2 sets; refused before any launch
    monkeypatch.setenv("RANK", "0")
    out = tmp_path / "odd"
    args = [str(a) for a in setup["args"]]
    args[args.index("--batch-size") + 1] = "9"
    assert main(["finetune", *args, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--batch-size 9 cannot be split evenly over 2 processes" in err and "e.g. 8 or 10" in err
    assert not out.exists()
