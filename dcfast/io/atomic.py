"""Atomic file writes: a temp file in the target's folder, fsync, then os.replace — never a half file."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, Union

if TYPE_CHECKING:
    import torch

PathLike = Union[str, os.PathLike]


def write_atomic(path: PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(temp_path)`, then move the finished file onto `path` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(temp)
        with open(temp, "rb") as stream:
            os.fsync(stream.fileno())
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.remove(temp)
        raise
    return path


def write_json_atomic(path: PathLike, data: object) -> Path:
    """JSON with sorted keys; tensors and other non-JSON values are written as their str()."""
    def write(temp: str) -> None:
        with open(temp, "w") as stream:
            json.dump(data, stream, indent=2, sort_keys=True, default=str)
            stream.write("\n")
    return write_atomic(path, write)


def save_safetensors_atomic(path: PathLike, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str] = None) -> Path:
    """safetensors file of contiguous CPU copies of `tensors`."""
    from safetensors.torch import save_file

    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    return write_atomic(path, lambda temp: save_file(cpu, temp, metadata=metadata))
