#!/usr/bin/env bash
# Prepared CUDA checks for a lent GPU machine, run from the repo root; results go to $OUT
# (default ./gpu-out). It uses the machine's own python3 and CUDA build of torch, and imports
# ncp from the source tree (no install, no network). pytest and hypothesis must be importable
# (carry them as wheels where the machine lacks them); test files whose optional packages are
# missing there (higher) are skipped by pytest.importorskip.
set -uo pipefail
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; assert torch.cuda.is_available(); print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt" || exit 1
python3 -m pytest -q -m cuda -p no:cacheprovider -rs tests 2>&1 | tee "$OUT/pytest_cuda.txt" || echo "CUDA TESTS FAILED"
for res in 64 178; do
  python3 benchmarks/bench_meta_step.py --device cuda --resolution "$res" --repeats 5 \
    --json "$OUT/bench_$res.json" 2>&1 | tee "$OUT/bench_$res.txt"
done
# the step recorded as a CUDA graph (ncp.GraphedMetaStep) against MAML K=16, eager and recorded
for res in 64 178; do
  python3 benchmarks/bench_graphed.py --device cuda --resolution "$res" --repeats 10 \
    --json "$OUT/graphed_$res.json" 2>&1 | tee "$OUT/graphed_$res.txt"
done
python3 benchmarks/bench_scale.py --device cuda --resolutions 64 256 512 1024 \
  --configs "K=16 r=0.01 L=5" "K=16 r=0.25 L=5" --json "$OUT/scale.json" 2>&1 | tee "$OUT/scale.txt"
# 2048x2048 (4,194,304 points) with the inner steps recomputed in backward, and its CUDA peak
python3 benchmarks/bench_scale.py --device cuda --resolutions 1024 2048 \
  --configs "K=16 r=0.01 L=5 recompute" --repeats 0 --json "$OUT/scale_recompute.json" 2>&1 \
  | tee "$OUT/scale_recompute.txt"
