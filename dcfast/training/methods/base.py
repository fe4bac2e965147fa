"""The method interface: what the trainer calls, and the models and task data it hands over.

The trainer owns the loop (optimizer, accumulation, checkpoints); a method owns its loss and its
consolidation between tasks:

    method.begin_task(task)            before task n's first step
    loss, logs = method.loss(x0)       every micro-step, on a batch of the task's latents (a joint method:
                                       loss(x0, prompts), each latent's task prompt)
    metrics = method.end_task(task, log)   after the last step (the token is already frozen): Fisher, DSC;
                                       `log(parts)` records each consolidation step's loss parts
    method.state_dict() / load_state_dict(state)   what a resume at a task boundary needs
    method.export_lora()               the LoRA to write as task n's pytorch_lora_weights.safetensors

A method owns its settings: `Settings`, a dataclass in the method's own file (the reason beside each default),
which the run config holds as `config.method_settings` and the method reads as `self.settings`. Adding a method
is its file and one line of the registry (`dcfast.training.methods.REGISTRY`): flags, YAML, validation, `--help`
and the resume comparison follow from `Settings`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Dict, List, Optional, Tuple, Type

import torch

from dcfast.training.adapters import lora_parameters, lora_state
from dcfast.training.objectives import denoise_loss
from dcfast.training.settings import MethodSettings
from dcfast.models.prompts import Conditions, encode_conditions
from dcfast.training.tokens import ModifierToken


@dataclass
class Models:
    """The frozen base model with its LoRA adapter, as every method sees it."""

    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    noise_scheduler: object
    accelerator: object
    token: Optional[ModifierToken] = None  # the current task's trainable token (its first text encoder's)
    progress: bool = True  # progress bars (this process's, on the local main process only): dcfast.train(progress=)
    text_encoder_2: Optional[torch.nn.Module] = None  # SDXL's second text encoder and tokenizer, else None
    tokenizer_2: object = None

    @property
    def shows_progress(self) -> bool:
        """Whether this process draws progress bars: asked for, and the local main process."""
        return self.progress and self.accelerator.is_local_main_process

    def encode(self, prompts: List[str]) -> Conditions:
        """K prompts' conditions (hidden (K, L, D); SDXL: and pooled (K, P)); gradients reach the current token's
        embeddings where it occurs."""
        return encode_conditions(self.text_encoder, self.tokenizer, prompts, text_encoder_2=self.text_encoder_2,
                                 tokenizer_2=self.tokenizer_2)

    def encode_each(self, prompts: List[str]) -> Conditions:
        """One condition per prompt, (B, L, D), each distinct prompt encoded once."""
        unique = list(dict.fromkeys(prompts))
        return self.encode(unique)[torch.tensor([unique.index(p) for p in prompts])]

    def text_pairs(self) -> List[Tuple[object, torch.nn.Module]]:
        """(tokenizer, text encoder) of each text encoder the U-Net reads: one, or SDXL's two."""
        pairs = [(self.tokenizer, self.text_encoder)]
        return pairs if self.text_encoder_2 is None else pairs + [(self.tokenizer_2, self.text_encoder_2)]

    def lora(self) -> Dict[str, torch.nn.Parameter]:
        return lora_parameters(self.unet)

    @property
    def process_index(self) -> int:
        return self.accelerator.process_index

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    def average_gradients(self, params: List[torch.nn.Parameter]) -> None:
        """All-reduce (mean) the gradients of `params` over processes, in one flat buffer.

        The U-Net is not wrapped in DDP: the DC engine and the Fisher hooks need the bare module.
        """
        if self.num_processes == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = self.accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
        for p, piece in zip(params, flat.split([g.numel() for g in grads])):
            p.grad = piece.view_as(p).clone()


@dataclass
class TaskData:
    """Task n as the methods see it: images in model space, prompts, and this task's generators."""

    index: int  # n, 1-based
    latents: torch.Tensor  # (N, C, h, w): every image of the task (VAE latents, or pixels without a VAE)
    prompt: str  # c_n, e.g. "a photo of <v2> mug"
    pretrained_concept_prompt: str  # c_0, e.g. "a photo of a mug"
    past_prompts: List[str] = field(default_factory=list)  # c_1 .. c_{n-1}
    generator: torch.Generator = None  # this process's stream: batches, noise, timesteps
    shared_generator: torch.Generator = None  # identical on every process: subsets S, DSC teacher draws
    seed: int = 0  # base seed of per-image Fisher noise (same on every process)
    # A joint phase (several tasks at once): each latent's own task prompt; the trainer hands the method each
    # batch's prompts, `loss(x0, prompts)`. None for one task, whose images all have `prompt`.
    image_prompts: Optional[List[str]] = None
    # The optimizer step being taken (0-based within the task), set by the trainer before each step's losses: a
    # resumed run sets the same, so a method's per-step schedule (EWC-DC's dc_every) survives a resume.
    step: int = 0
    # SDXL: each latent's size-and-crop time ids (N, 6), and those of the batch `loss(x0)` gets (set by the trainer
    # with each batch: a random crop moves them); None for SD 1.x/2.x.
    time_ids: Optional[torch.Tensor] = None
    batch_time_ids: Optional[torch.Tensor] = None

    def time_ids_of(self, ids) -> Optional[torch.Tensor]:
        """The time ids of latents[ids] (None for SD 1.x/2.x)."""
        return None if self.time_ids is None else self.time_ids[ids]


LogParts = Callable[[Dict[str, float]], None]


class Method:
    """Sequential LoRA's behaviour; subclasses add penalties and consolidation."""

    name: ClassVar[str] = ""
    # The settings field that says where each task's token starts ("random" or "class_word"); None: the class word
    token_init_setting: ClassVar[Optional[str]] = None
    trains_lora: ClassVar[bool] = True  # False: the optimizer gets the token only (textual inversion)
    joint: ClassVar[bool] = False  # True: every task trained at once, in one phase (the offline upper bound)
    Settings: ClassVar[Type[MethodSettings]] = MethodSettings  # the settings this method reads (none here)

    def __init__(self, config, models: Models):
        self.config, self.models = config, models
        self.settings = config.method_settings
        if type(self.settings) is not self.Settings:
            raise TypeError(f"method {self.name!r} reads {self.Settings.__name__}, got "
                            f"{type(self.settings).__name__}; build the config with method={self.name!r}")
        self.task: Optional[TaskData] = None

    @property
    def random_token_init(self) -> bool:
        """Whether each task's token starts random rather than at its class word (the trainer reads it)."""
        return self.token_init_setting is not None and getattr(self.settings, self.token_init_setting) == "random"

    def begin_task(self, task: TaskData) -> None:
        self.task = task

    def denoise(self, x0: torch.Tensor) -> torch.Tensor:
        """L_denoise on this batch under c_n."""
        cond = self.models.encode([self.task.prompt])[0]
        return denoise_loss(self.models.unet, self.models.noise_scheduler, x0, cond, self.task.generator,
                            self.config.noise_offset, self.task.batch_time_ids)

    def loss(self, x0: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, float]]:
        loss = self.denoise(x0)
        return loss, {"denoise": loss.item()}

    def end_task(self, task: TaskData, log: Optional[LogParts] = None) -> Dict[str, float]:
        """Consolidate after the task; `log(parts)` (if given) receives each consolidation step's loss parts."""
        return {}

    def consolidation_steps(self) -> int:
        """Steps `end_task` logs per task (0 without a consolidation loop): the run-wide step axis leaves room."""
        return 0

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"method {self.name!r} keeps no state, got keys {sorted(state)[:3]}")

    def fisher_state(self) -> Dict[str, torch.Tensor]:
        """What task_{n}/fisher.safetensors holds (empty for methods without a Fisher)."""
        return {}

    def export_lora(self) -> Tuple[Dict[str, torch.Tensor], int, int]:
        """(LoRA tensors by U-Net parameter name, rank, alpha) of the model after this task."""
        return lora_state(self.models.unet), self.config.rank, self.config.resolved_lora_alpha()
