"""Watching a run: per-step losses (trackers, task_{i}/losses.json, loss_curve.png) and validation images.

Steps are counted over the whole run, so every tracker sees one increasing axis (`StepAxis`): task n's
training step s (1-based) is `(n-1)·(max_train_steps + C) + s`, where C is the method's consolidation steps
per task (DSC's distillation iterations, else 0); its consolidation step m follows at `... + max_train_steps
+ m`, and its validation images are logged at the task's last step number.
"""
from __future__ import annotations

import logging
from pathlib import Path
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from dcfast.io.atomic import write_atomic
from dcfast.io.images import to_uint8
from dcfast.io.runs import Task, read_json, task_dir, write_json

LOSSES_FILE = "losses.json"  # task_{i}/losses.json: {"train": {"loss": [...], part: [...]}, "distill": {...}, "first_step"}
VALIDATION_FILE = "validation.png"  # task_{i}/validation.png: a row per validation prompt
LOSS_CURVE_FILE = "loss_curve.png"  # output_dir/loss_curve.png, written at the end of the run
logger = logging.getLogger(__name__)


class ProcessLogger(logging.LoggerAdapter):
    """A logger for the training loop: records of the main process only (unless `main_process_only=False`), and
    "[process i] " before a message only where several processes run (accelerate's adapter says [RANK 0] always)."""

    def log(self, level, msg, *args, main_process_only: bool = True, **kwargs):
        from accelerate import PartialState

        state = PartialState()
        if main_process_only and not state.is_main_process:
            return
        if state.num_processes > 1:
            msg = f"[process {state.process_index}] {msg}"
        kwargs.setdefault("stacklevel", 3)
        super().log(level, msg, *args, **kwargs)


def process_logger(name: str) -> ProcessLogger:
    return ProcessLogger(logging.getLogger(name), {})


@dataclass(frozen=True)
class StepAxis:
    """The run-wide step numbers of a run whose tasks take `train_steps` steps and `consolidation_steps` more."""

    train_steps: int
    consolidation_steps: int = 0

    def train_step(self, task: int, step: int) -> int:
        """Run-wide step number of task `task`'s training step `step` (1-based)."""
        return (task - 1) * (self.train_steps + self.consolidation_steps) + step

    def consolidation_step(self, task: int, iteration: int) -> int:
        """Run-wide step number of task `task`'s consolidation step `iteration` (1-based)."""
        return self.train_step(task, self.train_steps + iteration)


class LossHistory:
    """One task's per-step values: the total loss and each part the method reports, then DSC's iterations."""

    def __init__(self, losses: Sequence[float] = (), parts: Optional[Dict[str, List[float]]] = None):
        self.train: Dict[str, List[float]] = {"loss": list(losses), **{k: list(v) for k, v in (parts or {}).items()}}
        self.distill: Dict[str, List[float]] = {}
        self.distill_steps = 0

    def add_step(self, loss: float, parts: Dict[str, float]) -> None:
        """One step's total and parts; a part a step does not compute (EWC-DC's DC term off its dc_every steps) is
        None there, so every list stays aligned with the steps."""
        steps = len(self.train["loss"])
        self.train["loss"].append(loss)
        for key in parts.keys() - self.train.keys():
            self.train[key] = [None] * steps
        for key, values in self.train.items():
            if key != "loss":
                values.append(parts.get(key))

    def add_distill(self, parts: Dict[str, float]) -> int:
        """Record one consolidation step's parts; returns its number in the task (1-based)."""
        for key, value in parts.items():
            self.distill.setdefault(key, []).append(value)
        self.distill_steps += 1
        return self.distill_steps

    def parts(self) -> Dict[str, List[float]]:
        """The per-step parts (everything but the total), as a checkpoint stores them."""
        return {k: v for k, v in self.train.items() if k != "loss"}

    def save(self, path: Path, first_step: int) -> None:
        write_json(path, {"first_step": first_step, "train": self.train, "distill": self.distill})


def validation_prompts(config, plan: List[Task], n: int) -> List[str]:
    """The validation prompts for task state n: {token}/{class_word} filled with task n's; prompts naming a
    later task's token are left out until that task (its token would split into pieces now)."""
    task = plan[n - 1]
    later = [t.token for t in plan[n:]]
    prompts = []
    for prompt in config.validation_prompts:
        text = prompt.replace("{token}", task.token).replace("{class_word}", task.class_word)
        if any(token in text for token in later):
            logger.info(f"  validation prompt {text!r} waits for a later task's token")
            continue
        prompts.append(text)
    return prompts


@torch.no_grad()
def sample_images(config, components, models, prompt: str, count: int, seed: int) -> torch.Tensor:
    """`count` DDIM samples of `prompt` from the live model at the run's validation steps and guidance, seeded by
    `seed`: (count, 3, H, W) in [0, 1]."""
    from types import SimpleNamespace

    from dcfast.eval.sampling import generate

    pipe = SimpleNamespace(unet=models.unet, text_encoder=models.text_encoder, tokenizer=models.tokenizer,
                           text_encoder_2=models.text_encoder_2, tokenizer_2=models.tokenizer_2,
                           scheduler=models.noise_scheduler, vae=components.vae,
                           vae_scale_factor=components.vae_scale_factor)
    with models.accelerator.autocast():
        return generate(pipe, prompt, count, num_inference_steps=config.validation_inference_steps,
                        guidance_scale=config.validation_guidance_scale,
                        generator=torch.Generator().manual_seed(seed))


def sample_validation(config, components, models, prompts: List[str]) -> List[torch.Tensor]:
    """`num_validation_images` DDIM samples per prompt from the live model (the task state just written),
    seeded by the run's seed so that every task's grid starts from the same noise: (n, 3, H, W) in [0, 1] each."""
    return [sample_images(config, components, models, prompt, config.num_validation_images, config.seed)
            for prompt in prompts]


def _pixels(images: torch.Tensor) -> np.ndarray:
    """(n, 3, H, W) in [0, 1] -> (n, H, W, 3) uint8, as PIL and the trackers take images."""
    return to_uint8(images).permute(0, 2, 3, 1).numpy()


def save_grid(rows: List[torch.Tensor], path: Path) -> Path:
    """A PNG grid: one row per prompt, one column per image (2-pixel white gaps), written atomically."""
    from PIL import Image

    arrays = [_pixels(r) for r in rows]
    n, h, w = max(a.shape[0] for a in arrays), arrays[0].shape[1], arrays[0].shape[2]
    gap = 2
    grid = np.full((len(arrays) * (h + gap) - gap, n * (w + gap) - gap, 3), 255, dtype=np.uint8)
    for i, row in enumerate(arrays):
        for j, image in enumerate(row):
            grid[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = image
    return write_atomic(path, lambda temp: Image.fromarray(grid).save(temp, format="PNG"))


def log_images(accelerator, rows: List[torch.Tensor], prompts: List[str], step: int) -> None:
    """Each prompt's images to every tracker that takes images, in one call per tracker, under
    `validation/prompt_{j}` (TensorBoard: an NHWC batch per key; wandb, aim, clearml, swanlab, custom trackers:
    a list of PIL images per key; comet_ml: image by image, named with the prompt)."""
    from PIL import Image

    arrays = {f"validation/prompt_{j}": _pixels(row) for j, row in enumerate(rows)}
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images(arrays, step=step, dataformats="NHWC")
        elif tracker.name == "comet_ml":
            for (key, batch), prompt in zip(arrays.items(), prompts):
                for k, array in enumerate(batch):
                    tracker.tracker.log_image(Image.fromarray(array), name=f"{key}_{k}: {prompt}", step=step)
        elif hasattr(tracker, "log_images"):
            tracker.log_images({key: [Image.fromarray(a) for a in batch] for key, batch in arrays.items()}, step=step)
        else:
            logger.debug(f"tracker {tracker.name} takes no images; validation images only in the PNG grid")


def write_loss_curve(output_dir, num_tasks: int) -> Optional[Path]:
    """output_dir/loss_curve.png: every task's per-step total loss (and its parts, thinner) on the run-wide step
    axis, DSC's L_DSC where it ran, task boundaries dashed. None when no task has a losses.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    histories = []
    for n in range(1, num_tasks + 1):
        path = task_dir(output_dir, n) / LOSSES_FILE
        if path.is_file():
            histories.append((n, read_json(path)))
    if not histories:
        return None
    fig, ax = plt.subplots(figsize=(8, 4))
    colours = {}
    for n, data in histories:
        first = data["first_step"]
        for key, values in data["train"].items():
            if not values:
                continue
            values = np.array(values, dtype=float)  # None (a step without this part) -> NaN, left out
            steps = np.arange(first + 1, first + 1 + len(values))[np.isfinite(values)]
            style = dict(linewidth=1.6) if key == "loss" else dict(linewidth=0.8, alpha=0.7)
            line, = ax.plot(steps, values[np.isfinite(values)], color=colours.get(key),
                            label=None if key in colours else key, **style)
            colours.setdefault(key, line.get_color())
        distill = data["distill"].get("dsc_loss")
        if distill:
            start = first + len(data["train"]["loss"])
            steps = np.arange(start + 1, start + 1 + len(distill))
            line, = ax.plot(steps, distill, color=colours.get("dsc_loss"), linewidth=1.2, linestyle=":",
                            label=None if "dsc_loss" in colours else "DSC L_DSC")
            colours.setdefault("dsc_loss", line.get_color())
        if n > 1:
            ax.axvline(first + 0.5, color="grey", linestyle="--", linewidth=0.7)
    ax.set_xlabel("step (whole run)")
    ax.set_ylabel("loss")
    ax.set_title(f"losses of {len(histories)} task(s); dashed: task boundaries")
    if ax.get_legend_handles_labels()[0]:  # no steps at all (max_train_steps: 0): an empty plot, no legend
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(output_dir) / LOSS_CURVE_FILE
    write_atomic(path, lambda temp: fig.savefig(temp, format="png", dpi=110))
    plt.close(fig)
    return path
