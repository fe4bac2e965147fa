"""Prior preservation (DreamBooth, Ruiz et al. 2023; diffusers' --with_prior_preservation): the base model's own
samples of each class prompt c_0, learned beside the task's photos, so that a LoRA keeps drawing what the class
words drew and changes only what the modifier token asks for.

    L = L_method + prior_loss_weight * L_denoise(class images under their c_0)

The class images are sampled once, from the base model before any task (the adapter is still zero), for every class
prompt of the run, and written to PRIOR_FILE in the output dir: a resumed run reads them back instead of sampling
from a model that has since learned. Task n learns beside the class images of the class words of tasks 1..n. They are
the base model's, not the user's photos, so the setting stays replay-free.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from safetensors import safe_open

from dcfast.io.atomic import save_safetensors_atomic
from dcfast.io.runs import Task
from dcfast.models.prompts import Conditions, sdxl_time_ids
from dcfast.training.monitor import process_logger, sample_images
from dcfast.training.objectives import denoise_loss

PRIOR_FILE = "prior_images.safetensors"
logger = process_logger(__name__)


def class_prompts(plan: List[Task]) -> List[str]:
    """The run's distinct class prompts c_0, in the order their tasks come."""
    return list(dict.fromkeys(task.pretrained_concept_prompt for task in plan))


@dataclass
class PriorImages:
    """Class images in model space, (N, C, h, w), and each one's class prompt."""

    latents: torch.Tensor
    prompts: List[str]

    def __post_init__(self) -> None:
        # the distinct class prompts in first-seen order, and each image's index among them: derived once, so a
        # training step picks its conditions by indexing
        self.distinct = list(dict.fromkeys(self.prompts))
        self.prompt_index = torch.tensor([self.distinct.index(p) for p in self.prompts], dtype=torch.long)

    def rows_for(self, plan: List[Task], n: int) -> torch.Tensor:
        """Indices of the class images of tasks 1..n."""
        seen = {task.pretrained_concept_prompt for task in plan[:n]}
        return torch.tensor([i for i, prompt in enumerate(self.prompts) if prompt in seen], dtype=torch.long)

    @torch.no_grad()
    def encode(self, models) -> Conditions:
        """The conditions of the distinct class prompts, in first-seen order: they hold no trainable token and the text
        encoders are frozen, so one encoding serves a whole phase instead of one per step."""
        return models.encode(self.distinct)

    def loss(self, models, conditions: Conditions, rows: torch.Tensor, batch_size: int, generator: torch.Generator,
             noise_offset: float, resolution: int) -> torch.Tensor:
        """L_denoise of `batch_size` class images drawn from `rows`, each under its own class prompt's condition
        (`conditions`: `encode`'s)."""
        picked = rows[torch.randint(len(rows), (batch_size,), generator=generator)]
        conds = conditions[self.prompt_index[picked]]
        x0 = self.latents[picked.to(self.latents.device)]
        time_ids = None
        if models.text_encoder_2 is not None:  # SDXL: uncropped samples at the run's resolution
            size = (resolution, resolution)
            time_ids = sdxl_time_ids(size, (0, 0), size).to(x0.device).expand(batch_size, -1)
        return denoise_loss(models.unet, models.noise_scheduler, x0, conds, generator, noise_offset, time_ids)


def prior_images(config, components, models, plan: List[Task], finished: int, resolution: int,
                 encode: Callable[[torch.Tensor], torch.Tensor]) -> Optional[PriorImages]:
    """The run's class images: read from PRIOR_FILE, else sampled from the base model (at its own resolution, resized
    to the run's `resolution` as the task photos are), put in model space by `encode` ((N, 3, R, R) in [-1, 1]) and
    written there; sampled only before any task is finished, when the model is still the base. None when prior
    preservation is off."""
    if not config.with_prior_preservation:
        return None

    path = Path(config.output_dir) / PRIOR_FILE
    prompts = class_prompts(plan)
    accelerator = models.accelerator
    if not path.is_file():
        if finished:
            raise FileNotFoundError(
                f"with_prior_preservation: {str(path)!r} is missing, but {finished} task(s) of this run are finished; "
                f"the class images were sampled from the base model at the run's start and cannot be sampled again "
                f"from the trained one. Restore the file, or train into a new output_dir")
        if accelerator.is_main_process:
            logger.info(f"  prior preservation: sampling {config.num_class_images} class images of each of "
                        f"{prompts} from the base model into {path}")
            tensors = {}
            for index, prompt in enumerate(prompts):
                images = sample_images(config, components, models, prompt, config.num_class_images,
                                       seed=config.seed * 1000 + index)  # one batch per prompt, no grad
                if images.shape[-1] != resolution:
                    images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", antialias=True)
                tensors[f"class.{index}"] = encode(images * 2 - 1).cpu()
            save_safetensors_atomic(path, tensors, metadata={f"class.{i}": p for i, p in enumerate(prompts)})
        accelerator.wait_for_everyone()
    with safe_open(str(path), framework="pt") as handle:
        recorded = handle.metadata() or {}
        stored = {key: handle.get_tensor(key) for key in handle.keys()}
    if [recorded.get(f"class.{i}") for i in range(len(prompts))] != prompts or len(stored) != len(prompts):
        raise ValueError(f"with_prior_preservation: {str(path)!r} holds class images of {sorted(recorded.values())}, "
                         f"not of this run's class prompts {prompts}; delete it (before the first task is finished) "
                         f"or train into a new output_dir")
    latents = torch.cat([stored[f"class.{i}"] for i in range(len(prompts))]).to(accelerator.device)
    return PriorImages(latents, [p for i, p in enumerate(prompts) for _ in range(stored[f"class.{i}"].shape[0])])
