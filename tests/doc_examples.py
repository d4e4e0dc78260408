"""The code examples of README.md and docs/*.md, as tests/test_doc_examples.py runs them.

Every fenced block of those files is one of (the marker is an HTML comment on the line right
before the opening fence, invisible on GitHub):

* ``python``: run in one process; with ``<!-- example: torchrun -->``, under ``torchrun`` with 2 CPU
  processes (gloo), all such blocks in one launch (tests/doc_torchrun.py).
* ``bash`` / ``sh`` / ``shell``: each command runs, in order, in one scratch folder per document
  (so a later command finds what an earlier one wrote). Commands the harness runs: ``loft ...``
  (``.venv/bin/loft``, ``python -m loft.app``), in this process; ``torchrun`` / ``accelerate
  launch`` of ``-m loft.app ...``, as real launches of 2 CPU processes.
* ``text`` (output, tables, file contents) and ``yaml`` (configuration: it must parse) are not run.
* ``<!-- illustrative: REASON -->`` before any block: not run; REASON says why (it takes hours,
  needs GPUs, installs packages ...) and, where there is one, what tests it instead.

A block with no language, a command the harness cannot run, or an illustrative marker without a
reason fails tests/test_doc_examples.py, as does any example that fails when run.

What the harness adds, so that the examples run in seconds on the built-in data and tiny models
(and nothing else is changed in the text):

* ``loft finetune`` / ``compare``: ``--max-steps 2 --max-eval 8`` appended (typer takes the last
  value of a repeated option; not ``--max-steps`` where the command gives ``--epochs``: its data
  are then the harness's few rows), with ``--lr auto`` also ``--lr-search-budget 12`` (a search
  takes at least 23 steps), and, where the command names no ``--model``, a tiny model built
  from a config (BERT for classification data, Llama for ``social_iqa`` / ``social_iqa_sft``);
  ``loft federate``: ``--rounds 1 --local-steps 1 --clients 2 --max-eval 8`` and the tiny BERT;
  ``loft generate``: ``--max-new-tokens 4``.
* Placeholders: ``path/to/...`` is the tiny BERT's folder; ``RUN_DIR`` is the instruction-tuning
  run an earlier command of the document made (``runs/social_iqa_sft-loft-r4``); files a command
  reads that the document does not make (``reviews.csv``, ``test.csv``, ``my.csv``,
  ``question.txt``) are written into the scratch folder first (120 built-in reviews); ``...``
  as a ``loft finetune`` argument stands for the arguments of the block's previous ``loft finetune``.
* A command with ``--resume`` continues after a Ctrl-C: the harness first runs the same command
  without ``--resume`` (with ``--overwrite``) and interrupts it after its first step.
* Launchers get 2 processes, a free port and (``accelerate launch``) no GPU.
* Python blocks get the names they use but do not define (:mod:`doc_context`): ``build_model()``
  (a tiny Llama), ``model`` / ``peft_model`` (it with LoRA on ``q_proj`` / ``v_proj``; under
  torchrun, a ``model`` that comes with ``optimizer`` is sharded by FSDP2), ``optimizer`` (a
  ``LoFTAdamW`` of it after one step), ``loader`` /
  ``ds`` (a few token rows), ``folder`` (a scratch folder); a block that loads ``"path/to/model"``
  gets the tiny BERT's folder there and classification batches of the built-in movie reviews as
  ``loader``.
"""

from __future__ import annotations

import ast
import builtins
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

PYTHON = ("python", "py")
SHELL = ("bash", "sh", "shell", "console")
DATA_LANGS = ("text", "yaml")

_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)\s*$")
_MARKER = re.compile(r"^\s*<!--\s*(illustrative|example)\s*:\s*(.*?)\s*-->\s*$")


@dataclass
class Block:
    """One fenced block: its document, the line of its opening fence (1-based), language, code
    and marker (``("illustrative", reason)``, ``("example", "torchrun")`` or ``None``)."""

    doc: Path
    line: int
    lang: str
    code: str
    marker: tuple[str, str] | None = None

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"

    @property
    def illustrative(self) -> bool:
        return self.marker is not None and self.marker[0] == "illustrative"

    @property
    def torchrun(self) -> bool:
        return self.marker == ("example", "torchrun")


def blocks(doc: Path) -> list[Block]:
    """The fenced blocks of a markdown file, in order."""
    lines = doc.read_text().splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.groups()
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            j += 1
        code = "\n".join(line[len(indent):] if line.startswith(indent) else line for line in lines[i + 1:j])
        marker = _MARKER.match(lines[i - 1]) if i else None
        out.append(Block(doc, i + 1, lang.lower(), code + "\n", marker.groups() if marker else None))  # type: ignore[arg-type]
        i = j + 1
    return out


def all_blocks() -> list[Block]:
    return [b for doc in DOCS for b in blocks(doc)]


# ------------------------------------------------------------------------------------- shell
@dataclass
class Command:
    """One shell command of a block: ``env`` assignments, the launcher (``None``: ``loft`` in this
    process; ``"torchrun"`` / ``"accelerate"``), the launcher's own arguments and loft's."""

    text: str
    env: dict[str, str]
    launcher: str | None
    launcher_args: list[str]
    args: list[str]
    block: Block | None = field(default=None, repr=False)

    @property
    def subcommand(self) -> str:
        return self.args[0] if self.args else ""


class NotRunnable(ValueError):
    """A shell command the harness does not run (the block must be marked illustrative)."""


def command_lines(code: str) -> list[str]:
    """The block's commands: continuation lines joined, blank and comment-only lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def _words(line: str) -> list[str]:
    """The words of a simple command as bash expands them (quotes, ``$(...)``, comments); refuses
    lists, pipes, redirections and compound commands rather than run them."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>()")
    lexer.commenters = "#"
    try:
        tokens = list(lexer)
    except ValueError as e:
        raise NotRunnable(f"cannot parse {line!r}: {e}") from None
    if tokens and tokens[0] in ("for", "while", "if", "until", "case", "do", "done", "then", "fi"):
        raise NotRunnable(f"{line!r} is a compound command")
    operators = [t for t in tokens if t and set(t) <= set(";&|<>()")]
    if any(set(t) & set(";&|<>") for t in operators) or (operators and "$(" not in line):
        raise NotRunnable(f"{line!r} is not a simple command (a list, pipe or redirection)")
    result = subprocess.run(["bash", "-c", f"printf '%s\\0' {line}"], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise NotRunnable(f"bash could not expand {line!r}: {result.stderr.strip()}")
    return result.stdout.split("\0")[:-1]


def parse_command(line: str) -> Command:
    """A shell command the harness runs; :class:`NotRunnable` for any other."""
    words = _words(line)
    env: dict[str, str] = {}
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    if not words:
        raise NotRunnable(f"{line!r} runs nothing")
    program = words[0].rsplit("/", 1)[-1]
    if program == "loft":
        return Command(line, env, None, [], words[1:])
    if program.startswith("python") and words[1:3] == ["-m", "loft.app"]:
        return Command(line, env, None, [], words[3:])
    if program == "torchrun" or (program == "accelerate" and words[1:2] == ["launch"]):
        rest = words[1:] if program == "torchrun" else words[2:]
        if "-m" in rest and rest[rest.index("-m") + 1:rest.index("-m") + 2] == ["loft.app"]:
            k = rest.index("-m")
            return Command(line, env, program, rest[:k], rest[k + 2:])
        raise NotRunnable(f"{line!r} launches something other than `-m loft.app`")
    raise NotRunnable(f"{line!r}: the harness runs `loft ...` and torchrun / accelerate launch of `-m loft.app ...`")


def shell_commands(block: Block) -> list[Command]:
    commands = [parse_command(line) for line in command_lines(block.code)]
    for c in commands:
        c.block = block
    return commands


# ------------------------------------------------------------------------------------- python
def free_names(code: str) -> set[str]:
    """Names a Python block reads before it binds them (assignment, import, definition), builtins
    aside: ``model`` in ``model, opt = accelerator.prepare(model, opt)`` is free (the right-hand
    side is read first), ``batch`` in ``for batch in loader:`` is not."""
    tree = ast.parse(code)
    first: dict[str, tuple[tuple[int, int], bool]] = {}  # name -> (where it first occurs, as a read?)

    def note(name: str, where: tuple[int, int], read: bool) -> None:
        if name not in first or where < first[name][0]:
            first[name] = (where, read)

    assigned: set[int] = set()  # the Name nodes an assignment binds (at its end)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):  # targets are bound after the value
            end = (node.end_lineno or node.lineno, node.end_col_offset or 0)
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        assigned.add(id(name))
                        note(name.id, end, isinstance(node, ast.AugAssign))
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and id(node) not in assigned:
            note(node.id, (node.lineno, node.col_offset), isinstance(node.ctx, ast.Load))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                note((alias.asname or alias.name).split(".")[0], (node.lineno, node.col_offset), False)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            note(node.name, (node.lineno, node.col_offset), False)
        elif isinstance(node, ast.arg):
            note(node.arg, (node.lineno, node.col_offset), False)
    return {name for name, (_, read) in first.items() if read} - set(dir(builtins))


def classify(block: Block) -> str:
    """How the harness treats a block: ``"illustrative"``, ``"data"``, ``"python"``,
    ``"torchrun"`` or ``"shell"``; raises ``ValueError`` naming the problem for a block it can
    neither run nor skip."""
    if block.marker is not None:
        kind, value = block.marker
        if kind == "illustrative":
            if not value:
                raise ValueError(f"{block.where}: `<!-- illustrative: -->` needs a reason after the colon")
            return "illustrative"
        if value != "torchrun" or block.lang not in PYTHON:
            raise ValueError(f"{block.where}: unknown marker `<!-- example: {value} -->` (only `torchrun`, on a python block)")
    if block.lang in DATA_LANGS:
        return "data"
    if block.lang in PYTHON:
        ast.parse(block.code)  # a SyntaxError names the block's own line
        return "torchrun" if block.torchrun else "python"
    if block.lang in SHELL:
        shell_commands(block)  # NotRunnable says which command
        return "shell"
    raise ValueError(
        f"{block.where}: a block with language {block.lang!r}: give code `python` or `bash`, output and file "
        "contents `text`, configuration `yaml`, or mark it `<!-- illustrative: REASON -->`"
    )
