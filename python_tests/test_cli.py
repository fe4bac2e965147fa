"""The `dcfast` command line: parsing, errors, and the bench command's contract."""
import json
import re

import pytest

from dcfast.cli.main import build_parser, main


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "bench" in capsys.readouterr().out


def test_commands_drop_known_third_party_noise():
    """The entry point drops transformers' torchvision notice (dcfast never runs an image processor), which a bare
    import of diffusers' pipelines prints here; other logs stay."""
    import importlib.util
    import subprocess
    import sys

    load = "from diffusers import StableDiffusionPipeline"
    quiet = subprocess.run([sys.executable, "-c", f"from dcfast.cli.main import quiet_known_noise; quiet_known_noise(); {load}"],
                           capture_output=True, text=True, check=True)
    assert "requires torchvision" not in quiet.stderr + quiet.stdout
    if importlib.util.find_spec("torchvision") is None:  # the noise exists on this machine: the filter is what hides it
        plain = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, check=True)
        assert "requires torchvision" in plain.stderr


def test_the_public_train_function_survives_importing_its_package():
    """`dcfast.train` is the function; the training layer's folder is `training` so that importing it cannot
    replace the function with a module."""
    import dcfast
    import dcfast.training.trainer  # noqa: F401

    assert callable(dcfast.train) and dcfast.train.__module__ == "dcfast.training.trainer"


def test_unknown_bench_target_is_rejected(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["bench", "nothing"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_bench_dc_scores_quick_prints_headline_and_json(tmp_path, capsys, monkeypatch):
    # The command's contract on a smaller problem; the reference sizes are for benchmarking, not CI.
    monkeypatch.setattr("dcfast.bench.dc_scores.SHAPE", (2, 2, 2))
    monkeypatch.setattr("dcfast.bench.dc_scores.GRAD_SHAPE", (1, 2, 4))
    out = tmp_path / "bench.json"
    assert main(["bench", "dc-scores", "--quick", "--json", str(out)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    match = re.fullmatch(r"speedup_vs_naive=(\S+) speedup_vs_peer=(\S+) max_abs_err=(\S+)", last)
    assert match, last
    assert float(match.group(3)) <= 1e-5
    data = json.loads(out.read_text())
    assert {"rows", "summary", "environment"} <= set(data)
    assert data["summary"]["grad_rel_err"] <= 1e-5
    assert data["summary"]["grad_peak_mem_ratio"] < 1.0


def test_bench_cuda_without_gpu_is_a_clear_error(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: --device cuda is valid here")
    assert main(["bench", "dc-scores", "--quick", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_bench_train_quick_reports_every_method_against_lora(capsys, monkeypatch, tmp_path):
    from dcfast.training.methods import METHODS

    monkeypatch.setattr("dcfast.bench.train.METHODS", {name: METHODS[name] for name in ("lora", "ewc-dc", "joint")})
    monkeypatch.setattr("dcfast.bench.train.QUICK_GRID", ((2,), (2,)))
    monkeypatch.setattr("dcfast.bench.train.DC_EVERY", (2,))
    assert main(["bench", "train", "--quick", "--json", str(tmp_path / "train.json")]) == 0
    out = capsys.readouterr().out
    assert "ewc-dc" in out
    result = json.loads((tmp_path / "train.json").read_text())
    grid = result["grid"]
    # the (k, T) grid, then dc_every 1 and 2 at EWC-DC's default (4, 4) over 5 steps (timed: steps 1-4)
    assert [(r["k"], r["T"], r["dc_denoise_rows"], r["dc_every"]) for r in grid] == [
        (2, 2, False, 1), (2, 2, True, 1), (4, 4, False, 1), (4, 4, False, 2)]
    assert [r["unet_rows_per_image"] for r in grid] == [5, 4, 17, 9]
    assert [r["sweep"] for r in grid] == ["k_T", "k_T", "dc_every", "dc_every"]
    assert all(r["ratio_vs_lora"] == pytest.approx(r["mean_step_s"] / r["lora_step_s"]) for r in grid)
    assert set(result["summary"]["ewc_dc_grid"]) == {"k2_T2", "k2_T2_rows", "k4_T4_every1", "k4_T4_every2"}
    # joint's phase holds both tasks: its seconds are the phase's, never less than its steps' (was negative)
    assert all(r["consolidation_s"] >= 0 for r in result["rows"])
    match = re.search(r"^max_step_ratio_vs_lora=(\S+)$", out, re.M)
    assert match and float(match.group(1)) >= 1.0  # lora's own ratio is 1, the max can't be lower


@pytest.mark.parametrize("device, expected", [
    ("cuda", r"--device: 'cuda' is not available: .*; use --device cpu"),
    ("gpu", r"--device: 'gpu' is not a torch device"),
])
def test_eval_device_checked_before_any_work(tmp_path, capsys, device, expected):
    import re

    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this torch has a usable GPU")
    assert main(["eval", "--run", str(tmp_path / "no-run"), "--device", device]) == 2
    assert re.search(expected, capsys.readouterr().err)


@pytest.mark.parametrize("flags, output_dir", [
    ([], "dcfast-bench-methods"),
    (["--adapter", "vera"], "dcfast-bench-methods-vera"),  # a LoRA run's folder refuses VeRA runs: not the same one
    (["--adapter", "vera", "--output_dir", "mine"], "mine"),
])
def test_bench_methods_output_dir_follows_the_adapter(monkeypatch, flags, output_dir):
    seen = {}

    def fake_run(**kwargs):
        seen.update(kwargs)
        return {"summary": {}}

    monkeypatch.setattr("dcfast.experiments.bench_methods.run", fake_run)
    monkeypatch.setattr("dcfast.cli.main.BENCHMARKS", {"methods": ("dcfast.experiments.bench_methods", "")})
    assert main(["bench", "methods", *flags]) == 0
    assert seen["output_dir"] == output_dir
