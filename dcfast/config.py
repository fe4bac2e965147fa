"""TrainConfig: every hyperparameter of `dcfast.train`, loaded from YAML with CLI-flag overrides.

Defaults carry their reason. Greek letters refer to DESIGN.md section 1. The comment beside (or above)
a field is its `dcfast train --help` text (`field_help`). Nothing here imports torch: `dcfast --help`
and config validation stay fast, and every problem is reported before a model loads.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import io
import re
import tokenize
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import yaml

from dcfast.data import DEFAULT_PROMPT_TEMPLATE, check_image_folder

METHODS = ("lora", "ewc", "ewc-dc", "dsc", "dsc+ewc-dc", "c-lora")  # = the registry of dcfast.methods
MIXED_PRECISION = ("no", "fp16", "bf16")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
# accelerate's trackers (accelerate.utils.LoggerType); "all": every one installed. validate() checks that the
# chosen one is installed (accelerate.tracking.get_available_trackers), before any model loads.
REPORT_TO = ("tensorboard", "wandb", "comet_ml", "all", "aim", "mlflow", "clearml", "dvclive", "swanlab", "trackio")
DC_LOSSES = ("l2", "l1", "huber")
DC_PUSH = ("spec", "complement", "none")  # EWC-DC's term for the concepts i != n of S (DESIGN 1)
FISHER_NORMALIZE = ("mean", "none")
DSC_TEACHER_POOL = ("before_distill", "after_distill")
# Fields with a fixed set of values: checked by validate() and offered as argparse choices.
CHOICES = {"method": METHODS, "lr_scheduler": LR_SCHEDULERS, "mixed_precision": MIXED_PRECISION,
           "report_to": REPORT_TO, "dc_loss": DC_LOSSES, "dc_push": DC_PUSH, "fisher_normalize": FISHER_NORMALIZE,
           "dsc_teacher_pool": DSC_TEACHER_POOL}
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
    output_dir: str = "runs/dcfast"  # where task_{i}/ outputs and checkpoints are written
    method: str = "ewc-dc"  # lora | ewc | ewc-dc | dsc | dsc+ewc-dc | c-lora
    tasks: List[TaskConfig] = field(default_factory=list)  # [{images: <folder>, class_word: <word>, prompt?, eval_images?}]

    # Prompts. c_i = tasks[i].prompt with {token}=<v_i>; c_0 = pretrained_concept_prompt.
    token_template: str = "<v{index}>"  # the modifier token of task i, {index} = i
    # c_0, the pretrained concept the DC scores compare against (not diffusers' prior-preservation class prompt:
    # no class images are generated). DESIGN's c_0 example, "a photo of a dog". Formerly class_prompt.
    pretrained_concept_prompt: str = "a photo of a {class_word}"

    # LoRA. Rank 4 on the attention projections is diffusers' LoRA default; alpha = rank (scale 1)
    # keeps B·A the actual weight change, which the C-LoRA penalty and exports assume.
    rank: int = 4  # LoRA rank (diffusers' default)
    lora_alpha: Optional[int] = None  # None: = rank
    target_modules: List[str] = field(default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"])  # U-Net attention projections

    # Optimisation (diffusers' train_dreambooth_lora names and defaults, lr lowered for continual use).
    learning_rate: float = 1e-4  # LoRA learning rate
    token_learning_rate: float = 5e-3  # the modifier token learns a 768-dim vector from few photos: faster
    lr_scheduler: str = "constant"  # diffusers' get_scheduler: constant keeps every task's steps alike
    lr_warmup_steps: int = 0  # warm-up steps of the LR schedule, per task
    adam_beta1: float = 0.9  # AdamW beta1 (diffusers' default)
    adam_beta2: float = 0.999  # AdamW beta2 (diffusers' default)
    adam_weight_decay: float = 1e-2  # AdamW weight decay on the LoRA (none on the token), diffusers' default
    adam_epsilon: float = 1e-8  # AdamW epsilon (diffusers' default)
    max_grad_norm: float = 1.0  # gradient clipping norm (diffusers' default)
    # Offset noise in the denoising loss (diffusers' --noise_offset): a per-(image, channel) constant of this std
    # added to eps. 0 = plain noise (diffusers' default); use the value the base model was pretrained with.
    noise_offset: float = 0.0
    max_train_steps: int = 200  # optimizer steps per task
    train_batch_size: int = 2  # images per process per micro-step
    gradient_accumulation_steps: int = 1  # micro-steps per optimizer step
    # no | fp16 | bf16: autocast, and the frozen U-Net, VAE and text encoder are cast to that dtype (diffusers' weight_dtype);
    #   the LoRA, the modifier token and the optimizer stay fp32
    mixed_precision: str = "no"
    # Recompute U-Net activations in the backward pass (diffusers' --gradient_checkpointing): less memory, slower steps.
    # The Fisher and DSC phases run without it (the Fisher's hooks need exactly one forward per backward).
    gradient_checkpointing: bool = False
    allow_tf32: bool = False  # TF32 matmuls and convolutions on Ampere and newer GPUs during the run (diffusers' --allow_tf32)
    use_8bit_adam: bool = False  # bitsandbytes' 8-bit AdamW for each task's optimizer (diffusers' --use_8bit_adam)
    seed: int = 0  # seed of every random stream of the run
    resolution: Optional[int] = None  # None: the model's (U-Net sample size x VAE downsampling); > 0, a multiple of 8
    # Training-step augmentation, diffusers' --center_crop / --random_flip (images are resized so the shorter side is
    # the resolution, smaller ones upscaled). The Fisher, DSC and the auto tau see the centered, unflipped images.
    center_crop: bool = True  # True: the centered square; False: a square at a random offset each step (VAE per step)
    random_flip: bool = False  # mirror each step's images left-right with probability 1/2 (VAE encode per step)

    # DC scores (EWC-DC, DSC). Random (t, eps) pairs during training, as DESIGN 1 specifies.
    num_dc_timesteps: int = 4  # T pairs per image per step: 4 keeps a step ~k*T U-Net rows per image
    num_dc_concepts: int = 4  # k = |S| (fewer while fewer concepts exist); 4 bounds cost as tasks grow. EWC-DC:
    #   c_n, c_0 and k-2 earlier concepts. DSC: c_n, c_0, T2's c_m and k-3 other earlier ones; k = 2 is c_n, c_m
    # tau: a number, or "auto": at each task's start, tau = auto_temperature_scale x the RMS over images, concepts
    # k != n and (t, eps) pairs of err_k - err_n, measured once (no grad) with the model as the task finds it,
    # on every image of the task, S as EWC-DC's Fisher uses it, num_dc_timesteps evenly strided pairs. The task's
    # loss, Fisher and DSC distillation all use that tau; metrics.json records it. Default "auto": tau = 1 gave
    # near-uniform softmaxes on the first demo (p(c_n) ~ 1/K); auto gives ~5e-4..1e-3 on the world, and delta and
    # dsc_alpha are set on that scale (benchmarks/methods_tuning.md).
    temperature: Union[float, str] = "auto"
    # tau = scale x spread: 1 maps a typical per-pair error gap to logit gap 1. EWC-DC on same-class-val: scale 0.3 /
    # 1 / 3 gave final fidelity 0.70 / 0.73 / 0.74; 3 did not hold on distinct-class-val (0.44 vs 0.46), so 1 stays.
    auto_temperature_scale: float = 1.0
    dc_loss: str = "l2"  # the DC error's per-pixel loss, as the denoising loss
    dc_max_batch: Optional[int] = None  # U-Net rows per chunk of the DC engine (None: autotuned; set it to pin results bitwise)
    # EWC-DC's denoising loss and DSC's noise distillation (the beta terms) read from the DC pass's own rows under
    # c_n (and c_m) instead of separate U-Net calls: the same (t, eps) pairs, no extra U-Net rows per step. EWC-DC's
    # denoising loss then averages num_dc_timesteps pairs per image instead of one, without offset noise.
    dc_denoise_rows: bool = False

    # EWC / EWC-DC. The Fisher is a sum over the task's images of per-sample squared gradients.
    # lambda: penalty weight, on the mean-normalised Fisher (fisher_normalize), one value for EWC and EWC-DC.
    # Chosen on same-class-val (benchmarks/methods_tuning.md): EWC's final fidelity 0.58 / 0.50 / 0.59 / 0.59 at
    # lambda 0.01 / 0.1 / 1 / 10, forgetting 0.06 / 0.01 / 0 / 0: 1 and 10 tie (within one sample of 32), the
    # milder 1 is kept, and EWC-DC's DC term was tuned at 1.
    ewc_lambda: float = 1.0
    # Online Fisher decay F <- gamma F + F_n (Schwarz et al.'s online EWC). EWC-DC on same-class-val: 0.5 / 0.9 / 1
    # gave final fidelity 0.73 / 0.73 / 0.73, forgetting 0.01 each: no effect over 4 tasks; 0.9 stays.
    gamma: float = 0.9
    # delta: EWC-DC's DC-term weight. The term's gradient is ~ delta / tau times the denoising loss's, and auto tau
    # is ~5e-4..1e-3 on the world, so delta ~ tau puts the two on one scale. Chosen on same-class-val
    # (scripts/tune_methods.py, benchmarks/methods_tuning.md; lambda 1): final fidelity 0.73 at 1e-3, 0.63 at 1e-4;
    # at the old 0.1 no concept after the first was learned (0.00-0.02).
    delta: float = 1e-3
    # EWC-DC's term for the earlier concepts and c_0 (i != n): "spec" = the paper's -H(p, c_i), unbounded below
    # (the loss falls as the U-Net predicts worse under c_i); "complement" = -log(1 - p(c_i)) (unlikelihood),
    # >= 0 and fading once p(c_i) is small; "none" = the pull H(p, c_n) alone. Chosen on same-class-val (delta
    # 1e-3, lambda 1): final fidelity complement 0.73, none 0.71, spec 0.00 (it erased every concept, the first too).
    dc_push: str = "complement"
    # eps: the pull is the cross-entropy against q_n = 1 - eps, q_i = eps/(|S|-1); 0 = spec. Same-class-val: 0.1 gave
    # final fidelity 0.62 against 0.73 at 0.
    dc_label_smoothing: float = 0.0
    # Weight of c_0's push term (earlier concepts' terms weigh 1); 1 = the spec's equal weights. Same-class-val:
    # 0.3 / 1 / 3 gave final fidelity 0.72 / 0.73 / 0.60 (forgetting 0 / 0.01 / 0.01): 1 stays.
    dc_c0_weight: float = 1.0
    fisher_num_timesteps: int = 4  # (t, eps) pairs per image for the Fisher, evenly strided t
    fisher_batch_size: int = 4  # images per Fisher backward pass (a sample's rows never split)
    # Each task's F_n is divided by its mean over all LoRA entries before the merge F <- gamma F + F_n / mean(F_n),
    # so lambda means the same for EWC and EWC-DC: raw sums differ by orders of magnitude between the denoising
    # and the DC loss (measured 120x at tau = 1, 1/100 at tau = 0.01), and change with tau, image count and T.
    # With "mean", every task adds mean 1, gamma keeps its meaning (an old task weighs gamma^age), and the merged
    # F has mean sum_age gamma^age <= 1/(1 - gamma). "none": the raw per-sample sums (DESIGN 1 as written).
    fisher_normalize: str = "mean"

    # DSC (function-space consolidation after each task from the second on).
    # alpha: weight of the two DC-score KL terms. Their logits are errors / tau (auto tau ~5e-4..1e-3), so, like
    # EWC-DC's delta, alpha ~ tau puts them on the noise terms' scale. Chosen on same-class-val
    # (benchmarks/methods_tuning.md): final fidelity 0.56 at 1e-3, 0.24 at 1.
    dsc_alpha: float = 1e-3
    # beta: weight of the two noise-prediction terms. Same-class-val: 0.1 / 1 / 10 gave final fidelity 0.30 /
    # 0.56 / 0.56 (forgetting 0.23 / -0.07 / -0.04): the noise terms carry DSC's retention; 1 stays.
    dsc_beta: float = 1.0
    dsc_iterations: int = 50  # M: distillation steps per task (a quarter of the default task steps)
    dsc_learning_rate: Optional[float] = None  # None: = learning_rate
    # Which LoRA_n joins the pool of T2 teachers: "before_distill" = the task's trained LoRA, the spec's LoRA_n
    # (the teacher that knows c_n best); "after_distill" = the consolidated student. Same-class-val: before 0.56,
    # after 0.50 final fidelity (forgetting -0.07 / 0.04): the spec's stays.
    dsc_teacher_pool: str = "before_distill"
    # DSC+EWC-DC: the EWC-DC penalty (lambda/2) sum F (theta - theta*)^2 (F and theta* of the tasks before n)
    # also applies during the distillation steps. True: "keeps the EWC-DC penalty" (DESIGN 1) read as "whenever
    # the LoRA is optimised"; distillation from one earlier teacher per step would otherwise be free to move
    # weights important to the earlier concepts that teacher does not cover. Same-class-val: with it 0.73 final
    # fidelity and no forgetting, without it 0.74 and 0.02 (within one sample; the lower forgetting is kept).
    dsc_ewc_penalty: bool = True

    # C-LoRA.
    # lambda of ||W_past (.) (B_n A_n)||^2. Its entries are products of two small weights (~3e-3 here; a task's
    # sum ~5e-4), so lambda lives far above EWC's. Chosen on same-class-val (benchmarks/methods_tuning.md):
    # final fidelity 0.54 / 0.62 / 0.56 at 1e2 / 1e4 / 1e6.
    clora_lambda: float = 1e4

    # Runs.
    checkpointing_steps: int = 50  # mid-task checkpoint (LoRA, token, optimizer, RNG) every N steps
    resume_from_checkpoint: Optional[str] = None  # "latest" (continue the run in output_dir) or a checkpoint directory
    # an accelerate tracker (tensorboard | wandb | comet_ml | all | ...), logs in output_dir/logs: per-step losses and
    # their parts, validation images
    report_to: Optional[str] = None
    # Prompts sampled after each task with the state just written: task_{i}/validation.png (a row per prompt) and the
    # trackers. {token} and {class_word} stand for the task's; a prompt naming a later task's token waits for it.
    validation_prompts: List[str] = field(default_factory=list)
    num_validation_images: int = 4  # images per validation prompt (diffusers' default)
    validation_inference_steps: int = 20  # DDIM steps of validation sampling (dcfast eval's default)
    # classifier-free guidance of validation sampling, and of `dcfast eval`'s samples unless --guidance_scale says else
    validation_guidance_scale: float = 7.5
    eval_every_task: bool = False  # evaluate every task state right after it is written (task_{i}/eval.json)
    eval_num_images: int = 4  # generated images per concept for that evaluation's MMD (>= 2)

    def __post_init__(self):
        self.tasks = _tasks(self.tasks)

    def resolved_lora_alpha(self) -> int:
        return self.rank if self.lora_alpha is None else self.lora_alpha

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "TrainConfig":
        """Build from a plain dict (a YAML file): renamed and unknown keys raise, naming them; values are
        coerced to their field's type ("1e-4" -> 1e-4: PyYAML reads exponents without a dot as strings)."""
        _check_names(values)
        hints = typing.get_type_hints(cls)
        return cls(**{name: coerce(name, hints[name], value) for name, value in values.items()})

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
        """A copy with every flag that is not None replacing the file's value (CLI overrides), coerced as from_dict."""
        given = {k: v for k, v in flags.items() if v is not None}
        _check_names(given)
        hints = typing.get_type_hints(type(self))
        return dataclasses.replace(self, **{name: coerce(name, hints[name], value) for name, value in given.items()})

    def validate(self) -> None:
        """Check everything before training; one ValueError listing each problem with its field and fix."""
        found = _problems(self)
        if found:
            raise ValueError("invalid training config:\n" + "\n".join(f"  - {p}" for p in found))


def _check_names(values: Dict[str, Any]) -> None:
    for old, new in RENAMED.items():
        if old in values:
            raise ValueError(f"{old}: this field was renamed to {new} (c_0, the pretrained concept; not diffusers' "
                             f"prior-preservation prompt); rename the key or flag to {new}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown}; known fields: {sorted(known)}")


_TRUE, _FALSE = ("true",), ("false",)


def coerce(name: str, hint: Any, value: Any) -> Any:
    """`value` as field `name` of type `hint` wants it; TypeError naming the field, the value and the fix.

    Numbers written as text ("1e-4", "200") become numbers; true/false text becomes a bool. YAML 1.1 reads a
    bare `no` as false: for a choice field that accepts "no" (mixed_precision) false means "no".
    """
    optional = type(None) in typing.get_args(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if optional and len(args) == 1 else hint
    if value is None:
        if optional:
            return None
        raise TypeError(f"{name}: must be set (it cannot be null); remove the key to keep the default")
    if typing.get_origin(base) is Union:  # temperature: a number or "auto"
        return _number_from(value, float) if _looks_numeric(value) else value
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise TypeError(f"{name}: must be true or false, got {value!r}")
    if base in (int, float):
        if _looks_numeric(value):
            number = _number_from(value, float)
            if base is float:
                return number
            if float(number).is_integer():
                return int(number)
        kind = "an integer" if base is int else "a number"
        raise TypeError(f"{name}: must be {kind}, got {value!r}" + (" (text)" if isinstance(value, str) else "")
                        + f"; e.g. {name}: {TrainConfig.__dataclass_fields__[name].default!r}")
    if base is str:
        if isinstance(value, bool) and not value and "no" in CHOICES.get(name, ()):
            return "no"
        if not isinstance(value, str):
            raise TypeError(f"{name}: must be text, got {value!r} ({type(value).__name__}); put it in quotes in YAML")
        return value
    if typing.get_origin(base) in (list, List) and typing.get_args(base) == (str,):
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise TypeError(f"{name}: must be a list of names, e.g. [to_q, to_k, to_v, to_out.0], got {value!r}")
        return list(value)
    return value  # tasks: checked by _tasks


def _looks_numeric(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    if isinstance(value, str):
        try:
            float(value)
            return value.strip().lower() not in ("nan", "inf", "-inf", "infinity", "-infinity")
        except ValueError:
            return False
    return False


def _number_from(value: Any, kind) -> Any:
    if isinstance(value, str):
        text = value.strip()
        return int(text) if re.fullmatch(r"[+-]?\d+", text) else float(text)
    return value


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


def _problems(config: TrainConfig) -> List[str]:
    """Every problem of `config` as 'field: what is wrong; the fix'."""
    from dcfast.methods import get_method  # local import: the registry imports the training stack
    from dcfast.hub import check_variant, resolve_model
    from dcfast.models import check_model_dir, check_prediction_type
    from dcfast.runs import finished_tasks

    found: List[str] = []

    def check(field_name: str, run) -> None:
        try:
            run()
        except ValueError as error:
            message = str(error)
            named = message.startswith(field_name) or message.split(":", 1)[0] in _FIELDS  # e.g. variant: ...
            found.append(message if named else f"{field_name}: {message}")

    if not config.pretrained_model_name_or_path:
        found.append("pretrained_model_name_or_path: not set; give a local diffusers model directory or a Hub id in "
                     "the local Hugging Face cache")
    else:
        def model_checks() -> None:
            path = resolve_model(config.pretrained_model_name_or_path, config.revision)
            check_model_dir(path)
            check_prediction_type(path)
            check_variant(path, config.variant, repo_id=None if Path(config.pretrained_model_name_or_path).is_dir()
                          else config.pretrained_model_name_or_path)
        check("pretrained_model_name_or_path", model_checks)
    check("method", lambda: get_method(config.method))
    if not config.output_dir:
        found.append("output_dir: not set; give a directory for the run's outputs")
    if not config.tasks:
        found.append("tasks: no tasks; add at least one {images: <folder>, class_word: <word>}")
    for i, task in enumerate(config.tasks):
        check(f"tasks[{i}].images", lambda: check_image_folder(task.images, f"tasks[{i}].images"))
        if task.eval_images:
            check(f"tasks[{i}].eval_images", lambda: _check_eval_images(task, f"tasks[{i}].eval_images"))
        if not task.class_word.strip():
            found.append(f"tasks[{i}].class_word: empty; give the concept's class word, e.g. dog")
        if "{token}" not in task.prompt:
            found.append(f"tasks[{i}].prompt: {task.prompt!r} has no {{token}} placeholder; e.g. {DEFAULT_PROMPT_TEMPLATE!r}")
    if "{index}" not in config.token_template:
        found.append(f"token_template: {config.token_template!r} has no {{index}} placeholder; e.g. '<v{{index}}>'")
    if "{class_word}" not in config.pretrained_concept_prompt:
        found.append(f"pretrained_concept_prompt: {config.pretrained_concept_prompt!r} has no {{class_word}} placeholder; "
                     f"e.g. 'a photo of a {{class_word}}'")
    for name, choices in CHOICES.items():
        value = getattr(config, name)
        if name == "method" or (name == "report_to" and value is None):
            continue  # method: the registry's own message below
        if value not in choices:
            found.append(f"{name}: {value!r} is not one of {', '.join(choices)}"
                         + ("; or leave it unset" if name == "report_to" else ""))
    if config.resolution is not None and (not isinstance(config.resolution, int) or isinstance(config.resolution, bool)
                                          or config.resolution <= 0 or config.resolution % 8):
        found.append(f"resolution: must be an integer > 0 and a multiple of 8 (the VAE downsamples by 8), got "
                     f"{config.resolution!r}; or leave it unset for the model's own")

    at_least = {"max_train_steps": 0, "train_batch_size": 1, "gradient_accumulation_steps": 1, "rank": 1,
                "lr_warmup_steps": 0, "num_dc_timesteps": 1, "num_dc_concepts": 2, "fisher_num_timesteps": 1,
                "fisher_batch_size": 1, "dsc_iterations": 0, "checkpointing_steps": 1}
    for name, low in at_least.items():
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            found.append(f"{name}: must be an integer >= {low}, got {value!r}")
    positive = ["learning_rate", "token_learning_rate", "auto_temperature_scale"] + (
        ["dsc_learning_rate"] if config.dsc_learning_rate is not None else [])
    for name in positive:
        if not _number(getattr(config, name)) or getattr(config, name) <= 0:
            found.append(f"{name}: must be a number > 0, got {getattr(config, name)!r}")
    if config.temperature != "auto" and (not _number(config.temperature) or config.temperature <= 0):
        found.append(f"temperature: must be a number > 0 or 'auto', got {config.temperature!r}")
    for name in ("ewc_lambda", "delta", "dsc_alpha", "dsc_beta", "clora_lambda", "max_grad_norm", "adam_weight_decay",
                 "dc_c0_weight", "noise_offset"):
        if not _number(getattr(config, name)) or getattr(config, name) < 0:
            found.append(f"{name}: must be a number >= 0, got {getattr(config, name)!r}")
    if config.dc_denoise_rows is True and _number(config.noise_offset) and config.noise_offset > 0:
        found.append("dc_denoise_rows: the DC pass's noise has no offset, so its c_n rows cannot give the offset-noise "
                     "denoising loss; set noise_offset to 0 or dc_denoise_rows to false")
    if not _number(config.gamma) or not 0 <= config.gamma <= 1:
        found.append(f"gamma: the Fisher decay must lie in [0, 1], got {config.gamma!r}")
    if not _number(config.dc_label_smoothing) or not 0 <= config.dc_label_smoothing < 1:
        found.append(f"dc_label_smoothing: must lie in [0, 1), got {config.dc_label_smoothing!r}")
    for name in [f.name for f in dataclasses.fields(config) if f.type == "bool"]:
        if not isinstance(getattr(config, name), bool):
            found.append(f"{name}: must be true or false, got {getattr(config, name)!r}")
    if config.eval_every_task and config.eval_num_images < 2:
        found.append(f"eval_num_images: must be >= 2 (unbiased MMD needs two samples), got {config.eval_num_images}")
    if config.report_to in REPORT_TO:
        found.extend(_tracker_problems(config.report_to))
    if config.use_8bit_adam is True and importlib.util.find_spec("bitsandbytes") is None:
        found.append("use_8bit_adam: needs bitsandbytes, which is not installed; pip install bitsandbytes, or set "
                     "use_8bit_adam: false")
    if not isinstance(config.validation_prompts, list) or not all(isinstance(p, str) and p.strip()
                                                                  for p in config.validation_prompts):
        found.append(f"validation_prompts: must be a list of non-empty prompts, got {config.validation_prompts!r}")
    for name, low in (("num_validation_images", 1), ("validation_inference_steps", 1)):
        value = getattr(config, name)
        if config.validation_prompts and (not isinstance(value, int) or isinstance(value, bool) or value < low):
            found.append(f"{name}: must be an integer >= {low} when validation_prompts are given, got {value!r}")
    if not _number(config.validation_guidance_scale) or config.validation_guidance_scale < 0:
        found.append(f"validation_guidance_scale: must be a number >= 0, got {config.validation_guidance_scale!r}")
    resume = config.resume_from_checkpoint
    if resume not in (None, "latest") and not Path(resume).is_dir():
        found.append(f"resume_from_checkpoint: {resume!r} is neither 'latest' nor an existing checkpoint directory")
    if resume is None and config.output_dir and finished_tasks(config.output_dir):
        found.append(f"output_dir: {config.output_dir!r} already holds finished tasks; pass "
                     f"--resume_from_checkpoint latest to continue that run, or choose a new output_dir")
    return found


def _tracker_problems(report_to: str) -> List[str]:
    """report_to names an accelerate tracker that is installed ("all": at least one is)."""
    from accelerate.tracking import get_available_trackers

    available = sorted(str(t.value if hasattr(t, "value") else t) for t in get_available_trackers())
    if report_to == "all":
        return [] if available else ["report_to: 'all' logs to every installed tracker, but none is installed; pip "
                                     "install tensorboard (or wandb, comet_ml), or leave report_to unset"]
    if report_to not in available:
        return [f"report_to: {report_to} is not installed (installed trackers: {', '.join(available) or 'none'}); "
                f"pip install {report_to}, or leave report_to unset"]
    return []


def _check_eval_images(task: TaskConfig, field_name: str) -> None:
    """Held-out images: at least 2 that decode (unbiased MMD needs pairs), and not the training folder itself."""
    files = check_image_folder(task.eval_images, field_name)
    if Path(task.eval_images).resolve() == Path(task.images).resolve():
        raise ValueError(f"{field_name}: {task.eval_images!r} is the training folder itself, so its images are not "
                         f"held out; point it at other photos of the concept, or remove eval_images (evaluation then "
                         f"uses the training images and the report says so)")
    if len(files) < 2:
        raise ValueError(f"{field_name}: folder {task.eval_images!r} holds {len(files)} image; evaluation needs at least "
                         f"2 held-out images (unbiased MMD compares pairs): add more, or remove eval_images")


def field_help() -> Dict[str, str]:
    """Each TrainConfig field's help text: the comment beside it (with its indented continuation lines), else
    the comment block right above it. Read from this file's source, so the help is the reason in the code."""
    source = inspect.getsource(TrainConfig)
    comments = {tok.start[0]: tok.string.lstrip("#").rstrip() for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                if tok.type == tokenize.COMMENT}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    helps: Dict[str, str] = {}
    block: List[str] = []
    last = None
    for number, line in enumerate(source.splitlines(), start=1):
        match = re.match(r"    (\w+)\s*:", line)
        stripped = line.strip()
        if match and match.group(1) in names:
            last = match.group(1)
            inline = comments.get(number) if not stripped.startswith("#") else None
            helps[last] = (inline or " ".join(block)).strip()
            block = []
        elif stripped.startswith("#"):
            text = comments[number]
            if text.startswith("   ") and last is not None and not block:  # continuation of the field above
                helps[last] += " " + text.strip()
            else:
                block.append(text.strip())
        else:
            block, last = [], (None if not stripped else last)
    return helps


_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
