"""Mid-task checkpoints: LoRA, token, optimizer, LR scheduler and RNG states; safetensors + JSON only.

    output_dir/checkpoints/task_{i}-step_{s}/
        state.safetensors   lora.<name>, token, optimizer.<param id>.<key>, rng.shared, rng.local.<rank>
        state.json          task, step, optimizer param_groups and scalar state, lr scheduler, losses

A checkpoint is written into a temporary folder and renamed into place, then older ones are removed,
so the newest complete checkpoint always survives a kill.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from dcfast.io.runs import checkpoints_dir, load_tensors, read_json, save_tensors, write_json

TENSORS, META = "state.safetensors", "state.json"


@dataclass
class Checkpoint:
    """A loaded checkpoint: where the run stopped and what to restore."""

    path: Path
    task: int
    step: int
    tensors: Dict[str, torch.Tensor]
    meta: Dict[str, Any]

    def prefixed(self, prefix: str) -> Dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}


def flatten_optimizer(optimizer: torch.optim.Optimizer) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """torch optimizer state as (tensors, JSON): tensor entries to safetensors, everything else to JSON."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> Dict[str, Any]:
    """Inverse of flatten_optimizer: a state dict for optimizer.load_state_dict."""
    state: Dict[int, Dict[str, Any]] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for key, value in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(output_dir: str, task: int, step: int, tensors: Dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer, meta: Dict[str, Any]) -> Path:
    """Write checkpoint (task, step) atomically, then delete the older ones."""
    root = checkpoints_dir(output_dir)
    final = root / f"task_{task}-step_{step}"
    tmp = root / f".tmp-task_{task}-step_{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    opt_tensors, opt_meta = flatten_optimizer(optimizer)
    save_tensors(tmp / TENSORS, {**tensors, **opt_tensors})
    write_json(tmp / META, {"task": task, "step": step, "optimizer": opt_meta, **meta})
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in root.glob("task_*-step_*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _parse(name: str) -> Optional[Tuple[int, int]]:
    try:
        task, step = name.split("-step_")
        return int(task[len("task_"):]), int(step)
    except ValueError:
        return None


def latest_checkpoint(output_dir: str) -> Optional[Path]:
    """The newest complete checkpoint folder, by (task, step)."""
    found = [(key, p) for p in checkpoints_dir(output_dir).glob("task_*-step_*")
             if (key := _parse(p.name)) is not None and (p / META).is_file()]
    return max(found)[1] if found else None


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint folder; errors name the damaged or missing file."""
    meta = read_json(Path(path) / META)
    return Checkpoint(Path(path), int(meta["task"]), int(meta["step"]), load_tensors(Path(path) / TENSORS), meta)


def restore_optimizer(optimizer: torch.optim.Optimizer, checkpoint: Checkpoint) -> None:
    optimizer.load_state_dict(unflatten_optimizer(checkpoint.prefixed("optimizer."), checkpoint.meta["optimizer"]))


def remove_checkpoints(output_dir: str) -> None:
    """Drop every mid-task checkpoint (after a task's outputs are written)."""
    shutil.rmtree(checkpoints_dir(output_dir), ignore_errors=True)


def losses_from(checkpoint: Optional[Checkpoint]) -> List[float]:
    return list(checkpoint.meta.get("losses", [])) if checkpoint else []
