"""The run directory: its layout, atomic writers, and its one reader, `Run`.

    output_dir/
      run.json                          resolved config, the task list (tokens, prompts), base-model fingerprint
      task_{i}/                         i = 1..n, written when task i is consolidated
        pytorch_lora_weights.safetensors    diffusers format: pipe.load_lora_weights(task_dir)
        adapter_model.safetensors           instead, a VeRA state (adapter: vera) in peft's layout, with
        adapter_config.json                 its config: PeftModel.from_pretrained(unet, task_dir)
        learned_embeds.safetensors          {"<v_i>": (D,)}: pipe.load_textual_inversion(task_dir, token=...)
        learned_embeds_2.safetensors        SDXL only: {"<v_i>": (D2,)}, the token in the second text encoder
        fisher.safetensors                  the method's Fisher state (empty for methods without one)
        trainer_state.safetensors           everything a resume needs at this task boundary
        config.json                         the resolved config
        eval.json                           (eval_every_task) state i's evaluation column
        metrics.json                        per-task metrics; written last, so it marks the task finished
      eval/                             `dcfast eval`: metrics.json (every state), report.md, plots
      checkpoints/task_{i}-step_{s}/    mid-task checkpoints (see dcfast.training.checkpoint)

Every file is written through dcfast.io.atomic (a temporary file in the same folder, fsync, os.replace),
so a killed run never leaves a half-written file; `save_tensors` and `write_json` are those writers.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Union

if TYPE_CHECKING:
    import torch
from safetensors import safe_open

from dcfast.io.atomic import save_safetensors_atomic as save_tensors  # noqa: F401  (the run's writers)
from dcfast.io.atomic import write_json_atomic as write_json  # noqa: F401

PathLike = Union[str, Path]
RUN_FILE = "run.json"
LORA_FILE = "pytorch_lora_weights.safetensors"
# A VeRA task state: peft's file names (PeftModel.from_pretrained reads them from a folder); diffusers has no VeRA loader
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"
EMBEDS_FILE = "learned_embeds.safetensors"
EMBEDS_FILE_2 = "learned_embeds_2.safetensors"  # SDXL's second text encoder
EMBEDS_FILES = (EMBEDS_FILE, EMBEDS_FILE_2)  # by text encoder
FISHER_FILE = "fisher.safetensors"
STATE_FILE = "trainer_state.safetensors"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"  # written last: its presence marks a finished task
EVAL_DIR = "eval"  # dcfast eval's outputs: eval/metrics.json (every state's matrices), report.md, images
TASK_EVAL_FILE = "eval.json"  # task_{i}/eval.json: state i's column, when the run evaluated every task state
# Classifier-free guidance of sampling where a run does not say (Stable Diffusion's usual 7.5); TrainConfig's default.
DEFAULT_GUIDANCE_SCALE = 7.5


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


@dataclass(frozen=True)
class Task:
    """One task of a run as run.json records it: the one description of a task once the config's tasks are
    numbered (the trainer writes it, evaluation, export and the experiments read it)."""

    index: int  # 1-based
    token: str  # "<v1>"
    class_word: str
    prompt: str  # c_i, e.g. "a photo of <v1> dog"
    pretrained_concept_prompt: str  # c_0 for this class, e.g. "a photo of a dog"
    images: Path
    eval_images: Optional[Path] = None

    def to_json(self) -> Dict[str, Any]:
        return {"index": self.index, "token": self.token, "class_word": self.class_word, "prompt": self.prompt,
                "pretrained_concept_prompt": self.pretrained_concept_prompt, "images": str(self.images),
                "eval_images": str(self.eval_images) if self.eval_images is not None else None}

    @classmethod
    def from_json(cls, values: Dict[str, Any]) -> "Task":
        """From run.json's entry (`class_prompt`: c_0 as runs before the rename recorded it); KeyError if missing."""
        c0 = values["pretrained_concept_prompt"] if "pretrained_concept_prompt" in values else values["class_prompt"]
        return cls(index=int(values["index"]), token=values["token"], class_word=values["class_word"],
                   prompt=values["prompt"], pretrained_concept_prompt=c0, images=Path(values["images"]),
                   eval_images=Path(values["eval_images"]) if values.get("eval_images") else None)


def adapter_files(folder: PathLike) -> List[str]:
    """The files of the U-Net adapter of the task state in `folder`, weights first: VeRA's peft pair where its
    PEFT_CONFIG_FILE is, else the diffusers LoRA file."""
    if (Path(folder) / PEFT_CONFIG_FILE).is_file():
        return [PEFT_WEIGHTS_FILE, PEFT_CONFIG_FILE]
    return [LORA_FILE]


@dataclass(frozen=True)
class TaskState:
    """What the model after task i needs beside its base: task i's LoRA, and the token embeddings of tasks 1..i."""

    index: int
    lora_dir: Path  # holds LORA_FILE (diffusers' load_lora_weights), or VeRA's peft pair (PeftModel.from_pretrained)
    lora: Dict[str, "torch.Tensor"]  # the adapter file's tensors
    embeddings: Dict[str, "torch.Tensor"]  # token -> (D,), tasks 1..i in order
    adapter: str = "lora"  # "vera": the state is a VeRA adapter in peft's layout


class Run:
    """The one reader of a run directory: its config, tasks, finished tasks, per-task metrics and states.

    Every read names the file it could not read, and why. `Run(path)` reads nothing until asked, and run.json
    once: a reader lives for one look at a run, while the trainer, which rewrites run.json, makes a new one.
    """

    def __init__(self, path: PathLike):
        self.path = Path(path)
        self._record: Optional[Dict[str, Any]] = None

    def task_dir(self, index: int) -> Path:
        return task_dir(self.path, index)

    def record(self) -> Dict[str, Any]:
        """run.json as written: config, tasks, base-model fingerprint."""
        if self._record is None:
            record = read_json(self.path / RUN_FILE)
            if not isinstance(record, dict):
                raise ValueError(f"corrupt run file {str(self.path / RUN_FILE)!r}: expected a mapping")
            self._record = record
        return self._record

    def config(self) -> Dict[str, Any]:
        """The resolved config the run was trained with, as a dict (`TrainConfig.from_dict` builds it back)."""
        config = self.record().get("config")
        if not isinstance(config, dict):
            raise ValueError(f"corrupt run file {str(self.path / RUN_FILE)!r}: missing its config")
        return config

    def tasks(self) -> List[Task]:
        """Every task of the run (finished or not), in order."""
        try:
            return [Task.from_json(entry) for entry in self.record()["tasks"]]
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"corrupt run file {str(self.path / RUN_FILE)!r}: missing {error}") from error

    def finished_tasks(self) -> List[int]:
        """Indices i of task_{i} folders holding metrics.json (finished tasks), sorted."""
        if not self.path.is_dir():
            return []
        done = []
        for child in self.path.glob("task_*"):
            suffix = child.name[len("task_"):]
            if suffix.isdigit() and (child / METRICS_FILE).is_file():
                done.append(int(suffix))
        return sorted(done)

    def metrics(self, index: int) -> Dict[str, Any]:
        """task_{index}/metrics.json: the task's training metrics (FileNotFoundError while it is unfinished)."""
        return read_json(self.task_dir(index) / METRICS_FILE)

    def evaluation(self) -> Dict[str, Any]:
        """eval/metrics.json: the matrices and summary `dcfast eval` wrote (FileNotFoundError before it ran)."""
        return read_json(self.path / EVAL_DIR / METRICS_FILE)

    def task_evaluation(self, index: int) -> Dict[str, Any]:
        """task_{index}/eval.json: state `index`'s column, from a run with eval_every_task (else FileNotFoundError)."""
        return read_json(self.task_dir(index) / TASK_EVAL_FILE)

    def fingerprint(self) -> Optional[str]:
        """The base model's fingerprint the run recorded (None for runs written before it was)."""
        return self.record().get("base_model_fingerprint")

    def base_model(self) -> Dict[str, Optional[str]]:
        """The run's base model as its config names it: name_or_path (a local dir or a Hub id), revision, variant."""
        config = self.config()
        return {"name_or_path": config["pretrained_model_name_or_path"], "revision": config.get("revision"),
                "variant": config.get("variant")}

    def sampling_guidance(self) -> float:
        """The classifier-free guidance the run samples with: its config's validation_guidance_scale
        (DEFAULT_GUIDANCE_SCALE for a run written without it, or without a readable run.json: evaluation reports
        that itself)."""
        try:
            return float(self.config().get("validation_guidance_scale", DEFAULT_GUIDANCE_SCALE))
        except (OSError, ValueError, TypeError, AttributeError):
            return DEFAULT_GUIDANCE_SCALE

    def state(self, index: int) -> TaskState:
        """Task state `index`: its LoRA and the modifier-token embeddings of tasks 1..index (`embeddings`).

        Refuses an unfinished task, naming its missing metrics.json.
        """
        tasks = self.tasks()
        if not 1 <= index <= len(tasks):
            raise ValueError(f"task_index must be in [1, {len(tasks)}] for run {str(self.path)!r}, got {index}")
        folder = self.task_dir(index)
        if not (folder / METRICS_FILE).is_file():
            raise FileNotFoundError(f"task {index} of run {str(self.path)!r} is not finished: missing "
                                    f"{str(folder / METRICS_FILE)!r}")
        files = adapter_files(folder)
        return TaskState(index=index, lora_dir=folder, lora=load_tensors(folder / files[0]),
                         embeddings=self.embeddings(index), adapter="vera" if len(files) > 1 else "lora")

    def embeddings(self, index: int, encoder: int = 0) -> Dict[str, "torch.Tensor"]:
        """The modifier-token embeddings of tasks 1..index in text encoder `encoder` (0; SDXL also 1),
        token -> (D,), in task order.

        Refuses a state with any of them missing or damaged, naming the files: without <v_i>'s embedding the
        tokenizer would split "<v_i>" into "<", "v", "i", ">" and the prompt would silently mean something else.
        """
        seen, name = self.tasks()[:index], EMBEDS_FILES[encoder]
        missing = [t for t in seen if not (self.task_dir(t.index) / name).is_file()]
        if missing:
            names = ", ".join(f"{str(self.task_dir(t.index) / name)!r} ({t.token})" for t in missing)
            raise FileNotFoundError(f"task state {index} of run {str(self.path)!r} needs the modifier-token embeddings "
                                    f"of tasks 1..{index}, and {len(missing)} are missing: {names}; without them "
                                    f"each such token would be split into pieces ('<', 'v', ...) and its prompt would "
                                    f"silently lose the concept. Restore the files from the run, or load an earlier state")
        embeddings = {}
        for task in seen:
            found = load_tensors(self.task_dir(task.index) / name)
            if task.token not in found or len(found) != 1 or found[task.token].dim() != 1:
                raise ValueError(f"corrupt run file {str(self.task_dir(task.index) / name)!r}: expected one "
                                 f"(D,) tensor named {task.token!r}, got "
                                 f"{ {k: tuple(v.shape) for k, v in found.items()} }")
            embeddings[task.token] = found[task.token]
        return embeddings


def check_tokens_whole(tokenizer, tokens: List[str], where: str) -> None:
    """ValueError when a modifier token does not tokenize to exactly one id (its embedding was not loaded)."""
    split = {t: tokenizer.tokenize(t) for t in tokens if len(tokenizer.tokenize(t)) != 1}
    if split:
        raise ValueError(f"{where}: modifier token(s) {sorted(split)} are not in the tokenizer and would be split "
                         f"({split}); load every learned embedding of tasks 1..N before prompting state N")


def load_pipeline(run_dir: PathLike, task_index: int, device: str = "cpu"):
    """The base model with task `task_index`'s LoRA (or VeRA, through peft) and every modifier token learned up to
    that task (SDXL: in both text encoders), as a StableDiffusionPipeline or a StableDiffusionXLPipeline.

    The base model is the run's pretrained_model_name_or_path (a local directory, or a Hub id read from the local
    cache at the run's revision), with the run's weight variant. Raises FileNotFoundError / ValueError naming the
    file when a task output is missing or corrupt, or when any embedding of tasks 1..task_index is missing.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from dcfast.models.hub import resolve_model
    from dcfast.models.loading import model_kind

    run = Run(run_dir)
    state = run.state(task_index)  # a clear error for a missing or damaged file before diffusers sees it
    model = run.base_model()
    base = resolve_model(model["name_or_path"], model["revision"])
    xl = model_kind(base) == "sdxl"
    second = run.embeddings(task_index, 1) if xl else {}
    if not (base / "vae").is_dir():
        raise ValueError(f"load_pipeline: base model {model['name_or_path']!r} has no vae/; "
                         f"{'StableDiffusionXLPipeline' if xl else 'StableDiffusionPipeline'} needs one")
    weights = {"variant": model["variant"]} if model["variant"] else {}
    with _quiet_diffusers():  # eval loads every task state: one loading bar and LoRA notice each is noise
        if xl:
            pipe = StableDiffusionXLPipeline.from_pretrained(base, local_files_only=True, **weights)
        else:
            pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False,
                                                           local_files_only=True, **weights)
        if state.adapter == "vera":
            load_vera(pipe, state.lora_dir)
        else:
            pipe.load_lora_weights(str(state.lora_dir), weight_name=LORA_FILE)
        for token, embedding in state.embeddings.items():
            pipe.load_textual_inversion({token: embedding}, token=token)
        for token, embedding in second.items():
            pipe.load_textual_inversion({token: embedding}, token=token, text_encoder=pipe.text_encoder_2,
                                        tokenizer=pipe.tokenizer_2)
    check_tokens_whole(pipe.tokenizer, list(state.embeddings), f"task state {task_index}")
    if xl:
        check_tokens_whole(pipe.tokenizer_2, list(second), f"task state {task_index} (second text encoder)")
    return pipe.to(device)


def load_vera(pipe, folder: PathLike) -> None:
    """Inject the VeRA adapter saved in `folder` (peft's layout) into `pipe.unet`: diffusers' pipelines have no VeRA
    loader, so peft's PeftModel loads it, wrapping the U-Net's layers in place; the bare U-Net is kept."""
    from peft import PeftModel

    pipe.unet = PeftModel.from_pretrained(pipe.unet, str(folder)).get_base_model()


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
