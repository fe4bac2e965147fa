"""Every check of a run config made before any model loads: the disks (image folders, output_dir), the base
model (directory or cached Hub id, prediction type, weight variant), the method, and every value against its
field's checks (`dcfast.training.settings`), the shared fields' and the method's settings' alike.

`TrainConfig.validate()` runs it; the trainer calls that first, and `dcfast train` through it.
"""
from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import List

from dcfast.io.images import DEFAULT_PROMPT_TEMPLATE, check_image_folder
from dcfast.io.runs import Run
from dcfast.models.hub import check_variant, resolve_model
from dcfast.models.loading import check_model_dir, model_prediction_type
from dcfast.training.settings import field_problems, is_number

def problems(config) -> List[str]:
    """Every problem of `config` (a TrainConfig) as 'field: what is wrong; the fix'."""
    from dcfast.training.methods import get_method  # the registry imports the training stack: only when checking

    found: List[str] = []
    names = {f.name for f in dataclasses.fields(config)} | (
        {f.name for f in dataclasses.fields(config.method_settings)} if config.method_settings is not None else set())

    def check(field_name: str, run) -> None:
        try:
            run()
        except ValueError as error:
            message = str(error)
            named = message.startswith(field_name) or message.split(":", 1)[0] in names  # e.g. variant: ...
            found.append(message if named else f"{field_name}: {message}")

    if not config.pretrained_model_name_or_path:
        found.append("pretrained_model_name_or_path: not set; give a local diffusers model directory or a Hub id in "
                     "the local Hugging Face cache")
    else:
        def model_checks() -> None:
            path = resolve_model(config.pretrained_model_name_or_path, config.revision)
            check_model_dir(path)
            model_prediction_type(path)
            check_variant(path, config.variant, repo_id=None if Path(config.pretrained_model_name_or_path).is_dir()
                          else config.pretrained_model_name_or_path)
        check("pretrained_model_name_or_path", model_checks)
    check("method", lambda: get_method(config.method))
    if not config.output_dir:
        found.append("output_dir: not set; give a directory for the run's outputs")
    found.extend(_task_problems(config, check))
    if "{index}" not in config.token_template:
        found.append(f"token_template: {config.token_template!r} has no {{index}} placeholder; e.g. '<v{{index}}>'")
    if "{class_word}" not in config.pretrained_concept_prompt:
        found.append(f"pretrained_concept_prompt: {config.pretrained_concept_prompt!r} has no {{class_word}} placeholder; "
                     f"e.g. 'a photo of a {{class_word}}'")
    if config.with_prior_preservation:
        def prior_checks() -> None:
            try:
                method = get_method(config.method)
            except ValueError:
                return  # the method's own check names it
            if not method.trains_lora:
                raise ValueError(f"method {config.method!r} trains no U-Net weight, so the class images would change "
                                 f"nothing; set with_prior_preservation false")
        check("with_prior_preservation", prior_checks)
    if config.resolution is not None and (not isinstance(config.resolution, int) or isinstance(config.resolution, bool)
                                          or config.resolution <= 0 or config.resolution % 8):
        found.append(f"resolution: must be an integer > 0 and a multiple of 8 (the VAE downsamples by 8), got "
                     f"{config.resolution!r}; or leave it unset for the model's own")
    found.extend(field_problems(config))
    if config.method_settings is not None:
        found.extend(field_problems(config.method_settings))
        found.extend(config.method_settings.problems(config))
    if config.adapter == "vera" and config.lora_alpha is not None:
        found.append(f"lora_alpha: adapter vera has no alpha (its update diag(lambda_b) B diag(lambda_d) A has scale 1), "
                     f"got {config.lora_alpha!r}; leave lora_alpha unset, or set adapter: lora")
    if config.eval_every_task and config.eval_num_images < 2:
        found.append(f"eval_num_images: must be >= 2 (unbiased MMD needs two samples), got {config.eval_num_images}")
    if config.report_to in type(config).__dataclass_fields__["report_to"].metadata["choices"]:
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
    if not is_number(config.validation_guidance_scale) or config.validation_guidance_scale < 0:
        found.append(f"validation_guidance_scale: must be a number >= 0, got {config.validation_guidance_scale!r}")
    resume = config.resume_from_checkpoint
    if resume not in (None, "latest") and not Path(resume).is_dir():
        found.append(f"resume_from_checkpoint: {resume!r} is neither 'latest' nor an existing checkpoint directory")
    if resume is None and config.output_dir and Run(config.output_dir).finished_tasks():
        found.append(f"output_dir: {config.output_dir!r} already holds finished tasks; pass "
                     f"--resume_from_checkpoint latest to continue that run, or choose a new output_dir")
    return found


def _task_problems(config, check) -> List[str]:
    found: List[str] = []
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


def _check_eval_images(task, field_name: str) -> None:
    """Held-out images: at least 2 that decode (unbiased MMD needs pairs), and not the training folder itself."""
    files = check_image_folder(task.eval_images, field_name)
    if Path(task.eval_images).resolve() == Path(task.images).resolve():
        raise ValueError(f"{field_name}: {task.eval_images!r} is the training folder itself, so its images are not "
                         f"held out; point it at other photos of the concept, or remove eval_images (evaluation then "
                         f"uses the training images and the report says so)")
    if len(files) < 2:
        raise ValueError(f"{field_name}: folder {task.eval_images!r} holds {len(files)} image; evaluation needs at least "
                         f"2 held-out images (unbiased MMD compares pairs): add more, or remove eval_images")
