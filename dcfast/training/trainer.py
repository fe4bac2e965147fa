"""`dcfast.train(config)`: continual personalization, one task after another, through accelerate.

Reads like a diffusers training example: load -> freeze -> add adapter -> (per task) token, data,
optimizer -> accelerator.prepare -> the loop -> consolidation -> outputs. The method (dcfast.training.methods)
supplies the loss and the between-task consolidation; everything else lives here.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from dcfast.training import checkpoint as ckpt
from dcfast.training import monitor
from dcfast.training.adapters import add_adapter, load_lora_state, lora_parameters, lora_state, save_adapter
from dcfast.training.config import RENAMED, TrainConfig
from dcfast.training.settings import resumable
from dcfast.io.images import augment, center_offsets, crop_geometry, load_images, load_resized
from dcfast.training.methods import Method, Models, TaskData, get_method
from dcfast.training.prior import PriorImages, prior_images
from dcfast.models.loading import Components, load_components
from dcfast.io.runs import (CONFIG_FILE, EMBEDS_FILES, FISHER_FILE, METRICS_FILE, RUN_FILE, STATE_FILE,
                            TASK_EVAL_FILE, Run, Task, load_tensors, save_tensors, task_dir, write_json)
from dcfast.models.prompts import sdxl_time_ids
from dcfast.training.tokens import ModifierToken, add_task_tokens, add_token, set_embedding

logger = monitor.process_logger(__name__)
StepCallback = Callable[[int, int, Models], None]
# diffusers' weight_dtype: under mixed precision the frozen weights are cast to it (the LoRA and the token stay fp32).
WEIGHT_DTYPES = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class TrainResult:
    """What a run produced: its folder, one output folder and metrics dict per task, the live method."""

    output_dir: Path
    task_dirs: List[Path] = field(default_factory=list)
    metrics: List[Dict[str, float]] = field(default_factory=list)
    method: Optional[Method] = None
    loss_curve: Optional[Path] = None  # output_dir/loss_curve.png


def _generator(seed: int, task: int, stream: int) -> torch.Generator:
    """A CPU generator per (seed, task, stream): stream 0 is shared by all processes, 1 + rank is local."""
    return torch.Generator().manual_seed(seed * 1_000_003 + task * 10_007 + stream)


def _cpu_only() -> bool:
    """No GPU-like device: tell accelerate, so that several processes (torchrun) use gloo on the CPU."""
    api = getattr(torch, "accelerator", None)
    return api.current_accelerator() is None if api is not None else not torch.cuda.is_available()


def new_accelerator(mixed_precision: str, **kwargs) -> Accelerator:
    """An Accelerator at this mixed precision, even after another precision ran in this process (a notebook, a test
    suite, a benchmark): accelerate keeps one mixed-precision state per process and refuses a second setting, so that
    state starts afresh. The distributed state (the process group) is kept."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=mixed_precision, **kwargs)


def _task_plan(config: TrainConfig) -> List[Task]:
    """Every task numbered, with its token and prompts (what run.json records and `Run.tasks` returns)."""
    plan = []
    for i, task in enumerate(config.tasks, start=1):
        token = config.token_template.format(index=i)
        plan.append(Task(index=i, token=token, class_word=task.class_word, prompt=task.task_prompt(token),
                         pretrained_concept_prompt=config.pretrained_concept_prompt.format(class_word=task.class_word),
                         images=Path(task.images), eval_images=Path(task.eval_images) if task.eval_images else None))
    return plan


def _check_resumable(config: TrainConfig, fingerprint: Optional[str]) -> None:
    """Refuse to continue a run with another config or with a base model replaced since (run.json records both)."""
    run = Run(config.output_dir)
    run_file = run.path / RUN_FILE
    if not run_file.is_file():
        return
    trained_on = run.fingerprint()  # absent in runs written before it was recorded
    if trained_on is not None and fingerprint is not None and trained_on != fingerprint:
        raise ValueError(f"resume_from_checkpoint: the base model {config.pretrained_model_name_or_path!r} has other "
                         f"weights than the run in {str(config.output_dir)!r} was trained on (fingerprint "
                         f"{fingerprint}, the run recorded {trained_on}); resume with the original base model or "
                         f"choose a new output_dir")
    recorded = run.config()
    for old, new in RENAMED.items():  # a run written before the rename
        if old in recorded:
            recorded.setdefault(new, recorded.pop(old))
    # fields added since the run was written had their defaults; runs before per-method settings recorded all
    previous = TrainConfig.from_dict(recorded, ignore_other_methods=True)
    # another method's settings are not comparable with this one's: then the method itself is the change
    compared = config.flat() if previous.method == config.method else {
        name: getattr(config, name) for name in config.__dataclass_fields__ if name != "method_settings"}
    before = previous.flat()
    changed = sorted(name for name, value in compared.items()
                     if not (name in config.__dataclass_fields__ and resumable(TrainConfig, name))
                     and before.get(name) != value)
    if changed:
        raise ValueError(f"resume_from_checkpoint: {str(run_file)!r} was trained with different "
                         f"{', '.join(changed)}; resume with the same config or choose a new output_dir")


def _encode_images(components: Components, images: torch.Tensor) -> torch.Tensor:
    """Model-space x0: VAE latents (distribution mode x scaling factor), or the pixels without a VAE."""
    if components.vae is None:
        return images
    with torch.no_grad():
        latents = components.vae.encode(images.to(components.vae.dtype)).latent_dist.mode().float()
    return latents * components.vae.config.scaling_factor


def _log_with(config: TrainConfig):
    """accelerate's log_with: the config's tracker name, or None (tests substitute a custom GeneralTracker)."""
    return config.report_to


def _optimizer_class(config: TrainConfig):
    """torch's AdamW, or bitsandbytes' 8-bit AdamW (use_8bit_adam; validate() checked that it is installed)."""
    if not config.use_8bit_adam:
        return torch.optim.AdamW
    import bitsandbytes

    return bitsandbytes.optim.AdamW8bit


def cast_frozen_weights(components: Components, dtype: torch.dtype) -> None:
    """The frozen weights in `dtype`, as diffusers' LoRA scripts do under mixed precision: the U-Net's base weights,
    the VAE, the text encoder. The adapter's trained parameters keep their fp32 (never rounded through `dtype`); the
    modifier token trains as a separate fp32 parameter (dcfast.training.tokens)."""
    trained = lora_parameters(components.unet)
    for name, param in components.unet.named_parameters():
        if name not in trained:
            param.data = param.data.to(dtype)
    for module in (components.text_encoder, components.text_encoder_2, components.vae):
        if module is not None:
            module.to(dtype=dtype)


@contextlib.contextmanager
def _tf32(enabled: bool):
    """allow_tf32: TF32 matmuls and cuDNN convolutions for the run; the process's settings come back after."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if enabled:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _restore_finished(models: Models, method: Method, output_dir: str, plan: List[Task], done: int) -> None:
    """Bring the model to the end of task `done`: every learned token, the LoRA, the method state."""
    if not done:
        return
    for encoder, (tokenizer, text_encoder) in enumerate(models.text_pairs()):
        embeddings = Run(output_dir).embeddings(done, encoder)  # each one checked, or an error naming the file
        for task in plan[:done]:
            set_embedding(text_encoder, add_token(tokenizer, text_encoder, task.token), embeddings[task.token])
    state = load_tensors(task_dir(output_dir, done) / STATE_FILE)
    load_lora_state(models.unet, {k[5:]: v for k, v in state.items() if k.startswith("lora.")})
    method.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("method.")})


def _write_task_outputs(config: TrainConfig, method: Method, models: Models, task: Task,
                        embeddings: List[torch.Tensor], metrics: Dict[str, float]) -> Path:
    """task_{i}/: LoRA (diffusers; VeRA: peft's layout), the token's embedding in each text encoder, Fisher, resume
    state, config; metrics.json last."""
    folder = task_dir(config.output_dir, task.index)
    lora, rank, alpha = method.export_lora()
    save_adapter(folder, models.unet, lora, rank, alpha, config.target_modules)
    for name, embedding in zip(EMBEDS_FILES, embeddings):
        save_tensors(folder / name, {task.token: embedding.float()})
    save_tensors(folder / FISHER_FILE, method.fisher_state())
    state = {f"lora.{k}": v for k, v in lora_state(models.unet).items()}
    state.update({f"method.{k}": v for k, v in method.state_dict().items()})
    save_tensors(folder / STATE_FILE, state)
    write_json(folder / CONFIG_FILE, config.to_dict())
    write_json(folder / METRICS_FILE, metrics)
    return folder


def train(config: TrainConfig, step_callback: Optional[StepCallback] = None, progress: bool = True) -> TrainResult:
    """Train every task of `config` in order; returns the run's outputs. See TrainConfig for fields.

    `step_callback(task_index, step, models)` runs after each optimizer step (progress hooks, tests).
    `progress`: progress bars of the steps, the Fisher and DSC (False: none, as in benchmark workers).
    """
    config.validate()
    with _tf32(config.allow_tf32):
        return _train(config, step_callback, progress)


def _train(config: TrainConfig, step_callback: Optional[StepCallback], progress: bool = True) -> TrainResult:
    log_with = _log_with(config)
    accelerator = new_accelerator(config.mixed_precision, log_with=log_with,
                                  project_dir=str(Path(config.output_dir) / "logs"), cpu=_cpu_only())
    torch.manual_seed(config.seed)

    # 1. Load the base model (a local diffusers directory or a cached Hub id), and freeze all of it.
    components = load_components(config.pretrained_model_name_or_path, config.revision, config.variant)
    if components.vae is None and components.unet.config.in_channels != 3:
        raise ValueError(f"pretrained_model_name_or_path: {config.pretrained_model_name_or_path!r} has no vae/, so it "
                         f"must work on RGB pixels, but its U-Net takes {components.unet.config.in_channels} channels; "
                         f"add the model's vae/ folder")
    for module in (components.unet, components.text_encoder, components.text_encoder_2, components.vae):
        if module is not None:
            module.requires_grad_(False)

    # 2. Add the adapter (LoRA or VeRA): the only trainable U-Net weights (plus each task's modifier token).
    add_adapter(components.unet, config.adapter, config.rank, config.resolved_lora_alpha(), config.target_modules,
                config.seed)
    device = accelerator.device
    for module in (components.unet, components.text_encoder, components.text_encoder_2, components.vae):
        if module is not None:
            module.to(device)
    if WEIGHT_DTYPES[config.mixed_precision] is not None:
        if accelerator.native_amp:
            cast_frozen_weights(components, WEIGHT_DTYPES[config.mixed_precision])
        else:  # accelerate runs fp16 on the CPU without autocast: fp16 weights would meet fp32 inputs
            logger.warning(f"mixed_precision={config.mixed_precision}: accelerate turned autocast off on "
                           f"{accelerator.device}, so the frozen weights stay fp32 (use bf16 on the CPU)")
    if config.gradient_checkpointing:
        components.unet.enable_gradient_checkpointing()
    models = Models(components.unet, components.text_encoder, components.tokenizer, components.noise_scheduler,
                    accelerator, progress=progress, text_encoder_2=components.text_encoder_2,
                    tokenizer_2=components.tokenizer_2)
    method = get_method(config.method)(config, models)
    plan = _task_plan(config)
    resolution = config.resolution or components.resolution

    # 3. Resume: finished tasks are restored, not redone; a mid-task checkpoint continues its task.
    done, checkpoint = 0, None
    if config.resume_from_checkpoint:
        _check_resumable(config, components.fingerprint)
        done = len(Run(config.output_dir).finished_tasks())
        if method.joint and done < len(plan):
            done = 0  # a joint run writes all its tasks at the end: some but not all means it must start over
        _restore_finished(models, method, config.output_dir, plan, done)
        path = (ckpt.latest_checkpoint(config.output_dir) if config.resume_from_checkpoint == "latest"
                else Path(config.resume_from_checkpoint))
        checkpoint = ckpt.load_checkpoint(path) if path is not None else None
        phases = _phases(method, plan, done)
        if checkpoint is not None and (not phases or checkpoint.task != phases[0][-1].index):
            checkpoint = None  # a stale checkpoint of a task whose outputs are already written
    if accelerator.is_main_process:
        write_json(Path(config.output_dir) / RUN_FILE, {"config": config.to_dict(), "tasks": [t.to_json() for t in plan],
                                                        "base_model_fingerprint": components.fingerprint})
    if log_with:
        accelerator.init_trackers("dcfast", config={k: v for k, v in config.to_dict().items()
                                                    if isinstance(v, (int, float, str, bool))})

    # 4. Run summary.
    lora_count = sum(p.numel() for p in models.lora().values())
    logger.info(f"***** dcfast.train: method={config.method} *****")
    logger.info(f"  tasks = {len(plan)} (resuming after {done}, checkpoint: {checkpoint.path if checkpoint else None})")
    logger.info(f"  steps per task = {config.max_train_steps}, batch per process = {config.train_batch_size}, "
                f"gradient accumulation = {config.gradient_accumulation_steps}, processes = {accelerator.num_processes}")
    logger.info(f"  {config.adapter} rank {config.rank} on {config.target_modules}: {lora_count} parameters; "
                f"mixed precision = {config.mixed_precision}; resolution = {resolution}")
    logger.info(f"  base model = {config.pretrained_model_name_or_path} (revision {config.revision}, variant "
                f"{config.variant}); gradient checkpointing = {config.gradient_checkpointing}; trackers = "
                f"{[t.name for t in accelerator.trackers]}; validation prompts = {len(config.validation_prompts)}")

    prior = prior_images(config, components, models, plan, done, resolution,
                         lambda images: _encode_images(components, images.to(device)))

    result = TrainResult(Path(config.output_dir), method=method)
    for task in plan[:done]:
        result.task_dirs.append(task_dir(config.output_dir, task.index))
        result.metrics.append(Run(config.output_dir).metrics(task.index))
    for phase in _phases(method, plan, done):
        metrics = _train_task(config, components, models, method, plan, phase, resolution, checkpoint, step_callback,
                              prior)
        checkpoint = None
        for task in phase:
            result.task_dirs.append(task_dir(config.output_dir, task.index))
            result.metrics.append({**metrics, "task": task.index})
    if accelerator.is_main_process:
        result.loss_curve = monitor.write_loss_curve(config.output_dir, len(plan))
        logger.info(f"  loss curve: {result.loss_curve}")
    for tracker in accelerator.trackers:  # not end_training(): it would destroy the process group,
        tracker.finish()                  # and train() may run again in this process (notebooks, tests)
    return result


def _phases(method: Method, plan: List[Task], done: int) -> List[List[Task]]:
    """What each training phase learns: one task after another, or, for a joint method, every task at once
    (its tasks are written together at the end, so a run with some but not all of them written starts over)."""
    if method.joint:
        return [plan] if done < len(plan) else []
    return [[task] for task in plan[done:]]


def _train_task(config: TrainConfig, components: Components, models: Models, method: Method, plan: List[Task],
                phase: List[Task], resolution: int, checkpoint: Optional[ckpt.Checkpoint],
                step_callback: Optional[StepCallback], prior: Optional[PriorImages] = None) -> Dict[str, float]:
    """Train one phase: a task (sequential methods) or every task at once (joint), for max_train_steps per task;
    with `prior`, each micro-step also learns a batch of the class images of the tasks so far."""
    accelerator, first, n = models.accelerator, phase[0].index, phase[-1].index
    started = time.time()
    steps = config.max_train_steps * len(phase)
    axis = monitor.StepAxis(steps, method.consolidation_steps())

    # a. Each task's modifier token <v_i> in each text encoder: from the class word's embedding (C-LoRA: random).
    tokens = [add_task_tokens(models.text_pairs(), task.token, task.class_word,
                              _generator(config.seed, task.index, 999_983) if method.random_token_init else None)
              for task in phase]  # tokens[task][encoder]
    models.token = tokens[-1][0]
    # what the phase starts from, to record what it moved (a resume rebuilds this same start before its restore)
    start_lora = lora_state(models.unet)
    start_tokens = [[token.param.detach().clone() for token in task_tokens] for task_tokens in tokens]

    # b. The tasks' images, in model space once (the VAE is frozen), each image with its task's prompt.
    latents, uncropped, image_prompts, geometry = [], [], [], []
    for task in phase:
        field_name = f"tasks[{task.index - 1}].images"
        images = load_images(task.images, resolution, field=field_name).to(accelerator.device)
        latents.append(_encode_images(components, images))
        image_prompts += [task.prompt] * images.shape[0]
        if components.kind == "sdxl":
            geometry += crop_geometry(task.images, resolution, field_name)
        # Random crops / flips: the uncropped images stay, and each step's batch is cropped and encoded afresh.
        if not config.center_crop or config.random_flip:
            uncropped += load_resized(task.images, resolution, field_name)
    latents = torch.cat(latents)
    uncropped = uncropped or None
    time_ids = (_time_ids(geometry, [center_offsets(g[2], g[3], resolution) for g in geometry], resolution,
                          latents.device) if geometry else None)
    generators = {"local": _generator(config.seed, n, 1 + accelerator.process_index),
                  "shared": _generator(config.seed, n, 0)}
    last = phase[-1]
    data = TaskData(index=n, latents=latents, prompt=last.prompt, pretrained_concept_prompt=last.pretrained_concept_prompt,
                    past_prompts=[t.prompt for t in plan[:first - 1]], generator=generators["local"],
                    shared_generator=generators["shared"], seed=config.seed * 1009 + n,
                    image_prompts=image_prompts if len(phase) > 1 else None, time_ids=time_ids)
    with accelerator.autocast():  # the auto tau runs the U-Net, whose frozen weights may be fp16/bf16
        method.begin_task(data)

    # c. Optimizer over the LoRA (unless the method leaves it alone) and the tokens (no weight decay on tokens).
    lora = [p for p in models.lora().values() if p.requires_grad] if method.trains_lora else []  # a method may freeze some
    token_params = [token.param for task_tokens in tokens for token in task_tokens]
    params = lora + token_params
    groups = [{"params": token_params, "lr": config.token_learning_rate, "weight_decay": 0.0}]
    if lora:
        groups.insert(0, {"params": lora, "lr": config.learning_rate})
    optimizer = _optimizer_class(config)(groups, betas=(config.adam_beta1, config.adam_beta2),
                                         weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                                 num_training_steps=max(steps, 1))
    optimizer = accelerator.prepare(optimizer)  # the U-Net stays bare: gradients are averaged explicitly

    # d. Continue a killed run from its mid-task checkpoint: weights, optimizer, schedule, RNG.
    first_step, history = 0, monitor.LossHistory()
    if checkpoint is not None:
        load_lora_state(models.unet, checkpoint.prefixed("lora."))
        with torch.no_grad():
            for task, task_tokens in zip(phase, tokens):
                for encoder, token in enumerate(task_tokens):
                    token.param.copy_(checkpoint.tensors[_token_key(task, encoder)])
        ckpt.restore_optimizer(optimizer, checkpoint)
        lr_scheduler.load_state_dict(checkpoint.meta["lr_scheduler"])
        generators["shared"].set_state(checkpoint.tensors["rng.shared"])
        local = f"rng.local.{accelerator.process_index}"
        if local not in checkpoint.tensors:
            raise ValueError(f"resume_from_checkpoint: {str(checkpoint.path)!r} was written by fewer processes than "
                             f"the {accelerator.num_processes} running now; resume with the same number of processes")
        generators["local"].set_state(checkpoint.tensors[local])
        first_step = checkpoint.step
        history = monitor.LossHistory(ckpt.losses_from(checkpoint), checkpoint.meta.get("loss_parts"))
    losses = history.train["loss"]

    # e. The loop: micro-batches -> loss (+ the class images' loss) -> backward; average gradients, clip, step; checkpoint.
    if prior is not None:
        prior_rows = prior.rows_for(plan, n)
        with accelerator.autocast():
            prior_conditions = prior.encode(models)
    label = f"task {n}/{len(plan)}" if len(phase) == 1 else f"tasks {first}-{n} jointly"
    progress = tqdm(range(first_step, steps), initial=first_step, total=steps,
                    desc=f"{label} ({config.method})", disable=not models.shows_progress)
    for step in progress:
        data.step = step
        step_loss, step_parts = 0.0, {}
        for _ in range(config.gradient_accumulation_steps):
            batch = torch.randint(latents.shape[0], (config.train_batch_size,), generator=generators["local"])
            if uncropped is None:
                rows = batch.to(latents.device)
                x0, data.batch_time_ids = latents[rows], data.time_ids_of(rows)
            else:
                offsets = []
                pixels = augment([uncropped[i] for i in batch.tolist()], resolution, generators["local"],
                                 center_crop=config.center_crop, random_flip=config.random_flip, offsets=offsets)
                x0 = _encode_images(components, pixels.to(accelerator.device))
                if time_ids is not None:  # the crop moved: SDXL's crop ids follow it
                    data.batch_time_ids = _time_ids([geometry[i] for i in batch.tolist()], offsets, resolution,
                                                    latents.device)
            with accelerator.autocast():
                loss, logs = (method.loss(x0) if data.image_prompts is None
                              else method.loss(x0, [data.image_prompts[i] for i in batch.tolist()]))
                if prior is not None:
                    prior_loss = prior.loss(models, prior_conditions, prior_rows, config.train_batch_size,
                                            generators["local"], config.noise_offset, resolution)
                    loss = loss + config.prior_loss_weight * prior_loss
                    logs = {**logs, "prior": prior_loss.item()}
            value = accelerator.reduce(loss.detach().float(), reduction="mean").item()
            if not torch.isfinite(torch.tensor(value)):
                last_checkpoint = ckpt.latest_checkpoint(config.output_dir)
                raise FloatingPointError(
                    f"loss became {value} at task {n} step {step + 1} (method {config.method}, parts {logs}); "
                    f"stopped without saving. Last good checkpoint: {str(last_checkpoint) if last_checkpoint else 'none'} "
                    f"(resume with --resume_from_checkpoint latest after lowering learning_rate)")
            accelerator.backward(loss / config.gradient_accumulation_steps)
            step_loss += value / config.gradient_accumulation_steps
            for key, part in logs.items():
                step_parts[key] = step_parts.get(key, 0.0) + part / config.gradient_accumulation_steps
        models.average_gradients(params)
        accelerator.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        history.add_step(step_loss, step_parts)
        progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.2e}")
        accelerator.log({"loss": step_loss, "lr": lr_scheduler.get_last_lr()[0],
                         **{f"loss/{k}": v for k, v in step_parts.items()}, "task": n},
                        step=axis.train_step(first, step + 1))
        if (step + 1) % config.checkpointing_steps == 0 and step + 1 < steps:
            _save_checkpoint(config, models, optimizer, lr_scheduler, generators, phase, tokens, step + 1, history)
        if step_callback is not None:
            step_callback(n, step + 1, models)
    progress.close()

    # f. Freeze the tokens, consolidate (Fisher, DSC), write each task_{i}/ (metrics.json last).
    embeddings = [[token.freeze() for token in task_tokens] for task_tokens in tokens]
    models.token = None
    if config.gradient_checkpointing:  # the Fisher's hooks must see each forward once, not again in the backward
        models.unet.disable_gradient_checkpointing()

    def log_consolidation(parts: Dict[str, float]) -> None:  # each consolidation step's loss parts (DSC)
        iteration = history.add_distill(parts)
        accelerator.log({f"distill/{k}": v for k, v in parts.items()}, step=axis.consolidation_step(first, iteration))

    with accelerator.autocast():
        consolidation = method.end_task(data, log_consolidation)
    if config.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
    # A joint phase's time is shared equally among its tasks, so that the run's seconds still sum over tasks.
    metrics = {"steps": steps, "final_loss": losses[-1] if losses else float("nan"),
               "mean_loss": sum(losses) / len(losses) if losses else float("nan"),
               "seconds": (time.time() - started) / len(phase), **consolidation}
    metrics["lora_change"] = _distance(lora_state(models.unet), start_lora)
    if len(phase) > 1:
        metrics["trained_jointly_with"] = [t.index for t in phase]
    if accelerator.is_main_process:
        for task, task_embeddings, start in zip(phase, embeddings, start_tokens):
            change = _distance(dict(enumerate(task_embeddings)), {e: s[0] for e, s in enumerate(start)})
            _write_task_outputs(config, method, models, task, task_embeddings,
                                {"task": task.index, **metrics, "token_change": change})
        history.save(task_dir(config.output_dir, n) / monitor.LOSSES_FILE, axis.train_step(first, 0))
        ckpt.remove_checkpoints(config.output_dir)
        _validate_task(config, components, models, plan, n, axis)
        if config.eval_every_task:
            for task in phase:
                _evaluate_task(config, task.index, accelerator.device)
    accelerator.wait_for_everyone()
    return {"task": n, **metrics}


def _time_ids(geometry: List[tuple], offsets: List[tuple], resolution: int, device: torch.device) -> torch.Tensor:
    """SDXL's time ids (N, 6) of images of `geometry` (`crop_geometry` rows) cropped at `offsets` to R x R."""
    return torch.stack([sdxl_time_ids(g[:2], offset, (resolution, resolution))
                        for g, offset in zip(geometry, offsets)]).to(device)


def _distance(after: Dict[str, torch.Tensor], before: Dict[str, torch.Tensor]) -> float:
    """The Frobenius norm of after - before over every named tensor: how far a phase moved the LoRA factors
    (||delta LoRA||) or a token's embedding (||delta token||)."""
    return math.sqrt(sum(float((after[k].double() - before[k].double().to(after[k].device)).pow(2).sum())
                         for k in before))


def _token_key(task: Task, encoder: int = 0) -> str:
    """A task's token (in text encoder `encoder`) in a mid-task checkpoint."""
    return f"token.{task.index}" + (f".{encoder + 1}" if encoder else "")


def _validate_task(config: TrainConfig, components: Components, models: Models, plan: List[Task], n: int,
                   axis: monitor.StepAxis) -> None:
    """validation_prompts: samples of the state just written into task_{n}/validation.png and the trackers."""
    prompts = monitor.validation_prompts(config, plan, n)
    if not prompts:
        return
    logger.info(f"  validation: {config.num_validation_images} image(s) of {len(prompts)} prompt(s) at task state {n}")
    rows = monitor.sample_validation(config, components, models, prompts)
    path = monitor.save_grid(rows, task_dir(config.output_dir, n) / monitor.VALIDATION_FILE)
    monitor.log_images(models.accelerator, rows, prompts, axis.train_step(n + 1, 0))
    logger.info(f"  validation grid: {path}")


def _evaluate_task(config: TrainConfig, n: int, device: torch.device) -> None:
    """Accuracy and MMD of every seen concept under the state just written, into task_{n}/eval.json."""
    from dcfast.eval.evaluation import EvalConfig, evaluate_task

    logger.info(f"  evaluating task state {n} ({config.eval_num_images} images per concept)")
    column = evaluate_task(config.output_dir, n, config=EvalConfig(num_images=config.eval_num_images, device=str(device)))
    write_json(task_dir(config.output_dir, n) / TASK_EVAL_FILE, column.to_dict())


def _save_checkpoint(config: TrainConfig, models: Models, optimizer, lr_scheduler, generators: Dict[str, torch.Generator],
                     phase: List[Task], tokens: List[List[ModifierToken]], step: int,
                     history: monitor.LossHistory) -> None:
    """Every process's RNG goes to the main process, which writes the checkpoint (named after the phase's last task)."""
    accelerator = models.accelerator
    local_states = accelerator.gather(generators["local"].get_state().unsqueeze(0))
    if accelerator.is_main_process:
        tensors = {f"lora.{k}": v for k, v in lora_state(models.unet).items()}
        tensors.update({_token_key(task, encoder): token.param.detach()
                        for task, task_tokens in zip(phase, tokens) for encoder, token in enumerate(task_tokens)})
        tensors.update({f"rng.local.{r}": s for r, s in enumerate(local_states)})
        tensors["rng.shared"] = generators["shared"].get_state()
        ckpt.save_checkpoint(config.output_dir, phase[-1].index, step, tensors, optimizer,
                             {"lr_scheduler": lr_scheduler.state_dict(), "losses": history.train["loss"],
                              "loss_parts": history.parts()})
    accelerator.wait_for_everyone()
