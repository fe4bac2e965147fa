"""TrainConfig: the shared fields of a `dcfast.train` run, plus the settings of its method, loaded from YAML
with CLI-flag overrides.

Each method owns its settings: one dataclass in its own file (`dcfast.training.methods`), with the reason beside
each default. A run config holds the shared fields below and `method_settings`, the chosen method's dataclass.
YAML files and flags name both kinds flat (`delta: 1e-3` beside `rank: 4`); `from_dict` routes each name to its
owner, and a name only another method reads is an error that names that method. Defaults carry their reason;
the comment beside (or above) a field is its `dcfast train --help` text (`dcfast.training.settings.field_help`).
Nothing here imports torch at import time: `dcfast --help` stays fast; the method registry loads on first use.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import yaml

from dcfast.io.images import DEFAULT_PROMPT_TEMPLATE
from dcfast.io.runs import DEFAULT_GUIDANCE_SCALE
from dcfast.training.settings import MethodSettings, build, coerce, setting

MIXED_PRECISION = ("no", "fp16", "bf16")
ADAPTERS = ("lora", "vera")  # the U-Net adapters a run can train (dcfast.training.adapters)
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
# accelerate's trackers (accelerate.utils.LoggerType); "all": every one installed. The preflight checks that the
# chosen one is installed (accelerate.tracking.get_available_trackers), before any model loads.
REPORT_TO = ("tensorboard", "wandb", "comet_ml", "all", "aim", "mlflow", "clearml", "dvclive", "swanlab", "trackio")
# Renamed fields: old name -> new name. An old name raises, naming the new one (kept for one release).
RENAMED = {"class_prompt": "pretrained_concept_prompt"}


@dataclass
class TaskConfig:
    """One concept: `images` folder, `class_word`, optional prompt template and held-out `eval_images`."""

    images: str
    class_word: str
    prompt: str = DEFAULT_PROMPT_TEMPLATE
    eval_images: Optional[str] = None

    def task_prompt(self, token: str) -> str:
        """The task prompt c_i, e.g. "a photo of <v1> dog"."""
        return self.prompt.format(token=token, class_word=self.class_word)


@dataclass
class TrainConfig:
    """Hyperparameters of a continual-personalization run. Steps, batch size and rates are per task."""


    # A local diffusers dir (unet/, text_encoder/, tokenizer/, scheduler/, [vae/]) or a Hub id ("org/name") already in
    # the local Hugging Face cache (HF_HUB_CACHE / HF_HOME; local_files_only: nothing is downloaded, `hf download` does).
    pretrained_model_name_or_path: str = ""
    revision: Optional[str] = None  # Hub ids: the cached branch, tag or commit to load (None: main)
    variant: Optional[str] = None  # weight-file variant, e.g. fp16 (diffusion_pytorch_model.fp16.safetensors); None: default
    output_dir: str = setting("runs/dcfast", resumable=True)  # where task_{i}/ outputs and checkpoints are written
    method: str = "ewc-dc"  # a method of dcfast.training.methods (lora | ewc | ewc-dc | dsc | dsc+ewc-dc | c-lora | ti | joint)
    tasks: List[TaskConfig] = field(default_factory=list)  # [{images: <folder>, class_word: <word>, prompt?, eval_images?}]

    # Prompts. c_i = tasks[i].prompt with {token}=<v_i>; c_0 = pretrained_concept_prompt.
    token_template: str = "<v{index}>"  # the modifier token of task i, {index} = i
    # c_0, the pretrained concept the DC scores compare against, and the class prompt of prior preservation. The c_0
    # example of docs/design.md, "a photo of a dog". Formerly class_prompt.
    pretrained_concept_prompt: str = "a photo of a {class_word}"
    # Prior preservation (DreamBooth; diffusers' --with_prior_preservation, --prior_loss_weight, --num_class_images):
    # every method that trains the U-Net also learns the base model's own samples of each class prompt c_0, sampled
    # once before the first task (output_dir/prior_images.safetensors), so the class words keep drawing what they drew.
    with_prior_preservation: bool = False
    prior_loss_weight: float = setting(1.0, nonnegative=True)  # weight of the class images' denoising loss (diffusers' 1.0)
    num_class_images: int = setting(32, at_least=1)  # class images per class prompt (diffusers' default 100; fewer: CPU runs)

    # LoRA. Rank 4 on the attention projections is diffusers' LoRA default; alpha = rank (scale 1)
    # keeps B·A the actual weight change, which the C-LoRA penalty and exports assume.
    # With adapter vera, rank is VeRA's r, the inner size of its shared random matrices: each layer trains r + out
    # numbers whatever r, so VeRA papers use large r (Kopiczko et al. 256 to 1024; peft's default 256).
    rank: int = setting(4, at_least=1)  # LoRA rank (diffusers' default), or VeRA's r (VeRA papers: 256 to 1024)
    lora_alpha: Optional[int] = None  # None: = rank (VeRA has no alpha: leave it unset)
    target_modules: List[str] = field(default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"])  # U-Net attention projections
    # The U-Net adapter every method trains: "lora" (trained factors B, A per layer) or "vera" (Kopiczko et al.:
    # frozen random A, B shared by every target layer, trained vectors lambda_d (r) and lambda_b (out) per layer: many
    # times fewer trained parameters than LoRA at similar quality in their experiments; nn.Linear targets only). A VeRA
    # task state is written in peft's layout, which diffusers pipelines do not load: peft does (docs/training.md).
    adapter: str = setting("lora", choices=ADAPTERS)

    # Optimisation (diffusers' train_dreambooth_lora names and defaults, lr lowered for continual use).
    learning_rate: float = setting(1e-4, positive=True)  # LoRA learning rate
    token_learning_rate: float = setting(5e-3, positive=True)  # the modifier token learns a 768-dim vector from few photos: faster
    lr_scheduler: str = setting("constant", choices=LR_SCHEDULERS)  # diffusers' get_scheduler: constant keeps every task's steps alike
    lr_warmup_steps: int = setting(0, at_least=0)  # warm-up steps of the LR schedule, per task
    adam_beta1: float = 0.9  # AdamW beta1 (diffusers' default)
    adam_beta2: float = 0.999  # AdamW beta2 (diffusers' default)
    adam_weight_decay: float = setting(1e-2, nonnegative=True)  # AdamW weight decay on the LoRA (none on the token), diffusers' default
    adam_epsilon: float = 1e-8  # AdamW epsilon (diffusers' default)
    max_grad_norm: float = setting(1.0, nonnegative=True)  # gradient clipping norm (diffusers' default)
    # Offset noise in the denoising loss (diffusers' --noise_offset): a per-(image, channel) constant of this std
    # added to eps. 0 = plain noise (diffusers' default); use the value the base model was pretrained with.
    noise_offset: float = setting(0.0, nonnegative=True)
    max_train_steps: int = setting(200, at_least=0)  # optimizer steps per task
    train_batch_size: int = setting(2, at_least=1)  # images per process per micro-step
    gradient_accumulation_steps: int = setting(1, at_least=1)  # micro-steps per optimizer step
    # no | fp16 | bf16: autocast, and the frozen U-Net, VAE and text encoder are cast to that dtype (diffusers' weight_dtype);
    #   the LoRA, the modifier token and the optimizer stay fp32
    mixed_precision: str = setting("no", choices=MIXED_PRECISION)
    # Recompute U-Net activations in the backward pass (diffusers' --gradient_checkpointing): less memory, slower steps.
    # The Fisher and DSC phases run without it (the Fisher's hooks need exactly one forward per backward).
    gradient_checkpointing: bool = setting(False, resumable=True)
    allow_tf32: bool = setting(False, resumable=True)  # TF32 matmuls and convolutions on Ampere and newer GPUs during the run (diffusers' --allow_tf32)
    use_8bit_adam: bool = False  # bitsandbytes' 8-bit AdamW for each task's optimizer (diffusers' --use_8bit_adam)
    seed: int = 0  # seed of every random stream of the run
    resolution: Optional[int] = None  # None: the model's (U-Net sample size x VAE downsampling); > 0, a multiple of 8
    # Training-step augmentation, diffusers' --center_crop / --random_flip (images are resized so the shorter side is
    # the resolution, smaller ones upscaled). The Fisher, DSC and the auto tau see the centered, unflipped images.
    center_crop: bool = True  # True: the centered square; False: a square at a random offset each step (VAE per step)
    random_flip: bool = False  # mirror each step's images left-right with probability 1/2 (VAE encode per step)


    # The method's own settings (the dataclass `Settings` of its file in dcfast.training.methods, e.g. EWC-DC's delta):
    # in YAML and flags by their own names beside the shared fields; run.json nests them here. None: its defaults.
    method_settings: Optional[MethodSettings] = None

    # Runs.
    checkpointing_steps: int = setting(50, at_least=1, resumable=True)  # mid-task checkpoint (LoRA, token, optimizer, RNG) every N steps
    resume_from_checkpoint: Optional[str] = setting(None, resumable=True)  # "latest" (continue the run in output_dir) or a checkpoint directory
    # an accelerate tracker (tensorboard | wandb | comet_ml | all | ...), logs in output_dir/logs: per-step losses and
    # their parts, validation images
    report_to: Optional[str] = setting(None, choices=REPORT_TO, resumable=True)
    # Prompts sampled after each task with the state just written: task_{i}/validation.png (a row per prompt) and the
    # trackers. {token} and {class_word} stand for the task's; a prompt naming a later task's token waits for it.
    validation_prompts: List[str] = setting(default_factory=list, resumable=True)
    num_validation_images: int = setting(4, resumable=True)  # images per validation prompt (diffusers' default)
    validation_inference_steps: int = setting(20, resumable=True)  # DDIM steps of validation sampling (dcfast eval's default)
    # classifier-free guidance of validation sampling, and of `dcfast eval`'s samples unless --guidance_scale says else
    validation_guidance_scale: float = setting(DEFAULT_GUIDANCE_SCALE, resumable=True)
    eval_every_task: bool = setting(False, resumable=True)  # evaluate every task state right after it is written (task_{i}/eval.json)
    eval_num_images: int = setting(4, resumable=True)  # generated images per concept for that evaluation's MMD (>= 2)

    def __post_init__(self):
        self.tasks = _tasks(self.tasks)
        if not isinstance(self.method_settings, MethodSettings):  # None, or a mapping (YAML, run.json)
            self.method_settings = _settings_of(self.method, self.method_settings or {})

    def resolved_lora_alpha(self) -> int:
        return self.rank if self.lora_alpha is None else self.lora_alpha

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> Dict[str, Any]:
        """Every shared field and every setting of the method by its own name, as YAML and flags name them."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "method_settings"}
        if self.method_settings is not None:
            values.update(dataclasses.asdict(self.method_settings))
        return values

    @classmethod
    def from_dict(cls, values: Dict[str, Any], ignore_other_methods: bool = False) -> "TrainConfig":
        """Build from a plain dict (a YAML file, run.json's config): shared fields and the method's settings by
        their names, flat or nested under method_settings. Renamed, unknown and other methods' names raise, naming
        them; values are coerced to their field's type ("1e-4" -> 1e-4: PyYAML reads exponents without a dot
        as strings).

        `ignore_other_methods`: settings only other methods read are dropped instead: values meant for several
        methods (an experiment regime, a benchmark), and run.json of runs written before settings were per
        method, which recorded every method's settings flat."""
        values = dict(values)
        nested = values.pop("method_settings", None) or {}
        if not isinstance(nested, dict):
            raise ValueError(f"method_settings: must be a mapping of the method's settings, got {nested!r}")
        method = values.get("method", _SHARED["method"].default)
        if ignore_other_methods:
            own, owners = _own_names(method) or set(), _owners()
            values = {k: v for k, v in values.items() if k not in owners or k in own}
        shared, own_values = _route({**values, **nested}, method)
        return cls(**{name: coerce(name, _HINTS[name], value, cls) for name, value in shared.items()},
                   method_settings=own_values)  # built by __post_init__ (None for an unknown method)

    @classmethod
    def from_yaml(cls, path: Union[str, Path]) -> "TrainConfig":
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config: file {str(path)!r} does not exist")
        try:
            values = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise ValueError(f"config: {str(path)!r}{where}: YAML syntax error: {problem}. Hint: check for an unclosed "
                             f"{{ or [, a missing quote, or a tab in the indentation near that line; values with "
                             f"': ' or '{{' inside need quotes") from None
        values = {} if values is None else values
        if not isinstance(values, dict):
            raise ValueError(f"config: {str(path)!r} must hold a mapping of field: value, got {type(values).__name__}")
        return cls.from_dict(values)

    def override(self, **flags: Any) -> "TrainConfig":
        """A copy with every flag that is not None replacing the file's value (CLI overrides), coerced as from_dict.

        A new `method` keeps the settings the two methods share (e.g. the DC-score settings of EWC-DC and DSC)."""
        given = {k: v for k, v in flags.items() if v is not None}
        method = given.get("method", self.method)
        shared, own = _route(given, method)
        kept = {k: v for k, v in dataclasses.asdict(self.method_settings or MethodSettings()).items()
                if k in (_own_names(method) or ())}
        return dataclasses.replace(self, **{name: coerce(name, _HINTS[name], value, type(self))
                                            for name, value in shared.items()}, method_settings={**kept, **own})

    def validate(self) -> None:
        """Check everything before training; one ValueError listing each problem with its field and fix
        (`dcfast.training.preflight`: disks, model, method, values)."""
        from dcfast.training.preflight import problems

        found = problems(self)
        if found:
            raise ValueError("invalid training config:\n" + "\n".join(f"  - {p}" for p in found))


_SHARED = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)


def _registry():
    """The method registry, imported on first use: its method files import the training stack (torch)."""
    from dcfast.training import methods

    return methods


def _settings_of(method: str, values: Dict[str, Any]) -> Optional[MethodSettings]:
    """`method`'s settings from `values` (by name); None for an unknown method (validate() names it)."""
    if not isinstance(method, str):
        return None
    try:
        cls = _registry().get_method(method)
    except ValueError:
        return None
    return build(cls.Settings, values)


def _owners() -> Dict[str, List[str]]:
    """Each setting's name -> the methods that read it."""
    owners: Dict[str, List[str]] = {}
    for name, cls in _registry().REGISTRY:
        for f in dataclasses.fields(cls.Settings):
            owners.setdefault(f.name, []).append(name)
    return owners


def _own_names(method: str) -> Optional[set]:
    """The names of `method`'s settings; None for an unknown method (validate() names it, coercion a non-text one)."""
    if not isinstance(method, str):
        return None
    try:
        return {f.name for f in dataclasses.fields(_registry().get_method(method).Settings)}
    except ValueError:
        return None


def _route(values: Dict[str, Any], method: str):
    """Split flat names into (shared fields, `method`'s settings); renamed, foreign and unknown names raise."""
    for old, new in RENAMED.items():
        if old in values:
            raise ValueError(f"{old}: this field was renamed to {new} (c_0, the pretrained concept, which is also "
                             f"prior preservation's class prompt); rename the key or flag to {new}")
    shared = {k: v for k, v in values.items() if k in _SHARED and k != "method_settings"}
    rest = {k: v for k, v in values.items() if k not in shared}
    if not rest:
        return shared, {}
    owners, own = _owners(), _own_names(method)
    unknown = sorted(k for k in rest if k not in owners)
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown}; known fields: {sorted(set(_SHARED) | set(owners))}")
    foreign = sorted(k for k in rest if own is not None and k not in own)
    if foreign:
        raise ValueError(f"{', '.join(foreign)}: setting(s) of method(s) "
                         f"{', '.join(sorted({m for k in foreign for m in owners[k]}))}, not of method {method!r}, which "
                         f"would ignore them; remove them, or set method to one that reads them")
    return shared, {k: v for k, v in rest.items() if k in (own or ())}


def _tasks(value: Any) -> List[TaskConfig]:
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"tasks: must be a list of mappings like [{{images: photos/dog, class_word: dog}}], "
                        f"got {value!r} ({type(value).__name__})")
    return [_task(i, t) for i, t in enumerate(value)]


def _task(index: int, value: Any) -> TaskConfig:
    if isinstance(value, TaskConfig):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"tasks[{index}]: expected a mapping like {{images: photos/dog, class_word: dog}}, got {value!r}")
    known = {f.name for f in dataclasses.fields(TaskConfig)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"tasks[{index}]: unknown key(s) {unknown}; known keys: {sorted(known)}")
    missing = [k for k in ("images", "class_word") if not value.get(k)]
    if missing:
        raise ValueError(f"tasks[{index}]: missing {', '.join(missing)}; each task needs images: <folder> and class_word: <word>")
    return TaskConfig(**{k: (str(v) if v is not None else None) for k, v in value.items()})
