"""Issue 32: long jobs on shared machines. Interruptions after the last step, run folders in use
by another process, SIGTERM, a full disk, damaged adapters, reruns of ``loft federate``.

Every run is the tiny BERT of ``_tiny.py`` for a few steps; signals are real (sent to this
process or to a subprocess); a full disk is simulated by a writer that raises
``OSError(ENOSPC)`` at a chosen file (this machine cannot mount a small file system).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from _tiny import sentiment_files
from safetensors.torch import load_file
from transformers import TrainerCallback

import loft.app.compare
import loft.app.finetune
from loft.app.cli import main
from loft.app.errors import RunInterrupted
from loft.app.finetune import FinetuneConfig, finetune

STEPS = 3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return sentiment_files(tmp_path_factory.mktemp("data"), 40, 8)


pytestmark = pytest.mark.usefixtures("offline")


def args(bert, data, out, *extra):
    return [str(a) for a in ("finetune", "--model", bert, "--data", data[0], "--eval-data", data[1], "-o", out,
                             "--max-steps", STEPS, "-b", 8, "--lr", "5e-3", "--quiet", *extra)]


def config(bert, data, out, **kw):
    return FinetuneConfig(model=str(bert), data=str(data[0]), eval_data=str(data[1]), output_dir=str(out),
                          max_steps=STEPS, batch_size=8, lr=5e-3, **kw)


def adapter(out):
    return load_file(str(Path(out) / "adapter_model.safetensors"))


def same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def one_line(capsys, argv, status):
    """Run ``loft``; assert ``status`` and one line on stderr, no traceback; return that line."""
    assert main([str(a) for a in argv]) == status
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("loft: "), err
    return err


@pytest.fixture(scope="module")
def straight(bert, data, tmp_path_factory):
    """The uninterrupted run the others are compared with."""
    out = tmp_path_factory.mktemp("straight") / "run"
    return out, finetune(config(bert, data, out), progress=False)


def ctrl_c_in_evaluation(monkeypatch, which: int):
    """A Ctrl-C (KeyboardInterrupt) at the start of the ``which``-th evaluation of the process."""
    from loft.app.tasks.classification import ClassificationTask

    evaluate, calls = ClassificationTask.evaluate, []

    def patched(self, *a, **kw):
        calls.append(1)
        if len(calls) == which:
            raise KeyboardInterrupt
        return evaluate(self, *a, **kw)

    monkeypatch.setattr(ClassificationTask, "evaluate", patched)


# ----------------------------------------------------------------------------- 1. resume after the last step
def test_resume_of_a_run_interrupted_after_its_last_step_trains_no_extra_step(monkeypatch, straight, bert, data,
                                                                             tmp_path):
    """Ctrl-C during the final evaluation keeps the checkpoint of the last step; --resume evaluates
    and saves without training step N+1: metrics and adapter as the uninterrupted run's."""
    out = tmp_path / "run"
    ctrl_c_in_evaluation(monkeypatch, 2)  # the evaluation after training
    with pytest.raises(RunInterrupted, match="evaluating after training"):
        finetune(config(bert, data, out), progress=False)
    assert (out / "checkpoints" / f"checkpoint-{STEPS}").is_dir()
    monkeypatch.undo()
    resumed = finetune(config(bert, data, out), resume=True, progress=False)
    reference = straight[1]
    assert resumed["resumed_from"].endswith(f"checkpoint-{STEPS}")
    for key in ("steps", "epochs", "train_loss", "train_loss_last", "loss_curve", "eval_loss", "eval_accuracy"):
        assert resumed[key] == reference[key], key
    assert same_tensors(adapter(out), adapter(straight[0]))


# ----------------------------------------------------------------------------- 2. one process per run folder
TESTS = Path(__file__).parent


def start_loft(argv, **popen):
    """``loft`` in another process (this checkout's source)."""
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(TESTS.parent / "src"))
    return subprocess.Popen([sys.executable, "-m", "loft.app", *map(str, argv)], env=env, **popen)


def wait_for(path: Path, proc, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the other process ended before {what}"
        assert time.monotonic() < deadline, f"the other process never reached {what}"
        time.sleep(0.2)


def test_a_second_run_into_a_folder_a_live_run_writes_is_refused_and_a_killed_ones_lock_blocks_nothing(
        capsys, bert, data, tmp_path):
    """Run A trains into DIR (another process); run B, other settings and --overwrite, into DIR is
    refused, naming A's pid, and changes nothing; so is a plain --resume. Once A is killed (-9),
    its lock is gone with it, and B runs. A, a fresh `loft finetune --quiet` process, printed
    nothing on stderr (bitsandbytes' and kernels' notices about a hub kernel loft does not use
    were printed by every command that loads a model)."""
    import subprocess

    out = tmp_path / "run"
    a = start_loft(args(bert, data, out)[:-1] + ["--max-steps", "100000", "--quiet"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(out / "eval_before.json", a, "training")
        listing = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
        for extra in (["--rank", "2", "--overwrite"], ["--resume"], []):
            err = one_line(capsys, args(bert, data, out, *extra), 2)
            assert f"is in use: loft process {a.pid}" in err and f"kill {a.pid}" in err, err
            assert "--overwrite" not in err.split("in use")[1], err  # never suggests replacing a live run
        assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == listing
        assert a.poll() is None  # A trains on
    finally:
        a.kill()
        a.wait(60)
    assert a.stderr.read() == ""  # its training had started: the libraries were loaded
    assert main(args(bert, data, out, "--rank", "2", "--overwrite")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rank"] == 2 and metrics["steps"] == STEPS
    assert json.loads((out / "run_config.json").read_text())["settings"]["rank"] == 2
    assert not (out / ".loft.lock").exists()  # released at the end of the run


def test_the_lock_is_taken_after_the_checks_and_refuses_a_folder_that_changed_meanwhile(bert, data, tmp_path):
    from loft.app.errors import LoftUsageError
    from loft.app.rundir import check_output_dir, take_output_dir

    out = tmp_path / "run"
    identity = config(bert, data, out).identity()
    plan = check_output_dir(out, identity, overwrite=False, resume=False)
    assert plan.action == "new" and not out.exists()  # the checks write nothing
    lock = take_output_dir(out, plan.snapshot)
    try:
        with pytest.raises(LoftUsageError, match="is in use"):
            take_output_dir(out, plan.snapshot)  # a second handle: refused, even in this process
    finally:
        lock.release()
    assert not (out / ".loft.lock").exists()
    (out / "run_config.json").write_text("{}")  # another process started a run meanwhile
    with pytest.raises(LoftUsageError, match="changed while this command was loading"):
        take_output_dir(out, plan.snapshot)


# ----------------------------------------------------------------------------- 3. loft federate reruns
def fake_simulation(monkeypatch, accuracy: float, interrupt_after: int | None = None):
    """``loft federate`` with Flower's simulation replaced by rounds made up here (this tests the
    output folder; tests/test_flower.py runs the real simulation): round records with
    ``accuracy``, and a Ctrl-C after round ``interrupt_after``."""
    import loft.app.federated.run as run_mod

    def simulate(cfg, bench, split, record):
        for r in range(cfg.rounds + 1):
            record({"round": r, "eval_accuracy": accuracy, "eval_loss": 0.7, "train_loss": None if r == 0 else 0.6,
                    "aggregation_error": None if r == 0 else 1e-3, "bytes_up": [10] * cfg.clients,
                    "bytes_down": 10, "seconds": 0.1}, {})
            if r == interrupt_after:
                raise KeyboardInterrupt
        return 1.0, []

    monkeypatch.setattr(run_mod, "_simulate", simulate)


def test_an_interrupted_rerun_of_a_finished_federate_run_keeps_its_results(capsys, monkeypatch, bert, data, tmp_path):
    out = tmp_path / "fed"
    argv = ["federate", "--model", bert, "--data", data[0], "--eval-data", data[1], "--clients", "2", "--rounds", "2",
            "--rank", "2", "-b", "8", "-o", out, "--quiet"]
    fake_simulation(monkeypatch, 0.25)
    assert main([str(a) for a in argv]) == 0
    capsys.readouterr()
    finished = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert {"metrics.json", "rounds.jsonl", "accuracy.png", "run_config.json"} <= finished.keys()
    fake_simulation(monkeypatch, 0.75, interrupt_after=1)
    err = one_line(capsys, argv, 130)  # the same settings, no --overwrite: a rerun, Ctrl-C in round 1
    assert f"The finished run in {out} is unchanged" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == finished  # its history is intact
    fake_simulation(monkeypatch, 0.75)
    assert main([str(a) for a in argv]) == 0  # a complete rerun replaces it
    assert [json.loads(line)["eval_accuracy"] for line in (out / "rounds.jsonl").read_text().splitlines()] == [0.75] * 3
    assert json.loads((out / "metrics.json").read_text())["eval_accuracy"] == 0.75
    assert not (out / ".incoming").exists()


def test_an_interrupted_new_federate_run_keeps_its_rounds_and_a_plain_rerun_starts_again(capsys, monkeypatch, bert,
                                                                                         data, tmp_path):
    out = tmp_path / "fed"
    argv = ["federate", "--model", bert, "--data", data[0], "--eval-data", data[1], "--clients", "2", "--rounds", "2",
            "--rank", "2", "-b", "8", "-o", out, "--quiet"]
    fake_simulation(monkeypatch, 0.25, interrupt_after=1)
    err = one_line(capsys, argv, 130)
    assert f"{out / 'rounds.jsonl'} holds the finished rounds" in err and "run the same command again" in err
    assert [json.loads(line)["round"] for line in (out / "rounds.jsonl").read_text().splitlines()] == [0, 1]
    fake_simulation(monkeypatch, 0.5)
    assert main([str(a) for a in argv]) == 0  # no --overwrite needed: the unfinished run had nothing to continue
    assert json.loads((out / "metrics.json").read_text())["eval_accuracy"] == 0.5


# ----------------------------------------------------------------------------- 6. SIGTERM as Ctrl-C
def sigterm():
    os.kill(os.getpid(), signal.SIGTERM)  # what kill, docker stop, systemd and Slurm send
    time.sleep(0.5)  # the handler runs at the next bytecode boundary


class SigtermAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            sigterm()


def test_sigterm_during_training_saves_a_checkpoint_and_resume_is_exact(capsys, monkeypatch, straight, bert, data,
                                                                        tmp_path):
    out = tmp_path / "run"
    original = loft.app.finetune.finetune
    monkeypatch.setattr(loft.app.finetune, "finetune",
                        lambda cfg, **kw: original(cfg, **{**kw, "callbacks": [SigtermAt(1)]}))
    err = one_line(capsys, args(bert, data, out), 143)
    assert err.startswith("loft: Terminated (SIGTERM) at step 2/3; checkpoint saved in") and "--resume" in err, err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back
    monkeypatch.undo()
    assert main(args(bert, data, out, "--resume")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from"].endswith("checkpoint-2") and metrics["steps"] == STEPS
    assert metrics["loss_curve"] == [list(p) for p in straight[1]["loss_curve"]]
    assert same_tensors(adapter(out), adapter(straight[0]))


def test_sigterm_before_the_first_checkpoint_leaves_the_folder_as_before(capsys, monkeypatch, bert, data, tmp_path):
    from loft.app.tasks.classification import ClassificationTask

    evaluate = ClassificationTask.evaluate

    def evaluate_then_sigterm(self, *a, **kw):
        result = evaluate(self, *a, **kw)
        sigterm()
        return result

    monkeypatch.setattr(ClassificationTask, "evaluate", evaluate_then_sigterm)
    out = tmp_path / "run"
    err = one_line(capsys, args(bert, data, out), 143)
    assert "Terminated (SIGTERM) while evaluating before training" in err and "nothing was kept" in err, err
    assert not out.exists()  # a plain rerun starts cleanly


@pytest.mark.parametrize("rerun", ["plain", "--resume"])
def test_a_run_killed_before_its_first_checkpoint_is_started_again(rerun, capsys, bert, data, tmp_path):
    """What kill -9 (or a crash) leaves before the first checkpoint: run_config.json and
    eval_before.json. Neither a plain rerun nor --resume needs --overwrite for it."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "run_config.json").write_text(json.dumps({"settings": config(bert, data, out).identity(), "processes": 1}))
    (out / "eval_before.json").write_text("{}")
    assert main(args(bert, data, out, *([] if rerun == "plain" else ["--resume"]))) == 0
    assert "stopped before its first checkpoint; starting it again" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["steps"] == STEPS


def test_sigterm_between_the_runs_of_a_comparison(capsys, monkeypatch, bert, data, tmp_path):
    out = tmp_path / "cmp"
    argv = ["compare", "--model", bert, "--data", data[0], "--eval-data", data[1], "--methods", "lora", "--ranks", "1,2",
            "--no-full", "--max-steps", "2", "-b", "8", "--quiet", "-o", out]
    original = loft.app.compare.finetune

    def sigterm_after_the_first(cfg, **kw):
        metrics = original(cfg, **kw)
        if cfg.rank == 1:
            sigterm()
        return metrics

    monkeypatch.setattr(loft.app.compare, "finetune", sigterm_after_the_first)
    err = one_line(capsys, argv, 143)
    assert "Terminated (SIGTERM); 1 of 2 runs" in err and "--resume" in err, err
    monkeypatch.undo()
    assert main([str(a) for a in argv + ["--resume"]]) == 0
    assert (out / "compare.csv").read_text().count("\n") == 3


def test_ctrl_c_after_the_results_are_saved_says_they_are_complete(capsys, monkeypatch, bert, data, tmp_path):
    """Ctrl-C just after "Saved to" (while the command shuts down): status 130 and one line that
    says the results are complete."""
    import loft.app.launch

    def shutdown_then_ctrl_c():
        raise KeyboardInterrupt

    out = tmp_path / "run"
    monkeypatch.setattr(loft.app.launch, "shutdown_processes", shutdown_then_ctrl_c)
    assert main(args(bert, data, out)) == 130
    captured = capsys.readouterr()
    assert captured.out.rstrip().splitlines()[-1].startswith(f"Saved to {out}/")
    assert captured.err.strip() == f"loft: Interrupted after the run finished; its results in {out} are complete."


# ----------------------------------------------------------------------------- 4. a full disk
def no_space(path):
    """Half a file, then what a full disk raises."""
    import errno

    Path(path).write_bytes(b"x" * 100)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def save_every_2_steps(monkeypatch, module=loft.app.finetune):
    original = loft.app.finetune.finetune

    def patched(cfg, **kw):
        cfg.save_steps = 2
        return original(cfg, **kw)

    monkeypatch.setattr(module, "finetune", patched)


def test_a_full_disk_while_writing_a_checkpoint(capsys, monkeypatch, straight, bert, data, tmp_path):
    """No space left while checkpoint-3's tokenizer is saved (the reported case): one line, status 1,
    the partial checkpoint removed (it would keep the disk full), checkpoint-2 kept and complete;
    --resume then ends where the uninterrupted run does."""
    from transformers import PreTrainedTokenizerBase

    from loft.app.rundir import checkpoint_damage

    out = tmp_path / "run"
    save = PreTrainedTokenizerBase.save_pretrained

    def full_at_checkpoint_3(self, folder, *a, **kw):
        if "checkpoint-3" in str(folder):
            no_space(Path(folder) / "tokenizer.json")
        return save(self, folder, *a, **kw)

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", full_at_checkpoint_3)
    save_every_2_steps(monkeypatch)
    err = one_line(capsys, args(bert, data, out), 1)
    assert err.startswith("loft: error: Could not write the run's files: No space left on device while writing "
                          "checkpoint-3"), err
    assert "checkpoint-2 is kept; continue with the same command plus --resume" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2"]  # no .incoming left
    assert checkpoint_damage(out / "checkpoints" / "checkpoint-2") is None
    monkeypatch.undo()
    assert main(args(bert, data, out, "--resume")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from"].endswith("checkpoint-2")
    assert metrics["loss_curve"] == [list(p) for p in straight[1]["loss_curve"]]
    assert same_tensors(adapter(out), adapter(straight[0]))


def test_a_full_disk_while_a_rerun_writes_its_results_keeps_the_earlier_ones(capsys, monkeypatch, bert, data,
                                                                             tmp_path):
    import loft.app.plots

    out = tmp_path / "run"
    assert main(args(bert, data, out)) == 0
    capsys.readouterr()
    finished = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    monkeypatch.setattr(loft.app.plots, "plot_loss_curve", lambda curve, path, title: no_space(path))
    err = one_line(capsys, args(bert, data, out), 1)  # a rerun of the finished run
    assert "No space left on device while writing the results" in err and f"checkpoint-{STEPS} is kept" in err, err
    assert "earlier finished results" in err and "unchanged" in err
    for name, content in finished.items():
        assert (out / name).read_bytes() == content, name  # the finished run's files, intact
    assert not (out / ".incoming").exists()  # the partial results removed


def test_torch_failing_to_write_a_checkpoint_file_is_a_write_failure(capsys, monkeypatch, bert, data, tmp_path):
    """torch.save's writer names no cause (``unexpected pos``, seen on a full file system)."""
    out = tmp_path / "run"
    save = torch.save

    def failing(obj, f, *a, **kw):
        if str(f).endswith("optimizer.pt"):
            Path(f).write_bytes(b"PK")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        return save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", failing)
    err = one_line(capsys, args(bert, data, out), 1)
    assert "torch could not write the file while writing checkpoint-3" in err and "nothing was kept" in err, err
    assert not out.exists()  # a new run that reached no checkpoint leaves nothing behind


def test_write_failure_names_the_cause_of_each_writer(tmp_path):
    import errno

    from safetensors import SafetensorError

    from loft.app.atomic import write_failure

    assert write_failure(OSError(errno.ENOSPC, "No space left on device"), tmp_path) == "No space left on device"
    assert write_failure(SafetensorError("Error while serializing: I/O error: Disk quota exceeded (os error 122)"),
                         tmp_path) == os.strerror(122)
    assert write_failure(RuntimeError("basic_ios::clear: iostream error"), tmp_path) == "torch could not write the file"
    assert write_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"), tmp_path) is None  # a bug
    assert write_failure(ValueError("x"), tmp_path) is None


def test_a_full_disk_at_the_end_of_a_federate_run_keeps_its_rounds(capsys, monkeypatch, bert, data, tmp_path):
    import loft.app.plots

    out = tmp_path / "fed"
    fake_simulation(monkeypatch, 0.25)
    monkeypatch.setattr(loft.app.plots, "plot_rounds", lambda rounds, path, title: no_space(path))
    err = one_line(capsys, ["federate", "--model", bert, "--data", data[0], "--eval-data", data[1], "--clients", "2",
                            "--rounds", "2", "--rank", "2", "-b", "8", "-o", out, "--quiet"], 1)
    assert "No space left on device while writing the results" in err and "holds the finished rounds" in err, err
    assert [json.loads(line)["round"] for line in (out / "rounds.jsonl").read_text().splitlines()] == [0, 1, 2]
    assert not (out / "metrics.json").exists() and not (out / ".incoming").exists()


def test_a_full_disk_while_writing_a_comparisons_table_keeps_its_runs(capsys, monkeypatch, bert, data, tmp_path):
    import loft.app.plots

    out = tmp_path / "cmp"
    argv = ["compare", "--model", bert, "--data", data[0], "--eval-data", data[1], "--methods", "lora", "--ranks", "1",
            "--no-full", "--max-steps", "2", "-b", "8", "--quiet", "-o", out]
    monkeypatch.setattr(loft.app.plots, "plot_compare", lambda rows, curves, path, title: no_space(path))
    err = one_line(capsys, argv, 1)
    assert "No space left on device while writing the comparison's table" in err and "--resume" in err, err
    finished = (out / "lora-r1" / "metrics.json").read_bytes()
    assert not [p for p in out.iterdir() if p.name.startswith(".compare")]  # no partial plot left
    monkeypatch.undo()
    assert main([str(a) for a in argv + ["--resume"]]) == 0
    assert (out / "lora-r1" / "metrics.json").read_bytes() == finished and (out / "compare.png").is_file()


def test_every_result_file_is_readable_by_others(straight):
    """adapter_model.safetensors was written 0600 (safetensors makes its files private) where every
    other result file is 0644."""
    import stat

    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in straight[0].iterdir() if p.is_file()}
    assert "adapter_model.safetensors" in modes and set(modes.values()) == {0o644}, modes

