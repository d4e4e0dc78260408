"""Fuzz test of the data readers and of the command-line values (issue #11, item 10).

Seeded; every input is run in-process through ``loft.app.cli.main``. 240 data files (JSONL and CSV
with random bytes, missing and extra fields, wrong types, huge lines, empty lines, BOMs, NUL bytes,
truncation ...) and 160 command lines with random option values (``finetune`` and ``compare``):
400 inputs in all. Each must end with exit status 0 or 2 and never a traceback, and nothing
outside the output folder may be touched.

To keep it fast, an input that passes every check stops where the run would first write to its
output folder (``_start_run`` / ``_prepare_folder`` raise ``Accepted``, counted as exit 0); a
few accepted inputs of each kind then run end to end (``--max-steps 1``) for real.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
from _tiny import mc_records, sentiment_records

import loft.app.build
import loft.app.compare
import loft.app.finetune
from loft.app.cli import main

SEED = 11
N_DATA = 240
N_OPTIONS = 160


class Accepted(Exception):
    """Every input was checked; the run would now write its output folder."""


def refuse_to_write(*args, **kwargs):
    raise Accepted


pytestmark = pytest.mark.usefixtures("offline")


def snapshot(root: Path, skip: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        if Path(dirpath) == skip or skip in Path(dirpath).parents:
            continue
        for name in files + dirs:
            p = Path(dirpath) / name
            if p == skip:
                continue
            st = p.stat()
            out[str(p)] = (st.st_size, st.st_mtime_ns)
    return out


def run(argv: list[str], capsys) -> tuple[int, str]:
    """``loft`` in-process: (exit status, stderr); asserts no traceback."""
    try:
        code = main(argv)
    except Accepted:
        code = 0
    except SystemExit as e:  # what a console script would do
        code = e.code if isinstance(e.code, int) else 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, (argv, captured.err)
    assert code in (0, 2), (argv, code, captured.err)
    if code == 2:
        assert captured.err.strip(), argv
    return code, captured.err


# ----------------------------------------------------------------------------- data files
JUNK = [b"\x00", b"\xff\xfe", b"\xef\xbb\xbf", b"\xe9", b"\r", b"\r\n", b"\n", b",", b'"', b"{", b"}", b"[", b"\\",
        b"\t", b"\x1b[31m", "é".encode(), "💥".encode(), b"\xc3", b"null", b"NaN"]
VALUES = [None, True, 0, 1, -1, 2, 1.5, float("nan"), "", " ", "1", "pos", [], [1], {}, {"a": 1}, "x" * 300_000,
          10**40, "0", "-1", ["a", "b"], ["a"], [1, 2]]


def mutate_record(rng: random.Random, record: dict) -> dict:
    record = dict(record)
    what = rng.randrange(4)
    keys = list(record)
    if what == 0 and keys:
        record.pop(rng.choice(keys))  # missing field
    elif what == 1:
        record[rng.choice(["extra", "label2", "_line", "Text", ""])] = rng.choice(VALUES)  # extra field
    elif what == 2 and keys:
        record[rng.choice(keys)] = rng.choice(VALUES)  # wrong type / odd value
    else:
        record = {"text": rng.choice(VALUES), "label": rng.choice(VALUES)}
    return record


def jsonl_bytes(rng: random.Random) -> bytes:
    records = sentiment_records(12, seed=rng.randrange(1000)) if rng.random() < 0.7 else mc_records(12, seed=rng.randrange(1000))
    for _ in range(rng.randrange(3)):
        i = rng.randrange(len(records))
        records[i] = mutate_record(rng, records[i])
    lines = [json.dumps(r, ensure_ascii=rng.random() < 0.5).encode() for r in records]
    for _ in range(rng.randrange(3)):
        kind = rng.randrange(6)
        i = rng.randrange(len(lines))
        if kind == 0:
            lines[i] = lines[i][: rng.randrange(len(lines[i]) + 1)]  # truncated
        elif kind == 1:
            pos = rng.randrange(len(lines[i]) + 1)
            lines[i] = lines[i][:pos] + rng.choice(JUNK) + lines[i][pos:]  # random bytes
        elif kind == 2:
            lines.insert(i, rng.choice([b"", b"   ", b"\t"]))  # empty lines
        elif kind == 3:
            lines[i] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
        elif kind == 4:
            lines[i] = rng.choice([b"[1, 2]", b"42", b'"text"', b"[" * 5000, b'{"text": "a", "label": 1}' * 2])
        else:
            lines[i] = b'{"text": "' + b"good " * rng.randrange(20_000, 60_000) + b'", "label": 1}'  # huge line
    data = b"\n".join(lines) + rng.choice([b"\n", b"", b"\r\n"])
    if rng.random() < 0.15:
        data = b"\xef\xbb\xbf" + data  # a byte-order mark
    if rng.random() < 0.05:
        data = b""
    return data


def csv_bytes(rng: random.Random) -> bytes:
    header = rng.choice(["text,label", "text,label", "label,text", "text", "text,label,extra", "sentence,label", "", "text;label"])
    rows = []
    for r in sentiment_records(12, seed=rng.randrange(1000)):
        text, label = r["text"], str(r["label"])
        row = rng.choice([f"{text},{label}", f'"{text}",{label}', f"{text},{label}", f"{text},{label},x", f"{text}",
                          f'"{text}, quoted",{label}', f'"{text},{label}', f"{text},", f",{label}"]) if rng.random() < 0.2 else f"{text},{label}"
        rows.append(row.encode())
    for _ in range(rng.randrange(3)):
        i = rng.randrange(len(rows))
        kind = rng.randrange(4)
        if kind == 0:
            pos = rng.randrange(len(rows[i]) + 1)
            rows[i] = rows[i][:pos] + rng.choice(JUNK) + rows[i][pos:]
        elif kind == 1:
            rows.insert(i, b"")
        elif kind == 2:
            rows[i] = b'"' + b"good " * rng.randrange(30_000, 60_000) + b'",1'  # a field over csv's default limit
        else:
            rows[i] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 30)))
    data = header.encode() + b"\n" + b"\n".join(rows) + b"\n"
    if rng.random() < 0.15:
        data = b"\xef\xbb\xbf" + data
    return data


def test_fuzz_data_files(bert, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loft.app.build, "start_run", refuse_to_write)
    monkeypatch.chdir(tmp_path)
    rng = random.Random(SEED)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    out = tmp_path / "out"
    codes = {0: 0, 2: 0}
    for i in range(N_DATA):
        is_csv = rng.random() < 0.35
        path = data_dir / f"d{i}.{'csv' if is_csv else 'jsonl'}"
        path.write_bytes(csv_bytes(rng) if is_csv else jsonl_bytes(rng))
        argv = ["finetune", "--model", str(bert), "--data", str(path), "-o", str(out), "--max-steps", "1", "-b", "4", "--quiet"]
        if rng.random() < 0.3:
            eval_path = data_dir / f"e{i}.jsonl"
            eval_path.write_bytes(jsonl_bytes(rng))
            argv += ["--eval-data", str(eval_path)]
        before = snapshot(tmp_path, out)
        code, _ = run(argv, capsys)
        codes[code] += 1
        assert snapshot(tmp_path, out) == before, argv  # nothing outside the output folder touched
        assert not out.exists()
    assert codes[0] >= 10 and codes[2] >= 100, codes  # the generator makes both kinds


# ----------------------------------------------------------------------------- option values
FINETUNE_VALUES = {
    "--rank": ["0", "-1", "1", "2", "33", "1000000", "abc", "1.5", "", "99999999999999999999"],
    "--lr": ["inf", "-inf", "nan", "0", "-1", "1e309", "abc", "1e-3", "5e-4", "0x10", "", "1e-320"],
    "--head-lr": ["inf", "nan", "0", "-2", "1e-3", "x"],
    "--max-steps": ["0", "-3", "1", "abc", "1e3", "99999999999999999999999"],
    "--epochs": ["0", "-1", "inf", "nan", "0.5", "1e300", "abc", "1e-9"],
    "--batch-size": ["0", "-1", "1", "8", "1000000", "x"],
    "--max-length": ["0", "7", "8", "64", "128", "129", "100000", "-5", "z"],
    "--max-eval": ["0", "-1", "1", "5", "99999999", "q"],
    "--seed": ["-1", "0", "4294967295", "4294967296", "abc", "99999999999999999999999"],
    "--method": ["loft", "lora", "dora", "full", "qlora", "", "LOFT"],
    "--target-modules": ["query", "q_proj", "query,value", "", "all-linear", ",,,", " ", "dense"],
    "--model": ["no-such-model", "/nonexistent/folder", "owner/name", "", "."],
    "--eval-data": ["/nonexistent.jsonl", "."],
    "--output-dir": ["", "DATAFILE"],
    "--overwrite": [None],
    "--resume": [None],
    "--no-such-option": ["1"],
}
COMPARE_VALUES = {
    "--ranks": ["1,2", "0", "a,b", "", "1,,2", "-1", "1000", "2"],
    "--methods": ["loft", "qlora", "", ",", "lora,dora", "full"],
    "--lr": ["loft=inf", "foo=1", "1e-3", "loft=", "=3", "lora=nan", "loft=1e-3,lora=2e-3"],
    "--max-steps": ["0", "1", "x"],
    "--no-full": [None],
    "--resume": [None],
    "--overwrite": [None],
}


def test_fuzz_option_values(bert, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loft.app.build, "start_run", refuse_to_write)
    monkeypatch.setattr(loft.app.compare, "_prepare_folder", refuse_to_write)
    monkeypatch.chdir(tmp_path)
    rng = random.Random(SEED + 1)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sentiment_records(24)))
    out = tmp_path / "out"
    accepted: list[list[str]] = []
    for i in range(N_OPTIONS):
        command = "compare" if i % 4 == 3 else "finetune"
        table = COMPARE_VALUES if command == "compare" else FINETUNE_VALUES
        argv = [command, "--model", str(bert), "--data", str(data), "-o", str(out), "--max-steps", "1", "-b", "4", "--quiet"]
        for option in rng.sample(sorted(table), rng.randrange(1, 4)):
            value = rng.choice(table[option])
            if value == "DATAFILE":
                value = str(data)
            argv += [option] if value is None else [option, value]
        before = snapshot(tmp_path, out)
        code, _ = run(argv, capsys)
        assert snapshot(tmp_path, out) == before, argv
        assert not out.exists()
        if code == 0 and command == "finetune":
            accepted.append(argv)
    assert 10 <= len(accepted) < N_OPTIONS, len(accepted)
    # a few accepted command lines for real: exit 0, and only the output folder changes
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    def runnable(argv):  # short runs into ``out`` only
        steps = [argv[i + 1] for i, a in enumerate(argv) if a == "--max-steps"]
        return "--epochs" not in argv and "--output-dir" not in argv and set(steps) == {"1"}

    candidates = [a for a in accepted if runnable(a)]
    assert len(candidates) >= 3
    for argv in rng.sample(candidates, 3):
        argv = argv + ["--max-eval", "4"]
        before = snapshot(tmp_path, out)
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err
        assert code == 0 and "Traceback" not in err, (argv, err)
        assert snapshot(tmp_path, out) == before, argv
        assert (out / "metrics.json").is_file()
        shutil.rmtree(out)
