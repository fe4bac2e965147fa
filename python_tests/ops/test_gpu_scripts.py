"""The prepared GPU run (benchmarks/gpu_check.sh) must not fail on its own bugs when a GPU is finally
lent: its Python parts run here as dry runs on CPU (Triton interpreted, tiny shapes), and the shell
script is syntax-checked."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dcfast import _backend

ROOT = Path(__file__).resolve().parents[2]
needs_triton = pytest.mark.skipif(not _backend.triton_available(), reason="triton not installed")


def _dry_run(script, *args):
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    child = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--device", "cpu", *args],
                           env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-4000:]
    return child.stdout


@needs_triton
def test_sanitizer_workload_dry_run():
    assert "all checks passed on cpu" in _dry_run("gpu_sanitize.py")


@needs_triton
def test_microbench_dry_run(tmp_path):
    _dry_run("gpu_microbench.py", "--json", str(tmp_path / "bench.json"))
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    providers = {(row["op"], row["provider"]) for row in rows}
    assert {("fisher_accumulate_", p) for p in ("einsum-reference", "bmm", "triton")} <= providers
    assert {("dc_error", p) for p in ("reference", "triton")} <= providers
    assert all(row["max_rel_err"] < 1e-3 and row["median_ms"] > 0 for row in rows)


def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")], check=True)
