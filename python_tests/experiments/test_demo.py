"""The built-in demo: shipped base model, photo concepts, `dcfast demo` end to end, `dcfast bench methods`.

End-to-end runs use `dcfast.models.tiny.tiny()` (16x16 images) as the base model so they take seconds;
the shipped 32x32 base model has its own load and prompt-following checks.
"""
import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dcfast.experiments.runner import BASE_MODEL, DemoConfig
from dcfast.experiments.photos import DEMO_CONCEPTS, write_demo_concepts
from dcfast.world import scenes as world

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "pretrain_tiny_base.py"


@pytest.fixture(scope="module")
def pretrain_script():
    spec = importlib.util.spec_from_file_location("pretrain_tiny_base", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from dcfast.models.tiny import tiny

    path = tmp_path_factory.mktemp("tiny-model")
    tiny(seed=0).save_pretrained(path)
    world.write_training_factors(path)  # it never saw a novel shape: the novel sequences (the default) accept it
    return path


# --- the shipped base model ---------------------------------------------------------------------

def test_shipped_base_model_is_small_safetensors_and_packaged():
    files = [p for p in BASE_MODEL.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 20 * 2**20
    weights = {p.parent.name for p in files if p.suffix == ".safetensors"}
    assert weights == {"unet", "vae", "text_encoder"}
    assert not any(p.suffix in (".bin", ".pt", ".ckpt") for p in files)
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert 'dcfast = ["assets/**/*"]' in pyproject


def test_shipped_base_model_loads_through_both_paths():
    from diffusers import StableDiffusionPipeline

    from dcfast.models.loading import load_components

    components = load_components(BASE_MODEL)
    assert components.vae is not None and components.resolution == 32
    pipe = StableDiffusionPipeline.from_pretrained(BASE_MODEL, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo of a red star", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
    # Demo class words are whole tokens (their embeddings initialise the modifier tokens).
    for concept in DEMO_CONCEPTS:
        assert pipe.tokenizer.tokenize(concept.class_word) == [concept.class_word + "</w>"]


# Prompts of every shape; the base model's full-sample oracle scores are in its model card.
BASE_PROMPTS = [("red", "star"), ("blue", "ring"), ("yellow", "cross"), ("green", "triangle"), ("purple", "square"),
                ("orange", "circle")]


def test_shipped_base_model_draws_its_world():
    """The oracle reads the prompt's shape and colour on most CFG samples of the shipped base model.

    8 samples per prompt (fixed noise, DDIM 20 steps, the world's guidance 5); the bar is below the model card's
    (shape >= 85%, colour >= 90% over 8 samples of every colour x shape) to leave room for 48 samples' spread.
    """
    from diffusers import StableDiffusionPipeline

    from dcfast.world import scenes as world
    from dcfast.experiments.regimes import WORLD_TRAIN
    from dcfast.world.oracle import load_oracle, read_attributes
    from dcfast.eval.sampling import generate

    pipe = StableDiffusionPipeline.from_pretrained(BASE_MODEL, local_files_only=True)
    oracle = load_oracle()
    shape_hits, colour_hits = [], []
    for k, (colour, shape) in enumerate(BASE_PROMPTS):
        images = generate(pipe, f"a photo of a {colour} {shape}", 8, num_inference_steps=20,
                          guidance_scale=WORLD_TRAIN["validation_guidance_scale"],
                          generator=torch.Generator().manual_seed(k))
        reading = read_attributes(oracle, images)
        shape_hits.append(float((reading["shape"] == world.SHAPES.index(shape)).double().mean()))
        colour_hits.append(float((reading["colour"] == world.COLOUR_NAMES.index(colour)).double().mean()))
    assert np.mean(shape_hits) >= 0.7 and np.mean(colour_hits) >= 0.75, (shape_hits, colour_hits)


def test_pretraining_data_holds_no_demo_photo(pretrain_script):
    sources = {c.source for c in DEMO_CONCEPTS}
    assert not sources & set(pretrain_script.VAE_EXTRA)
    from dcfast.world import scenes as world

    assert not {c.class_word for c in DEMO_CONCEPTS} & set(world.caption_words())


def test_pretraining_zero_snr_schedule_ends_in_pure_noise_and_predicts_v(pretrain_script, tmp_path):
    """--zero_snr_steps: the last training step is pure noise (no colour leaks through x_T) and the target is v."""
    plain, zero = pretrain_script.noise_scheduler(), pretrain_script.noise_scheduler(zero_snr=True)
    assert float(plain.alphas_cumprod[-1]) > 1e-3 and float(zero.alphas_cumprod[-1]) == 0.0
    assert zero.config.prediction_type == "v_prediction" and zero.config.timestep_spacing == "trailing"
    from dcfast.engine.targets import prediction_type

    assert prediction_type(zero) == "v_prediction"  # dcfast trains and scores such a model against v
    for refused in (["--zero_snr_steps", "10", "--snr_gamma", "5"], ["--unet_steps", "0", "--zero_snr_steps", "0"],
                    ["--zero_snr_steps", "-1"], ["--init_from", str(BASE_MODEL), "--unet_steps", "10"]):
        with pytest.raises(SystemExit):  # refused before any work (and never near the shipped base)
            pretrain_script.main(refused + ["--quick", "--output", str(tmp_path / "never")])
    assert not list(tmp_path.iterdir())


def test_pretraining_quick_run_ends_at_zero_snr_and_saves_a_model_dcfast_loads(pretrain_script, tmp_path):
    """Both phases of a smoke run (epsilon, then zero SNR): the saved scheduler samples from pure noise with
    v-prediction, and the directory loads as a pipeline that draws."""
    from diffusers import StableDiffusionPipeline

    from dcfast.eval.sampling import pipeline_prediction_type, generate

    output = tmp_path / "base"
    pretrain_script.main(["--quick", "--zero_snr_steps", "5", "--eval_samples", "0", "--output", str(output)])
    scheduler = json.loads((output / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["rescale_betas_zero_snr"] and scheduler["set_alpha_to_one"]
    assert scheduler["timestep_spacing"] == "trailing"
    card = (output / "README.md").read_text()
    assert '"unet_steps": 40' in card and '"zero_snr_steps": 5' in card and "zero terminal SNR" in card
    assert not (tmp_path / "base.partial").exists()
    pipe = StableDiffusionPipeline.from_pretrained(output, local_files_only=True)
    assert pipeline_prediction_type(pipe, "base") == "v_prediction"
    images = generate(pipe, "a photo of a red star", 2, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()


def test_pretraining_captions_name_a_subset_of_the_scene(pretrain_script):
    from dcfast.world import scenes as world

    scenes = world.random_scenes(200, seed=1)
    rng = np.random.default_rng(0)
    captions = [pretrain_script.sample_caption(scenes, i, rng) for i in range(200)]
    named = [c for c in captions if c]
    assert 0.03 < captions.count("") / 200 < 0.2  # classifier-free guidance dropout
    for i, caption in enumerate(captions):
        if caption:
            assert f" {world.SHAPES[scenes.shape[i]]}" in caption  # the shape is always named
            assert not any(f" {c} " in f" {caption} " for c in world.COLOUR_NAMES
                           if c not in (world.COLOUR_NAMES[scenes.colour[i]], world.COLOUR_NAMES[scenes.accent[i]]))
    assert len(set(named)) > 100  # subsets and scenes vary


# --- demo concepts --------------------------------------------------------------------------------

def test_demo_concepts_are_seeded_png_crops_with_held_out_split(tmp_path):
    tasks = write_demo_concepts(tmp_path / "a", num_tasks=2, resolution=16, num_train=3, num_eval=2, seed=0)
    again = write_demo_concepts(tmp_path / "b", num_tasks=2, resolution=16, num_train=3, num_eval=2, seed=0)
    assert [t["class_word"] for t in tasks] == ["cat", "cup"]
    for task, twin in zip(tasks, again):
        train = sorted(Path(task["images"]).glob("*.png"))
        held_out = sorted(Path(task["eval_images"]).glob("*.png"))
        assert len(train) == 3 and len(held_out) == 2
        arrays = [np.asarray(Image.open(p)) for p in train + held_out]
        assert all(a.shape == (16, 16, 3) for a in arrays)
        assert not any(np.array_equal(a, b) for a in arrays[:3] for b in arrays[3:])  # held-out crops differ
        twins = [np.asarray(Image.open(p)) for p in sorted(Path(twin["images"]).glob("*.png"))]
        assert all(np.array_equal(a, b) for a, b in zip(arrays[:3], twins))  # same seed, same images
    with pytest.raises(ValueError, match="tasks"):
        write_demo_concepts(tmp_path / "c", num_tasks=7)


# --- dcfast demo and dcfast bench methods -----------------------------------------------------------

def test_demo_command_end_to_end_writes_the_report(tiny_model_dir, tmp_path, capsys):
    from dcfast.cli import demo as cli_demo

    parser = argparse.ArgumentParser()
    cli_demo.add_parser(parser.add_subparsers())
    out = tmp_path / "demo"
    args = parser.parse_args(["demo", "--photos", "--method", "lora", "--tasks", "2", "--max_train_steps", "2",
                              "--num_images", "2", "--output_dir", str(out), "--base_model", str(tiny_model_dir),
                              "--quiet"])
    assert args.handler(args) == 0
    eval_dir = out / "lora" / "eval"
    printed = capsys.readouterr().out
    assert str(eval_dir / "report.md") in printed and "| lora |" in printed
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert len(metrics["accuracy"]) == 2 and set(metrics["summary"]) >= {"ammd", "bwt_mmd", "final_accuracy", "forgetting"}
    assert "AMMD" in (eval_dir / "report.md").read_text()
    for name in ("accuracy.png", "mmd.png", "grid_concept_1.png", "grid_concept_2.png"):
        with Image.open(eval_dir / name) as image:
            image.verify()
    assert sorted(p.name for p in (out / "concepts").iterdir()) == ["cat", "cup"]


def test_demo_arch_sdxl_runs_the_world_end_to_end_on_a_tiny_sdxl(tmp_path, capsys):
    """`dcfast demo --arch sdxl`: the tiny SDXL (random weights, said so) trains, evaluates and reports a world run."""
    from dcfast.cli import demo as cli_demo

    parser = argparse.ArgumentParser()
    cli_demo.add_parser(parser.add_subparsers())
    out = tmp_path / "demo"
    args = parser.parse_args(["demo", "--arch", "sdxl", "--method", "ewc-dc", "--tasks", "2", "--max_train_steps", "2",
                              "--num_images", "2", "--output_dir", str(out), "--quiet"])
    assert args.handler(args) == 0
    printed = capsys.readouterr().out
    assert "random weights" in printed and "| ewc-dc |" in printed
    assert json.loads((out / "base-sdxl" / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    metrics = json.loads((out / "ewc-dc" / "eval" / "metrics.json").read_text())
    assert len(metrics["fidelity"]["all"]) == 2
    assert (out / "ewc-dc" / "task_2" / "learned_embeds_2.safetensors").is_file()
    args = parser.parse_args(["demo", "--arch", "sdxl", "--base_model", str(out / "base-sdxl"), "--output_dir", str(out)])
    with pytest.raises(ValueError, match="drop --base_model"):
        args.handler(args)


def test_demo_with_several_methods_writes_the_comparison(tiny_model_dir, tmp_path):
    from dcfast.experiments.runner import run_demo

    config = DemoConfig(output_dir=str(tmp_path / "demo"), methods=["lora", "ewc"], num_tasks=2, max_train_steps=1,
                        num_train_images=2, num_eval_images=2, num_images=2, num_inference_steps=2,
                        base_model=str(tiny_model_dir), progress=False)
    result = run_demo(config, log=lambda line: None)
    assert [r["method"] for r in result["runs"]] == ["lora", "ewc"]
    assert "| lora |" in result["table"] and "| ewc |" in result["table"]
    rows = json.loads(Path(result["compare"]["json"]).read_text())
    assert [r["method"] for r in rows] == ["lora", "ewc"]
    with Image.open(result["compare"]["plot"]) as image:
        image.verify()
    with pytest.raises(ValueError, match="method"):
        run_demo(DemoConfig(output_dir=str(tmp_path / "bad"), methods=["sgd"], base_model=str(tiny_model_dir)))


def test_bench_methods_aggregates_over_seeds(tiny_model_dir, tmp_path, capsys):
    from dcfast.experiments import bench_methods as methods

    config = DemoConfig(num_tasks=2, max_train_steps=1, num_train_images=2, num_eval_images=2, num_images=2,
                        num_inference_steps=2, base_model=str(tiny_model_dir), progress=False)
    result = methods.run(seeds=2, methods=["lora", "c-lora", "joint"], output_dir=str(tmp_path / "bench"),
                         config=config)
    stats = result["stats"]["novel-same-class-test"]
    forgetting, final = capsys.readouterr().out.strip().splitlines()[-2:]  # the closing lines; joint never forgets
    assert forgetting == "forgetting " + " ".join(f"{m}={stats[m]['fidelity_forgetting']['mean']:.4g}"
                                                  for m in ("lora", "c-lora"))
    assert final == "final " + " ".join(f"{m}={stats[m]['final_fidelity']['mean']:.4g}" for m in ("lora", "c-lora", "joint"))
    result["rows"] = [r for r in result["rows"] if r["method"] != "joint"]
    assert [(r["method"], r["seed"]) for r in result["rows"]] == [("lora", 0), ("c-lora", 0), ("lora", 1), ("c-lora", 1)]
    for method in ("lora", "c-lora"):
        seeds = [r["summary"]["plasticity"] for r in result["rows"] if r["method"] == method]
        assert result["stats"]["novel-same-class-test"][method]["plasticity"]["mean"] == pytest.approx(np.mean(seeds))
        assert result["stats"]["novel-same-class-test"][method]["plasticity"]["std"] == pytest.approx(np.std(seeds, ddof=1))
    for lora, clora in zip(result["rows"][0::2], result["rows"][1::2]):  # the time ratio pairs runs of one seed
        assert lora["summary"]["train_vs_lora"] == 1.0
        assert clora["summary"]["train_vs_lora"] == pytest.approx(clora["summary"]["train_seconds"]
                                                                  / lora["summary"]["train_seconds"])
        assert lora["summary"]["final_accuracy"] is None  # fidelity only: DC accuracy is not the yardstick
    assert "± " in Path(result["paths"]["table"]).read_text()
    with Image.open(result["paths"]["plot"]) as image:
        image.verify()
    diffs = [c["summary"]["fidelity_forgetting"] - l["summary"]["fidelity_forgetting"]
             for l, c in zip(result["rows"][0::2], result["rows"][1::2])]
    assert result["paired"]["novel-same-class-test"]["c-lora"]["fidelity_forgetting"]["diffs"] == pytest.approx(diffs)

    # two worker processes (one thread each) give the runs one process gives (seed 0's)
    parallel = methods.run(seeds=1, methods=["lora", "c-lora"], output_dir=str(tmp_path / "bench2"), config=config,
                           workers=2)
    assert len(parallel["rows"]) == 2
    for serial_row, parallel_row in zip(result["rows"], parallel["rows"]):
        assert (serial_row["method"], serial_row["seed"]) == (parallel_row["method"], parallel_row["seed"])
        for key in ("plasticity", "final_fidelity", "fidelity_forgetting"):
            assert parallel_row["summary"][key] == pytest.approx(serial_row["summary"][key], rel=1e-3, abs=1e-6)


def _row(method, seed, forgetting, final):
    return {"method": method, "seed": seed, "summary": {"fidelity_forgetting": forgetting, "final_fidelity": final}}


def test_bench_methods_paired_verdicts_need_every_seed_and_the_spread():
    from dcfast.experiments.bench_methods import paired

    rows = [_row("lora", 0, 0.8, 0.2), _row("lora", 1, 0.6, 0.3), _row("lora", 2, 0.7, 0.1),
            _row("a", 0, 0.3, 0.2), _row("a", 1, 0.2, 0.3), _row("a", 2, 0.4, 0.1),  # forgets 0.4 less every seed
            _row("b", 0, 0.9, 0.5), _row("b", 1, 0.5, 0.1), _row("b", 2, 0.7, 0.1)]  # +0.1, -0.1, 0: mixed signs
    result = paired(rows)
    assert result["a"]["fidelity_forgetting"]["diffs"] == pytest.approx([-0.5, -0.4, -0.3])
    assert result["a"]["fidelity_forgetting"]["verdict"] == "better"
    assert result["a"]["final_fidelity"]["verdict"] == "no difference beyond the seed spread"  # all 0
    assert result["b"]["fidelity_forgetting"]["verdict"] == "no difference beyond the seed spread"
    assert result["b"]["final_fidelity"]["diffs"] == pytest.approx([0.3, -0.2, 0.0])
    worse = paired([_row("lora", 0, 0.5, 0.5), _row("lora", 1, 0.5, 0.5), _row("c", 0, 0.7, 0.4), _row("c", 1, 0.8, 0.45)])
    assert worse["c"]["fidelity_forgetting"]["verdict"] == "worse" and worse["c"]["final_fidelity"]["verdict"] == "worse"
    one_seed = paired([_row("lora", 0, 0.5, 0.5), _row("c", 0, 0.1, 0.9)])
    assert one_seed["c"]["fidelity_forgetting"]["verdict"] == "no difference beyond the seed spread"


def test_run_method_resumes_a_killed_run_of_the_same_settings(tiny_model_dir, tmp_path):
    """A benchmark killed inside a run continues it from its last finished task instead of refusing the folder."""
    import shutil

    from dcfast.experiments import runner as demo

    config = DemoConfig(output_dir=str(tmp_path / "d"), num_tasks=2, max_train_steps=1, num_train_images=2,
                        num_eval_images=2, num_images=2, num_inference_steps=2, fidelity_images=2,
                        base_model=tiny_model_dir, progress=False)
    tasks = demo.write_concepts(config)
    run_dir = tmp_path / "d" / "lora"
    demo.run_method(config, "lora", tasks, str(run_dir), log=lambda line: None, reuse=True)
    first_task = (run_dir / "task_1" / "metrics.json").read_text()
    shutil.rmtree(run_dir / "task_2")  # killed during task 2: task 1 written, task 2 and the evaluation not
    (run_dir / "eval" / "metrics.json").unlink()
    lines = []
    resumed = demo.run_method(config, "lora", tasks, str(run_dir), log=lines.append, reuse=True)
    assert any(line.startswith("[lora] resuming 2 tasks") for line in lines), lines
    assert (run_dir / "task_1" / "metrics.json").read_text() == first_task  # restored, not trained again
    assert (run_dir / "task_2" / "metrics.json").is_file()
    assert resumed["summary"]["train_seconds"] > 0  # the tasks' recorded seconds
    assert demo.finished_summary(str(run_dir), demo.train_config(config, "lora", tasks, str(run_dir)),
                                 demo.evaluation_config(config)) == resumed["summary"]


def test_bench_methods_refuses_bad_requests_before_any_run(tmp_path):
    from dcfast.experiments import bench_methods as methods

    with pytest.raises(ValueError, match="unknown \\['four-cats'\\]; known: .*known-same-class-test"):
        methods.run(seeds=1, sequences=["four-cats"], output_dir=str(tmp_path / "b"))
    with pytest.raises(ValueError, match="unknown \\['sgd'\\]; known: lora"):
        methods.run(seeds=1, methods=["sgd"], output_dir=str(tmp_path / "b"))
    with pytest.raises(ValueError, match="workers: must be >= 1"):
        methods.run(seeds=1, workers=0, output_dir=str(tmp_path / "b"))
    assert not (tmp_path / "b").exists()


def test_run_method_reuses_only_a_finished_run_with_the_same_settings(tiny_model_dir, tmp_path, monkeypatch):
    import shutil

    from safetensors.torch import load_file, save_file

    from dcfast.experiments import runner as demo

    from dcfast.training import trainer

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    config = DemoConfig(output_dir=str(tmp_path / "d"), num_tasks=2, max_train_steps=1, num_train_images=2,
                        num_eval_images=2, num_images=2, num_inference_steps=2, fidelity_images=2,
                        base_model=str(base), progress=False)
    tasks = demo.write_concepts(config)
    run_dir = str(tmp_path / "d" / "lora")
    first = demo.run_method(config, "lora", tasks, run_dir, log=lambda line: None, reuse=True)
    stored_summary = json.loads(Path(first["report"]["metrics"]).read_text())["summary"]

    def finished(cfg, method="lora"):
        return demo.finished_summary(run_dir, demo.train_config(cfg, method, tasks, run_dir), demo.evaluation_config(cfg))

    assert finished(config) == stored_summary
    # fields only other methods read change nothing for lora; lora's own settings and the evaluation's do
    assert finished(demo.replace(config, train_overrides={"clora_lambda": 7.0, "delta": 0.5, "dsc_alpha": 3.0,
                                                          "ewc_lambda": 9.0})) == stored_summary
    for changed in (demo.replace(config, max_train_steps=2), demo.replace(config, train_overrides={"rank": 2}),
                    demo.replace(config, fidelity_images=3), demo.replace(config, seed=1)):
        assert finished(changed) is None
    assert finished(config, method="ewc") is None  # another method's run
    # the same path with other weights (a base model retrained in place) is another base model
    unet_file = next((base / "unet").glob("*.safetensors"))
    original = unet_file.read_bytes()
    weights = load_file(unet_file)
    first_key = sorted(weights)[0]
    save_file({**weights, first_key: weights[first_key] + 1}, unet_file)
    assert finished(config) is None
    unet_file.write_bytes(original)
    assert finished(config) == stored_summary
    # a field the run was written without counts at its default: equal to the run's value here ...
    run_json = Path(run_dir) / "run.json"
    stored = json.loads(run_json.read_text())
    run_json.write_text(json.dumps({**stored, "config": {k: v for k, v in stored["config"].items() if k != "adam_beta1"}}))
    assert finished(config) == stored_summary
    # ... and different from it here (the world regime's learning_rate is 1e-3, the default 1e-4)
    run_json.write_text(json.dumps({**stored, "config": {k: v for k, v in stored["config"].items() if k != "learning_rate"}}))
    assert finished(config) is None
    run_json.write_text(json.dumps(stored))

    def no_training(settings, **options):
        raise AssertionError("trained again")

    monkeypatch.setattr(trainer, "train", no_training)
    assert demo.run_method(config, "lora", tasks, run_dir, log=lambda line: None, reuse=True)["summary"] == stored_summary
    # other sampling (a setting that does not change training) evaluates the trained run again, without training
    sampled = demo.replace(config, train_overrides={"validation_guidance_scale": 3.0})
    assert finished(sampled) is None
    again = demo.run_method(sampled, "lora", tasks, run_dir, log=lambda line: None, reuse=True)
    assert again["summary"]["train_seconds"] == stored_summary["train_seconds"]
    assert json.loads(Path(again["report"]["metrics"]).read_text())["config"]["guidance_scale"] == 3.0
    assert finished(sampled) == again["summary"] and finished(config) is None
    longer = demo.replace(config, max_train_steps=2)
    # a finished run trained otherwise is never overwritten: the error names what differs and the fix
    with pytest.raises(ValueError, match=r"holds a lora run trained with other settings \(max_train_steps\); remove"):
        demo.run_method(longer, "lora", tasks, run_dir, log=lambda line: None, reuse=True)
    assert finished(sampled) == again["summary"]
    # a run with no finished task (killed in its first) is trained anew, its old evaluation removed first, so
    # that a killed new run is never taken for a finished one
    for folder in Path(run_dir).glob("task_*"):
        shutil.rmtree(folder)
    with pytest.raises(AssertionError, match="trained again"):
        demo.run_method(longer, "lora", tasks, run_dir, log=lambda line: None, reuse=True)
    assert not (Path(run_dir) / "eval" / "metrics.json").exists() and finished(config) is None


def test_world_runs_dsc_at_its_validated_cost_and_the_other_dc_methods_at_train_configs(tmp_path):
    from dcfast.experiments import runner as demo
    from dcfast.training.config import TrainConfig

    config = DemoConfig(output_dir=str(tmp_path / "d"), num_tasks=2, num_train_images=2, num_eval_images=2)
    tasks = [{"images": str(tmp_path), "class_word": "star"}]

    def cost(method, cfg=config):
        settings = demo.train_config(cfg, method, tasks, str(tmp_path / method)).method_settings
        return settings.num_dc_concepts, settings.num_dc_timesteps

    default = (TrainConfig().method_settings.num_dc_concepts, TrainConfig().method_settings.num_dc_timesteps)
    assert default == (4, 4)
    assert cost("dsc") == (3, 2)
    assert cost("ewc-dc") == default and cost("dsc+ewc-dc") == default
    assert cost("dsc", demo.replace(config, train_overrides={"num_dc_timesteps": 4})) == (3, 4)  # overrides win
    assert cost("dsc", demo.replace(config, photos=True)) == default  # a world choice, not the photo demo's


def test_world_runs_train_and_sample_as_the_zero_snr_base_model_does(tmp_path):
    """No offset noise on a zero-terminal-SNR base (it replaces it), and samples at the base model's guidance, the
    same in the demo's evaluation, a run's validation and `dcfast eval` (the run's validation_guidance_scale)."""
    from dcfast.experiments import runner as demo
    from dcfast.training.config import TrainConfig

    config = DemoConfig(output_dir=str(tmp_path / "d"))
    tasks = [{"images": str(tmp_path), "class_word": "star"}]
    settings = demo.train_config(config, "lora", tasks, str(tmp_path / "lora"))
    assert settings.noise_offset == 0.0
    scheduler = json.loads((BASE_MODEL / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["rescale_betas_zero_snr"] and scheduler["prediction_type"] == "v_prediction"
    assert settings.validation_guidance_scale == demo.evaluation_config(config).guidance_scale == 5.0
    photos = demo.replace(config, photos=True)
    assert demo.evaluation_config(photos).guidance_scale == TrainConfig.validation_guidance_scale == 7.5
    told = demo.replace(config, train_overrides={"validation_guidance_scale": 3.0})
    assert demo.evaluation_config(told).guidance_scale == 3.0


def test_each_method_reads_its_own_settings_and_subclasses_keep_their_parents():
    import dataclasses

    from dcfast.training.config import TrainConfig
    from dcfast.training.methods import METHODS

    shared = {f.name for f in dataclasses.fields(TrainConfig)}
    for method, cls in METHODS.items():
        names = {f.name for f in dataclasses.fields(cls.Settings)}
        assert not names & shared, (method, names & shared)  # a setting is never also a shared field
        for parent in cls.__mro__[1:]:
            if hasattr(parent, "Settings"):
                assert issubclass(cls.Settings, parent.Settings), (method, parent)
    assert issubclass(METHODS["dsc+ewc-dc"].Settings, METHODS["ewc-dc"].Settings)
    assert {f.name for f in dataclasses.fields(METHODS["dsc"].Settings)} <= {
        f.name for f in dataclasses.fields(METHODS["dsc+ewc-dc"].Settings)}
    assert dataclasses.fields(METHODS["lora"].Settings) == ()


def test_world_vera_runs_adapt_the_linear_layers_of_the_world_regime():
    """VeRA adapts nn.Linear layers only: a VeRA world run keeps the regime's linear targets, a LoRA run all of them."""
    from dcfast.experiments.regimes import WORLD_TARGET_MODULES, train_values
    from dcfast.models.tiny import tiny_unet
    from dcfast.training.adapters import add_adapter

    vera = train_values("ewc-dc", False, {"adapter": "vera"})["target_modules"]
    assert train_values("ewc-dc", False, {})["target_modules"] == WORLD_TARGET_MODULES
    assert set(vera) < set(WORLD_TARGET_MODULES) and "conv1" not in vera
    add_adapter(tiny_unet(), "vera", 8, 8, vera, seed=0)  # peft accepts every one of them
