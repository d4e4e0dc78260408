"""Issue #11: no lost results, no tracebacks, truthful exit codes.

Interruptions are real signals (SIGINT sent to this process, or SIGKILL to a subprocess); every
run is the tiny BERT of ``_tiny.py`` for a few steps.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _tiny import sentiment_files, mc_records, write_jsonl
from safetensors.torch import load_file
from transformers import TrainerCallback

import loft.app.compare
import loft.app.finetune
from loft.app.cli import main
from loft.app.errors import RunInterrupted
from loft.app.finetune import FinetuneConfig, finetune

TESTS = Path(__file__).parent
STEPS = 6


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


def ctrl_c():
    os.kill(os.getpid(), signal.SIGINT)  # what a terminal's Ctrl-C does
    time.sleep(0.5)  # the handler runs at the next bytecode boundary


class CtrlCAt(TrainerCallback):
    """Ctrl-C at the end of step ``step`` (a second one after the checkpoint if ``twice``)."""

    def __init__(self, step: int, twice: bool = False) -> None:
        self.step, self.twice, self.sent = step, twice, False

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            ctrl_c()
            self.sent = True

    def on_save(self, args, state, control, **kw):
        if self.twice and self.sent:  # after the checkpoint the first Ctrl-C asked for
            ctrl_c()


def with_callbacks(monkeypatch, module, *callbacks):
    original = loft.app.finetune.finetune

    def patched(cfg, **kwargs):
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), *callbacks]
        return original(cfg, **kwargs)

    monkeypatch.setattr(module, "finetune", patched)


def interrupted(capsys, argv):
    """Run ``loft``; assert exit status 130 and one line on stderr saying what was kept."""
    assert main(argv) == 130
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("loft: ")
    return err


def adapter(out):
    return load_file(str(Path(out) / "adapter_model.safetensors"))


def same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def straight(bert, data, tmp_path_factory):
    """The uninterrupted run every interrupted one is compared with."""
    out = tmp_path_factory.mktemp("straight") / "run"
    metrics = finetune(config(bert, data, out), progress=False)
    return out, metrics


# ----------------------------------------------------------------------------- 1. Ctrl-C exits 130
def test_ctrl_c_while_loading_the_model_exits_130_and_writes_nothing(capsys, monkeypatch, bert, data, tmp_path):
    import loft.app.load

    load = loft.app.load.load_model

    def load_then_ctrl_c(*a, **kw):
        result = load(*a, **kw)
        ctrl_c()
        return result

    monkeypatch.setattr(loft.app.load, "load_model", load_then_ctrl_c)
    err = interrupted(capsys, args(bert, data, tmp_path / "o"))
    assert "while loading the data and the model" in err and "nothing was written" in err
    assert not (tmp_path / "o").exists()


def test_ctrl_c_during_the_evaluation_before_training_exits_130(capsys, monkeypatch, bert, data, tmp_path):
    from loft.app.tasks.classification import ClassificationTask

    evaluate = ClassificationTask.evaluate

    def evaluate_then_ctrl_c(self, *a, **kw):
        result = evaluate(self, *a, **kw)
        ctrl_c()
        return result

    monkeypatch.setattr(ClassificationTask, "evaluate", evaluate_then_ctrl_c)
    err = interrupted(capsys, args(bert, data, tmp_path / "o"))
    assert "while evaluating before training" in err and "nothing was kept" in err
    assert not (tmp_path / "o").exists()  # a plain rerun starts cleanly


def test_second_ctrl_c_exits_130_and_keeps_the_checkpoint(capsys, monkeypatch, bert, data, tmp_path):
    with_callbacks(monkeypatch, loft.app.finetune, CtrlCAt(2, twice=True))
    err = interrupted(capsys, args(bert, data, tmp_path / "o"))
    assert "Interrupted while training (second Ctrl-C)" in err
    assert "checkpoint-3 is kept" in err and "--resume" in err  # the first Ctrl-C stops after the next step
    assert loft.app.rundir.checkpoint_damage(tmp_path / "o" / "checkpoints" / "checkpoint-3") is None


# ----------------------------------------------------------------------------- 2. reruns keep results
@pytest.mark.parametrize("how", ["crash", "ctrl-c"])
def test_rerun_of_a_finished_run_keeps_its_results_until_the_new_ones_are_complete(how, bert, data, tmp_path):
    out = tmp_path / "o"
    finetune(config(bert, data, out), progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert {"metrics.json", "adapter_model.safetensors", "run_config.json"} <= before.keys()

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:
                raise RuntimeError("simulated crash")

    callback = Crash() if how == "crash" else CtrlCAt(3)
    with pytest.raises(RuntimeError if how == "crash" else RunInterrupted):
        finetune(config(bert, data, out), progress=False, callbacks=[callback])
    for name, content in before.items():
        assert (out / name).read_bytes() == content, name  # the finished run is intact
    if how == "ctrl-c":
        return
    # and a complete rerun replaces it
    finetune(config(bert, data, out), progress=False)
    assert json.loads((out / "metrics.json").read_text())["steps"] == STEPS
    assert not (out / "checkpoints").exists() and not (out / ".incoming").exists()


# ----------------------------------------------------------------------------- 3. compare checks first
def test_compare_overwrite_checks_every_run_before_touching_the_folder(capsys, bert, data, tmp_path):
    out = tmp_path / "cmp"
    base = ["compare", "--model", bert, "--data", data[0], "--eval-data", data[1], "--methods", "lora", "--ranks", "1",
            "--no-full", "--max-steps", "2", "-b", "8", "--quiet", "-o", out]
    assert main([str(a) for a in base]) == 0
    snapshot = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    csv_text = (out / "compare.csv").read_text()
    bad = [str(a) for a in base[:-1]] + [str(out), "--overwrite"]
    bad[bad.index("--ranks") + 1] = "2,48"  # 48 lies between the 32 -> 64 layers' sides
    assert main(bad) == 2
    err = capsys.readouterr().err
    assert "--rank 48 does not fit layer" in err
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == snapshot  # nothing removed, nothing trained
    assert (out / "compare.csv").read_text() == csv_text


def test_compare_overwrite_refuses_a_folder_that_holds_no_loft_run(capsys, bert, data, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    assert main([str(a) for a in ["compare", "--model", bert, "--data", data[0], "--methods", "lora", "--ranks", "1",
                                  "--no-full", "--max-steps", "1", "--quiet", "-o", out, "--overwrite"]]) == 2
    assert "holds no loft comparison" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "precious" and len(list(out.iterdir())) == 1


# ----------------------------------------------------------------------------- 4. one line, exit 2
def fails(capsys, argv):
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("loft: error:") and len(err.strip().splitlines()) == 1, err
    return err


def test_non_utf8_data_file(capsys, tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "good", "label": 1}\n{"text": "caf\xe9", "label": 0}\n')
    assert "line 2: not UTF-8" in fails(capsys, ["finetune", "--data", path])


@pytest.fixture(scope="module")
def interrupted_run(bert, data, tmp_path_factory):
    """An output folder left by a Ctrl-C during step 2 (checkpoint-2)."""
    out = tmp_path_factory.mktemp("interrupted") / "run"
    with pytest.raises(RunInterrupted):
        # the signal at the end of step 1 is seen at the end of step 2, which is then saved
        finetune(config(bert, data, out), progress=False, callbacks=[CtrlCAt(1)])
    assert (out / "checkpoints" / "checkpoint-2").is_dir()
    return out


@pytest.mark.parametrize("damaged", ["checkpoints/checkpoint-2/optimizer.pt",
                                     "checkpoints/checkpoint-2/adapter_model.safetensors", "run_config.json"])
def test_truncated_file_then_resume_is_a_clear_error(damaged, capsys, interrupted_run, bert, data, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(interrupted_run, out)
    path = out / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    listing = sorted(str(p) for p in out.rglob("*"))
    err = fails(capsys, args(bert, data, out, "--resume"))
    assert "damaged" in err and Path(damaged).name in err and "--overwrite" in err
    assert sorted(str(p) for p in out.rglob("*")) == listing  # nothing changed


def test_read_only_output_folder(capsys, bert, data, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    target = folder / "run"
    if os.access(folder, os.W_OK):  # root writes anyway: use a folder of a read-only file system
        target = Path("/sys/loft-test-run")
        if not Path("/sys").is_dir() or os.access("/sys", os.W_OK) and not _mkdir_fails(target):
            pytest.skip("no read-only folder available")
    err = fails(capsys, args(bert, data, target))
    assert "Cannot write to --output-dir" in err
    assert not target.exists()


def _mkdir_fails(path: Path) -> bool:
    try:
        path.mkdir()
    except OSError:
        return True
    path.rmdir()
    return False


def test_lr_inf_is_refused_before_anything_is_written(capsys, bert, data, tmp_path):
    err = fails(capsys, args(bert, data, tmp_path / "o", "--lr", "inf"))
    assert "--lr must be > 0 and finite, got inf" in err
    assert not (tmp_path / "o").exists()


def test_max_length_beyond_the_models_positions(capsys, bert, tmp_path):
    long = write_jsonl(tmp_path / "long.jsonl", [{"text": "good " * 300, "label": i % 2} for i in range(12)])
    err = fails(capsys, ["finetune", "--model", bert, "--data", long, "--max-length", "300", "--max-steps", "1",
                         "-o", tmp_path / "o"])
    assert "--max-length 300 is more than model" in err and "128 positions" in err
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- 5. metrics after --resume
def test_metrics_after_resume_describe_the_whole_run(interrupted_run, straight, bert, data, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(interrupted_run, out)
    first_part = json.loads((out / "checkpoints" / "checkpoint-2" / "loft_progress.json").read_text())
    resumed = finetune(config(bert, data, out), resume=True, progress=False)
    reference = straight[1]
    assert resumed["resumed_from"].endswith("checkpoint-2") and resumed["steps"] == STEPS
    assert resumed["loss_curve"] == reference["loss_curve"] and len(resumed["loss_curve"]) == STEPS
    assert resumed["train_loss"] == reference["train_loss"]
    assert resumed["train_loss_last"] == reference["train_loss_last"]
    assert resumed["train_seconds"] >= round(first_part["train_seconds"], 1)
    assert same_tensors(adapter(out), adapter(straight[0]))
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["train_loss"] == reference["train_loss"] and saved["loss_curve"] == [list(p) for p in reference["loss_curve"]]


# ----------------------------------------------------------------------------- 6. compare --resume
def test_interrupted_compare_resumes(capsys, monkeypatch, bert, data, tmp_path):
    out = tmp_path / "cmp"
    base = [str(a) for a in ["compare", "--model", bert, "--data", data[0], "--eval-data", data[1], "--methods", "loft,lora",
                             "--ranks", "1", "--no-full", "--max-steps", "4", "-b", "8", "--quiet", "-o", out]]
    original = loft.app.finetune.finetune

    def ctrl_c_in_lora(cfg, **kwargs):
        if cfg.method == "lora":
            kwargs["callbacks"] = [CtrlCAt(1)]
        return original(cfg, **kwargs)

    monkeypatch.setattr(loft.app.compare, "finetune", ctrl_c_in_lora)
    err = interrupted(capsys, base)
    assert "lora-r1" in err and "loft compare command plus --resume" in err
    monkeypatch.setattr(loft.app.compare, "finetune", original)
    finished = (out / "loft-r1" / "metrics.json").read_bytes()
    assert "--resume" in fails(capsys, base)  # a plain rerun is refused, and says how to continue
    assert main(base + ["--resume"]) == 0
    assert (out / "loft-r1" / "metrics.json").read_bytes() == finished  # the finished run was kept
    lora = json.loads((out / "lora-r1" / "metrics.json").read_text())
    assert lora["resumed_from"].endswith("checkpoint-2") and lora["steps"] == 4
    assert (out / "compare.csv").read_text().count("\n") == 3


# ----------------------------------------------------------------------------- 7. smaller items
def test_encoder_refused_for_multiple_choice(capsys, bert, tmp_path):
    mc = write_jsonl(tmp_path / "mc.jsonl", mc_records(12))
    err = fails(capsys, ["finetune", "--model", bert, "--data", mc, "-o", tmp_path / "o"])
    assert "is an encoder (bert)" in err and "causal" in err
    assert not (tmp_path / "o").exists()


def test_jsonl_error_column_is_the_column_in_the_line(capsys, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "good", "label": 1}\n{"text": "oops", "label": \n')
    assert "line 2: not valid JSON (Expecting value, column 27)" in fails(capsys, ["finetune", "--data", path])


def test_batch_size_error_names_only_real_options(capsys, data):
    err = fails(capsys, ["finetune", "--data", data[0], "-b", "0"])
    assert "--batch-size must be >= 1, got 0" in err and "grad-accum" not in err


def test_model_loading_error_is_not_cut_mid_sentence(capsys, monkeypatch, bert, data, tmp_path):
    import transformers

    def broken(*a, **kw):
        raise OSError("Can't load tokenizer for 'x'. If you were trying to load it from the hub,\n"
                      "make sure you don't have a local directory with the same name.")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", broken)
    err = fails(capsys, args(bert, data, tmp_path / "o"))
    assert "make sure you don't have a local directory with the same name." in err


def test_full_fine_tuning_is_not_named_by_a_rank(capsys, monkeypatch, bert, data, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert main([str(a) for a in ["finetune", "--model", bert, "--data", data[0], "--eval-data", data[1], "--method", "full",
                                  "--max-steps", "1", "-b", "8", "--quiet"]]) == 0
    printed = capsys.readouterr().out
    assert (tmp_path / "runs" / "train-full" / "metrics.json").is_file()
    assert "\nfull on " in printed and "r4" not in printed


# ----------------------------------------------------------------------------- 8. kill -9
def test_kill_9_during_a_checkpoint_write_then_resume_matches_uninterrupted(straight, bert, data, tmp_path):
    """A real SIGKILL while ``optimizer.pt`` of checkpoint-4 is half written (tests/kill_cli.py):
    the published checkpoint-2 stays complete, ``--resume`` continues from it and ends bit-exact
    with the uninterrupted run, metrics included."""
    out, marker = tmp_path / "run", tmp_path / "writing"
    env = dict(os.environ, LOFT_TEST_SLOW_WRITE=str(marker), PYTHONPATH=str(TESTS.parent / "src"))
    cmd = [sys.executable, str(TESTS / "kill_cli.py"), *args(bert, data, out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the run never reached the checkpoint write"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    half = Path(marker.read_text())
    assert half.is_file() and ".incoming" in half.parts  # the half-written checkpoint is not where resume looks
    assert loft.app.finetune.latest_checkpoint(out).name == "checkpoint-2"
    assert loft.app.rundir.checkpoint_damage(out / "checkpoints" / "checkpoint-2") is None
    assert main(args(bert, data, out, "--resume")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from"].endswith("checkpoint-2")
    assert same_tensors(adapter(out), adapter(straight[0]))
    reference = straight[1]
    assert metrics["train_loss"] == reference["train_loss"]
    assert metrics["loss_curve"] == [list(p) for p in reference["loss_curve"]]


def test_atomic_write_killed_mid_write_leaves_the_old_file(tmp_path):
    """kill -9 while a result file is being written: the old content stays, whole."""
    target, marker = tmp_path / "metrics.json", tmp_path / "writing"
    target.write_text('{"old": true}')
    script = (
        "import sys, time, pathlib\n"
        "from loft.app.atomic import atomic_write\n"
        "def write(tmp):\n"
        "    with open(tmp, 'w') as f:\n"
        "        f.write('{\"new\": ' + 'x' * 100000)\n"
        "        f.flush()\n"
        "        pathlib.Path(sys.argv[2]).write_text('1')\n"
        "        time.sleep(600)\n"
        "atomic_write(sys.argv[1], write)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(target), str(marker)],
                            env=dict(os.environ, PYTHONPATH=str(TESTS.parent / "src")))
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert json.loads(target.read_text()) == {"old": True}


@pytest.mark.parametrize("inherited", ["default", "ignored"])
def test_the_ctrl_c_handler_is_installed_for_training_and_put_back(inherited):
    """Training installs loft's Ctrl-C handler and puts the previous one back at the end; a process
    that inherited SIGINT ignored (a background job, nohup) keeps ignoring it during training."""
    from loft.app.callbacks import InterruptCallback

    before = signal.default_int_handler if inherited == "default" else signal.SIG_IGN
    previous = signal.signal(signal.SIGINT, before)
    try:
        cb = InterruptCallback()
        cb.on_train_begin(None, None, None)
        during = signal.getsignal(signal.SIGINT)
        assert (during == cb._handler) if inherited == "default" else (during is signal.SIG_IGN)
        cb.on_train_end(None, None, None)
        assert signal.getsignal(signal.SIGINT) is before
    finally:
        signal.signal(signal.SIGINT, previous)
