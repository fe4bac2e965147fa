"""`dcfast demo`: continual personalization end to end on a CPU, with nothing to download.

1. Write the concepts: by default a task sequence of the tiny world (`dcfast.world.scenes`, docs/world.md), where
   the oracle judges fidelity; with `photos=True`, photos from scikit-image (`dcfast.experiments.photos`).
2. Train every task in order with `dcfast.train` on the tiny base model shipped in the package
   (`dcfast/assets/tiny-base`, made by scripts/pretrain_tiny_base.py).
3. Evaluate every task state (`dcfast.evaluate`: fidelity on the world, accuracy and MMD matrices,
   AMMD, BwT, forgetting) and write the report (`dcfast.eval.report`); with several methods, also the
   comparison table and plot.

Training settings for the world and for photos come from `dcfast.experiments.regimes`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from dcfast.experiments.regimes import PHOTO_TRAIN, WORLD_TRAIN, train_values
from dcfast.io.runs import DEFAULT_GUIDANCE_SCALE, EVAL_DIR, METRICS_FILE, Run

BASE_MODEL = Path(__file__).resolve().parents[1] / "assets" / "tiny-base"
# The demo's default shows the yardstick itself: sequential LoRA learns each novel concept, then loses it (its report's
# grids). `--method ewc-dc` or `--all` runs the methods against it.
DEFAULT_METHOD = "lora"
# The yardstick: four shapes the base model never saw, one class word ("circle"), so only the LoRA can carry them.
DEFAULT_SEQUENCE = "novel-same-class-test"

@dataclass
class DemoConfig:
    """Settings of `dcfast demo` (and of `dcfast bench methods`, which repeats it over seeds)."""

    output_dir: str = "dcfast-demo"
    methods: Sequence[str] = (DEFAULT_METHOD,)
    sequence: str = DEFAULT_SEQUENCE  # a world sequence (dcfast.world.scenes.SEQUENCES); ignored with photos
    photos: bool = False  # the photo concepts (cat, cup, rocket, horse, person, motorcycle) instead of the world
    num_tasks: Optional[int] = None  # concepts learned in sequence (None: the whole world sequence, 3 photos)
    max_train_steps: Optional[int] = None  # per task (None: WORLD_TRAIN's or PHOTO_TRAIN's)
    seed: int = 0
    num_train_images: int = 8  # images per concept for training
    num_eval_images: int = 8  # held-out images per concept for accuracy and MMD
    num_images: int = 8  # generated images per (concept, task state) for MMD
    fidelity_images: int = 32  # world: generated images per (concept, task state) the oracle judges
    fidelity_only: bool = False  # world: evaluate the oracle's fidelity only (no DC accuracy, no MMD)
    num_inference_steps: int = 20  # DDIM steps when generating
    base_model: str = str(BASE_MODEL)
    train_overrides: Dict[str, object] = field(default_factory=dict)  # further TrainConfig fields
    progress: bool = True


RANDOM_SDXL_NOTE = ("a tiny SDXL-layout model with random weights, built in code (never pretrained): the run shows "
                    "that SDXL trains, evaluates and reports end to end; its fidelity and accuracy mean nothing")


def tiny_sdxl_base(output_dir: str, seed: int = 0) -> Path:
    """`dcfast demo --arch sdxl`'s base model: `dcfast.models.tiny.tiny_xl` with the shipped base's tokenizer (the
    world's words whole), written once under output_dir/base-sdxl, with a record that it saw no world factor."""
    from transformers import CLIPTokenizer

    from dcfast.io.atomic import write_json_atomic
    from dcfast.models.tiny import tiny_xl
    from dcfast.world.scenes import TRAINING_FACTORS_FILE

    path = Path(output_dir) / "base-sdxl"
    if not (path / "model_index.json").is_file():
        tokenizer = CLIPTokenizer.from_pretrained(BASE_MODEL / "tokenizer", local_files_only=True)
        tiny_xl(seed, tokenizer=tokenizer).save_pretrained(path)
        write_json_atomic(path / TRAINING_FACTORS_FILE, {"shapes": [], "note": RANDOM_SDXL_NOTE})
    return path


def check_base_model(path: str) -> Path:
    """The base model directory, or a ValueError saying how to produce it."""
    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise ValueError(f"base_model: {str(path)!r} holds no diffusers model (model_index.json missing); the "
                         f"package ships one at {BASE_MODEL}, rebuilt by `python scripts/pretrain_tiny_base.py`")
    return path


def write_concepts(config: DemoConfig) -> List[Dict[str, str]]:
    """The concepts as PNGs under output_dir/concepts: the world sequence's renders (32x32), or photo crops
    at the base model's resolution. A novel-concept sequence needs a base model that never saw its shapes."""
    folder = Path(config.output_dir) / "concepts"
    if not config.photos:
        from dcfast.world.scenes import check_unseen, get_sequence, write_sequence

        check_unseen(check_base_model(config.base_model), get_sequence(config.sequence))
        return write_sequence(folder, config.sequence, num_train=config.num_train_images,
                              num_eval=config.num_eval_images, seed=config.seed, num_tasks=config.num_tasks)
    from dcfast.experiments.photos import write_demo_concepts
    from dcfast.models.loading import load_components

    resolution = load_components(check_base_model(config.base_model)).resolution
    return write_demo_concepts(folder, num_tasks=config.num_tasks or 3, resolution=resolution,
                               num_train=config.num_train_images, num_eval=config.num_eval_images, seed=config.seed)


def train_config(config: DemoConfig, method: str, tasks: List[Dict[str, str]], run_dir: str):
    """The TrainConfig of one method's run (`regimes.train_values`; the settings other methods read dropped)."""
    from dcfast.training.config import TrainConfig

    values = train_values(method, config.photos, config.train_overrides, config.max_train_steps)
    # the demo's DDIM steps for every sample it draws: evaluation's, and a run's class images and validation grids
    values.setdefault("validation_inference_steps", config.num_inference_steps)
    values.update(pretrained_model_name_or_path=str(check_base_model(config.base_model)), output_dir=run_dir,
                  method=method, tasks=tasks, seed=config.seed)
    return TrainConfig.from_dict(values, ignore_other_methods=True)


def evaluation_config(config: DemoConfig):
    """The EvalConfig of every run of the demo: it samples with the regime's validation guidance."""
    from dcfast.eval.evaluation import EvalConfig

    regime = {**(PHOTO_TRAIN if config.photos else WORLD_TRAIN), **config.train_overrides}
    return EvalConfig(num_images=config.num_images, num_inference_steps=config.num_inference_steps,
                      guidance_scale=regime.get("validation_guidance_scale", DEFAULT_GUIDANCE_SCALE),
                      max_eval_images=config.num_eval_images, seed=config.seed, progress=config.progress,
                      fidelity_images=config.fidelity_images, fidelity_only=config.fidelity_only)


def _as_json(value: object) -> object:
    return json.loads(json.dumps(value))


def same_evaluation(stored: Dict[str, object], eval_config) -> bool:
    """Whether a stored evaluation's settings give what `eval_config` asks for: the same values (progress display
    aside; a setting absent from an older evaluation had its default), where a full evaluation also serves one that
    asks for the fidelity only."""
    from dcfast.eval.evaluation import EvalConfig

    defaults = _as_json(dataclasses.asdict(EvalConfig()))
    for key, wanted in _as_json(dataclasses.asdict(eval_config)).items():
        found = stored.get(key, defaults[key])
        if key == "progress" or found == wanted or (key == "fidelity_only" and wanted and not found):
            continue
        return False
    return True


def training_differences(run_dir: str, train_settings) -> Optional[List[str]]:
    """What differs between the run already in `run_dir` and `train_settings`: the names of the settings that
    change training ("base model weights" when run.json's fingerprint differs: a base replaced at the same path is
    not the same), or None when `run_dir` holds no readable run. Settings a resumed run may change (output_dir,
    validation sampling, logging: `resumable`) do not change what was trained, and are not compared."""
    from dcfast.models.loading import model_fingerprint
    from dcfast.training.config import TrainConfig
    from dcfast.training.settings import resumable

    run = Run(run_dir)
    try:
        trained = TrainConfig.from_dict(run.config(), ignore_other_methods=True)
        fingerprint = run.fingerprint()
    except (OSError, ValueError, TypeError, KeyError):
        return None
    ignored = {f.name for f in dataclasses.fields(TrainConfig) if resumable(TrainConfig, f.name)}
    before, after = _as_json(trained.to_dict()), _as_json(train_settings.to_dict())
    differences = sorted(k for k in set(before) | set(after) if k not in ignored and before.get(k) != after.get(k))
    if fingerprint != model_fingerprint(train_settings.pretrained_model_name_or_path):
        differences.append("base model weights")
    return differences


def _all_tasks_finished(run_dir: str) -> bool:
    run = Run(run_dir)
    try:
        return len(run.finished_tasks()) == len(run.tasks())
    except (OSError, ValueError, TypeError, KeyError):
        return False


def _stored_evaluation(run_dir: str) -> Dict[str, object]:
    """The run's eval/metrics.json, or {} (absent or unreadable)."""
    try:
        return Run(run_dir).evaluation()
    except (OSError, ValueError, TypeError, KeyError):
        return {}


def _matching_summary(stored: Dict[str, object], eval_config) -> Optional[Dict[str, object]]:
    """A stored evaluation's summary when it was made with `eval_config` (`same_evaluation`) and has its
    training time, else None."""
    summary = stored.get("summary", {})
    if stored and same_evaluation(stored.get("config", {}), eval_config) and "train_seconds" in summary:
        return summary
    return None


def finished_training(run_dir: str, train_settings) -> bool:
    """Whether `run_dir` holds a run trained to its end with `train_settings` (`training_differences` is empty)."""
    return _all_tasks_finished(run_dir) and training_differences(run_dir, train_settings) == []


def finished_summary(run_dir: str, train_settings, eval_config) -> Optional[Dict[str, object]]:
    """The stored summary of a run in `run_dir` that `finished_training` with `train_settings` and was evaluated
    with `eval_config` (`same_evaluation`), or None (absent, unfinished or different)."""
    if not finished_training(run_dir, train_settings):
        return None
    return _matching_summary(_stored_evaluation(run_dir), eval_config)


def run_method(config: DemoConfig, method: str, tasks: List[Dict[str, str]], run_dir: str,
               log: Callable[[str], None] = print, reuse: bool = False) -> Dict[str, object]:
    """Train one method on the tasks, evaluate every task state, write its report.

    `reuse`: a finished run already in `run_dir` with the same training and evaluation settings is
    returned as it is, one with the same training but other evaluation settings is evaluated again without
    training, and an unfinished one with the same training is resumed from its last checkpoint (a killed benchmark
    resumes without redoing its finished runs or tasks).
    Returns {"method", "run_dir", "summary" (the evaluation's, plus train_seconds), "report" paths}.
    """
    from dcfast.eval.evaluation import evaluate
    from dcfast.eval.report import write_report
    from dcfast.training.trainer import train

    train_settings, eval_config = train_config(config, method, tasks, run_dir), evaluation_config(config)
    differences = training_differences(run_dir, train_settings) if reuse else None  # once: it hashes the base
    train_seconds = None
    if differences == [] and _all_tasks_finished(run_dir):
        stored = _stored_evaluation(run_dir)
        summary = _matching_summary(stored, eval_config)
        if summary is not None:
            log(f"[{method}] reusing the finished run in {run_dir}")
            eval_dir = Path(run_dir) / EVAL_DIR
            return {"method": method, "run_dir": run_dir, "summary": summary,
                    "report": {"report": str(eval_dir / "report.md"), "metrics": str(eval_dir / METRICS_FILE)}}
        log(f"[{method}] reusing the trained run in {run_dir}; evaluating it again with other settings")
        # the wall time measured then, else (None) evaluate's: the sum of the tasks' recorded seconds
        train_seconds = stored.get("summary", {}).get("train_seconds")
    else:
        if differences and Run(run_dir).finished_tasks():
            raise ValueError(f"{run_dir} already holds a {method} run trained with other settings "
                             f"({', '.join(differences)}); remove that folder, or give the benchmark another "
                             f"--output_dir, to train it anew")
        (Path(run_dir) / EVAL_DIR / METRICS_FILE).unlink(missing_ok=True)  # an older run's: never reused after this
        resumed = differences == []  # the same run, killed before its end: continued from its last checkpoint
        if resumed:
            train_settings = dataclasses.replace(train_settings, resume_from_checkpoint="latest")
        log(f"[{method}] {'resuming' if resumed else 'training'} {len(tasks)} tasks x "
            f"{train_settings.max_train_steps} steps -> {run_dir}")
        started = time.perf_counter()
        train(train_settings, progress=config.progress)
        # a resumed run's wall time here misses its earlier part: evaluate sums the tasks' recorded seconds instead
        train_seconds = None if resumed else time.perf_counter() - started
        log(f"[{method}] trained in {time.perf_counter() - started:.0f} s; evaluating every task state")
    result = evaluate(run_dir, num_images=config.num_images, config=eval_config, method=method)
    if train_seconds is not None:
        result.summary["train_seconds"] = train_seconds  # wall time of dcfast.train, measured here
    paths = write_report(result)
    log(f"[{method}] evaluated in {result.summary['eval_seconds']:.0f} s; report {paths['report']}")
    return {"method": method, "run_dir": run_dir, "summary": dict(result.summary), "report": paths}


SUMMARY_COLUMNS = (("final_fidelity", "final fidelity"), ("fidelity_forgetting", "fidelity forgetting"),
                   ("ammd", "AMMD"), ("bwt_mmd", "BwT-MMD"), ("final_accuracy", "final acc"),
                   ("forgetting", "forgetting"), ("train_seconds", "train s"), ("eval_seconds", "eval s"))


def summary_table(runs: List[Dict[str, object]]) -> str:
    """A markdown table: one row per method with its summary metrics."""
    def fmt(value):
        return "–" if value is None or value != value else f"{value:.4g}"
    lines = ["| method | " + " | ".join(label for _, label in SUMMARY_COLUMNS) + " |",
             "|---|" + "---|" * len(SUMMARY_COLUMNS)]
    lines += [f"| {r['method']} | " + " | ".join(fmt(r["summary"].get(k)) for k, _ in SUMMARY_COLUMNS) + " |"
              for r in runs]
    return "\n".join(lines)


def run_demo(config: DemoConfig, log: Callable[[str], None] = print) -> Dict[str, object]:
    """Concepts -> train -> evaluate -> report for each method of `config`; with several, a comparison.

    Returns {"runs": [run_method results], "table": markdown summary, "compare": paths or None}.
    """
    from dcfast.training.methods import get_method

    for method in config.methods:
        get_method(method)  # unknown names fail before any work
    check_base_model(config.base_model)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tasks = write_concepts(config)
    log(f"demo: {len(tasks)} concepts ({', '.join(t['class_word'] for t in tasks)}) written to "
        f"{Path(config.output_dir) / 'concepts'}; base model {config.base_model}")
    runs = [run_method(config, method, tasks, str(Path(config.output_dir) / method.replace("+", "_")), log)
            for method in config.methods]
    compare_paths = None
    if len(runs) > 1:
        from dcfast.eval.report import compare

        compare_paths = compare([r["run_dir"] for r in runs], str(Path(config.output_dir) / "compare"))
    return {"runs": runs, "table": summary_table(runs), "compare": compare_paths}


def replace(config: DemoConfig, **changes) -> DemoConfig:
    """A copy of `config` with `changes` (None values ignored)."""
    return dataclasses.replace(config, **{k: v for k, v in changes.items() if v is not None})
