"""The run directory: its layout, atomic writers, and reading a finished run back.

    output_dir/
      run.json                          resolved config, the task list (tokens, prompts), base-model fingerprint
      task_{i}/                         i = 1..n, written when task i is consolidated
        pytorch_lora_weights.safetensors    diffusers format: pipe.load_lora_weights(task_dir)
        learned_embeds.safetensors          {"<v_i>": (D,)}: pipe.load_textual_inversion(task_dir, token=...)
        fisher.safetensors                  the method's Fisher state (empty for methods without one)
        trainer_state.safetensors           everything a resume needs at this task boundary
        config.json                         the resolved config
        metrics.json                        per-task metrics; written last, so it marks the task finished
      checkpoints/task_{i}-step_{s}/    mid-task checkpoints (see dcfast.checkpoint)

Every file is written through dcfast.atomic (a temporary file in the same folder, fsync, os.replace),
so a killed run never leaves a half-written file; `save_tensors` and `write_json` are those writers.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
from safetensors import safe_open

from dcfast.atomic import save_safetensors_atomic as save_tensors  # noqa: F401  (the run's writers)
from dcfast.atomic import write_json_atomic as write_json  # noqa: F401

PathLike = Union[str, Path]
RUN_FILE = "run.json"
LORA_FILE = "pytorch_lora_weights.safetensors"
EMBEDS_FILE = "learned_embeds.safetensors"
FISHER_FILE = "fisher.safetensors"
STATE_FILE = "trainer_state.safetensors"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"  # written last: its presence marks a finished task


def task_dir(output_dir: PathLike, index: int) -> Path:
    return Path(output_dir) / f"task_{index}"


def checkpoints_dir(output_dir: PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def read_json(path: PathLike) -> Any:
    """Parse a JSON file; FileNotFoundError / ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing run file {str(path)!r}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"corrupt run file {str(path)!r}: {error}") from error


def load_tensors(path: PathLike) -> Dict[str, torch.Tensor]:
    """Read a safetensors file; FileNotFoundError / ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing run file {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own error types for damaged headers/data
        raise ValueError(f"corrupt run file {str(path)!r}: {error}") from error


def finished_tasks(output_dir: PathLike) -> List[int]:
    """Indices i of task_{i} folders holding metrics.json (finished tasks), sorted."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    done = []
    for child in root.glob("task_*"):
        suffix = child.name[len("task_"):]
        if suffix.isdigit() and (child / METRICS_FILE).is_file():
            done.append(int(suffix))
    return sorted(done)


@dataclass
class TaskRecord:
    """One task of a run, as the evaluation needs it."""

    index: int  # 1-based
    token: str  # "<v1>"
    class_word: str
    prompt: str  # c_i, e.g. "a photo of <v1> dog"
    class_prompt: str  # c_0 for this class, e.g. "a photo of a dog"
    images: Path
    eval_images: Optional[Path]
    finished: bool


def read_run(run_dir: PathLike) -> List[TaskRecord]:
    """The run's task list (from run.json), each marked finished or not."""
    run = read_json(Path(run_dir) / RUN_FILE)
    done = set(finished_tasks(run_dir))
    try:
        return [TaskRecord(index=t["index"], token=t["token"], class_word=t["class_word"], prompt=t["prompt"],
                           class_prompt=t["class_prompt"], images=Path(t["images"]),
                           eval_images=Path(t["eval_images"]) if t.get("eval_images") else None,
                           finished=t["index"] in done) for t in run["tasks"]]
    except (KeyError, TypeError) as error:
        raise ValueError(f"corrupt run file {str(Path(run_dir) / RUN_FILE)!r}: missing {error}") from error


def base_model(run_dir: PathLike) -> Dict[str, Optional[str]]:
    """The run's base model as its config names it: name_or_path (a local dir or a Hub id), revision, variant."""
    config = read_json(Path(run_dir) / RUN_FILE)["config"]
    return {"name_or_path": config["pretrained_model_name_or_path"], "revision": config.get("revision"),
            "variant": config.get("variant")}


def sampling_guidance(run_dir: PathLike) -> float:
    """The classifier-free guidance the run samples with: its config's validation_guidance_scale (TrainConfig's
    default for a run written without it, or without a readable run.json: evaluation reports that itself)."""
    from dcfast.config import TrainConfig

    try:
        config = read_json(Path(run_dir) / RUN_FILE)["config"]
        return float(config.get("validation_guidance_scale", TrainConfig.validation_guidance_scale))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return TrainConfig.validation_guidance_scale


def check_state_embeddings(run_dir: PathLike, task_index: int) -> Dict[int, Dict[str, torch.Tensor]]:
    """The modifier-token embeddings task state `task_index` needs: those of tasks 1..task_index, by task index.

    Refuses a state with any of them missing or damaged, naming the files: without <v_i>'s embedding the
    tokenizer would split "<v_i>" into "<", "v", "i", ">" and the prompt would silently mean something else.
    """
    run_dir = Path(run_dir)
    tasks = read_run(run_dir)[:task_index]
    missing = [t for t in tasks if not (task_dir(run_dir, t.index) / EMBEDS_FILE).is_file()]
    if missing:
        names = ", ".join(f"{str(task_dir(run_dir, t.index) / EMBEDS_FILE)!r} ({t.token})" for t in missing)
        raise FileNotFoundError(f"task state {task_index} of run {str(run_dir)!r} needs the modifier-token embeddings "
                                f"of tasks 1..{task_index}, and {len(missing)} are missing: {names}; without them "
                                f"each such token would be split into pieces ('<', 'v', ...) and its prompt would "
                                f"silently lose the concept. Restore the files from the run, or load an earlier state")
    embeds = {t.index: load_tensors(task_dir(run_dir, t.index) / EMBEDS_FILE) for t in tasks}
    for task in tasks:
        found = embeds[task.index]
        if task.token not in found or len(found) != 1 or found[task.token].dim() != 1:
            raise ValueError(f"corrupt run file {str(task_dir(run_dir, task.index) / EMBEDS_FILE)!r}: expected one "
                             f"(D,) tensor named {task.token!r}, got "
                             f"{ {k: tuple(v.shape) for k, v in found.items()} }")
    return embeds


def check_tokens_whole(tokenizer, tokens: List[str], where: str) -> None:
    """ValueError when a modifier token does not tokenize to exactly one id (its embedding was not loaded)."""
    split = {t: tokenizer.tokenize(t) for t in tokens if len(tokenizer.tokenize(t)) != 1}
    if split:
        raise ValueError(f"{where}: modifier token(s) {sorted(split)} are not in the tokenizer and would be split "
                         f"({split}); load every learned embedding of tasks 1..N before prompting state N")


def load_pipeline(run_dir: PathLike, task_index: int, device: str = "cpu"):
    """The base model with task `task_index`'s LoRA and every modifier token learned up to that task.

    The base model is the run's pretrained_model_name_or_path (a local directory, or a Hub id read from the local
    cache at the run's revision), with the run's weight variant. Raises FileNotFoundError / ValueError naming the
    file when a task output is missing or corrupt, or when any embedding of tasks 1..task_index is missing.
    """
    from diffusers import StableDiffusionPipeline

    from dcfast.hub import resolve_model

    run_dir = Path(run_dir)
    tasks = read_run(run_dir)
    if not 1 <= task_index <= len(tasks):
        raise ValueError(f"task_index must be in [1, {len(tasks)}] for run {str(run_dir)!r}, got {task_index}")
    folder = task_dir(run_dir, task_index)
    if not (folder / METRICS_FILE).is_file():
        raise FileNotFoundError(f"task {task_index} of run {str(run_dir)!r} is not finished: missing {str(folder / METRICS_FILE)!r}")
    load_tensors(folder / LORA_FILE)  # a clear error for a missing or damaged file before diffusers sees it
    embeds = check_state_embeddings(run_dir, task_index)
    model = base_model(run_dir)
    base = resolve_model(model["name_or_path"], model["revision"])
    if not (base / "vae").is_dir():
        raise ValueError(f"load_pipeline: base model {model['name_or_path']!r} has no vae/; StableDiffusionPipeline "
                         f"needs one")
    weights = {"variant": model["variant"]} if model["variant"] else {}
    with _quiet_diffusers():  # eval loads every task state: one loading bar and LoRA notice each is noise
        pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False,
                                                       local_files_only=True, **weights)
        pipe.load_lora_weights(str(folder), weight_name=LORA_FILE)
        for task in tasks[:task_index]:
            pipe.load_textual_inversion(embeds[task.index], token=task.token)
    check_tokens_whole(pipe.tokenizer, [t.token for t in tasks[:task_index]], f"task state {task_index}")
    return pipe.to(device)


@contextlib.contextmanager
def _quiet_diffusers():
    """diffusers at error verbosity and without its progress bars inside; both restored afterwards.

    Silences the pipeline-loading bar and "No LoRA keys associated to CLIPTextModel" (dcfast's LoRA is on
    the U-Net only, by design), which repeat once per task state in `dcfast eval`.
    """
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    bars = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(verbosity)
        if bars:
            diffusers_logging.enable_progress_bar()
