"""Evaluation of a continual-personalization run (docs/design.md): accuracy, MMD and I2I matrices.

For every task state j (the model after task j) and every concept i <= j seen by then:

- accuracy A[i, j]: DC classification (`dcfast.eval.classify`, adaptive elimination) of concept i's
  held-out real images among the prompts of all seen concepts plus the pretrained concept c_0
  (the run's class prompt, e.g. "a photo of a dog") of every seen class word;
- MMD M[i, j]: unbiased MMD^2 (KID kernel) between features of `num_images` images generated for
  concept i with DDIM under state j and features of concept i's real held-out images;
- I2I[i, j] (only with CLIP features): mean cosine similarity of generated vs real embeddings;
- fidelity F[i, j] (only for the tiny world's concepts, docs/world.md): the fraction of `fidelity_images`
  samples of concept i's prompt under state j that the oracle (`dcfast.world.oracle`) judges to carry every
  defining attribute of concept i (shape and colour, `dcfast.world.scenes.DEFINING`); shape-only, colour-only,
  pattern-only and background-only beside it;
- overwrite O[i, j] (world runs, i < j): the fraction of those samples of concept i's prompt under state j that
  the oracle judges to carry concept j's defining attributes instead: forgetting by the newest concept taking
  over the earlier prompts (the token ignored), told apart from forgetting by degradation;
- base fidelity B[j] (world runs): the fraction of samples of the base model's own prompts (four coloured base
  shapes, `dcfast.world.scenes.BASE_PROMPT_FACTORS`, `fidelity_images` samples in all) that state j draws with the
  prompt's shape and colour: whether the state still follows the text, or draws its concepts for every prompt.

The run directory is read through its one reader, `dcfast.io.runs.Run` (and `load_pipeline` for a task state).
Concepts without a held-out folder are evaluated on their training images; the report says so.
"""
from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from dcfast.eval import metrics
from dcfast.eval.classify import DEFAULT_STAGES, check_stages, classify
from dcfast.io.images import find_images, open_image, to_tensor, to_uint8
from dcfast.io.runs import Run, Task, load_pipeline
from dcfast.eval.features import cosine_i2i, load_features
from dcfast.eval.sampling import (default_time_ids, generate, pipeline_conditions, pipeline_prediction_type,
                                  resolution, to_model_space)


@dataclass
class EvalConfig:
    """Evaluation settings; defaults sized for a CPU run of the tiny model (see each comment)."""

    num_images: int = 8  # generated images per (concept, state) for MMD; >= 2 (unbiased MMD needs pairs)
    num_inference_steps: int = 20  # DDIM steps, eta = 0
    guidance_scale: float = 7.5  # classifier-free guidance, Stable Diffusion's default
    stages: Tuple[Tuple[int, int], ...] = DEFAULT_STAGES  # DC adaptive elimination schedule
    max_eval_images: Optional[int] = 8  # cap on real held-out images per concept (None: all)
    grid_images: int = 4  # generated images per (concept, state) kept for the image grids
    seed: int = 0
    loss: str = "l2"
    max_batch: Optional[int] = None  # U-Net rows per call (None: dcfast.engine.scores' default)
    fidelity_images: int = 32  # world runs: samples per (concept, state) the oracle judges; steps of 1/32
    oracle: Optional[str] = None  # world runs: oracle weights (None: the one shipped in the package)
    fidelity_only: bool = False  # world runs: the oracle's fidelity only, no DC accuracy or MMD (about half the time)
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self):
        if self.num_images < 2:
            raise ValueError(f"num_images must be >= 2 (unbiased MMD needs two samples), got {self.num_images}")
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if self.fidelity_images < 1:
            raise ValueError(f"fidelity_images must be >= 1, got {self.fidelity_images}")
        if self.max_eval_images is not None and self.max_eval_images < 2:
            raise ValueError(f"max_eval_images must be >= 2 or None, got {self.max_eval_images}")
        self.stages = check_stages(self.stages)


@dataclass
class TaskEval:
    """One column of the matrices: every seen concept i <= j under task state j (lists indexed i-1)."""

    task_index: int
    accuracy: List[float]
    mmd: List[float]
    i2i: Optional[List[float]]
    seconds_per_image: List[float]  # DC classification time per held-out image
    unet_evals_per_image: List[float]
    fidelity: Optional[List[Dict[str, float]]] = None  # world concepts: oracle.fidelity per concept
    overwrite: Optional[List[float]] = None  # world concepts i < j: fidelity of concept i's samples to concept j
    base_fidelity: Optional[float] = None  # world runs: the base model's own prompts drawn as they say
    samples: Dict[int, torch.Tensor] = field(default_factory=dict, repr=False)  # i -> uint8 (n, 3, H, W)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("samples")
        return out


@dataclass
class EvalResult:
    """Matrices (N, N) with rows = concepts and columns = task states (NaN where i > j) and the summary."""

    run_dir: str
    method: str
    features: str
    tasks: List[dict]
    accuracy: Optional[torch.Tensor]  # None: fidelity_only
    mmd: Optional[torch.Tensor]
    i2i: Optional[torch.Tensor]
    seconds_per_image: Optional[torch.Tensor]
    summary: Dict[str, Optional[float]]
    config: dict
    fidelity: Optional[Dict[str, torch.Tensor]] = None  # world runs: "all", then one matrix per attribute
    overwrite: Optional[torch.Tensor] = None  # world runs: O[i, j], NaN where i >= j
    base_fidelity: Optional[List[float]] = None  # world runs: B[j] per task state
    samples: Dict[Tuple[int, int], torch.Tensor] = field(default_factory=dict, repr=False)  # (i, j) -> uint8
    real_samples: Dict[int, torch.Tensor] = field(default_factory=dict, repr=False)  # i -> uint8

    def to_dict(self) -> dict:
        """JSON-ready dict (matrices as nested lists, NaN as None); images are left out."""
        def matrix(m):
            return None if m is None else [[None if math.isnan(v) else v for v in row] for row in m.tolist()]
        return {"run_dir": self.run_dir, "method": self.method, "features": self.features, "tasks": self.tasks,
                "summary": {k: (None if v is None or (isinstance(v, float) and math.isnan(v)) else v)
                            for k, v in self.summary.items()},
                "accuracy": matrix(self.accuracy), "mmd": matrix(self.mmd), "i2i": matrix(self.i2i),
                "seconds_per_image": matrix(self.seconds_per_image), "config": self.config,
                "fidelity": None if self.fidelity is None else {k: matrix(m) for k, m in self.fidelity.items()},
                "overwrite": matrix(self.overwrite), "base_fidelity": self.base_fidelity}


# --- images -----------------------------------------------------------------------------------

def load_image_folder(folder: str, size: int, limit: Optional[int] = None, field: str = "eval_images") -> torch.Tensor:
    """A concept folder's images (sorted by name, at most `limit`), preprocessed as in training
    (`dcfast.io.images`: shorter side resized, center crop), as float (n, 3, size, size) in [0, 1].

    Raises ValueError naming the folder or the unreadable file, or when fewer than 2 images remain.
    """
    files = find_images(folder, field)[:limit]
    if len(files) < 2:
        raise ValueError(f"{field}: folder {str(folder)!r} has {len(files)} image(s); evaluation needs at least 2")
    return torch.stack([to_tensor(open_image(path, field), size) for path in files]) * 0.5 + 0.5


# --- one task state ---------------------------------------------------------------------------

def candidate_prompts(tasks: Sequence, task_index: int) -> List[str]:
    """Prompts of seen concepts 1..j, then every distinct c_0 of the seen concepts (the pretrained concepts)."""
    seen = [t for t in tasks if t.index <= task_index]
    return [t.prompt for t in seen] + list(dict.fromkeys(t.pretrained_concept_prompt for t in seen))


def _real_images(task, size: int, config: EvalConfig) -> torch.Tensor:
    if task.eval_images is not None:
        return load_image_folder(task.eval_images, size, config.max_eval_images, f"task {task.index} eval_images")
    return load_image_folder(task.images, size, config.max_eval_images, f"task {task.index} images")


def world_concepts(tasks: Sequence) -> Optional[list]:
    """Each task's world concept (`dcfast.world.scenes.read_concept` of its images folder), or None unless all have one."""
    from dcfast.world.scenes import read_concept

    concepts = [read_concept(t.images) for t in tasks]
    return concepts if all(c is not None for c in concepts) else None


def _load_oracle(config: EvalConfig):
    from dcfast.world.oracle import ORACLE_FILE, load_oracle

    return load_oracle(config.oracle or ORACLE_FILE).to(config.device)


_NOT_A_WORLD_RUN = ("{run_dir}: fidelity_only needs a tiny-world run (concepts the oracle reads), and this run's task "
                    "images are not world renders: evaluate it without fidelity_only (--fidelity_only)")


def _fidelity(oracle, generated: torch.Tensor, concept, newest, config: EvalConfig) -> Tuple[Dict[str, float],
                                                                                               Optional[float]]:
    """The oracle's fidelity of the first `fidelity_images` samples to the concept (per attribute and "all"), and
    their fidelity ("all") to the state's `newest` concept (None when `newest` is None: the concept is the newest)."""
    from dcfast.world.oracle import fidelity, read_attributes

    readings = read_attributes(oracle, generated[:config.fidelity_images])
    return fidelity(readings, concept), None if newest is None else fidelity(readings, newest)["all"]


def _base_fidelity(pipe, oracle, config: EvalConfig) -> float:
    """B[j]: the fraction of `fidelity_images` samples of the base prompts (split evenly, seeded apart from the
    concepts') that the oracle reads with their prompt's shape and colour."""
    from dcfast.world.oracle import read_attributes
    from dcfast.world.scenes import BASE_PROMPT_FACTORS, COLOUR_NAMES, SHAPES, caption

    count = max(1, config.fidelity_images // len(BASE_PROMPT_FACTORS))
    hits = []
    for k, (shape, colour) in enumerate(BASE_PROMPT_FACTORS):
        images = generate(pipe, caption(SHAPES.index(shape), COLOUR_NAMES.index(colour)), count,
                          num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
                          generator=torch.Generator().manual_seed(config.seed + 10_000 + k))
        readings = read_attributes(oracle, images)
        hits.append((readings["shape"] == SHAPES.index(shape)) & (readings["colour"] == COLOUR_NAMES.index(colour)))
    return float(torch.cat(hits).double().mean())


def evaluate_task(run_dir: str, task_index: int, *, pipe=None, tasks=None, features=None,
                  config: Optional[EvalConfig] = None, real_features: Optional[Dict[int, torch.Tensor]] = None,
                  progress=None, oracle=None) -> TaskEval:
    """Evaluate task state j = task_index on every concept i <= j (one column of the matrices).

    The trainer calls this after each task (`--eval_every_task`), passing its in-memory `pipe` and
    `tasks`; otherwise both are read from `run_dir` (`Run`, `load_pipeline`). `features` is an extractor
    from `dcfast.eval.features` (default: the deterministic default). `real_features` caches real-image
    features across calls.
    """
    config = config or EvalConfig()
    tasks = tasks if tasks is not None else Run(run_dir).tasks()
    if not 1 <= task_index <= len(tasks):
        raise ValueError(f"task_index must be in [1, {len(tasks)}], got {task_index}")
    if pipe is None:
        pipe = load_pipeline(run_dir, task_index, device=config.device)
    pipeline_prediction_type(pipe, f"{run_dir} task {task_index}")
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    features = features if features is not None else load_features(None)
    is_clip = getattr(features, "clip", False)
    real_features = real_features if real_features is not None else {}
    size = resolution(pipe)

    prompts = candidate_prompts(tasks, task_index)
    cond = pipeline_conditions(pipe, prompts)
    concepts = world_concepts(tasks)
    if concepts is not None and oracle is None:
        oracle = _load_oracle(config)
    if config.fidelity_only and concepts is None:
        raise ValueError(_NOT_A_WORLD_RUN.format(run_dir=run_dir))
    column = TaskEval(task_index, [], [], [] if is_clip and not config.fidelity_only else None, [], [],
                      [] if concepts is not None else None, [] if concepts is not None else None)
    for task in tasks[:task_index]:
        i = task.index
        if not config.fidelity_only:
            real = _real_images(task, size, config)
            # accuracy: same (t, eps) pool for concept i in every state, so columns differ only by the model
            x0 = to_model_space(pipe, real)
            result = classify(pipe.unet, pipe.scheduler, x0, cond, stages=config.stages, loss=config.loss,
                              max_batch=config.max_batch, generator=torch.Generator().manual_seed(config.seed + i),
                              time_ids=default_time_ids(pipe))
            column.accuracy.append(float((result.predictions == i - 1).double().mean()))
            column.seconds_per_image.append(result.seconds_per_image)
            column.unet_evals_per_image.append(result.unet_evals / real.shape[0])
        # same initial noise for concept i in every state, so grids show one sample evolving
        count = config.num_images if concepts is None else max(config.num_images, config.fidelity_images)
        generated = generate(pipe, task.prompt, count, num_inference_steps=config.num_inference_steps,
                             guidance_scale=config.guidance_scale, generator=torch.Generator().manual_seed(config.seed + i))
        if concepts is not None:
            newest = concepts[task_index - 1] if i < task_index else None
            own, overwritten = _fidelity(oracle, generated, concepts[i - 1], newest, config)
            column.fidelity.append(own)
            if overwritten is not None:
                column.overwrite.append(overwritten)
        if not config.fidelity_only:
            if i not in real_features:
                real_features[i] = features(real)
            fake = features(generated[:config.num_images])
            column.mmd.append(metrics.mmd2_unbiased(fake, real_features[i]))
            if column.i2i is not None:
                column.i2i.append(cosine_i2i(fake, real_features[i]))
        column.samples[i] = to_uint8(generated[:config.grid_images])
        if progress is not None:
            progress.update(1)
    if concepts is not None:
        column.base_fidelity = _base_fidelity(pipe, oracle, config)
    return column


# --- the whole run ----------------------------------------------------------------------------

def _readable(read) -> dict:
    """`read()` when it gives a dict, else {} (a missing or corrupt file)."""
    try:
        value = read()
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


def run_info(run: Run, task_metrics: List[dict]) -> Tuple[str, Optional[float]]:
    """(method, training seconds or None) from the run's files, where present.

    The method is the run's config.method (else the folder name); the time sums "seconds" of every task's
    metrics.json, `task_metrics` (None when a task lacks it).
    """
    method = _readable(run.config).get("method")
    seconds = [m.get("seconds") for m in task_metrics]
    total = float(sum(seconds)) if all(isinstance(s, (int, float)) for s in seconds) else None
    return method if isinstance(method, str) else run.path.resolve().name, total


def finished_prefix(run: Run) -> List[Task]:
    """The run's tasks up to the first unfinished one; an error when none is finished or a gap hides later ones."""
    tasks, finished = run.tasks(), set(run.finished_tasks())
    done = [t.index in finished for t in tasks]
    n = done.index(False) if False in done else len(done)
    run_dir = str(run.path)
    if any(done[n:]):
        later = [t.index for t, d in zip(tasks, done) if d and t.index > n + 1]
        raise FileNotFoundError(f"{run_dir}: task {n + 1} is unfinished (no {os.path.join(run_dir, f'task_{n + 1}', 'metrics.json')}) "
                                f"but later tasks {later} are finished; the run directory is damaged")
    if n == 0:
        raise FileNotFoundError(f"{run_dir} holds no finished task (no {os.path.join(run_dir, 'task_1', 'metrics.json')})")
    if n < len(tasks):
        warnings.warn(f"{run_dir}: evaluating the {n} finished tasks of {len(tasks)}", stacklevel=3)
    return list(tasks[:n])


def evaluate(run_dir: str, features: Optional[str] = None, num_images: int = 8, *,
             config: Optional[EvalConfig] = None, method: Optional[str] = None) -> EvalResult:
    """Evaluate every task state of a run: accuracy, MMD (and CLIP I2I) matrices and their summary.

    Args:
        run_dir: the trainer's output_dir (task_1/ ... task_N/).
        features: a local CLIP vision model / SD safety_checker folder; None = the deterministic default.
        num_images: generated images per (concept, state); overrides `config.num_images`.
        config: further settings (`EvalConfig`).
        method: label for reports; default from the run's config.json, else the folder name.
    """
    from tqdm.auto import tqdm

    config = config or EvalConfig()
    config = EvalConfig(**{**asdict(config), "num_images": num_images})
    start = time.perf_counter()
    run = Run(run_dir)
    tasks = finished_prefix(run)
    n = len(tasks)
    extractor = load_features(features, config.device)
    nan = torch.full((n, n), float("nan"), dtype=torch.float64)
    acc, mmd, sec = nan.clone(), nan.clone(), nan.clone()
    i2i = None
    oracle, fid, overwrite, base = None, None, None, None
    concepts = world_concepts(tasks)
    if config.fidelity_only and concepts is None:
        raise ValueError(_NOT_A_WORLD_RUN.format(run_dir=run_dir))
    if concepts is not None:
        from dcfast.world.scenes import ATTRIBUTES

        oracle = _load_oracle(config)
        fid = {name: nan.clone() for name in ("all",) + tuple(ATTRIBUTES)}
        overwrite = nan.clone()
        base = []
    samples, real_features = {}, {}
    with tqdm(total=n * (n + 1) // 2, desc="eval (state, concept)", disable=not config.progress) as bar:
        for j in range(1, n + 1):
            bar.set_postfix_str(f"state {j}/{n}")
            column = evaluate_task(run_dir, j, tasks=tasks, features=extractor, config=config,
                                   real_features=real_features, progress=bar, oracle=oracle)
            if not config.fidelity_only:
                acc[:j, j - 1] = torch.tensor(column.accuracy, dtype=torch.float64)
                mmd[:j, j - 1] = torch.tensor(column.mmd, dtype=torch.float64)
                sec[:j, j - 1] = torch.tensor(column.seconds_per_image, dtype=torch.float64)
            if column.i2i is not None:
                i2i = nan.clone() if i2i is None else i2i
                i2i[:j, j - 1] = torch.tensor(column.i2i, dtype=torch.float64)
            if fid is not None:
                for name, m in fid.items():
                    m[:j, j - 1] = torch.tensor([f[name] for f in column.fidelity], dtype=torch.float64)
                overwrite[:j - 1, j - 1] = torch.tensor(column.overwrite, dtype=torch.float64)
                base.append(column.base_fidelity)
            samples.update({(i, j): s for i, s in column.samples.items()})
    size = None
    real_samples = {}
    for task in tasks:
        size = size or samples[(task.index, task.index)].shape[-1]
        real_samples[task.index] = to_uint8(_real_images(task, size, config)[:config.grid_images])
    task_metrics = [_readable(lambda: run.metrics(t.index)) for t in tasks]
    label, train_seconds = run_info(run, task_metrics)
    if config.fidelity_only:
        acc = mmd = sec = None
        summary = dict.fromkeys(("ammd", "bwt_mmd", "final_accuracy", "forgetting"))
    else:
        summary = metrics.summary(acc, mmd)
    summary.update({
        "final_i2i": float(i2i[:, -1].mean()) if i2i is not None else None,
        "seconds_per_image": None if sec is None else float(sec[~sec.isnan()].mean()),
        "train_seconds": train_seconds,
        "eval_seconds": time.perf_counter() - start,
    })
    if fid is not None:
        summary.update(metrics.fidelity_summary(fid["all"], fid["shape"], fid["colour"]))
        summary["final_overwrite"] = metrics.final_overwrite(overwrite)
        summary["final_base_fidelity"] = base[-1]
    task_info = [{"index": t.index, "token": t.token, "class_word": t.class_word, "prompt": t.prompt,
                  "pretrained_concept_prompt": t.pretrained_concept_prompt,
                  "eval_split": "held-out" if t.eval_images is not None else "train",
                  "lora_change": recorded.get("lora_change"), "token_change": recorded.get("token_change")}
                 for t, recorded in zip(tasks, task_metrics)]
    return EvalResult(run_dir=os.fspath(run_dir), method=method or label, features=extractor.name, tasks=task_info,
                      accuracy=acc, mmd=mmd, i2i=i2i, seconds_per_image=sec, summary=summary, fidelity=fid,
                      overwrite=overwrite, base_fidelity=base,
                      config={**asdict(config), "features_path": None if features is None else os.fspath(features)},
                      samples=samples, real_samples=real_samples)
