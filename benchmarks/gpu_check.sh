#!/usr/bin/env bash
# Prepared CUDA checks for a lent GPU machine: run from the repo root, results under $OUT (or ./gpu-out).
# Usage: bash benchmarks/gpu_check.sh   (about 3-5 minutes on one H100, set-up included)
set -euo pipefail
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
python -m venv .venv-gpu && . .venv-gpu/bin/activate
# Use the machine's torch if it has a CUDA build; otherwise install one.
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
  || pip install -q torch
pip install -q -e ".[test]"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
python -m pytest -q -m cuda -p no:cacheprovider 2>&1 | tee "$OUT/pytest_cuda.txt"
python benchmarks/bench_meta_step.py --device cuda --resolution 64 --repeats 3 --json "$OUT/bench_64.json" 2>&1 | tee "$OUT/bench_64.txt"
python benchmarks/bench_meta_step.py --device cuda --resolution 178 --repeats 3 --json "$OUT/bench_178.json" 2>&1 | tee "$OUT/bench_178.txt"
