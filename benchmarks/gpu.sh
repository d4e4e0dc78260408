#!/usr/bin/env bash
# One command for a GPU machine (issue 14, item 5): the CUDA tests, then the benchmark at a
# 1B-class shape in bfloat16 (LoFT vs LoRA + AdamW whole step, optimizer step, peak device
# memory, host syncs per step), written to benchmarks/results/perf_gpu.json.
#
#   bash benchmarks/gpu.sh            # extra arguments go to benchmarks/perf.py (e.g. --samples 10)
#
# Needs a CUDA build of torch in the environment (scripts/setup.sh installs the CPU build; on a
# GPU machine install the same torch version's CUDA wheel). Without a GPU it says so and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "benchmarks/gpu.sh: no CUDA GPU here (torch.cuda.is_available() is False): nothing to run."
    exit 0
fi
mkdir -p benchmarks/results
"$PY" -c 'import torch; print("GPU:", torch.cuda.get_device_name(), "| torch", torch.__version__)'
# the device axis of the test matrix: every CUDA parametrisation (they are skipped on the CPU)
"$PY" -m pytest -q -rs tests/test_optim_exactness.py tests/test_syncs.py tests/test_fused.py -k cuda \
    | tee benchmarks/results/gpu_tests.txt
"$PY" benchmarks/perf.py --device cuda --dtype bfloat16 --model 1b --layers 16 --batch 4 --seq 512 \
    --out benchmarks/results/perf_gpu.json "$@"
