"""`dcfast demo`: continual personalization end to end on a CPU, with nothing to download.

1. Write the concepts: by default a task sequence of the tiny world (`dcfast.world`, DESIGN 6), where
   the oracle judges fidelity; with `photos=True`, photos from scikit-image (`dcfast.demo_data`).
2. Train every task in order with `dcfast.train` on the tiny base model shipped in the package
   (`dcfast/assets/tiny-base`, made by scripts/pretrain_tiny_base.py).
3. Evaluate every task state (`dcfast.evaluate`: fidelity on the world, accuracy and MMD matrices,
   AMMD, BwT, forgetting) and write the report (`dcfast.report`); with several methods, also the
   comparison table and plot.

Training settings for the world (WORLD_TRAIN, plus WORLD_METHOD_TRAIN per method) and for photos
(PHOTO_TRAIN) replace a few TrainConfig defaults that are sized for real models; each carries its reason.
Everything else is TrainConfig's default.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

BASE_MODEL = Path(__file__).resolve().parent / "assets" / "tiny-base"
DEFAULT_METHOD = "ewc-dc"
DEFAULT_SEQUENCE = "same-class-test"  # the hard case: every concept a star

# TrainConfig values for world runs (the rest keep their defaults). Chosen on the validation sequence
# same-class-val with scripts/world_regime.py (table: benchmarks/world_regime.md), so that the shared LoRA,
# not the frozen per-task token, carries each concept, as on Stable Diffusion: at TrainConfig's rates
# (LoRA 1e-4, token 5e-3) the token alone held concept 1 and nothing later tasks did could erase it.
WORLD_TRAIN = {
    "learning_rate": 1e-3,  # the usual LoRA rate of short DreamBooth runs; stable here (rank 4, clipping at 1)
    "token_learning_rate": 1e-3,  # 5x below TrainConfig's: the token helps, the LoRA does the work
    "max_train_steps": 200,  # concept 1's colour learned at 200 steps; 400 steps changed no attribute's learning
    # The base model's sampling guidance (scripts/pretrain_tiny_base.py chose it on the world's attribute prompts,
    # no personal concept): evaluation and `dcfast eval` sample world runs with it.
    "validation_guidance_scale": 5.0,
    "checkpointing_steps": 10**9,  # no mid-task checkpoints: a task takes seconds, resuming would save nothing
}

# Per-method values on the world, on top of WORLD_TRAIN, each chosen on both validation sequences
# (benchmarks/methods_tuning.md). DSC at (k, T) = (3, 2): final fidelity 0.62 vs 0.56 at (4, 4) on
# same-class-val and 0.40 vs 0.38 on distinct-class-val, at 7 U-Net rows per image per distillation step
# instead of 17. TrainConfig keeps (4, 4), EWC-DC's choice (it lost at (3, 2): 0.65 vs 0.73).
WORLD_METHOD_TRAIN: Dict[str, Dict[str, object]] = {"dsc": {"num_dc_concepts": 3, "num_dc_timesteps": 2}}

# TrainConfig values for the photo demo (the rest keep their defaults).
PHOTO_TRAIN = {
    # Few steps per task on a CPU: a LoRA at lr 1e-4 barely moves in 100 steps; 1e-3 is the usual
    # LoRA rate for short DreamBooth runs and stays stable here (rank 4, grad-norm clipping at 1).
    "learning_rate": 1e-3,
    "max_train_steps": 100,  # 3 tasks of ewc-dc + evaluation: 71 s on 2 idle cores (--all: ~7 min)
    # No mid-task checkpoints: a demo task takes seconds, resuming it would save nothing.
    "checkpointing_steps": 10**9,
}


@dataclass
class DemoConfig:
    """Settings of `dcfast demo` (and of `dcfast bench methods`, which repeats it over seeds)."""

    output_dir: str = "dcfast-demo"
    methods: Sequence[str] = (DEFAULT_METHOD,)
    sequence: str = DEFAULT_SEQUENCE  # a world sequence (dcfast.world.SEQUENCES); ignored with photos
    photos: bool = False  # the photo concepts (cat, cup, rocket, horse, person, motorcycle) instead of the world
    num_tasks: Optional[int] = None  # concepts learned in sequence (None: the whole world sequence, 3 photos)
    max_train_steps: Optional[int] = None  # per task (None: WORLD_TRAIN's or PHOTO_TRAIN's)
    seed: int = 0
    num_train_images: int = 8  # images per concept for training
    num_eval_images: int = 8  # held-out images per concept for accuracy and MMD
    num_images: int = 8  # generated images per (concept, task state) for MMD
    fidelity_images: int = 32  # world: generated images per (concept, task state) the oracle judges
    num_inference_steps: int = 20  # DDIM steps when generating
    base_model: str = str(BASE_MODEL)
    train_overrides: Dict[str, object] = field(default_factory=dict)  # further TrainConfig fields
    progress: bool = True


def check_base_model(path: str) -> Path:
    """The base model directory, or a ValueError saying how to produce it."""
    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise ValueError(f"base_model: {str(path)!r} holds no diffusers model (model_index.json missing); the "
                         f"package ships one at {BASE_MODEL}, rebuilt by `python scripts/pretrain_tiny_base.py`")
    return path


def write_concepts(config: DemoConfig) -> List[Dict[str, str]]:
    """The concepts as PNGs under output_dir/concepts: the world sequence's renders (32x32), or photo crops
    at the base model's resolution."""
    folder = Path(config.output_dir) / "concepts"
    if not config.photos:
        from dcfast.world import write_sequence

        return write_sequence(folder, config.sequence, num_train=config.num_train_images,
                              num_eval=config.num_eval_images, seed=config.seed, num_tasks=config.num_tasks)
    from dcfast.demo_data import write_demo_concepts
    from dcfast.models import load_components

    resolution = load_components(check_base_model(config.base_model)).resolution
    return write_demo_concepts(folder, num_tasks=config.num_tasks or 3, resolution=resolution,
                               num_train=config.num_train_images, num_eval=config.num_eval_images, seed=config.seed)


def train_config(config: DemoConfig, method: str, tasks: List[Dict[str, str]], run_dir: str):
    """The TrainConfig of one method's run."""
    from dcfast.config import TrainConfig

    regime = PHOTO_TRAIN if config.photos else {**WORLD_TRAIN, **WORLD_METHOD_TRAIN.get(method, {})}
    values = {**regime, **config.train_overrides}
    if config.max_train_steps is not None:
        values["max_train_steps"] = config.max_train_steps
    # DSC distils for M steps after each task: a third of the task's steps keeps its cost comparable.
    values.setdefault("dsc_iterations", max(1, values["max_train_steps"] // 3))
    values.update(pretrained_model_name_or_path=str(check_base_model(config.base_model)), output_dir=run_dir,
                  method=method, tasks=tasks, seed=config.seed)
    return TrainConfig.from_dict(values)


def evaluation_config(config: DemoConfig):
    """The EvalConfig of every run of the demo: it samples with the regime's validation guidance."""
    from dcfast.config import TrainConfig
    from dcfast.evaluation import EvalConfig

    regime = {**(PHOTO_TRAIN if config.photos else WORLD_TRAIN), **config.train_overrides}
    return EvalConfig(num_images=config.num_images, num_inference_steps=config.num_inference_steps,
                      guidance_scale=regime.get("validation_guidance_scale", TrainConfig.validation_guidance_scale),
                      max_eval_images=config.num_eval_images, seed=config.seed, progress=config.progress,
                      fidelity_images=config.fidelity_images)


def _as_json(value: object) -> object:
    return json.loads(json.dumps(value))


def own_settings(settings: Dict[str, object]) -> Dict[str, object]:
    """A TrainConfig dict as the run's method sees it: without the fields only other methods read
    (Method.config_fields), with every field it lacks at its default (a run written before the field existed)."""
    from dcfast.config import TrainConfig
    from dcfast.methods import METHODS, get_method

    foreign = {f for cls in METHODS.values() for f in cls.config_fields} - set(get_method(settings["method"]).config_fields)
    defaults = {f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in {**_as_json(defaults), **settings}.items() if k not in foreign}


def finished_summary(run_dir: str, train_settings, eval_config) -> Optional[Dict[str, object]]:
    """The stored summary of a run in `run_dir` that was trained with exactly `train_settings` on the same base
    model weights (run.json's fingerprint: a base replaced at the same path is not the same) and evaluated with
    `eval_config` (progress display aside), or None (absent, unfinished or different)."""
    from dcfast.models import model_fingerprint

    try:
        run = json.loads((Path(run_dir) / "run.json").read_text())
        trained = run["config"]
        metrics = json.loads((Path(run_dir) / "eval" / "metrics.json").read_text())
    except (OSError, ValueError, KeyError):
        return None
    if run.get("base_model_fingerprint") != model_fingerprint(train_settings.pretrained_model_name_or_path):
        return None
    wanted = {k: v for k, v in _as_json(dataclasses.asdict(eval_config)).items() if k != "progress"}
    if own_settings(trained) != own_settings(_as_json(train_settings.to_dict())) or not all(
            metrics.get("config", {}).get(k) == v for k, v in wanted.items()):
        return None
    summary = metrics.get("summary", {})
    return summary if "train_seconds" in summary else None


def run_method(config: DemoConfig, method: str, tasks: List[Dict[str, str]], run_dir: str,
               log: Callable[[str], None] = print, reuse: bool = False) -> Dict[str, object]:
    """Train one method on the tasks, evaluate every task state, write its report.

    `reuse`: a finished run already in `run_dir` with the same training and evaluation settings is
    returned as it is (a killed benchmark resumes without redoing its finished runs).
    Returns {"method", "run_dir", "summary" (the evaluation's, plus train_seconds), "report" paths}.
    """
    from dcfast.evaluation import evaluate
    from dcfast.report import write_report
    from dcfast.trainer import train

    train_settings, eval_config = train_config(config, method, tasks, run_dir), evaluation_config(config)
    stored = finished_summary(run_dir, train_settings, eval_config) if reuse else None
    if stored is not None:
        log(f"[{method}] reusing the finished run in {run_dir}")
        eval_dir = Path(run_dir) / "eval"
        return {"method": method, "run_dir": run_dir, "summary": stored,
                "report": {"report": str(eval_dir / "report.md"), "metrics": str(eval_dir / "metrics.json")}}
    (Path(run_dir) / "eval" / "metrics.json").unlink(missing_ok=True)  # an older run's: never reused after this
    log(f"[{method}] training {len(tasks)} tasks x {train_settings.max_train_steps} steps -> {run_dir}")
    started = time.perf_counter()
    train(train_settings)
    train_seconds = time.perf_counter() - started
    log(f"[{method}] trained in {train_seconds:.0f} s; evaluating every task state")
    result = evaluate(run_dir, num_images=config.num_images, config=eval_config, method=method)
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
    from dcfast.methods import get_method

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
        from dcfast.report import compare

        compare_paths = compare([r["run_dir"] for r in runs], str(Path(config.output_dir) / "compare"))
    return {"runs": runs, "table": summary_table(runs), "compare": compare_paths}


def replace(config: DemoConfig, **changes) -> DemoConfig:
    """A copy of `config` with `changes` (None values ignored)."""
    return dataclasses.replace(config, **{k: v for k, v in changes.items() if v is not None})
