"""Every code example of README.md and docs/*.md runs (tests/doc_examples.py says how: markers,
what the harness adds). Single-process examples run here, document by document; the
``torchrun`` Python examples in one launch of 2 CPU processes, and the documents' ``torchrun`` /
``accelerate launch`` commands as real launches (both ``slow``)."""

from __future__ import annotations

import csv
import gc
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers")

import doc_examples as dx  # noqa: E402
from doc_context import TINY_BERT_ENV, provide, substitute  # noqa: E402

BLOCKS = dx.all_blocks()
#: placeholders of the examples' commands (doc_examples' docstring)
SFT_RUN = "runs/social_iqa_sft-loft-r4"
LLAMA_DATA = ("social_iqa", "social_iqa_sft")
TIMEOUT = 600


def _docs(*kinds: str, launched: bool | None = None) -> list[str]:
    """The documents with a block of one of ``kinds`` (for ``shell``: a command run in this process,
    ``launched=False``, or by a launcher, ``launched=True``)."""
    out = []
    for b in BLOCKS:
        try:
            kind = dx.classify(b)
        except (ValueError, SyntaxError):
            continue
        if kind not in kinds:
            continue
        if kind == "shell" and launched is not None and not any((c.launcher is not None) == launched
                                                               for c in dx.shell_commands(b)):
            continue
        name = str(b.doc.relative_to(dx.ROOT))
        if name not in out:
            out.append(name)
    return out


def test_every_block_is_run_or_marked_illustrative():
    """A block is Python or shell the harness runs, output (``text``), configuration (``yaml``, which
    must parse) or marked ``<!-- illustrative: REASON -->``; anything else fails here, naming the
    block and what to do. (The markdown drives this: nothing lists the blocks by number.)"""
    import yaml

    problems = []
    for block in BLOCKS:
        try:
            kind = dx.classify(block)
            if kind == "data" and block.lang == "yaml":
                yaml.safe_load(block.code)
        except (ValueError, SyntaxError, yaml.YAMLError) as e:
            problems.append(f"{block.where}: {e}")
    assert not problems, "\n".join(problems)
    kinds = [dx.classify(b) for b in BLOCKS]
    assert kinds.count("python") >= 2 and kinds.count("torchrun") >= 3 and kinds.count("shell") >= 5, kinds


def test_the_markers_are_found_and_a_bad_block_is_refused(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("<!-- illustrative: runs for hours -->\n```bash\nbenchmarks/x.sh\n```\n\n```\nplain\n```\n\n"
                   "<!-- illustrative: -->\n```python\nx = 1\n```\n\n```bash\npip install x && loft models\n```\n\n"
                   "<!-- example: torchrun -->\n```python\nimport torch\n```\n")
    found = dx.blocks(doc)
    assert [b.marker for b in found] == [("illustrative", "runs for hours"), None, ("illustrative", ""), None,
                                         ("example", "torchrun")]
    dx.ROOT, root = tmp_path, dx.ROOT
    try:
        assert dx.classify(found[0]) == "illustrative" and dx.classify(found[4]) == "torchrun"
        with pytest.raises(ValueError, match="language ''"):
            dx.classify(found[1])
        with pytest.raises(ValueError, match="needs a reason"):
            dx.classify(found[2])
        with pytest.raises(dx.NotRunnable, match="not a simple command"):
            dx.classify(found[3])
    finally:
        dx.ROOT = root


def test_the_documented_accelerate_config_is_the_tested_one():
    """docs/distributed.md shows the FSDP2 configuration file that tests/test_fsdp2_setups.py launches."""
    import yaml

    fixture = yaml.safe_load((Path(__file__).parent / "fixtures" / "accelerate_fsdp2.yaml").read_text())
    shown = [yaml.safe_load(b.code) for b in BLOCKS if b.lang == "yaml"]
    assert fixture in [c for c in shown if isinstance(c, dict) and c.get("distributed_type") == "FSDP"]


# ------------------------------------------------------------------------------------- set-up
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny BERT and Llama folders (tests/_tiny.py) the harness substitutes for real models."""
    from _tiny import make_bert, make_llama

    root = tmp_path_factory.mktemp("doc-models")
    bert, llama = make_bert(root / "bert"), make_llama(root / "llama")
    os.environ[TINY_BERT_ENV] = str(bert)
    yield {"bert": str(bert), "llama": str(llama)}
    os.environ.pop(TINY_BERT_ENV, None)


def _scratch_files(folder: Path) -> None:
    """The input files the examples name without making them: a few built-in reviews as CSV, a prompt."""
    from loft.app.data import builtin_path, read_records

    records = read_records(builtin_path("movie_sentiment", "train"))[:120]  # enough for --lr auto's validation split
    for name in ("reviews.csv", "test.csv", "my.csv"):
        with open(folder / name, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows({"text": r["text"], "label": r["label"]} for r in records)
    (folder / "question.txt").write_text("Question: Kai went home. How would Kai feel?\nA. tired\nB. happy\nAnswer:")


def _option(args: list[str], *names: str) -> str | None:
    for k, a in enumerate(args):
        if a in names and k + 1 < len(args):
            return args[k + 1]
    return None


def loft_args(cmd: dx.Command, tiny: dict[str, str], previous: list[str] | None) -> list[str]:
    """The command's loft arguments with the harness's placeholders and budget (doc_examples)."""
    args: list[str] = []
    for a in cmd.args:
        if a == "..." and cmd.subcommand == "finetune" and previous:
            args += previous[1:]
        elif a == "RUN_DIR":
            args.append(SFT_RUN)
        elif a.startswith("path/to/"):
            args.append(tiny["bert"])
        else:
            args.append(a)
    sub = args[0] if args else ""
    if sub in ("finetune", "compare", "federate") and _option(args, "--model", "-m") is None:
        args += ["--model", tiny["llama"] if _option(args, "--data", "-d") in LLAMA_DATA else tiny["bert"]]
    if sub in ("finetune", "compare"):  # (--epochs and --max-steps exclude each other: the scratch files are small)
        args += (["--max-steps", "2"] if _option(args, "--epochs") is None else []) + ["--max-eval", "8"]
        if "auto" in (_option(args, "--lr") or ""):  # 2 steps' 25% cannot pay for a search (23 steps at least)
            args += ["--lr-search-budget", "12"]
    elif sub == "federate":
        args += ["--rounds", "1", "--local-steps", "1", "--clients", "2", "--max-eval", "8"]
    elif sub == "generate":
        args += ["--max-new-tokens", "4"]
    return args


def _ctrl_c_after_first_step():
    """A Trainer callback: Ctrl-C (SIGINT to this process, as a terminal sends it) when step 1 ends."""
    from transformers import TrainerCallback

    class CtrlC(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.5)  # the handler runs at the next bytecode boundary

    return CtrlC()


def _run_loft(cmd: dx.Command, args: list[str], monkeypatch, capsys) -> None:
    """``loft`` in this process; a ``--resume`` command after the same run interrupted at step 1."""
    import loft.app.compare
    import loft.app.finetune
    from loft.app.cli import main

    gc.collect()  # what conftest._gc_freeze does before each test, before each command: the runs'
    gc.freeze()   # own gc.collect() calls (loft/app/memory.py) then scan only what the run makes
    with monkeypatch.context() as m:
        for key, value in cmd.env.items():
            m.setenv(key, value)
        m.setattr(sys, "stdin", io.StringIO("Question: Kai went home. How would Kai feel?\n"))
        if "--resume" in args:
            original = loft.app.finetune.finetune

            def interrupted(cfg, **kwargs):
                kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), _ctrl_c_after_first_step()]
                return original(cfg, **kwargs)

            with monkeypatch.context() as ctrl_c:
                ctrl_c.setattr(loft.app.finetune, "finetune", interrupted)
                ctrl_c.setattr(loft.app.compare, "finetune", interrupted)
                first = [a for a in args if a != "--resume"] + ["--overwrite"]
                code = main(first)
            assert code == 130, f"{cmd.block.where}: `{cmd.text}`: the interrupted run before it exited {code}"
            capsys.readouterr()
        code = main(args)
        out = capsys.readouterr()
        assert code == 0, (f"{cmd.block.where}: `{cmd.text}` (run as loft {' '.join(args)}) exited {code}:\n"
                           f"{out.err[-3000:]}")


def test_a_broken_example_fails(tiny, tmp_path, monkeypatch, capsys):
    """What CI sees when an example breaks: the block's place, the command and loft's message; a
    Python block's own exception."""
    monkeypatch.chdir(tmp_path)
    block = dx.Block(dx.ROOT / "README.md", 1, "bash", ".venv/bin/loft finetune --rnak 4\n")
    (cmd,) = dx.shell_commands(block)
    with pytest.raises(AssertionError, match=r"README.md:1: `.venv/bin/loft finetune --rnak 4`.*exited 2"):
        _run_loft(cmd, loft_args(cmd, tiny, None), monkeypatch, capsys)
    with pytest.raises(NameError, match="optimiser"):
        _run_python(dx.Block(dx.ROOT / "README.md", 1, "python", "import loft\noptimiser.step()\n"), tmp_path)


def _run_python(block: dx.Block, folder: Path) -> None:
    names = provide(dx.free_names(block.code), block.code, folder, distributed=False)
    exec(compile(substitute(block.code), block.where, "exec"), {"__name__": "__main__", **names})


def _starts_ray(doc: str) -> bool:
    """Whether the document runs ``loft federate`` (Flower's Ray simulation: processes of its own)."""
    return any(c.subcommand == "federate" for b in dx.blocks(dx.ROOT / doc) if dx.classify(b) == "shell"
               for c in dx.shell_commands(b))


@pytest.mark.parametrize("doc", [pytest.param(d, marks=pytest.mark.slow) if _starts_ray(d) else d
                                 for d in _docs("python", "shell", launched=False)])
def test_the_examples_of(doc, tiny, tmp_path, monkeypatch, capsys):
    """The document's single-process Python blocks and ``loft`` commands, in order, in one scratch
    folder (launches and torchrun blocks: the slow tests below; a document that runs ``loft
    federate`` is slow too, Ray starting processes of its own)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _scratch_files(tmp_path)
    ran = 0
    for block in dx.blocks(dx.ROOT / doc):
        kind = dx.classify(block)
        if kind == "python":
            _run_python(block, tmp_path / "folder")
            ran += 1
        elif kind == "shell":
            previous = None
            for cmd in dx.shell_commands(block):
                if cmd.launcher is not None:
                    continue
                args = loft_args(cmd, tiny, previous)
                _run_loft(cmd, args, monkeypatch, capsys)
                if cmd.subcommand == "finetune":
                    previous = [a for a in cmd.args if a != "--resume"]
                ran += 1
    assert ran


# ------------------------------------------------------------------------------------- launches
def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", **extra)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    return env


@pytest.mark.slow  # one torchrun launch of 2 processes (pyproject.toml: markers)
def test_the_torchrun_python_examples(tiny, tmp_path):
    """Every ``<!-- example: torchrun -->`` Python block runs on 2 CPU processes (gloo), each as a
    fresh script (tests/doc_torchrun.py); on a machine without GPUs Accelerate is told so
    (ACCELERATE_USE_CPU, what ``Accelerator(cpu=True)`` does)."""
    from _ranks import free_port

    chosen = [b for b in BLOCKS if dx.classify(b) == "torchrun"]
    spec = tmp_path / "blocks.json"
    spec.write_text(json.dumps([{"where": b.where, "code": b.code} for b in chosen]))
    out = tmp_path / "out"
    out.mkdir()
    cmd = [_bin("torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(Path(__file__).with_name("doc_torchrun.py")), str(spec), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT,
                          env=_env(ACCELERATE_USE_CPU="true", **{TINY_BERT_ENV: tiny["bert"]}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        results = json.loads((out / f"rank{rank}.json").read_text())
        assert list(results) == [b.where for b in chosen], results
        failed = {where: tb for where, tb in results.items() if tb}
        assert not failed, f"rank {rank}:\n" + "\n".join(f"{w}:\n{tb}" for w, tb in failed.items())


def _launch(cmd: dx.Command, args: list[str], *, ctrl_c: bool = False) -> subprocess.CompletedProcess:
    from _ranks import free_port

    launcher_args, k = list(cmd.launcher_args), 0
    option = "--nproc_per_node" if cmd.launcher == "torchrun" else "--num_processes"
    while k < len(launcher_args):  # 2 processes, whatever the example says
        if launcher_args[k] == option:
            del launcher_args[k:k + 2]
        else:
            k += 1
    if cmd.launcher == "torchrun":
        head = [_bin("torchrun"), option, "2", *launcher_args, "--master_addr", "127.0.0.1",
                "--master_port", str(free_port())]
    else:
        head = [_bin("accelerate"), "launch", option, "2", *launcher_args, "--main_process_port", str(free_port())]
    target = [str(Path(__file__).with_name("ctrl_c_cli.py"))] if ctrl_c else ["-m", "loft.app"]
    env = _env(**cmd.env, **({"LOFT_TEST_CTRL_C_STEP": "1"} if ctrl_c else {}))
    return subprocess.run([*head, *target, *args], capture_output=True, text=True, timeout=TIMEOUT, env=env)


@pytest.mark.slow  # real launches of 2 processes
@pytest.mark.parametrize("doc", _docs("shell", launched=True))
def test_the_launched_examples_of(doc, tiny, tmp_path, monkeypatch):
    """The document's ``torchrun`` / ``accelerate launch`` commands of ``-m loft.app``, each a real
    launch of 2 CPU processes in one scratch folder; one with ``--resume`` continues the same
    command stopped by Ctrl-C after its first step (tests/ctrl_c_cli.py)."""
    monkeypatch.chdir(tmp_path)
    _scratch_files(tmp_path)
    for block in dx.blocks(dx.ROOT / doc):
        if dx.classify(block) != "shell":
            continue
        for cmd in dx.shell_commands(block):
            if cmd.launcher is None:
                continue
            args = loft_args(cmd, tiny, None)
            if "--resume" in args:
                stopped = _launch(cmd, [a for a in args if a != "--resume"] + ["--overwrite"], ctrl_c=True)
                assert stopped.returncode != 0 and "Interrupted at step" in stopped.stderr, stopped.stderr[-3000:]
            proc = _launch(cmd, args)
            assert proc.returncode == 0, f"{block.where}: `{cmd.text}`:\n{proc.stderr[-3000:]}"
