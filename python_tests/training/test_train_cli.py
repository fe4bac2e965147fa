"""`dcfast train --config run.yaml` with flag overrides, and its error exit."""
import yaml

from dcfast.cli.main import main
from dcfast.io.runs import Run, read_json, task_dir


def test_dcfast_train_from_yaml(tmp_path, model_dir, concepts, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "pretrained_model_name_or_path": str(model_dir), "output_dir": str(tmp_path / "run"), "method": "ewc-dc",
        "tasks": [{"images": str(concepts["dog"]), "class_word": "dog"}, {"images": str(concepts["mug"]), "class_word": "mug"}],
        "max_train_steps": 200, "num_dc_timesteps": 1, "fisher_num_timesteps": 1}))
    code = main(["train", "--config", str(path), "--max_train_steps", "2", "--train_batch_size", "1",
                 "--gradient_accumulation_steps", "2", "--rank", "2", "--seed", "3"])
    assert code == 0
    assert Run(tmp_path / "run").finished_tasks() == [1, 2]
    saved = read_json(task_dir(tmp_path / "run", 2) / "config.json")
    assert (saved["max_train_steps"], saved["rank"], saved["seed"], saved["gradient_accumulation_steps"]) == (2, 2, 3, 2)
    assert "task_2: final_loss=" in capsys.readouterr().out


def test_dcfast_train_bad_config_exits_2(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"pretrained_model_name_or_path": str(tmp_path / "none"), "method": "nope",
                                    "tasks": [{"images": str(tmp_path / "missing"), "class_word": "dog"}]}))
    assert main(["train", "--config", str(path), "--max_train_steps", "-1"]) == 2
    err = capsys.readouterr().err
    for field in ("pretrained_model_name_or_path:", "method: unknown method 'nope'", "tasks[0].images:", "max_train_steps:"):
        assert field in err


def test_bf16_mixed_precision_in_a_fresh_process(tmp_path, model_dir, concepts):
    """accelerate fixes mixed precision per process, so this run gets its own interpreter."""
    import os
    import subprocess
    import sys

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "pretrained_model_name_or_path": str(model_dir), "output_dir": str(tmp_path / "run"), "method": "dsc+ewc-dc",
        "tasks": [{"images": str(concepts["dog"]), "class_word": "dog"}, {"images": str(concepts["mug"]), "class_word": "mug"}],
        "max_train_steps": 1, "num_dc_timesteps": 1, "fisher_num_timesteps": 1, "dsc_iterations": 1}))
    done = subprocess.run([sys.executable, "-m", "dcfast.cli.main", "train", "--config", str(path), "--mixed_precision", "bf16"],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert Run(tmp_path / "run").finished_tasks() == [1, 2]
    assert read_json(task_dir(tmp_path / "run", 2) / "config.json")["mixed_precision"] == "bf16"


def test_cli_prints_run_summary_and_phase_progress(make_config, tmp_path, capsys):
    """The run summary (INFO) reaches stderr through the CLI's handler; the Fisher phase shows a bar."""
    import logging

    import yaml

    from dcfast.cli.main import main

    config = make_config("ewc", words=("dog",), max_train_steps=1)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    try:
        assert main(["train", "--config", str(path)]) == 0
    finally:
        logger = logging.getLogger("dcfast")
        for handler in [h for h in logger.handlers if getattr(h, "_dcfast", False)]:
            logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
    err = capsys.readouterr().err
    assert "***** dcfast.train: method=ewc *****" in err and "steps per task = 1" in err
    assert "task 1 Fisher (ewc)" in err
    assert "[RANK" not in err and "[process" not in err  # one process: no process tags on its log lines


def test_loading_a_task_state_is_quiet(make_config, capfd):
    """eval loads every task state: no diffusers loading bars or 'No LoRA keys ... CLIPTextModel' notices."""
    from diffusers.utils import logging as diffusers_logging

    from dcfast.io.runs import load_pipeline
    from dcfast.training.trainer import train

    config = make_config("lora", words=("dog",), max_train_steps=1)
    train(config)
    capfd.readouterr()
    diffusers_logging.enable_progress_bar()  # as a fresh process has them (another test may have turned them off)
    before = diffusers_logging.get_verbosity()
    load_pipeline(config.output_dir, 1)
    out, err = capfd.readouterr()
    assert "Loading pipeline components" not in err + out and "No LoRA keys" not in err + out
    assert diffusers_logging.get_verbosity() == before and diffusers_logging.is_progress_bar_enabled()


def test_runs_at_two_mixed_precisions_in_one_process(make_config, tmp_path):
    """accelerate refuses a second mixed precision in a process; `train` starts its state afresh, so a notebook can
    run fp32 and then bf16 (and the benchmarks can switch)."""
    from dcfast.training.trainer import train

    for precision in ("no", "bf16"):
        config = make_config("lora", words=("dog",), max_train_steps=1, mixed_precision=precision,
                             output_dir=str(tmp_path / precision))
        train(config, progress=False)
        assert read_json(task_dir(config.output_dir, 1) / "config.json")["mixed_precision"] == precision
