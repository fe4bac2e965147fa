#!/usr/bin/env bash
# The GPU validation as one command, for a bare machine with one NVIDIA GPU (H100/H200), python3 with a
# CUDA torch, triton and nvcc, and nothing reachable outside it. Under 8 minutes (a budget every step's
# timeout respects; GPU_CHECK_BUDGET_S, default 450 s). In order:
#   deps       wheels the machine lacks (setuptools, wheel, ninja, pytest) from .whl/; diffusers on its own
#   build      DCFAST_FORCE_CUDA=1 MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 pip install --no-build-isolation -e .
#   backends   stops here unless backend_info()["cuda"] == "cuda-c++" and every op has a CUDA kernel
#   op-tests   python_tests/ops: every backend against the reference, on CUDA and (Triton interpreted) CPU
#   memcheck, racecheck   compute-sanitizer on benchmarks/gpu_sanitize.py (both ops, odd shapes, every plan)
#   microbench CUDA-event timings of fisher_accumulate_ (CUDA C++, Triton, bmm, einsum reference) and
#              dc_error forward/backward in GB/s at SD 1.5 shapes (benchmarks/gpu_microbench.py)
#   sd15-dc-scores   `dcfast bench dc-scores --device cuda` (SD 1.5's U-Net config, random weights, fp16)
# Every step's log and JSON land in $OUT (default gpu-results/), with summary.json (status and seconds
# per step). Exit status 1 when any step failed.
#
# .whl/ is ignored by git: build it on a machine with the package index, then carry it with the tree
# (python 3.12 wheels; all pure Python but ninja, which is version-independent):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#     --platform manylinux_2_17_x86_64 -d .whl diffusers==0.42.1 importlib_metadata zipp setuptools wheel ninja pytest pluggy iniconfig \
#     pygments pytest-benchmark py-cpuinfo packaging
# Device tool call: run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1
budget=${GPU_CHECK_BUDGET_S:-450}
SECONDS=0
status=()

# step NAME LIMIT_S COMMAND...: run with its log in $out/NAME.log, within the remaining budget.
step() {
  local name=$1 limit=$2 started=$SECONDS rc=0
  shift 2
  local left=$((budget - SECONDS))
  if [ "$left" -lt 15 ]; then
    echo "== $name: skipped, ${left}s of the budget left"
    status+=("$name skipped 0")
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (at ${SECONDS}s, limit ${limit}s)"
  timeout "$limit" bash -c 'set -euo pipefail; "$@"' _ "$@" >"$out/$name.log" 2>&1 || rc=$?
  tail -n "$([ "$rc" -eq 0 ] && echo 4 || echo 40)" "$out/$name.log"
  status+=("$name $([ "$rc" -eq 0 ] && echo ok || echo "failed(rc=$rc)") $((SECONDS - started))")
  return 0
}

finish() {
  printf '%s\n' "${status[@]}" >"$out/status.txt"
  python3 - "$out/status.txt" "$out/summary.json" "$SECONDS" <<'EOF'
import json
import sys

steps = [dict(zip(("step", "status", "seconds"), line.split())) for line in open(sys.argv[1]) if line.strip()]
json.dump({"steps": steps, "total_seconds": int(sys.argv[3])}, open(sys.argv[2], "w"), indent=1)
for s in steps:
    print(f"{s['step']:<16} {s['status']:<16} {s['seconds']:>4} s")
print(f"total {sys.argv[3]} s")
EOF
  if grep -q failed "$out/status.txt"; then exit 1; fi
  exit 0
}

# Install from .whl/ only what is missing (pip never reaches out: --no-index). The build and test tools
# first; diffusers (only the SD 1.5 bench needs it) on its own, so a failure there blocks nothing else.
from_wheels() {
  [ -d .whl ] || { echo "no .whl/ folder: carry it with the tree (see the header of this script)"; return 1; }
  echo "installing from .whl: $*"
  python3 -m pip install -q --no-index --find-links .whl "$@"
}

deps() {
  local missing=()
  python3 -c "import setuptools, wheel" 2>/dev/null || missing+=(setuptools wheel)
  command -v ninja >/dev/null 2>&1 || python3 -c "import ninja" 2>/dev/null || missing+=(ninja)
  python3 -c "import pytest, pytest_benchmark" 2>/dev/null || missing+=(pytest pytest-benchmark)
  if [ "${#missing[@]}" -eq 0 ]; then echo "nothing missing"; else from_wheels "${missing[@]}"; fi
}

deps_diffusers() {
  if python3 -c "import diffusers" 2>/dev/null; then
    echo "diffusers present"
  elif ! from_wheels diffusers; then
    # Its pins (e.g. huggingface-hub) may not match what transformers brought: try it against those.
    echo "retrying without dependencies"
    from_wheels --no-deps diffusers importlib_metadata zipp
  fi
  python3 -c "import diffusers, transformers; print('diffusers', diffusers.__version__)"
}

build() {
  DCFAST_FORCE_CUDA=1 MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 \
    python3 -m pip install --no-build-isolation --no-deps -e .
}

backends() {
  python3 - "$out/backends.json" <<'EOF'
import json
import sys

import torch

import dcfast

info = dcfast.backend_info()
info.update(device=torch.cuda.get_device_name(), torch_cuda=torch.version.cuda)
ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("dcfast::"))
info["cuda_kernels"] = {op: torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA") for op in ops}
json.dump(info, open(sys.argv[1], "w"), indent=1, default=str)
print(json.dumps(info, default=str))
assert info["cuda"] == "cuda-c++" and ops and all(info["cuda_kernels"].values()), "the CUDA C++ kernels did not load"
EOF
}

sanitizer() {
  local tool=$1 bin
  bin=$(command -v compute-sanitizer || true)
  for home in "${CUDA_HOME:-}" /usr/local/cuda; do
    [ -z "$bin" ] && [ -n "$home" ] && [ -x "$home/bin/compute-sanitizer" ] && bin=$home/bin/compute-sanitizer
  done
  if [ -z "$bin" ]; then echo "compute-sanitizer not found (CUDA_HOME/bin, /usr/local/cuda/bin, PATH)"; return 1; fi
  # Without the caching allocator every tensor is its own allocation, so an overrun cannot land in a
  # neighbour inside one cached block unnoticed.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$bin" --tool "$tool" --error-exitcode 1 python3 benchmarks/gpu_sanitize.py
}

sd15() {
  if ! python3 -c "import diffusers" 2>/dev/null; then echo "diffusers missing (see deps.log)"; return 1; fi
  # What `dcfast bench dc-scores --device cuda --json FILE` runs, without the CLI's demo imports.
  python3 - "$out/bench_dc_scores.json" <<'EOF'
import json
import sys

from dcfast.bench import dc_scores

result = dc_scores.run(device="cuda")
json.dump(result, open(sys.argv[1], "w"), indent=1, default=str)
print(json.dumps(result["summary"], default=str))
EOF
}

export out
export -f from_wheels deps deps_diffusers build backends sanitizer sd15
step deps 60 deps
step deps-diffusers 60 deps_diffusers
step build 240 build
step backends 60 backends
if ! grep -q '"cuda": "cuda-c++"' "$out/backends.json" 2>/dev/null; then
  echo "stopping: the CUDA C++ backend is not live (see $out/build.log, $out/backends.log)"
  finish
fi
step op-tests 150 python3 -m pytest -q -p no:cacheprovider python_tests/ops
step memcheck 90 sanitizer memcheck
step racecheck 90 sanitizer racecheck
step microbench 150 python3 benchmarks/gpu_microbench.py --quick --json "$out/microbench.json"
step sd15-dc-scores 120 sd15
finish
