"""The tiny world (dcfast.world.scenes), its oracle (dcfast.world.oracle), fidelity in evaluation, and a tiny world run."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dcfast.world import scenes as world
from dcfast.world.oracle import fidelity, load_oracle, read_attributes


@pytest.fixture(scope="module")
def oracle():
    return load_oracle()


def renders(concept: world.Concept, count: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(world.render(world.concept_scenes(concept, count, seed))).permute(0, 3, 1, 2)


# --- rendering and captions ---------------------------------------------------------------------------

def test_renders_are_deterministic_and_seeded():
    a = world.render(world.random_scenes(64, seed=3))
    b = world.render(world.random_scenes(64, seed=3))
    c = world.render(world.random_scenes(64, seed=4))
    assert a.shape == (64, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_a_render_shows_its_colours_where_expected():
    """A solid red square on white, centred, unrotated: red at the centre, the background in the corners."""
    concept = world.Concept("probe", "square", "red", "solid", "blue", "white")
    scene = world.concept_scenes(concept, 1, 0)
    scene = world.Scene(**{**scene.__dict__, "center": np.array([[16.0, 16.0]]), "radius": np.array([10.0]),
                           "angle": np.array([0.0])})
    image = world.render(scene)[0].astype(float)
    assert np.abs(image[16, 16] - world.COLOURS["red"]).max() < 15
    assert np.abs(image[1, 1] - world.BACKGROUNDS["white"]).max() < 15
    assert np.abs(image[16, 30] - world.BACKGROUNDS["white"]).max() < 15  # radius 10 * 0.78 < 14 px


def test_patterns_draw_the_second_colour_inside_the_shape_only():
    stripes = world.Concept("probe", "square", "red", "stripes", "blue", "black")
    solid = world.Concept("probe", "square", "red", "solid", "blue", "black")
    blue = np.array(world.COLOURS["blue"], float)

    def blue_pixels(concept):
        return (np.abs(world.render(world.concept_scenes(concept, 8, 1)).astype(float) - blue).max(-1) < 30).mean()

    assert blue_pixels(stripes) > 0.03 and blue_pixels(solid) == 0


def test_captions_name_the_attributes_given():
    shape, colour = world.SHAPES.index("star"), world.COLOUR_NAMES.index("teal")
    assert world.caption(shape) == "a photo of a star"
    assert world.caption(shape, colour) == "a photo of a teal star"
    full = world.caption(shape, colour, world.PATTERNS.index("stripes"), world.COLOUR_NAMES.index("orange"),
                         world.BACKGROUND_NAMES.index("white"))
    assert full == "a photo of a teal star with orange stripes on a white background"
    assert set(full.split()) <= set(world.caption_words())


# --- concepts and sequences ---------------------------------------------------------------------------

def test_validation_and_test_concepts_are_disjoint_and_sequences_well_formed():
    test, validation = set(world.concepts_in_split("test")), set(world.concepts_in_split("validation"))
    assert test and validation and not test & validation
    novel_shapes = {split: {world.get_concept(c).shape for c in names if world.get_concept(c).novel}
                    for split, names in (("test", test), ("validation", validation))}
    assert len(novel_shapes["test"]) >= 8 and novel_shapes["validation"] and \
        not novel_shapes["test"] & novel_shapes["validation"]
    for name, spec in world.SEQUENCES.items():
        concepts = world.get_sequence(name)
        assert len(concepts) == len(spec.concepts) >= 4 and name.startswith(("novel-", "known-"))
        assert all(c.novel == name.startswith("novel-") for c in concepts)
        assert name.endswith("-test") == (spec.split == "test")
        shapes, words = [c.shape for c in concepts], world.class_words(name)
        assert len(set(shapes)) == (1 if name.startswith("known-same-class") else len(shapes))
        if "same-class" in name:
            assert len(set(words)) == 1
        assert set(words) <= set(world.BASE_SHAPES)  # words the base model knows
        for a in concepts:  # every pair differs in a defining attribute: learning one conflicts with another
            assert a.pattern == "solid"  # patterned concepts were learned as a blend of two colours
            for b in concepts:
                if a is not b:
                    assert any(a.labels()[k] != b.labels()[k] for k in world.DEFINING), (a.name, b.name)
    assert len(world.get_sequence("novel-same-class-long-test")) == 8


def test_no_test_concept_is_in_the_shipped_base_models_training_factors():
    from dcfast.experiments.runner import BASE_MODEL

    seen = json.loads((Path(BASE_MODEL) / world.TRAINING_FACTORS_FILE).read_text())
    assert seen == world.base_training_factors()
    test_shapes = {world.get_concept(c).shape for c in world.concepts_in_split("test") if world.get_concept(c).novel}
    assert test_shapes and not test_shapes & set(seen["shapes"])
    world.check_unseen(BASE_MODEL, world.get_sequence("novel-same-class-long-test"))  # does not raise


def test_a_base_that_saw_a_novel_shape_is_refused_naming_it(tmp_path):
    (tmp_path / world.TRAINING_FACTORS_FILE).write_text(json.dumps({"shapes": [*world.BASE_SHAPES, "heart"]}))
    with pytest.raises(ValueError, match="novel shape\\(s\\) heart"):
        world.check_unseen(tmp_path, world.get_sequence("novel-same-class-test"))
    world.check_unseen(tmp_path, world.get_sequence("known-same-class-test"))  # known shapes need no record
    with pytest.raises(ValueError, match="no readable record"):
        world.check_unseen(tmp_path / "elsewhere", world.get_sequence("novel-same-class-test"))


def test_novel_shapes_are_deterministic_inside_the_image_and_distinct():
    """Each novel shape renders the same twice, fits inside the image at every pose random_poses draws (its extent
    is within (radius + 1 px) / radius at the largest radius, 12 px), and overlaps no other shape at any rotation by
    IoU IOU_BOUND or more."""
    angles = np.linspace(0, 2 * np.pi, 36, endpoint=False)
    grid = np.linspace(-1.2, 1.2, 97)
    distance = np.hypot(*np.meshgrid(grid, grid))
    upright = {shape: world.shape_mask(shape) for shape in world.SHAPES}
    assert len(world.NOVEL_SHAPES) >= 8
    for index, shape in enumerate(world.NOVEL_SHAPES):
        concept = world.Concept("probe", shape, "red", "solid", "blue", "white")
        assert np.abs(world.concept_scenes(concept, 64, 3).angle).max() <= world.NOVEL_TILT  # upright, as photographed
        first, again = renders(concept, 16, 7), renders(concept, 16, 7)
        assert torch.equal(first, again) and not torch.equal(first, renders(concept, 16, 8))
        for angle in angles:
            rotated = world.shape_mask(shape, angle)
            assert rotated.sum() > 0.1 * rotated.size and distance[rotated].max() <= 13 / 12, shape
        for other in world.SHAPES:
            if other == shape or (other in world.NOVEL_SHAPES and world.NOVEL_SHAPES.index(other) < index):
                continue
            for angle in angles:
                rotated = world.shape_mask(other, angle)
                iou = (upright[shape] & rotated).sum() / (upright[shape] | rotated).sum()
                assert iou < world.IOU_BOUND, (shape, other, float(iou))


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match="known sequences: .*known-same-class-test"):
        world.get_sequence("same-class")
    with pytest.raises(ValueError, match="'same-class-test' is now 'known-same-class-test'.*novel-same-class-test"):
        world.get_sequence("same-class-test")
    with pytest.raises(ValueError, match="known concepts: .*green-star"):
        world.get_concept("green star")


def test_write_sequence_splits_are_distinct_renders(tmp_path):
    tasks = world.write_sequence(tmp_path, "known-same-class-test", num_train=3, num_eval=4, num_tasks=2)
    assert [t["class_word"] for t in tasks] == ["star", "star"]
    for task in tasks:
        train = [np.asarray(Image.open(p)) for p in sorted(Path(task["images"]).glob("*.png"))]
        held_out = [np.asarray(Image.open(p)) for p in sorted(Path(task["eval_images"]).glob("*.png"))]
        assert len(train) == 3 and len(held_out) == 4 and Path(task["eval_images"]).name == "test"
        assert not any(np.array_equal(a, b) for a in train for b in held_out)
        assert world.read_concept(task["images"]) == world.read_concept(task["eval_images"])
    assert world.read_concept(tasks[0]["images"]).name == "green-star"
    val = world.write_sequence(tmp_path / "v", "known-same-class-val", num_train=1, num_eval=2, num_tasks=1)
    assert Path(val[0]["eval_images"]).name == "val"
    assert world.read_concept(tmp_path) is None  # not a concept folder
    with pytest.raises(ValueError, match="num_tasks"):
        world.write_sequence(tmp_path, "known-same-class-test", num_tasks=9)


# --- the oracle and fidelity ----------------------------------------------------------------------------

def test_oracle_reads_fresh_renders(oracle):
    scenes = world.random_scenes(600, seed=987_654)  # not a seed the training script draws
    images = torch.from_numpy(world.render(scenes)).permute(0, 3, 1, 2)
    reading = read_attributes(oracle, images)
    for name in world.ATTRIBUTES:
        accuracy = (reading[name] == torch.from_numpy(getattr(scenes, name))).double().mean()
        assert accuracy >= 0.97, (name, float(accuracy))


def test_oracle_record_holds_every_shape_at_98_percent_per_attribute():
    """scripts/train_oracle.py records each shape's accuracy on fresh renders (fresh and augmented) beside the
    weights; the shipped oracle must read every shape, known and novel."""
    from dcfast.world.oracle import oracle_report

    record = oracle_report()["accuracy_by_shape"]
    assert set(record) == set(world.SHAPES)
    for shape, accuracy in record.items():
        assert set(accuracy["fresh"]) == set(world.ATTRIBUTES), shape
        assert min(accuracy["fresh"].values()) >= 0.98, (shape, accuracy)


def test_oracle_reads_the_novel_concepts(oracle):
    for name in world.concepts_in_split("test") + world.concepts_in_split("validation"):
        concept = world.get_concept(name)
        if concept.novel:
            assert fidelity(read_attributes(oracle, renders(concept, 16, 11)), concept)["all"] >= 15 / 16, name


def test_fidelity_is_one_on_the_concept_and_zero_on_another(oracle):
    green, red = world.get_concept("green-star"), world.get_concept("red-star")
    own = fidelity(read_attributes(oracle, renders(green, 32, 5)), green)
    other = fidelity(read_attributes(oracle, renders(red, 32, 5)), green)
    assert own["all"] == 1.0 and own["shape"] == 1.0
    assert other["all"] == 0.0 and other["shape"] == 1.0  # same class, other look: only the shape matches
    assert other["colour"] == 0.0


def test_overwrite_reads_an_earlier_prompt_drawing_the_newest_concept(oracle):
    """Samples of an earlier concept's prompt that show the state's newest concept: fidelity 0 to their own
    concept, overwrite 1; no overwrite is read for the newest concept's own prompt."""
    from dcfast.eval.evaluation import EvalConfig, _fidelity

    earlier, newest = world.get_concept("green-star"), world.get_concept("red-star")
    drawn = renders(newest, 32, 5).float() / 255
    own, overwrite = _fidelity(oracle, drawn, earlier, newest, EvalConfig(fidelity_images=32))
    assert own["all"] == 0.0 and overwrite == 1.0
    assert _fidelity(oracle, drawn, newest, None, EvalConfig(fidelity_images=32)) == (
        fidelity(read_attributes(oracle, drawn), newest), None)


def test_base_fidelity_reads_whether_a_state_draws_the_base_prompts_as_they_say(oracle, monkeypatch):
    """B[j] is 1 for a state that draws each base prompt's shape and colour, and 0 for one that draws a novel
    concept for every prompt (what every world run's last state did)."""
    from dcfast.eval import evaluation
    from dcfast.eval.evaluation import EvalConfig, _base_fidelity

    def obeying(pipe, prompt, count, generator, **kwargs):
        shape, colour = next((s, c) for s, c in world.BASE_PROMPT_FACTORS if f"{c} {s}" in prompt)
        return renders(world.Concept("x", shape, colour, "solid", "red", "white"), count, 3).float() / 255

    def collapsed(pipe, prompt, count, generator, **kwargs):
        return renders(world.get_concept("pink-chevron"), count, 3).float() / 255

    config = EvalConfig(fidelity_images=32)
    monkeypatch.setattr(evaluation, "generate", obeying)
    assert _base_fidelity(None, oracle, config) >= 31 / 32
    monkeypatch.setattr(evaluation, "generate", collapsed)
    assert _base_fidelity(None, oracle, config) == 0.0


def test_fidelity_of_a_hand_made_reading():
    concept = world.get_concept("green-star")
    labels = concept.labels()
    reading = {name: torch.full((4,), value) for name, value in labels.items()}
    reading["colour"] = torch.tensor([labels["colour"], labels["colour"], 0, 0])  # 0 = red, not green
    other_pattern = (labels["pattern"] + 1) % len(world.PATTERNS)
    reading["pattern"] = torch.tensor([labels["pattern"], other_pattern, other_pattern, other_pattern])  # not required
    result = fidelity(reading, concept)
    assert result == {"all": 0.5, "shape": 1.0, "colour": 0.5, "pattern": 0.25, "background": 1.0}
    assert world.DEFINING == ("shape", "colour")


def test_missing_or_corrupt_oracle_names_the_file_and_the_script(tmp_path):
    with pytest.raises(ValueError, match=r"nothing\.safetensors.*scripts/train_oracle\.py"):
        load_oracle(tmp_path / "nothing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"bad\.safetensors.*corrupt.*scripts/train_oracle\.py"):
        load_oracle(bad)


def test_missing_base_model_names_the_script(tmp_path):
    from dcfast.experiments.runner import check_base_model

    with pytest.raises(ValueError, match=r"pretrain_tiny_base\.py"):
        check_base_model(str(tmp_path))


# --- a tiny world run end to end ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from dcfast.models.tiny import tiny

    path = tmp_path_factory.mktemp("tiny-model")
    tiny(seed=0).save_pretrained(path)
    return path


def tiny_config(model, output_dir, **changes):
    from dcfast.experiments.runner import DemoConfig

    values = dict(output_dir=str(output_dir), methods=["lora"], sequence="known-same-class-val", num_tasks=2,
                  max_train_steps=2, num_train_images=2, num_eval_images=2, num_images=2, num_inference_steps=2,
                  base_model=str(model), progress=False)
    return DemoConfig(**{**values, **changes})


def test_tiny_world_run_reports_fidelity(tmp_path, tiny_model):
    """Two world tasks on the in-code tiny model: fidelity matrices, their summaries, heatmap and table."""
    from dcfast.experiments.runner import run_demo

    config = tiny_config(tiny_model, tmp_path / "demo")
    result = run_demo(config, log=lambda line: None)
    eval_dir = Path(result["runs"][0]["run_dir"]) / "eval"
    data = json.loads((eval_dir / "metrics.json").read_text())
    assert set(data["fidelity"]) == {"all", *world.ATTRIBUTES}
    matrix = data["fidelity"]["all"]
    assert matrix[1][0] is None and all(0 <= v <= 1 for v in (matrix[0][0], matrix[0][1], matrix[1][1]))
    first = data["fidelity"]["shape"][0]
    summary = data["summary"]
    assert summary["final_shape_fidelity"] == pytest.approx((first[1] + data["fidelity"]["shape"][1][1]) / 2)
    assert summary["fidelity_forgetting"] == pytest.approx(matrix[0][0] - matrix[0][1])
    assert summary["bwt_fidelity"] == pytest.approx(matrix[0][1] - matrix[0][0])
    overwrite = data["overwrite"]  # concept 1's prompt at state 2 read as concept 2; nothing else defined
    assert overwrite[0][0] is None and overwrite[1] == [None, None] and 0 <= overwrite[0][1] <= 1
    assert summary["final_overwrite"] == overwrite[0][1]
    base = data["base_fidelity"]  # one per state
    assert len(base) == 2 and all(0 <= v <= 1 for v in base) and summary["final_base_fidelity"] == base[-1]
    report = (eval_dir / "report.md").read_text()
    assert "Concept fidelity" in report and "O[i, j]: concept i's prompt drawing concept j" in report
    assert "B[j]: the base model's own prompts" in report
    with Image.open(eval_dir / "fidelity.png") as image:
        image.verify()
    assert "final fidelity" in result["table"]


def test_fidelity_only_evaluation_reads_the_same_fidelity_without_accuracy_or_mmd(tmp_path, tiny_model):
    """The bench's fidelity-only evaluation gives the full evaluation's fidelity matrices (same samples), no DC
    accuracy or MMD, and a report without them; a full evaluation is reused where only fidelity is asked."""
    from dcfast.eval.evaluation import evaluate
    from dcfast.eval.report import write_report
    from dcfast.experiments.runner import (evaluation_config, finished_summary, replace, run_demo, train_config,
                                           write_concepts)

    config = tiny_config(tiny_model, tmp_path / "demo")
    run_dir = run_demo(config, log=lambda line: None)["runs"][0]["run_dir"]
    full = json.loads((Path(run_dir) / "eval" / "metrics.json").read_text())
    only = replace(config, fidelity_only=True)
    result = evaluate(run_dir, num_images=config.num_images, config=evaluation_config(only))
    assert result.accuracy is None and result.mmd is None and result.summary["final_accuracy"] is None
    assert result.to_dict()["fidelity"] == full["fidelity"]
    paths = write_report(result, out_dir=str(tmp_path / "only"))
    assert "Concept fidelity" in Path(paths["report"]).read_text() and "accuracy" not in paths
    tasks = write_concepts(config)  # the same folders, rewritten identically
    assert finished_summary(run_dir, train_config(only, "lora", tasks, run_dir), evaluation_config(only)) is not None


def test_bench_world_reports_the_controls_from_their_fidelity_matrices(tmp_path, tiny_model):
    """lora, ti and joint per seed on the novel and known sequences; the closing values are the rows' means."""
    from dcfast.experiments import bench_world

    world.write_training_factors(tiny_model)
    result = bench_world.run(seeds=2, output_dir=str(tmp_path / "bench"), config=tiny_config(tiny_model, tmp_path),
                             workers=1)
    rows = result["rows"]
    assert {(r["sequence"], r["seed"], r["method"]) for r in rows} == {
        (s, seed, m) for s in ("novel-same-class-test", "known-same-class-test") for seed in (0, 1)
        for m in ("lora", "ti", "joint")}
    novel = {m: [r for r in rows if r["sequence"] == "novel-same-class-test" and r["method"] == m]
             for m in ("lora", "ti", "joint")}
    summary = result["summary"]
    assert summary["state1_fidelity"] == pytest.approx(np.mean([r["fidelity"][0][0] for r in novel["lora"]]))
    assert summary["lora_forgetting"] == pytest.approx(np.mean([r["fidelity"][0][0] - r["fidelity"][0][1]
                                                                for r in novel["lora"]]))
    assert summary["ti_fidelity"] == pytest.approx(np.mean([np.mean([r["fidelity"][i][i] for i in range(2)])
                                                            for r in novel["ti"]]))
    assert summary["joint_final_fidelity"] == pytest.approx(np.mean([np.mean([row[-1] for row in r["fidelity"]])
                                                                     for r in novel["joint"]]))
    assert [b["method"] for b in result["bars"]] == ["ti", "lora", "lora", "joint"]
    saved = json.loads((tmp_path / "bench" / "world.json").read_text())
    assert saved["summary"] == pytest.approx(summary) and saved["command"] == "dcfast bench world --seeds 2"
    assert "### known-same-class-test" in (tmp_path / "bench" / "world.md").read_text()
    with pytest.raises(ValueError, match="seeds"):
        bench_world.run(seeds=0)


def test_bench_world_refuses_a_base_that_saw_a_novel_shape(tmp_path, tiny_model):
    from dcfast.experiments import bench_world

    seen = tmp_path / "seen-base"
    shutil.copytree(tiny_model, seen)
    (seen / world.TRAINING_FACTORS_FILE).write_text(json.dumps({"shapes": ["crescent", "circle"]}))
    with pytest.raises(ValueError, match="crescent"):
        bench_world.run(quick=True, output_dir=str(tmp_path / "bench"),
                        config=tiny_config(seen, tmp_path), workers=1)