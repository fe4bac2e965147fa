"""dcfast.eval.report and `dcfast eval`: every output file exists and parses; comparisons across runs."""
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from dcfast.cli.main import main as dcfast_main
from dcfast.eval.evaluation import EvalConfig, evaluate
from dcfast.eval.report import compare, load_metrics, write_report

import toy_runs  # python_tests/toy_runs.py, on sys.path through conftest.py

pytestmark = pytest.mark.usefixtures("fake_runs")


def _check_outputs(eval_dir: Path, num_tasks: int) -> dict:
    data = json.loads((eval_dir / "metrics.json").read_text())
    assert len(data["accuracy"]) == len(data["mmd"]) == num_tasks
    assert data["accuracy"][num_tasks - 1][0] is None  # unseen entries are null
    assert set(data["summary"]) >= {"ammd", "bwt_mmd", "final_accuracy", "forgetting", "seconds_per_image"}
    report = (eval_dir / "report.md").read_text()
    assert data["features"] in report and "| AMMD |" in report
    pngs = ["accuracy.png", "mmd.png"] + [f"grid_concept_{i}.png" for i in range(1, num_tasks + 1)]
    for name in pngs:
        with Image.open(eval_dir / name) as img:
            img.verify()
        assert f"({name})" in report
    assert not [f for f in os.listdir(eval_dir) if f.startswith(".")]  # no temp files left behind
    return data


def test_write_report_outputs_parse(tmp_path):
    run = toy_runs.make_run(str(tmp_path), forget=0.3)
    result = evaluate(run, num_images=4, config=EvalConfig(num_inference_steps=3, guidance_scale=1.0,
                                                           stages=((4, 1),), progress=False))
    paths = write_report(result)
    data = _check_outputs(tmp_path / "eval", 2)
    assert set(paths) >= {"metrics", "report", "accuracy", "mmd", "grid_concept_1", "grid_concept_2"}
    assert data["summary"]["bwt_mmd"] == pytest.approx(result.summary["bwt_mmd"])
    with Image.open(paths["grid_concept_1"]) as grid:  # rows: real, state 1, state 2
        assert grid.height > grid.width / 4


def test_cli_eval_three_tasks_and_compare(tmp_path, capsys):
    """`dcfast eval` on a 3-task tiny-model run (random latent U-Net + VAE), then --compare with a second run."""
    run_a = toy_runs.make_run(str(tmp_path / "a"), colours=(toy_runs.RED, toy_runs.BLUE, toy_runs.GREEN),
                              model="tiny", method="lora", n_eval=3)
    run_b = toy_runs.make_run(str(tmp_path / "b"), colours=(toy_runs.RED, toy_runs.BLUE, toy_runs.GREEN),
                              model="tiny", method="ewc-dc", n_eval=3)
    fast = ["--num_images", "2", "--num_inference_steps", "2", "--stages", "2:1,4:1", "--quiet"]
    assert dcfast_main(["eval", "--run", run_a, *fast]) == 0
    _check_outputs(tmp_path / "a" / "eval", 3)
    assert dcfast_main(["eval", "--run", run_a, *fast, "--compare", run_b]) == 0
    _check_outputs(tmp_path / "b" / "eval", 3)  # evaluated on the way
    compare_dir = tmp_path / "a" / "eval" / "compare"
    rows = json.loads((compare_dir / "compare.json").read_text())
    assert [r["method"] for r in rows] == ["lora", "ewc-dc"]
    table = (compare_dir / "compare.md").read_text()
    assert "| lora |" in table and "| ewc-dc |" in table and "AMMD" in table
    with Image.open(compare_dir / "compare.png") as img:
        img.verify()
    assert "comparison:" in capsys.readouterr().out


def test_compare_needs_evaluated_runs(tmp_path):
    with pytest.raises(FileNotFoundError, match="eval/metrics.json not found"):
        compare([str(tmp_path)], str(tmp_path / "out"))
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "metrics.json").write_text("{not json")
    with pytest.raises(ValueError, match="metrics.json is corrupt"):
        load_metrics(str(tmp_path))


def test_cli_rejects_bad_stages():
    with pytest.raises(SystemExit):
        dcfast_main(["eval", "--run", "x", "--stages", "8-2"])


def test_cli_eval_samples_with_the_runs_guidance_unless_told(tmp_path):
    """`dcfast eval` samples with the run's validation_guidance_scale (a world run's is the base model's 5), or
    with --guidance_scale; a run written without the field gets TrainConfig's default."""
    from dcfast.training.config import TrainConfig
    from dcfast.io.runs import Run

    run = toy_runs.make_run(str(tmp_path / "r"), model="tiny", method="lora", n_eval=2)
    assert Run(run).sampling_guidance() == TrainConfig.validation_guidance_scale
    run_json = Path(run) / "run.json"
    stored = json.loads(run_json.read_text())
    run_json.write_text(json.dumps({**stored, "config": {**stored["config"], "validation_guidance_scale": 3.0}}))
    fast = ["--num_images", "2", "--num_inference_steps", "2", "--stages", "2:1", "--quiet"]
    for extra, expected in (([], 3.0), (["--guidance_scale", "2"], 2.0)):
        assert dcfast_main(["eval", "--run", run, *fast, *extra]) == 0
        assert json.loads((Path(run) / "eval" / "metrics.json").read_text())["config"]["guidance_scale"] == expected
    assert Run(tmp_path / "no-run").sampling_guidance() == TrainConfig.validation_guidance_scale
