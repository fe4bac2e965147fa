#!/usr/bin/env bash
# The GPU checks, as one command for a machine with an NVIDIA GPU (see benchmarks/RESULTS.md):
# build the CUDA extension, run every op test on CUDA (CUDA C++ and Triton backends), then the
# benchmarks at Stable Diffusion 1.5 scale. Results land in ${OUT:-gpu-results}/.
# Needs torch with CUDA, nvcc, triton, and dcfast's Python dependencies (diffusers, peft, ...).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

DCFAST_FORCE_CUDA=1 python -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -20 | tee "$out/build.log"
python -c "import dcfast, json; print(json.dumps(dcfast.backend_info(), indent=1))" | tee "$out/backends.json"
python -m pytest -q python_tests/ops -k cuda 2>&1 | tee "$out/ops_tests.log" | tail -5
python -m pytest -q python_tests/test_scores.py python_tests/test_fisher.py 2>&1 | tail -3 | tee -a "$out/ops_tests.log"
for target in dc-scores fisher; do
  python -m dcfast.cli bench "$target" --device cuda --json "$out/bench_$target.json" 2>&1 | tee "$out/bench_$target.log" | tail -12
done
